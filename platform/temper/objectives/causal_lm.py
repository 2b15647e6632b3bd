"""Next-token prediction: cross-entropy of model(tokens[:, :-1]) against tokens[:, 1:]."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from temper.objectives.base import Objective, ObjectiveOutput


class CausalLM(Objective):
    """batch["tokens"]: LongTensor [B, seq_len + 1]. Loss in float32 (bf16-autocast safe)."""

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(batch["tokens"][:, :-1])

    def loss(self, out: torch.Tensor, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        tokens = batch["tokens"]
        targets = tokens[:, 1:]
        logits = out.float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return ObjectiveOutput(
            loss=loss, metrics={}, num_samples=tokens.shape[0], num_tokens=targets.numel()
        )
