"""`temper plan`: what one rank of the job will hold and how long the job will take, before
any GPU is paid for. docs/plan.md explains how to read it and how exact it is.

In this one CPU process: a fake process group of the job's world size
(torch.testing._internal.distributed.fake_pg, backend "fake": collectives do nothing),
the job's own model built on the meta device, and its own strategy's `setup` on a meta-device
DistContext (rank 0: FSDP's first shard is the largest). Parameters, gradients and optimizer
state are the sharded tensors themselves (DTensor local shapes after one optimizer step on
zero gradients, which creates the optimizer's state as the real step does); activations are
runtime/activations.py's formula; FLOPs are the model's `train_flops_per_sample`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from temper.dist import DistContext
from temper.errors import TemperError
from temper.models import build_model
from temper.runtime.activations import (
    ActivationEstimate,
    estimate_activations,
    pipeline_activations,
)
from temper.runtime.optim import build_optimizer
from temper.runtime.perf import peak_flops_by_name
from temper.spec.job import JobSpec
from temper.spec.strategy import strategy_problems
from temper.strategies import build_strategy
from temper.strategies.memory import MemoryReport
from temper.strategies.pipeline_split import stack_blocks

GIB = 1024**3


@dataclass(frozen=True)
class GPU:
    cuda_name: str  # what torch.cuda.get_device_name() says (the MFU peak table's key)
    memory: int  # bytes, as torch.cuda.get_device_properties().total_memory reports


GPUS: dict[str, GPU] = {
    "h100-80gb": GPU("NVIDIA H100 80GB HBM3", 81559 * 2**20),
    "h100-pcie": GPU("NVIDIA H100 PCIe", 81559 * 2**20),
    "h200": GPU("NVIDIA H200", 143771 * 2**20),
    "a100-80gb": GPU("NVIDIA A100-SXM4-80GB", 81920 * 2**20),
    "a100-40gb": GPU("NVIDIA A100-SXM4-40GB", 40960 * 2**20),
    "l40s": GPU("NVIDIA L40S", 46068 * 2**20),
    "a10g": GPU("NVIDIA A10G", 23028 * 2**20),
    "l4": GPU("NVIDIA L4", 23034 * 2**20),
}
#: Kept free of the plan's tensors: CUDA context, NCCL buffers, allocator fragmentation.
RESERVE = 0.10


def gpu_for(spec: JobSpec, name: str | None) -> str | None:
    """`name` (checked), else the GPU the job's cluster.node_selector asks for, else None."""
    if name is not None:
        if name not in GPUS:
            raise TemperError(f"--gpu {name!r} is not known; accepted: {', '.join(GPUS)}")
        return name
    wanted = " ".join(spec.cluster.node_selector.values()).upper().replace("-", " ")
    for key, gpu in GPUS.items():
        if gpu.cuda_name.upper().replace("NVIDIA ", "").replace("-", " ") in wanted:
            return key
    return None


@dataclass(frozen=True)
class Plan:
    spec: JobSpec
    memory: MemoryReport | None  # None: this strategy cannot be planned (`unplanned` says why)
    buffers: int  # FSDP's gathered units / DDP's gradient buckets (see `_buffer_bytes`)
    activations: ActivationEstimate | None
    gpu: str | None
    mfu: float
    flops_per_step: float | None
    unplanned: str | None = None
    rank: int = 0  # the rank planned; a pipeline: the first rank of its fullest stage
    pipeline_rank: int | None = None

    @property
    def offloaded(self) -> bool:
        """FSDP's cpu_offload: parameters, gradients and optimizer state sit in host memory."""
        return bool(getattr(self.spec.strategy, "cpu_offload", False))

    @property
    def total(self) -> int:
        """Bytes on the GPU: what the rank holds (unless offloaded), buffers, activations."""
        held = self.memory.total if self.memory and not self.offloaded else 0
        return held + self.buffers + (self.activations.peak if self.activations else 0)

    @property
    def usable(self) -> int | None:
        return int(GPUS[self.gpu].memory * (1 - RESERVE)) if self.gpu else None

    @property
    def step_time_s(self) -> float | None:
        peak = peak_flops_by_name(GPUS[self.gpu].cuda_name, self.spec.train.precision) if self.gpu else None
        if not (peak and self.flops_per_step):
            return None
        return self.flops_per_step / (peak * self.mfu * self.spec.resources.workers)

    def problem(self) -> str | None:
        """One line naming what to change when the plan does not fit the GPU, else None."""
        if self.memory is None or self.usable is None or self.total <= self.usable:
            return None
        s, fixes = self.spec.strategy, []
        if getattr(s, "activation_checkpointing", "none") != "full" and self.activations:
            fixes.append("strategy.activation_checkpointing=full")
        if s.kind == "ddp":
            fixes.append("strategy=fsdp")
        elif s.kind == "fsdp":
            if _tensor_parallel_can_double(self.spec):
                fixes.append(f"strategy.tensor_parallel={s.tensor_parallel * 2}")
            if not s.cpu_offload:
                fixes.append("strategy.cpu_offload=true")
        if self.spec.train.micro_batch_size > 1:
            fixes.append(f"train.micro_batch_size={self.spec.train.micro_batch_size // 2} "
                         "(with train.grad_accum x2)")
        return (f"{self.spec.name} does not fit: {self.total / GIB:.1f} GiB per rank > "
                f"{self.usable / GIB:.1f} GiB usable on {self.gpu}; try {' or '.join(fixes) or 'more workers'}")


def _tensor_parallel_can_double(spec: JobSpec) -> bool:
    """Twice the tensor-parallel degree is valid for this model and world size (within a node of 8)."""
    tp = spec.strategy.tensor_parallel * 2
    if tp > min(spec.resources.workers, 8):
        return False
    return not strategy_problems(strategy=spec.strategy.model_copy(update={"tensor_parallel": tp}),
                                 model=spec.model, workers=spec.resources.workers)


def build_plan(spec: JobSpec, *, gpu: str | None = None, mfu: float = 0.4) -> Plan:
    """Plan `spec` at resources.workers ranks (see the module docstring)."""
    if not 0 < mfu <= 1:
        raise TemperError(f"--mfu {mfu} is not a fraction; pass a value in (0, 1], e.g. 0.4")
    gpu = gpu_for(spec, gpu)
    model = _meta_model(spec)
    fps = getattr(model, "train_flops_per_sample", lambda: None)()
    common = dict(spec=spec, activations=estimate_activations(spec), gpu=gpu, mfu=mfu,
                  flops_per_step=fps * spec.global_batch_size if fps else None)
    if getattr(spec.strategy, "pipeline_parallel", 1) > 1:
        return max(pipeline_plans(spec, common=common), key=lambda plan: plan.total)
    if spec.strategy.kind == "deepspeed":
        return Plan(memory=None, buffers=0, **common, unplanned=(
            "not planned for strategy.kind=deepspeed: ZeRO builds its partitions from real "
            "tensors, which a meta-device plan does not have; plan the job with strategy=fsdp"))
    memory, buffers = _sharded_memory(spec, model)
    return Plan(memory=memory, buffers=buffers, **common)


def _meta_model(spec: JobSpec) -> torch.nn.Module:
    with torch.device("meta"):
        model = build_model(spec.model, objective=spec.objective)
    if spec.init_from is not None and spec.init_from.freeze_backbone:
        model.freeze_backbone()  # as the loop does: only the heads get gradients and state
    return model


def pipeline_plans(spec: JobSpec, *, common: dict) -> list[Plan]:
    """One plan per pipeline rank (strategy.pipeline_parallel > 1): its stages' own
    parameters, gradients and optimizer state (the last stage's copy of a tied embedding
    included), planned as the first rank of that stage (dp and tp rank 0), and its
    activations by `pipeline_activations`. `common`: build_plan's fields of every plan."""
    s = spec.strategy
    stride = spec.resources.workers // s.pipeline_parallel  # ranks per stage (mesh: pp outermost)
    plans = []
    for r in range(s.pipeline_parallel):
        memory, buffers = _sharded_memory(spec, _meta_model(spec), rank=r * stride)
        plans.append(Plan(memory=memory, buffers=buffers, **{
            **common, "activations": pipeline_activations(spec, pipeline_rank=r)}, rank=r * stride, pipeline_rank=r))
    return plans


def _sharded_memory(spec: JobSpec, model: torch.nn.Module, *, rank: int = 0) -> tuple[MemoryReport, int]:
    with fake_process_group(spec.resources.workers, rank=rank):
        ctx = DistContext(rank=rank, world_size=spec.resources.workers, local_rank=0,
                          device=torch.device("meta"), backend="fake")
        strategy = build_strategy(spec, ctx=ctx)
        strategy.setup(model, build_optimizer=lambda m: build_optimizer(m, spec.optim))
        try:
            params = [p for p in strategy.model.parameters() if p.requires_grad]
            for p in params:
                p.grad = torch.zeros_like(p)
            strategy.optimizer.step()  # creates the optimizer's state, as the first real step does
            return strategy.memory_report(), _buffer_bytes(spec, strategy.unwrap())
        finally:
            strategy.close()


def _buffer_bytes(spec: JobSpec, model: torch.nn.Module) -> int:
    """Transient full-size tensors, by formula. FSDP: the unsharded parameters of two blocks
    (the one computing and the one prefetched) and one block's unsharded gradients (before the
    reduce-scatter), all of the model's gathered parameters when reshard_after_forward is
    false; DDP: its gradient buckets, a copy of every gradient; DDP x TP (`replicate`, FSDP's
    engine without resharding): a gathered copy of every parameter from forward to backward."""
    s = spec.strategy
    tp = getattr(s, "tensor_parallel", 1)
    if s.kind == "ddp":
        if getattr(s, "pipeline_parallel", 1) == spec.resources.workers:  # stage chunks unwrapped: no buckets
            return 0
        return sum(_local_bytes(p) for p in model.parameters() if p.requires_grad or tp > 1)
    param_bytes = 2 if (s.param_dtype == "bf16" or (s.param_dtype == "auto" and spec.train.precision == "bf16")) else 4
    blocks = stack_blocks(model)
    unit = max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0) // tp
    if not s.reshard_after_forward:
        gathered = sum(p.numel() for p in model.parameters()) // tp * param_bytes
        return gathered + unit * 4
    return 2 * unit * param_bytes + unit * 4


def _local_bytes(p: torch.Tensor) -> int:
    local = p.to_local() if hasattr(p, "to_local") else p
    return local.numel() * local.element_size()


@contextlib.contextmanager
def fake_process_group(world_size: int, *, rank: int = 0) -> Iterator[None]:
    """A default process group of `world_size` ranks whose collectives do nothing (as `rank`)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise TemperError("temper plan needs a process without a process group; run it from the CLI")
    dist.init_process_group(backend="fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()
