"""What an objective returns to the training loop, and the interface it implements."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class ObjectiveOutput:
    """One micro-batch's result.

    loss: scalar, mean over the micro-batch (what backward runs on).
    metrics: scalar tensors, means over the micro-batch (e.g. {"acc": ...}); may be empty.
    num_samples / num_tokens: work done, for throughput (num_tokens is 0 for non-token models).
    """

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    num_samples: int = 0
    num_tokens: int = 0


class Objective:
    """Turns (model, batch of device tensors) into an ObjectiveOutput. Stateless."""

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        raise NotImplementedError
