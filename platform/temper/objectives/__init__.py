"""Objective registry: `objective.kind` in the spec -> an Objective built from its section
and the model's (vocabulary, classes, what the model reads)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from temper.errors import TemperError
from temper.objectives.base import EvalReport, Objective, ObjectiveOutput
from temper.objectives.causal_lm import CausalLM
from temper.objectives.classify import Classify
from temper.objectives.mae import MAE
from temper.objectives.mlm import MLM
from temper.objectives.simclr import SimCLR
from temper.spec.job import MODEL_INPUTS


def _classify(spec: Any, model: Any) -> Classify:
    if model is None:
        return Classify(label_smoothing=spec.label_smoothing)
    field = MODEL_INPUTS[model.kind]
    return Classify(label_smoothing=spec.label_smoothing, input_field=field, num_classes=model.num_classes,
                    seq_len=getattr(model, "seq_len", None) if field == "tokens" else None)


def _mlm(spec: Any, model: Any) -> MLM:
    if model is None or not hasattr(model, "mask_id"):
        kind = getattr(model, "kind", None)
        raise TemperError(f"objective.kind 'mlm' needs an encoder model (model.kind encoder), got {kind}; "
                          "set model.kind: encoder")
    return MLM(mask_prob=spec.mask_prob, mask_id=model.mask_id, vocab_size=model.vocab_size, seq_len=model.seq_len)


OBJECTIVE_BUILDERS: dict[str, Callable[[Any, Any], Objective]] = {
    "causal_lm": lambda spec, model: CausalLM(),
    "classify": _classify,
    "mae": lambda spec, model: MAE(mask_ratio=spec.mask_ratio, norm_pix_loss=spec.norm_pix_loss,
                                   grid_images=spec.grid_images),
    "simclr": lambda spec, model: SimCLR(temperature=spec.temperature),
    "mlm": _mlm,
}


def build_objective(spec_objective: Any, model: Any = None) -> Objective:
    """Build the objective for `spec.objective` (JobSpec fills in the model's default);
    `model` is the job's model spec."""
    if spec_objective is None:
        raise TemperError("objective is not set; set objective.kind (e.g. causal_lm, classify)")
    builder = OBJECTIVE_BUILDERS.get(spec_objective.kind)
    if builder is None:
        raise TemperError(
            f"objective.kind '{spec_objective.kind}' has no builder; "
            f"accepted: {', '.join(OBJECTIVE_BUILDERS)}"
        )
    return builder(spec_objective, model)


__all__ = [
    "MAE", "MLM", "OBJECTIVE_BUILDERS", "CausalLM", "Classify", "EvalReport", "Objective", "ObjectiveOutput",
    "SimCLR",
    "build_objective",
]
