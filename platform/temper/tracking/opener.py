"""The driver's run when the tracking server is down at start: train now, record later.

    RunOpener.open()   one quick try (start_run, or continue_run for a resumed job)
                       -> RunHandle: the usual path
                       -> unreachable: None; a background thread retries with backoff
                          (1 s, 2 s ... 30 s) while the workers train and rank 0 buffers
    on_open(handle)    called once, from that thread, when the run exists: the launcher
                       hands the run id to rank 0's tracker (a file, or Ray's progress actor)
    wait(timeout_s)    at the end of the job: the run, or None if the server never came back

Wrong credentials, a deleted experiment or a non-MLflow server are errors at once
(TemperError), never retried: only an unreachable server is waited out.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from temper.spec.job import JobSpec
from temper.tracking.runs import RunHandle, TrackingUnreachable, continue_run, start_run

log = logging.getLogger(__name__)


class RunOpener:
    def __init__(self, spec: JobSpec, *, launcher: str, workdir: Path, continue_id: str | None = None,
                 resumed: bool = True, backoff_s: tuple[float, float] = (1.0, 30.0),
                 extra_tags: dict[str, str] | None = None) -> None:
        self.spec, self.launcher, self.workdir = spec, launcher, workdir
        self.extra_tags = dict(extra_tags or {})
        self.continue_id, self.resumed = continue_id, resumed
        self.backoff_s = backoff_s
        self.handle: RunHandle | None = None
        self.error: BaseException | None = None  # a non-retryable failure of the background tries
        self.unreachable_since: float | None = None
        self.unreachable_s = 0.0
        self._on_open: Callable[[RunHandle], None] | None = None
        self._opened = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def deferred(self) -> bool:
        return self._thread is not None

    def open(self, *, on_open: Callable[[RunHandle], None]) -> RunHandle | None:
        """The run now, or None (server unreachable: retried in the background)."""
        self._on_open = on_open
        try:
            self.handle = self._try()
            return self.handle
        except TrackingUnreachable as e:
            self.unreachable_since = time.monotonic()
            log.debug("tracking server unreachable at start: %s", e)
        self._thread = threading.Thread(target=self._retry, name="temper-run-opener", daemon=True)
        self._thread.start()
        return None

    def wait(self, timeout_s: float) -> RunHandle | None:
        """Wait up to `timeout_s` for a deferred run; stop retrying afterwards."""
        if self._thread is not None:
            self._opened.wait(timeout_s)
            self._stop.set()
            self._thread.join(5.0)
        if self.unreachable_since is not None and self.handle is None:
            self.unreachable_s = time.monotonic() - self.unreachable_since
        return self.handle

    def _try(self) -> RunHandle:
        if self.continue_id is not None:
            return continue_run(self.spec, run_id=self.continue_id, workdir=self.workdir, resumed=self.resumed)
        return start_run(self.spec, launcher=self.launcher, workdir=self.workdir, extra_tags=self.extra_tags)

    def _retry(self) -> None:
        delay = self.backoff_s[0]
        while not self._stop.wait(delay):
            try:
                handle = self._try()
            except TrackingUnreachable:
                delay = min(delay * 2, self.backoff_s[1])
                continue
            except BaseException as e:  # noqa: BLE001 - reported by the driver at the end
                self.error = e
                log.warning("creating the MLflow run failed: %s", e)
                return
            self.unreachable_s = time.monotonic() - (self.unreachable_since or time.monotonic())
            self.handle = handle
            try:
                if self._on_open is not None:
                    self._on_open(handle)
            finally:
                self._opened.set()
            return
