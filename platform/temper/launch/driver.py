"""The driver: one job from spec to finished MLflow run.

    run_job(spec, launcher=...)
      decide: a new run, or the run to resume (checkpoint/resume.py)
      create the MLflow run (params, spec.yaml, tags), or reopen the resumed one
                                                        -> run_info for the workers
      launcher.launch(job)                              -> rank 0's result
      end the run FINISHED / FAILED (with the error) / KILLED (Ctrl-C)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from temper.console import console
from temper.errors import JobFailedError, JobPreemptedError, TemperError, WorkerFailedError
from temper.launch.base import Job, Launcher, LaunchResult
from temper.launch.signals import sigterm_interrupts
from temper.run_info import RunInfo
from temper.spec.job import JobSpec
from temper.spec.loader import spec_to_json

log = logging.getLogger(__name__)


@dataclass
class JobOutcome:
    result: LaunchResult
    run_id: str | None
    tracking_uri: str | None


def run_job(spec: JobSpec, *, launcher: Launcher, workdir: Path, resume: str | None = None,
            no_resume: bool = False, run_id: str | None = None,
            extra_tags: dict[str, str] | None = None) -> JobOutcome:
    """Run one job to the end and record it; re-raises KeyboardInterrupt after cleanup.
    `extra_tags` go on a new run (a pipeline's parent run id)."""
    launcher.check(spec)
    from temper.checkpoint.resume import plan_resume
    from temper.data import Note, preflight_data, with_absolute_paths
    from temper.launch.lifecycle import plan_init_from

    spec = with_absolute_paths(spec, base=Path.cwd())
    for message in preflight_data(spec):
        if isinstance(message, Note):
            console.print(message, markup=False)
        else:
            console.print(f"warning: {message}", markup=False, style="yellow")
    plan = plan_resume(spec, workdir=workdir, resume=resume, no_resume=no_resume, run_id=run_id)
    if plan.note:
        console.print(plan.note, markup=False)
    init = plan_init_from(spec, workdir=workdir)  # a pretrained backbone that does not fit fails here
    tags = {**_data_tags(spec), **(init.tags if init else {}), **(extra_tags or {})}
    tracking = _Tracking.begin(spec, plan=plan, launcher=launcher, workdir=workdir, extra_tags=tags)
    run_info = tracking.open_run_folder(plan)  # rank logs, profiles; a resume's spec changes recorded
    if init is not None:
        run_info = run_info.with_(init_from=init.location)
    if spec.checkpoint.enabled:  # a resumed run keeps its folder; a new one is named by its run id
        folder = plan.run_dir(plan.run_id or tracking.folder_name)
        run_info = run_info.with_(checkpoint_dir=folder)
        tracking.checkpoint_dir = folder
        if tracking.handle is not None and (plan.step is None or plan.mlflow_run_id is None):
            # a run's first start in this folder: say where it saves
            tracking.tag_checkpoint_dir(tracking.handle)
    job = Job(spec=spec, spec_json=spec_to_json(spec), run_info=run_info, workdir=workdir)
    status, error = "FAILED", None
    try:
        with sigterm_interrupts(launcher.preempt if spec.fault.preemption_grace_s > 0 else None):
            result = launcher.launch(job)
        status = "KILLED" if result.preempted else "FINISHED"  # preempted: resumable, never FAILED
        if result.preempted:  # the run's temper.error / note say so (`temper stop` sends SIGTERM too)
            error = _preempted_message(result)
        if spec.tracking.register_model and tracking.handle is not None and not result.preempted:
            from temper.launch.lifecycle import register_run_model

            register_run_model(spec, handle=tracking.handle, checkpoint_dir=tracking.checkpoint_dir)
    except KeyboardInterrupt as e:
        status, error = "KILLED", str(e) or "interrupted by the user (Ctrl-C)"
        console.print(f"[yellow]{error}: stopping the workers...[/yellow]")
        tracking.finish(status=status, error=error)  # first: a stopped cluster job has seconds before SIGKILL
        launcher.stop()
        raise
    except WorkerFailedError as e:
        error = str(e)
        if e.traceback:  # the root cause's own traceback, once (every rank's is in its log)
            console.print(e.traceback.rstrip(), markup=False, style="dim")
        raise
    except TemperError as e:
        error = str(e)
        raise
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
        raise JobFailedError(error) from e
    finally:
        launcher.close()
        handle = tracking.finish(status=status, error=error)
    if result.preempted:
        raise JobPreemptedError(error)
    return JobOutcome(result=result, run_id=handle.run_id if handle else None,
                      tracking_uri=handle.tracking_uri if handle else None)


def _preempted_message(result: LaunchResult) -> str:
    where = f"step {result.checkpoint_step}" if result.checkpoint_step else "the start (no checkpoint yet)"
    return (f"preempted at step {result.steps} (SIGTERM): the run resumes from {where}; the MLflow run is "
            "KILLED with tag temper.preempted; run the same command again to continue")


def _data_tags(spec: JobSpec) -> dict[str, str]:
    if not spec.tracking.enabled:
        return {}
    from temper.launch.lifecycle import data_manifest_tags

    return data_manifest_tags(spec.data.model_dump(mode="json"))


class _Tracking:
    """The job's MLflow run from the driver's side: opened now, or (server down) once it
    answers while the workers already train; ended with the job's status."""

    def __init__(self, spec: JobSpec, *, launcher: Launcher, workdir: Path) -> None:
        self.spec, self.launcher, self.workdir = spec, launcher, workdir
        self.opener = None
        self.handle = None
        self.run_info = RunInfo()
        self.folder_name: str = ""
        self.checkpoint_dir: str | None = None
        self.run_folder: Path | None = None  # rank logs and profiles, uploaded at the end
        self._finished = False

    @classmethod
    def begin(cls, spec: JobSpec, *, plan, launcher: Launcher, workdir: Path,
              extra_tags: dict[str, str] | None = None) -> _Tracking:
        from temper.checkpoint.resume import new_local_run_id

        self = cls(spec, launcher=launcher, workdir=workdir)
        if not spec.tracking.enabled:
            self.folder_name = new_local_run_id()
            return self
        from temper.tracking.opener import RunOpener
        from temper.tracking.runs import resolve_tracking_uri
        from temper.tracking.spool import default_spool_root

        continue_id = plan.mlflow_run_id
        self.opener = RunOpener(spec, launcher=launcher.name, workdir=workdir, continue_id=continue_id,
                                resumed=plan.step is not None, extra_tags=extra_tags)
        self.handle = self.opener.open(on_open=self._opened_late)
        uri = resolve_tracking_uri(spec.tracking.uri, workdir=workdir)
        known = self.handle.run_id if self.handle else continue_id
        self.folder_name = known or f"pending-{new_local_run_id()[len('local-'):]}"
        spool = Path(spec.tracking.spool_dir or default_spool_root()) / self.folder_name
        self.run_info = RunInfo(run_id=known, tracking_uri=uri, spool_dir=str(spool),
                                experiment=spec.tracking.experiment, run_name=spec.name)
        if self.handle is not None:
            _announce(self.handle)
        else:
            self.run_info = self.run_info.with_(run_id_file=str(spool / "run-id"))
            console.print(f"[yellow]warning:[/yellow] MLflow at {uri} is unreachable; training starts anyway. "
                          f"The run is {'reopened' if continue_id else 'created'} when the server answers; "
                          f"until then rank 0 buffers metrics (overflow on disk in {spool}).")
        return self

    def _opened_late(self, handle) -> None:
        """From the opener's thread: the server answers; tell rank 0 the run id."""
        Path(self.run_info.run_id_file).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(self.run_info.run_id_file + ".tmp")
        tmp.write_text(handle.run_id)
        tmp.replace(self.run_info.run_id_file)
        self.launcher.publish_run_id(handle.run_id)
        if self.checkpoint_dir is not None:
            self.tag_checkpoint_dir(handle)
        console.print(f"MLflow at {handle.tracking_uri} answers after "
                      f"{self.opener.unreachable_s:.1f} s: run [bold]{handle.run_id}[/bold]")
        _announce(handle)

    def open_run_folder(self, plan) -> RunInfo:
        """The run folder (.temper/runs/<run>/: rank logs, profiles, uploaded at the end) in the
        workers' RunInfo; a resume that carries spec changes records them in the run now."""
        self.run_folder = self.workdir / ".temper" / "runs" / (plan.run_id or self.folder_name)
        if plan.changes and self.handle is not None:
            self.record_spec_changes(plan.changes)
        return self.run_info.with_(run_folder=str(self.run_folder))

    def record_spec_changes(self, changes: tuple[str, ...]) -> None:
        """A resume that trains on with changed values: say so in the run (tag + spec artifact)."""
        from temper.spec.loader import spec_to_yaml
        from temper.tracking.runs import record_spec_changes

        try:
            name = record_spec_changes(self.handle, changes=list(changes), spec_yaml=spec_to_yaml(self.spec))
            console.print(f"recorded the changed spec in the run: tag temper.spec_changes, {name}", markup=False)
        except Exception as e:  # noqa: BLE001 - the run still trains; the warning says what is missing
            log.warning("could not record the spec changes in MLflow run %s: %s", self.handle.run_id, e)

    def tag_checkpoint_dir(self, handle) -> None:
        from temper.tracking.runs import tag_run

        try:
            tag_run(handle, {"temper.checkpoint_dir": self.checkpoint_dir})
            if self.checkpoint_dir.rstrip("/").rsplit("/", 1)[-1].startswith("pending-"):
                from temper.checkpoint.resume import write_run_marker

                write_run_marker(self.checkpoint_dir, handle.run_id, spec=self.spec)  # for a resume
        except Exception as e:  # noqa: BLE001 - a tag is not worth failing the job for
            log.warning("could not tag run %s with its checkpoint folder: %s", handle.run_id, e)

    def finish(self, *, status: str, error: str | None):
        """End the run with the job's status; a run never created is reported with its spool.
        Once: later calls return the same handle."""
        if self.opener is None or self._finished:
            return self.handle
        self._finished = True
        handle = self.opener.wait(self.spec.tracking.close_timeout_s)
        if handle is not None:
            from temper.tracking import end_run
            from temper.tracking.runs import upload_run_folder

            if self.run_folder is not None:
                upload_run_folder(handle, self.run_folder)
            end_run(handle, status=status, error=error)
            return handle
        from temper.tracking.spool import Spool

        spool = Spool(self.run_info.spool_dir, max_bytes=0)
        if spool.folder.is_dir():
            from temper.spec.loader import spec_to_yaml

            spool.write_meta({"status": status, "error": error, "launcher": self.launcher.name})
            (spool.folder / "spec.yaml").write_text(spec_to_yaml(self.spec))
        reason = f" ({self.opener.error})" if self.opener.error else ""
        console.print(
            f"[yellow]warning:[/yellow] no MLflow run was recorded: {self.run_info.tracking_uri} stayed "
            f"unreachable for the whole job ({self.opener.unreachable_s:.0f} s){reason}. Its metrics are kept "
            f"in {spool.folder}; send them with: temper runs sync {spool.folder}", soft_wrap=True)
        return None


def _announce(handle) -> None:
    console.print(f"MLflow run [bold]{handle.run_id}[/bold] in {handle.tracking_uri}")
    if handle.ui_url:
        console.print(f"  view it at {handle.ui_url}")
    elif handle.tracking_uri.startswith("sqlite:"):
        console.print(f"  view it with: mlflow ui --backend-store-uri {handle.tracking_uri}")
