"""The Strategy interface: how a model is placed, wrapped, and stepped on the workers.

The loop only ever calls these methods, so a new engine (FSDP2, DeepSpeed, tensor
parallel) is a new subclass, never an `if` in the loop. Lifecycle:

    strategy = build_strategy(spec, ctx)
    model, optimizer = strategy.setup(model, build_optimizer=..., pretrained=weights | None)
    for each optimizer step:
        step = strategy.forward_backward(objective=..., fetch=next_batch, micro_steps=grad_accum, ...)
            # default: per micro-batch, with strategy.accumulate(is_last_micro) (no grad sync on
            # non-final micro-steps): out = objective(strategy.model, batch);
            # strategy.backward(out.loss / grad_accum). The pipeline runs its schedule instead.
        grad_norm = strategy.clip_grad_norm(max_norm)
        strategy.step()                                  # optimizer.step + zero_grad

Checkpoints (temper.checkpoint) go through `checkpoint_engine`: "dcp" strategies hand their
state to torch.distributed.checkpoint via `checkpoint_state` / `load_checkpoint_state`;
DeepSpeed writes its own files (`save_engine_checkpoint` / `load_engine_checkpoint`).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from temper.dist import DistContext
from temper.models.init import InitWeights
from temper.strategies.grad_norm import clip_grad_norm_global
from temper.strategies.memory import MemoryReport, tensor_bytes


@dataclass
class StepOutput:
    """One optimizer step's forward-backward, as this rank adds it to the logging window."""

    loss: torch.Tensor  # mean over the micro-batches (detached, fp32)
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # "train/<name>" -> mean
    samples: int = 0
    tokens: int = 0


def _flat_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=True)


class Strategy(ABC):
    """Owns the wrapped model and the optimizer; the loop owns everything else."""

    #: How temper.checkpoint saves this strategy: "dcp" or "deepspeed" (the engine's own files).
    checkpoint_engine: ClassVar[str] = "dcp"

    def __init__(self, *, ctx: DistContext, seed: int = 0) -> None:
        self.ctx = ctx
        self.seed = seed  # parameters are initialized from (seed, name): see models/init.py
        self.model: nn.Module | None = None  # the wrapped model (what forward goes through)
        self.optimizer: torch.optim.Optimizer | None = None
        # This rank's place among the data-parallel replicas (tensor-parallel peers share data).
        self.data_rank = ctx.rank
        self.data_world_size = ctx.world_size

    @abstractmethod
    def setup(
        self,
        model: nn.Module,
        *,
        build_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
        pretrained: InitWeights | None = None,
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Place and wrap `model` (initialized from `pretrained` where it has a tensor of the
        same name and shape: init_from), then build its optimizer over the wrapped parameters."""

    @contextlib.contextmanager
    def accumulate(self, sync: bool) -> Iterator[None]:
        """Context for one micro-step; `sync=False` skips gradient communication."""
        yield

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def forward_backward(self, *, objective: Any, fetch: Callable[[], dict], micro_steps: int,
                         autocast: Callable[[], Any], timer: Any,
                         loss_hook: Callable[[torch.Tensor], torch.Tensor] | None = None) -> StepOutput:
        """Forward and backward over one optimizer step's `micro_steps` batches (`fetch()`
        returns the next one, on the device); gradients accumulate, synchronized once.
        `timer` brackets the forward (compute_start/compute_end); `loss_hook` may replace a
        micro-batch's loss before backward (fault injection). Returns the step's mean loss
        and metrics (as this rank adds them to the logging window)."""
        loss_sum = torch.zeros((), device=self.ctx.device)
        metrics: dict[str, torch.Tensor] = {}
        samples = tokens = 0
        for micro in range(micro_steps):
            batch = fetch()
            with self.accumulate(sync=micro == micro_steps - 1):
                timer.compute_start()
                with autocast():
                    out = objective(self.model, batch)
                timer.compute_end()
                loss = out.loss if loss_hook is None else loss_hook(out.loss)
                self.backward(loss / micro_steps)
            loss_sum += loss.detach().float() / micro_steps
            for name, value in out.metrics.items():
                key = f"train/{name}"
                metrics[key] = metrics.get(key, 0.0) + value.detach().float() / micro_steps
            samples += out.num_samples
            tokens += out.num_tokens
        return StepOutput(loss=loss_sum, metrics=metrics, samples=samples, tokens=tokens)

    def eval_forward(self, objective: Any, batch: dict, *, autocast: Callable[[], Any]) -> Any:
        """One evaluation batch through the model: the objective's output (a pipeline's
        earlier stages return one of zero samples)."""
        with autocast():
            return objective(self.model, batch)

    def clip_grad_norm(self, max_norm: float | None) -> torch.Tensor:
        """Clip by the global gradient norm (over all shards); return the pre-clip norm."""
        return clip_grad_norm_global(self.model.parameters(), max_norm)

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def memory_report(self) -> MemoryReport:
        """Bytes this rank holds in parameters, gradients and optimizer state (local shards)."""
        params = [p for p in self.model.parameters()]
        state = [v for st in self.optimizer.state.values() for v in st.values()
                 if isinstance(v, torch.Tensor)]
        return MemoryReport(
            params=sum(tensor_bytes(p) for p in params),
            grads=sum(tensor_bytes(p.grad) for p in params if p.grad is not None),
            optim=sum(tensor_bytes(t) for t in state if t.ndim > 0),  # not Adam's step counters
        )

    def measure_memory(self, micro_step: Callable[[], torch.Tensor]) -> MemoryReport:
        """Run one optimizer step of one micro-step (`micro_step()` returns the loss) and
        report this rank's memory: gradients at their peak (before the optimizer step),
        parameters and optimizer state after it."""
        self.backward(micro_step())
        grads = self.memory_report().grads
        self.clip_grad_norm(None)
        self.step()
        after = self.memory_report()
        return MemoryReport(params=after.params, grads=grads, optim=after.optim)

    def checkpoint_state(self) -> dict:
        """This rank's model and optimizer state for torch.distributed.checkpoint:
        {"model": ..., "optim": ...}, keyed by the bare model's parameter names (no DDP
        `module.` prefix), sharded parameters as DTensors (FSDP2, TP), so a checkpoint loads
        into any world size or strategy. The optimizer's state and param groups are flattened
        per parameter name (as torchtitan saves them): pipeline stages hold different
        parameters, and one shared `param_groups` entry would collide across them.
        The tensors are the live ones, not copies."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=_flat_options())
        return {"model": model_state, "optim": optim_state}

    def load_checkpoint_state(self, state: dict) -> None:
        """Put a state of `checkpoint_state()`'s layout (filled by dcp.load) into the model
        and optimizer."""
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(self.model, self.optimizer, options=_flat_options(),
                       model_state_dict=state["model"], optim_state_dict=state["optim"])

    def unwrap(self) -> nn.Module:
        """The bare model (for export, FLOP counts, eval outside the wrapper)."""
        return self.model

    def close(self) -> None:
        """Drop the wrapped model and optimizer before the process group is destroyed
        (a DDP reducer outliving its group aborts the process at exit)."""
        self.model = None
        self.optimizer = None
