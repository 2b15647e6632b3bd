"""Per-rank memory of every strategy at N=2 on CPU (gloo), from the tensors each rank holds.

    python benchmarks/strategy_memory.py

Model: GPT d_model=256, 2 layers, vocab 1024 (~1.9M parameters), fp32 AdamW. Parameters,
gradients (the most held after any micro-step's backward; DeepSpeed runs grad_accum=2 so
ZeRO-1's full accumulation buffer shows) and optimizer state (incl. ZeRO's
fp32 master partition) are summed over local shards; the ratio is against DDP's total.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "platform"), str(ROOT)]

STRATEGIES = {
    "ddp": [], "fsdp": ["strategy=fsdp"],
    "fsdp_offload (held in CPU memory)": ["strategy=fsdp_offload"],
    **{f"deepspeed_zero{z}": [f"strategy=deepspeed_zero{z}", "train.grad_accum=2"] for z in (1, 2, 3)},
    "tensor_parallel=2": ["strategy.tensor_parallel=2"],
}
MODEL = ["model.d_model=256", "model.n_head=4", "model.n_layer=2", "model.vocab_size=1024",
         "model.seq_len=32", "train.micro_batch_size=2", "optim.grad_clip=null",
         "tracking.enabled=false", "resources.workers=2"]


def _measure(specs: dict[str, str]) -> dict:
    from temper.dist import build_dist_context
    from temper.runtime.probe import measure_strategy_memory
    from temper.spec import spec_from_json

    ctx = build_dist_context(device="cpu")
    try:
        return {name: measure_strategy_memory(spec_from_json(t), ctx=ctx) for name, t in specs.items()}
    finally:
        ctx.close()


def main() -> None:
    from tests.distributed.spawn import run_ranks

    from temper.spec import load_spec, spec_to_json

    specs = {name: spec_to_json(load_spec(ROOT / "jobs/ci/tiny-gpt.yaml", [*MODEL, *extra]))
             for name, extra in STRATEGIES.items()}
    rank0 = run_ranks(_measure, 2, specs)[0]
    ddp = rank0["ddp"].total
    mib = 2**20
    print("| strategy (N=2, rank 0) | params MiB | grads MiB | optimizer state MiB | total MiB | vs DDP |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, m in rank0.items():
        print(f"| {name} | {m.params / mib:.2f} | {m.grads / mib:.2f} | {m.optim / mib:.2f} | "
              f"{m.total / mib:.2f} | {m.total / ddp:.2f} |")


if __name__ == "__main__":
    main()
