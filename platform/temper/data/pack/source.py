"""What every `temper data pack` format shares: the options it reads with, the opened `Source`
it returns, and the checks and helpers its reader uses (built-in source names, existing paths,
key-safe names, the seeded sample order).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from temper.data.tokenizer import Tokenizer
from temper.errors import TemperError

TEXT_FORMATS = ("text", "pystdlib", "pystdlib-packages")  # tokenized: --tokenizer, --seq-len
PATH_FORMATS = ("imagefolder", "npy", "text")  # SOURCE is a file or folder
BUILTIN_SOURCES = {"digits": "scikit-learn's bundled 8x8 digits", "pystdlib": "the Python standard library",
                   "pystdlib-packages": "Python standard library code labelled by package"}


@dataclass
class PackOptions:
    seq_len: int
    limit: int | None
    seed: int
    tokenizer: Tokenizer | None = None


@dataclass
class Source:
    """An opened source: samples (field -> value) in pack order, plus manifest extras."""

    name: str  # sanitized; sample keys are f"{name}/{index:09d}"
    description: str  # the manifest's "source"
    samples: Iterable[dict[str, Any]]
    extras: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, int] = field(default_factory=dict)  # filled while iterating (text)
    splits: dict[str, Source] = field(default_factory=dict)  # packed as OUT_DIR/<split>, each its own dataset


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """"did you mean 'x'? " for the closest of `choices`, or "" when none is close."""
    close = difflib.get_close_matches(value, list(choices), n=1)
    return f"did you mean '{close[0]}'? " if close else ""


def existing_path(source: str, fmt: str) -> Path:
    """SOURCE as a path that exists (an error naming the built-in format it may have meant)."""
    path = Path(source).expanduser()
    if not path.exists():
        hint = f", or --format {source} for the built-in source" if source in BUILTIN_SOURCES else ""
        raise TemperError(
            f"SOURCE {source} does not exist; pass an existing file or folder for --format {fmt}{hint}"
        )
    return path


def expect_builtin(source: str, fmt: str) -> None:
    """A built-in format takes only its own name as SOURCE."""
    if source != fmt:
        raise TemperError(
            f"SOURCE '{source}' is not accepted by --format {fmt}; use SOURCE '{fmt}' "
            f"({BUILTIN_SOURCES[fmt]}) or pick --format text/npy/imagefolder for files"
        )


def source_name(text: str) -> str:
    """A key-safe name: letters, digits, '_' and '-' only (no '.' or '/'), at most 40 chars."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")[:40] or "data"


def permutation(n: int, seed: int) -> np.ndarray:
    """The seeded pack order of `n` samples (or documents)."""
    return np.random.default_rng(seed).permutation(n)
