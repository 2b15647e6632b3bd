"""Deterministic, seeded, learnable synthetic data shaped for the model.

Sample i of a split is a pure function of (seed, split, i): each sample draws from its own
torch.Generator seeded from a hash of those, never the global RNG. Train and eval use
different split salts, so their samples are independent draws of the same distribution.

- Token models: sequences from a sparse Markov chain fixed by the job seed (every token
  has 2-4 likely successors); with probability `noise` a token is uniform random instead.
- Image models: one smooth random template per class; a sample is its class template,
  shifted by up to 2 pixels, plus `noise` x Gaussian noise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from temper.data.base import DataBundle, seeded_generator
from temper.errors import TemperError
from temper.spec.job import GPTSpec, JobSpec, ResNetSpec

MIN_SUCCESSORS, MAX_SUCCESSORS = 2, 4
TEMPLATE_GRID = 4  # templates are random GRID x GRID patterns upsampled to image_size
MAX_SHIFT = 2  # pixels


class MarkovTokens(Dataset):
    """{"tokens": LongTensor[seq_len + 1]} from the job's seeded sparse Markov chain."""

    def __init__(
        self, *, vocab_size: int, seq_len: int, noise: float, seed: int, split: str, length: int
    ) -> None:
        self.vocab_size, self.seq_len, self.noise = vocab_size, seq_len, noise
        self.seed, self.split, self.length = seed, split, length
        succ, cum = markov_table(vocab_size=vocab_size, seed=seed)
        self._succ, self._cum = succ.tolist(), cum.tolist()  # plain lists: fast scalar access

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.length:
            raise IndexError(f"sample {i} out of range for {self.length} samples")
        g = seeded_generator(self.seed, self.split, i)
        n = self.seq_len + 1
        coin, pick = torch.rand(2, n, generator=g).tolist()
        uniform = torch.randint(self.vocab_size, (n,), generator=g).tolist()
        out = [uniform[0]]
        for t in range(1, n):
            if coin[t] < self.noise:
                out.append(uniform[t])
                continue
            cum = self._cum[out[-1]]
            j = next((j for j, c in enumerate(cum) if pick[t] < c), MAX_SUCCESSORS - 1)
            out.append(self._succ[out[-1]][j])
        return {"tokens": torch.tensor(out, dtype=torch.long)}


def markov_table(*, vocab_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(successors [V, 4], cumulative probabilities [V, 4]) of the job's Markov chain.

    Each token keeps 2-4 successors with skewed random weights; unused slots get
    probability 0 (their cumulative value stays 1, so they are never picked).
    """
    g = seeded_generator(seed, "markov", vocab_size)
    succ = torch.randint(vocab_size, (vocab_size, MAX_SUCCESSORS), generator=g)
    count = torch.randint(MIN_SUCCESSORS, MAX_SUCCESSORS + 1, (vocab_size, 1), generator=g)
    weight = torch.rand(vocab_size, MAX_SUCCESSORS, generator=g) ** 2 + 0.05
    weight = weight * (torch.arange(MAX_SUCCESSORS) < count)
    cum = (weight / weight.sum(dim=1, keepdim=True)).cumsum(dim=1)
    cum[:, -1] = 1.0  # guard against rounding: the last slot always closes the interval
    return succ, cum


class TemplateImages(Dataset):
    """{"image": float32 [C, S, S], "label": int64 scalar}: class template + shift + noise."""

    def __init__(
        self, *, num_classes: int, in_channels: int, image_size: int, noise: float, seed: int,
        split: str, length: int,
    ) -> None:
        self.num_classes, self.image_size, self.noise = num_classes, image_size, noise
        self.seed, self.split, self.length = seed, split, length
        g = seeded_generator(seed, "templates", num_classes, in_channels)
        shape = (num_classes, in_channels, TEMPLATE_GRID, TEMPLATE_GRID)
        self._coarse = torch.randn(shape, generator=g)
        self._max_shift = min(MAX_SHIFT, image_size // 8)

    def __len__(self) -> int:
        return self.length

    def template(self, label: int) -> torch.Tensor:
        """The smooth [C, S, S] pattern of class `label`."""
        size = (self.image_size, self.image_size)
        coarse = self._coarse[label : label + 1]
        return F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.length:
            raise IndexError(f"sample {i} out of range for {self.length} samples")
        g = seeded_generator(self.seed, self.split, i)
        label = int(torch.randint(self.num_classes, (1,), generator=g))
        s = self._max_shift
        dy, dx = torch.randint(-s, s + 1, (2,), generator=g).tolist()
        image = torch.roll(self.template(label), shifts=(dy, dx), dims=(1, 2))
        image = image + self.noise * torch.randn(image.shape, generator=g)
        return {"image": image.float(), "label": torch.tensor(label, dtype=torch.long)}


def _token_dataset(model: GPTSpec, *, data, seed: int, split: str, length: int) -> Dataset:
    return MarkovTokens(
        vocab_size=model.vocab_size, seq_len=model.seq_len, noise=data.noise, seed=seed,
        split=split, length=length,
    )


def _image_dataset(model: ResNetSpec, *, data, seed: int, split: str, length: int) -> Dataset:
    return TemplateImages(
        num_classes=model.num_classes, in_channels=model.in_channels, image_size=model.image_size,
        noise=data.noise, seed=seed, split=split, length=length,
    )


#: model.kind -> builder of a synthetic dataset shaped for that model.
SYNTHETIC_DATASETS: dict[str, Callable[..., Dataset]] = {
    "gpt": _token_dataset,
    "encoder": _token_dataset,  # masked LM corrupts the tokens itself
    "resnet": _image_dataset,
}


def build_synthetic_dataset(spec: JobSpec, *, split: str) -> Dataset:
    """The train or eval split ("train" / "eval") of the synthetic data for `spec.model`."""
    builder = SYNTHETIC_DATASETS.get(spec.model.kind)
    if builder is None:
        raise TemperError(
            f"data.kind 'synthetic' has no generator for model.kind '{spec.model.kind}'; "
            f"supported: {', '.join(SYNTHETIC_DATASETS)}"
        )
    length = spec.data.num_samples if split == "train" else spec.data.eval_samples
    return builder(spec.model, data=spec.data, seed=spec.seed, split=split, length=length)


def build_synthetic_data(spec: JobSpec, *, rank: int, world_size: int) -> DataBundle:
    """This rank's DataBundle over synthetic train/eval splits."""
    return DataBundle(
        train=build_synthetic_dataset(spec, split="train"),
        eval=build_synthetic_dataset(spec, split="eval") if spec.data.eval_samples else None,
        seed=spec.seed, rank=rank, world_size=world_size,
        micro_batch_size=spec.train.micro_batch_size, eval_batches=spec.train.eval_batches,
        num_workers=spec.data.num_workers,
    )
