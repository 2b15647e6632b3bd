"""`temper plan` against the real thing at N=2: its per-rank parameter, gradient and optimizer
bytes equal what 2 gloo ranks hold after a real step (within 2%: `PLAN_REL`), and its
activation estimate is within 25% (`ACT_REL`) of what autograd saves for one micro-batch,
measured with saved-tensor hooks on CPU."""

from __future__ import annotations

import pytest
import torch

from temper.models import build_model
from temper.runtime.activations import estimate_activations
from temper.runtime.plan import build_plan
from temper.spec import load_spec, spec_from_json, spec_to_json
from temper.strategies.parallelize import apply_activation_checkpointing
from tests.distributed.spawn import run_ranks
from tests.fixtures.activations import measure_saved_bytes

pytestmark = pytest.mark.distributed

PLAN_REL = 0.02
ACT_REL = 0.25
# A small GPT whose FSDP shards are not all padding (~1.9M parameters); fp32, CPU.
MODEL = ["tracking.enabled=false", "model.d_model=256", "model.n_head=4", "model.n_layer=2",
         "model.vocab_size=1024", "model.seq_len=32", "train.micro_batch_size=2", "optim.grad_clip=null",
         "resources.workers=2"]
CASES = {"ddp": [], "fsdp": ["strategy=fsdp"], "fsdp_tp2": ["strategy=fsdp", "strategy.tensor_parallel=2"]}


def _spec(extra: list[str]):
    return load_spec("jobs/ci/tiny-gpt.yaml", [*MODEL, *extra])


def _measure(specs: dict[str, str]) -> dict:
    from temper.dist import build_dist_context
    from temper.runtime.probe import measure_strategy_memory

    ctx = build_dist_context(device="cpu")
    try:
        return {name: measure_strategy_memory(spec_from_json(text), ctx=ctx) for name, text in specs.items()}
    finally:
        ctx.close()


@pytest.fixture(scope="module")
def measured() -> list[dict]:
    return run_ranks(_measure, 2, {name: spec_to_json(_spec(extra)) for name, extra in CASES.items()})


@pytest.mark.parametrize("name", list(CASES))
def test_planned_bytes_equal_what_the_ranks_hold(measured: list[dict], name: str) -> None:
    plan = build_plan(_spec(CASES[name]))
    real = measured[0][name]  # rank 0: the plan's rank (FSDP's largest shard)
    assert real.params > 0 and real.optim > 0
    for field in ("params", "grads", "optim"):
        assert getattr(plan.memory, field) == pytest.approx(getattr(real, field), rel=PLAN_REL), field


@pytest.mark.parametrize("mode", ["none", "full"])
def test_activation_estimate_matches_saved_tensors(mode: str) -> None:
    """`full` checks what stays saved between forward and backward (each block's input); the
    recompute term, held while one block recomputes in backward, is the `none` per-block
    amount the first case checks."""
    spec = _spec([f"strategy.activation_checkpointing={mode}", "train.micro_batch_size=4"])
    torch.manual_seed(0)
    model = build_model(spec.model, objective=spec.objective)
    apply_activation_checkpointing(model, mode)
    m = spec.model
    tokens = torch.randint(0, m.vocab_size, (spec.train.micro_batch_size, m.seq_len + 1))

    def loss() -> torch.Tensor:
        logits = model(tokens[:, :-1])
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())

    saved = measure_saved_bytes(model, loss)
    assert estimate_activations(spec).saved == pytest.approx(saved, rel=ACT_REL)
