"""A model is a backbone plus the heads its objective needs.

    model = build_model(spec.model, objective=spec.objective)
    out = model(inputs, head="classify")        # what objective.forward calls
    model.heads                                  # nn.ModuleDict: only the heads in use

Heads live under `heads.<name>` so a checkpoint's backbone carries over to another
objective by name (`init_from:`): an MAE decoder or a SimCLR projection is simply not
loaded by the classifier, and the classifier's head is new. Only the heads the objective
uses are built, so DDP never sees an unused parameter.

A model that supports tensor parallelism says how, as data (`tensor_parallel_plan`): for
each module of its layer stack `blocks`, which Linear layers split column-wise and which
row-wise. It holds no parallelism code; strategies/parallelize.py applies the plan.

`freeze_backbone` (linear probing) turns off gradients for every parameter outside
`heads.` and keeps the backbone's norm layers in eval mode whatever `model.train()` says.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import nn

from temper.errors import TemperError

HEADS = "heads."
_NORMS = (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)


def is_head(name: str) -> bool:
    """True for parameter/state names inside a task head (wrapper prefixes allowed)."""
    from temper.models.init import clean_name

    return clean_name(name).startswith(HEADS)


class TaskModel(nn.Module):
    """Base of every model: `heads` (nn.ModuleDict) and the backbone-freezing behaviour."""

    heads: nn.ModuleDict
    backbone_frozen: bool = False
    #: Tensor parallelism: {Linear layer inside each of `blocks`: "colwise" | "rowwise"};
    #: None: the model has no plan (validation refuses strategy.tensor_parallel > 1).
    tensor_parallel_plan: ClassVar[dict[str, Literal["colwise", "rowwise"]] | None] = None

    def init_weights(self) -> None:
        """(Re)initialize every parameter from the torch RNG, by `init_parameter`."""
        with torch.no_grad():
            for name, param in self.named_parameters():  # a tied weight is listed once
                self.init_parameter(name, param)

    @torch.no_grad()
    def init_parameter(self, name: str, tensor: torch.Tensor, *,
                       generator: torch.Generator | None = None) -> None:
        """Fill `tensor` (the full, unsharded shape of parameter `name`), deterministically from
        `generator`: heads by `init_head_parameter`, the rest by the model's
        `init_backbone_parameter`. Strategies call it per parameter with a generator seeded by
        (seed, name), so sharding never changes the initialization."""
        if name.startswith(HEADS):
            self.init_head_parameter(name, tensor, generator=generator)
        else:
            self.init_backbone_parameter(name, tensor, generator=generator)

    def init_backbone_parameter(self, name: str, tensor: torch.Tensor, *,
                                generator: torch.Generator | None = None) -> None:
        """The model's own rule for a parameter outside `heads`."""
        raise NotImplementedError

    @torch.no_grad()
    def init_head_parameter(self, name: str, tensor: torch.Tensor, *,
                            generator: torch.Generator | None = None) -> None:
        """Heads' rule: norms (1, 0), biases 0, everything else N(0, 0.02). Deterministic."""
        owner_name, _, attr = name.rpartition(".")
        owner = self.get_submodule(owner_name)
        if isinstance(owner, _NORMS):
            tensor.fill_(1.0 if attr == "weight" else 0.0)
        elif attr == "bias":
            tensor.zero_()
        else:
            tensor.normal_(0.0, 0.02, generator=generator)

    def freeze_backbone(self) -> int:
        """Freeze every parameter outside `heads`; returns how many parameters stay trainable."""
        trainable = 0
        for name, param in self.named_parameters():
            head = name.startswith(HEADS)
            param.requires_grad_(head)
            trainable += param.numel() if head else 0
        self.backbone_frozen = True
        self.train(self.training)
        return trainable

    def train(self, mode: bool = True) -> TaskModel:
        super().train(mode)
        if self.backbone_frozen:
            for name, child in self.named_children():
                if name != "heads":
                    child.train(False)
        return self


def check_seq_len(tokens: torch.Tensor, seq_len: int) -> int:
    """The input's length T ([B, T] tokens); a clear error when it exceeds model.seq_len."""
    t = tokens.shape[1]
    if t > seq_len:
        raise TemperError(f"input has {t} tokens but model.seq_len is {seq_len}; raise model.seq_len to at least {t}")
    return t


def mlp_head(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    """Linear -> BatchNorm -> ReLU -> Linear (SimCLR's projection)."""
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.BatchNorm1d(d_hidden), nn.ReLU(inplace=True),
                         nn.Linear(d_hidden, d_out))
