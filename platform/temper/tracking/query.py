"""Read-side MLflow queries for `temper runs` and `temper runs compare` (no console output).

    open_client(--tracking-uri)       -> (MlflowClient, uri); the server is checked first
    list_runs(client, experiment=...) -> [RunRow], newest first
    get_run(client, run_id)           -> the run; an unknown id is a one-line TemperError
    run_spec(client, run)             -> the flattened spec (spec.yaml artifact, else params)
    spec_diff(a, b), diff_lines(...)  -> the keys that differ, as a unified-style listing
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from temper.errors import TemperError
from temper.tracking.backend import is_http_uri, short_reason

log = logging.getLogger(__name__)

KEY_METRICS = ("train/loss", "val/loss", "val/acc", "perf/samples_per_s")
STATUSES = ("RUNNING", "SCHEDULED", "FINISHED", "FAILED", "KILLED")
STEP_METRIC = "train/loss"  # its latest step is the run's step count
PROGRESS_BAR_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


@dataclass(frozen=True)
class RunRow:
    """One run as `temper runs` shows it."""

    run_id: str
    name: str
    status: str
    experiment_id: str
    start_ms: int | None
    end_ms: int | None
    steps: int | None
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def duration_s(self) -> float | None:
        if self.start_ms is None or self.end_ms is None:
            return None
        return max(0.0, (self.end_ms - self.start_ms) / 1000)


def open_client(tracking_uri: str | None) -> tuple[Any, str]:
    """An MlflowClient for --tracking-uri, else $MLFLOW_TRACKING_URI, else ./mlflow.db."""
    from mlflow import MlflowClient

    from temper.tracking.runs import check_reachable, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri, workdir=Path.cwd())
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):].split("?", 1)[0]).is_file():
        raise TemperError(f"tracking store {uri} does not exist; pass --tracking-uri (or set "
                          "MLFLOW_TRACKING_URI) to where your runs are recorded")
    check_reachable(uri)
    return MlflowClient(tracking_uri=uri), uri


def run_link(uri: str, experiment_id: str, run_id: str) -> str | None:
    """The run's page in the MLflow UI, for http(s) tracking servers."""
    if not is_http_uri(uri):
        return None
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def ui_hint(uri: str) -> str:
    """How to see a non-http store in the MLflow UI."""
    return f"mlflow ui --backend-store-uri {uri}"


def experiment_ids(client: Any, experiment: str | None, *, uri: str) -> dict[str, str]:
    """{id: name} of the named experiment (by name or id), or of every active one."""
    if experiment is None:
        return {e.experiment_id: e.name for e in client.search_experiments(max_results=1000)}
    found = client.get_experiment_by_name(experiment)
    if found is None and experiment.isdigit():
        try:
            found = client.get_experiment(experiment)
        except Exception:  # noqa: BLE001 - MlflowException: no such id
            found = None
    if found is None or found.lifecycle_stage == "deleted":
        names = sorted(e.name for e in client.search_experiments(max_results=1000))
        shown = ", ".join(names[:10]) + (" ..." if len(names) > 10 else "")
        raise TemperError(f"experiment {experiment!r} is not in {uri}; known: {shown or 'none'}; "
                          "pass one of them to --experiment (or leave it out for all)")
    return {found.experiment_id: found.name}


def list_runs(client: Any, *, uri: str, experiment: str | None, limit: int = 20,
              status: str | None = None) -> list[RunRow]:
    """Runs of the experiment (default: all experiments), newest first, at most `limit`."""
    if limit < 1:
        raise TemperError(f"--limit {limit}: pass a positive number of runs")
    filter_string = ""
    if status is not None:
        wanted = status.upper()
        if wanted not in STATUSES:
            raise TemperError(f"--status {status!r} is not one of {', '.join(STATUSES)}")
        filter_string = f"attributes.status = '{wanted}'"
    ids = experiment_ids(client, experiment, uri=uri)
    if not ids:
        return []
    runs = client.search_runs(list(ids), filter_string=filter_string, max_results=limit,
                              order_by=["attributes.start_time DESC"])
    return [to_row(run) for run in runs]


def to_row(run: Any) -> RunRow:
    steps = {m.key: m.step for m in run.data.to_proto().metrics}
    return RunRow(
        run_id=run.info.run_id,
        name=run.info.run_name or run.data.tags.get("mlflow.runName", ""),
        status=run.info.status,
        experiment_id=run.info.experiment_id,
        start_ms=run.info.start_time,
        end_ms=run.info.end_time,
        steps=steps.get(STEP_METRIC),
        metrics={k: run.data.metrics[k] for k in KEY_METRICS if k in run.data.metrics},
    )


def get_run(client: Any, run_id: str, *, uri: str) -> Any:
    try:
        return client.get_run(run_id)
    except Exception as e:  # noqa: BLE001 - MlflowException (RESOURCE_DOES_NOT_EXIST, bad id)
        raise TemperError(f"run {run_id!r} is not in {uri} ({short_reason(e)}); list runs with "
                          "`temper runs`, or pass --tracking-uri") from None


@contextlib.contextmanager
def _no_progress_bar() -> Iterator[None]:
    """MLflow draws a download progress bar even for one small file; not for spec.yaml."""
    if PROGRESS_BAR_ENV in os.environ:  # the user's choice stands
        yield
        return
    os.environ[PROGRESS_BAR_ENV] = "false"
    try:
        yield
    finally:
        os.environ.pop(PROGRESS_BAR_ENV, None)


def spec_artifact(client: Any, run_id: str) -> dict | None:
    """The run's resolved spec from its spec.yaml artifact (None when it has none)."""
    import yaml

    with tempfile.TemporaryDirectory(prefix="temper-spec-") as tmp, _no_progress_bar():
        try:
            path = client.download_artifacts(run_id, "spec.yaml", tmp)
            data = yaml.safe_load(Path(path).read_text())
        except Exception as e:  # noqa: BLE001 - no artifact, or an artifact store we cannot read
            log.debug("run %s: no readable spec.yaml (%s)", run_id, short_reason(e))
            return None
    return data if isinstance(data, dict) else None


def run_spec(client: Any, run: Any) -> tuple[dict[str, str], str]:
    """(flattened spec, where it came from): the run's spec.yaml artifact, else its params."""
    from temper.spec.loader import flatten

    data = spec_artifact(client, run.info.run_id)
    if data is not None:
        return flatten(data), "spec.yaml"
    return dict(run.data.params), "params"


def spec_diff(a: dict[str, str], b: dict[str, str]) -> list[tuple[str, str | None, str | None]]:
    """(key, value in a, value in b) for every key whose value differs; None: key absent."""
    keys = sorted(set(a) | set(b))
    return [(k, a.get(k), b.get(k)) for k in keys if a.get(k) != b.get(k)]


def diff_lines(diff: list[tuple[str, str | None, str | None]], *, a: str, b: str) -> list[str]:
    """A unified-style listing: `--- a`, `+++ b`, then `-key: old` / `+key: new` per key."""
    if not diff:
        return [f"specs of {a} and {b} are identical"]
    lines = [f"--- {a}", f"+++ {b}"]
    for key, old, new in diff:
        if old is not None:
            lines.append(f"-{key}: {old}")
        if new is not None:
            lines.append(f"+{key}: {new}")
    return lines


def metric_table(a: dict[str, float], b: dict[str, float],
                 keys: tuple[str, ...] = ()) -> list[tuple[str, float | None, float | None, float | None]]:
    """(metric, a, b, b - a): the key metrics first, then every other metric both runs have
    (system/* metrics left out: they describe the machines, not the model)."""
    shared = sorted(k for k in (set(a) & set(b)) - set(keys) if not k.startswith("system/"))
    rows = []
    for key in [*[k for k in keys if k in a or k in b], *shared]:
        x, y = a.get(key), b.get(key)
        rows.append((key, x, y, (y - x) if x is not None and y is not None else None))
    return rows
