"""`data.kind: webdataset`: this rank's batches from tar shards, its resumable position, and
the preflight that runs on the driver before any worker starts.

The position is (epoch, the epoch's read segments, skipped count, data fingerprint, data.subset):
see temper.data.plan for why a segment list and not a single global index. `state_dict()` after
k batches and `load_state_dict()` on a fresh bundle (same or another world size) continue with
exactly the samples an uninterrupted run would read next (same layout), or the unread rest of
the epoch re-split over the new layout. Under `data.subset` (temper.data.subset) the plan and the
position count kept training samples only; the eval split is always read whole.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from temper.data import io
from temper.data.base import Note
from temper.data.decode import Decoder, array_shape, resolve_fields
from temper.data.plan import eval_reads, resume_arguments
from temper.data.shards import ShardSet, check_shards, resolve_shards
from temper.data.stream import (
    EpochCursor,
    Layout,
    ShardStream,
    build_loader,
    load_transform,
    segments_from_state,
    segments_to_state,
)
from temper.data.subset import Subset, check_subset_size
from temper.errors import TemperError
from temper.spec.job import MODEL_INPUTS, JobSpec, WebDatasetSpec

log = logging.getLogger(__name__)


class ShardedData:
    """One rank's view of a sharded dataset (the DataBundle interface of temper.data.base)."""

    def __init__(self, *, spec: JobSpec, train: ShardSet, eval: ShardSet | None, rank: int,
                 world_size: int, pin_memory: bool = False) -> None:
        d: WebDatasetSpec = spec.data
        self.spec, self.d = spec, d
        self.train, self.eval = train, eval
        self.rank, self.world_size = rank, world_size
        self.batch_size = spec.train.micro_batch_size
        self.pin_memory = pin_memory
        self.options = io.IOOptions(s3_endpoint_url=d.s3_endpoint_url, timeout_s=d.timeout_s)
        self.decoder = build_decoder(spec, train)
        load_transform(d.transform)  # fail now, on the rank, not in a loader worker
        self.subset = training_subset(spec, train)
        if self.subset is not None:
            check_subset_size(self.subset, ranks=world_size, batch_size=self.batch_size)
            if rank == 0:
                log.info("%s", self.subset.describe())
        self.layout = Layout(
            shard_sizes=self.subset.sizes if self.subset else train.sizes, seed=spec.seed, rank=rank,
            world_size=world_size, num_workers=d.num_workers, batch_size=self.batch_size,
            policy=d.remainder, shuffle_window=d.shuffle_buffer,
        )
        self.cursor = EpochCursor()
        self.consumed = 0  # samples this rank took from the current epoch's plan
        self.skipped = 0  # substituted samples, this rank, since the start of the run
        self._plan = self.layout.plan(self.cursor)
        self.batches_per_epoch = self._plan.batches_per_rank
        self._eval_loader = None

    @property
    def has_eval(self) -> bool:
        return self.eval is not None

    @property
    def epoch(self) -> int:
        return self.cursor.epoch

    def _build_plan(self):
        return self.layout.plan(self.cursor)

    def _stream(self, **kw) -> ShardStream:
        d = self.d
        return ShardStream(decoder=self.decoder, on_error=d.on_error, transform=d.transform,
                           seed=self.spec.seed, batch_size=self.batch_size, options=self.options, **kw)

    def _subset_state(self) -> dict[str, Any] | None:
        return self.subset.state() if self.subset else None

    def _skip_empty_epochs(self) -> None:
        while self._plan.batches_per_rank == 0:  # resumed exactly at an epoch's end
            self.cursor, self.consumed = EpochCursor(self.cursor.epoch + 1), 0
            self._plan = self.layout.plan(self.cursor)

    def train_batches(self) -> Iterator[dict[str, Any]]:
        """Collated micro-batches forever, epoch after epoch, from the current position."""
        self._plan = self.layout.plan(self.cursor)
        self.consumed = 0
        self._skip_empty_epochs()
        stream = self._stream(shards=self.train, layout=self.layout, cursor=self.cursor, subset=self.subset)
        loader = build_loader(stream, num_workers=self.d.num_workers, pin_memory=self.pin_memory,
                              prefetch_factor=self.d.prefetch_factor)
        for batch in loader:
            if batch.pop("__pad__", 0):
                continue
            epoch = int(batch.pop("__epoch__"))
            if epoch != self.cursor.epoch:
                raise TemperError(f"data: rank {self.rank} got a batch of epoch {epoch} while in epoch "
                                  f"{self.cursor.epoch}; the shards changed while training (re-run preflight)")
            self.skipped += int(batch.pop("__skipped__").sum())
            self.consumed += self.batch_size
            if self.consumed == self._plan.batches_per_rank * self.batch_size:
                self.cursor, self.consumed = EpochCursor(epoch + 1), 0
                self._plan = self.layout.plan(self.cursor)
                self._skip_empty_epochs()
            yield batch

    def eval_batches(self) -> Iterable[dict[str, Any]] | None:
        """A finite pass over this rank's share of the eval split (never shuffled); the loader
        and its worker persist between evaluations."""
        if self.eval is None:
            return None
        if self._eval_loader is None:
            limit = self.spec.train.eval_batches * self.batch_size
            reads = eval_reads(shard_sizes=self.eval.sizes, rank=self.rank, world_size=self.world_size, limit=limit)
            self._eval_loader = build_loader(
                self._stream(shards=self.eval, reads=reads), num_workers=min(self.d.num_workers, 1),
                pin_memory=self.pin_memory, prefetch_factor=self.d.prefetch_factor, persistent=True,
            )
        return _without_meta(self._eval_loader)

    def state_dict(self) -> dict[str, Any]:
        """The position after the batches taken so far (same value on every rank)."""
        return {
            "kind": "webdataset", "epoch": self.cursor.epoch,
            "segments": segments_to_state(self._plan.segments(self.consumed)),
            "skipped": self.skipped, "fingerprint": self.train.fingerprint(), "subset": self._subset_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next `train_batches()` continues from `state` (any world size)."""
        if state.get("kind") != "webdataset":
            raise TemperError(f"data state is for data.kind {state.get('kind')!r}, not 'webdataset'; "
                              "resume with the data the checkpoint was written with")
        if state.get("fingerprint") != self.train.fingerprint():
            raise TemperError(
                f"data state was written for other shards than {self.train.source} (fingerprint "
                f"{state.get('fingerprint')} != {self.train.fingerprint()}); resume with the same data.train"
            )
        if (was := state.get("subset")) != (now := self._subset_state()):
            raise TemperError(
                f"data state was written with data.subset {_subset_text(was)}, this run has "
                f"{_subset_text(now)}; resume with the same data.subset, or start a new run (--no-resume)"
            )
        history, start = resume_arguments(
            segments_from_state(state["segments"]), world_size=self.world_size,
            num_workers=self.d.num_workers, batch_size=self.batch_size, shuffle_window=self.d.shuffle_buffer,
        )
        self.cursor = EpochCursor(int(state["epoch"]), history, start)
        self.skipped = int(state.get("skipped", 0))
        self._plan = self.layout.plan(self.cursor)  # validates the position against this data and layout
        self.consumed = 0


def _subset_text(state: dict[str, Any] | None) -> str:
    return f"fraction={state['fraction']} seed={state['seed']}" if state else "null (all samples)"


def training_subset(spec: JobSpec, train: ShardSet) -> Subset | None:
    """The kept training samples under `data.subset`; None: train on all of them."""
    sub = spec.data.subset
    return Subset.of(sub, urls=train.urls, sizes=train.sizes) if sub is not None else None


def _without_meta(loader: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for batch in loader:
        batch.pop("__skipped__", None)
        yield batch


def build_decoder(spec: JobSpec, shards: ShardSet) -> Decoder:
    keys = shards.manifest.keys if shards.manifest else None
    fields = resolve_fields(objective=spec.objective.kind, manifest_keys=keys, overrides=dict(spec.data.fields),
                            model_input=MODEL_INPUTS[spec.model.kind])
    extras = shards.manifest.extras if shards.manifest else {}
    model = spec.model
    value_range = extras.get("value_range")
    return Decoder(
        fields=fields,
        value_range=tuple(value_range) if value_range else None,
        image_size=getattr(model, "image_size", None),
        in_channels=getattr(model, "in_channels", None),
        seq_len=getattr(model, "seq_len", None),
    )


def check_compatible(spec: JobSpec, shards: ShardSet, *, field: str) -> None:
    """The model can train on these shards (shapes, vocab, classes), judged from the manifest."""
    if shards.manifest is None:
        return
    m, extras, keys = spec.model, shards.manifest.extras, shards.manifest.keys
    decoder = build_decoder(spec, shards)
    problems = []
    if "tokens" in decoder.fields:
        seq = extras.get("seq_len")
        if seq is not None and seq < m.seq_len:
            problems.append(f"{field}: sequences hold {seq} tokens + 1 but model.seq_len is {m.seq_len}; "
                            f"set model.seq_len<={seq} or re-pack with --seq-len {m.seq_len}")
        vocab = extras.get("vocab_size")
        if vocab is not None and vocab > m.vocab_size:
            problems.append(f"{field}: token ids go up to {vocab - 1} but model.vocab_size is {m.vocab_size}; "
                            f"set model.vocab_size>={vocab}")
    if "image" in decoder.fields:
        shape = array_shape(keys.get(decoder.fields["image"], ""))
        if shape is not None:
            chw = (1, *shape) if len(shape) == 2 else shape
            if len(chw) == 3 and chw[-1] in (1, 3, 4) and chw[0] not in (1, 3, 4):
                chw = (chw[2], chw[0], chw[1])
            if chw[0] != m.in_channels:
                problems.append(f"{field}: images have {chw[0]} channel(s) but model.in_channels is "
                                f"{m.in_channels}; set model.in_channels={chw[0]}")
            if chw[1:] != (m.image_size, m.image_size):
                problems.append(f"{field}: images are {chw[1]}x{chw[2]} but model.image_size is "
                                f"{m.image_size}; set model.image_size={chw[1]}")
    classes = extras.get("num_classes")
    if "label" in decoder.fields and classes is not None and classes > getattr(m, "num_classes", classes):
        problems.append(f"{field}: labels go up to {classes - 1} but model.num_classes is {m.num_classes}; "
                        f"set model.num_classes={classes}")
    if problems:
        raise TemperError(problems[0], problems=problems)


def _splits(spec: JobSpec, options: io.IOOptions) -> tuple[ShardSet, ShardSet | None]:
    d = spec.data
    train = resolve_shards(d.train, options=options, field="data.train")
    eval_ = resolve_shards(d.eval, options=options, field="data.eval") if d.eval else None
    return train, eval_


def preflight(spec: JobSpec) -> list[str]:
    """Check the shards before any worker starts; return warnings, raise on errors.

    Errors: a missing/unreachable manifest or shard (naming the URL), a size or sha256 that
    differs from the manifest, a model that cannot read the data, fewer samples (kept by
    `data.subset`) than one batch per rank. Warning: fewer shards than ranks x loader workers
    (workers then share shards by sample ranges, each streaming past the samples before its
    own). Note: how many training samples `data.subset` keeps."""
    d = spec.data
    options = io.IOOptions(s3_endpoint_url=d.s3_endpoint_url, timeout_s=d.timeout_s)
    train, eval_ = _splits(spec, options)
    problems: list[str] = []
    for name, shards in (("data.train", train), ("data.eval", eval_)):
        if shards is None:
            continue
        try:
            check_shards(shards, verify=d.verify, options=options, field=name)
            check_compatible(spec, shards, field=name)
        except TemperError as e:
            problems.extend(e.problems)
    workers = spec.resources.workers // getattr(spec.strategy, "tensor_parallel", 1)  # data replicas
    need = workers * spec.train.micro_batch_size
    if train.num_samples < need:
        problems.append(f"data.train has {train.num_samples} samples, fewer than {workers} data-parallel "
                        f"rank(s) x train.micro_batch_size {spec.train.micro_batch_size}; pack more data, "
                        "use fewer resources.workers or a smaller micro_batch_size")
    subset = training_subset(spec, train)
    if subset is not None:
        try:
            check_subset_size(subset, ranks=workers, batch_size=spec.train.micro_batch_size)
        except TemperError as e:
            problems.append(str(e))
    if problems:
        raise TemperError(problems[0], problems=problems)
    load_transform(d.transform)
    warnings: list[str] = [Note(subset.describe())] if subset is not None else []
    readers = workers * max(1, d.num_workers)
    non_empty = sum(1 for n in train.sizes if n)  # a subset keeps >= 1 sample of every non-empty shard
    if non_empty < readers:
        warnings.append(
            f"data.train has {non_empty} shard(s) for {workers} data-parallel rank(s) x {max(1, d.num_workers)} loader "
            f"worker(s); workers will share shards by sample ranges, each streaming past the samples "
            f"before its range (pack more, smaller shards with --shard-size for efficient reads)"
        )
    return warnings


def build_webdataset_data(spec: JobSpec, *, rank: int, world_size: int) -> ShardedData:
    options = io.IOOptions(s3_endpoint_url=spec.data.s3_endpoint_url, timeout_s=spec.data.timeout_s)
    train, eval_ = _splits(spec, options)
    check_compatible(spec, train, field="data.train")
    return ShardedData(spec=spec, train=train, eval=eval_, rank=rank, world_size=world_size,
                       pin_memory=torch.cuda.is_available() and spec.resources.gpus_per_worker > 0)
