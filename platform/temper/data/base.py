"""Sharding map-style datasets across ranks: `DataBundle`, what the training loop consumes.

Epoch e shuffles range(N) with a generator seeded from (seed, e); rank r of W takes
perm[r::W], cut to the same number of full micro-batches b on every rank (uneven counts
would hang DDP). Micro-batch k of rank r is perm[r::W][k*b:(k+1)*b], so the union over
ranks at step k is perm[k*b*W:(k+1)*b*W]: a function of (seed, step, W, b) only.

`Note` marks a preflight message as information rather than a warning (data kinds return
both from their preflight; the driver prints them differently).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from temper.errors import TemperError

log = logging.getLogger(__name__)


class Note(str):
    """A preflight message that informs (`data.subset keeps 70 of 1400 ...`) rather than warns."""


def derive_seed(*parts: object) -> int:
    """A 63-bit seed that is a pure function of `parts` (stable across processes and runs)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def seeded_generator(*parts: object) -> torch.Generator:
    """A fresh CPU torch.Generator seeded from `parts`; never touches the global RNG."""
    g = torch.Generator()
    g.manual_seed(derive_seed(*parts))
    return g


def epoch_permutation(*, seed: int, epoch: int, num_samples: int) -> torch.Tensor:
    """The shuffle of range(num_samples) every rank agrees on for `epoch`."""
    return torch.randperm(num_samples, generator=seeded_generator(seed, "epoch", epoch))


class EpochBatchSampler(Sampler[list[int]]):
    """Infinite index lists for one rank, epoch after epoch, from a (epoch, batch) position."""

    def __init__(
        self, *, num_samples: int, seed: int, rank: int, world_size: int, batch_size: int,
        start: tuple[int, int] = (0, 0),
    ) -> None:
        self.num_samples, self.seed = num_samples, seed
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.batches_per_epoch = (num_samples // world_size) // batch_size
        self.start = start

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's micro-batches (lists of dataset indices) for `epoch`."""
        perm = epoch_permutation(seed=self.seed, epoch=epoch, num_samples=self.num_samples)
        mine = perm[self.rank :: self.world_size].tolist()
        b = self.batch_size
        return [mine[k * b : (k + 1) * b] for k in range(self.batches_per_epoch)]

    def __iter__(self) -> Iterator[list[int]]:
        epoch, first = self.start
        while True:
            yield from self.epoch_batches(epoch)[first:]
            epoch, first = epoch + 1, 0


class DataBundle:
    """One rank's view of a job's data: infinite train micro-batches, finite eval passes."""

    def __init__(
        self, *, train: Dataset, eval: Dataset | None, seed: int, rank: int, world_size: int,
        micro_batch_size: int, eval_batches: int, num_workers: int = 0,
    ) -> None:
        n, w, b = len(train), world_size, micro_batch_size
        if (n // w) // b == 0:
            raise TemperError(
                f"data.num_samples={n} is too small for {w} worker(s) x micro_batch_size {b}; "
                f"set data.num_samples >= {w * b}"
            )
        if eval is not None and len(eval) < w:
            raise TemperError(
                f"data.eval_samples={len(eval)} is fewer than the {w} workers; "
                f"set data.eval_samples >= {w} (or 0 to turn eval off)"
            )
        self.train, self.eval = train, eval
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.micro_batch_size, self.max_eval_batches = b, eval_batches
        self.num_workers = num_workers
        self.batches_per_epoch = (n // w) // b
        self.epoch = 0
        self.batch_in_epoch = 0
        self._eval_loader: DataLoader | None = None

    @property
    def has_eval(self) -> bool:
        return self.eval is not None

    def _loader(self, dataset: Dataset, batch_sampler: Iterable[list[int]]) -> DataLoader:
        # Its own generator: a DataLoader iterator otherwise draws its seed from the global
        # torch RNG, which would shift dropout masks after a resume (see checkpoint/keeper.py).
        return DataLoader(
            dataset, batch_sampler=batch_sampler, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=seeded_generator(self.seed, "loader", self.rank),
        )

    def train_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Collated micro-batches forever, resuming from the current (epoch, batch) position."""
        sampler = EpochBatchSampler(
            num_samples=len(self.train), seed=self.seed, rank=self.rank,
            world_size=self.world_size, batch_size=self.micro_batch_size,
            start=(self.epoch, self.batch_in_epoch),
        )
        for batch in self._loader(self.train, sampler):
            self.batch_in_epoch += 1
            if self.batch_in_epoch == self.batches_per_epoch:
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
            yield batch

    def eval_index_batches(self) -> list[list[int]]:
        """This rank's eval micro-batches: indices r::W, equal count per rank, capped."""
        if self.eval is None:
            return []
        per_rank = len(self.eval) // self.world_size
        per_rank = min(per_rank, self.max_eval_batches * self.micro_batch_size)
        mine = list(range(self.rank, len(self.eval), self.world_size))[:per_rank]
        b = self.micro_batch_size
        return [mine[i : i + b] for i in range(0, per_rank, b)]

    def eval_batches(self) -> Iterable[dict[str, torch.Tensor]] | None:
        """A fresh finite pass over this rank's eval share; None when there is no eval split."""
        if self.eval is None:
            return None
        if self._eval_loader is None:
            self._eval_loader = self._loader(self.eval, self.eval_index_batches())
        return self._eval_loader

    def state_dict(self) -> dict[str, int | str]:
        """Position of the next train batch, for checkpoints: samples consumed in the epoch
        over all ranks, so a resume on another world size continues at the same place."""
        samples = self.batch_in_epoch * self.micro_batch_size * self.world_size
        return {"kind": "synthetic", "epoch": self.epoch, "samples_in_epoch": samples}

    def load_state_dict(self, state: dict[str, int | str]) -> None:
        """Resume: the next `train_batches()` starts at this position. The union of the
        samples at a step depends only on the global batch (see the module docstring), so a
        resume with the same global batch on another world size reads exactly what an
        uninterrupted run would; another global batch restarts at the batch boundary below."""
        if state.get("kind") != "synthetic":
            raise TemperError(f"data state is for data.kind {state.get('kind')!r}, not 'synthetic'; "
                              "resume with the data the checkpoint was written with")
        epoch, samples = int(state["epoch"]), int(state["samples_in_epoch"])
        per_batch = self.micro_batch_size * self.world_size
        batch = samples // per_batch
        if epoch < 0 or samples < 0:
            raise TemperError(f"data state epoch={epoch} samples_in_epoch={samples} is out of range; "
                              "the checkpoint is damaged")
        if samples % per_batch:
            log.warning("data: resuming %d samples into epoch %d with a global micro-batch of %d: "
                        "restarting at sample %d", samples, epoch, per_batch, batch * per_batch)
        if batch >= self.batches_per_epoch:
            epoch, batch = epoch + 1, 0
        self.epoch, self.batch_in_epoch = epoch, batch
