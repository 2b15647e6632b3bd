"""`temper plan` beside the real thing at N=2 on CPU (gloo), as ratios planned / measured.

    python benchmarks/plan_accuracy.py

Memory: parameters, gradients and optimizer state each rank holds after one real step
(runtime/probe.py) vs the plan's (fake process group, meta tensors). Activations: the bytes
one micro-batch's forward leaves for backward (tests/fixtures/activations.py; bf16 is CPU
autocast) vs the plan's formula (runtime/activations.py); tensor parallel in the ranks. Model: GPT
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


def _measured(spec, model, *, autocast: bool = False) -> int:
    """What one micro-batch through the job's objective leaves for backward."""
    import torch
    from tests.fixtures.activations import measure_saved_bytes

    from temper.objectives import build_objective

    objective = build_objective(spec.objective, spec.model)
    m = spec.model
    batch = {"tokens": torch.randint(0, m.vocab_size - 1, (spec.train.micro_batch_size, m.seq_len + 1),
                                     generator=torch.Generator().manual_seed(0))}

    def loss():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return objective(model, batch).loss

    return measure_saved_bytes(model, loss)


def _in_rank(memory: dict[str, str], activations: dict[str, str]) -> dict:
    import torch

    from temper.dist import build_dist_context
    from temper.models import build_model
    from temper.runtime.optim import build_optimizer
    from temper.runtime.probe import measure_strategy_memory
    from temper.spec import spec_from_json
    from temper.strategies import build_strategy

    ctx = build_dist_context(device="cpu")
    out = {"memory": {k: measure_strategy_memory(spec_from_json(v), ctx=ctx) for k, v in memory.items()},
           "activations": {}}
    try:
        for name, text in activations.items():
            spec = spec_from_json(text)
            strategy = build_strategy(spec, ctx=ctx)
            with torch.device("meta"):
                model = build_model(spec.model, objective=spec.objective)
            strategy.setup(model, build_optimizer=lambda m, spec=spec: build_optimizer(m, spec.optim))
            out["activations"][name] = _measured(spec, strategy.model)
            strategy.close()
    finally:
        ctx.close()
    return out


def main() -> None:
    import torch
    from tests.distributed.spawn import run_ranks

    from temper.models import build_model
    from temper.runtime.activations import estimate_activations
    from temper.runtime.plan import build_plan
    from temper.spec import load_spec, spec_to_json
    from temper.strategies.parallelize import apply_activation_checkpointing

    def spec(*extra):
        return load_spec(ROOT / "jobs/ci/tiny-gpt.yaml", [*MODEL, *extra])

    specs = {name: spec(*extra) for name, extra in CASES.items()}
    tp = {f"tp2, ac={m}": spec("strategy.tensor_parallel=2", f"strategy.activation_checkpointing={m}",
                               "train.micro_batch_size=4") for m in ("none", "selective")}
    real = run_ranks(_in_rank, 2, {k: spec_to_json(v) for k, v in specs.items()},
                     {k: spec_to_json(v) for k, v in tp.items()})[0]
    print(f"{'strategy (rank 0)':<20}{'params':>10}{'grads':>10}{'optim':>10}   planned / measured")
    for name, s in specs.items():
        plan = build_plan(s).memory
        ratios = [getattr(plan, f) / getattr(real["memory"][name], f) for f in ("params", "grads", "optim")]
        print(f"{name:<20}" + "".join(f"{r:>10.4f}" for r in ratios))
    print(f"\n{'activations, micro-batch 4':<36}{'measured MiB':>14}{'planned MiB':>13}{'ratio':>8}")
    rows = []
    families = {"gpt": [], "encoder": ["model.kind=encoder", "model.pool=cls", "model.vocab_size=258"]}
    for family, extra in families.items():
        for precision in ("fp32", "bf16"):
            for mode in ("none", "full", "selective"):
                s = spec(*extra, f"strategy.activation_checkpointing={mode}", "train.micro_batch_size=4",
                         f"train.precision={precision}")
                torch.manual_seed(0)
                model = build_model(s.model, objective=s.objective)
                apply_activation_checkpointing(model, mode)
                rows.append((f"{family}, {precision}, ac={mode}",
                             _measured(s, model, autocast=precision == "bf16"), estimate_activations(s).saved))
    rows += [(f"gpt, fp32, {name} (rank 0)", real["activations"][name], estimate_activations(s).saved)
             for name, s in tp.items()]
    for name, got, est in rows:
        print(f"{name:<36}{got / 2**20:>14.3f}{est / 2**20:>13.3f}{est / got:>8.4f}")


if __name__ == "__main__":
    main()
