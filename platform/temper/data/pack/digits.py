"""`--format digits` [built-in]: scikit-learn's bundled 8x8 digits, `image.npy` (uint8, values
0..16) and `cls`, in a seeded order."""

from __future__ import annotations

import numpy as np

from temper.data.pack.source import PackOptions, Source, expect_builtin, permutation
from temper.errors import MissingDependencyError


def open_digits(source: str, opts: PackOptions) -> Source:
    expect_builtin(source, "digits")
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise MissingDependencyError("scikit-learn", feature="--format digits") from e
    bunch = load_digits()
    images, labels = bunch.images.astype(np.uint8), bunch.target.astype(np.int64)
    order = permutation(len(labels), opts.seed)
    samples = ({"image.npy": images[i], "cls": int(labels[i])} for i in order)
    extras = {"classes": [str(c) for c in bunch.target_names], "value_range": [0, 16]}
    return Source("digits", "digits (scikit-learn load_digits)", samples, extras)
