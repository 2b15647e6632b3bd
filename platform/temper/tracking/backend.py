"""The MLflow writes the tracker and the driver make, each one HTTP attempt with a short timeout.

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
import re
from collections.abc import Iterable
from typing import Any

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

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None) -> None:
        """Upload one file into the run's artifacts (through the server's proxy when it has one)."""
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        self._client.log_artifact(run_id, local_path, artifact_path=artifact_path)

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


def import_mlflow() -> None:
    """Import the MLflow modules the sender thread uses, on the calling thread. Importing
    them for the first time from two threads at once (the sender's first flush while the
    main thread reads the run at resume) trips Python's import-lock deadlock detection and
    leaves a half-initialized `mlflow` module behind, after which nothing is ever sent."""
    import mlflow  # noqa: F401
    import mlflow.entities  # noqa: F401
    import mlflow.store.tracking.rest_store  # noqa: F401
    import mlflow.tracking.client  # noqa: F401
    import mlflow.utils.credentials  # noqa: F401
