"""Rank 0's metrics into the driver's MLflow run, without ever slowing the training step.

    log_metrics()  -> append (key, value, step, timestamp_ms) to a bounded deque   [microseconds]
    sender thread  -> LogBatch of <= 1000 metrics, in order, every flush_every_s
                      (sooner when >= 1000 are pending); on failure: keep them, back off
                      0.5 s, 1 s, 2 s ... 30 s, retry; beyond max_buffered: drop the oldest
    close()        -> deliver what is pending within timeout_s; warn about what was not

MLflow's own HTTP retry loop is bypassed for these calls: MlflowClient retries a refused
connection 7 times with exponential backoff (MLFLOW_HTTP_REQUEST_MAX_RETRIES=7,
MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=2: about 4 minutes per call) and waits up to
MLFLOW_HTTP_REQUEST_TIMEOUT=120 s per attempt. Those environment variables are read by
every request in the process, so they cannot be shortened for one thread or one client
without changing them for everything else. Instead `MlflowBackend` sends http(s) requests
through a RestStore whose transport passes max_retries=0 and a short timeout to
mlflow.utils.rest_utils.http_request (what MLflow itself does for its /version probe), and
the sender thread retries on its own schedule. Other stores (sqlite, file) use MlflowClient.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

from temper.tracking.base import Tracker

log = logging.getLogger(__name__)

#: MLflow's limits per LogBatch request (mlflow.utils.validation).
METRICS_PER_BATCH = 1000
TAGS_PER_BATCH = 100
MAX_TAG_VALUE_CHARS = 8000
#: HTTP statuses that mean "try again later" although they are 4xx.
_RETRYABLE_4XX = frozenset({408, 409, 425, 429})


def is_http_uri(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def short_reason(exc: BaseException) -> str:
    """A one-line reason for a tracking failure (`[Errno 111] Connection refused`, `HTTP 503`)."""
    text = " ".join(str(exc).split())
    match = re.search(r"\[Errno -?\d+\][^'\")]*", text)
    if match:
        return match.group(0).strip()
    if "Read timed out" in text or "timed out" in text.lower():
        return "timed out"
    match = re.search(r"too many (\d{3}) error responses", text)
    if match:
        return f"HTTP {match.group(1)}"
    return text[:200] or type(exc).__name__


def is_rejection(exc: BaseException) -> bool:
    """True when the server refused the request itself (bad key, deleted run): retrying the
    same data cannot succeed. Connection problems, timeouts and 5xx are not rejections."""
    from mlflow.exceptions import MlflowException

    if not isinstance(exc, MlflowException):
        return False
    status = exc.get_http_status_code()
    return 400 <= status < 500 and status not in _RETRYABLE_4XX


@functools.cache
def _fast_fail_store_class() -> type:
    from mlflow.store.tracking.rest_store import RestStore
    from mlflow.utils.proto_json_utils import parse_dict
    from mlflow.utils.rest_utils import http_request, verify_rest_response

    class FastFailRestStore(RestStore):
        """RestStore whose requests are sent once, with a short timeout (no urllib3 retries)."""

        timeout_s: float = 10.0

        def _call_endpoint(self, api, json_body=None, endpoint=None, retry_timeout_seconds=None,
                           response_proto=None):
            table = self._V3_METHOD_TO_INFO if api in self._V3_APIS else self._METHOD_TO_INFO
            default_endpoint, method = table[api]
            endpoint = endpoint or default_endpoint
            body = json.loads(json_body) if json_body is not None else None
            payload = {"params": body} if method == "GET" else {"json": body}
            response = http_request(self.get_host_creds(), endpoint, method, max_retries=0,
                                    timeout=self.timeout_s, **payload)
            response = verify_rest_response(response, endpoint)
            response_proto = response_proto or api.Response()
            if response.status_code != 204:
                parse_dict(js_dict=json.loads(response.text), message=response_proto)
            return response_proto

    return FastFailRestStore


class MlflowBackend:
    """The few MLflow writes the tracker and `end_run` make; over HTTP each is one attempt
    bounded by `timeout_s` (see the module docstring)."""

    def __init__(self, tracking_uri: str, *, timeout_s: float = 10.0) -> None:
        self.tracking_uri = tracking_uri
        self._client: Any = None
        self._store: Any = None
        if is_http_uri(tracking_uri):
            from mlflow.utils.credentials import get_default_host_creds

            self._store = _fast_fail_store_class()(
                functools.partial(get_default_host_creds, tracking_uri)
            )
            self._store.timeout_s = timeout_s
        else:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=tracking_uri)

    def log_batch(self, run_id: str, *, metrics: Iterable[Any] = (), tags: Iterable[Any] = ()) -> None:
        metrics, tags = list(metrics), list(tags)
        if self._store is not None:
            self._store.log_batch(run_id, metrics=metrics, params=[], tags=tags)
        else:
            self._client.log_batch(run_id, metrics=metrics, tags=tags, synchronous=True)

    def max_logged_step(self, run_id: str, key: str) -> int | None:
        """The highest step logged for metric `key` in the run (None: none yet)."""
        if self._store is not None:
            history = self._store.get_metric_history(run_id, key)
        else:
            history = self._client.get_metric_history(run_id, key)
        return max((m.step for m in history), default=None)

    def set_terminated(self, run_id: str, *, status: str, end_time_ms: int) -> None:
        if self._store is not None:
            from mlflow.entities import RunStatus

            self._store.update_run_info(run_id, run_status=RunStatus.from_string(status),
                                        end_time=end_time_ms, run_name=None)
        else:
            self._client.set_terminated(run_id, status=status, end_time=end_time_ms)


def _import_mlflow() -> None:
    """Import the MLflow modules the sender thread uses, on the calling thread. Importing
    them for the first time from two threads at once (the sender's first flush while the
    main thread reads the run at resume) trips Python's import-lock deadlock detection and
    leaves a half-initialized `mlflow` module behind, after which nothing is ever sent."""
    import mlflow  # noqa: F401
    import mlflow.entities  # noqa: F401
    import mlflow.store.tracking.rest_store  # noqa: F401
    import mlflow.tracking.client  # noqa: F401
    import mlflow.utils.credentials  # noqa: F401


class MlflowTracker(Tracker):
    """Logs into an existing MLflow run (created by the driver) from a background thread.

    Memory is bounded by `max_buffered` waiting metrics plus one batch (<= 1000) in flight.
    Counters for tests and reports: `sent`, `dropped` (oldest discarded because more than
    `max_buffered` were waiting), `rejected` (refused by the server, e.g. an invalid key),
    `pending` (waiting or in flight), `unreachable_s`.
    """

    def __init__(self, *, run_id: str, tracking_uri: str, flush_every_s: float = 2.0,
                 max_buffered: int = 100_000, backoff_initial_s: float = 0.5,
                 backoff_max_s: float = 30.0, request_timeout_s: float = 10.0) -> None:
        if flush_every_s <= 0 or max_buffered < 1:
            raise ValueError("flush_every_s must be > 0 and max_buffered >= 1")
        self.run_id, self.tracking_uri = run_id, tracking_uri
        self._flush_every_s, self._max_buffered = flush_every_s, max_buffered
        self._backoff = (backoff_initial_s, backoff_max_s)
        self._request_timeout_s = request_timeout_s
        self._lock = threading.RLock()  # RLock: close() from a signal handler cannot deadlock
        self._buffer: deque[tuple[str, float, int, int]] = deque()
        self._inflight: list[tuple[str, float, int, int]] = []
        self._tags: dict[str, str] = {}
        self._sent = self._dropped = self._rejected = 0
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
        _import_mlflow()  # here, before the sender thread exists: see _import_mlflow
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
            overflow = len(self._buffer) - self._max_buffered
            for _ in range(overflow):
                self._buffer.popleft()
            if overflow > 0:
                self._dropped += overflow
            ready = len(self._buffer) >= METRICS_PER_BATCH
        if ready and not self._batch_ready.is_set():
            self._batch_ready.set()

    def unsent(self) -> list[tuple[str, float, int, int]]:
        with self._lock:
            return [*self._inflight, *self._buffer]

    def resume_after(self, step: int, *, carried: list[tuple[str, float, int, int]] = ()) -> None:
        """Asks the server once for the run's last logged step (here, at resume: the step
        path never waits on HTTP). Carried metrics beyond it are queued again, in order;
        new metrics up to it are dropped. Unreachable server: everything carried is queued
        (a duplicate then repeats the same value: resume is exact)."""
        logged = None
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
    def pending(self) -> int:
        with self._lock:
            return len(self._buffer) + len(self._inflight)

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
            self._thread.join(0.2)
        self._report()

    # ------------------------------------------------------------------ sender thread

    def _run(self) -> None:
        backoff = self._backoff[0]
        while not self._stop.is_set():
            if self._flush():
                backoff = self._backoff[0]
                if self._closing.is_set():
                    if not self.pending and not self._tags:
                        break
                    continue
                self._batch_ready.wait(self._flush_every_s)
                self._batch_ready.clear()
            else:
                # Wake early for close() once, then keep backing off until its deadline.
                (self._stop if self._closing.is_set() else self._closing).wait(backoff)
                backoff = min(backoff * 2, self._backoff[1])
            self._warn_drops()

    def _flush(self) -> bool:
        """Send tags, then every pending metric in order; False on a failure worth retrying."""
        try:
            if self._backend is None:
                self._backend = MlflowBackend(self.tracking_uri, timeout_s=self._request_timeout_s)
            self._send_tags()
            while not self._stop.is_set():
                batch = self._take_batch()
                if not batch:
                    break
                self._send_metrics(batch)
        except Exception as e:  # noqa: BLE001 - nothing may reach the training step
            self._on_failure(e)
            return False
        return True

    def _take_batch(self) -> list[tuple[str, float, int, int]]:
        with self._lock:
            if not self._inflight:
                n = min(METRICS_PER_BATCH, len(self._buffer))
                self._inflight = [self._buffer.popleft() for _ in range(n)]
            return self._inflight

    def _send_metrics(self, batch: list[tuple[str, float, int, int]]) -> None:
        from mlflow.entities import Metric

        metrics = [Metric(key, value, ts, step) for key, value, step, ts in batch]
        reason = None
        try:
            self._backend.log_batch(self.run_id, metrics=metrics)
        except Exception as e:
            if not is_rejection(e):
                raise
            reason = short_reason(e)
        self._on_success()
        with self._lock:  # counters and `pending` change together
            self._inflight = []
            if reason is None:
                self._sent += len(batch)
            else:
                self._rejected += len(batch)
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
            log.warning("MLflow at %s is reachable again after %.1f s; sending buffered metrics",
                        self.tracking_uri, outage)

    # -------------------------------------------------------------------- reporting

    def _warn_once(self, what: str, message: str, *args: Any) -> None:
        if what not in self._warned:
            self._warned.add(what)
            log.warning(message, *args)

    def _warn_drops(self) -> None:
        if self._dropped:
            self._warn_once("drop", "tracking buffer full (max_buffered=%d): dropped the %d "
                            "oldest metrics so far while MLflow is unreachable",
                            self._max_buffered, self._dropped)

    def _report(self) -> None:
        pending = self.pending
        outage = self.unreachable_s
        if pending or self._dropped or self._rejected:
            log.warning(
                "MLflow run %s: %d metrics not delivered (%d pending at close, %d dropped from a "
                "full buffer, %d rejected); %d sent; server unreachable for %.1f s in total%s",
                self.run_id, pending + self._dropped + self._rejected, pending, self._dropped,
                self._rejected, self._sent, outage,
                f" (last error: {self._last_error})" if self._last_error else "",
            )
        elif outage > 0:
            log.info("MLflow run %s: all %d metrics delivered; server was unreachable for %.1f s",
                     self.run_id, self._sent, outage)
