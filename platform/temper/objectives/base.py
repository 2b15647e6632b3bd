"""The objective contract (Composer's): `out = objective.forward(model, batch)` runs the model,
`objective.loss(out, batch)` scores it. The loop calls `objective(model, batch)`, which is
both, and never knows which objective it trains.

An objective may also return an `EvalReport` collector: evaluation feeds it every batch's
output on every rank, then `finish` (which may run collectives, so every rank calls it)
returns files for the MLflow run (a confusion matrix, a reconstruction grid) on rank 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


def fit_tokens(tokens: torch.Tensor, seq_len: int | None) -> torch.Tensor:
    """A token batch [B, L] cut to the model's seq_len when longer (shards packed for causal
    LM hold seq_len + 1 tokens per sample)."""
    return tokens[:, :seq_len] if seq_len is not None and tokens.shape[1] > seq_len else tokens


@dataclass
class ObjectiveOutput:
    """One micro-batch's result.

    loss: scalar, mean over the micro-batch (what backward runs on).
    metrics: scalar tensors, means over the micro-batch (e.g. {"acc": ...}); may be empty.
    num_samples / num_tokens: work done, for throughput (num_tokens is 0 for non-token models).
    outputs: detached tensors an EvalReport reads (predictions, labels, reconstructions).
    """

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    num_samples: int = 0
    num_tokens: int = 0
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)


class EvalReport:
    """Collects what one evaluation pass shows as pictures. Built fresh for every pass."""

    def update(self, out: ObjectiveOutput, batch: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def finish(self, ctx: Any) -> dict[str, bytes]:
        """Every rank calls this; rank 0 returns {path in the run's artifacts: file bytes}."""
        raise NotImplementedError


class Objective:
    """forward(model, batch) -> model output; loss(output, batch) -> ObjectiveOutput."""

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> Any:
        raise NotImplementedError

    def loss(self, out: Any, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        raise NotImplementedError

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        return self.loss(self.forward(model, batch), batch)

    def eval_report(self) -> EvalReport | None:
        """A collector for one evaluation pass, or None (metrics only)."""
        return None
