"""Per-rank memory measured from the tensors a rank actually holds (local shards only)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor


@dataclass(frozen=True)
class MemoryReport:
    """Bytes of parameters, gradients and optimizer state (incl. fp32 master copies) on one rank."""

    params: int
    grads: int
    optim: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optim


def tensor_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if isinstance(t, DTensor) else t
    return local.numel() * local.element_size()
