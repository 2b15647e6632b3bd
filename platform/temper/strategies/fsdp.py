"""FSDP2: `fully_shard` on every block and on the root; optionally on a 2-D (dp, tp) mesh
after tensor parallelism. The model arrives on the meta device and is allocated and
initialized only after sharding, so no rank ever holds the full model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from temper.dist import DistContext
from temper.models.init import InitWeights, materialize
from temper.spec.job import FSDPSpec, JobSpec
from temper.strategies.base import Strategy
from temper.strategies.parallelize import apply_model_parallelism, build_mesh
from temper.strategies.pipeline_split import stack_blocks

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class FSDPStrategy(Strategy):
    def __init__(self, spec: FSDPSpec, *, ctx: DistContext, job: JobSpec | None = None) -> None:
        super().__init__(ctx=ctx, seed=job.seed if job else 0)
        self.spec = spec
        self.precision = job.train.precision if job else "fp32"

    def _policies(self):
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy

        param = self.spec.param_dtype
        if param == "auto":
            param = "bf16" if self.precision == "bf16" else "fp32"
        mp = MixedPrecisionPolicy(
            param_dtype=None if param == "fp32" else _DTYPES[param],
            reduce_dtype=_DTYPES[self.spec.reduce_dtype],
        )
        pin = self.ctx.device.type == "cuda"
        offload = CPUOffloadPolicy(pin_memory=pin) if self.spec.cpu_offload else OffloadPolicy()
        return mp, offload

    def setup(
        self,
        model: nn.Module,
        *,
        build_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
        pretrained: InitWeights | None = None,
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        from torch.distributed.fsdp import fully_shard

        mesh = build_mesh(self.ctx, tensor_parallel=self.spec.tensor_parallel)
        dp_mesh = mesh["dp"]
        self.data_rank, self.data_world_size = dp_mesh.get_local_rank(), dp_mesh.size()
        apply_model_parallelism(model, tp_mesh=mesh["tp"] if self.spec.tensor_parallel > 1 else None,
                                activation_checkpointing=self.spec.activation_checkpointing,
                                compile=self.spec.compile)
        mp, offload = self._policies()
        shard = dict(mesh=dp_mesh, reshard_after_forward=self.spec.reshard_after_forward,
                     mp_policy=mp, offload_policy=offload)
        for block in stack_blocks(model):
            fully_shard(block, **shard)
        fully_shard(model, **shard)
        offload = self.spec.cpu_offload and self.ctx.device.type != "meta"  # meta: temper plan
        device = torch.device("cpu") if offload else self.ctx.device
        materialize(model, device=device, seed=self.seed, weights=pretrained)
        self.model = model
        self.optimizer = build_optimizer(model)
        return self.model, self.optimizer

    @contextlib.contextmanager
    def accumulate(self, sync: bool) -> Iterator[None]:
        self.model.set_requires_gradient_sync(sync)  # no reduce-scatter on non-final micro-steps
        yield
