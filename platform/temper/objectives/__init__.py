"""Objective registry: `objective.kind` in the spec -> an Objective built from its section."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from temper.errors import TemperError
from temper.objectives.base import Objective, ObjectiveOutput
from temper.objectives.causal_lm import CausalLM
from temper.objectives.classify import Classify

OBJECTIVE_BUILDERS: dict[str, Callable[[Any], Objective]] = {
    "causal_lm": lambda spec: CausalLM(),
    "classify": lambda spec: Classify(label_smoothing=spec.label_smoothing),
}


def build_objective(spec_objective: Any) -> Objective:
    """Build the objective for `spec.objective` (JobSpec fills in the model's default)."""
    if spec_objective is None:
        raise TemperError("objective is not set; set objective.kind (e.g. causal_lm, classify)")
    builder = OBJECTIVE_BUILDERS.get(spec_objective.kind)
    if builder is None:
        raise TemperError(
            f"objective.kind '{spec_objective.kind}' has no builder; "
            f"accepted: {', '.join(OBJECTIVE_BUILDERS)}"
        )
    return builder(spec_objective)


__all__ = [
    "OBJECTIVE_BUILDERS", "CausalLM", "Classify", "Objective", "ObjectiveOutput", "build_objective",
]
