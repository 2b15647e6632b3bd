"""The Strategy interface: how a model is placed, wrapped, and stepped on the workers.

The loop only ever calls these methods, so a new engine (FSDP2, DeepSpeed, tensor
parallel) is a new subclass, never an `if` in the loop. Lifecycle:

    strategy = build_strategy(spec, ctx)
    model, optimizer = strategy.setup(model, build_optimizer=...)
    for each optimizer step:
        for each micro-batch:
            with strategy.accumulate(is_last_micro):   # no grad sync on non-final micro-steps
                out = objective(strategy.forward_model, batch)
                strategy.backward(out.loss / grad_accum)
        grad_norm = strategy.clip_grad_norm(max_norm)
        strategy.step()                                  # optimizer.step + zero_grad
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator

import torch
from torch import nn

from temper.runtime.context import DistContext


class Strategy(ABC):
    """Owns the wrapped model and the optimizer; the loop owns everything else."""

    def __init__(self, *, ctx: DistContext) -> None:
        self.ctx = ctx
        self.model: nn.Module | None = None  # the wrapped model (what forward goes through)
        self.optimizer: torch.optim.Optimizer | None = None

    @abstractmethod
    def setup(
        self,
        model: nn.Module,
        *,
        build_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Place and wrap `model`, then build its optimizer over the wrapped parameters."""

    @contextlib.contextmanager
    def accumulate(self, sync: bool) -> Iterator[None]:
        """Context for one micro-step; `sync=False` skips gradient communication."""
        yield

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm(self, max_norm: float | None) -> torch.Tensor:
        """Clip by the global gradient norm (over all shards); return the pre-clip norm."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if max_norm is None:
            norms = [p.grad.detach().norm(2) for p in params]
            return torch.linalg.vector_norm(torch.stack(norms), 2) if norms else torch.zeros(())
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def unwrap(self) -> nn.Module:
        """The bare model (for export, FLOP counts, eval outside the wrapper)."""
        return self.model

    def close(self) -> None:
        """Drop the wrapped model and optimizer before the process group is destroyed
        (a DDP reducer outliving its group aborts the process at exit)."""
        self.model = None
        self.optimizer = None
