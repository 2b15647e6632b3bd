"""`temper plan` beside the real thing at N=2 on CPU (gloo), as ratios planned / measured.

    python benchmarks/plan_accuracy.py

Memory: parameters, gradients and optimizer state each rank holds after one real step
(runtime/probe.py) vs the plan's (fake process group, meta tensors). Activations: bytes
autograd saves for one micro-batch (saved-tensor hooks) vs the plan's formula. Model: GPT
d_model=256, 2 layers, vocab 1024, seq 32, fp32 AdamW (what tests/distributed/test_plan_accuracy.py checks).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "platform"), str(ROOT)]

MODEL = ["tracking.enabled=false", "model.d_model=256", "model.n_head=4", "model.n_layer=2",
         "model.vocab_size=1024", "model.seq_len=32", "train.micro_batch_size=2", "optim.grad_clip=null",
         "resources.workers=2"]
CASES = {"ddp": [], "fsdp": ["strategy=fsdp"], "fsdp x tp2": ["strategy=fsdp", "strategy.tensor_parallel=2"]}


def _measure(specs: dict[str, str]) -> dict:
    from temper.dist import build_dist_context
    from temper.runtime.probe import measure_strategy_memory
    from temper.spec import spec_from_json

    ctx = build_dist_context(device="cpu")
    try:
        return {name: measure_strategy_memory(spec_from_json(text), ctx=ctx) for name, text in specs.items()}
    finally:
        ctx.close()


def _activations(spec) -> int:
    import torch
    from tests.fixtures.activations import measure_saved_bytes

    from temper.models import build_model
    from temper.strategies.parallelize import apply_activation_checkpointing

    torch.manual_seed(0)
    model = build_model(spec.model, objective=spec.objective)
    apply_activation_checkpointing(model, spec.strategy.activation_checkpointing)
    m = spec.model
    tokens = torch.randint(0, m.vocab_size, (spec.train.micro_batch_size, m.seq_len + 1))

    def loss():
        logits = model(tokens[:, :-1])
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())

    return measure_saved_bytes(model, loss)


def main() -> None:
    from tests.distributed.spawn import run_ranks

    from temper.runtime.activations import estimate_activations
    from temper.runtime.plan import build_plan
    from temper.spec import load_spec, spec_to_json

    specs = {name: load_spec(ROOT / "jobs/ci/tiny-gpt.yaml", [*MODEL, *extra]) for name, extra in CASES.items()}
    real = run_ranks(_measure, 2, {name: spec_to_json(s) for name, s in specs.items()})[0]
    print(f"{'strategy (rank 0)':<20}{'params':>10}{'grads':>10}{'optim':>10}   planned / measured")
    for name, spec in specs.items():
        plan = build_plan(spec).memory
        ratios = [getattr(plan, f) / getattr(real[name], f) for f in ("params", "grads", "optim")]
        print(f"{name:<20}" + "".join(f"{r:>10.4f}" for r in ratios))
    print(f"\n{'activations':<20}{'micro-batch':>12}{'measured MiB':>14}{'planned MiB':>13}{'ratio':>8}")
    for mode in ("none", "full"):
        for micro in (2, 8):
            spec = load_spec(ROOT / "jobs/ci/tiny-gpt.yaml", [*MODEL, f"train.micro_batch_size={micro}",
                                                             f"strategy.activation_checkpointing={mode}"])
            got, est = _activations(spec), estimate_activations(spec).saved
            print(f"{'ac=' + mode:<20}{micro:>12}{got / 2**20:>14.3f}{est / 2**20:>13.3f}{est / got:>8.4f}")


if __name__ == "__main__":
    main()
