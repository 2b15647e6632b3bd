"""One GPU check (no Ray): tests/gpu, the 1B GPT's MFU under FSDP bf16, ResNet-50 images/s,
and the 1B model's measured peak memory beside `temper plan`'s prediction, in one summary table.

    benchmarks/gpu_check.sh [--steps 20] [--out gpu-check.md]     (or: make gpu-check)

Needs one CUDA GPU and this repository's Python environment without Ray; refuses to run on
CPU. Sized to finish in under 8 minutes on an H100/H200 (each phase has its own timeout).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "platform"), str(ROOT), str(ROOT / "benchmarks")]

TESTS_TIMEOUT_S = 240


@dataclass(frozen=True)
class Row:
    check: str
    result: str  # "ok", "FAILED" or "skipped"
    figure: str  # the measured figure, in words and units
    seconds: float


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="training steps per benchmark")
    parser.add_argument("--out", type=Path, default=Path("gpu-check.md"), help="summary table (markdown)")
    parser.add_argument("--skip-tests", action="store_true", help="benchmarks only (no tests/gpu)")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step includes warm-up)")
    return args


def render_table(rows: list[Row], *, device: str) -> str:
    """The summary: one markdown row per check."""
    lines = [f"# GPU check on {device}", "", "| check | result | figure | seconds |",
             "| --- | --- | --- | ---: |"]
    lines += [f"| {r.check} | {r.result} | {r.figure} | {r.seconds:.0f} |" for r in rows]
    return "\n".join(lines) + "\n"


def _timed(check: str, fn) -> Row:
    start = time.perf_counter()
    try:
        result, figure = fn()
    except Exception as exc:  # one failing phase must not hide the others' figures
        result, figure = "FAILED", f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    return Row(check, result, figure, time.perf_counter() - start)


def _gpu_tests() -> tuple[str, str]:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu",
                           str(ROOT / "tests" / "gpu")], cwd=ROOT, capture_output=True, text=True,
                          timeout=TESTS_TIMEOUT_S)
    tail = (proc.stdout.strip().splitlines() or ["no output"])[-1]
    return ("ok" if proc.returncode == 0 else "FAILED"), tail


def _plan_key(cuda_name: str) -> str | None:
    from temper.runtime.plan import GPUS

    return next((key for key, gpu in GPUS.items() if gpu.cuda_name in cuda_name), None)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        sys.exit("gpu_check.py needs a CUDA GPU (none visible); nothing was measured")
    import os

    from gpu_mfu import GPT_1B, RESNET50, build_spec, run_spec
    from temper.runtime.plan import build_plan

    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"})
    device = torch.cuda.get_device_name()
    gpt_sets = [*GPT_1B, "strategy.activation_checkpointing=selective"]
    gpt: dict = {}

    def gpt_mfu() -> tuple[str, str]:
        gpt.update(run_spec(gpt_sets, args.steps))
        return "ok", (f"MFU {gpt.get('perf/mfu', float('nan')):.3f}, "
                      f"{gpt.get('perf/tokens_per_s', float('nan')):,.0f} tokens/s")

    def memory_vs_plan() -> tuple[str, str]:
        if not gpt:
            return "skipped", "the 1B run failed"
        # The run's process group is gone (ctx.close), so the plan's fake one can start.
        plan = build_plan(build_spec(gpt_sets, args.steps), gpu=_plan_key(device))
        measured = gpt["peak_mem_gib"] * 2**30
        return "ok", (f"peak allocated {measured / 2**30:.2f} GiB, plan {plan.total / 2**30:.2f} GiB, "
                      f"plan / measured {plan.total / measured:.3f}")

    def resnet() -> tuple[str, str]:
        m = run_spec(RESNET50, args.steps)
        return "ok", f"{m.get('perf/samples_per_s', float('nan')):,.0f} images/s (bf16, compile)"

    checks = [("gpt 1b, fsdp bf16, seq 2048, ac selective", gpt_mfu),
              ("gpt 1b memory vs temper plan", memory_vs_plan), ("resnet-50, 224 px, batch 128", resnet)]
    if not args.skip_tests:
        checks.insert(0, ("tests/gpu", _gpu_tests))
    rows: list[Row] = []
    for name, fn in checks:  # the table is rewritten after each check: a timeout keeps the rest
        rows.append(_timed(name, fn))
        args.out.write_text(render_table(rows, device=device))
    print(render_table(rows, device=device), end="")
    return 0 if all(r.result != "FAILED" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
