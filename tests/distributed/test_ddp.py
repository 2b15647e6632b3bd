"""DDP strategy and the loop on 2 real gloo ranks vs the single-process reference."""

from __future__ import annotations

import pytest
import torch

from temper.spec import DDPSpec, load_spec
from tests.distributed.spawn import run_ranks

pytestmark = pytest.mark.distributed


def _count_allreduces(accum: int) -> tuple[int, int]:
    """Run one optimizer step of `accum` micro-steps; count DDP's bucket all-reduces."""
    from temper.dist import build_dist_context
    from temper.strategies.ddp import DDPStrategy

    ctx = build_dist_context(device="cpu")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    strategy = DDPStrategy(DDPSpec(), ctx=ctx)
    strategy.setup(model, build_optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.1))
    calls = []

    def hook(state, bucket):
        calls.append(1)
        fut = torch.distributed.all_reduce(bucket.buffer(), async_op=True).get_future()
        return fut.then(lambda f: f.value()[0] / ctx.world_size)

    strategy.model.register_comm_hook(None, hook)
    for micro in range(accum):
        x = torch.randn(4, 8) + ctx.rank
        with strategy.accumulate(sync=micro == accum - 1):
            strategy.backward(strategy.model(x).pow(2).mean())
    syncs_before_step = len(calls)
    strategy.step()
    params = torch.cat([p.detach().flatten() for p in strategy.model.parameters()])
    gathered = [torch.zeros_like(params) for _ in range(ctx.world_size)]
    torch.distributed.all_gather(gathered, params)
    strategy.close()
    del model
    ctx.close()
    return syncs_before_step, int(all(torch.equal(gathered[0], g) for g in gathered))


def test_ddp_syncs_only_on_the_final_micro_step() -> None:
    one = run_ranks(_count_allreduces, 2, 1)
    four = run_ranks(_count_allreduces, 2, 4)
    buckets = one[0][0]
    assert buckets >= 1
    assert four[0][0] == buckets  # 4 micro-steps, still one round of bucket all-reduces
    assert all(equal == 1 for _, equal in one + four)  # replicas stay identical


def _train(spec_json: str) -> list[tuple[int, float]]:
    from temper.dist import build_dist_context
    from temper.runtime.loop import train
    from temper.spec import spec_from_json

    spec = spec_from_json(spec_json)
    ctx = build_dist_context(device="cpu")
    try:
        return train(spec, ctx).loss_history
    finally:
        ctx.close()


def _spec_json(job: str = "tiny-gpt", **overrides) -> str:
    from temper.spec import spec_to_json

    sets = [f"{k.replace('__', '.')}={v}" for k, v in overrides.items()]
    base = ["tracking.enabled=false", "train.max_steps=10", "train.eval_every=0", "data.eval_samples=0"]
    return spec_to_json(load_spec(f"jobs/ci/{job}.yaml", base + sets))


def test_two_rank_ddp_equals_single_process_reference() -> None:
    """2 ranks x micro-batch b == 1 rank x 2b: the same global batches, the same losses.

    (GPT uses LayerNorm; a BatchNorm model would differ, its statistics being per rank.)
    """
    two = run_ranks(_train, 2, _spec_json(resources__workers=2, train__micro_batch_size=4))
    one = run_ranks(_train, 1, _spec_json(resources__workers=1, train__micro_batch_size=8))
    assert two[0] == two[1]  # every rank logs the all-reduced mean
    steps = [s for s, _ in one[0]]
    assert steps == [s for s, _ in two[0]] == list(range(1, 11))
    for (_, a), (_, b) in zip(one[0], two[0], strict=True):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6)  # float32 reduction order only


def test_grad_accum_equals_larger_micro_batch() -> None:
    """grad_accum=2 x micro-batch 4 == grad_accum=1 x micro-batch 8 (one rank)."""
    accum = run_ranks(_train, 1, _spec_json(resources__workers=1, train__micro_batch_size=4, train__grad_accum=2))
    big = run_ranks(_train, 1, _spec_json(resources__workers=1, train__micro_batch_size=8))
    for (_, a), (_, b) in zip(big[0], accum[0], strict=True):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6)


def test_two_rank_resnet_trains_and_replicas_agree() -> None:
    two = run_ranks(_train, 2, _spec_json("tiny-resnet", resources__workers=2))
    assert two[0] == two[1] and len(two[0]) == 10


def test_bf16_autocast_trains_close_to_fp32() -> None:
    """bf16 autocast really changes the arithmetic, and still tracks the fp32 curve."""
    fp32 = run_ranks(_train, 1, _spec_json(resources__workers=1))[0]
    bf16 = run_ranks(_train, 1, _spec_json(resources__workers=1, train__precision="bf16"))[0]
    assert [s for s, _ in bf16] == [s for s, _ in fp32]
    assert any(a != b for (_, a), (_, b) in zip(fp32, bf16, strict=True))  # autocast is on
    for (_, a), (_, b) in zip(fp32, bf16, strict=True):
        assert b == pytest.approx(a, rel=0.05)  # bf16 keeps ~3 significant digits
