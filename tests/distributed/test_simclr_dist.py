"""SimCLR's NT-Xent with negatives gathered from 2 real gloo ranks vs one process holding the
concatenated batch: the same loss and the same gradients."""

from __future__ import annotations

import pytest
import torch

from tests.distributed.spawn import run_ranks

pytestmark = pytest.mark.distributed

B, D, TEMPERATURE = 4, 5, 0.3
#: float32 losses and gradients of a 16-row softmax, computed in two different orders.
ATOL = 1e-6


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Unnormalized projections of both views of the 2 x B images of the global batch."""
    gen = torch.Generator().manual_seed(0)
    return torch.randn(2 * B, D, generator=gen), torch.randn(2 * B, D, generator=gen)


def _reference() -> tuple[float, float, torch.Tensor]:
    """One process, the whole batch: loss, acc, and d(loss)/d(projections) [4B, D]."""
    from temper.objectives.simclr import SimCLR

    z1, z2 = _global_batch()
    out = torch.cat([z1, z2]).requires_grad_(True)
    res = SimCLR(temperature=TEMPERATURE).loss(out, {"view1": torch.zeros(2 * B, 1, 2, 2)})
    res.loss.backward()
    return res.loss.item(), res.metrics["acc"].item(), out.grad


def _rank_loss() -> tuple[float, float, torch.Tensor]:
    """This rank's loss, acc and gradient of the SUM of all ranks' losses w.r.t. its own
    projections (what the autograd-aware gather sends back), [2B, D]."""
    from temper.dist import build_dist_context
    from temper.objectives.simclr import SimCLR

    ctx = build_dist_context(device="cpu")
    z1, z2 = _global_batch()
    mine = slice(ctx.rank * B, (ctx.rank + 1) * B)
    out = torch.cat([z1[mine], z2[mine]]).requires_grad_(True)
    res = SimCLR(temperature=TEMPERATURE).loss(out, {"view1": torch.zeros(B, 1, 2, 2)})
    res.loss.backward()
    result = res.loss.item(), res.metrics["acc"].item(), out.grad.clone()
    ctx.close()
    return result


def test_gathered_negatives_equal_the_single_process_loss_and_gradient() -> None:
    loss, acc, grad = _reference()
    ranks = run_ranks(_rank_loss, 2)
    # Averaged over ranks (what DDP's gradient average trains on) = the single-process loss.
    assert sum(r[0] for r in ranks) / 2 == pytest.approx(loss, abs=ATOL)
    assert ranks[0][0] != pytest.approx(ranks[1][0], abs=1e-3)  # each rank scores its own rows
    assert sum(r[1] for r in ranks) / 2 == pytest.approx(acc, abs=ATOL)
    # Rank r's gradient of (loss_0 + loss_1) = 2 x the reference's gradient on rank r's rows.
    z1_rows, z2_rows = grad[: 2 * B], grad[2 * B:]
    for rank, (_, _, g) in enumerate(ranks):
        mine = slice(rank * B, (rank + 1) * B)
        expected = 2 * torch.cat([z1_rows[mine], z2_rows[mine]])
        assert torch.allclose(g, expected, atol=ATOL), (rank, (g - expected).abs().max())
