"""The Launcher interface: start the workers for one job and return rank 0's result."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from temper.run_info import RunInfo
from temper.spec.job import JobSpec

#: Seconds the workers get to stop at their next logging step after Ctrl-C, flushing their
#: metrics, before the launcher kills them.
STOP_GRACE_S = 60.0


@dataclass(frozen=True)
class Job:
    """Everything a worker needs, in plain data: the resolved spec and the MLflow run."""

    spec: JobSpec
    spec_json: str
    run_info: RunInfo
    workdir: Path

    def payload(self) -> dict[str, Any]:
        """What every worker receives (plain data: JSON for torchrun, pickled for Ray)."""
        return {"spec_json": self.spec_json, "run_info": self.run_info.to_dict()}


@dataclass
class LaunchResult:
    steps: int
    metrics: dict[str, float] = field(default_factory=dict)
    loss_history: list[tuple[int, float]] = field(default_factory=list)
    preempted: bool = False  # the workers saved and stopped on a SIGTERM (fault.preemption_grace_s)
    checkpoint_step: int | None = None  # preempted: the step the next run resumes from


class Launcher(ABC):
    name: str

    def check(self, spec: JobSpec) -> None:
        """Reject a spec this launcher cannot run, before any run is recorded."""

    @abstractmethod
    def launch(self, job: Job) -> LaunchResult:
        """Run the job's workers to completion; raise JobFailedError with the root cause."""

    def publish_run_id(self, run_id: str) -> None:
        """The driver created the MLflow run after the workers started (the server was down):
        hand its id to rank 0. The driver also writes it to `RunInfo.run_id_file`, which
        is enough for workers on this machine; launchers with remote workers override this."""

    def preempt(self) -> None:
        """The driver got SIGTERM with fault.preemption_grace_s > 0: ask every worker to save
        at its next step and exit (launch() then returns preempted). The default stops the
        job like Ctrl-C."""
        raise KeyboardInterrupt("stopped by SIGTERM (temper stop, or the cluster)")

    def stop(self) -> None:
        """Stop the workers now (Ctrl-C); must be safe to call at any time."""

    def close(self) -> None:
        """Release what `launch` started (a local Ray instance, temp files)."""
