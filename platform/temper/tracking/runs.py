"""The driver's side of tracking: one MLflow run per job.

    start_run(spec)  -> check the server (fast), experiment, run named spec.name,
                        params = the flattened resolved spec, spec.yaml artifact, tags
    workers          <- {"run_id", "tracking_uri"}: rank 0 logs metrics (MlflowTracker)
    end_run(handle)  -> FINISHED / FAILED (+ temper.error) / KILLED
"""

from __future__ import annotations

import getpass
import logging
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import temper
from temper.errors import TemperError
from temper.run_info import RunInfo
from temper.spec.job import JobSpec
from temper.spec.loader import flatten, spec_hash, spec_to_dict, spec_to_yaml
from temper.tracking.backend import MlflowBackend, is_http_uri, is_rejection, short_reason

log = logging.getLogger(__name__)

RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
PARAMS_PER_BATCH = 100  # MLflow's limit on params per LogBatch request
MAX_PARAM_VALUE_CHARS = 6000  # MLflow's limit on a param value
MAX_ERROR_CHARS = 5000
REACH_TIMEOUT_S = 5.0


class TrackingUnreachable(TemperError):
    """The tracking server did not answer (connection refused, timeout, 5xx): the job goes
    on and the run is created when it returns. Wrong credentials are a plain TemperError."""


@dataclass(frozen=True)
class RunHandle:
    run_id: str
    experiment_id: str
    tracking_uri: str
    ui_url: str | None

    def run_info(self) -> RunInfo:
        """What the driver passes to the workers (see temper.tracking.build_tracker)."""
        return RunInfo(run_id=self.run_id, tracking_uri=self.tracking_uri)


def resolve_tracking_uri(spec_tracking_uri: str | None, *, workdir: Path) -> str:
    """tracking.uri, else $MLFLOW_TRACKING_URI, else an sqlite store in `workdir`.

    Local sqlite paths are made absolute against `workdir`: Ray workers do not share the
    driver's working directory.
    """
    uri = spec_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or ""
    if not uri.strip():
        return f"sqlite:///{Path(workdir).resolve()}/mlflow.db"
    uri = uri.strip()
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/") and uri != "sqlite:///:memory:":
        return f"{prefix}{(Path(workdir) / uri[len(prefix):]).resolve()}"
    return uri


def start_run(spec: JobSpec, *, launcher: str, workdir: Path, extra_tags: dict[str, str] | None = None) -> RunHandle:
    """Create the job's MLflow run; raise TemperError when the tracking server is unreachable.
    `extra_tags`: the driver's own (lineage, a pipeline's parent run)."""
    from mlflow import MlflowClient
    from mlflow.entities import Param

    uri = resolve_tracking_uri(spec.tracking.uri, workdir=workdir)
    check_reachable(uri)
    client = MlflowClient(tracking_uri=uri)
    experiment_id = ensure_experiment(client, spec.tracking.experiment, uri=uri, workdir=workdir)
    run = client.create_run(experiment_id, run_name=spec.name,
                            tags={**_run_tags(spec, launcher=launcher, workdir=workdir), **(extra_tags or {})})
    run_id = run.info.run_id
    ui_url = f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}" if is_http_uri(uri) else None
    handle = RunHandle(run_id=run_id, experiment_id=experiment_id, tracking_uri=uri, ui_url=ui_url)
    try:
        params = [Param(k, fit_param_value(k, v)) for k, v in flatten(spec_to_dict(spec)).items()]
        for i in range(0, len(params), PARAMS_PER_BATCH):
            client.log_batch(run_id, params=params[i:i + PARAMS_PER_BATCH], synchronous=True)
        client.log_text(run_id, spec_to_yaml(spec), "spec.yaml")
    except BaseException as e:
        end_run(handle, status="FAILED", error=f"recording the job spec failed: {e}")
        raise
    return handle


def tag_run(handle: RunHandle, tags: dict[str, str]) -> None:
    """Set tags on the run from the driver (one request)."""
    from mlflow.entities import RunTag

    MlflowBackend(handle.tracking_uri, timeout_s=REACH_TIMEOUT_S).log_batch(
        handle.run_id, tags=[RunTag(k, v) for k, v in tags.items()])


def continue_run(spec: JobSpec, *, run_id: str, workdir: Path, resumed: bool = True) -> RunHandle:
    """Reopen the run a resumed job belongs to: status RUNNING again, params untouched (they
    were logged when it started), `temper.resumes` counted up (`resumed`=False: a run that
    `temper submit` created, started here for the first time)."""
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(spec.tracking.uri, workdir=workdir)
    check_reachable(uri)
    client = MlflowClient(tracking_uri=uri)
    try:
        run = client.get_run(run_id)
    except Exception as e:  # noqa: BLE001 - mlflow raises MlflowException for a missing run
        raise TemperError(
            f"MLflow run {run_id} (to continue) is not in {uri} ({short_reason(e)}); "
            "set tracking.uri to that run's server, or pass --no-resume to start a new run"
        ) from None
    client.update_run(run_id, status="RUNNING")
    if resumed:
        resumes = int(run.data.tags.get("temper.resumes", "0")) + 1
        client.set_tag(run_id, "temper.resumes", str(resumes))
    experiment_id = run.info.experiment_id
    ui_url = f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}" if is_http_uri(uri) else None
    return RunHandle(run_id=run_id, experiment_id=experiment_id, tracking_uri=uri, ui_url=ui_url)


def end_run(handle: RunHandle, *, status: str, error: str | None = None) -> bool:
    """Mark the run terminated with `status`; with `error`, record it as tags and the note.

    Never raises for tracking problems (it runs while a job is being torn down): a server
    that stays unreachable over 3 quick attempts (~3-20 s) is logged as a warning and
    False is returned.
    """
    if status not in RUN_STATUSES:
        raise ValueError(f"status must be one of {', '.join(RUN_STATUSES)}, got {status!r}")
    from mlflow.entities import RunTag

    tags = []
    if error:
        text = error if len(error) <= MAX_ERROR_CHARS else error[:MAX_ERROR_CHARS - 3] + "..."
        tags = [RunTag("temper.error", text), RunTag("mlflow.note.content", text)]
    end_time_ms = int(time.time() * 1000)
    reason = "unknown"
    for attempt in range(3):
        try:
            backend = MlflowBackend(handle.tracking_uri, timeout_s=REACH_TIMEOUT_S)
            if tags:
                backend.log_batch(handle.run_id, tags=tags)
            backend.set_terminated(handle.run_id, status=status, end_time_ms=end_time_ms)
            return True
        except Exception as e:  # noqa: BLE001 - reported below, never masks the job's outcome
            reason = short_reason(e)
            if is_rejection(e) or attempt == 2:
                break
            time.sleep(1.0 + attempt)
    log.warning("could not mark MLflow run %s as %s in %s (%s)", handle.run_id, status,
                handle.tracking_uri, reason)
    return False


# ------------------------------------------------------------------------------ helpers


def check_reachable(uri: str, *, timeout_s: float = REACH_TIMEOUT_S) -> None:
    """Fail fast with a TemperError when the tracking store cannot work: for http(s) one quick
    request to the REST API (no retry loop); for sqlite, the database's folder must exist."""
    if uri.startswith("sqlite:///") and uri != "sqlite:///:memory:":
        folder = Path(uri[len("sqlite:///"):].split("?", 1)[0]).parent
        if not folder.is_dir():
            raise TemperError(f"tracking.uri {uri}: folder {folder} does not exist; create it "
                              "or point tracking.uri elsewhere")
        return
    if not is_http_uri(uri):
        return
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        response = http_request(get_default_host_creds(uri), "/api/2.0/mlflow/experiments/search",
                                "POST", max_retries=0, timeout=timeout_s, json={"max_results": 1})
    except Exception as e:  # noqa: BLE001 - every transport problem means the same to the user
        raise TrackingUnreachable(
            f"tracking.uri {uri}: cannot reach the MLflow server ({short_reason(e)}); "
            "start it or set tracking.enabled=false"
        ) from None
    if response.status_code in (401, 403):
        raise TemperError(
            f"tracking.uri {uri}: the MLflow server refused the credentials (HTTP "
            f"{response.status_code}); set MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD "
            "or MLFLOW_TRACKING_TOKEN"
        )
    if response.status_code >= 500:
        raise TrackingUnreachable(f"tracking.uri {uri}: the MLflow server answered HTTP {response.status_code}; "
                                  "check its logs, or set tracking.enabled=false")
    if response.status_code != 200:
        raise TemperError(
            f"tracking.uri {uri}: cannot reach the MLflow server (HTTP {response.status_code} "
            "from its REST API; is this an MLflow server?); start it or set tracking.enabled=false"
        )


def ensure_experiment(client: Any, name: str, *, uri: str, workdir: Path) -> str:
    """The experiment's id, created when missing (local sqlite: artifacts under workdir)."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        location = None
        if uri.startswith("sqlite:"):
            location = (Path(workdir) / "mlartifacts").resolve().as_uri()
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":  # else: created meanwhile
                raise
            experiment = client.get_experiment_by_name(name)
    if experiment.lifecycle_stage == "deleted":
        raise TemperError(
            f"tracking.experiment {name!r} is deleted in {uri}; restore it "
            f"(mlflow experiments restore --experiment-id {experiment.experiment_id}) "
            "or pick another name"
        )
    return experiment.experiment_id


def _run_tags(spec: JobSpec, *, launcher: str, workdir: Path) -> dict[str, str]:
    tags = {
        "temper.version": temper.__version__,
        "temper.launcher": launcher,
        "temper.spec_hash": spec_hash(spec),
        "mlflow.user": _user(),
        "mlflow.source.name": "temper",
    }
    tags.update(_git_tags(workdir))
    # The user's tags may override MLflow's (mlflow.user ...) but not temper.* provenance.
    tags.update({k: v for k, v in spec.tracking.tags.items() if not k.startswith("temper.")})
    return tags


def _git_tags(workdir: Path) -> dict[str, str]:
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=workdir, capture_output=True, text=True,
                                 timeout=5, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return {}
    status = git("status", "--porcelain", "--untracked-files=no")
    tags = {"mlflow.source.git.commit": commit}
    if status is not None:
        tags["temper.git_dirty"] = "true" if status else "false"
    return tags


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry (containers)
        return os.environ.get("USER", "unknown")


def fit_param_value(key: str, value: str) -> str:
    """A param value MLflow accepts: cut to MAX_PARAM_VALUE_CHARS, with a warning, when longer."""
    if len(value) <= MAX_PARAM_VALUE_CHARS:
        return value
    log.warning("param %s is %d characters; MLflow keeps at most %d, truncating (spec.yaml "
                "has the full value)", key, len(value), MAX_PARAM_VALUE_CHARS)
    return value[:MAX_PARAM_VALUE_CHARS - 3] + "..."


def upload_run_folder(handle: RunHandle, folder: Path, *, parts: tuple[str, ...] = ("logs", "profile", "nccl")) -> None:
    """The run folder's rank logs and profiles to the run's artifacts (logs/rank-N.txt, profile/).
    Best effort: the job's outcome never depends on it."""
    from mlflow import MlflowClient

    try:
        client = MlflowClient(tracking_uri=handle.tracking_uri)
        for part in parts:
            sub = folder / part
            if sub.is_dir() and any(sub.iterdir()):
                client.log_artifacts(handle.run_id, str(sub), artifact_path=part)
    except Exception as e:  # noqa: BLE001 - logs are worth a warning, not a failed job
        log.warning("could not upload %s to MLflow run %s (%s)", folder, handle.run_id, short_reason(e))


def record_spec_changes(handle: RunHandle, *, changes: list[str], spec_yaml: str) -> str:
    """A resumed run trained on with a changed spec: the diff as the `temper.spec_changes` tag
    and the new resolved spec as `spec-resume-<k>.yaml` (k-th such resume); returns that name."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=handle.tracking_uri)
    known = [a.path for a in client.list_artifacts(handle.run_id) if a.path.startswith("spec-resume-")]
    name = f"spec-resume-{len(known) + 1}.yaml"
    client.log_text(handle.run_id, spec_yaml, name)
    previous = client.get_run(handle.run_id).data.tags.get("temper.spec_changes")
    text = "; ".join(changes) + f" ({name})"
    tag = f"{previous}\n{text}" if previous else text
    client.set_tag(handle.run_id, "temper.spec_changes", tag[-MAX_ERROR_CHARS:])
    return name
