"""`temper data ...`: pack sources into WebDataset shards, inspect shards.

Wired into the main app with `app.add_typer(data_app, name="data")`; errors are TemperErrors,
which `temper.cli.main` prints as one line each (exit 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from temper.console import console

data_app = typer.Typer(
    name="data",
    help="Pack data into WebDataset tar shards with a manifest; inspect shards.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@data_app.command("pack")
def pack_cmd(
    source: Annotated[str, typer.Argument(
        help="A file or folder, or a built-in source: digits, pystdlib, pystdlib-packages; for --format synthetic: "
             "tokens or images.", show_default=False)],
    out_dir: Annotated[Path, typer.Argument(help="Folder for the shards (empty or new).", show_default=False)],
    fmt: Annotated[str, typer.Option(
        "--format", "-f", help="imagefolder, text, npy, digits, pystdlib, pystdlib-packages or synthetic.",
        show_default=False)],
    shard_size: Annotated[int | None, typer.Option(help="Samples per shard.")] = None,
    max_shard_bytes: Annotated[str | None, typer.Option(
        help="Largest shard file, e.g. 268435456, 256MB, 1GiB (default 256MiB unless --shard-size).")] = None,
    seq_len: Annotated[int, typer.Option(help="Text formats: tokens per sequence (+1 stored).")] = 256,
    tokenizer: Annotated[Path | None, typer.Option(
        help="Text formats: a local HF tokenizers JSON file (default: byte-level, vocab 257).")] = None,
    limit: Annotated[int | None, typer.Option(
        help="Pack at most this many samples (pystdlib-packages: per class and split).")] = None,
    seed: Annotated[int, typer.Option(help="Seeds the sample (text: document) order.")] = 0,
    prefix: Annotated[str | None, typer.Option(help="Shard name prefix (default: the source name).")] = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace the manifest and shards already in OUT_DIR.")] = False,
) -> None:
    """Pack SOURCE into WebDataset tar shards plus manifest.json under OUT_DIR."""
    from temper.data.manifest import format_bytes
    from temper.data.pack import check_format, pack, parse_size

    check_format(fmt)
    size = parse_size(max_shard_bytes) if max_shard_bytes is not None else None
    with console.status(f"packing {source} ({fmt}) into {out_dir} ..."):
        manifest = pack(
            source, out_dir, fmt=fmt, shard_size=shard_size, max_shard_bytes=size, seq_len=seq_len,
            tokenizer=tokenizer, limit=limit, seed=seed, prefix=prefix, overwrite=overwrite,
        )
    from temper.data.manifest import Manifest

    folders = [out_dir]
    if "split" in manifest.extras:  # one dataset per split: OUT_DIR/train, OUT_DIR/eval
        folders = sorted((p.parent for p in Path(out_dir).glob("*/manifest.json")), key=lambda p: p.name != "train")
    for folder in folders:
        m = Manifest.load(folder) if folder != out_dir else manifest
        keys = ", ".join(f"{k}: {v}" for k, v in m.keys.items())
        console.print(
            f"packed {m.num_samples} samples into {len(m.shards)} shard(s), "
            f"{format_bytes(m.total_bytes)}: {folder}/manifest.json  ({keys})",
            markup=False,
        )
        if "class_counts" in m.extras:
            console.print("  per class: " + ", ".join(f"{k} {v}" for k, v in m.extras["class_counts"].items()),
                          markup=False)


@data_app.command("inspect")
def inspect_cmd(
    url: Annotated[str, typer.Argument(
        help="A folder or http(s)/s3 URL written by `temper data pack`, its manifest.json, or .tar shard(s).", show_default=False)],
    verify: Annotated[bool, typer.Option(
        "--verify", help="Also re-check every shard's bytes, sha256 and sample count.")] = False,
) -> None:
    """Print shard and sample counts, keys and their types, and one decoded sample."""
    from temper.data.inspection import inspect_lines

    for line in inspect_lines(url, check=verify):
        console.print(line, markup=False)
