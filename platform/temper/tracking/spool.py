"""Metrics that wait for MLflow on disk: the tracker's overflow while the server is down.

    <spool root>/<run id or pending-token>/
        meta.json                 {"run_id", "tracking_uri", "experiment", "run_name"}
        seg-000000001.jsonl       one metric per line: [key, value, step, timestamp_ms], oldest first
        seg-000000002.jsonl.sending   a segment being delivered (removed once all of it is sent)

Segments are written whole (temp file, fsync, rename) and delivered oldest first, before any
metric still in memory, so the run receives every metric in the order it was logged. A
tracker that starts for a run whose folder holds segments (a restarted or resumed job on
the same machine) delivers them first. `temper runs sync FOLDER` delivers a folder by hand
(a job that ended while the server was still down).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path

Point = tuple[str, float, int, int]  # (key, value, step, timestamp_ms)

SUFFIX, SENDING = ".jsonl", ".jsonl.sending"
FIRST_INDEX = 100_000_000


def default_spool_root() -> Path:
    """$TEMPER_SPOOL_DIR, else ~/.cache/temper/tracking-spool."""
    env = os.environ.get("TEMPER_SPOOL_DIR")
    return Path(env) if env else Path.home() / ".cache" / "temper" / "tracking-spool"


def _encode(value: float) -> float | str:
    return value if math.isfinite(value) else repr(value)  # JSON has no NaN/Infinity


class Spool:
    """One run's spilled metrics. Not thread-safe: the tracker's sender thread owns it
    (and close(), after that thread has stopped)."""

    def __init__(self, folder: str | os.PathLike, *, max_bytes: int) -> None:
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        # Indexes start high so that `prepend` can always name a segment older than the rest.
        self._next = 1 + max((self._index(p) for p in self._files()), default=FIRST_INDEX)

    # ------------------------------------------------------------------ writing

    def write_meta(self, meta: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / "meta.json"
        old = json.loads(path.read_text()) if path.exists() else {}
        _atomic_write(path, json.dumps({**old, **{k: v for k, v in meta.items() if v is not None}},
                                       indent=1, sort_keys=True))

    def read_meta(self) -> dict:
        path = self.folder / "meta.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def append(self, points: Iterable[Point]) -> Path | None:
        """Write `points` as the newest segment; None when there were none."""
        path = self._write(points, index=self._next)
        if path is not None:
            self._next += 1
        return path

    def prepend(self, points: Iterable[Point]) -> Path | None:
        """Write `points` as the oldest segment (they come before everything on disk)."""
        first = min((self._index(p) for p in self._files()), default=self._next)
        return self._write(points, index=first - 1)

    def _write(self, points: Iterable[Point], *, index: int) -> Path | None:
        lines = [json.dumps([k, _encode(v), s, t]) for k, v, s, t in points]
        if not lines:
            return None
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"seg-{index:09d}{SUFFIX}"
        _atomic_write(path, "\n".join(lines) + "\n")
        return path

    # ------------------------------------------------------------------ reading

    def segments(self) -> list[Path]:
        """Every segment not yet delivered, oldest first (one being sent comes first)."""
        return sorted(self._files(), key=self._index)

    def count(self) -> int:
        return sum(_lines(p) for p in self.segments())

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.segments())

    def take(self, path: Path) -> tuple[Path, list[Point]]:
        """Mark segment `path` as being sent and read it."""
        sending = path if path.name.endswith(SENDING) else path.rename(path.with_name(path.name[:-len(SUFFIX)] + SENDING))
        points = []
        for line in sending.read_text().splitlines():
            if line.strip():
                k, v, s, t = json.loads(line)  # float() also reads _encode's 'nan'/'inf'
                points.append((k, float(v), int(s), int(t)))
        return sending, points

    def drop_oldest(self) -> int:
        """Remove the oldest segment (over max_bytes); returns how many metrics it held."""
        segments = self.segments()
        if not segments:
            return 0
        n = _lines(segments[0])
        segments[0].unlink(missing_ok=True)
        return n

    def over_limit(self) -> bool:
        return self.size_bytes() > self.max_bytes

    def remove_if_empty(self) -> None:
        """No metrics wait: remove the folder, except undelivered run files (artifacts/...)."""
        if self.folder.is_dir() and not self.segments():
            for p in self.folder.iterdir():
                if p.is_dir():
                    _remove_empty_dirs(p)
                else:
                    p.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # not empty: run files wait there
                self.folder.rmdir()

    # ------------------------------------------------------------------ helpers

    def _files(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return [p for p in self.folder.iterdir() if p.name.startswith("seg-") and p.name.endswith((SUFFIX, SENDING))]

    @staticmethod
    def _index(path: Path) -> int:
        return int(path.name[4:13])


def _lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _remove_empty_dirs(folder: Path) -> None:
    for p in sorted(folder.rglob("*"), key=lambda x: len(x.parts), reverse=True):
        if p.is_dir():
            with contextlib.suppress(OSError):
                p.rmdir()
    with contextlib.suppress(OSError):
        folder.rmdir()
