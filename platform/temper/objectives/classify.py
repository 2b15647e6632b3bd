"""Supervised classification of images or token sequences: cross-entropy (optional label
smoothing), accuracy, and a confusion matrix at every evaluation."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch import nn

from temper.objectives.base import EvalReport, Objective, ObjectiveOutput, fit_tokens


class Classify(Objective):
    """batch[input_field]: images [B, C, H, W] or tokens [B, T]; batch["label"]: int64 [B].
    A token batch of seq_len + 1 (as packed for causal LM) is cut to the model's seq_len."""

    def __init__(self, label_smoothing: float = 0.0, *, input_field: str = "image",
                 num_classes: int | None = None, seq_len: int | None = None) -> None:
        self.label_smoothing = label_smoothing
        self.input_field = input_field
        self.num_classes = num_classes
        self.seq_len = seq_len

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(fit_tokens(batch[self.input_field], self.seq_len), head="classify")

    def loss(self, out: torch.Tensor, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        labels = batch["label"]
        logits = out.float()
        loss = F.cross_entropy(logits, labels, label_smoothing=self.label_smoothing)
        pred = logits.argmax(dim=-1)
        acc = (pred == labels).float().mean()
        return ObjectiveOutput(loss=loss, metrics={"acc": acc}, num_samples=labels.shape[0], num_tokens=0,
                               outputs={"pred": pred.detach(), "label": labels.detach()})

    def eval_report(self) -> EvalReport | None:
        return ConfusionReport(self.num_classes) if self.num_classes else None


class ConfusionReport(EvalReport):
    """Counts (true label, prediction) over every rank's eval share."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.counts: torch.Tensor | None = None

    def update(self, out: ObjectiveOutput, batch: dict[str, torch.Tensor]) -> None:
        pred, label = out.outputs["pred"], out.outputs["label"]
        k = self.num_classes
        flat = (label.long() * k + pred.long()).clamp(0, k * k - 1)
        counts = torch.bincount(flat, minlength=k * k).reshape(k, k).float()
        self.counts = counts if self.counts is None else self.counts + counts

    def finish(self, ctx) -> dict[str, bytes]:
        k = self.num_classes
        local = self.counts if self.counts is not None else torch.zeros(k, k)
        total = ctx.all_reduce_mean(local.to(ctx.device).reshape(-1)) * ctx.world_size
        if not ctx.is_main:
            return {}
        matrix = total.round().long().reshape(k, k).cpu().tolist()
        from temper.figures import confusion_matrix_png

        return {"confusion_matrix.json": (json.dumps({"rows": "true label", "columns": "prediction",
                                                      "counts": matrix}) + "\n").encode(),
                "confusion_matrix.png": confusion_matrix_png(matrix)}
