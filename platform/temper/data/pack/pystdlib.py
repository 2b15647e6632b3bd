"""`--format pystdlib` [built-in]: this Python's standard library source (its .py files, test
and site-packages folders skipped) as a text corpus, cut like `--format text`."""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

from temper.data.pack.source import PackOptions, Source, expect_builtin
from temper.data.pack.text import token_source

STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def stdlib_root() -> Path:
    """This Python's standard library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_description(fmt: str, root: Path) -> str:
    """The manifest's "source" for a stdlib format, naming the Python version and `root`."""
    version = ".".join(map(str, sys.version_info[:3]))
    return f"{fmt} (Python {version} standard library, {root})"


def stdlib_files(root: Path, folder: Path) -> list[Path]:
    """The .py files under `folder` of the stdlib at `root`, sorted, STDLIB_SKIP_DIRS skipped."""
    return sorted(p for p in folder.rglob("*.py") if not STDLIB_SKIP_DIRS & set(p.relative_to(root).parts[:-1]))


def open_pystdlib(source: str, opts: PackOptions) -> Source:
    expect_builtin(source, "pystdlib")
    root = stdlib_root()
    files = stdlib_files(root, root)
    return token_source("pystdlib", stdlib_description("pystdlib", root), files, opts)
