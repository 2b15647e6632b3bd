"""`temper data pack`: turn a source into WebDataset tar shards plus `manifest.json`.

Formats (SOURCE meaning in brackets): `imagefolder` [folder/<class>/<image>.png|jpg],
`text` [a .txt/.md/.py/.jsonl file or a folder of them], `npy` [a .npy array, one sample per
row, or a folder of .npy files, one sample each; a sibling labels.npy adds `cls`], `digits`
[built-in: scikit-learn's bundled 8x8 digits], `pystdlib` [built-in: this Python's standard
library source as a text corpus], `pystdlib-packages` [built-in: stdlib code windows labelled
by package, written as OUT_DIR/train and OUT_DIR/eval; see temper.data.pack_sources],
`synthetic` [`tokens` or `images`, seeded generators].

Packing is deterministic: `seed` fixes the sample order (the document order for text), the
tar headers carry a fixed mtime/owner, so the same inputs give byte-identical shards. Shards
are written under temporary names and renamed when complete; the manifest comes last.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import sys
import sysconfig
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from temper.data.manifest import MANIFEST_NAME, Manifest, ShardInfo, field_type, merge_types
from temper.data.tokenizer import TOKENIZER_FILE, Tokenizer, load_tokenizer
from temper.errors import MissingDependencyError, TemperError

logger = logging.getLogger(__name__)

FORMATS = ("digits", "imagefolder", "npy", "pystdlib", "pystdlib-packages", "synthetic", "text")
TEXT_FORMATS = ("text", "pystdlib", "pystdlib-packages")
PATH_FORMATS = ("imagefolder", "npy", "text")  # SOURCE is a file or folder
BUILTIN_SOURCES = {"digits": "scikit-learn's bundled 8x8 digits", "pystdlib": "the Python standard library",
                   "pystdlib-packages": "Python standard library code labelled by package"}
SYNTHETIC_SOURCES = ("tokens", "images")
TEXT_SUFFIXES = (".txt", ".md", ".py", ".jsonl")
IMAGE_SUFFIXES = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg"}
IMAGE_MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "jpg": b"\xff\xd8\xff"}
STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
DEFAULT_MAX_SHARD_BYTES = 256 * 2**20
DEFAULT_SYNTHETIC_SAMPLES = 1024
SHARD_MTIME = 0  # fixed tar header time: reproducible shards
TAR_BLOCK, TAR_RECORD = 512, 10240  # tarfile pads members to blocks, the archive to records
SHARD_RE = r"-\d{6}\.tar"


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


# ------------------------------------------------------------------------------ validation


def _did_you_mean(value: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(value, list(choices), n=1)
    return f"did you mean '{close[0]}'? " if close else ""


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise TemperError(
            f"--format '{fmt}' is not a format; {_did_you_mean(fmt, FORMATS)}accepted: {', '.join(FORMATS)}"
        )
    return fmt


def _check_positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            flag = "--" + name.replace("_", "-")
            raise TemperError(f"{flag} {value} must be a positive integer; pass {flag} 1 or more")


def parse_size(text: str) -> int:
    """'1048576', '64MB', '1GiB', '512k' -> bytes (for --max-shard-bytes)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*", text.lower())
    if not m:
        raise TemperError(
            f"--max-shard-bytes '{text}' is not a size; pass bytes or a unit, e.g. 268435456, 256MB, 1GiB"
        )
    number, unit, binary = m.groups()
    base = 1024 if binary or unit == "" else 1000
    return int(float(number) * base ** "_kmgt".index(unit or "_"))


def _existing_path(source: str, fmt: str) -> Path:
    path = Path(source).expanduser()
    if not path.exists():
        hint = f", or --format {source} for the built-in source" if source in BUILTIN_SOURCES else ""
        raise TemperError(
            f"SOURCE {source} does not exist; pass an existing file or folder for --format {fmt}{hint}"
        )
    return path


def _expect_builtin(source: str, fmt: str) -> None:
    if source != fmt:
        raise TemperError(
            f"SOURCE '{source}' is not accepted by --format {fmt}; use SOURCE '{fmt}' "
            f"({BUILTIN_SOURCES[fmt]}) or pick --format text/npy/imagefolder for files"
        )


def source_name(text: str) -> str:
    """A key-safe name: letters, digits, '_' and '-' only (no '.' or '/'), at most 40 chars."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")[:40] or "data"


def _permutation(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(n)


# ---------------------------------------------------------------------------------- sources


def _digits(source: str, opts: PackOptions) -> Source:
    _expect_builtin(source, "digits")
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise MissingDependencyError("scikit-learn", feature="--format digits") from e
    bunch = load_digits()
    images, labels = bunch.images.astype(np.uint8), bunch.target.astype(np.int64)
    order = _permutation(len(labels), opts.seed)
    samples = ({"image.npy": images[i], "cls": int(labels[i])} for i in order)
    extras = {"classes": [str(c) for c in bunch.target_names], "value_range": [0, 16]}
    return Source("digits", "digits (scikit-learn load_digits)", samples, extras)


def _imagefolder(source: str, opts: PackOptions) -> Source:
    root = _existing_path(source, "imagefolder")
    layout = "--format imagefolder expects SOURCE/<class>/<image>.png|jpg"
    if not root.is_dir():
        raise TemperError(f"SOURCE {source} is a file; {layout}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise TemperError(f"SOURCE {source} has no class subfolders; {layout}")
    items: list[tuple[Path, int]] = []
    for cid, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise TemperError(
                f"SOURCE class folder {root / name} has no .png/.jpg/.jpeg images; add images or remove the folder"
            )
        items += [(p, cid) for p in files]
    order = _permutation(len(items), opts.seed)
    samples = (_image_sample(*items[i]) for i in order)
    return Source(source_name(root.resolve().name), str(root), samples, {"classes": classes})


def _image_sample(path: Path, cid: int) -> dict[str, Any]:
    ext = IMAGE_SUFFIXES[path.suffix.lower()]
    data = path.read_bytes()
    if not data.startswith(IMAGE_MAGIC[ext]):
        raise TemperError(f"SOURCE image {path} is not a {ext.upper()} file (bad signature); fix or remove it")
    return {ext: data, "cls": cid}


def _npy(source: str, opts: PackOptions) -> Source:
    path = _existing_path(source, "npy")
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
    order = _permutation(n, opts.seed)

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


def _synthetic(source: str, opts: PackOptions) -> Source:
    from temper.data.synthetic import MarkovTokens, TemplateImages
    from temper.data.tokenizer import BYTE_VOCAB_SIZE

    if source not in SYNTHETIC_SOURCES:
        raise TemperError(
            f"SOURCE '{source}' is not a synthetic source; {_did_you_mean(source, SYNTHETIC_SOURCES)}"
            f"accepted: {', '.join(SYNTHETIC_SOURCES)}"
        )
    n = opts.limit or DEFAULT_SYNTHETIC_SAMPLES
    common = {"noise": 0.1, "seed": opts.seed, "split": "train", "length": n}
    if source == "tokens":
        ds = MarkovTokens(vocab_size=BYTE_VOCAB_SIZE, seq_len=opts.seq_len, **common)
        samples = ({"tokens.npy": ds[i]["tokens"].numpy().astype(np.uint16)} for i in range(n))
        extras = {"vocab_size": BYTE_VOCAB_SIZE, "seq_len": opts.seq_len}
    else:
        ds = TemplateImages(num_classes=10, in_channels=3, image_size=32, **common)
        samples = ({"image.npy": s["image"].numpy(), "cls": int(s["label"])} for s in map(ds.__getitem__, range(n)))
        extras = {"classes": [str(c) for c in range(10)]}
    return Source(f"synthetic-{source}", f"synthetic {source} (seed {opts.seed})", samples, extras)


# ------------------------------------------------------------------------------------ text


def _text(source: str, opts: PackOptions) -> Source:
    path = _existing_path(source, "text")
    kinds = "/".join(TEXT_SUFFIXES)
    if path.is_file():
        if path.suffix.lower() not in TEXT_SUFFIXES:
            raise TemperError(f"SOURCE {source} is not a {kinds} file; pass such a file or a folder of them")
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES and p.is_file())
        if not files:
            raise TemperError(f"SOURCE {source} has no {kinds} files; add some or pass another folder")
    return _token_source(source_name(path.resolve().stem), str(path), files, opts)


def _pystdlib(source: str, opts: PackOptions) -> Source:
    _expect_builtin(source, "pystdlib")
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py") if not STDLIB_SKIP_DIRS & set(p.relative_to(root).parts[:-1])
    )
    version = ".".join(map(str, sys.version_info[:3]))
    return _token_source("pystdlib", f"pystdlib (Python {version} standard library, {root})", files, opts)


def _documents(path: Path) -> Iterator[str]:
    """A file's documents: the whole file, or each JSONL line's 'text' field."""
    if path.suffix.lower() != ".jsonl":
        yield path.read_text(encoding="utf-8", errors="replace")
        return
    with path.open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise TemperError(
                    f"SOURCE {path}:{lineno} is not valid JSON ({e.msg}); write one JSON object per line"
                ) from e
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise TemperError(f"SOURCE {path}:{lineno} has no 'text' string field; add \"text\": \"...\"")
            yield record["text"]


def _token_source(name: str, description: str, files: list[Path], opts: PackOptions) -> Source:
    """Documents (files in seeded order) -> tokens + EOS -> fixed seq_len + 1 sequences."""
    tok = opts.tokenizer
    assert tok is not None
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.int32
    length = opts.seq_len + 1
    stats = {"documents": 0, "tokens": 0}

    def sequences() -> Iterator[dict[str, Any]]:
        pending: list[np.ndarray] = []
        buffered = emitted = 0
        for i in _permutation(len(files), opts.seed):
            for doc in _documents(files[i]):
                ids = tok.encode(doc)
                if ids.size == 0:
                    continue
                pending.append(np.append(ids, tok.eos_id).astype(dtype))
                buffered += ids.size + 1
                stats["documents"] += 1
                stats["tokens"] += ids.size + 1
                if buffered < length:
                    continue
                flat = np.concatenate(pending)
                cut = (len(flat) // length) * length
                for row in flat[:cut].reshape(-1, length):
                    yield {"tokens.npy": row.copy()}
                    emitted += 1
                    if opts.limit is not None and emitted >= opts.limit:
                        return
                pending, buffered = [flat[cut:]], len(flat) - cut

    extras = {"vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "seq_len": opts.seq_len,
              "tokenizer": tok.describe()}
    return Source(name, description, sequences(), extras, stats)


def _pystdlib_packages(source: str, opts: PackOptions) -> Source:
    from temper.data.pack_sources import pystdlib_packages

    return pystdlib_packages(source, opts)


SOURCES: dict[str, Callable[[str, PackOptions], Source]] = {
    "digits": _digits,
    "imagefolder": _imagefolder,
    "npy": _npy,
    "pystdlib": _pystdlib,
    "pystdlib-packages": _pystdlib_packages,
    "synthetic": _synthetic,
    "text": _text,
}


# ---------------------------------------------------------------------------------- writing


class _HashingWriter(io.RawIOBase):
    """A write-only file wrapper that hashes and counts every byte written through it."""

    def __init__(self, f: io.BufferedWriter) -> None:
        self.f, self.sha, self.count = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        data = bytes(b)
        self.f.write(data)
        self.sha.update(data)
        self.count += len(data)
        return len(data)


def _tar_size(payload_bytes: int) -> int:
    """Bytes of a finished tar whose members take `payload_bytes` (headers included)."""
    return -(-(payload_bytes + 2 * TAR_BLOCK) // TAR_RECORD) * TAR_RECORD


class ShardSink:
    """Writes samples into `{prefix}-{index:06d}.tar` shards (webdataset's TarWriter), rolling
    over at `shard_size` samples or before a shard would pass `max_shard_bytes`. Shards are
    written as hidden `.partial` files; `commit()` renames them, `abort()` deletes them."""

    def __init__(self, out_dir: Path, *, prefix: str, shard_size: int | None, max_shard_bytes: int | None) -> None:
        self.out_dir, self.prefix = out_dir, prefix
        self.shard_size, self.max_bytes = shard_size, max_shard_bytes
        self.shards: list[ShardInfo] = []
        self.partials: list[Path] = []
        self._writer: Any = None
        self._file: io.BufferedWriter | None = None
        self._hash: _HashingWriter | None = None
        self._count = self._payload = self._first = self._written = 0
        self._created_dir = False

    def name(self, index: int) -> str:
        return f"{self.prefix}-{index:06d}.tar"

    def write(self, key: str, fields: dict[str, bytes]) -> None:
        entry = sum(TAR_BLOCK + -(-len(v) // TAR_BLOCK) * TAR_BLOCK for v in fields.values())
        if self._writer is not None and self._full(entry):
            self._finish()
        if self._writer is None:
            self._open()
        self._writer.write({"__key__": key, **fields})
        self._count, self._payload, self._written = self._count + 1, self._payload + entry, self._written + 1

    def _full(self, entry: int) -> bool:
        if self.shard_size is not None and self._count >= self.shard_size:
            return True
        return self.max_bytes is not None and _tar_size(self._payload + entry) > self.max_bytes

    def _open(self) -> None:
        from webdataset import TarWriter

        if not self.out_dir.exists():
            self.out_dir.mkdir(parents=True)
            self._created_dir = True
        path = self.out_dir / f".{self.name(len(self.shards))}.partial"
        self.partials.append(path)
        self._file = path.open("wb")
        self._hash = _HashingWriter(self._file)
        self._writer = TarWriter(self._hash, user="temper", group="temper", mtime=SHARD_MTIME, encoder=False)
        self._count = self._payload = 0
        self._first = self._written

    def _finish(self) -> None:
        self._writer.close()
        self._file.close()
        info = ShardInfo(self.name(len(self.shards)), self._count, self._hash.count,
                         self._hash.sha.hexdigest(), first_index=self._first)
        if self.max_bytes is not None and info.bytes > self.max_bytes:
            logger.warning("shard %s holds one sample of %d bytes, over --max-shard-bytes %d",
                           info.name, info.bytes, self.max_bytes)
        logger.info("wrote %s: %d samples, %d bytes", info.name, info.num_samples, info.bytes)
        self.shards.append(info)
        self._writer = None

    def close(self) -> list[ShardInfo]:
        if self._writer is not None:
            self._finish()
        return self.shards

    def commit(self) -> None:
        for partial, info in zip(self.partials, self.shards, strict=True):
            os.replace(partial, self.out_dir / info.name)

    def abort(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(Exception):  # flushes into a file deleted below
                self._writer.close()
            self._writer = None
        if self._file is not None:
            self._file.close()
        for partial in self.partials:
            partial.unlink(missing_ok=True)
        if self._created_dir and not any(self.out_dir.iterdir()):
            self.out_dir.rmdir()


def _write_samples(src: Source, sink: ShardSink, *, limit: int | None) -> dict[str, str]:
    """Encode (webdataset's default handlers) and write every sample; returns field types."""
    from webdataset.writer import default_handlers, encode_based_on_extension

    keys: dict[str, str] = {}
    for index, sample in enumerate(src.samples):
        if limit is not None and index >= limit:
            break
        for ext, value in sample.items():
            keys[ext] = merge_types(keys.get(ext), field_type(ext, value))
        sink.write(f"{src.name}/{index:09d}", encode_based_on_extension(sample, default_handlers))
    return keys


# ------------------------------------------------------------------------------- OUT_DIR


def _stale_files(out: Path, *, prefix: str) -> list[Path]:
    """What --overwrite replaces: the old manifest, its shards, and our shard/partial names."""
    names = {MANIFEST_NAME, TOKENIZER_FILE}
    try:
        names |= {s.name for s in Manifest.load(out).shards}
    except TemperError:
        pass
    pattern = re.compile(rf"\.?{re.escape(prefix)}{SHARD_RE}(\.partial)?")
    return sorted(p for p in out.iterdir() if p.is_file() and (p.name in names or pattern.fullmatch(p.name)))


def _check_out_dir(out: Path, *, source: str, fmt: str, overwrite: bool, prefix: str) -> list[Path]:
    """Refuse unsafe OUT_DIRs; returns the files --overwrite will replace."""
    if out.exists() and not out.is_dir():
        raise TemperError(f"OUT_DIR {out} is a file; pass a folder (it is created if missing)")
    src = Path(source).expanduser()
    if fmt in PATH_FORMATS and src.is_dir() and out.resolve().is_relative_to(src.resolve()):
        raise TemperError(f"OUT_DIR {out} is inside SOURCE {source}; pass a folder outside the source")
    entries = sorted(out.iterdir()) if out.is_dir() else []
    if entries and not overwrite:
        raise TemperError(
            f"OUT_DIR {out} is not empty ({len(entries)} entries, e.g. {entries[0].name}); "
            "pass an empty or new folder, or --overwrite to replace the shards in it"
        )
    return _stale_files(out, prefix=prefix) if entries else []


def _remove_stale(out: Path, stale: list[Path], *, keep: list[Path]) -> None:
    stale = [p for p in stale if p not in keep]  # an old .partial may share a new one's name
    if stale:
        logger.warning("--overwrite: removing %d old file(s) from %s: %s", len(stale), out,
                       ", ".join(p.name for p in stale[:5]) + (" ..." if len(stale) > 5 else ""))
    (out / MANIFEST_NAME).unlink(missing_ok=True)  # first: a folder without manifest is unfinished
    for path in stale:
        path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------ pack


def pack(
    source: str, out_dir: str | Path, *, fmt: str, shard_size: int | None = None,
    max_shard_bytes: int | None = None, seq_len: int = 256, tokenizer: str | Path | None = None,
    limit: int | None = None, seed: int = 0, prefix: str | None = None, overwrite: bool = False,
) -> Manifest:
    """Pack SOURCE into WebDataset shards + manifest.json under OUT_DIR; returns the manifest.

    `shard_size` caps samples per shard, `max_shard_bytes` the shard file size (default
    256 MiB when neither is given). Text formats cut `seq_len + 1` token sequences. A source
    with splits (pystdlib-packages) writes one dataset per split under OUT_DIR/<split>, its
    `limit` counting per class; the first split's manifest is returned.
    """
    check_format(fmt)
    _check_positive(shard_size=shard_size, max_shard_bytes=max_shard_bytes, seq_len=seq_len, limit=limit)
    if prefix is not None and not re.fullmatch(r"[A-Za-z0-9_-]+", prefix):
        raise TemperError(f"--prefix '{prefix}' may hold only letters, digits, '_' and '-'; rename it")
    if tokenizer is not None and fmt not in TEXT_FORMATS:
        raise TemperError(f"--tokenizer applies to --format {' or '.join(TEXT_FORMATS)}; drop it for --format {fmt}")
    tok = load_tokenizer(tokenizer) if fmt in TEXT_FORMATS else None
    src = SOURCES[fmt](source, PackOptions(seq_len=seq_len, limit=limit, seed=seed, tokenizer=tok))
    out = Path(out_dir).expanduser()
    write = dict(fmt=fmt, source=source, shard_size=shard_size, max_shard_bytes=max_shard_bytes, seq_len=seq_len,
                 limit=limit, seed=seed, prefix=prefix, overwrite=overwrite, tok=tok)
    if src.splits:  # the source applies `limit` per class itself
        if out.exists() and not out.is_dir():
            raise TemperError(f"OUT_DIR {out} is a file; pass a folder (it is created if missing)")
        for name in src.splits:  # refuse before writing any split
            _check_out_dir(out / name, source=source, fmt=fmt, overwrite=overwrite, prefix=prefix or src.splits[name].name)
        manifests = [_pack_source(sub, out / name, **write, write_limit=None) for name, sub in src.splits.items()]
        return manifests[0]
    return _pack_source(src, out, **write, write_limit=limit)


def _pack_source(
    src: Source, out: Path, *, fmt: str, source: str, shard_size: int | None, max_shard_bytes: int | None,
    seq_len: int, limit: int | None, write_limit: int | None, seed: int, prefix: str | None, overwrite: bool,
    tok: Tokenizer | None,
) -> Manifest:
    """Write one source's samples into shards + manifest.json under `out`."""
    shard_prefix = prefix or src.name
    stale = _check_out_dir(out, source=source, fmt=fmt, overwrite=overwrite, prefix=shard_prefix)
    if shard_size is None and max_shard_bytes is None:
        max_shard_bytes = DEFAULT_MAX_SHARD_BYTES
    sink = ShardSink(out, prefix=shard_prefix, shard_size=shard_size, max_shard_bytes=max_shard_bytes)
    try:
        keys = _write_samples(src, sink, limit=write_limit)
        shards = sink.close()
        if not shards:
            raise _empty_error(source, fmt=fmt, src=src, seq_len=seq_len)
        _remove_stale(out, stale, keep=sink.partials)
        sink.commit()
    except BaseException:
        sink.abort()
        raise
    options = {"shard_size": shard_size, "max_shard_bytes": max_shard_bytes, "seq_len": seq_len,
               "limit": limit, "seed": seed}
    manifest = Manifest(
        format=fmt, source=src.description, num_samples=sum(s.num_samples for s in shards),
        shards=shards, keys=dict(sorted(keys.items())), extras=_extras(src, shards=shards, options=options),
    )
    if tok is not None and tok.describe()["kind"] == "hf":
        shutil.copyfile(tok.path, out / TOKENIZER_FILE)  # the dataset decodes without the original
    path = manifest.save(out)
    logger.info("packed %d samples into %d shard(s); manifest %s", manifest.num_samples, len(shards), path)
    return manifest


def _extras(src: Source, *, shards: list[ShardInfo], options: dict[str, Any]) -> dict[str, Any]:
    extras = {"key_prefix": src.name, **src.extras}
    if "classes" in extras:
        extras["num_classes"] = len(extras["classes"])
    if "seq_len" in extras:
        extras["num_tokens"] = sum(s.num_samples for s in shards) * (extras["seq_len"] + 1)
    if "documents" in src.stats:
        extras["documents"] = src.stats["documents"]
    return {**extras, "pack_options": options}


def _empty_error(source: str, *, fmt: str, src: Source, seq_len: int) -> TemperError:
    if "tokens" in src.stats:
        return TemperError(
            f"SOURCE {source} holds {src.stats['tokens']} tokens, fewer than one sequence of "
            f"--seq-len {seq_len} + 1; lower --seq-len or add text"
        )
    return TemperError(f"SOURCE {source} yields no samples for --format {fmt}; add data to it")
