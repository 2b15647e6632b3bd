"""Writing an opened Source under OUT_DIR: the OUT_DIR checks (and what --overwrite replaces),
the shards through a ShardSink, then `manifest.json` (last, so a folder without one is
unfinished) and, for a HF tokenizer, a copy of it beside the shards."""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from temper.data.manifest import MANIFEST_NAME, Manifest, ShardInfo
from temper.data.pack.sink import ShardSink, write_samples
from temper.data.pack.source import PATH_FORMATS, Source
from temper.data.tokenizer import TOKENIZER_FILE, Tokenizer
from temper.errors import TemperError

logger = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 256 * 2**20
SHARD_RE = r"-\d{6}\.tar"


@dataclass(frozen=True)
class WriteOptions:
    """How `pack()` was called: what shapes the shards and what the manifest records."""

    fmt: str
    source: str  # SOURCE as given
    shard_size: int | None
    max_shard_bytes: int | None
    seq_len: int
    limit: int | None
    seed: int
    prefix: str | None
    overwrite: bool
    tok: Tokenizer | None


def stale_files(out: Path, *, prefix: str) -> list[Path]:
    """What --overwrite replaces: the old manifest, its shards, and our shard/partial names."""
    names = {MANIFEST_NAME, TOKENIZER_FILE}
    try:
        names |= {s.name for s in Manifest.load(out).shards}
    except TemperError:
        pass
    pattern = re.compile(rf"\.?{re.escape(prefix)}{SHARD_RE}(\.partial)?")
    return sorted(p for p in out.iterdir() if p.is_file() and (p.name in names or pattern.fullmatch(p.name)))


def check_out_dir(out: Path, *, source: str, fmt: str, overwrite: bool, prefix: str) -> list[Path]:
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
    return stale_files(out, prefix=prefix) if entries else []


def remove_stale(out: Path, stale: list[Path], *, keep: list[Path]) -> None:
    stale = [p for p in stale if p not in keep]  # an old .partial may share a new one's name
    if stale:
        logger.warning("--overwrite: removing %d old file(s) from %s: %s", len(stale), out,
                       ", ".join(p.name for p in stale[:5]) + (" ..." if len(stale) > 5 else ""))
    (out / MANIFEST_NAME).unlink(missing_ok=True)  # first: a folder without manifest is unfinished
    for path in stale:
        path.unlink(missing_ok=True)


def write_source(src: Source, out: Path, opts: WriteOptions) -> Manifest:
    """Write `src` as one dataset under `out`, or, for a source with splits, one per split
    under `out/<split>` (the source applied `limit` per class itself); returns the manifest
    (the first split's)."""
    if src.splits:
        if out.exists() and not out.is_dir():
            raise TemperError(f"OUT_DIR {out} is a file; pass a folder (it is created if missing)")
        for name in src.splits:  # refuse before writing any split
            check_out_dir(out / name, source=opts.source, fmt=opts.fmt, overwrite=opts.overwrite,
                          prefix=opts.prefix or src.splits[name].name)
        manifests = [_write_dataset(sub, out / name, opts, write_limit=None) for name, sub in src.splits.items()]
        return manifests[0]
    return _write_dataset(src, out, opts, write_limit=opts.limit)


def _write_dataset(src: Source, out: Path, opts: WriteOptions, *, write_limit: int | None) -> Manifest:
    """Write one source's samples into shards + manifest.json under `out`."""
    shard_prefix = opts.prefix or src.name
    stale = check_out_dir(out, source=opts.source, fmt=opts.fmt, overwrite=opts.overwrite, prefix=shard_prefix)
    max_shard_bytes = opts.max_shard_bytes
    if opts.shard_size is None and max_shard_bytes is None:
        max_shard_bytes = DEFAULT_MAX_SHARD_BYTES
    sink = ShardSink(out, prefix=shard_prefix, shard_size=opts.shard_size, max_shard_bytes=max_shard_bytes)
    try:
        keys = write_samples(src, sink, limit=write_limit)
        shards = sink.close()
        if not shards:
            raise _empty_error(opts.source, fmt=opts.fmt, src=src, seq_len=opts.seq_len)
        remove_stale(out, stale, keep=sink.partials)
        sink.commit()
    except BaseException:
        sink.abort()
        raise
    options = {"shard_size": opts.shard_size, "max_shard_bytes": max_shard_bytes, "seq_len": opts.seq_len,
               "limit": opts.limit, "seed": opts.seed}
    manifest = Manifest(
        format=opts.fmt, source=src.description, num_samples=sum(s.num_samples for s in shards),
        shards=shards, keys=dict(sorted(keys.items())), extras=_extras(src, shards=shards, options=options),
    )
    tok = opts.tok
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
