"""Model registry: `model.kind` in the spec -> an nn.Module built from its spec section and
the objective it trains (which decides its heads: see temper.models.base).

Models hold no parallelism code; strategies wrap them. A new model kind is one entry here
plus its `*Spec` class in temper.spec.architectures.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from temper.errors import TemperError
from temper.models.base import TaskModel, is_head
from temper.models.encoder import Encoder
from temper.models.gpt import GPT
from temper.models.recurrent import Recurrent
from temper.models.resnet import ResNet
from temper.models.vit import ViT

MODEL_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "encoder": Encoder,
    "gpt": GPT,
    "gru": Recurrent,
    "lstm": Recurrent,
    "resnet": ResNet,
    "vit": ViT,
}


def build_model(spec_model: Any, objective: Any = None) -> nn.Module:
    """Build the model for `spec.model` with the heads `objective` (spec.objective) needs;
    weights initialized from the torch RNG. objective None: the model's default objective."""
    builder = MODEL_BUILDERS.get(spec_model.kind)
    if builder is None:
        raise TemperError(
            f"model.kind '{spec_model.kind}' has no builder; accepted: {', '.join(MODEL_BUILDERS)}"
        )
    return builder(spec_model, objective=objective)


__all__ = ["GPT", "MODEL_BUILDERS", "Encoder", "Recurrent", "ResNet", "TaskModel", "ViT", "build_model",
           "is_head"]
