"""In-process launcher: one worker in the CLI's own process (no Ray, no subprocess).

For debugging with a plain debugger, and for machines where Ray is absent.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from temper.dist import free_port
from temper.errors import TemperError
from temper.launch.base import Job, Launcher, LaunchResult
from temper.spec.job import JobSpec


@contextmanager
def _worker_env(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


class InProcessLauncher(Launcher):
    name = "inprocess"

    def check(self, spec: JobSpec) -> None:
        r = spec.resources
        if r.workers != 1 and not (r.min_workers is not None and r.min_workers <= 1):  # elastic: runs at 1
            raise TemperError(
                f"resources.workers: --launcher inprocess runs exactly 1 worker, got "
                f"{spec.resources.workers}; set resources.workers=1 or use --launcher torchrun"
            )

    def launch(self, job: Job) -> LaunchResult:
        self.check(job.spec)
        from temper.runtime.entry import run_worker, setup_logging

        env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
        with _worker_env(**env):
            setup_logging()
            result = run_worker(job.spec_json, job.run_info)
        return LaunchResult(steps=result.steps, metrics=result.metrics, loss_history=result.loss_history,
                            preempted=result.preempted, checkpoint_step=result.checkpoint_step)
