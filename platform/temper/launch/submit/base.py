"""What every `temper submit` target shares: the SubmitTarget interface, its results
(Submission, JobStatus, STATES), the cluster entrypoint and the submitter's MLflow run.

Both targets run the same entrypoint on the cluster: `temper run <spec> --run-id <id>`, where the
spec is the resolved spec written as YAML next to the job and <id> is the MLflow run the
submitter created (so `submit` can print its link). A retried job (Ray Jobs resubmission,
a RayJob's backoffLimit) runs the same entrypoint again: `--run-id` reopens that run and
resumes from its newest committed checkpoint in checkpoint.dir (shared storage on a cluster).
"""

from __future__ import annotations

import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from temper.errors import TemperError
from temper.spec.job import JobSpec

#: File name of the resolved spec inside the job's working directory on the cluster.
SPEC_FILE = "temper-job.yaml"

#: File name of a search's space file (`temper submit --tune`) beside it.
SPACE_FILE = "temper-space.yaml"

#: Job states, the same words for both targets.
STATES = ("PENDING", "RUNNING", "SUCCEEDED", "FAILED", "STOPPED")


@dataclass(frozen=True)
class Submission:
    job_id: str
    target: str  # the --to address it went to
    run_id: str | None = None  # the MLflow run created for it (None: tracking off / dry run)
    run_url: str | None = None  # the MLflow UI link (None: not an http tracking server)
    manifest: str | None = None  # dry run: what would be sent (YAML for k8s, JSON for Ray)


@dataclass(frozen=True)
class JobStatus:
    job_id: str
    state: str  # one of STATES
    message: str = ""  # the cluster's own words (error, reason)
    start_time: float | None = None  # unix seconds
    end_time: float | None = None
    extra: dict[str, str] = field(default_factory=dict)  # target-specific (Ray job id, pod...)


class SubmitTarget(Protocol):
    """One cluster. Every method raises TemperError (one line, with the fix) for an
    unreachable address, an unknown job id or a rejected job."""

    address: str

    @classmethod
    def from_address(cls, address: str) -> SubmitTarget:
        """The target for a `--to` address of its kind (build_target picks the kind)."""
        ...

    def submit(self, spec: JobSpec, *, workdir: Path, run_id: str | None,
               dry_run: bool = False) -> Submission: ...

    def status(self, job_id: str) -> JobStatus: ...

    def logs(self, job_id: str, *, follow: bool = False) -> Iterator[str]: ...

    def stop(self, job_id: str) -> JobStatus: ...

    def list(self) -> list[JobStatus]: ...


def entrypoint(*, spec_file: str = SPEC_FILE, run_id: str | None, space_file: str | None = None) -> str:
    """The shell command a cluster runs for the job (in the job's working directory); with
    `space_file`, the search `temper tune` (it creates its own parent run there)."""
    if space_file:
        return shlex.join(["temper", "tune", spec_file, "--space", space_file])
    args = ["temper", "run", spec_file]
    if run_id:
        args += ["--run-id", run_id]
    return shlex.join(args)


def open_submission_run(spec: JobSpec, *, workdir: Path, target: str):
    """Create the job's MLflow run before the cluster starts it, so that `submit` can print
    its link and every (re)start of the job logs into it (`--run-id`). Returns a
    temper.tracking.RunHandle, or None when tracking is off. The tracking server must be
    reachable from here and from the cluster: an http(s) MLflow server."""
    if not spec.tracking.enabled:
        return None
    from temper.tracking.runs import start_run

    check_cluster_tracking(spec, workdir=workdir)
    return start_run(spec, launcher=f"submit:{target}", workdir=workdir)


def check_cluster_tracking(spec: JobSpec, *, workdir: Path) -> None:
    """Tracking on, through an http(s) MLflow server (a cluster cannot write to a local file)."""
    from temper.tracking.backend import is_http_uri
    from temper.tracking.runs import resolve_tracking_uri

    uri = resolve_tracking_uri(spec.tracking.uri, workdir=workdir)
    if spec.tracking.enabled and not is_http_uri(uri):
        raise TemperError(
            f"tracking.uri {uri}: a job on a cluster needs an MLflow server that the cluster and "
            "this machine both reach; set tracking.uri=http://... (or $MLFLOW_TRACKING_URI), or "
            "tracking.enabled=false")
