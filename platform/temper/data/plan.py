"""The deterministic global read plan of a sharded dataset: who reads which samples, per epoch.

Pure functions of the manifest's per-shard sample counts and a few integers: no I/O, no
torch.distributed. Every rank computes the same plan and reads only its own part.

Epoch e
    1. shuffles the shard order with `random.Random(blake2b(f"{seed}:{epoch}"))` (never
       Python's `hash()`), skipping empty shards;
    2. concatenates the shuffled shards into one *stream* of positions 0..total-1 (kept as
       ranges, never as per-sample lists);
    3. evens the stream out so that every rank yields exactly the same number of batches
       (uneven counts hang DDP):
       - `"drop"`: each rank reads `total // world_size` rounded down to a multiple of
         `batch_size`; the tail of the stream (fewer than `world_size * batch_size` samples,
         a different tail each epoch since the shard order changes) is not read:
         `EpochPlan.dropped`. Choose it for large training sets.
       - `"pad"`: the stream is extended by re-reading its start (wrapping) up to the next
         multiple of `world_size * batch_size`: `EpochPlan.padded` samples are read twice.
         Choose it when every sample matters (small sets, evaluation).
    4. gives rank r the contiguous chunk `stream[r * per_rank:(r + 1) * per_rank]`, so reads
       stay sequential within shards (tar streaming), and splits that chunk into contiguous
       parts, one per dataloader worker, each a whole number of batches, the workers' batch
       counts differing by at most one (`num_workers=0`, in-process loading, counts as one
       worker). Shards are split by sample ranges, so more workers than shards is allowed
       (`EpochPlan.shards_per_worker_min == 0` tells a preflight to warn).

Read order. A torch `DataLoader` over an `IterableDataset` with several workers yields the
workers' batches round-robin: batch 0 of workers 0, 1, ..., then batch 1 of each worker that
has one, and so on. `EpochPlan.sample_ids(rank)` is that order: the order in which the
training loop sees the rank's samples.

Resume (same layout). A rank that consumed `start_sample` samples of the epoch (a multiple
of `batch_size`; the same number on every rank) gets the plan of exactly the samples it would
have seen next, in the same order: the workers skip what they had delivered, and their order
is rotated so that the round-robin continues with the worker that was next. With a shuffle
window, a worker re-reads its current window from the window's start and skips the part of
its permutation it had delivered (`WorkerPlan.skip`).

Resume with another layout: ONE rule. The layout is (world_size, workers, batch_size); the
checkpointed position of an epoch is the list of `ReadSegment`s it ran under (usually one).
When the layout changes mid-epoch, the samples already consumed (exactly known from the old
segments) are removed from the epoch's stream, and the *remaining* stream positions, still in
stream order, are re-split over the new layout with the same drop/pad rule (padding wraps to
the start of the epoch's stream). So nothing consumed is read again (under "drop"), nothing
unread is skipped beyond the new split's own remainder (`dropped < world_size * batch_size`),
and under "pad" every sample is still read at least once in the epoch. A plain
"global position" cannot describe this: with contiguous rank chunks the consumed samples
are `world_size` separate prefixes, not a prefix of the stream (and, with a shuffle window,
each worker's current window contributes the permuted subset it delivered, not a prefix).
`EpochPlan.segments(n)` gives
the position to checkpoint after n more samples per rank; `resume_arguments()` turns it into
`history` and `start_sample` for the next `build_epoch_plan`.
"""

from __future__ import annotations

import hashlib
import random
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Literal, TypeVar

from temper.errors import TemperError

Policy = Literal["drop", "pad"]
T = TypeVar("T")
_Ranges = list[tuple[int, int]]  # half-open position ranges of the epoch stream, in read order


@dataclass(frozen=True)
class ShardSlice:
    """Samples `start..stop-1` (half-open offsets) of shard `shard` (index into the manifest)."""

    shard: int
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class WorkerPlan:
    """What one dataloader worker of one rank reads this epoch, in order, and delivers.

    The worker reads `slices` in order. Without a shuffle window it delivers them as read.
    With `window` > 0 it cuts the reads into windows of `window` samples (the first one being
    window number `first_window` of its epoch sequence), delivers each in the permutation
    `window_order(len, *seed_parts, number)`, and drops the first `skip` deliveries of the
    first window (delivered before a resume). `num_samples` counts deliveries.
    """

    rank: int
    worker: int
    slices: tuple[ShardSlice, ...]
    num_samples: int
    window: int = 0
    first_window: int = 0
    skip: int = 0
    seed_parts: tuple = ()

    def deliver(self, reads: Iterable[T]) -> Iterator[T]:
        """`reads` (the items of `slices`, in read order) in delivery order."""
        if not self.window:
            yield from reads
            return
        it, number, skip = iter(reads), self.first_window, self.skip
        while buf := list(islice(it, self.window)):
            for k in window_order(len(buf), *self.seed_parts, number)[skip:]:
                yield buf[k]
            number, skip = number + 1, 0


@dataclass(frozen=True)
class ReadSegment:
    """A part of an epoch read under one layout: each rank consumed `samples_per_rank`."""

    world_size: int
    num_workers: int  # effective: 0 (in-process) is stored as 1
    batch_size: int
    samples_per_rank: int
    shuffle_window: int = 0


@dataclass(frozen=True)
class EpochPlan:
    """The reads of every (rank, worker) for (the rest of) one epoch."""

    epoch: int
    workers: tuple[WorkerPlan, ...]  # rank-major: rank 0's workers, then rank 1's, ...
    batches_per_rank: int
    dropped: int
    padded: int
    batch_size: int
    world_size: int
    num_workers: int  # effective number of workers per rank (>= 1)
    shard_order: tuple[int, ...]  # this epoch's shuffled order of the non-empty shards
    shards_per_worker_min: int  # non-empty shards // (world_size * workers); 0: workers share
    start_sample: int = 0
    history: tuple[ReadSegment, ...] = field(default=())
    shuffle_window: int = 0

    def for_rank(self, rank: int) -> tuple[WorkerPlan, ...]:
        """The plans of `rank`'s workers, in worker order."""
        if not 0 <= rank < self.world_size:
            raise TemperError(f"rank={rank} is outside 0..{self.world_size - 1}; pass a rank of this world")
        n = self.num_workers
        return self.workers[rank * n : (rank + 1) * n]

    def worker_batches(self, rank: int) -> tuple[int, ...]:
        """Batches per worker of `rank`; they sum to `batches_per_rank`."""
        return tuple(w.num_samples // self.batch_size for w in self.for_rank(rank))

    def sample_ids(self, rank: int) -> list[tuple[int, int]]:
        """`rank`'s (shard, offset) reads in DataLoader yield order (small data and tests only)."""
        b = self.batch_size
        batches = []
        for w in self.for_rank(rank):
            ids = list(w.deliver((s.shard, i) for s in w.slices for i in range(s.start, s.stop)))
            batches.append([ids[i : i + b] for i in range(0, len(ids), b)])
        rounds = max((len(x) for x in batches), default=0)
        return [i for k in range(rounds) for x in batches if k < len(x) for i in x[k]]

    def segments(self, consumed: int = 0) -> tuple[ReadSegment, ...]:
        """The epoch position to checkpoint once each rank consumed `consumed` samples of this plan."""
        now = ReadSegment(self.world_size, self.num_workers, self.batch_size,
                          self.start_sample + consumed, self.shuffle_window)
        return (*self.history, now)


def shard_order(*, num_shards: int, seed: int, epoch: int) -> list[int]:
    """The seeded shuffle of range(num_shards) for `epoch`: the same in every process."""
    digest = hashlib.blake2b(f"{seed}:{epoch}".encode(), digest_size=8).digest()
    order = list(range(num_shards))
    random.Random(int.from_bytes(digest, "little")).shuffle(order)
    return order


def window_order(length: int, *parts: object) -> list[int]:
    """The seeded permutation of range(length) for one shuffle window named by `parts`."""
    digest = hashlib.blake2b(repr(("window", *parts)).encode(), digest_size=8).digest()
    order = list(range(length))
    random.Random(int.from_bytes(digest, "little")).shuffle(order)
    return order


def resume_arguments(
    segments: Sequence[ReadSegment], *, world_size: int, num_workers: int, batch_size: int,
    shuffle_window: int = 0,
) -> tuple[tuple[ReadSegment, ...], int]:
    """(history, start_sample) for `build_epoch_plan` from a checkpointed epoch position.

    Same layout (and shuffle window) as the last segment: continue it (`start_sample` = its
    samples per rank). Another layout: all segments become history and the new layout starts at 0.
    """
    segs = tuple(s for s in segments if s.samples_per_rank > 0)
    last = segs[-1] if segs else None
    if last and (last.world_size, last.num_workers, last.batch_size, last.shuffle_window) == (
        world_size, max(1, num_workers), batch_size, shuffle_window,
    ):
        return segs[:-1], segs[-1].samples_per_rank
    return segs, 0


def build_epoch_plan(
    *, shard_sizes: Sequence[int], epoch: int, seed: int, world_size: int, num_workers: int,
    batch_size: int, policy: Policy, start_sample: int = 0, history: Sequence[ReadSegment] = (),
    shuffle_window: int = 0,
) -> EpochPlan:
    """The plan of epoch `epoch` (see the module docstring), from `start_sample` samples per rank.

    `history`: earlier parts of this epoch that ran under other layouts (oldest first), as
    given by `EpochPlan.segments()` / `resume_arguments()`; empty for a fresh or same-layout run.
    """
    _check_args(shard_sizes, epoch, world_size, num_workers, batch_size, policy)
    if shuffle_window < 0:
        raise TemperError(f"shuffle_window={shuffle_window} must be >= 0 (0: no sample shuffle)")
    order = shard_order(num_shards=len(shard_sizes), seed=seed, epoch=epoch)
    order = [s for s in order if shard_sizes[s] > 0]
    total = sum(shard_sizes)
    if total < world_size * batch_size:
        raise TemperError(
            f"data has {total} samples, fewer than world_size {world_size} x batch_size {batch_size}; "
            f"need at least {world_size * batch_size} samples (pack more data or use fewer ranks or a smaller batch)"
        )
    nw = max(1, num_workers)
    available: _Ranges = [(0, total)]
    for i, seg in enumerate(history):
        if seg.world_size * seg.batch_size > total:
            raise TemperError(
                f"data position segment {i} (world_size {seg.world_size} x batch_size "
                f"{seg.batch_size}) needs more than the {total} samples of this data; the "
                "checkpoint was written for other data"
            )
        per, chunks, _, _ = _split(available, total, seg.world_size, seg.batch_size, policy)
        _check_start(seg.samples_per_rank, seg.batch_size, per, epoch, f"data position segment {i} samples_per_rank")
        consumed: _Ranges = []
        for rank, chunk in enumerate(chunks):
            consumed += _workers(
                chunk, per, seg.batch_size, max(1, seg.num_workers), seg.samples_per_rank,
                window=seg.shuffle_window, parts=(seed, epoch, i, rank),
            )[0]
        available = _subtract(available, consumed, total)

    per, chunks, dropped, padded = _split(available, total, world_size, batch_size, policy)
    _check_start(start_sample, batch_size, per, epoch, "start_sample")
    cum, sizes = [], []
    pos = 0
    for s in order:
        cum.append(pos)
        sizes.append(shard_sizes[s])
        pos += shard_sizes[s]
    workers = []
    for rank, chunk in enumerate(chunks):
        rest = _workers(chunk, per, batch_size, nw, start_sample, window=shuffle_window,
                        parts=(seed, epoch, len(history), rank))[1]
        for slot, (ranges, first_window, skip, parts) in enumerate(rest):
            slices = _to_slices(ranges, cum, sizes, order)
            workers.append(WorkerPlan(
                rank, slot, slices, sum(len(s) for s in slices) - skip,
                window=shuffle_window, first_window=first_window, skip=skip, seed_parts=parts,
            ))
    return EpochPlan(
        epoch=epoch, workers=tuple(workers), batches_per_rank=(per - start_sample) // batch_size,
        dropped=dropped, padded=padded, batch_size=batch_size, world_size=world_size,
        num_workers=nw, shard_order=tuple(order),
        shards_per_worker_min=len(order) // (world_size * nw), start_sample=start_sample,
        history=tuple(history), shuffle_window=shuffle_window,
    )


# ------------------------------------------------------------------------------ internals


def _check_args(
    shard_sizes: Sequence[int], epoch: int, world_size: int, num_workers: int, batch_size: int, policy: str,
) -> None:
    if len(shard_sizes) == 0:
        raise TemperError("data has no shards; point data at a folder written by `temper data pack`")
    for i, n in enumerate(shard_sizes):
        if n < 0:
            raise TemperError(f"data shard {i} has num_samples={n}; counts must be >= 0 (re-run `temper data pack`)")
    for name, value, low in (
        ("epoch", epoch, 0), ("world_size", world_size, 1), ("num_workers", num_workers, 0),
        ("batch_size", batch_size, 1),
    ):
        if value < low:
            raise TemperError(f"{name}={value} must be >= {low}")
    if policy not in ("drop", "pad"):
        raise TemperError(f"policy={policy!r} is not one of 'drop', 'pad'; use 'drop' for large sets, 'pad' for small/eval")


def _check_start(start: int, batch_size: int, per_rank: int, epoch: int, name: str) -> None:
    if start < 0 or start % batch_size or start > per_rank:
        raise TemperError(
            f"{name}={start} must be a multiple of batch_size {batch_size} in 0..{per_rank} "
            f"(the samples per rank of epoch {epoch}); the checkpoint does not match this data or layout"
        )


def _length(ranges: _Ranges) -> int:
    return sum(b - a for a, b in ranges)


def _take(ranges: _Ranges, start: int, stop: int) -> _Ranges:
    """Positions start..stop-1 of the sequence that `ranges` spell out."""
    out, pos = [], 0
    for a, b in ranges:
        if pos >= stop:
            break
        lo, hi = max(start - pos, 0), min(stop - pos, b - a)
        if lo < hi:
            out.append((a + lo, a + hi))
        pos += b - a
    return out


def _split(available: _Ranges, total: int, world: int, b: int, policy: str) -> tuple[int, list[_Ranges], int, int]:
    """(samples per rank, each rank's chunk, dropped, padded) of the `available` positions."""
    n = _length(available)
    if policy == "drop":
        per = n // world // b * b
        dropped, padded = n - world * per, 0
    else:
        per = -(-n // (world * b)) * b
        dropped, padded = 0, world * per - n
    wrap = [(0, total)] * (padded // total) + ([(0, padded % total)] if padded % total else [])
    stream = available + wrap
    return per, [_take(stream, r * per, (r + 1) * per) for r in range(world)], dropped, padded


def _workers(
    chunk: _Ranges, per: int, b: int, nw: int, start: int, *, window: int = 0, parts: tuple = (),
) -> tuple[_Ranges, list[tuple[_Ranges, int, int, tuple]]]:
    """(positions consumed by the first `start` samples in delivery order, each worker's rest).

    Worker w holds contiguous batches, Q or Q+1 of them (the first B % nw workers one more).
    After c = q*nw + r delivered batches (round-robin), worker w delivered q + (w < r); the
    rest is returned rotated to start at worker r, the one the round-robin would ask next.
    A rest is (reads, first window number, deliveries to skip, permutation seed parts): with a
    shuffle window the reads restart at the current window's start, and what was consumed of
    that window is the first deliveries of its permutation, not a prefix.
    """
    q_all, r_all = divmod(per // b, nw)
    q, r = divmod(start // b, nw)
    consumed: _Ranges = []
    rest: list[tuple[_Ranges, int, int, tuple]] = []
    first = 0
    for w in range(nw):
        n, done = q_all + (w < r_all), q + (w < r)
        base, delivered, seq_len = first * b, done * b, n * b
        seed_parts = (*parts, w)
        number = delivered // window if window else 0
        begin = number * window if window else delivered
        consumed += _take(chunk, base, base + begin)
        if window and delivered > begin:
            length = min(window, seq_len - begin)
            for k in window_order(length, *seed_parts, number)[: delivered - begin]:
                consumed += _take(chunk, base + begin + k, base + begin + k + 1)
        rest.append((_take(chunk, base + begin, base + seq_len), number, delivered - begin, seed_parts))
        first += n
    return consumed, rest[r:] + rest[:r]


def _subtract(available: _Ranges, consumed: _Ranges, total: int) -> _Ranges:
    """`available` (sorted, disjoint) minus the `consumed` positions (any order, may overlap)."""
    cut = sorted(consumed)
    out, i = [], 0
    for a, b in available:
        while i < len(cut) and cut[i][1] <= a:
            i += 1
        j, lo = i, a
        while j < len(cut) and cut[j][0] < b:
            if cut[j][0] > lo:
                out.append((lo, cut[j][0]))
            lo = max(lo, cut[j][1])
            j += 1
        if lo < b:
            out.append((lo, b))
    return out


def _to_slices(ranges: _Ranges, cum: list[int], sizes: list[int], order: list[int]) -> tuple[ShardSlice, ...]:
    """Stream positions -> (shard, offset) slices, merging neighbours in the same shard."""
    out: list[ShardSlice] = []
    for a, b in ranges:
        i = bisect_right(cum, a) - 1
        while a < b:
            end = min(b, cum[i] + sizes[i])
            piece = ShardSlice(order[i], a - cum[i], end - cum[i])
            if out and out[-1].shard == piece.shard and out[-1].stop == piece.start:
                piece = ShardSlice(piece.shard, out[-1].start, piece.stop)
                out.pop()
            out.append(piece)
            a, i = end, i + 1
    return tuple(out)


def eval_reads(*, shard_sizes: Sequence[int], rank: int, world_size: int, limit: int | None) -> WorkerPlan:
    """Rank `rank`'s share of an evaluation pass: no shuffle, contiguous positions
    [rank * N // W, (rank + 1) * N // W) of the shards in manifest order (shares differ by at
    most one sample, nothing read twice), capped at `limit` samples. Evaluation all-reduces
    once at the end, so its batch counts need not be equal."""
    total = sum(shard_sizes)
    lo, hi = rank * total // world_size, (rank + 1) * total // world_size
    if limit is not None:
        hi = min(hi, lo + limit)
    order = list(range(len(shard_sizes)))
    cum = [sum(shard_sizes[:i]) for i in order]
    slices = tuple(s for s in _to_slices([(lo, hi)] if hi > lo else [], cum, list(shard_sizes), order) if len(s))
    return WorkerPlan(rank, 0, slices, hi - lo)
