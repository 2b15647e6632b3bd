"""Supervised classification: cross-entropy (optional label smoothing), reports accuracy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from temper.objectives.base import Objective, ObjectiveOutput


class Classify(Objective):
    """batch["image"]: float [B, C, H, W]; batch["label"]: int64 [B]."""

    def __init__(self, label_smoothing: float = 0.0) -> None:
        self.label_smoothing = label_smoothing

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        labels = batch["label"]
        logits = model(batch["image"]).float()
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        acc = (logits.argmax(dim=-1) == labels).float().mean()
        return ObjectiveOutput(
            loss=loss, metrics={"acc": acc}, num_samples=labels.shape[0], num_tokens=0
        )
