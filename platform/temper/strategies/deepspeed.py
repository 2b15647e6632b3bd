"""DeepSpeed ZeRO 1/2/3 through `deepspeed.initialize`, imported lazily.

Our loop divides the loss by grad_accum itself, so `engine.backward(..., scale_wrt_gas=False)`;
DeepSpeed keeps its own accumulation count (gradient_accumulation_steps = train.grad_accum):
`engine.step()` after every micro-step reduces and updates only on the boundary, and clips
by `gradient_clipping` there. `clip_grad_norm` then reports the norm DeepSpeed measured.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from temper.dist import DistContext
from temper.errors import MissingDependencyError, TemperError
from temper.models.init import InitWeights, is_meta, materialize
from temper.spec.job import DeepSpeedSpec, JobSpec
from temper.strategies.base import Strategy
from temper.strategies.deepspeed_config import build_deepspeed_config
from temper.strategies.deepspeed_init import apply_partitioned_init
from temper.strategies.memory import MemoryReport, tensor_bytes
from temper.strategies.parallelize import apply_model_parallelism

log = logging.getLogger(__name__)


def import_deepspeed(*, device: torch.device) -> Any:
    """Import deepspeed, telling it the accelerator; on CPU skip its shared-memory comm op
    (a C++ build of ~60 s on first use) so collectives go through the gloo group."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError:
        raise MissingDependencyError(
            "deepspeed", feature="strategy.kind=deepspeed", extra="deepspeed"
        ) from None
    if device.type == "cpu" and os.environ.get("TEMPER_DEEPSPEED_SHM", "0") != "1":
        import deepspeed.ops

        # Read by deepspeed.comm when it wraps the process group; a dict we provide here
        # means "not compatible" for the shm op and skips DeepSpeed's probe of every op.
        ops = deepspeed.ops.__dict__.setdefault("__compatible_ops__", {})
        ops["deepspeed_shm_comm"] = False
    return deepspeed


class DeepSpeedStrategy(Strategy):
    checkpoint_engine = "deepspeed"

    def __init__(self, spec: DeepSpeedSpec, *, ctx: DistContext, job: JobSpec | None = None) -> None:
        super().__init__(ctx=ctx, seed=job.seed if job else 0)
        if job is None:
            raise ValueError("DeepSpeedStrategy needs the job spec (batch sizes, clipping)")
        self.spec = spec
        self.job = job
        self.engine = None

    def setup(
        self,
        model: nn.Module,
        *,
        build_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
        pretrained: InitWeights | None = None,
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        deepspeed = import_deepspeed(device=self.ctx.device)
        apply_model_parallelism(model, tp_mesh=None,  # ZeRO does not compose with DTensor TP
                                activation_checkpointing=self.spec.activation_checkpointing, compile=False)
        config = build_deepspeed_config(self.spec, job=self.job, warn=log.warning)
        if self.spec.stage == 3 and is_meta(model) and self.ctx.device.type != "meta":
            # Partitioned as it is allocated: a rank never holds the whole model.
            apply_partitioned_init(model, deepspeed=deepspeed, config=config, device=self.ctx.device,
                                   seed=self.seed, weights=pretrained)
        else:  # ZeRO-1/2 replicate the parameters anyway
            materialize(model, device=self.ctx.device, seed=self.seed, weights=pretrained)
        optimizer = build_optimizer(model)
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=config, dist_init_required=False
        )
        self.engine = self.model = engine
        # The schedule drives the wrapped torch optimizer's lr, which ZeRO's step uses.
        self.optimizer = optimizer
        return self.model, self.optimizer

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # the loop already divided by grad_accum
        self.engine.step()  # DeepSpeed's micro-step: reduce + update only on its boundary

    def clip_grad_norm(self, max_norm: float | None) -> torch.Tensor:
        """Clipping happened inside the boundary step (gradient_clipping); report its norm."""
        norm = self.engine.get_global_grad_norm()
        if isinstance(norm, torch.Tensor):
            return norm.detach().float().reshape(())
        return torch.tensor(float(norm or 0.0))

    def step(self) -> None:
        """Nothing left: DeepSpeed stepped and zeroed on the last micro-step's backward."""

    def measure_memory(self, micro_step: Callable[[], torch.Tensor]) -> MemoryReport:
        """One optimizer step of grad_accum micro-steps; gradients are the most held after
        any micro-step's backward (between micro-steps ZeRO-1 keeps full gradients, ZeRO-2
        and 3 accumulate into their partitions)."""
        grads = 0
        for _ in range(self.job.train.grad_accum):
            self.engine.backward(micro_step(), scale_wrt_gas=False)
            grads = max(grads, self.memory_report().grads)
            self.engine.step()
        after = self.memory_report()
        return MemoryReport(params=after.params, grads=grads, optim=after.optim)

    def memory_report(self) -> MemoryReport:
        return deepspeed_memory(self.engine, stage=self.spec.stage)

    def unwrap(self) -> nn.Module:
        return self.engine.module

    def checkpoint_state(self) -> dict:
        raise NotImplementedError("DeepSpeed checkpoints go through save_engine_checkpoint")

    def load_checkpoint_state(self, state: dict) -> None:
        raise NotImplementedError("DeepSpeed checkpoints go through load_engine_checkpoint")

    def save_engine_checkpoint(self, directory: str, *, tag: str) -> None:
        """Model and ZeRO optimizer partitions into `directory`/`tag` (every rank calls this).
        No `latest` file: the caller records the tag; LR schedule, data and RNG are the
        caller's too (our schedule drives the torch optimizer, DeepSpeed has none)."""
        self.engine.save_checkpoint(_local_dir(directory), tag=tag, client_state={}, save_latest=False)

    def load_engine_checkpoint(self, directory: str, *, tag: str) -> None:
        """Load what `save_engine_checkpoint` wrote, into an engine of the same world size."""
        path, _ = self.engine.load_checkpoint(
            _local_dir(directory), tag=tag, load_module_strict=True, load_optimizer_states=True,
            load_lr_scheduler_states=False, load_module_only=False,
        )
        if path is None:
            raise TemperError(f"no DeepSpeed checkpoint '{tag}' in {directory}; pick another checkpoint")

    def close(self) -> None:
        if self.engine is not None:
            self.engine.destroy()
        self.engine = None
        super().close()


def _local_dir(directory: str) -> str:
    """DeepSpeed opens plain paths: a remote URL is a user error with a fix."""
    if directory.startswith("file://"):
        return directory[len("file://"):]
    if "://" in directory:
        raise TemperError(
            f"checkpoint.dir={directory} is remote, but DeepSpeed writes checkpoints only to local "
            "or shared filesystems; set checkpoint.dir to a path every worker shares, or use "
            "strategy.kind=fsdp, whose checkpoints can go to s3://"
        )
    return directory


def deepspeed_memory(engine: Any, *, stage: int) -> MemoryReport:
    """Local tensors of a ZeRO engine: params (partitions under stage 3), gradients (full
    under stage 1, partitions under 2 and 3), optimizer state + fp32 master partitions."""
    zero = engine.optimizer
    seen: set[int] = set()

    def total(tensors) -> int:
        out = 0
        for t in tensors:
            if t is None or not isinstance(t, torch.Tensor) or t.numel() == 0:
                continue
            key = (t.data_ptr(), t.numel())  # ZeRO 1/2 params are views of one flat buffer
            if key in seen:
                continue
            seen.add(key)
            out += tensor_bytes(t)
        return out

    params = list(engine.module.parameters())
    if stage == 3:
        param_bytes = total(p.ds_tensor for p in params)
        masters = list(zero.fp32_partitioned_groups_flat)
        grads = [zero.grad_partitions_flat_buffer, *(m.grad for m in masters)]
    else:
        param_bytes = total(params)
        masters = list(zero.single_partition_of_fp32_groups)
        grads = [getattr(zero, "grads_in_partition", None), *(m.grad for m in masters),
                 *(p.grad for p in params)]
        for group in getattr(zero, "averaged_gradients", {}).values():
            grads += list(group or [])
    state = [v for st in zero.optimizer.state.values() for v in st.values()
             if isinstance(v, torch.Tensor) and v.ndim > 0]
    grad_bytes = total(grads)
    return MemoryReport(params=param_bytes, grads=grad_bytes, optim=total([*masters, *state]))
