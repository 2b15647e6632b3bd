"""Profiling off costs nothing in the step: what the loop does per step when `train.profile` is
unset (the NoProfiler's `step`, the StepWatch re-arming the stack dump into the rank log and
noting the step for the beacon thread), against the step itself.

Side by side in one run: the quickstart job's median step time under temper's loop with a
rank log open (so the stack dump is armed every step, as under every launcher), and the
median cost of those per-step hooks alone over many calls. Prints their ratio (goal: below
0.5 % of a step). The step beacon's store write (world size > 1) runs on its own thread, at
most twice a second, outside the step.

    .venv/bin/python benchmarks/profile_off.py [--job jobs/quickstart.yaml] [--steps 60]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from loop_overhead import bench_spec, temper_windows  # benchmarks/ is this script's folder
from temper.runtime import failure
from temper.runtime.profile import NoProfiler

ROOT = Path(__file__).resolve().parents[1]


def hook_cost(folder: str, calls: int) -> float:
    """Seconds per step of the off-path hooks (median of 5 batches of `calls`)."""
    rank_log = failure.open_rank_log(folder, rank=0, dump_on_sigterm=False)
    watch, profiler = failure.StepWatch(rank=0, world_size=1, timeout_s=1800.0), NoProfiler()
    batches = []
    try:
        for _ in range(5):
            start = time.perf_counter()
            for step in range(calls):
                watch.step(step)
                profiler.step(step)
            batches.append((time.perf_counter() - start) / calls)
    finally:
        watch.close()
        failure.close_rank_log(rank_log)
    return statistics.median(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", default=str(ROOT / "jobs" / "quickstart.yaml"))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--calls", type=int, default=20000)
    args = parser.parse_args()
    spec = bench_spec(args.job, steps=args.steps, window=args.window)
    with tempfile.TemporaryDirectory() as folder:
        step = statistics.median(temper_windows(spec, run_folder=folder))
        hooks = hook_cost(folder, args.calls)
    print(f"job {Path(args.job).name}: {args.steps} steps, {torch.get_num_threads()} thread(s), device cpu")
    print(f"median step                    {step * 1e3:10.3f} ms")
    print(f"profiling-off hooks per step   {hooks * 1e6:10.3f} us")
    print(f"ratio hooks/step = {hooks / step:.5f}  (goal < 0.005)")


if __name__ == "__main__":
    main()
