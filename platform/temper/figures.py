"""Pictures for the MLflow run, as PNG bytes (matplotlib's Agg backend, no display needed):
confusion matrices, image grids (MAE reconstructions), label-fraction curves."""

from __future__ import annotations

import io
from collections.abc import Sequence


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def confusion_matrix_png(counts: Sequence[Sequence[int]], *, labels: Sequence[str] | None = None,
                         title: str = "confusion matrix (rows: true, columns: predicted)") -> bytes:
    """Counts with each row normalized for the colour; the numbers are the raw counts."""
    plt = _pyplot()
    k = len(counts)
    labels = list(labels) if labels is not None else [str(i) for i in range(k)]
    rows = [[c / max(sum(row), 1) for c in row] for row in counts]
    fig, ax = plt.subplots(figsize=(1.0 + 0.45 * k, 0.8 + 0.45 * k))
    ax.imshow(rows, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(k):
        for j in range(k):
            if counts[i][j]:
                ax.text(j, i, str(counts[i][j]), ha="center", va="center", fontsize=7,
                        color="white" if rows[i][j] > 0.5 else "black")
    ax.set_xticks(range(k), labels, fontsize=7)
    ax.set_yticks(range(k), labels, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=8)
    return _png(fig)


def image_grid_png(rows: Sequence[Sequence], *, row_titles: Sequence[str] = (), title: str = "") -> bytes:
    """A grid of images: rows[r][c] is an array [H, W] or [H, W, 3] with values in [0, 1]."""
    plt = _pyplot()
    n_rows, n_cols = len(rows), max(len(r) for r in rows)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.1 * n_cols, 1.15 * n_rows), squeeze=False)
    for r, row in enumerate(rows):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(row):
                image = row[c]
                ax.imshow(image, cmap="gray" if getattr(image, "ndim", 2) == 2 else None, vmin=0.0, vmax=1.0)
        if r < len(row_titles):
            axes[r][0].set_title(row_titles[r], fontsize=7, loc="left")
    if title:
        fig.suptitle(title, fontsize=8)
    return _png(fig)


def label_fraction_png(curves: dict[str, list[tuple[float, float, float]]], *, metric: str,
                       title: str = "") -> bytes:
    """curves: variant -> [(label fraction, mean, spread)], drawn with error bars on a log x axis."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.0, 3.4))
    for name, points in sorted(curves.items()):
        points = sorted(points)
        ax.errorbar([p[0] * 100 for p in points], [p[1] for p in points], yerr=[p[2] for p in points],
                    marker="o", capsize=3, label=name)
    ax.set_xscale("log")
    xs = sorted({p[0] * 100 for points in curves.values() for p in points})
    ax.set_xticks(xs, [f"{x:g}" for x in xs])
    ax.minorticks_off()
    ax.set_xlabel("labelled training samples used (%)")
    ax.set_ylabel(metric)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    return _png(fig)


def search_png(points: dict[str, list[tuple[float, float, bool]]], *, metric: str, title: str = "",
               log_keys: Sequence[str] = ()) -> bytes:
    """One panel per hyperparameter: each trial's metric against its value; early-stopped
    trials hollow. points: key -> [(value, metric, early_stopped)]."""
    plt = _pyplot()
    keys = sorted(points)
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.0), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        full = [(x, y) for x, y, early in points[key] if not early]
        early = [(x, y) for x, y, stopped in points[key] if stopped]
        if full:
            ax.scatter(*zip(*full, strict=True), label="finished")
        if early:
            ax.scatter(*zip(*early, strict=True), facecolors="none", edgecolors="gray", label="stopped early")
        if key in log_keys:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return _png(fig)
