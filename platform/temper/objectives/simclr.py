"""SimCLR (Chen et al. 2020): two augmented views of each image, one forward over both (so
BatchNorm normalizes them together), NT-Xent over cosine similarities / temperature.

Each of the 2B projections on a rank is scored against every projection of the global batch
but itself: while training under torch.distributed with more than one rank, the other ranks'
projections are gathered with the autograd-aware all_gather, so the negatives span the
global batch and the gradient flows back to the rank that computed them. The loss of a rank is
the mean over its own 2B rows; averaged over ranks (as DDP averages gradients) it is exactly
the single-process loss of the concatenated batch. Evaluation (no gradient) scores each rank's
batch on its own: no collective runs where ranks' eval shares may differ in size.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from temper.objectives.base import Objective, ObjectiveOutput


class SimCLR(Objective):
    """batch["view1"], batch["view2"]: float [B, C, H, W], two views of the same B images."""

    def __init__(self, *, temperature: float = 0.2) -> None:
        self.temperature = temperature

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(torch.cat([batch["view1"], batch["view2"]]), head="proj")

    def loss(self, out: torch.Tensor, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        b = batch["view1"].shape[0]
        z = F.normalize(out.float(), dim=1)
        gather = torch.is_grad_enabled() and _world_size() > 1
        loss, acc = nt_xent(z[:b], z[b:], temperature=self.temperature, gather=gather)
        return ObjectiveOutput(loss=loss, metrics={"acc": acc}, num_samples=b)


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


# torch 2.13 marks the public autograd all_gather deprecated in favour of a private API; the
# public one is kept and that one warning silenced (once, not around every training step).
warnings.filterwarnings("ignore", message=".*all_gather is deprecated", category=FutureWarning)


def _all_gather(z: torch.Tensor) -> torch.Tensor:
    """Every rank's z, concatenated in rank order; backward sums each rank's gradient share
    back to the rank that computed it."""
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(z))


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, *, temperature: float,
            gather: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """NT-Xent of normalized projections z1, z2 [B, D] (row i of each: views of image i).

    gather: all ranks' z1 and z2 (equal B everywhere) form the candidates. Returns the mean
    loss over this rank's 2B rows and the top-1 accuracy of picking the positive (the other
    view) among the 2G - 1 candidates (G: the global batch)."""
    b, rank = z1.shape[0], 0
    all1, all2 = z1, z2
    if gather:
        rank = torch.distributed.get_rank()
        all1, all2 = _all_gather(z1), _all_gather(z2)
    g = all1.shape[0]
    candidates = torch.cat([all1, all2])  # [2G, D]
    rows = torch.cat([z1, z2])  # [2B, D]; global indices below
    local = torch.arange(b, device=z1.device) + rank * b
    own = torch.cat([local, local + g])
    positive = torch.cat([local + g, local])
    self_mask = torch.zeros(2 * b, 2 * g, dtype=torch.bool, device=z1.device)
    self_mask[torch.arange(2 * b, device=z1.device), own] = True
    logits = (rows @ candidates.T / temperature).masked_fill(self_mask, float("-inf"))  # never itself
    loss = F.cross_entropy(logits, positive)
    acc = (logits.argmax(dim=1) == positive).float().mean()
    return loss, acc.detach()
