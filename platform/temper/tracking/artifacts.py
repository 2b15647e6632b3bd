"""Files for the run (confusion matrices, reconstruction grids), queued like metrics.

The training side writes the bytes to a staging folder (beside the metric spool, so an
outage keeps them on disk) and returns; the tracker's sender thread uploads them in order
after the metrics and deletes each staged copy once MLflow has it.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from collections import deque
from pathlib import Path, PurePosixPath

log = logging.getLogger(__name__)


def check_artifact_path(path: str) -> str:
    """A relative POSIX path inside the run's artifacts ('eval/step-100/x.png')."""
    pure = PurePosixPath(path)
    if not path or pure.is_absolute() or ".." in pure.parts:
        raise ValueError(f"artifact path {path!r} must be relative and stay inside the run")
    return str(pure)


class ArtifactOutbox:
    """Staged files waiting for upload, oldest first."""

    def __init__(self, folder: str | Path | None) -> None:
        self.folder = Path(folder) if folder else Path(tempfile.mkdtemp(prefix="temper-artifacts-"))
        self._queue: deque[str] = deque()
        self._lock = threading.Lock()
        self.sent = 0
        if self.folder.is_dir():  # files an earlier attempt could not deliver
            self._queue.extend(sorted(str(p.relative_to(self.folder).as_posix())
                                      for p in self.folder.rglob("*") if p.is_file() and not p.name.endswith(".tmp")))

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._queue)

    def add(self, path: str, data: bytes) -> None:
        path = check_artifact_path(path)
        local = self.folder / path
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(local.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, local)
        with self._lock:
            if path not in self._queue:
                self._queue.append(path)

    def send(self, upload, *, refused=lambda e: False) -> None:
        """upload(local_file, artifact_dir or None) for each staged file; raises on the first
        failure, leaving it and the rest queued; a file the server `refused` is dropped."""
        while True:
            with self._lock:
                if not self._queue:
                    return
                path = self._queue[0]
            local = self.folder / path
            if local.is_file():
                parent = str(PurePosixPath(path).parent)
                try:
                    upload(str(local), None if parent == "." else parent)
                    self.sent += 1
                except Exception as e:
                    if not refused(e):
                        raise
                    log.warning("MLflow refused the run file %s (%s); skipped", path, e)
                local.unlink(missing_ok=True)
            with self._lock:
                self._queue.popleft()

    def report(self) -> None:
        if self.pending:
            log.warning("%d run files (figures) not delivered; they stay in %s", self.pending, self.folder)
