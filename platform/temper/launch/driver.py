"""The driver: one job from spec to finished MLflow run.

    run_job(spec, launcher=...)
      decide: a new run, or the run to resume (launch/resume.py)
      create the MLflow run (params, spec.yaml, tags), or reopen the resumed one
                                                        -> run_info for the workers
      launcher.launch(job)                              -> rank 0's result
      end the run FINISHED / FAILED (with the error) / KILLED (Ctrl-C)
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

from temper.console import console
from temper.errors import JobFailedError, TemperError
from temper.launch.base import Job, Launcher, LaunchResult
from temper.spec.loader import spec_to_json
from temper.spec.models import JobSpec

log = logging.getLogger(__name__)


@dataclass
class JobOutcome:
    result: LaunchResult
    run_id: str | None
    tracking_uri: str | None


def build_launcher(name: str, *, address: str | None = None) -> Launcher:
    if name == "ray":
        from temper.launch.ray_launcher import RayLauncher

        return RayLauncher(address=address)
    if address:
        raise TemperError(f"--address only applies to --launcher ray, not --launcher {name}")
    if name == "torchrun":
        from temper.launch.torchrun import TorchrunLauncher

        return TorchrunLauncher()
    if name == "inprocess":
        from temper.launch.inprocess import InProcessLauncher

        return InProcessLauncher()
    raise TemperError(f"--launcher {name!r} is not known; accepted: ray, torchrun, inprocess")


def run_job(spec: JobSpec, *, launcher: Launcher, workdir: Path, resume: str | None = None,
            no_resume: bool = False, run_id: str | None = None) -> JobOutcome:
    """Run one job to the end and record it; re-raises KeyboardInterrupt after cleanup."""
    launcher.check(spec)
    from temper.data import preflight_data, with_absolute_paths
    from temper.launch.resume import new_local_run_id, plan_resume

    spec = with_absolute_paths(spec, base=Path.cwd())
    for warning in preflight_data(spec):
        console.print(f"warning: {warning}", markup=False, style="yellow")
    plan = plan_resume(spec, workdir=workdir, resume=resume, no_resume=no_resume, run_id=run_id)
    if plan.note:
        console.print(plan.note, markup=False)
    handle = _open_run(spec, plan=plan, launcher=launcher.name, workdir=workdir)
    run_info = {"run_id": handle.run_id, "tracking_uri": handle.tracking_uri} if handle else {"run_id": None}
    if spec.checkpoint.enabled:  # a resumed run keeps its folder; a new one is named by its run id
        folder = plan.run_dir(plan.run_id or (handle.run_id if handle else new_local_run_id()))
        run_info["checkpoint_dir"] = folder
        if handle is not None and plan.step is None:  # a run's first start: say where it saves
            from temper.tracking.runs import tag_run

            tag_run(handle, {"temper.checkpoint_dir": folder})
    job = Job(spec=spec, spec_json=spec_to_json(spec), run_info=run_info, workdir=workdir)
    status, error = "FAILED", None
    try:
        with sigterm_interrupts():
            result = launcher.launch(job)
        status = "FINISHED"
    except KeyboardInterrupt as e:
        status, error = "KILLED", str(e) or "interrupted by the user (Ctrl-C)"
        console.print(f"[yellow]{error}: stopping the workers...[/yellow]")
        if handle is not None:  # first: a stopped cluster job has seconds before SIGKILL
            from temper.tracking import end_run

            end_run(handle, status=status, error=error)
            handle = None
        launcher.stop()
        raise
    except TemperError as e:
        error = str(e)
        raise
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
        raise JobFailedError(error) from e
    finally:
        launcher.close()
        if handle is not None:
            from temper.tracking import end_run

            end_run(handle, status=status, error=error)
    return JobOutcome(result=result, run_id=handle.run_id if handle else None,
                      tracking_uri=handle.tracking_uri if handle else None)


@contextlib.contextmanager
def sigterm_interrupts():
    """SIGTERM (`temper stop`, Ray's stop_job, a pod deleted) stops the job like Ctrl-C: the
    run is marked KILLED and the workers are stopped. Main thread only (signal rule). Ray's
    driver installs its own SIGTERM handler (exit) in ray.init: the ray launcher enters this
    again once Ray is up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(signum, frame) -> None:
        raise KeyboardInterrupt("stopped by SIGTERM (temper stop, or the cluster)")

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _open_run(spec: JobSpec, *, plan, launcher: str, workdir: Path):
    """The job's MLflow run: the resumed one reopened, or a new one (None: tracking off)."""
    if not spec.tracking.enabled:
        return None
    from temper.tracking import start_run
    from temper.tracking.runs import continue_run

    if plan.run_id is not None and not plan.run_id.startswith("local-"):
        handle = continue_run(spec, run_id=plan.run_id, workdir=workdir, resumed=plan.step is not None)
    else:
        handle = start_run(spec, launcher=launcher, workdir=workdir)
    _announce(handle)
    return handle


def _announce(handle) -> None:
    console.print(f"MLflow run [bold]{handle.run_id}[/bold] in {handle.tracking_uri}")
    if handle.ui_url:
        console.print(f"  view it at {handle.ui_url}")
    elif handle.tracking_uri.startswith("sqlite:"):
        console.print(f"  view it with: mlflow ui --backend-store-uri {handle.tracking_uri}")
