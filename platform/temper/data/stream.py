"""Streaming WebDataset shards into training batches, following the deterministic plan.

One torch DataLoader per training run streams `ShardStream`: its worker w computes each
epoch's plan (temper.data.plan: the same on every rank, equal batch counts) and reads exactly
`plan.for_rank(rank)[w]`: the planned sample ranges of each shard, in order, through
webdataset's tar iterator (temper.data.tario) over `temper.data.io.open_url` (local, http(s),
s3); under `data.subset` the plan's offsets index each shard's kept samples (temper.data.subset).
The worker delivers its reads through its shuffle window, decodes them, applies the optional
transform, and collates whole batches; the DataLoader interleaves workers round-robin, the
order the plan's resume arithmetic assumes.

Corrupt data (a field that does not decode, a sample missing from a truncated shard) follows
`data.on_error`: `fail` raises an error naming the shard and the sample key; `skip` logs a
warning, counts it, and puts a copy of a good sample from the same worker in its place, so
every rank still yields exactly the planned number of batches (uneven counts hang DDP).
"""

from __future__ import annotations

import importlib
import logging
import random
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from itertools import chain, islice
from typing import Any

from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from temper.data import io
from temper.data.base import derive_seed, seeded_generator
from temper.data.decode import DecodeError, Decoder
from temper.data.plan import EpochPlan, ReadSegment, ShardSlice, WorkerPlan, build_epoch_plan
from temper.data.shards import ShardSet
from temper.data.subset import Subset
from temper.data.tario import tar_samples
from temper.errors import TemperError

log = logging.getLogger(__name__)
WARN_FIRST = 10  # skip warnings per worker before they thin out to every 100th


@dataclass(frozen=True)
class Bad:
    """A planned sample that could not be read or decoded."""

    url: str
    key: str
    reason: str

    def error(self) -> TemperError:
        return TemperError(
            f"data: shard {self.url} sample {self.key}: {self.reason}; fix or re-pack the shard "
            "(`temper data pack`), or set data.on_error=skip to skip such samples"
        )


def read_slice(shards: ShardSet, piece: ShardSlice, *, options: io.IOOptions,
               subset: Subset | None = None) -> Iterator[dict[str, Any] | Bad]:
    """Exactly len(piece) items: the raw samples at offsets start..stop-1 of the shard (with a
    `subset`: at the shard positions its kept indices start..stop-1 name; the samples between
    are streamed past, not decoded), or a `Bad` for each one that could not be read (truncated
    or unreadable shard, wrong key)."""
    shard = piece.shard
    url = shards.urls[shard]
    wanted = subset.positions(shard)[piece.start : piece.stop] if subset else range(piece.start, piece.stop)
    expected_key = shards.expected_key if shards.key_prefix else None  # None: the manifest names no keys
    offset, got, reason = 0, 0, None
    try:
        with io.open_url(url, options=options, size=shards.nbytes[shard]) as stream:
            for sample in tar_samples(stream, url):
                if got == len(wanted):
                    break
                if offset == wanted[got]:
                    if expected_key is not None and sample["__key__"] != (want := expected_key(shard, offset)):
                        raise TemperError(
                            f"data: shard {url} holds sample {sample['__key__']} at position {offset} "
                            f"but its manifest says {want}; the shard does not match the manifest: re-pack it"
                        )
                    yield sample
                    got += 1
                offset += 1
    except TemperError:
        raise
    except Exception as e:  # noqa: BLE001 - tarfile, network and decompression errors
        reason = f"the shard could not be read past sample {offset} ({type(e).__name__}: {e})"
    if got < len(wanted):
        reason = reason or f"the shard ends after {offset} samples, its manifest says {shards.sizes[shard]}"
        for missing in wanted[got:]:
            yield Bad(url, shards.expected_key(shard, missing) or f"#{missing}", reason)


def load_transform(path: str | None) -> Callable | None:
    """'package.module:function' -> the function; errors name data.transform."""
    if not path:
        return None
    module, _, name = path.partition(":")
    if not module or not name:
        raise TemperError(f"data.transform '{path}' must look like 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise TemperError(f"data.transform '{path}' cannot be imported ({e}); check the module path and name") from e
    if not callable(fn):
        raise TemperError(f"data.transform '{path}' is not callable")
    return fn


@dataclass(frozen=True)
class EpochCursor:
    """Where a pass starts: the epoch, its earlier read segments, samples already taken per rank."""

    epoch: int = 0
    history: tuple[ReadSegment, ...] = ()
    start_sample: int = 0


@dataclass(frozen=True)
class Layout:
    """Everything that shapes a rank's plan, picklable for the loader's worker processes."""

    shard_sizes: tuple[int, ...]
    seed: int
    rank: int
    world_size: int
    num_workers: int
    batch_size: int
    policy: str
    shuffle_window: int

    def plan(self, cursor: EpochCursor) -> EpochPlan:
        return build_epoch_plan(
            shard_sizes=self.shard_sizes, epoch=cursor.epoch, seed=self.seed, world_size=self.world_size,
            num_workers=self.num_workers, batch_size=self.batch_size, policy=self.policy,
            start_sample=cursor.start_sample, history=cursor.history, shuffle_window=self.shuffle_window,
        )


class ShardStream(IterableDataset):
    """Collated batches of one rank's planned reads; DataLoader worker w runs slot w.

    Training (`layout` given) is endless: each worker computes every epoch's plan itself and
    yields, per epoch, exactly as many items as the busiest worker has batches (real batches,
    then `{"__pad__": 1}` placeholders), so the DataLoader's round-robin starts every epoch at
    worker 0 and the real batches arrive in the order the plan's resume arithmetic assumes,
    with no worker restart between epochs. Evaluation (`reads` given) is one finite pass.
    """

    def __init__(self, *, shards: ShardSet, decoder: Decoder, on_error: str, transform: str | None,
                 seed: int, batch_size: int, options: io.IOOptions, layout: Layout | None = None,
                 cursor: EpochCursor = EpochCursor(), reads: WorkerPlan | None = None,
                 subset: Subset | None = None) -> None:
        self.shards, self.decoder, self.on_error, self.transform = shards, decoder, on_error, transform
        self.seed, self.batch_size, self.options = seed, batch_size, options
        self.layout, self.cursor, self.reads, self.subset = layout, cursor, reads, subset

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.layout is None:
            yield from self._batches(self.reads, epoch=0)
            return
        info = get_worker_info()
        slot, cursor = (info.id if info else 0), self.cursor
        while True:
            plan = self.layout.plan(cursor)
            rounds = max(plan.worker_batches(self.layout.rank), default=0)
            sent = 0
            for batch in self._batches(plan.for_rank(self.layout.rank)[slot], epoch=cursor.epoch):
                batch["__epoch__"] = cursor.epoch
                sent += 1
                yield batch
            for _ in range(rounds - sent):
                yield {"__pad__": 1, "__epoch__": cursor.epoch}
            cursor = EpochCursor(cursor.epoch + 1)

    def _batches(self, plan: WorkerPlan, *, epoch: int) -> Iterator[dict[str, Any]]:
        reads = chain.from_iterable(read_slice(self.shards, piece, options=self.options, subset=self.subset)
                                    for piece in plan.slices)
        samples = self._samples(plan.deliver(reads), epoch=epoch, worker=plan.worker)
        while chunk := list(islice(samples, self.batch_size)):
            yield default_collate(chunk)

    def _samples(self, items: Iterator[dict[str, Any] | Bad], *, epoch: int, worker: int) -> Iterator[dict[str, Any]]:
        """Each item decoded and transformed, in order; an item that is or becomes `Bad` (it
        does not decode) raises (on_error=fail), or is replaced by a copy of the last good
        sample, marked `__skipped__` (skip; before the first good one, by copies of that)."""
        transform = load_transform(self.transform)
        decoder, fail = self.decoder, self.on_error == "fail"
        last_good, pending, skipped = None, 0, 0
        for item in items:
            if not isinstance(item, Bad):
                try:
                    sample = decoder(item)
                except DecodeError as e:
                    item = Bad(item.get("__url__", "?"), item["__key__"], str(e))
                else:
                    if transform is not None:
                        sample = transform(sample, random.Random(derive_seed(self.seed, epoch, item["__key__"])))
                    sample["__key__"] = item["__key__"]
                    sample["__skipped__"] = 0
                    last_good = sample
                    for _ in range(pending):
                        yield {**sample, "__skipped__": 1}
                    pending = 0
                    yield sample
                    continue
            if fail:
                raise item.error()
            skipped += 1
            if skipped <= WARN_FIRST or skipped % 100 == 0:
                log.warning("data: skipping shard %s sample %s (%s); %d skipped by this loader worker",
                            item.url, item.key, item.reason, skipped)
            if last_good is None:
                pending += 1
            else:
                yield {**last_good, "__skipped__": 1}
        if pending:
            raise TemperError(
                f"data: every sample loader worker {worker} was given failed to read or decode "
                f"(data.on_error=skip has nothing to substitute); check the shards of {self.shards.source}"
            )


def _as_collated(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


def build_loader(stream: ShardStream, *, num_workers: int, pin_memory: bool, prefetch_factor: int,
                 persistent: bool = False) -> DataLoader:
    """A DataLoader over already-collated batches (the workers batch). Its collate_fn passes
    them on as they are: the default (`default_convert`, for un-batched items) would only
    rebuild every list and dict of a batch that `default_collate` already made, one call per
    element (per sample, for string and bytes fields). It has a generator of its own: a
    DataLoader iterator otherwise draws its seed from the global torch RNG, which would shift
    the training's dropout masks after a resume."""
    return DataLoader(
        stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
        prefetch_factor=prefetch_factor if num_workers else None,
        persistent_workers=persistent and num_workers > 0, collate_fn=_as_collated,
        generator=seeded_generator(stream.seed, "loader"),
    )


def segments_to_state(segments: tuple[ReadSegment, ...]) -> list[dict[str, int]]:
    return [asdict(s) for s in segments]


def segments_from_state(items: list[dict[str, int]]) -> tuple[ReadSegment, ...]:
    try:
        return tuple(ReadSegment(**item) for item in items)
    except TypeError as e:
        raise TemperError(f"data state has a malformed segment ({e}); the checkpoint is from another version") from e

