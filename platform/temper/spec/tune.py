"""A search space file for `temper tune`: spec keys with a distribution, and the search's settings.

    space:
      optim.lr: {loguniform: [1.0e-4, 1.0e-2]}
      optim.weight_decay: {choice: [0.0, 0.01, 0.1]}
      train.micro_batch_size: {grid: [16, 32]}
    set: {train.eval_every: 50}           # fixed overrides for every trial (like --set)
    tune:
      metric: val/acc
      mode: max
      num_samples: 8
      max_concurrent_trials: 2
      scheduler: {kind: asha, grace_period: 100, reduction_factor: 2}   # or {kind: none}
      search: random                      # random | grid | optuna (optional extra)

`check_space` validates the job spec at every distribution's ends and at every listed value,
with the same messages as `--set` (did-you-mean included), before any trial starts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, model_validator

from temper.errors import SpecError
from temper.spec.base import BaseSpec
from temper.spec.job import JobSpec

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
KINDS = ("loguniform", "uniform", "randint", "choice", "grid")


class DistributionSpec(BaseSpec):
    """Exactly one of: loguniform/uniform [low, high], randint [low, high] (high included),
    choice [values] (sampled), grid [values] (every value, times num_samples)."""

    loguniform: tuple[float, float] | None = None
    uniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None
    choice: list[Any] | None = Field(default=None, min_length=1)
    grid: list[Any] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one(self) -> DistributionSpec:
        given = [k for k in KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one distribution ({', '.join(KINDS)}), got {len(given)}")
        bounds = self.loguniform or self.uniform or self.randint
        if bounds is not None and not bounds[0] < bounds[1]:
            raise ValueError(f"{self.kind}: low must be below high (got {list(bounds)})")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform: low must be > 0 (got {self.loguniform[0]})")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) is not None)

    def probes(self) -> list[Any]:
        """The values every sampled spec lies between or among: ends of a range, each listed value."""
        value = getattr(self, self.kind)
        return list(value)


class AshaSpec(BaseSpec):
    """Asynchronous successive halving: weak trials stop at rungs grace_period x reduction_factor^k
    (in optimizer steps)."""

    kind: Literal["asha"] = "asha"
    grace_period: int = Field(default=1, ge=1, description="Steps every trial runs before it may be stopped.")
    reduction_factor: float = Field(default=2, gt=1, description="1/reduction_factor of trials go on at each rung.")


class NoSchedulerSpec(BaseSpec):
    kind: Literal["none"] = "none"


class TuneSettingsSpec(BaseSpec):
    metric: str = Field(default="val/loss", min_length=1, description="The metric trials are ranked by.")
    mode: Literal["min", "max"] | None = Field(
        default=None, description="min or max (default: from the metric name: acc/score -> max, else min).")
    num_samples: int = Field(default=8, ge=1, description="Trials sampled (times the grid, if any).")
    max_concurrent_trials: int = Field(default=1, ge=1)
    scheduler: Annotated[AshaSpec | NoSchedulerSpec, Field(discriminator="kind")] = Field(
        default_factory=NoSchedulerSpec)
    search: Literal["random", "grid", "optuna"] = "random"
    seed: int = Field(default=0, description="Seed of the random sampler (same seed, same trials).")
    name: str | None = Field(default=None, pattern=_NAME, max_length=80,
                             description="The search's folder and parent run name (default: <job name>-search).")

    @property
    def resolved_mode(self) -> str:
        if self.mode is not None:
            return self.mode
        return "max" if any(w in self.metric.lower() for w in ("acc", "score", "auc", "f1")) else "min"


class SpaceFileSpec(BaseSpec):
    space: dict[str, DistributionSpec] = Field(min_length=1)
    set: dict[str, Any] = Field(default_factory=dict, description="Fixed overrides for every trial, like --set.")
    tune: TuneSettingsSpec = Field(default_factory=TuneSettingsSpec)

    @model_validator(mode="after")
    def _search_fits(self) -> SpaceFileSpec:
        kinds = {key: d.kind for key, d in self.space.items()}
        if self.tune.search == "grid" and (bad := [k for k, v in kinds.items() if v != "grid"]):
            raise ValueError(f"tune.search grid: {bad[0]} is a {kinds[bad[0]]}; every key needs a grid "
                             "(or use search: random)")
        if self.tune.search == "optuna" and (bad := [k for k, v in kinds.items() if v == "grid"]):
            raise ValueError(f"tune.search optuna: {bad[0]} is a grid, which optuna cannot sample; "
                             "use choice")
        return self


def is_space_file(data: Any) -> bool:
    return isinstance(data, dict) and "space" in data and "model" not in data


def override(key: str, value: Any) -> str:
    """`KEY=VALUE` in --set form, the value written as YAML reads it back."""
    return f"{key}={value if isinstance(value, str) else json.dumps(value)}"


def load_space(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> SpaceFileSpec:
    """Read a space file, apply `tune.*` overrides; one line per problem, naming the file."""
    from temper.spec.loader import read_yaml

    data = read_yaml(path)
    if not data.get("space"):
        raise SpecError([f"{path}: space: the space is empty; name at least one spec key with a "
                         "distribution, e.g. optim.lr: {loguniform: [1.0e-4, 1.0e-2]}"])
    tune = dict(data.get("tune") or {})
    for item in overrides:
        key, _, raw = item.partition("=")
        field = key.strip().removeprefix("tune.")
        import yaml

        tune[field] = yaml.safe_load(raw) if field not in ("metric", "name") else raw
    data["tune"] = tune
    try:
        return SpaceFileSpec.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = [str(p) for p in err["loc"] if p not in ("asha", "none")]
            where = ".".join(loc) or "(top level)"
            if err["type"] == "extra_forbidden" and len(loc) == 3 and loc[0] == "space":
                lines.append(f"{path}: space.{loc[1]}: unknown distribution '{loc[2]}'; accepted: "
                             f"{', '.join(KINDS)}")
                continue
            if err["type"] == "union_tag_invalid":
                msg = f"{err['ctx']['tag']!r} is not a known kind; accepted: asha, none"
            else:
                msg = err["msg"].removeprefix("Value error, ")
                msg = f"{msg[0].lower()}{msg[1:]}"
            lines.append(f"{path}: {msg}" if where == "(top level)" else f"{path}: {where}: {msg}")
        raise SpecError(lines) from None


def check_space(space: SpaceFileSpec, *, job: str | Path, space_path: str | Path,
                job_sets: list[str]) -> JobSpec:
    """The job spec with the fixed settings; raise SpecError (naming the space file) when any
    key is not a spec key or any end of a distribution is not a valid value, or when the job
    never reports tune.metric."""
    from temper.spec.loader import apply_overrides, read_yaml, validate_spec

    data = read_yaml(job)
    fixed = [override(k, v) for k, v in space.set.items()] + list(job_sets)
    base_data, touched = apply_overrides(data, fixed)
    base = validate_spec(base_data, source=str(job), overridden=touched)
    for key, dist in space.space.items():
        for value in dist.probes():
            try:
                trial, keys = apply_overrides(base_data, [override(key, value)])
                validate_spec(trial, source=str(job), overridden={key})
            except SpecError as e:
                first = e.problems[0].split(": ", 1)[-1]  # drop the source: the space file is it
                if first.startswith(f"{key}: "):
                    first = first[len(key) + 2:]
                what = "" if "unknown key" in first else f"{dist.kind} value {value!r}: "
                raise SpecError([f"{space_path}: space.{key}: {what}{first}"]) from None
    reported = reported_metrics(base)
    if space.tune.metric not in reported:
        raise SpecError([f"{space_path}: tune.metric: {space.tune.metric!r} is never reported by {job}"
                         f"; it reports: {', '.join(sorted(reported))}"])
    return base


#: What each objective adds to val/loss at eval (the objective's ObjectiveOutput.metrics keys).
EVAL_METRICS = {"classify": ("acc",), "mlm": ("acc",), "simclr": ("acc",), "causal_lm": (), "mae": ()}


def reported_metrics(spec: JobSpec) -> set[str]:
    """The metrics a trial reports to the search: train/loss and train/lr at every logging step,
    and val/loss (+ the objective's own) at every eval, when the job has held-out data."""
    names = {"train/loss", "train/lr"}
    data = spec.data
    has_eval = bool(getattr(data, "eval_samples", 0)) or bool(getattr(data, "eval", None))
    if has_eval:
        names |= {"val/loss", *(f"val/{m}" for m in EVAL_METRICS.get(spec.objective.kind, ()))}
    return names
