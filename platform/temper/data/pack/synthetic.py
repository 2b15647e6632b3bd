"""`--format synthetic`: SOURCE `tokens` (seeded Markov byte sequences, `tokens.npy`) or
`images` (seeded class templates plus noise, `image.npy` and `cls`), from temper.data.synthetic;
--limit samples (default DEFAULT_SYNTHETIC_SAMPLES)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from temper.data.pack.source import PackOptions, Source, did_you_mean
from temper.errors import TemperError

DEFAULT_SYNTHETIC_SAMPLES = 1024

Samples = tuple[Iterable[dict[str, Any]], dict[str, Any]]  # the samples, the manifest extras


def _tokens(n: int, opts: PackOptions, common: dict[str, Any]) -> Samples:
    from temper.data.synthetic import MarkovTokens
    from temper.data.tokenizer import BYTE_VOCAB_SIZE

    ds = MarkovTokens(vocab_size=BYTE_VOCAB_SIZE, seq_len=opts.seq_len, **common)
    samples = ({"tokens.npy": ds[i]["tokens"].numpy().astype(np.uint16)} for i in range(n))
    return samples, {"vocab_size": BYTE_VOCAB_SIZE, "seq_len": opts.seq_len}


def _images(n: int, opts: PackOptions, common: dict[str, Any]) -> Samples:
    from temper.data.synthetic import TemplateImages

    ds = TemplateImages(num_classes=10, in_channels=3, image_size=32, **common)
    samples = ({"image.npy": s["image"].numpy(), "cls": int(s["label"])} for s in map(ds.__getitem__, range(n)))
    return samples, {"classes": [str(c) for c in range(10)]}


#: SOURCE -> its generator, in the order errors list them.
SYNTHETIC_SOURCES: dict[str, Callable[[int, PackOptions, dict[str, Any]], Samples]] = {
    "tokens": _tokens,
    "images": _images,
}


def open_synthetic(source: str, opts: PackOptions) -> Source:
    if source not in SYNTHETIC_SOURCES:
        raise TemperError(
            f"SOURCE '{source}' is not a synthetic source; {did_you_mean(source, SYNTHETIC_SOURCES)}"
            f"accepted: {', '.join(SYNTHETIC_SOURCES)}"
        )
    n = opts.limit or DEFAULT_SYNTHETIC_SAMPLES
    common = {"noise": 0.1, "seed": opts.seed, "split": "train", "length": n}
    samples, extras = SYNTHETIC_SOURCES[source](n, opts, common)
    return Source(f"synthetic-{source}", f"synthetic {source} (seed {opts.seed})", samples, extras)
