"""LR schedules and optimizer parameter groups."""

from __future__ import annotations

import math

import pytest
import torch

from temper.runtime.optim import build_optimizer, build_scheduler, lr_factor
from temper.spec import OptimSpec, ScheduleSpec


def factors(kind: str, *, warmup: int = 0, floor: float = 0.1, steps: int = 11) -> list[float]:
    spec = ScheduleSpec(kind=kind, warmup_steps=warmup, min_lr_ratio=floor)
    return [lr_factor(s, spec=spec, max_steps=steps) for s in range(steps)]


def test_constant_with_warmup() -> None:
    assert factors("constant", warmup=4) == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]


def test_linear_decays_to_floor_at_last_step() -> None:
    f = factors("linear", floor=0.0)
    assert f[0] == 1.0 and f[-1] == 0.0
    assert f == pytest.approx([1 - i / 10 for i in range(11)])


def test_cosine_shape() -> None:
    f = factors("cosine", warmup=2, floor=0.1, steps=12)
    assert f[:2] == [0.5, 1.0]
    assert f[2] == pytest.approx(1.0) and f[-1] == pytest.approx(0.1)
    mid = 2 + 9 / 2  # halfway through the decay
    assert lr_factor(int(mid), spec=ScheduleSpec(kind="cosine", warmup_steps=2, min_lr_ratio=0.1),
                     max_steps=12) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 9)))
    assert all(a >= b for a, b in zip(f[2:], f[3:], strict=False))


def test_scheduler_drives_optimizer_lr() -> None:
    model = torch.nn.Linear(4, 4)
    opt = build_optimizer(model, OptimSpec(lr=0.1, schedule=ScheduleSpec(kind="linear", min_lr_ratio=0)))
    sched = build_scheduler(opt, spec=ScheduleSpec(kind="linear", min_lr_ratio=0), max_steps=5)
    seen = []
    for _ in range(5):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.1, 0.075, 0.05, 0.025, 0.0])


def test_weight_decay_skips_biases_and_norms() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = build_optimizer(model, OptimSpec(kind="adamw", weight_decay=0.1))
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and [p.shape for p in decayed["params"]] == [(4, 4)]
    assert plain["weight_decay"] == 0.0 and len(plain["params"]) == 3


def test_sgd_options() -> None:
    opt = build_optimizer(torch.nn.Linear(2, 2), OptimSpec(kind="sgd", lr=0.5, momentum=0.8, nesterov=True))
    assert isinstance(opt, torch.optim.SGD)
    assert opt.param_groups[0]["momentum"] == 0.8 and opt.param_groups[0]["nesterov"] is True


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_implementations_pick_their_kernel_and_agree(kind) -> None:
    """fused (the default), foreach and for_loop: the kernel asked for, the same update."""
    assert OptimSpec().implementation == "fused"
    weights = {}
    for impl in ("fused", "foreach", "for_loop"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
        opt = build_optimizer(model, OptimSpec(kind=kind, lr=0.1, weight_decay=0.1, implementation=impl))
        assert bool(opt.defaults["fused"]) is (impl == "fused")
        assert bool(opt.defaults["foreach"]) is (impl == "foreach")
        for _ in range(3):
            model(torch.randn(4, 8)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        weights[impl] = torch.cat([p.detach().flatten() for p in model.parameters()])
    # float32 rounding only: a few ulps of lr-0.1 steps (a wrong update differs by ~1e-2)
    torch.testing.assert_close(weights["fused"], weights["foreach"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights["for_loop"], weights["foreach"], rtol=1e-5, atol=1e-6)


def test_unknown_implementation_is_refused() -> None:
    with pytest.raises(ValueError, match="implementation"):
        OptimSpec(implementation="apex")
