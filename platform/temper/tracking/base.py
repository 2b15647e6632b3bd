"""The tracker interface the training loop logs through.

The loop calls `log_metrics` every `train.log_every` steps on rank 0; it must never wait
on the network or the disk. Implementations buffer and deliver in the background, and
report what they could not deliver when they are closed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from types import TracebackType


class Tracker(ABC):
    """Where a worker's metrics go. Only rank 0 gets a real one; the others get NoopTracker."""

    @abstractmethod
    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None:
        """Record metric values for `step`. Returns at once; never blocks on I/O, never raises
        because the tracking backend is down. Pass Python floats: converting a CUDA tensor
        here would synchronize the device."""

    def unsent(self) -> list[tuple[str, float, int, int]]:
        """Metrics logged but not yet delivered, as (key, value, step, timestamp_ms): a
        checkpoint carries them, so a worker killed before its next flush loses none."""
        return []

    def resume_after(self, step: int, *, carried: list[tuple[str, float, int, int]] = ()) -> None:
        """A resumed run: re-send `carried` (the checkpoint's undelivered metrics) that the
        run lacks, and drop metrics of steps already in the run (a restart after step `step`
        re-trains the steps logged between that checkpoint and the failure)."""

    def log_artifact(self, path: str, data: bytes) -> None:
        """Store `data` as the run's file `path` (relative, e.g. 'eval/step-100/x.png').
        Non-blocking like `log_metrics`: staged on disk, uploaded in the background."""

    @abstractmethod
    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Set run tags (delivered with the next batch; non-blocking like `log_metrics`)."""

    @abstractmethod
    def close(self, *, timeout_s: float = 30.0) -> None:
        """Deliver what is pending within `timeout_s` seconds and release resources.

        Idempotent. What could not be delivered is reported as a warning, not raised.
        """

    def __enter__(self) -> Tracker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class NoopTracker(Tracker):
    """Discards everything: ranks other than 0, and jobs with tracking.enabled=false."""

    def log_metrics(self, metrics: Mapping[str, float], *, step: int) -> None:
        return None

    def set_tags(self, tags: Mapping[str, str]) -> None:
        return None

    def close(self, *, timeout_s: float = 30.0) -> None:
        return None
