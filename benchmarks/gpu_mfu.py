"""MFU of the ~1B GPT (seq 2048, bf16, FSDP; AC off/selective x compile off/on) and
ResNet-50 images/s (bf16, channels_last, compile) on one GPU, in-process (no Ray).

    python benchmarks/gpu_mfu.py [--steps 20]

Refuses to run without CUDA. Uses the real loop (`temper.runtime.loop.train`) with
synthetic data and tracking off; MFU is the loop's own `perf/mfu` estimate.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "platform"), str(ROOT)]

GPT_1B = ["model.kind=gpt", "model.flavor=1b", "train.micro_batch_size=4", "strategy=fsdp"]
RESNET50 = ["model.kind=resnet", "model.flavor=resnet50", "model.image_size=224",
            "model.num_classes=1000", "train.micro_batch_size=128", "strategy.compile=true"]


def build_spec(sets: list[str], steps: int):
    """The benchmark's job: `sets` (model.kind first) on one CUDA GPU, bf16, synthetic data."""
    from temper.spec import validate_spec
    from temper.spec.loader import apply_overrides

    data = {"name": "gpu-mfu", "model": {"kind": sets[0].split("=")[1]}}
    base = [f"train.max_steps={steps}", f"train.log_every={steps}", "train.precision=bf16",
            "train.device=cuda", "resources.gpus_per_worker=1", "tracking.enabled=false",
            "data.eval_samples=0"]
    data, _ = apply_overrides(data, [*base, *sets[1:]])
    return validate_spec(data, source="benchmarks/gpu_mfu.py")


def run_spec(sets: list[str], steps: int) -> dict[str, float]:
    """Train build_spec(sets, steps) in this process; its last metrics + peak_mem_gib."""
    import torch

    from temper.dist import build_dist_context
    from temper.runtime.loop import train

    spec = build_spec(sets, steps)
    ctx = build_dist_context(device="cuda")
    try:
        torch.cuda.reset_peak_memory_stats()
        metrics = train(spec, ctx).metrics
        metrics["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return metrics
    finally:
        ctx.close()


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_mfu.py needs a CUDA GPU (none visible); nothing was measured")
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"})
    print(f"device: {torch.cuda.get_device_name()}")
    print("| model | activation checkpointing | compile | MFU | tokens/s | peak GiB |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    for ac in ("none", "selective"):
        for compile_ in (False, True):
            m = run_spec([*GPT_1B, f"strategy.activation_checkpointing={ac}",
                      f"strategy.compile={str(compile_).lower()}"], args.steps)
            print(f"| gpt 1b (seq 2048, fsdp) | {ac} | {compile_} | {m.get('perf/mfu', float('nan')):.3f} "
                  f"| {m.get('perf/tokens_per_s', float('nan')):.0f} | {m['peak_mem_gib']:.1f} |")
    m = run_spec(RESNET50, args.steps)
    print(f"\nresnet50 (bf16, compile): {m.get('perf/samples_per_s', float('nan')):.0f} img/s")


if __name__ == "__main__":
    main()
