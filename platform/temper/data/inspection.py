"""`temper data inspect`: counts, keys and one decoded sample of WebDataset shards.

URL is a folder written by `temper data pack`, its manifest.json, a single .tar shard, or a
folder of .tar shards without a manifest (then counts come from reading the tars); or the
same on http(s):// or s3:// (a base URL holding manifest.json, a manifest URL, shard URLs).
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from temper.data import io as dio
from temper.data.manifest import (
    MANIFEST_NAME,
    Manifest,
    field_type,
    format_bytes,
    manifest_path,
    merge_types,
    sample_key,
    scan_shard,
    verify,
)
from temper.data.tokenizer import tokenizer_from_manifest
from temper.errors import TemperError

TOKEN_HEAD = 16  # token ids shown
TEXT_HEAD = 160  # decoded characters shown
ACCEPTED = "pass a folder written by `temper data pack`, its manifest.json, or a .tar shard"


def resolve(url: str) -> tuple[Manifest | None, Path, list[Path]]:
    """(manifest or None, folder, shard files) for a local URL."""
    path = Path(url.removeprefix("file://")).expanduser()
    if not path.exists():
        raise TemperError(f"URL {url} does not exist; {ACCEPTED}")
    if path.is_dir():
        if (path / MANIFEST_NAME).is_file():
            return _from_manifest(path / MANIFEST_NAME, only=None)
        tars = sorted(path.glob("*.tar"))
        if not tars:
            raise TemperError(f"URL {url} has no {MANIFEST_NAME} and no .tar shards; {ACCEPTED}")
        return None, path, tars
    if path.suffix == ".json":
        return _from_manifest(path, only=None)
    if path.suffix == ".tar":
        beside = path.parent / MANIFEST_NAME
        if beside.is_file():
            return _from_manifest(beside, only=path.name)
        return None, path.parent, [path]
    raise TemperError(f"URL {url} is neither a folder, a .json manifest nor a .tar shard; {ACCEPTED}")


def _from_manifest(path: Path, *, only: str | None) -> tuple[Manifest, Path, list[Path]]:
    manifest = Manifest.load(path)
    names = [s.name for s in manifest.shards if only is None or s.name == only]
    if only is not None and not names:
        names = [only]  # a stray tar beside a manifest that does not list it
    return manifest, path.parent, [path.parent / n for n in names]


def first_sample(shard: Path) -> dict[str, bytes]:
    """The first sample of a shard as {'__key__': key, ext: raw bytes, ...}."""
    sample: dict[str, Any] = {}
    try:
        with tarfile.open(shard, mode="r|") as tar:
            for member in tar:
                key = sample_key(member.name)
                if not member.isreg() or key is None:
                    continue
                if sample and key != sample["__key__"]:
                    break
                sample["__key__"] = key
                sample[member.name.rsplit("/", 1)[-1].split(".", 1)[1]] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise TemperError(f"shard {shard} is not a readable tar file ({e}); re-run `temper data pack`") from e
    if not sample:
        raise TemperError(f"shard {shard} holds no samples; re-run `temper data pack`")
    return sample


def decode_field(ext: str, data: bytes) -> Any:
    """Raw field bytes -> a Python value (.npy -> ndarray, cls -> int, text -> str, else bytes)."""
    last = ext.rsplit(".", 1)[-1]
    if last == "npy":
        return np.load(io.BytesIO(data), allow_pickle=False)
    if last in ("cls", "cls2", "index"):
        return int(data)
    if last in ("txt", "text", "json"):
        return data.decode("utf-8", errors="replace")
    return data


def describe_value(ext: str, value: Any, *, tokenizer: Any = None) -> list[str]:
    """Lines showing one decoded field."""
    if isinstance(value, np.ndarray):
        line = f"{value.dtype} {tuple(value.shape)}"
        if ext == "tokens.npy":
            head = value[:TOKEN_HEAD].tolist()
            lines = [f"{line}: {head}{' ...' if value.size > TOKEN_HEAD else ''}"]
            if tokenizer is not None:
                lines.append(f"text: {tokenizer.decode(value)[:TEXT_HEAD]!r}")
            return lines
        if value.size and np.issubdtype(value.dtype, np.number):
            line += f", min {value.min():.4g}, max {value.max():.4g}"
        return [line]
    if isinstance(value, bytes):
        return [_describe_image(ext, value)]
    return [repr(value) if isinstance(value, str) else str(value)]


def _describe_image(ext: str, data: bytes) -> str:
    try:
        from PIL import Image
    except ImportError:
        return f"{len(data)} bytes (install Pillow to decode)"
    try:
        with Image.open(io.BytesIO(data)) as im:
            arr = np.asarray(im)
            return f"{im.format} {im.width}x{im.height} {im.mode} -> {arr.dtype} {tuple(arr.shape)}"
    except Exception:
        return f"{len(data)} bytes (not a decodable image)"


def inspect_lines(url: str, *, check: bool = False) -> list[str]:
    """What `temper data inspect URL` prints."""
    dio.check_scheme(url)
    if dio.is_remote(url):
        return _remote_lines(url, check=check)
    manifest, root, shards = resolve(url)
    lines: list[str] = []
    if check:
        if manifest is None:
            raise TemperError(f"--verify needs a {MANIFEST_NAME}; URL {url} has none")
        verify(root)
        lines.append(f"verified   {len(manifest.shards)} shard(s): bytes, sha256 and sample counts match")
    for shard in shards:
        if not shard.is_file():
            raise TemperError(f"shard {shard} listed in the manifest is missing; re-run `temper data pack`")
    sample = first_sample(shards[0])
    if manifest is not None:
        lines += _manifest_lines(manifest, str(root), {p.name for p in shards})
        tokenizer = _tokenizer(manifest, root, lines)
    else:
        lines += _scan_lines(root, shards, sample)
        tokenizer = None
    return lines + _sample_lines(sample, shards[0].name, tokenizer)


def _sample_lines(sample: dict[str, Any], shard_name: str, tokenizer: Any) -> list[str]:
    lines = [f"sample     {sample['__key__']} (from {shard_name})"]
    for ext in sorted(k for k in sample if not k.startswith("__")):
        shown = describe_value(ext, decode_field(ext, sample[ext]), tokenizer=tokenizer)
        lines += [f"  {ext:<12} {shown[0]}", *(f"  {'':<12} {s}" for s in shown[1:])]
    return lines


def _remote_lines(url: str, *, check: bool) -> list[str]:
    """http(s):// and s3:// (credentials and endpoint from the standard AWS environment)."""
    from temper.data.plan import ShardSlice
    from temper.data.shards import check_shards, resolve_shards
    from temper.data.stream import Bad, read_slice

    options = dio.IOOptions()
    shards = resolve_shards(url, options=options, field="URL")
    lines: list[str] = []
    check_shards(shards, verify="sha256" if check else "size", options=options, field="URL")
    if check:
        lines.append(f"verified   {len(shards.urls)} shard(s): bytes and sha256 match the manifest")
    first = next((i for i, n in enumerate(shards.sizes) if n), 0)
    sample = next(read_slice(shards, ShardSlice(first, 0, 1), options=options))
    if isinstance(sample, Bad):
        raise TemperError(f"shard {sample.url} is not readable: {sample.reason}")
    names = {u.rsplit("/", 1)[-1] for u in shards.urls}
    tokenizer = None
    if shards.manifest is not None:
        lines += _manifest_lines(shards.manifest, url, names)
        if shards.manifest.extras.get("tokenizer", {}).get("kind") == "bytes":
            tokenizer = _tokenizer(shards.manifest, Path("."), lines)
    else:
        lines += [f"dataset    {url} (no {MANIFEST_NAME}: counts read from the tar files)",
                  f"shards     {len(shards.urls)}", f"samples    {shards.num_samples}"]
    return lines + _sample_lines(sample, shards.urls[first].rsplit("/", 1)[-1], tokenizer)


def _tokenizer(manifest: Manifest, root: Path, lines: list[str]) -> Any:
    """The dataset's tokenizer for decoding token samples; None (with a note) if unavailable."""
    if "tokenizer" not in manifest.extras:
        return None
    try:
        return tokenizer_from_manifest(manifest.extras["tokenizer"], root)
    except TemperError as e:
        lines.append(f"note       token ids shown undecoded: {e}")
        return None


def _manifest_lines(manifest: Manifest, root: str, names: set[str]) -> list[str]:
    infos = [s for s in manifest.shards if s.name in names] or manifest.shards
    samples, size = sum(s.num_samples for s in infos), sum(s.bytes for s in infos)
    lines = [
        f"dataset    {root} (format {manifest.format}, source {manifest.source}, created {manifest.created})",
        f"shards     {len(infos)}" + (f" of {len(manifest.shards)}" if len(infos) < len(manifest.shards) else ""),
        f"samples    {samples}",
        f"bytes      {size} ({format_bytes(size)})",
        "keys       " + ", ".join(f"{k}: {v}" for k, v in manifest.keys.items()),
    ]
    extras = manifest.extras
    if "classes" in extras:
        names = ", ".join(map(str, extras["classes"][:10])) + (", ..." if len(extras["classes"]) > 10 else "")
        lines.append(f"classes    {len(extras['classes'])}: {names}")
    if "vocab_size" in extras:
        tok = extras.get("tokenizer", {}).get("kind", "none")
        lines.append(
            f"tokens     vocab {extras['vocab_size']}, eos {extras.get('eos_id')}, "
            f"seq_len {extras.get('seq_len')}, tokenizer {tok}"
        )
    return lines


def _scan_lines(root: Path, shards: list[Path], sample: dict[str, bytes]) -> list[str]:
    samples = size = 0
    for shard in shards:
        n, b, _, error = scan_shard(shard)
        if error is not None:
            raise TemperError(f"shard {shard} is not a readable tar file ({error}); re-run `temper data pack`")
        samples, size = samples + n, size + b
    keys: dict[str, str] = {}
    for ext in sorted(k for k in sample if k != "__key__"):
        keys[ext] = merge_types(None, field_type(ext, decode_field(ext, sample[ext])))
    return [
        f"dataset    {root} (no {MANIFEST_NAME}: counts read from the tar files)",
        f"shards     {len(shards)}",
        f"samples    {samples}",
        f"bytes      {size} ({format_bytes(size)})",
        "keys       " + ", ".join(f"{k}: {v}" for k, v in keys.items()) + " (from the first sample)",
    ]


__all__ = ["decode_field", "first_sample", "inspect_lines", "manifest_path", "resolve"]
