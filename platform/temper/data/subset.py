"""`data.subset`: train on a seeded random fraction of the training samples, the same ones run
after run (label-fraction studies: fine-tune on 2%, 5%, 10% of the labels).

Selection is per shard: a shard of n samples keeps k = max(1, round(fraction * n)) of them, at
the positions `random.Random(derive_seed(seed, "subset", shard file name, n)).sample(range(n), k)`
(sorted, so reads stay sequential). That is a pure function of (subset.seed, shard, n): the same
in every run, on every rank and loader worker, whatever the world size; another seed picks
another subset. `temper data pack` shuffles samples before sharding, so the union is a uniform
random subset of the split. Empty shards keep nothing; fraction 1.0 keeps every sample.

The read plan (temper.data.plan) is built over the *kept* counts, so its offsets are indices into
a shard's kept positions: equal batches per rank, epoch lengths and resumable positions all count
kept samples, and the reader maps a kept index back to the shard position it reads
(`Subset.positions`). The samples in between are streamed past in the tar but never decoded.
The training seed does not enter the selection: changing `seed` reshuffles the same subset.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from temper.data.base import derive_seed
from temper.errors import TemperError
from temper.spec.finetune import SubsetSpec


def kept_count(n: int, fraction: float) -> int:
    """Samples a shard of `n` keeps: max(1, round(fraction * n)), 0 for an empty shard."""
    return min(n, max(1, round(fraction * n))) if n > 0 else 0


@lru_cache(maxsize=256)
def kept_positions(*, seed: int, name: str, n: int, k: int) -> tuple[int, ...]:
    """The `k` positions (ascending) of shard `name` (n samples) that subset seed `seed` keeps."""
    if k >= n:
        return tuple(range(n))
    rng = random.Random(derive_seed(seed, "subset", name, n))
    return tuple(sorted(rng.sample(range(n), k)))


@dataclass(frozen=True)
class Subset:
    """The kept samples of one training split (picklable, for the loader's worker processes)."""

    fraction: float
    seed: int
    names: tuple[str, ...]  # shard file names, in manifest order
    shard_sizes: tuple[int, ...]  # samples per shard before the subset

    @classmethod
    def of(cls, spec: SubsetSpec, *, urls: Sequence[str], sizes: Sequence[int]) -> Subset:
        return cls(spec.fraction, spec.seed, tuple(u.rstrip("/").rsplit("/", 1)[-1] for u in urls), tuple(sizes))

    @property
    def sizes(self) -> tuple[int, ...]:
        """Kept samples per shard: what the read plan is built over."""
        return tuple(kept_count(n, self.fraction) for n in self.shard_sizes)

    @property
    def num_samples(self) -> int:
        return sum(self.sizes)

    def positions(self, shard: int) -> tuple[int, ...]:
        """Kept index -> position in the shard, for shard `shard` (index into the manifest)."""
        n = self.shard_sizes[shard]
        return kept_positions(seed=self.seed, name=self.names[shard], n=n, k=kept_count(n, self.fraction))

    def state(self) -> dict[str, float | int]:
        """What a checkpointed data position records of the subset (compared on resume)."""
        return {"fraction": self.fraction, "seed": self.seed}

    def describe(self) -> str:
        total = sum(self.shard_sizes)
        return (f"data.subset keeps {self.num_samples} of {total} training samples "
                f"({self.fraction * 100:g}%, seed {self.seed})")


def smallest_fraction(sizes: Sequence[int], need: int) -> float | None:
    """The smallest fraction (rounded up to 2 significant digits) whose subset of shards
    `sizes` keeps at least `need` samples; None when even the whole split has fewer."""
    def kept(f: float) -> int:
        return sum(kept_count(n, f) for n in sizes)

    if kept(1.0) < need:
        return None
    lo, hi = 0.0, 1.0  # kept() is non-decreasing in f; kept(hi) >= need throughout
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if kept(mid) >= need else (mid, hi)
    for digits in range(2, 12):  # significant digits: 2 unless a rounding edge needs more
        scale = 10.0 ** (digits - 1 - math.floor(math.log10(hi)))
        f = min(1.0, math.ceil(hi * scale) / scale)
        if kept(f) >= need:
            return f
    return hi


def check_subset_size(subset: Subset, *, ranks: int, batch_size: int) -> None:
    """Raise when the subset holds fewer samples than one micro-batch per data-parallel rank."""
    need = ranks * batch_size
    if subset.num_samples >= need or sum(subset.shard_sizes) < need:
        return  # enough, or too little data even without a subset (reported as such elsewhere)
    f = smallest_fraction(subset.shard_sizes, need)
    raise TemperError(
        f"{subset.describe()}, fewer than {ranks} data-parallel rank(s) x train.micro_batch_size "
        f"{batch_size}; set data.subset.fraction>={f:g}, or lower train.micro_batch_size or resources.workers"
    )
