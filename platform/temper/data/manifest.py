"""The shard manifest (`manifest.json` next to the shards), its verification, and `inspect`.

A packed dataset is a folder of WebDataset tar shards `{prefix}-{index:06d}.tar` plus
`manifest.json`, written last: a folder without a manifest is an unfinished pack. Sample keys
are `{name}/{global_index:09d}`, global_index running 0..num_samples-1 in shard order, so
shard s holds the global indices first_index .. first_index + num_samples - 1; readers can
map a global sample position to (shard, offset) from the manifest alone.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from temper.errors import TemperError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
IMAGE_TYPES = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg"}
_CORE = ("format_version", "format", "source", "created", "num_samples", "keys", "shards")


@dataclass
class ShardInfo:
    name: str
    num_samples: int
    bytes: int
    sha256: str
    first_index: int = 0


@dataclass
class Manifest:
    """What `temper data pack` wrote: shards, counts, checksums, field types, format extras."""

    format: str
    source: str
    num_samples: int
    shards: list[ShardInfo]
    keys: dict[str, str]
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    extras: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def total_bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def to_dict(self) -> dict[str, Any]:
        head = {k: getattr(self, k) for k in _CORE if k != "shards"}
        return {**head, "total_bytes": self.total_bytes, **self.extras,
                "shards": [asdict(s) for s in self.shards]}

    @classmethod
    def from_dict(cls, data: Any, *, where: str) -> Manifest:
        if not isinstance(data, dict) or any(k not in data for k in _CORE):
            missing = [k for k in _CORE if not isinstance(data, dict) or k not in data]
            raise TemperError(f"{where} lacks {', '.join(missing)}; re-run `temper data pack`")
        version = data["format_version"]
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise TemperError(
                f"{where} has format_version {version!r}, this temper reads "
                f"<= {FORMAT_VERSION}; upgrade temper"
            )
        try:
            shards = [ShardInfo(**s) for s in data["shards"]]
        except TypeError as e:
            raise TemperError(f"{where} has a malformed shards entry ({e}); re-run `temper data pack`") from e
        extras = {k: v for k, v in data.items() if k not in _CORE and k != "total_bytes"}
        return cls(**{k: data[k] for k in _CORE if k != "shards"}, shards=shards, extras=extras)

    @classmethod
    def load(cls, path_or_dir: str | Path) -> Manifest:
        """Read `manifest.json` (or the manifest inside a shard folder)."""
        path = manifest_path(path_or_dir)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise TemperError(
                f"{path} does not exist; pass a folder written by `temper data pack` or its manifest.json"
            ) from None
        except json.JSONDecodeError as e:
            raise TemperError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); re-run `temper data pack`") from e
        return cls.from_dict(data, where=str(path))

    def save(self, out_dir: str | Path) -> Path:
        """Write `out_dir/manifest.json` atomically (temporary file, then rename)."""
        path = Path(out_dir) / MANIFEST_NAME
        tmp = path.with_name(f".{MANIFEST_NAME}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, path)
        return path

    def shard_urls(self, base: str | Path) -> list[str]:
        """Each shard's URL under `base` (a folder, http(s):// or s3:// prefix)."""
        root = str(base).rstrip("/")
        return [f"{root}/{s.name}" for s in self.shards]


def manifest_path(path_or_dir: str | Path) -> Path:
    p = Path(path_or_dir).expanduser()
    return p / MANIFEST_NAME if p.is_dir() else p


# ----------------------------------------------------------------------------- field types


def field_type(ext: str, value: Any) -> str:
    """A short type string for a sample field: 'int32[257]', 'int', 'image/png', ..."""
    if isinstance(value, np.ndarray):
        return f"{value.dtype}[{','.join(str(d) for d in value.shape)}]"
    if isinstance(value, bool | int | np.integer):
        return "int"
    if isinstance(value, float | np.floating):
        return "float"
    if isinstance(value, str):
        return "str"
    return IMAGE_TYPES.get(ext, "bytes")


def merge_types(old: str | None, new: str) -> str:
    """One type for a field over all samples: arrays of varying shape become 'dtype[*]'."""
    if old is None or old == new:
        return new
    old_dtype, new_dtype = old.split("[")[0], new.split("[")[0]
    if "[" in old and "[" in new and old_dtype == new_dtype:
        return f"{old_dtype}[*]"
    return "mixed"


def format_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


# ------------------------------------------------------------------------------ verification


class _HashingReader(io.RawIOBase):
    """A read-only file wrapper that hashes and counts every byte read through it."""

    def __init__(self, f: io.BufferedReader) -> None:
        self.f, self.sha, self.count = f, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = self.f.readinto(b)
        self.sha.update(memoryview(b)[:n])
        self.count += n
        return n


def scan_shard(path: Path) -> tuple[int, int, str, str | None]:
    """(samples, bytes, sha256, tar error or None) of one shard file, in one streaming pass."""
    samples, last = 0, None
    with path.open("rb") as f:
        reader = _HashingReader(f)
        error = None
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                for member in tar:
                    key = sample_key(member.name)
                    if member.isreg() and key is not None and key != last:
                        samples, last = samples + 1, key
        except (tarfile.TarError, EOFError, OSError) as e:
            error = str(e) or type(e).__name__
        while reader.read(1 << 20):
            pass
    return samples, reader.count, reader.sha.hexdigest(), error


def verify(path_or_dir: str | Path) -> Manifest:
    """Recompute every shard's bytes, sha256 and sample count; raise naming the first bad shard."""
    path = manifest_path(path_or_dir)
    manifest = Manifest.load(path)
    fix = "re-run `temper data pack` (or re-copy the shard)"
    for shard in manifest.shards:
        file = path.parent / shard.name
        if not file.is_file():
            raise TemperError(f"shard {file} listed in {path} is missing; {fix}")
        samples, size, sha, error = scan_shard(file)
        if size != shard.bytes:
            raise TemperError(
                f"shard {file} has {size} bytes, the manifest says {shard.bytes} (truncated?); {fix}"
            )
        if sha != shard.sha256:
            raise TemperError(f"shard {file} sha256 {sha[:12]}... does not match the manifest (corrupted); {fix}")
        if error is not None:
            raise TemperError(f"shard {file} is not a readable tar file ({error}); {fix}")
        if samples != shard.num_samples:
            raise TemperError(
                f"shard {file} holds {samples} samples, the manifest says {shard.num_samples}; {fix}"
            )
    logger.info("verified %d shard(s) of %s", len(manifest.shards), path.parent)
    return manifest


def sample_key(member_name: str) -> str | None:
    """The sample key of a tar member name ('digits/000000001.image.npy' -> 'digits/000000001')."""
    head, _, base = member_name.rpartition("/")
    stem = base.split(".", 1)[0]
    if "." not in base or not stem:
        return None
    return f"{head}/{stem}" if head else stem
