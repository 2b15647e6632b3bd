"""`--format pystdlib-packages` [built-in]: sequence classification over the Python standard
library: "which top-level stdlib package does this code come from". Each .py file of the
packages in STDLIB_PACKAGES (test folders skipped, as `pystdlib` does) is tokenized and cut
into non-overlapping windows of seq_len + 1 tokens that never cross files (a file's tail
shorter than a window is dropped); label `cls` is the package's index in STDLIB_PACKAGES.

The held-out split is by file: per package, files are visited in a seeded order and put in
eval while that keeps its eval windows within EVAL_SHARE of the package's (at least one file);
no file gives samples to both splits. Packing writes two datasets, each with its own
manifest: OUT_DIR/train and OUT_DIR/eval. Classes are balanced per split: each keeps as many
windows as the smallest class has there (a seeded choice), capped further by --limit (per
class). The manifests record `classes`, `class_counts`, `split` and the split's `files`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from temper.data.pack.pystdlib import stdlib_description, stdlib_files, stdlib_root
from temper.data.pack.source import PackOptions, Source, expect_builtin
from temper.errors import TemperError

#: The classes, in label order: large Python 3.11 packages, their test folders skipped.
STDLIB_PACKAGES = ("asyncio", "distutils", "email", "idlelib", "lib2to3", "multiprocessing", "tkinter", "xml")
EVAL_SHARE = 0.2  # of each package's windows, at most (whole files)
SPLITS = ("train", "eval")


def _package_files(root: Path, package: str) -> list[Path]:
    folder = root / package
    if not folder.is_dir():
        raise TemperError(
            f"SOURCE pystdlib-packages: this Python's standard library ({root}) has no package '{package}'; "
            f"run with Python 3.11 (distutils and lib2to3 are gone from 3.12/3.13)"
        )
    return stdlib_files(root, folder)


def _windows(path: Path, opts: PackOptions, dtype: type) -> np.ndarray:
    """A file's non-overlapping [n, seq_len + 1] token windows (its tail dropped)."""
    ids = opts.tokenizer.encode(path.read_text(encoding="utf-8", errors="replace"))
    length = opts.seq_len + 1
    n = len(ids) // length
    return ids[: n * length].reshape(n, length).astype(dtype)


def _split_files(windows: dict[str, np.ndarray], *, rng: np.random.Generator) -> set[str]:
    """The package's eval files: seeded order, greedy up to EVAL_SHARE of its windows."""
    names = [n for n in sorted(windows) if len(windows[n])]
    total = sum(len(windows[n]) for n in names)
    budget = EVAL_SHARE * total
    held: set[str] = set()
    count = 0
    for i in rng.permutation(len(names)):
        n = len(windows[names[i]])
        if count + n <= budget:
            held.add(names[i])
            count += n
    if not held and len(names) > 1:
        held.add(min(names, key=lambda name: (len(windows[name]), name)))
    return held


def open_pystdlib_packages(source: str, opts: PackOptions) -> Source:
    """The `pystdlib-packages` source: one Source per split in `splits` (train, eval)."""
    expect_builtin(source, "pystdlib-packages")
    tok = opts.tokenizer
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.int32
    root = stdlib_root()
    rng = np.random.default_rng(opts.seed)
    per_split: dict[str, list[tuple[list[str], np.ndarray]]] = {s: [] for s in SPLITS}
    for package in STDLIB_PACKAGES:
        windows = {str(p.relative_to(root)): _windows(p, opts, dtype) for p in _package_files(root, package)}
        held = _split_files(windows, rng=rng)
        for split in SPLITS:
            files = sorted(n for n in windows if len(windows[n]) and (n in held) == (split == "eval"))
            rows = np.concatenate([windows[n] for n in files]) if files else np.zeros((0, opts.seq_len + 1), dtype)
            per_split[split].append((files, rows))
    description = stdlib_description("pystdlib-packages", root)
    splits = {split: _split_source(split, per_split[split], opts=opts, rng=rng, description=description)
              for split in SPLITS}
    return Source("pystdlib-packages", description, [], splits=splits)


def _split_source(split: str, classes: list[tuple[list[str], np.ndarray]], *, opts: PackOptions,
                  rng: np.random.Generator, description: str) -> Source:
    """Balance the classes (seeded choice of windows), shuffle, and describe one split."""
    smallest = min(len(rows) for _, rows in classes)
    if smallest == 0:
        empty = STDLIB_PACKAGES[min(range(len(classes)), key=lambda c: len(classes[c][1]))]
        raise TemperError(f"--seq-len {opts.seq_len} leaves package {empty} no {split} window; lower --seq-len")
    cap = min(smallest, opts.limit) if opts.limit is not None else smallest
    tokens, labels = [], []
    for label, (_, rows) in enumerate(classes):
        keep = np.sort(rng.choice(len(rows), size=cap, replace=False))
        tokens.append(rows[keep])
        labels += [label] * cap
    all_tokens, all_labels = np.concatenate(tokens), np.asarray(labels)
    order = rng.permutation(len(all_labels))
    samples = ({"tokens.npy": all_tokens[i].copy(), "cls": int(all_labels[i])} for i in order)
    tok = opts.tokenizer
    extras: dict[str, Any] = {
        "split": split, "classes": list(STDLIB_PACKAGES), "class_counts": dict.fromkeys(STDLIB_PACKAGES, cap),
        "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "seq_len": opts.seq_len, "tokenizer": tok.describe(),
        "files": [name for files, _ in classes for name in files],
    }
    stats = {"documents": sum(len(files) for files, _ in classes)}
    return Source(f"pystdlib-packages-{split}", f"{description}, {split} split", samples, extras, stats)
