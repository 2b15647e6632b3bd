"""Writing encoded samples into WebDataset tar shards: `ShardSink` (webdataset's TarWriter
under fixed headers, so the same samples give byte-identical shards) and `write_samples`."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
from pathlib import Path
from typing import Any

from temper.data.manifest import ShardInfo, field_type, merge_types
from temper.data.pack.source import Source

logger = logging.getLogger(__name__)

SHARD_MTIME = 0  # fixed tar header time: reproducible shards
TAR_BLOCK, TAR_RECORD = 512, 10240  # tarfile pads members to blocks, the archive to records


class HashingWriter(io.RawIOBase):
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


def tar_size(payload_bytes: int) -> int:
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
        self._hash: HashingWriter | None = None
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
        return self.max_bytes is not None and tar_size(self._payload + entry) > self.max_bytes

    def _open(self) -> None:
        from webdataset import TarWriter

        if not self.out_dir.exists():
            self.out_dir.mkdir(parents=True)
            self._created_dir = True
        path = self.out_dir / f".{self.name(len(self.shards))}.partial"
        self.partials.append(path)
        self._file = path.open("wb")
        self._hash = HashingWriter(self._file)
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


def write_samples(src: Source, sink: ShardSink, *, limit: int | None) -> dict[str, str]:
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
