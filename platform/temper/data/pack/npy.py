"""`--format npy`: a .npy array, one sample per row, or a folder of .npy files, one sample each,
as `data.npy`; a sibling labels.npy (one integer per sample) adds `cls`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from temper.data.pack.source import PackOptions, Source, existing_path, permutation, source_name
from temper.errors import TemperError


def open_npy(source: str, opts: PackOptions) -> Source:
    path = existing_path(source, "npy")
    if path.is_file():
        if path.suffix != ".npy":
            raise TemperError(f"SOURCE {source} is not a .npy file; pass a .npy array or a folder of .npy files")
        rows = _load_npy(path, mmap=True)
        if rows.ndim == 0 or len(rows) == 0:
            raise TemperError(f"SOURCE {source} has no rows; pass an array of shape [N, ...] with N >= 1")
        get, n, labels_path = (lambda i: rows[i]), len(rows), path.with_name("labels.npy")
    else:
        files = sorted(p for p in path.glob("*.npy") if p.name != "labels.npy")
        if not files:
            raise TemperError(f"SOURCE {source} has no .npy files; pass a .npy array or a folder of .npy files")
        get, n, labels_path = (lambda i: _load_npy(files[i], mmap=False)), len(files), path / "labels.npy"
    labels = _npy_labels(labels_path, n) if labels_path.is_file() and labels_path != path else None
    order = permutation(n, opts.seed)

    def samples() -> Iterator[dict[str, Any]]:
        for i in order:
            sample: dict[str, Any] = {"data.npy": np.ascontiguousarray(get(i))}
            if labels is not None:
                sample["cls"] = int(labels[i])
            yield sample

    extras = {"labels": labels_path.name} if labels is not None else {}
    return Source(source_name(path.resolve().stem), str(path), samples(), extras)


def _load_npy(path: Path, *, mmap: bool) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise TemperError(f"SOURCE file {path} is not a readable .npy array ({e}); re-save it with numpy.save") from e


def _npy_labels(path: Path, n: int) -> np.ndarray:
    labels = _load_npy(path, mmap=False)
    if labels.ndim != 1 or len(labels) != n or not np.issubdtype(labels.dtype, np.integer):
        raise TemperError(
            f"SOURCE labels {path} has shape {labels.shape} dtype {labels.dtype}; "
            f"it must be {n} integers, one per sample"
        )
    return labels
