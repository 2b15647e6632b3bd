"""Driver side: start workers (Ray, torchrun, in-process) and record the job in MLflow."""

from temper.launch.base import Job, Launcher, LaunchResult
from temper.launch.driver import JobOutcome, run_job
from temper.launch.launchers import build_launcher

__all__ = ["Job", "JobOutcome", "LaunchResult", "Launcher", "build_launcher", "run_job"]
