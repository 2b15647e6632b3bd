"""The driver: one job from spec to finished MLflow run.

    run_job(spec, launcher=...)
      create the MLflow run (params, spec.yaml, tags)  -> run_info for the workers
      launcher.launch(job)                              -> rank 0's result
      end the run FINISHED / FAILED (with the error) / KILLED (Ctrl-C)
"""

from __future__ import annotations

import logging
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


def run_job(spec: JobSpec, *, launcher: Launcher, workdir: Path) -> JobOutcome:
    """Run one job to the end and record it; re-raises KeyboardInterrupt after cleanup."""
    launcher.check(spec)
    from temper.data import preflight_data, with_absolute_paths

    spec = with_absolute_paths(spec, base=Path.cwd())
    for warning in preflight_data(spec):
        console.print(f"warning: {warning}", markup=False, style="yellow")
    handle = None
    if spec.tracking.enabled:
        from temper.tracking import start_run

        handle = start_run(spec, launcher=launcher.name, workdir=workdir)
        _announce(handle)
    run_info = {"run_id": handle.run_id, "tracking_uri": handle.tracking_uri} if handle else None
    job = Job(spec=spec, spec_json=spec_to_json(spec), run_info=run_info, workdir=workdir)
    status, error = "FAILED", None
    try:
        result = launcher.launch(job)
        status = "FINISHED"
    except KeyboardInterrupt:
        status, error = "KILLED", "interrupted by the user (Ctrl-C)"
        console.print("[yellow]interrupted: stopping the workers...[/yellow]")
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


def _announce(handle) -> None:
    console.print(f"MLflow run [bold]{handle.run_id}[/bold] in {handle.tracking_uri}")
    if handle.ui_url:
        console.print(f"  view it at {handle.ui_url}")
    elif handle.tracking_uri.startswith("sqlite:"):
        console.print(f"  view it with: mlflow ui --backend-store-uri {handle.tracking_uri}")
