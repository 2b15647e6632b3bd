"""Rank 0's metrics into the driver's MLflow run, without ever slowing the training step.

    log_metrics()  -> append (key, value, step, timestamp_ms) to a deque in memory   [microseconds]
    sender thread  -> LogBatch of <= 1000 metrics, in order, every flush_every_s
                      (sooner when >= 1000 are pending); on failure: keep them, back off
                      0.5 s, 1 s, 2 s ... 30 s, retry
                   -> more than max_buffered waiting in memory: the oldest go to disk
                      (temper.tracking.spool), delivered first once the server is back;
                      beyond tracking.max_spill_mb on disk: the oldest are dropped (warned)
                   -> no run id yet (the server was down when the job started): wait for the
                      driver to create the run (`run_id_source`), meanwhile buffer as above
    close()        -> deliver what is pending within timeout_s; keep what was not on disk and
                      warn with its folder (a resumed job, or `temper runs sync`, sends it)

The HTTP calls are single attempts with a short timeout (temper.tracking.backend).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from temper.tracking.artifacts import ArtifactOutbox
from temper.tracking.backend import (
    MAX_TAG_VALUE_CHARS,
    METRICS_PER_BATCH,
    TAGS_PER_BATCH,
    MlflowBackend,
    import_mlflow,
    is_rejection,
    short_reason,
)
from temper.tracking.base import Tracker
from temper.tracking.spool import Point, Spool

log = logging.getLogger(__name__)

#: In memory, a hard ceiling of this many times max_buffered: only reached when the disk
#: cannot keep up (or no spool folder); the oldest are then dropped.
_HARD_CEILING = 4


class MlflowTracker(Tracker):
    """Logs into an MLflow run created by the driver, from a background thread.

    Memory is bounded by ~`max_buffered` waiting metrics plus one batch (<= 1000) in flight;
    the overflow waits in `spool_dir` (None: no disk, the oldest are dropped instead).
    Counters for tests and reports: `sent`, `dropped`, `rejected` (refused by the server,
    e.g. an invalid key), `pending` (in memory, in flight or on disk), `spilled` (written to
    disk so far), `unreachable_s`.
    """

    def __init__(self, *, run_id: str | None, tracking_uri: str, flush_every_s: float = 2.0,
                 max_buffered: int = 100_000, backoff_initial_s: float = 0.5,
                 backoff_max_s: float = 30.0, request_timeout_s: float = 10.0,
                 run_id_source: Callable[[], str | None] | None = None,
                 spool_dir: str | Path | None = None, max_spill_mb: float = 1024.0,
                 meta: Mapping[str, Any] | None = None) -> None:
        if flush_every_s <= 0 or max_buffered < 1:
            raise ValueError("flush_every_s must be > 0 and max_buffered >= 1")
        if run_id is None and run_id_source is None:
            raise ValueError("a tracker without a run id needs run_id_source")
        self.run_id, self.tracking_uri = run_id, tracking_uri
        self._run_id_source = run_id_source
        self._flush_every_s, self._max_buffered = flush_every_s, max_buffered
        self._backoff = (backoff_initial_s, backoff_max_s)
        self._request_timeout_s = request_timeout_s
        self._lock = threading.RLock()  # RLock: close() from a signal handler cannot deadlock
        self._buffer: deque[Point] = deque()
        self._inflight: list[Point] = []
        self._replay: deque[Point] = deque()  # read back from the oldest segment on disk
        self._replay_file: Path | None = None  # that segment: removed once fully sent
        self._inflight_on_disk = False  # the batch in flight came from disk (not `unsent`)
        self._spool = Spool(spool_dir, max_bytes=int(max_spill_mb * 2**20)) if spool_dir else None
        self._on_disk = self._spool.count() if self._spool else 0  # leftovers of an earlier attempt
        if self._spool is not None:
            self._spool.write_meta({"run_id": run_id, "tracking_uri": tracking_uri, **(meta or {})})
        self._tags: dict[str, str] = {}
        self._files = ArtifactOutbox(Path(spool_dir) / "artifacts" if spool_dir else None)
        self._sent = self._dropped = self._rejected = self._spilled = 0
        self._warned: set[str] = set()
        self._outage_since: float | None = None
        self._outage_total_s = 0.0
        self._last_error: str | None = None
        self._backend: MlflowBackend | None = None
        self._batch_ready = threading.Event()  # >= METRICS_PER_BATCH pending, or closing
        self._closing = threading.Event()  # close() called: drain, then exit
        self._stop = threading.Event()  # close() deadline passed: exit now
        self._closed = False
        self._skip_through: int | None = None  # resumed: steps already in the run are not re-logged
        import_mlflow()  # here, before the sender thread exists: see import_mlflow
        self._thread = threading.Thread(target=self._run, name="temper-mlflow-tracker", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------- training side

    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None:
        if self._closed or (self._skip_through is not None and step <= self._skip_through):
            return
        ts, step = int(time.time() * 1000), int(step)
        points = []
        for key, value in metrics.items():
            try:
                points.append((key, float(value), step, ts))
            except (TypeError, ValueError):
                self._warn_once(f"value:{key}", "metric %r: value %r is not a number; skipped",
                                key, value)
        with self._lock:
            self._buffer.extend(points)
            overflow = len(self._buffer) - _HARD_CEILING * self._max_buffered
            for _ in range(overflow):
                self._buffer.popleft()
            if overflow > 0:
                self._dropped += overflow
            ready = len(self._buffer) >= METRICS_PER_BATCH or len(self._buffer) > self._max_buffered
        if ready and not self._batch_ready.is_set():
            self._batch_ready.set()

    def unsent(self) -> list[Point]:
        """What only memory holds (spilled segments stay on disk for the next attempt)."""
        with self._lock:
            inflight = [] if self._inflight_on_disk else self._inflight
            return [*inflight, *self._buffer]

    def resume_after(self, step: int, *, carried: list[Point] = ()) -> None:
        """Asks the server once for the run's last logged step (here, at resume: the step
        path never waits on HTTP). Carried metrics beyond it are queued again, in order;
        new metrics up to it are dropped. Unreachable server: everything carried is queued
        (a duplicate then repeats the same value: resume is exact)."""
        logged = None
        if self.run_id is not None:
            try:
                logged = MlflowBackend(self.tracking_uri, timeout_s=self._request_timeout_s).max_logged_step(
                    self.run_id, "train/loss")
            except Exception as e:  # noqa: BLE001 - best effort
                log.warning("could not read run %s's last logged step (%s); steps after %d may appear twice",
                            self.run_id, short_reason(e), step)
        missing = [p for p in carried if logged is None or p[2] > logged]
        with self._lock:
            self._buffer.extendleft(reversed(missing))
        if logged is not None and logged > step:
            self._skip_through = logged

    def log_artifact(self, path: str, data: bytes) -> None:
        if self._closed:
            return
        try:
            self._files.add(path, data)
        except OSError as e:
            self._warn_once(f"file:{path}", "run file %s not staged (%s); skipped", path, e)
            return
        self._batch_ready.set()

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if self._closed:
            return
        with self._lock:
            self._tags.update({str(k): str(v)[:MAX_TAG_VALUE_CHARS] for k, v in tags.items()})

    @property
    def sent(self) -> int:
        return self._sent

    @property
    def dropped(self) -> int:
        return self._dropped

    @property
    def rejected(self) -> int:
        return self._rejected

    @property
    def spilled(self) -> int:
        return self._spilled

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._buffer) + len(self._inflight) + len(self._replay) + self._on_disk

    @property
    def unreachable_s(self) -> float:
        """Seconds the backend has failed, over all outages so far (including a current one)."""
        since = self._outage_since
        return self._outage_total_s + (time.monotonic() - since if since is not None else 0.0)

    def close(self, *, timeout_s: float = 30.0) -> None:
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        self._batch_ready.set()
        self._thread.join(max(timeout_s, 0.0))
        if self._thread.is_alive():
            self._stop.set()  # a request in flight finishes in the background (daemon thread)
            self._thread.join(max(self._request_timeout_s, 0.2) + 1.0)
        kept = self._keep_on_disk() if not self._thread.is_alive() else 0
        self._report(kept)
        self._files.report()

    # ------------------------------------------------------------------ sender thread

    def _run(self) -> None:
        backoff = self._backoff[0]
        while not self._stop.is_set():
            ok = self._flush()
            self._spill_overflow()
            self._warn_drops()
            if ok:
                backoff = self._backoff[0]
                if self._closing.is_set():
                    if not self.pending and not self._tags and not self._files.pending:
                        break
                    if self.run_id is None:  # still no run: keep asking until close's deadline
                        self._stop.wait(0.5)
                    continue
                self._batch_ready.wait(self._flush_every_s)
                self._batch_ready.clear()
            else:
                self._back_off(backoff)
                backoff = min(backoff * 2, self._backoff[1])

    def _back_off(self, seconds: float) -> None:
        """Wait before the next try, spilling to disk meanwhile whenever memory fills up.
        close() cuts the first wait short (one more try), not the ones after it."""
        closing_before = self._closing.is_set()
        deadline = time.monotonic() + seconds
        while not self._stop.is_set() and (closing_before or not self._closing.is_set()):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._batch_ready.wait(min(remaining, 0.25))
            self._batch_ready.clear()
            self._spill_overflow()

    def _flush(self) -> bool:
        """Send tags, then every pending metric in order; False on a failure worth retrying.
        True without sending while the run does not exist yet."""
        if self.run_id is None and not self._resolve_run_id():
            return True
        try:
            if self._backend is None:
                self._backend = MlflowBackend(self.tracking_uri, timeout_s=self._request_timeout_s)
            self._send_tags()
            while not self._stop.is_set():
                batch = self._take_batch()
                if not batch:
                    break
                self._send_metrics(batch)
            self._files.send(functools.partial(self._backend.log_artifact, self.run_id), refused=is_rejection)
        except Exception as e:  # noqa: BLE001 - nothing may reach the training step
            self._on_failure(e)
            return False
        return True

    def _resolve_run_id(self) -> bool:
        try:
            run_id = self._run_id_source() if self._run_id_source else None
        except Exception as e:  # noqa: BLE001 - the driver is slow or gone: ask again later
            log.debug("asking for the run id failed: %s", e)
            run_id = None
        if not run_id:
            return False
        self.run_id = run_id
        if self._spool is not None:
            self._spool.write_meta({"run_id": run_id})
        log.warning("MLflow run %s exists now; sending the %d metrics buffered meanwhile", run_id, self.pending)
        return True

    def _take_batch(self) -> list[Point]:
        """The next batch in logged order: disk (oldest) first, then memory."""
        with self._lock:
            if self._inflight:
                return self._inflight
        if not self._replay and self._spool is not None and self._on_disk:
            segments = self._spool.segments()
            if segments:
                self._replay_file, points = self._spool.take(segments[0])
                with self._lock:
                    self._replay.extend(points)
                    self._on_disk = max(self._on_disk - len(points), 0)
            else:
                self._on_disk = 0
        with self._lock:
            source = self._replay if self._replay else self._buffer
            n = min(METRICS_PER_BATCH, len(source))
            self._inflight = [source.popleft() for _ in range(n)]
            self._inflight_on_disk = source is self._replay and n > 0
            return self._inflight

    def _send_metrics(self, batch: list[Point]) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(key, value, ts, step) for key, value, step, ts in batch]
        reason = None
        finishes_segment = self._inflight_on_disk and not self._replay  # the segment's last batch
        try:
            self._backend.log_batch(self.run_id, metrics=metrics)
        except Exception as e:
            if not is_rejection(e):
                raise
            reason = short_reason(e)
        self._on_success()
        with self._lock:  # counters and `pending` change together
            self._inflight = []
            self._inflight_on_disk = False
            if reason is None:
                self._sent += len(batch)
            else:
                self._rejected += len(batch)
        if finishes_segment and self._replay_file is not None:  # delivered completely
            self._replay_file.unlink(missing_ok=True)
            self._replay_file = None
        if reason is not None:
            self._warn_once("reject", "MLflow rejected %d metrics (%s); continuing without them",
                            len(batch), reason)

    def _send_tags(self) -> None:
        from mlflow.entities import RunTag

        with self._lock:
            unsent, self._tags = list(self._tags.items()), {}
        try:
            while unsent:
                chunk = [RunTag(k, v) for k, v in unsent[:TAGS_PER_BATCH]]
                self._backend.log_batch(self.run_id, tags=chunk)
                unsent = unsent[TAGS_PER_BATCH:]
                self._on_success()
        except Exception as e:
            if is_rejection(e):
                self._on_success()
                self._warn_once("tags", "MLflow rejected run tags (%s)", short_reason(e))
                return
            with self._lock:
                self._tags = {**dict(unsent), **self._tags}  # values set meanwhile win
            raise

    def _spill_overflow(self) -> None:
        """More than max_buffered in memory: the oldest go to disk, keeping the newest
        max_buffered/2 in memory; over the disk limit, the oldest segments are dropped."""
        if len(self._buffer) <= self._max_buffered:
            return
        if self._spool is None:
            with self._lock:
                overflow = len(self._buffer) - self._max_buffered
                for _ in range(overflow):
                    self._buffer.popleft()
                self._dropped += overflow
            return
        with self._lock:
            n = len(self._buffer) - self._max_buffered // 2
            points = [self._buffer.popleft() for _ in range(n)]
            self._on_disk += n  # before the write: `pending` never dips
        try:
            self._spool.append(points)
            self._spilled += n
        except OSError as e:
            with self._lock:
                self._on_disk -= n
                self._dropped += n
            self._warn_once("spill", "cannot write metrics to %s (%s); dropping the oldest instead",
                            self._spool.folder, e)
            return
        while self._spool.over_limit() and len(self._spool.segments()) > 1:
            lost = self._spool.drop_oldest()
            with self._lock:
                self._on_disk = max(self._on_disk - lost, 0)
                self._dropped += lost

    def _keep_on_disk(self) -> int:
        """At close: what could not be delivered goes to the spool, in order; returns how
        many metrics wait there now. The batch in flight and the rest of a segment being
        read back are older than every segment on disk; memory's buffer is newer."""
        if self._spool is None:
            return 0
        with self._lock:
            older, newer = [*self._inflight, *self._replay], list(self._buffer)
            self._inflight, self._buffer = [], deque()
            self._replay.clear()
        if self._replay_file is not None:  # its undelivered remainder is in `older`
            self._replay_file.unlink(missing_ok=True)
            self._replay_file = None
        try:
            self._spool.prepend(older)
            self._spool.append(newer)
        except OSError as e:
            log.warning("could not keep %d undelivered metrics in %s: %s", len(older) + len(newer),
                        self._spool.folder, e)
            self._dropped += len(older) + len(newer)
        waiting = self._on_disk = self._spool.count()
        if not waiting:
            self._spool.remove_if_empty()
        return waiting

    # -------------------------------------------------------------------- reporting

    def _on_failure(self, exc: BaseException) -> None:
        self._last_error = short_reason(exc)
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            log.warning("MLflow at %s is unreachable (%s); buffering metrics and retrying",
                        self.tracking_uri, self._last_error)
        else:
            log.debug("MLflow still unreachable: %s", self._last_error)

    def _on_success(self) -> None:
        if self._outage_since is not None:
            outage = time.monotonic() - self._outage_since
            self._outage_total_s += outage
            self._outage_since = None
            log.warning("MLflow at %s is reachable again after %.1f s unreachable; sending the "
                        "buffered metrics", self.tracking_uri, outage)

    def _warn_once(self, what: str, message: str, *args: Any) -> None:
        if what not in self._warned:
            self._warned.add(what)
            log.warning(message, *args)

    def _warn_drops(self) -> None:
        if self._dropped:
            self._warn_once("drop", "tracking buffer full (max_buffered=%d in memory, tracking.max_spill_mb "
                            "on disk): dropped the %d oldest metrics so far while MLflow is unreachable",
                            self._max_buffered, self._dropped)
        if self._spilled:
            self._warn_once("spilled", "MLflow still unreachable: more than %d metrics waiting, the oldest "
                            "now wait on disk in %s", self._max_buffered,
                            self._spool.folder if self._spool else "-")

    def _report(self, kept: int) -> None:
        outage = self.unreachable_s
        lost = self._dropped + self._rejected
        if kept or lost or self.pending:
            where = (f"; {kept} kept in {self._spool.folder}: they are sent when this run resumes, or "
                     f"run `temper runs sync {self._spool.folder}`") if kept else ""
            log.warning(
                "MLflow run %s: %d metrics not delivered (%d dropped from a full buffer, %d rejected)%s; "
                "%d sent; server unreachable for %.1f s in total%s",
                self.run_id or "(not created)", kept + lost, self._dropped, self._rejected, where,
                self._sent, outage, f" (last error: {self._last_error})" if self._last_error else "",
            )
        elif outage > 0:
            log.warning("MLflow run %s: all %d metrics delivered; the server was unreachable for %.1f s "
                        "in total", self.run_id, self._sent, outage)
