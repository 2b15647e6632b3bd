"""One `temper tune` trial: a Ray Tune function trainable that runs a full Temper job.

    trial(config)                    in Tune's trial actor (the trial's driver)
      spec = base + config["params"]  validated like any job (the search checked the ends first)
      run_job(spec, TrialLauncher)    a child MLflow run of the search (mlflow.parentRunId),
                                      checkpoints in <search>/trials/<trial id>/: a trial Tune
                                      restarts after a crash resumes there, into its own run
        TorchTrainer.fit()            Ray Train V2 workers, RunConfig(callbacks=[TuneReportCallback])
          every rank: ray.train.report(metrics) whenever tune.metric is in an event (each eval)
          -> TuneReportCallback -> tune.report -> the scheduler (ASHA) may stop the trial

This is the pattern Ray documents for Train V2 under Tune (ray.tune.integration.ray_train).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from temper.launch.ray_launcher import RayLauncher
from temper.spec.job import JobSpec

TRIAL_TAG = "temper.tune.trial"
SEARCH_TAG = "temper.tune"


@dataclass(frozen=True)
class TrialSetup:
    """What every trial shares, shipped once through Ray's object store (tune.with_parameters)."""

    base_data: dict[str, Any]  # the job spec as data, fixed settings applied, paths absolute
    source: str  # the job file, for error messages
    search: str  # the search's name
    folder: str  # the search's folder: trials/<trial id>/ holds each trial's checkpoints
    workdir: str
    metric: str
    parent_run_id: str
    tags: dict[str, str] = field(default_factory=dict)
    tracking_uri: str = ""  # where the parent run is (a restarted trial finds its own run there)


def trial_spec(setup: TrialSetup, params: dict[str, Any], *, trial_id: str | None) -> JobSpec:
    """The job spec of one trial (`trial_id` None: the plain job with these values, the best
    trial's job file)."""
    from temper.spec.loader import apply_overrides, validate_spec
    from temper.spec.tune import override

    data, touched = apply_overrides(setup.base_data, [override(k, v) for k, v in params.items()])
    spec = validate_spec(data, source=setup.source, overridden=touched)
    if trial_id is None:
        return spec
    checkpoint = spec.checkpoint.model_copy(update={"dir": str(Path(setup.folder) / "trials" / trial_id)})
    return spec.model_copy(update={"name": f"{setup.search}.{trial_id}"[:100], "checkpoint": checkpoint})


class TrialLauncher(RayLauncher):
    """The ray launcher inside a Tune trial: Ray is already up (this is a Tune actor), fit()
    runs here (no terminal, no Ctrl-C: Tune stops the trial), and reports go to Tune."""

    def __init__(self, *, metric: str) -> None:
        super().__init__(address=None)
        self.metric = metric

    def loop_config_extra(self) -> dict[str, Any]:
        return {"tune_metric": self.metric}

    def train_callbacks(self) -> list[Any]:
        from ray.tune.integration.ray_train import TuneReportCallback

        return [TuneReportCallback()]

    @staticmethod
    def _fit(trainer: Any, sink: Any, *, grace_s: float = 0.0) -> None:
        trainer.fit()  # Tune owns the signals here: it stops the trial


def run_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """Tune's function trainable: one trial, a full Temper job, tracked as a child run."""
    from ray import tune

    from temper.launch.driver import run_job

    trial_id = tune.get_context().get_trial_id()
    if Path(setup.workdir).is_dir():  # the job's folder (Ray Jobs ships it as the working dir)
        os.chdir(setup.workdir)
    params = dict(config["params"])
    spec = trial_spec(setup, params, trial_id=trial_id)
    tags = {**setup.tags, "mlflow.parentRunId": setup.parent_run_id, SEARCH_TAG: setup.search,
            TRIAL_TAG: trial_id, "temper.tune.params": json.dumps(params, sort_keys=True)}
    run_job(spec, launcher=TrialLauncher(metric=setup.metric), workdir=Path(setup.workdir), extra_tags=tags,
            run_id=_own_run(setup, trial_id))


def _own_run(setup: TrialSetup, trial_id: str) -> str | None:
    """The trial's MLflow run from an earlier start (the search was stopped or its driver died):
    the trial continues in it, from its newest checkpoint if it has one, never in a second run."""
    if not setup.tracking_uri:
        return None
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=setup.tracking_uri)
    experiment = client.get_run(setup.parent_run_id).info.experiment_id
    runs = client.search_runs([experiment], max_results=1, filter_string=(
        f"tags.`mlflow.parentRunId` = '{setup.parent_run_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'"))
    return runs[0].info.run_id if runs else None
