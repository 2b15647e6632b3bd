"""Model registry: `model.kind` in the spec -> an nn.Module class built from its spec section.

Models hold no parallelism code; strategies wrap them. A new model kind is one entry here
plus its `*Spec` class in temper.spec.models.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from temper.errors import TemperError
from temper.models.gpt import GPT
from temper.models.resnet import ResNet

MODEL_BUILDERS: dict[str, Callable[[Any], nn.Module]] = {
    "gpt": GPT,
    "resnet": ResNet,
}


def build_model(spec_model: Any) -> nn.Module:
    """Build the model for `spec.model` (weights initialized from the torch RNG)."""
    builder = MODEL_BUILDERS.get(spec_model.kind)
    if builder is None:
        raise TemperError(
            f"model.kind '{spec_model.kind}' has no builder; accepted: {', '.join(MODEL_BUILDERS)}"
        )
    return builder(spec_model)


__all__ = ["GPT", "MODEL_BUILDERS", "ResNet", "build_model"]
