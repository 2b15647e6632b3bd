"""A pipeline file: jobs run one after another under one parent MLflow run, a later stage
starting from an earlier stage's weights; stages may sweep settings (label fraction, seed)
and the parent run gets a table and a plot of a metric against one swept setting.

    name: digits-ssl
    stages:
      - {name: pretrain, job: digits-simclr.yaml}
      - name: finetune
        job: digits-finetune.yaml
        init_from: pretrain                    # that stage's run: runs:/<its run id>
      - {name: search, job: digits-finetune.yaml, tune: tune/digits-finetune-space.yaml}  # best trial
        sweep: {data.subset.fraction: [0.02, 0.05, 0.1, 1.0], seed: [0, 1, 2]}
    report: {x: data.subset.fraction, metric: val/acc}
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from temper.spec.base import BaseSpec

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class StageSpec(BaseSpec):
    """One job of the pipeline, run once or once per sweep combination."""

    name: str = Field(pattern=_NAME, max_length=60, description="Unique within the pipeline.")
    job: str = Field(min_length=1, description="Job spec file, relative to the pipeline file.")
    set: dict[str, Any] = Field(default_factory=dict, description="Overrides (KEY.PATH: value), like --set.")
    init_from: str | None = Field(
        default=None, description="An earlier stage's name (its run's checkpoint), or any init_from source."
    )
    freeze_backbone: bool = Field(default=False, description="With init_from: train the head only (linear probe).")
    tune: str | None = Field(
        default=None, description="A `temper tune` space file, relative to the pipeline file: this stage "
        "is a search, and a later stage's init_from takes its best trial."
    )
    sweep: dict[str, list[Any]] = Field(
        default_factory=dict, description="KEY.PATH: [values]; one run per combination (the product). "
        "'KEY1,KEY2: [values]' sets both keys to each value (e.g. seed,data.subset.seed)."
    )

    def combinations(self) -> list[dict[str, Any]]:
        keys = list(self.sweep)
        return [dict(zip(keys, values, strict=True)) for values in itertools.product(*self.sweep.values())]


class ReportSpec(BaseSpec):
    """The parent run's summary: `metric` of every run against the swept setting `x`, per
    stage, mean and standard deviation over the other swept settings (seeds)."""

    x: str = Field(description="A swept KEY.PATH, e.g. data.subset.fraction.")
    metric: str = Field(default="val/acc", description="A metric the runs log (its last value).")


class PipelineSpec(BaseSpec):
    name: str = Field(pattern=_NAME, max_length=60)
    experiment: str | None = Field(default=None, description="MLflow experiment of all runs (default: the name).")
    set: dict[str, Any] = Field(default_factory=dict, description="Overrides applied to every stage.")
    stages: list[StageSpec] = Field(min_length=1)
    report: ReportSpec | None = None

    @model_validator(mode="after")
    def _check(self) -> PipelineSpec:
        seen: dict[str, StageSpec] = {}
        for stage in self.stages:
            if stage.name in seen:
                raise ValueError(f"stages: two stages are named '{stage.name}'; give each its own name")
            ref = stage.init_from
            if ref is not None and ":" not in ref and "/" not in ref and not ref.startswith("."):
                if ref not in seen:
                    raise ValueError(f"stages.{stage.name}.init_from: '{ref}' is not an earlier stage "
                                     f"({', '.join(seen) or 'none'}); name one, or give a checkpoint or runs:/ID")
                if seen[ref].sweep:
                    raise ValueError(f"stages.{stage.name}.init_from: stage '{ref}' sweeps, so it has several "
                                     "runs; start from a stage that runs once")
            if stage.tune and stage.sweep:
                raise ValueError(f"stages.{stage.name}: tune and sweep exclude each other; put the swept "
                                 "keys in the space file (grid: [...])")
            if stage.freeze_backbone and ref is None:
                raise ValueError(f"stages.{stage.name}.freeze_backbone needs init_from (a frozen random "
                                 "backbone is not a baseline anyone wants by accident)")
            seen[stage.name] = stage
        if self.report is not None and not any(self.report.x in s.sweep for s in self.stages):
            raise ValueError(f"report.x: no stage sweeps '{self.report.x}'; name a key under some stage's sweep")
        return self

    @property
    def experiment_name(self) -> str:
        return self.experiment or self.name


def load_pipeline(path: str | Path) -> PipelineSpec:
    """Read and validate a pipeline file; errors name the file and the field."""
    from pydantic import ValidationError

    from temper.errors import SpecError
    from temper.spec.loader import read_yaml

    data = read_yaml(path)
    try:
        return PipelineSpec.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"{path}: {where}: {err['msg'].removeprefix('Value error, ')}")
        raise SpecError(lines) from None


def is_pipeline_file(data: Any) -> bool:
    return isinstance(data, dict) and "stages" in data
