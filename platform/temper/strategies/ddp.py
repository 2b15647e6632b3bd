"""DDP: every rank holds the whole model; gradients are all-reduced in buckets.

With `tensor_parallel > 1` the model is first split by the TP plan on a 2-D (dp, tp) mesh;
data parallelism over `dp` then uses the DTensor-aware `replicate` (DDP on FSDP2's engine),
which also makes the parameters TP left alone DTensors, as the optimizer's foreach kernels need.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from temper.dist import DistContext
from temper.models.init import InitWeights, materialize
from temper.spec.job import DDPSpec, JobSpec
from temper.strategies.base import Strategy
from temper.strategies.parallelize import apply_model_parallelism, build_mesh


class DDPStrategy(Strategy):
    def __init__(self, spec: DDPSpec, *, ctx: DistContext, job: JobSpec | None = None) -> None:
        super().__init__(ctx=ctx, seed=job.seed if job else 0)
        self.spec = spec
        self._replicated = False  # data parallel through `replicate` (the TP path)

    def setup(
        self,
        model: nn.Module,
        *,
        build_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
        pretrained: InitWeights | None = None,
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        tp = self.spec.tensor_parallel
        mesh = build_mesh(self.ctx, tensor_parallel=tp) if tp > 1 else None
        if mesh is not None:
            self.data_rank, self.data_world_size = mesh["dp"].get_local_rank(), mesh["dp"].size()
        apply_model_parallelism(model, tp_mesh=mesh["tp"] if mesh is not None else None,
                                activation_checkpointing=self.spec.activation_checkpointing,
                                compile=self.spec.compile)
        if mesh is not None:  # also at dp=1: every parameter becomes a DTensor (one optimizer kind)
            from torch.distributed._composable.replicate_with_fsdp import replicate

            replicate(model, mesh=mesh["dp"])
            self._replicated = True
        materialize(model, device=self.ctx.device, seed=self.seed, weights=pretrained)
        model = model.to(self.ctx.device)
        # On the meta device (`temper plan`) the DDP wrapper cannot be built (it broadcasts
        # values); a replica holds exactly the bare model, so the plan sizes that.
        if self.ctx.world_size > 1 and mesh is None and self.ctx.device.type != "meta":
            device_ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
            model = DistributedDataParallel(
                model,
                device_ids=device_ids,
                bucket_cap_mb=self.spec.bucket_cap_mb,
                find_unused_parameters=self.spec.find_unused_parameters,
                static_graph=self.spec.static_graph,
            )
        self.model = model
        self.optimizer = build_optimizer(model)
        return self.model, self.optimizer

    @contextlib.contextmanager
    def accumulate(self, sync: bool) -> Iterator[None]:
        if self._replicated:
            self.model.set_requires_gradient_sync(sync)
            yield
        elif sync or not isinstance(self.model, DistributedDataParallel):
            yield
        else:
            with self.model.no_sync():
                yield

    def unwrap(self) -> nn.Module:
        if isinstance(self.model, DistributedDataParallel):
            return self.model.module
        return self.model
