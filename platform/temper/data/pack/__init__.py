"""`temper data pack`: turn a source into WebDataset tar shards plus `manifest.json`.

Formats (SOURCE meaning in brackets): `imagefolder` [folder/<class>/<image>.png|jpg],
`text` [a .txt/.md/.py/.jsonl file or a folder of them], `npy` [a .npy array, one sample per
row, or a folder of .npy files, one sample each; a sibling labels.npy adds `cls`], `digits`
[built-in: scikit-learn's bundled 8x8 digits], `pystdlib` [built-in: this Python's standard
library source as a text corpus], `pystdlib-packages` [built-in: stdlib code windows labelled
by package, written as OUT_DIR/train and OUT_DIR/eval; see temper.data.pack.pystdlib_packages],
`synthetic` [`tokens` or `images`, seeded generators].

Each format has its module here (temper.data.pack.<format>, '-' as '_') with the reader that
opens its SOURCE; `SOURCES` maps --format to that reader. temper.data.pack.source holds what
readers share, temper.data.pack.write writes what one opened (shards through
temper.data.pack.sink, then the manifest).

Packing is deterministic: `seed` fixes the sample order (the document order for text), the
tar headers carry a fixed mtime/owner, so the same inputs give byte-identical shards. Shards
are written under temporary names and renamed when complete; the manifest comes last.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from temper.data.manifest import Manifest
from temper.data.pack.digits import open_digits
from temper.data.pack.imagefolder import open_imagefolder
from temper.data.pack.npy import open_npy
from temper.data.pack.pystdlib import open_pystdlib
from temper.data.pack.pystdlib_packages import open_pystdlib_packages
from temper.data.pack.source import TEXT_FORMATS, PackOptions, Source, did_you_mean
from temper.data.pack.synthetic import open_synthetic
from temper.data.pack.text import open_text
from temper.data.pack.write import WriteOptions, write_source
from temper.data.tokenizer import load_tokenizer
from temper.errors import TemperError

#: --format -> the reader that opens its SOURCE, in the order errors list them.
SOURCES: dict[str, Callable[[str, PackOptions], Source]] = {
    "digits": open_digits,
    "imagefolder": open_imagefolder,
    "npy": open_npy,
    "pystdlib": open_pystdlib,
    "pystdlib-packages": open_pystdlib_packages,
    "synthetic": open_synthetic,
    "text": open_text,
}
FORMATS = tuple(SOURCES)


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise TemperError(
            f"--format '{fmt}' is not a format; {did_you_mean(fmt, FORMATS)}accepted: {', '.join(FORMATS)}"
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
    opts = WriteOptions(fmt=fmt, source=source, shard_size=shard_size, max_shard_bytes=max_shard_bytes,
                        seq_len=seq_len, limit=limit, seed=seed, prefix=prefix, overwrite=overwrite, tok=tok)
    return write_source(src, out, opts)


__all__ = ["FORMATS", "SOURCES", "TEXT_FORMATS", "PackOptions", "Source", "check_format", "pack", "parse_size"]
