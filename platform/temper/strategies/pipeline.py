"""Pipeline parallelism (torch.distributed.pipelining), composed with FSDP or DDP and tensor
parallel on one 3-D (pp, dp, tp) mesh: world = pipeline_parallel x dp x tensor_parallel.

    setup: the bare model arrives on the meta device; its layer stack is split into
        pipeline_parallel x stages_per_rank stages (strategies/pipeline_split.py); this rank
        keeps its stages' layers under their original names, applies TP -> activation
        checkpointing -> compile (parallelize.py, as every strategy), shards (FSDP) or
        replicates (DDP) each stage chunk over dp, and initializes from (seed, name).
    forward_backward: the step's samples (grad_accum loader batches) are cut into
        pipeline_microbatches; the objective prepares each micro-batch's model input on every
        rank (the same RNG on every stage: data is split by dp rank only); the schedule
        (gpipe | 1f1b | interleaved_1f1b) runs; the last stage scores each micro-batch with the
        objective's loss. Gradients are scaled by 1 / microbatches by the schedule.

Tied input/output embeddings: the last stage keeps its own copy of the token embedding
(pipeline_split.py); after the schedule's backward the first and last stage's copies sum
their gradients over `tie_group` (Megatron's embedding all-reduce) and stay equal.

The loss and metrics exist on the last stage only: each rank returns them weighted so that
the window's mean over all ranks (loop._close_window's one all-gather) is the last stage's
mean (pp x value there, 0 elsewhere). Clipping uses the norm over every stage.
`strategy.model` is this rank's pruned model (original names), so checkpoints (DCP), export
and a resume on another layout see the bare model's keys.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from temper.dist import DistContext
from temper.models.init import InitWeights, apply_deterministic_init, apply_ties, shared_parameters
from temper.objectives.base import ObjectiveOutput
from temper.spec.job import JobSpec
from temper.strategies.base import StepOutput, Strategy
from temper.strategies.grad_norm import clip_grad_norm_global
from temper.strategies.parallelize import apply_model_parallelism
from temper.strategies.pipeline_split import (
    StageChunk,
    apply_stage_pruning,
    split_layers,
    stage_ranges,
    tied_layers,
)


class PipelineStrategy(Strategy):
    """strategy.pipeline_parallel > 1 with kind ddp or fsdp (the data-parallel engine per chunk)."""

    def __init__(self, spec: Any, *, ctx: DistContext, job: JobSpec | None = None) -> None:
        super().__init__(ctx=ctx, seed=job.seed if job else 0)
        self.spec = spec
        self.precision = job.train.precision if job else "fp32"
        self.pp, self.n_micro = spec.pipeline_parallel, spec.pipeline_microbatches
        self.chunks: list[StageChunk] = []
        self._pending: dict | None = None  # the step's micro-batches, read by _loss_fn
        self._metric_keys: list[str] | None = None
        self._eval_names: tuple[list[str], list[str]] | None = None

    def setup(self, model: nn.Module, *, build_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
              pretrained: InitWeights | None = None) -> tuple[nn.Module, torch.optim.Optimizer]:
        from torch.distributed.device_mesh import init_device_mesh

        spec, ctx, tp = self.spec, self.ctx, self.spec.tensor_parallel
        dp = ctx.world_size // (self.pp * tp)
        device_type = "cpu" if ctx.device.type == "meta" else ctx.device.type  # meta: temper plan
        mesh = init_device_mesh(device_type, (self.pp, dp, tp), mesh_dim_names=("pp", "dp", "tp"))
        self.mesh, self.pp_group = mesh, mesh["pp"].get_group()
        self.pp_rank = mesh["pp"].get_local_rank()
        self.data_rank, self.data_world_size = mesh["dp"].get_local_rank(), dp
        n_stages = self.pp * spec.stages_per_rank
        ranges = stage_ranges(split_layers(n_layer=len(model.blocks), stages=n_stages,
                                           explicit=spec.pipeline_layers))
        self.stage_ids = [self.pp_rank + k * self.pp for k in range(spec.stages_per_rank)]
        self.has_first, self.has_last = 0 in self.stage_ids, n_stages - 1 in self.stage_ids
        tied = tied_layers(model)  # the same on every rank: decided before the split
        self.dropout = any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())
        self.tie_group = _embedding_group(mesh) if tied else None
        apply_stage_pruning(model, blocks=[i for s in self.stage_ids for i in ranges[s]],
                            first=self.has_first, last=self.has_last)
        tied_at = [(m, a) for n in tied if self.has_first or self.has_last  # (module, attribute)
                   for m in getattr(model, n).modules() for a, p in m._parameters.items() if p is not None]
        apply_model_parallelism(model, tp_mesh=mesh["tp"] if tp > 1 else None,
                                activation_checkpointing=spec.activation_checkpointing, compile=spec.compile)
        self.chunks = [StageChunk(model, blocks=ranges[s], first=s == 0, last=s == n_stages - 1)
                       for s in self.stage_ids]
        wrapped = [self._wrap(chunk, dp_mesh=mesh["dp"], sharded=dp > 1 or tp > 1) for chunk in self.chunks]
        if ctx.device.type == "meta":  # temper plan: this rank's shapes, nothing to allocate or run
            self.model, self.tied = model, []
            self.optimizer = build_optimizer(model)
            return self.model, self.optimizer
        shared = shared_parameters(model)
        for chunk in wrapped:
            chunk.to_empty(device=ctx.device)  # each chunk's engine re-registers its parameters
        apply_ties(shared)
        self.tied = [getattr(m, a) for m, a in tied_at]  # this rank's copies, as the engine holds them
        apply_deterministic_init(model, seed=self.seed, weights=pretrained)  # names: the bare model's
        self.model = model
        self.optimizer = build_optimizer(model)
        self.schedule = self._build_schedule(wrapped)
        return self.model, self.optimizer

    def _wrap(self, chunk: StageChunk, *, dp_mesh, sharded: bool) -> nn.Module:
        """FSDP: fully_shard each block, then the chunk; DDP: replicate the chunk over dp."""
        if self.spec.kind == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for block in chunk.blocks.values():
                fully_shard(block, mesh=dp_mesh)
            fully_shard(chunk, mesh=dp_mesh)
        elif sharded:
            from torch.distributed._composable.replicate_with_fsdp import replicate

            replicate(chunk, mesh=dp_mesh)
        return chunk

    def _build_schedule(self, chunks: list[nn.Module]):
        from torch.distributed import pipelining as pl

        n_stages = self.pp * self.spec.stages_per_rank
        stages = [pl.PipelineStage(c, s, n_stages, self.ctx.device, group=self.pp_group)
                  for c, s in zip(chunks, self.stage_ids, strict=True)]
        kind = self.spec.pipeline_schedule
        n = self.n_micro
        if kind == "interleaved_1f1b":
            return pl.ScheduleInterleaved1F1B(stages, n, loss_fn=self._loss_fn)
        cls = pl.ScheduleGPipe if kind == "gpipe" else pl.Schedule1F1B
        return cls(stages[0], n, loss_fn=self._loss_fn)

    def _loss_fn(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The last stage scores micro-batch `target[0]` with the objective's loss."""
        p = self._pending
        i = int(target[0])
        out = p["objective"].loss(_fill(p["calls"][i][2], output), p["micro"][i])
        p["outs"][i] = out
        hook = p.get("hook")
        return out.loss if hook is None else hook(out.loss)

    def _prepare(self, objective: Any, batch: dict, parts: int) -> tuple[torch.Tensor, dict]:
        """Split `batch` into `parts` micro-batches and capture each one's model input (the
        objective's forward runs against a recorder); set the head on the last chunks."""
        micro = _split(batch, parts)
        calls = [_capture(objective, mb) for mb in micro]
        for chunk in self.chunks:
            chunk.head = calls[0][1]
        inputs = torch.cat([c[0] for c in calls])
        return inputs, {"objective": objective, "micro": micro, "calls": calls, "outs": {}}

    def _run(self, inputs: torch.Tensor) -> None:
        args = (inputs,) if self.has_first else ()
        target = torch.arange(self.n_micro, device=self.ctx.device) if self.has_last else None
        with _stage_rng(self.ctx.device, self.pp_rank, active=self.dropout):
            self.schedule.step(*args, target=target)
        if self.tie_group is not None:
            self._sum_tied_grads()

    def _sum_tied_grads(self) -> None:
        """The first and the last stage's copies of a tied embedding each got a part of its
        gradient; both take the sum (Megatron's embedding all-reduce), so they stay equal."""
        if not self.tied:
            return
        for p in self.tied:
            if p.grad is None:  # e.g. a tied LM head the objective does not call
                p.grad = torch.zeros_like(p)
            g = p.grad
            dist.all_reduce(g.to_local() if hasattr(g, "to_local") else g, group=self.tie_group)

    def forward_backward(self, *, objective: Any, fetch: Callable[[], dict], micro_steps: int,
                         autocast: Callable[[], Any], timer: Any,
                         loss_hook: Callable[[torch.Tensor], torch.Tensor] | None = None) -> StepOutput:
        batch = _concat([fetch() for _ in range(micro_steps)])
        inputs, self._pending = self._prepare(objective, batch, self.n_micro)
        self._pending["hook"] = loss_hook
        timer.compute_start()
        with autocast():
            self._run(inputs)
        timer.compute_end()
        outs = [self._pending["outs"][i] for i in range(self.n_micro)] if self.has_last else []
        self._pending = None
        loss, metrics = self._weighted(outs)
        samples = next(len(v) for v in batch.values() if isinstance(v, torch.Tensor | list))
        tokens = inputs.numel() if not inputs.is_floating_point() else 0  # the tokens the model reads
        return StepOutput(loss=loss, metrics=metrics, samples=samples, tokens=tokens)

    def _weighted(self, outs: list) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean loss and metrics over the micro-batches, x pp on the last stage, 0 elsewhere
        (the metric names come from the last stage once)."""
        zero = torch.zeros((), device=self.ctx.device)
        if self._metric_keys is None:
            keys = [sorted(outs[0].metrics) if outs else None]
            dist.broadcast_object_list(keys, group_src=self.pp - 1, group=self.pp_group)
            self._metric_keys = keys[0]
        if not outs:
            return zero, {f"train/{k}": zero.clone() for k in self._metric_keys}
        scale = self.pp / len(outs)
        loss = sum(o.loss.detach().float() for o in outs) * scale
        metrics = {f"train/{k}": sum(o.metrics[k].detach().float() for o in outs) * scale
                   for k in self._metric_keys}
        return loss, metrics

    @torch.no_grad()
    def eval_forward(self, objective: Any, batch: dict, *, autocast: Callable[[], Any]) -> Any:
        """The whole batch through the stages in order (forward only, activations sent point
        to point); the last stage returns the objective's output, the others one of zero
        samples with the same names (so the loop's sums and reports line up on every rank)."""
        inputs, head, template = _capture(objective, batch)
        n_stages = self.pp * self.spec.stages_per_rank
        x = inputs
        with autocast():
            for s in range(n_stages):
                owner = s % self.pp
                if owner != self.pp_rank:
                    continue
                if s > 0:
                    x = _recv(src=self._global((s - 1) % self.pp), device=self.ctx.device)
                chunk = self.chunks[self.stage_ids.index(s)]
                chunk.head = head
                x = chunk(x)
                if s < n_stages - 1:
                    _send(x, dst=self._global((s + 1) % self.pp))
        out = objective.loss(_fill(template, x), batch) if self.has_last else None
        metric_keys, output_keys = self._names(out)
        if out is not None:
            return out
        zero = torch.zeros((), device=self.ctx.device)
        return ObjectiveOutput(loss=zero, metrics={k: zero for k in metric_keys}, num_samples=0,
                               outputs={k: torch.empty(0, dtype=torch.long, device=self.ctx.device)
                                        for k in output_keys})

    def _names(self, out: Any) -> tuple[list[str], list[str]]:
        """The last stage's metric and output names, sent to the other stages once."""
        if self._eval_names is None:
            names = [(sorted(out.metrics), sorted(out.outputs)) if out is not None else None]
            dist.broadcast_object_list(names, group_src=self.pp - 1, group=self.pp_group)
            self._eval_names = names[0]
        return self._eval_names

    def _global(self, pp_rank: int) -> int:
        return dist.get_global_rank(self.pp_group, pp_rank)

    def clip_grad_norm(self, max_norm: float | None) -> torch.Tensor:
        """The norm over every stage's gradients (summed over the pipeline group too)."""
        replicas = self.tied if self.has_last and not self.has_first else []  # the first stage counts them
        return clip_grad_norm_global(self.model.parameters(), max_norm, stage_group=self.pp_group,
                                     uncounted=replicas)

    def measure_memory(self, micro_step: Callable[[], torch.Tensor]):
        raise NotImplementedError("memory measurement runs the objective outside the schedule")


_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64]


def _embedding_group(mesh) -> dist.ProcessGroup:
    """This rank's group of the first and the last pipeline rank at its (dp, tp) coordinate
    (every rank creates every such group, in the same order, as new_group requires)."""
    ranks = mesh.mesh
    if ranks.shape[0] == 2:
        return mesh["pp"].get_group()
    mine = None
    for d in range(ranks.shape[1]):
        for t in range(ranks.shape[2]):
            members = [int(ranks[0, d, t]), int(ranks[-1, d, t])]
            group = dist.new_group(members)
            if dist.get_rank() in members:
                mine = group
    return mine



def _send(x: torch.Tensor, *, dst: int) -> None:
    """Shape and dtype (one small int64 tensor), then the activation."""
    head = torch.tensor([_DTYPES.index(x.dtype), x.ndim, *x.shape] + [0] * (6 - x.ndim), dtype=torch.int64)
    dist.send(head.to(x.device), dst=dst)
    dist.send(x.contiguous(), dst=dst)


def _recv(*, src: int, device: torch.device) -> torch.Tensor:
    head = torch.empty(8, dtype=torch.int64, device=device)
    dist.recv(head, src=src)
    dtype, ndim = _DTYPES[int(head[0])], int(head[1])
    x = torch.empty(head[2:2 + ndim].tolist(), dtype=dtype, device=device)
    dist.recv(x, src=src)
    return x


class _Recorder:
    """Stands in for the model in the objective's forward: records the call, returns a marker."""

    def __init__(self) -> None:
        self.call: tuple | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if len(args) != 1 or set(kwargs) - {"head"}:
            raise TypeError("pipeline: the objective must call model(inputs, head=...) once")
        self.call = (args[0], kwargs.get("head"))
        return _MARK


_MARK = object()


def _capture(objective: Any, batch: dict) -> tuple[torch.Tensor, str | None, Any]:
    """(model input, head, the objective's forward output with a marker for the model's)."""
    recorder = _Recorder()
    out = objective.forward(recorder, batch)
    return recorder.call[0], recorder.call[1], out


def _fill(template: Any, output: torch.Tensor) -> Any:
    """The objective's forward output with the model's real output where the marker was."""
    if template is _MARK:
        return output
    if isinstance(template, dict):
        return {k: _fill(v, output) for k, v in template.items()}
    if isinstance(template, tuple | list):
        return type(template)(_fill(v, output) for v in template)
    return template


def _concat(batches: list[dict]) -> dict:
    if len(batches) == 1:
        return batches[0]
    out = {}
    for key, first in batches[0].items():
        values = [b[key] for b in batches]
        out[key] = torch.cat(values) if isinstance(first, torch.Tensor) else sum(values, [])
    return out


def _split(batch: dict, parts: int) -> list[dict]:
    """Micro-batches of (nearly) equal size, the order kept."""
    rows = next(len(v) for v in batch.values() if isinstance(v, torch.Tensor))
    bounds = [len(t) for t in torch.tensor_split(torch.arange(rows), parts)]
    out, start = [], 0
    for n in bounds:
        out.append({k: v[start:start + n] for k, v in batch.items()})
        start += n
    return out


@contextlib.contextmanager
def _stage_rng(device: torch.device, stage: int, *, active: bool) -> Iterator[None]:
    """Dropout inside the schedule draws from a stream per stage, seeded from one draw of
    the global generator; afterwards the global generator is where that draw left it, the
    same on every stage (so the next step's objective inputs, e.g. MLM masks, agree).
    Without dropout (`active` False) nothing is drawn: the global generator then serves the
    objective exactly as in a run without a pipeline (MLM masks equal the 1-process run's)."""
    if not active:
        yield
        return
    seed = int(torch.randint(0, 2**62, (1,)).item())
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type):
        torch.manual_seed(seed + stage)
        yield
