"""The training loop every worker runs, whatever launched it. Read it top to bottom.

    train(spec, ctx)
      build model (meta device) -> objective -> strategy.setup(model, optimizer, init_from weights)
      -> LR schedule -> data (this rank's share) -> tracker (rank 0 only logs)
      -> resume from the run's newest committed checkpoint, if any
      for step in range(resumed_step + 1, max_steps + 1):
          grad_accum micro-steps (gradient sync only on the last one)
          clip by global norm -> optimizer step (skipped on NaN with on_nan=skip) -> schedule step
          every log_every (and at checkpoints): all-reduce the window's metrics, check they
              are finite, log, show progress
          when the keeper says a save is due (checkpoint.every_steps, the end) and when asked
              to stop: save a checkpoint
          every eval_every (and at the end): evaluate on the held-out split
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from temper.checkpoint.keeper import build_keeper
from temper.checkpoint.weights import weights_for_worker
from temper.data import build_data
from temper.dist import DistContext
from temper.models import build_model
from temper.objectives import build_objective
from temper.objectives.base import Objective
from temper.run_info import InitFromLocation, RunInfo
from temper.runtime import faults
from temper.runtime.elastic import grad_accum_for, tag_resize
from temper.runtime.failure import StepWatch
from temper.runtime.optim import build_optimizer, build_scheduler
from temper.runtime.perf import PerfMeter, peak_flops
from temper.runtime.preempt import Preemption, preempt_save
from temper.runtime.profile import build_profiler
from temper.runtime.report import Reporter
from temper.runtime.system import StepTimer, SystemSampler, node_name, rank_metrics
from temper.spec.job import JobSpec
from temper.strategies import Strategy, build_strategy
from temper.tracking import build_tracker

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What rank 0 returns to the launcher: the last metrics and the logged loss curve."""

    steps: int
    metrics: dict[str, float] = field(default_factory=dict)
    loss_history: list[tuple[int, float]] = field(default_factory=list)
    stopped: bool = False  # the driver asked to stop (Ctrl-C) before max_steps
    resumed_from: int | None = None  # the checkpoint step this run continued from
    checkpoint_step: int | None = None  # the last checkpoint saved (committed once the run ends)
    skipped_steps: int = 0  # optimizer steps skipped for a NaN/Inf loss (train.on_nan=skip)
    preempted: bool = False  # stopped by a SIGTERM; checkpoint_step is where the next run resumes


@dataclass
class _Skips:
    """Optimizer steps skipped for NaN/Inf under train.on_nan=skip."""

    consecutive: int = 0
    total: int = 0


@dataclass
class _Probe:
    """Each rank's own step time and node usage, gathered at logging steps (runtime/system.py)."""

    timer: StepTimer
    sampler: SystemSampler
    nodes: list[str]
    local_ranks: list[int]

    @classmethod
    def build(cls, spec: JobSpec, ctx: DistContext) -> _Probe:
        where = ctx.all_gather_objects((node_name(), ctx.local_rank))
        return cls(timer=StepTimer(ctx.device),
                   sampler=SystemSampler(ctx.device, enabled=spec.tracking.system_metrics),
                   nodes=[w[0] for w in where], local_ranks=[w[1] for w in where])

    def row(self) -> list[float]:
        return [*self.timer.window(), *self.sampler.sample()]

    def metrics(self, rows: list[list[float]]) -> dict[str, float]:
        return rank_metrics(rows, nodes=self.nodes, local_ranks=self.local_ranks,
                            system=self.sampler.enabled)


@dataclass
class _Window:
    """Device-side sums over the steps since the last log (no .item() per step)."""

    loss: torch.Tensor
    grad_norm: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    steps: int = 0

    @classmethod
    def empty(cls, device: torch.device) -> _Window:
        return cls(loss=torch.zeros((), device=device), grad_norm=torch.zeros((), device=device))


def train(
    spec: JobSpec,
    ctx: DistContext,
    *,
    run_info: RunInfo | None = None,
    reporter: Reporter | None = None,
) -> TrainResult:
    """Train `spec` on this worker; every rank calls this with its own `ctx`."""
    run_info = run_info or RunInfo()
    reporter = reporter or Reporter()
    torch.manual_seed(spec.seed)
    strategy = build_strategy(spec, ctx=ctx)
    with torch.device("meta"):  # the strategy shards, then allocates and initializes from (seed, name)
        model = build_model(spec.model, objective=spec.objective)
    flops_per_sample = getattr(model, "train_flops_per_sample", lambda: None)()
    objective = build_objective(spec.objective, spec.model)
    pretrained = _init_from(spec, model=model, run_info=run_info)
    strategy.setup(model, build_optimizer=lambda m: build_optimizer(m, spec.optim), pretrained=pretrained)
    scheduler = build_scheduler(
        strategy.optimizer, spec=spec.optim.schedule, max_steps=spec.train.max_steps
    )
    # Tensor-parallel peers share data and dropout masks: split and seed by the data-parallel rank.
    torch.manual_seed(spec.seed + 1 + strategy.data_rank)  # dropout differs per replica, reproducibly
    data = build_data(spec, rank=strategy.data_rank, world_size=strategy.data_world_size)
    tracker = build_tracker(run_info, rank=ctx.rank, spec=spec,
                            run_id_source=lambda: reporter.run_id(run_info))
    probe = _Probe.build(spec, ctx)
    tracker.set_tags({"temper.hosts": ",".join(dict.fromkeys(probe.nodes)), "temper.world_size": str(ctx.world_size)})
    keeper = build_keeper(spec, ctx=ctx, run_info=run_info)
    result = TrainResult(steps=0)
    resumed = keeper.restore(strategy=strategy, scheduler=scheduler, data=data, tracker=tracker)
    if resumed is not None:
        result.steps = result.resumed_from = resumed.step
        tracker.set_tags({"temper.resumed_from": resumed.path})
        log.warning("resumed from %s at step %d", resumed.path, resumed.step)
    accum = grad_accum_for(spec, ctx=ctx)  # elastic: the global batch kept at this world size
    tag_resize(tracker, resumed=resumed, ctx=ctx, accum=accum)
    perf = PerfMeter(
        device=ctx.device,
        world_size=ctx.world_size,
        replicas=strategy.data_world_size,
        flops_per_sample=flops_per_sample,
        peak_flops_per_device=peak_flops(ctx.device, spec.train.precision),
    )
    loop = _Loop(spec=spec, ctx=ctx, strategy=strategy, objective=objective, scheduler=scheduler,
                 data=data, tracker=tracker, keeper=keeper, reporter=reporter, perf=perf, probe=probe,
                 result=result,
                 watch=StepWatch(rank=ctx.rank, world_size=ctx.world_size, timeout_s=spec.fault.collective_timeout_s),
                 profiler=build_profiler(spec.train.profile, run_folder=run_info.run_folder, rank=ctx.rank,
                                         device=ctx.device),
                 accum=accum, preempt=Preemption.build(grace_s=spec.fault.preemption_grace_s, ctx=ctx,
                                                       reporter=reporter))
    try:
        loop.run()
        keeper.close()  # an async save in flight is committed before the run ends
    finally:
        loop.preempt.close()
        loop.watch.close()
        loop.profiler.close()
        tracker.close()
        strategy.close()
    return result


def _init_from(spec: JobSpec, *, model, run_info: RunInfo):
    """init_from: the pretrained tensors the strategy initializes from where they fit (the
    driver checked the fit before launching); freeze_backbone leaves only the heads to train.
    A resumed run's checkpoint overrides both weights and optimizer afterwards."""
    pretrained = weights_for_worker(spec, run_info.init_from, fetch=_fetch_model_version)
    if pretrained is not None:
        log.info("init_from: initializing from %s (step %s)", pretrained.path, pretrained.step)
    if spec.init_from is not None and spec.init_from.freeze_backbone:
        trainable = model.freeze_backbone()
        log.info("init_from.freeze_backbone: %d parameters train (the heads)", trainable)
    return pretrained


def _fetch_model_version(location: InitFromLocation) -> str:
    """A models:/ version's files on this node (the driver's download lives on its machine)."""
    from temper.tracking.registry import resolve_model_uri

    return str(resolve_model_uri(location.model_uri, location.tracking_uri)[0])


@dataclass
class _Loop:
    """The step loop and what it works with. `run` trains; logs every `log_every`; saves
    when the keeper says a checkpoint is due and on a stop request; evaluates every
    `eval_every` and at the end."""

    spec: JobSpec
    ctx: DistContext
    strategy: Strategy
    objective: Objective
    scheduler: Any
    data: Any
    tracker: Any
    keeper: Any
    reporter: Reporter
    perf: PerfMeter
    probe: _Probe
    result: TrainResult
    watch: StepWatch  # the stack dump armed per step, the step beacon (runtime/failure.py)
    profiler: Any  # train.profile (runtime/profile.py); a no-op when unset
    accum: int  # micro-steps per optimizer step (elastic: keeps the global batch at this size)
    preempt: Preemption  # SIGTERM -> save at the next step boundary (runtime/preempt.py)
    skips: _Skips = field(default_factory=_Skips)
    fault: faults.Fault | None = field(default_factory=faults.fault_from_env)
    trace: faults.SampleTrace | None = field(default_factory=faults.trace_from_env)  # TEMPER_TRACE_SAMPLES
    hold: faults.Hold | None = field(default_factory=faults.hold_from_env)  # TEMPER_HOLD

    def __post_init__(self) -> None:
        self.window = _Window.empty(self.ctx.device)
        if self.fault is not None:
            self.fault.install(self.strategy.model, rank=self.ctx.rank)
        self.autocast = _autocast_factory(self.spec, self.ctx)

    def run(self) -> None:
        t, result = self.spec.train, self.result
        batches = self.data.train_batches()
        self.strategy.model.train()
        self.profiler.step(result.steps)
        for step in range(result.steps + 1, t.max_steps + 1):
            if self.hold is not None:
                self.hold.before_step(step=step, rank=self.ctx.rank, world_size=self.ctx.world_size)
            self.watch.step(step)
            if self.fault is not None:
                self.fault.before_step(step=step, rank=self.ctx.rank)
            lr = self.scheduler.get_last_lr()[0]
            samples, tokens = self.train_step(batches, step=step)
            self.scheduler.step()
            self.perf.tick(samples=samples, tokens=tokens)
            last = step == t.max_steps
            save = self.keeper.due(step)
            preempted = None if last else self.preempt.agreed(last_save_s=self.keeper.last_save_s)
            if step % t.log_every == 0 or last or save or preempted:
                self.log_window(step=step, lr=lr, last=last)
            result.steps = step
            if preempted is not None:  # every rank saw the SIGTERM in the same all-gather
                return self.save_preempted(preempted, step=step)
            if save or result.stopped:
                blocked = self.keeper.save(step=step, strategy=self.strategy, scheduler=self.scheduler,
                                           data=self.data, tracker=self.tracker)
                if blocked is not None:
                    result.checkpoint_step = step
                    self.tracker.log_metrics({"perf/ckpt_block_s": blocked}, step=step)
            if result.stopped:  # every rank saw the flag in the same all-gather: stop together
                log.warning("stopping at step %d: the driver asked to stop", step)
                return
            if self.data.has_eval and ((t.eval_every and step % t.eval_every == 0) or last):
                self.evaluate(step=step)
            self.profiler.step(step)

    def log_window(self, *, step: int, lr: float, last: bool) -> None:
        """Close the window (one all-gather: metrics, stop flag, probes), log and report it."""
        t, result = self.spec.train, self.result
        stop = self.ctx.is_main and not last and self.reporter.should_stop()
        metrics, result.stopped = _close_window(self.window, ctx=self.ctx, perf=self.perf, stop=stop,
                                                skipped=getattr(self.data, "skipped", None),
                                                replicas=self.strategy.data_world_size, probe=self.probe)
        metrics.update({"train/lr": lr, "perf/world_size": self.ctx.world_size, "train/grad_accum": self.accum})
        _check_finite(metrics["train/loss"], step=step)  # before any checkpoint of this window
        if t.on_nan == "skip":
            metrics["train/skipped_steps"] = result.skipped_steps = self.skips.total
        result.loss_history.append((step, metrics["train/loss"]))
        result.metrics.update(metrics)
        self.tracker.log_metrics(metrics, step=step)
        self.reporter.progress({"step": step, "max_steps": t.max_steps, **metrics})
        self.window = _Window.empty(self.ctx.device)

    def save_preempted(self, decision, *, step: int) -> None:
        """Save (or keep the previous checkpoint, when the grace time is too short) and stop."""
        keeper, result = self.keeper, self.result
        result.preempted = True
        result.checkpoint_step = preempt_save(
            decision, step=step, keeper=keeper, tracker=self.tracker,
            save=lambda: keeper.save(step=step, strategy=self.strategy, scheduler=self.scheduler,
                                     data=self.data, tracker=self.tracker))
        self.reporter.progress({"step": step, "max_steps": self.spec.train.max_steps, "preempted": step,
                                "checkpoint_step": result.checkpoint_step})

    def evaluate(self, *, step: int) -> None:
        metrics, files = evaluate(strategy=self.strategy, objective=self.objective, data=self.data,
                                  ctx=self.ctx, autocast=self.autocast)
        self.result.metrics.update(metrics)
        self.tracker.log_metrics(metrics, step=step)
        for name, content in files.items():  # rank 0 only has any
            self.tracker.log_artifact(f"eval/step-{step:06d}/{name}", content)
        self.reporter.progress({"step": step, "max_steps": self.spec.train.max_steps, **metrics})

    def train_step(self, batches: Iterator, *, step: int) -> tuple[int, int]:
        """One optimizer step over `grad_accum` micro-batches; returns this rank's samples, tokens.
        With on_nan=skip a step whose loss or gradient norm is not finite on any rank updates
        nothing (every rank decides alike) and does not enter the window's averages."""
        strategy, ctx, timer, fault = self.strategy, self.ctx, self.probe.timer, self.fault
        timer.step()
        out = strategy.forward_backward(
            objective=self.objective, fetch=lambda: self._fetch(batches, step=step), micro_steps=self.accum,
            autocast=self.autocast, timer=timer,
            loss_hook=None if fault is None else lambda loss: fault.poison(loss, step=step, rank=ctx.rank))
        loss_sum, step_metrics, samples, tokens = out.loss, out.metrics, out.samples, out.tokens
        grad_norm = strategy.clip_grad_norm(self.spec.optim.grad_clip).detach().float()
        if self.spec.train.on_nan == "skip" and not _finite_everywhere(ctx, loss_sum, grad_norm):
            self._skip(step)
            return samples, tokens
        self.skips.consecutive = 0
        window = self.window
        window.loss += loss_sum
        window.grad_norm += grad_norm
        for key, value in step_metrics.items():
            window.metrics[key] = window.metrics.get(key, 0.0) + value
        timer.compute_start()
        strategy.step()
        timer.compute_end()
        window.steps += 1
        return samples, tokens

    def _fetch(self, batches: Iterator, *, step: int) -> dict:
        """The next micro-batch, on the device (its wait is timed)."""
        self.probe.timer.data_start()
        batch = next(batches)
        if self.trace is not None:
            self.trace.record(batch, step=step, rank=self.ctx.rank, world_size=self.ctx.world_size)
        batch = _to_device(batch, self.ctx.device)
        self.probe.timer.data_end()
        return batch

    def _skip(self, step: int) -> None:
        """on_nan=skip: drop this step's gradients; too many in a row is an error."""
        skips = self.skips
        self.strategy.optimizer.zero_grad(set_to_none=True)
        skips.consecutive += 1
        skips.total += 1
        log.warning("step %d: loss or gradient is not finite; optimizer step skipped (train.on_nan=skip, "
                    "%d in a row)", step, skips.consecutive)
        if skips.consecutive > self.spec.train.max_nan_skips:
            raise FloatingPointError(
                f"train/loss or the gradient norm was NaN/Inf for {skips.consecutive} consecutive steps up to "
                f"step {step} (train.max_nan_skips={self.spec.train.max_nan_skips}); lower optim.lr or check the data"
            )


def _finite_everywhere(ctx: DistContext, *values: torch.Tensor) -> bool:
    """True when every value is finite on every rank (one tiny all-reduce)."""
    bad = torch.stack([(~torch.isfinite(v)).any().float() for v in values]).sum()
    return ctx.all_reduce_mean(bad.reshape(1)).item() == 0


def _close_window(window: _Window, *, ctx: DistContext, perf: PerfMeter, stop: bool,
                  skipped: int | None = None, replicas: int = 1,
                  probe: _Probe | None = None) -> tuple[dict[str, float], bool]:
    """Average the window over its steps and over ranks, add perf rates, and share rank 0's
    stop request, the data replicas' skipped-sample counts (summed; tensor-parallel peers
    read the same samples) and each rank's step time and node usage, all in one all-gather."""
    rates = perf.window()  # synchronizes the device: the probe's CUDA events are complete
    keys = ["train/loss", "train/grad_norm", *sorted(window.metrics)]
    values = [window.loss.float(), window.grad_norm, *(window.metrics[k] for k in keys[2:])]
    local = torch.stack(values) / max(window.steps, 1)
    extra = torch.tensor([float(stop), float(skipped or 0), *(probe.row() if probe else [])],
                         dtype=local.dtype, device=local.device)
    rows = ctx.all_gather_rows(torch.cat([local, extra]))
    n = len(keys)
    mean = rows[:, :n + 2].mean(dim=0).tolist()
    metrics = dict(zip(keys, mean[:n], strict=True))
    if skipped is not None:
        metrics["data/skipped_samples"] = round(mean[n + 1] * replicas)
    metrics.update(rates)
    if probe is not None and ctx.is_main:
        metrics.update(probe.metrics(rows[:, n + 2:].tolist()))
    return metrics, mean[n] > 0


@torch.no_grad()
def evaluate(*, strategy: Strategy, objective: Objective, data, ctx: DistContext,
             autocast) -> tuple[dict[str, float], dict[str, bytes]]:
    """Mean loss and metrics over this rank's eval share, then averaged over ranks by sample;
    and the objective's pictures of this pass (rank 0: {file name: bytes})."""
    model = strategy.model
    model.eval()
    sums: dict[str, torch.Tensor] = {}
    count = 0
    report = objective.eval_report()
    for batch in data.eval_batches():
        batch = _to_device(batch, ctx.device)
        out = strategy.eval_forward(objective, batch, autocast=autocast)
        if report is not None:
            report.update(out, batch)
        n = out.num_samples
        for name, value in {"loss": out.loss, **out.metrics}.items():
            sums[name] = sums.get(name, 0.0) + value.detach().float() * n
        count += n
    model.train()
    keys = sorted(sums)
    local = torch.stack([*(sums[k] for k in keys), torch.tensor(float(count), device=ctx.device)])
    total = ctx.all_reduce_mean(local) * ctx.world_size  # sums across ranks
    n_total = max(total[-1].item(), 1.0)
    metrics = {f"val/{k}": v / n_total for k, v in zip(keys, total[:-1].tolist(), strict=True)}
    files = report.finish(ctx) if report is not None else {}
    return metrics, files


def _to_device(batch: dict, device: torch.device) -> dict:
    """Tensors to `device`; anything else (sample keys) passes through."""
    non_blocking = device.type == "cuda"
    return {k: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


def _autocast_factory(spec: JobSpec, ctx: DistContext):
    """A zero-argument context factory: bf16 autocast when asked, else a no-op."""
    if spec.train.precision == "bf16":
        return lambda: torch.autocast(device_type=ctx.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def _check_finite(loss: float, *, step: int) -> None:
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"train/loss is {loss} at step {step}; lower optim.lr, enable optim.grad_clip, "
            "or use train.precision=fp32"
        )
