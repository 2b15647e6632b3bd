"""Loop overhead: temper's training loop vs a bare PyTorch loop, same model/data/optimizer.

Both run in this process (the in-process launcher's path, one worker, no tracking), on the
same batches, interleaved A/B/A/B so that machine noise hits both alike. Step time is
measured per window of `--window` steps; the script prints the median of each and the
ratio. Goal: temper / bare <= 1.03.

    .venv/bin/python benchmarks/loop_overhead.py [--job jobs/quickstart.yaml] [--steps 60]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from temper.data import build_data
from temper.dist import build_dist_context
from temper.models import build_model
from temper.objectives import build_objective
from temper.runtime.loop import train
from temper.runtime.optim import build_optimizer, build_scheduler
from temper.runtime.report import Reporter
from temper.spec import JobSpec, load_spec

ROOT = Path(__file__).resolve().parents[1]


class _Collect(Reporter):
    def __init__(self) -> None:
        super().__init__(None)
        self.step_times: list[float] = []

    def progress(self, event: dict) -> None:
        if "perf/step_time_s" in event:
            self.step_times.append(event["perf/step_time_s"])


def temper_windows(spec: JobSpec, *, run_folder: str | None = None) -> list[float]:
    """Step time per window under temper's loop; with `run_folder`, a rank log is open there
    (the stack dump re-armed every step, as under every launcher)."""
    from temper.runtime import failure

    rank_log = failure.open_rank_log(run_folder, rank=0, dump_on_sigterm=False)
    ctx = build_dist_context(device="cpu")
    reporter = _Collect()
    try:
        train(spec, ctx, reporter=reporter)
    finally:
        ctx.close()
        failure.close_rank_log(rank_log)
    return reporter.step_times[1:]  # the first window holds warm-up


def bench_spec(job: str, *, steps: int, window: int) -> JobSpec:
    """The job as both benchmarks run it: one worker in this process, no tracking, no eval."""
    spec = load_spec(job, [
        "resources.workers=1", "tracking.enabled=false", f"train.max_steps={steps}",
        f"train.log_every={window}", "train.eval_every=0", "data.eval_samples=0",
    ])
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    torch.set_num_threads(max(1, int(spec.resources.cpus_per_worker)))
    return spec


def bare_windows(spec: JobSpec) -> list[float]:
    """The loop a careful engineer writes by hand: no wrappers, no metrics beyond the loss."""
    torch.manual_seed(spec.seed)
    model = build_model(spec.model)
    objective = build_objective(spec.objective)
    opt = build_optimizer(model, spec.optim)
    sched = build_scheduler(opt, spec=spec.optim.schedule, max_steps=spec.train.max_steps)
    batches = build_data(spec, rank=0, world_size=1).train_batches()
    model.train()
    times, start = [], time.perf_counter()
    for step in range(1, spec.train.max_steps + 1):
        loss = objective(model, next(batches)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.optim.grad_clip, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if step % spec.train.log_every == 0:
            loss.item()
            now = time.perf_counter()
            times.append((now - start) / spec.train.log_every)
            start = now
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", default=str(ROOT / "jobs" / "quickstart.yaml"))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    spec = bench_spec(args.job, steps=args.steps, window=args.window)
    ours, bare = [], []
    for _ in range(args.rounds):
        bare += bare_windows(spec)
        ours += temper_windows(spec)
    m_ours, m_bare = statistics.median(ours), statistics.median(bare)
    print(f"job {Path(args.job).name}: {args.rounds} rounds x {args.steps} steps, "
          f"window {args.window}, {torch.get_num_threads()} thread(s), device cpu")
    print(f"{'loop':<10}{'median step (ms)':>18}{'windows':>9}")
    print(f"{'bare':<10}{m_bare * 1e3:>18.2f}{len(bare):>9}")
    print(f"{'temper':<10}{m_ours * 1e3:>18.2f}{len(ours):>9}")
    print(f"ratio temper/bare = {m_ours / m_bare:.3f}  (goal <= 1.03)")


if __name__ == "__main__":
    main()
