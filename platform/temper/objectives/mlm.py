"""Masked language modelling (BERT): corrupt some tokens, predict the originals there.

Each position is chosen with probability mask_prob (and at least one per sequence); of the
chosen, 80% become the [MASK] id, 10% a random token (never the [MASK] id), 10% stay as
they are. The loss is cross-entropy on the chosen positions only. The choice draws from the
global torch RNG on the batch's device, which checkpoints save, so a resumed run masks the
same way as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from temper.objectives.base import Objective, ObjectiveOutput, fit_tokens

MASK_SHARE, RANDOM_SHARE = 0.8, 0.1  # of the chosen positions; the rest stay unchanged


@dataclass
class Masked:
    """What MLM.corrupt made: the model's input, which positions count, and why."""

    inputs: torch.Tensor  # [B, T] corrupted tokens
    chosen: torch.Tensor  # [B, T] bool: positions the loss scores
    masked: torch.Tensor  # [B, T] bool: chosen and replaced by the [MASK] id
    randomized: torch.Tensor  # [B, T] bool: chosen and replaced by a random token


class MLM(Objective):
    """batch["tokens"]: LongTensor [B, L]; cut to seq_len when longer (packed as seq_len + 1)."""

    def __init__(self, *, mask_prob: float, mask_id: int, vocab_size: int, seq_len: int | None = None) -> None:
        self.mask_prob = mask_prob
        self.mask_id = mask_id
        self.vocab_size = vocab_size
        self.seq_len = seq_len

    def corrupt(self, tokens: torch.Tensor) -> Masked:
        """Choose and replace positions (global torch RNG on tokens.device)."""
        b, t = tokens.shape
        dev = tokens.device
        chosen = torch.rand(b, t, device=dev) < self.mask_prob
        forced = torch.randint(0, t, (b,), device=dev)  # drawn always: RNG use never depends on data
        none = ~chosen.any(dim=1)
        chosen[torch.arange(b, device=dev), forced] |= none
        kind = torch.rand(b, t, device=dev)
        masked = chosen & (kind < MASK_SHARE)
        randomized = chosen & (kind >= MASK_SHARE) & (kind < MASK_SHARE + RANDOM_SHARE)
        # Uniform over the vocabulary without the [MASK] id: draw from vocab_size - 1 ids and
        # shift those at or above the mask id up by one.
        random = torch.randint(0, self.vocab_size - 1, (b, t), device=dev)
        random = random + (random >= self.mask_id).long()
        inputs = torch.where(masked, torch.full_like(tokens, self.mask_id), tokens)
        inputs = torch.where(randomized, random.to(tokens.dtype), inputs)
        return Masked(inputs=inputs, chosen=chosen, masked=masked, randomized=randomized)

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        m = self.corrupt(fit_tokens(batch["tokens"], self.seq_len))
        return {"logits": model(m.inputs, head="mlm"), "chosen": m.chosen}

    def loss(self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        targets = fit_tokens(batch["tokens"], self.seq_len)
        chosen = out["chosen"]
        logits = out["logits"][chosen].float()  # [N_chosen, V]
        labels = targets[chosen]
        loss = F.cross_entropy(logits, labels)
        acc = (logits.argmax(dim=-1) == labels).float().mean()
        return ObjectiveOutput(loss=loss, metrics={"acc": acc}, num_samples=targets.shape[0],
                               num_tokens=int(chosen.sum()))
