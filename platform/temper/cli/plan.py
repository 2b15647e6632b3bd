"""`temper plan JOB`: per-rank memory and time of the job before it runs (docs/plan.md).
`temper submit` runs the same check first (`check_fits`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from temper.console import console
from temper.errors import TemperError
from temper.spec.job import JobSpec

GpuOpt = Annotated[str | None, typer.Option(
    "--gpu", help="The GPU to plan for: h100-80gb, h100-pcie, h200, a100-80gb, a100-40gb, l40s, "
                  "a10g, l4 (default: from cluster.node_selector).", show_default=False)]


def plan(
    job: Annotated[Path, typer.Argument(help="The job spec YAML file.", show_default=False)],
    set_: Annotated[list[str] | None, typer.Option(
        "--set", "-s", help="Override a spec value: --set optim.lr=1e-3 (repeatable).")] = None,
    world_size: Annotated[int | None, typer.Option(
        "--world-size", help="Plan at this many ranks (default: resources.workers).",
        show_default=False)] = None,
    gpu: GpuOpt = None,
    mfu: Annotated[float, typer.Option("--mfu", help="Model FLOPs utilization to assume.")] = 0.4,
) -> None:
    """What one rank holds (parameters, gradients, optimizer state, activations) against the
    GPU's memory, and the step time, tokens/s and time to max_steps at --mfu. Exit 2 when
    it does not fit, naming what to change."""
    from temper.runtime.plan import build_plan
    from temper.spec import load_spec

    if world_size is not None and world_size < 1:
        raise TemperError(f"--world-size {world_size} must be at least 1")
    sets = [*(set_ or []), *([f"resources.workers={world_size}"] if world_size else [])]
    result = build_plan(load_spec(job, sets), gpu=gpu, mfu=mfu)
    for line in render_plan(result):
        console.print(line, markup=False, highlight=False)
    problem = result.problem()
    if problem:
        raise TemperError(problem)


def check_fits(spec: JobSpec) -> str:
    """`temper submit`'s check: the plan's one-line summary, or TemperError when it does not fit."""
    from temper.runtime.plan import build_plan

    result = build_plan(spec)
    problem = result.problem()
    if problem:
        raise TemperError(f"{problem} (or skip this check with --no-plan)")
    return summary(result)


def summary(p) -> str:
    """One line: the per-rank total against the GPU, and the time to max_steps."""
    if p.memory is None:
        head = f"plan: memory {p.unplanned}"
    else:
        against = (f" of {p.usable / 2**30:.1f} GiB usable on {p.gpu}" if p.usable else
                   " (GPU unknown, so not checked: set cluster.node_selector or run temper plan --gpu)")
        head = f"plan: {p.total / 2**30:.1f} GiB per rank{against}"
    return f"{head}; {_time_lines(p)[-1]}"


def render_plan(p) -> list[str]:
    """The plan as text lines; the last one is the summary `temper submit` prints."""
    s = p.spec
    tp = getattr(s.strategy, "tensor_parallel", 1)
    lines = [f"plan for {s.name}: {s.resources.workers} ranks, strategy {s.strategy.kind}"
             + (f" x tensor_parallel {tp}" if tp > 1 else "")
             + f", micro-batch {s.train.micro_batch_size}, {s.train.precision}"
             + (f", on {p.gpu}" if p.gpu else ", GPU unknown (pass --gpu)"),
             f"per rank (rank {p.rank}):" if p.pipeline_rank is None else
             f"per rank (rank {p.rank}, pipeline rank {p.pipeline_rank} of {s.strategy.pipeline_parallel}: "
             "the fullest stage):"]
    if p.memory is None:
        lines.append(f"  memory      {p.unplanned}")
    else:
        where = "  (in CPU memory: cpu_offload)" if p.offloaded else ""
        lines += [f"  {name:<11} {_gib(value)}{where if name != 'buffers' else ''}" for name, value in (
            ("parameters", p.memory.params), ("gradients", p.memory.grads),
            ("optimizer", p.memory.optim), ("buffers", p.buffers))]
    act = p.activations
    if act is None:
        lines.append(f"  activations not estimated for model.kind={s.model.kind} (GPT and encoder only so far)")
    else:
        extra = f" (+{_gib(act.recompute).strip()} recomputing a block)" if act.recompute else ""
        lines.append(f"  activations {_gib(act.saved)}{extra}")
    if p.memory is not None:
        against = f" of {p.usable / 2**30:.1f} GiB usable" if p.usable else ""
        verdict = "" if p.usable is None else ("  fits" if p.total <= p.usable else "  DOES NOT FIT")
        if verdict and act is None:
            verdict += " (without activations)"
        lines.append(f"  total       {_gib(p.total)}{against}{verdict}")
    lines += _time_lines(p)
    return lines


def _time_lines(p) -> list[str]:
    s = p.spec
    if not p.flops_per_step:
        return ["time: the model declares no FLOP count"]
    lines = [f"FLOPs per step {p.flops_per_step:.3e} ({s.global_batch_size} samples)"]
    step = p.step_time_s
    if step is None:
        return [*lines, "time: pass --gpu to estimate step time"]
    tokens = s.global_batch_size * getattr(s.model, "seq_len", 0)
    rate = f", {tokens / step:,.0f} tokens/s" if tokens else f", {s.global_batch_size / step:,.0f} samples/s"
    total_h = step * s.train.max_steps / 3600
    return [*lines, f"at {p.mfu:.0%} MFU: {step:.3f} s per step{rate}, "
                    f"{total_h:.1f} h to max_steps={s.train.max_steps}"]


def _gib(n: int) -> str:
    return f"{n / 2**30:8.2f} GiB"


def register(app: typer.Typer) -> None:
    app.command()(plan)
