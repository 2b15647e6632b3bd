"""`temper submit --to http://HEAD:8265`: a job on a Ray cluster through Ray's Job Submission API.

    submit: stage the working directory (the user's cwd, minus caches, stores and big files)
            plus the resolved spec as temper-job.yaml -> runtime_env working_dir; forward the
            MLflow / AWS / TEMPER_* environment; entrypoint `temper run temper-job.yaml
            --run-id <the MLflow run created here>`.
    status / logs / stop / list: the same job, by its submission id (`temper-<name>-<8 hex>`).

`ray.job_submission` is imported lazily (it needs ray[default], which temper's ray pin has).
"""

from __future__ import annotations

import asyncio
import fnmatch
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from temper.console import console
from temper.errors import TemperError
from temper.launch.submit.base import (
    SPACE_FILE,
    SPEC_FILE,
    STATES,
    JobStatus,
    Submission,
    check_cluster_tracking,
    entrypoint,
    open_submission_run,
)
from temper.spec.job import JobSpec

log = logging.getLogger(__name__)

#: Left out of the uploaded working directory (names or glob patterns, at any depth).
EXCLUDED = (".venv", "venv", ".git", "mlruns", "mlartifacts", "temper-runs", ".tools", "__pycache__",
            "*.db", ".temper", ".pytest_cache", ".mypy_cache", ".ruff_cache", "node_modules")
#: Files bigger than this stay behind (data belongs on shared storage, not in the upload).
MAX_FILE_BYTES = 50 * 1024 * 1024
#: Environment forwarded to the job (driver and workers) when set here.
FORWARDED_NAMES = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                   "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_INSECURE_TLS",
                   "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S")  # elastic: how long a lost size is waited for
FORWARDED_PREFIXES = ("AWS_", "TEMPER_")
#: Seconds Ray waits after SIGTERM before SIGKILL on `temper stop` (Ray's default is 3): the
#: driver marks the MLflow run KILLED and stops the workers in that time.
STOP_WAIT_S = 30
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class RayJobsTarget:
    """One Ray cluster, addressed by its dashboard URL (the Jobs API, port 8265 by default)."""

    def __init__(self, address: str) -> None:
        self.address = address.rstrip("/")
        self._client_obj: Any = None

    @classmethod
    def from_address(cls, address: str) -> RayJobsTarget:
        """An http(s) address: the head's dashboard (build_target checked the scheme)."""
        return cls(address)

    # ------------------------------------------------------------------ submit

    def submit(self, spec: JobSpec, *, workdir: Path, run_id: str | None = None,
               dry_run: bool = False, space_yaml: str | None = None) -> Submission:
        """`space_yaml`: a search (`temper submit --tune`): the cluster runs `temper tune`, which
        creates the search's parent run itself."""
        job_id = submission_id_for(spec.name)
        space_file = SPACE_FILE if space_yaml is not None else None
        if dry_run:
            request = self._request(spec, job_id=job_id, run_id=run_id, working_dir=str(workdir),
                                    space_file=space_file)
            env = request["runtime_env"]["env_vars"]
            env.update({k: "***" for k in env if re.search("PASSWORD|SECRET|TOKEN|KEY", k)})
            request["not_uploaded"] = [*EXCLUDED, f"files over {MAX_FILE_BYTES >> 20} MiB"]
            request["added"] = f"{SPEC_FILE} (the resolved spec)" + (f", {SPACE_FILE} (the search space)"
                                                                      if space_file else "")
            return Submission(job_id=job_id, target=self.address, run_id=run_id,
                              manifest=json.dumps(request, indent=2) + "\n")
        client = self._client()  # reachable before an MLflow run is created for nothing
        _warn_local_checkpoints(spec)
        handle = None
        if space_yaml is not None:
            check_cluster_tracking(spec, workdir=workdir)
        elif run_id is None:
            handle = open_submission_run(spec, workdir=workdir, target=self.address)
            run_id = handle.run_id if handle else None
        if handle is not None:  # the cluster logs where the run was created
            spec = spec.model_copy(update={"tracking": spec.tracking.model_copy(
                update={"uri": handle.tracking_uri})})
        try:
            with tempfile.TemporaryDirectory(prefix="temper-submit-") as staging:
                stage_workdir(workdir, Path(staging), spec=spec)
                if space_yaml is not None:
                    (Path(staging) / SPACE_FILE).write_text(space_yaml)
                request = self._request(spec, job_id=job_id, run_id=run_id, working_dir=staging,
                                        space_file=space_file)
                job_id = client.submit_job(**request)
        except BaseException as e:
            if handle is not None:
                from temper.tracking import end_run

                end_run(handle, status="FAILED", error=f"Ray at {self.address} refused the job: {_reason(e)}")
            if isinstance(e, TemperError | KeyboardInterrupt):
                raise
            raise TemperError(f"--to {self.address}: Ray refused the job ({_reason(e)}); fix what it "
                              "names (a big working directory: move data to shared storage or list it "
                              "in .rayignore) and submit again") from None
        return Submission(job_id=job_id, target=self.address, run_id=run_id,
                          run_url=handle.ui_url if handle else None)

    def _request(self, spec: JobSpec, *, job_id: str, run_id: str | None, working_dir: str,
                 space_file: str | None = None) -> dict:
        env = forwarded_env()
        env.setdefault("RAY_JOB_STOP_WAIT_TIME_S", str(STOP_WAIT_S))
        metadata = {"temper.spec": spec.name}
        if run_id:
            metadata["temper.run_id"] = run_id
        return {"entrypoint": entrypoint(run_id=run_id, space_file=space_file), "submission_id": job_id,
                "runtime_env": {"working_dir": working_dir, "env_vars": env}, "metadata": metadata}

    # ------------------------------------------------------------------ follow-ups

    def status(self, job_id: str) -> JobStatus:
        return _status_of(self._call("get_job_info", job_id))

    def logs(self, job_id: str, *, follow: bool = False) -> Iterator[str]:
        if not follow:
            yield self._call("get_job_logs", job_id)
            return
        self.status(job_id)  # an unknown id fails here, with the usual one line
        try:
            yield from self._tail(job_id)
        except RuntimeError as e:  # the websocket broke: finish by polling
            log.info("log stream of %s ended early (%s); polling", job_id, e)
            yield from self._poll_logs(job_id)

    def _tail(self, job_id: str) -> Iterator[str]:
        """Ray's log websocket, as a plain iterator; the server closes it when the job ends."""
        loop = asyncio.new_event_loop()
        stream = self._client().tail_job_logs(job_id)
        try:
            while True:
                try:
                    yield loop.run_until_complete(stream.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            loop.run_until_complete(stream.aclose())
            loop.close()

    def _poll_logs(self, job_id: str) -> Iterator[str]:
        seen = 0
        while True:
            done = self.status(job_id).state in TERMINAL
            text = self._call("get_job_logs", job_id)
            if len(text) > seen:
                yield text[seen:]
                seen = len(text)
            if done:
                return
            time.sleep(1.0)

    def stop(self, job_id: str, *, wait_s: float = STOP_WAIT_S + 15) -> JobStatus:
        self._call("stop_job", job_id)
        deadline = time.monotonic() + wait_s
        status = self.status(job_id)
        while status.state not in TERMINAL and time.monotonic() < deadline:
            time.sleep(0.5)
            status = self.status(job_id)
        return status

    def list(self) -> list[JobStatus]:
        jobs = [_status_of(d) for d in self._call("list_jobs")]
        return sorted(jobs, key=lambda s: s.start_time or 0.0, reverse=True)

    # ------------------------------------------------------------------ the client

    def _client(self):
        if self._client_obj is None:
            from temper.launch.ray_launcher import use_token_auth_if_available

            use_token_auth_if_available()  # a token-auth cluster refuses requests without it
            from ray.job_submission import JobSubmissionClient

            for name in ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk",
                         "ray._private.runtime_env.packaging"):  # "Uploading package ..." lines
                logging.getLogger(name).setLevel(logging.WARNING)

            try:
                self._client_obj = JobSubmissionClient(self.address)
            except Exception as e:  # noqa: BLE001 - ConnectionError, RuntimeError (404: not Ray)
                raise TemperError(
                    f"--to {self.address}: no Ray Jobs API answers there ({_reason(e)}); check the "
                    "address (the head's dashboard, port 8265 by default) and that the head runs "
                    "the dashboard (`ray start --head --dashboard-host=0.0.0.0`)") from None
        return self._client_obj

    def _call(self, method: str, *args: str) -> Any:
        try:
            return getattr(self._client(), method)(*args)
        except TemperError:
            raise
        except Exception as e:  # noqa: BLE001 - the SDK raises RuntimeError with the HTTP answer
            reason = _reason(e)
            if args and "404" in reason:
                raise TemperError(f"job {args[0]} is not on the Ray cluster at {self.address}; "
                                  f"`temper list --to {self.address}` shows its jobs") from None
            raise TemperError(f"--to {self.address}: {method} failed ({reason}); check the "
                              "cluster's dashboard log (/tmp/ray/session_latest/logs/dashboard.log)") from None


def submission_id_for(name: str) -> str:
    """`temper-<name>-<8 hex>`, in characters every Ray version and URL accept."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40] or "job"
    return f"temper-{slug}-{uuid.uuid4().hex[:8]}"


def forwarded_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if k in FORWARDED_NAMES or k.startswith(FORWARDED_PREFIXES)}


def stage_workdir(source: Path, dest: Path, *, spec: JobSpec) -> list[str]:
    """Copy `source` into `dest` for upload, minus EXCLUDED and files over MAX_FILE_BYTES, and
    write the resolved spec as temper-job.yaml. Returns the relative paths left out for size."""
    from temper.spec import spec_to_yaml

    skipped: list[str] = []
    source = Path(source).resolve()
    for folder, dirs, files in os.walk(source):
        dirs[:] = [d for d in dirs if not _excluded(d)]
        rel = Path(folder).relative_to(source)
        for name in files:
            path = Path(folder) / name
            if _excluded(name) or not path.is_file():
                continue
            if path.stat().st_size > MAX_FILE_BYTES:
                skipped.append(str(rel / name))
                continue
            (dest / rel).mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest / rel / name)
    (dest / SPEC_FILE).write_text(spec_to_yaml(spec))
    if skipped:
        console.print(f"warning: not uploaded (over {MAX_FILE_BYTES >> 20} MiB; put data on shared "
                      f"storage): {', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}",
                      markup=False, style="yellow")
    return skipped


def _warn_local_checkpoints(spec: JobSpec) -> None:
    folder = spec.checkpoint.dir
    if spec.checkpoint.enabled and (folder is None or not (folder.startswith("/") or "://" in folder)):
        console.print(f"warning: checkpoint.dir is {folder or 'the default'}: on the cluster that is inside "
                      "the job's temporary working directory, so a resubmitted job cannot resume; set "
                      "checkpoint.dir to shared storage (s3://... or a path every node mounts)",
                      markup=False, style="yellow")


def _excluded(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in EXCLUDED)


def _status_of(details: Any) -> JobStatus:
    state = str(getattr(details.status, "value", details.status))
    extra = {"ray_job_id": details.job_id or "", "entrypoint": details.entrypoint or ""}
    extra.update({k: str(v) for k, v in (details.metadata or {}).items() if k.startswith("temper.")})
    return JobStatus(
        job_id=details.submission_id or details.job_id or "",
        state=state if state in STATES else "PENDING",
        message=details.message or "",
        start_time=details.start_time / 1000 if details.start_time else None,
        end_time=details.end_time / 1000 if details.end_time else None,
        extra=extra,
    )


def _reason(error: BaseException) -> str:
    """One line of the SDK's error; for a server-side traceback, its status and last line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    if "Traceback (most recent call last)" in text and len(lines) > 1:
        status = re.search(r"status code \d+", text)
        errors = [line for line in lines if re.match(r"[\w.]+(Error|Exception): ", line)] or lines
        text = f"{status.group(0) + ': ' if status else ''}{errors[-1].rstrip('.')}"
    return text if len(text) <= 300 else text[:297] + "..."
