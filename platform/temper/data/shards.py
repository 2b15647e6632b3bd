"""Which shards a split has, how many samples each holds, and the preflight that checks them.

`data.train` / `data.eval` name a split in one of three ways:

- a folder or URL prefix holding `manifest.json` (`out/digits`, `https://host/digits`,
  `s3://bucket/digits`): the manifest lists the shards, their sample counts, bytes and sha256;
- the manifest itself (`.../manifest.json`);
- shard URLs: one `.tar`, a brace pattern (`s3://b/d/digits-{000000..000003}.tar`) or a
  `::`-separated list. A `manifest.json` beside the first shard that lists them supplies the
  counts; without one, every shard is read once at start to count its samples (and a
  warning says to pack with `temper data pack`, which writes one).

The plan (temper.data.plan) needs every shard's sample count before training starts, so that
every rank computes the same reads without talking to the others.
"""

from __future__ import annotations

import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from temper.data import io
from temper.data.manifest import MANIFEST_NAME, Manifest
from temper.data.tario import count_samples
from temper.errors import TemperError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardSet:
    """The shards of one split, in manifest order."""

    source: str  # what the spec said
    urls: tuple[str, ...]
    sizes: tuple[int, ...]  # samples per shard
    nbytes: tuple[int | None, ...]  # per the manifest (None: unknown)
    sha256: tuple[str | None, ...]
    first_index: tuple[int, ...]
    manifest: Manifest | None

    @property
    def num_samples(self) -> int:
        return sum(self.sizes)

    @property
    def key_prefix(self) -> str | None:
        return self.manifest.extras.get("key_prefix") if self.manifest else None

    def expected_key(self, shard: int, offset: int) -> str | None:
        """The sample key the manifest promises at (shard, offset), when it says."""
        prefix = self.key_prefix
        return f"{prefix}/{self.first_index[shard] + offset:09d}" if prefix else None

    def fingerprint(self) -> str:
        """Identifies the data a checkpointed position refers to (names, counts, hashes)."""
        names = [u.rsplit("/", 1)[-1] for u in self.urls]
        blob = json.dumps([names, list(self.sizes), list(self.sha256)]).encode()
        return hashlib.blake2b(blob, digest_size=8).hexdigest()


def load_manifest(url: str, *, options: io.IOOptions) -> Manifest:
    raw = io.read_bytes(url, options=options)
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TemperError(f"{url} is not valid JSON ({e}); re-run `temper data pack`") from e
    return Manifest.from_dict(data, where=url)


def resolve_shards(source: str, *, options: io.IOOptions, field: str = "data.train") -> ShardSet:
    """The ShardSet that `source` names (see the module docstring)."""
    source = source.strip()
    if not source:
        raise TemperError(f"{field} is empty; give a folder/URL written by `temper data pack`")
    io.check_scheme(source)
    last = source.rstrip("/").rsplit("/", 1)[-1]
    if last.endswith(".json"):
        return _from_manifest(source, io.parent(source), load_manifest(source, options=options), source)
    if ".tar" not in last:
        url = io.join(source, MANIFEST_NAME)
        if not io.exists(url, options=options):
            raise TemperError(
                f"{field}: {url} is missing or unreachable; point {field} at a folder written by "
                "`temper data pack` (it holds manifest.json), a manifest URL, or shard URLs like "
                "'.../name-{000000..000009}.tar'"
            )
        return _from_manifest(url, source.rstrip("/"), load_manifest(url, options=options), source)
    urls = io.expand(source)
    beside = io.join(io.parent(urls[0]), MANIFEST_NAME)
    if io.exists(beside, options=options):
        manifest = load_manifest(beside, options=options)
        listed = {s.name: s for s in manifest.shards}
        names = [u.rsplit("/", 1)[-1] for u in urls]
        if all(n in listed for n in names):
            chosen = [listed[n] for n in names]
            return ShardSet(source, tuple(urls), tuple(s.num_samples for s in chosen),
                            tuple(s.bytes for s in chosen), tuple(s.sha256 for s in chosen),
                            tuple(s.first_index for s in chosen), manifest)
        log.warning("%s does not list every shard of %s; counting samples by reading them", beside, source)
    return _counted(source, urls, options=options, field=field)


def _from_manifest(url: str, base: str, manifest: Manifest, source: str) -> ShardSet:
    if not manifest.shards:
        raise TemperError(f"{url} lists no shards; re-run `temper data pack`")
    shards = manifest.shards
    return ShardSet(
        source, tuple(io.join(base, s.name) for s in shards), tuple(s.num_samples for s in shards),
        tuple(s.bytes for s in shards), tuple(s.sha256 for s in shards),
        tuple(s.first_index for s in shards), manifest,
    )


def _counted(source: str, urls: list[str], *, options: io.IOOptions, field: str) -> ShardSet:
    log.warning(
        "%s has no manifest.json: reading all %d shard(s) once to count samples; "
        "`temper data pack` writes a manifest that makes this instant", source, len(urls),
    )

    def count(url: str) -> int:
        try:
            return count_samples(url, options=options)
        except TemperError as e:
            raise TemperError(f"{field}: {e}") from e

    with ThreadPoolExecutor(max_workers=min(8, len(urls))) as pool:
        sizes = list(pool.map(count, urls))
    first = [sum(sizes[:i]) for i in range(len(sizes))]
    return ShardSet(source, tuple(urls), tuple(sizes), (None,) * len(urls), (None,) * len(urls),
                    tuple(first), None)


def check_shards(shards: ShardSet, *, verify: str, options: io.IOOptions, field: str) -> None:
    """Preflight one split: every shard exists and is reachable; with `verify='size'` its byte
    size matches the manifest; with `verify='sha256'` its content hash does too (reads it all)."""
    if verify == "none":
        return

    def check(i: int) -> str | None:
        url, want = shards.urls[i], shards.nbytes[i]
        try:
            got = io.size_of(url, options=options)
        except TemperError as e:
            return f"{field}: {e}"
        if want is not None and got != want:
            return (f"{field}: {url} has {got} bytes but its manifest says {want}; the shard was "
                    "changed or truncated after packing: re-pack it or restore it")
        if verify == "sha256" and shards.sha256[i]:
            digest = _sha256(url, options=options)
            if digest != shards.sha256[i]:
                return (f"{field}: {url} has sha256 {digest[:12]}... but its manifest says "
                        f"{shards.sha256[i][:12]}...; the shard was changed after packing: re-pack it")
        return None

    with ThreadPoolExecutor(max_workers=min(16, len(shards.urls))) as pool:
        problems = [p for p in pool.map(check, range(len(shards.urls))) if p]
    if problems:
        extra = f" (and {len(problems) - 1} more shard(s))" if len(problems) > 1 else ""
        raise TemperError(problems[0] + extra, problems=problems)


def _sha256(url: str, *, options: io.IOOptions) -> str:
    digest = hashlib.sha256()
    with io.open_url(url, options=options) as f:
        while chunk := f.read(4 * 2**20):
            digest.update(chunk)
    return digest.hexdigest()
