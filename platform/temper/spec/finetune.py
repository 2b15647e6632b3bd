"""`init_from:` (start from pretrained weights) and `data.subset` (train on a fraction of the
labels): the fine-tuning half of pretrain-then-fine-tune."""

from __future__ import annotations

import re
from typing import Any

from pydantic import Field, field_validator, model_validator

from temper.spec.base import BaseSpec

_MODEL_URI = re.compile(r"^models:/[^/@]+(/\d+|@[\w-]+)$")
_RUN_URI = re.compile(r"^runs:/[0-9A-Za-z-]+/?$")


class InitFromSpec(BaseSpec):
    """Weights to start from: backbone (and any head of the same name and shape) loaded,
    the task head new. Loaded, new and ignored keys are reported and logged to MLflow."""

    source: str = Field(
        min_length=1,
        description="A checkpoint (run folder, step-N folder, s3:// URL, or a `temper export` folder), "
        "runs:/<run_id> (that run's newest checkpoint), or models:/<name>/<version> | models:/<name>@<alias>.",
    )
    freeze_backbone: bool = Field(
        default=False,
        description="Train the head only (linear probe): backbone weights frozen, its norm layers in eval mode.",
    )

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"source": data} if isinstance(data, str) else data

    @field_validator("source")
    @classmethod
    def _form(cls, value: str) -> str:
        if value.startswith("models:") and not _MODEL_URI.match(value):
            raise ValueError(f"'{value}' is not a model reference; write models:/NAME/VERSION or models:/NAME@ALIAS")
        if value.startswith("runs:") and not _RUN_URI.match(value):
            raise ValueError(f"'{value}' is not a run reference; write runs:/RUN_ID")
        return value

    @property
    def kind(self) -> str:
        if self.source.startswith("models:"):
            return "model"
        if self.source.startswith("runs:"):
            return "run"
        return "checkpoint"


class SubsetSpec(BaseSpec):
    """Train on a seeded random fraction of the training samples, the same ones run after run
    (label-fraction studies). Evaluation always uses the whole eval split."""

    fraction: float = Field(gt=0.0, le=1.0, description="Share of each training shard's samples kept.")
    seed: int = Field(default=0, ge=0, description="Which samples: another seed, another subset.")
