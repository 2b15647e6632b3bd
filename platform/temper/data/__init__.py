"""Data registry: `data.kind` in the spec -> this rank's DataBundle, and the driver's preflight.

A builder takes (spec, rank=, world_size=) and returns an object with the DataBundle
interface: train_batches(), eval_batches(), has_eval, batches_per_epoch, state_dict(),
load_state_dict() (and `skipped`, samples substituted under data.on_error=skip, if it can
skip). A preflight takes the spec, runs on the driver before any worker starts, raises
TemperError on unusable data and returns warnings (and `Note`s: information, not warnings).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from temper.data.base import DataBundle, Note
from temper.data.synthetic import build_synthetic_data
from temper.errors import TemperError
from temper.spec.job import JobSpec


def _webdataset(spec: JobSpec, *, rank: int, world_size: int):
    from temper.data.webdataset import build_webdataset_data

    return build_webdataset_data(spec, rank=rank, world_size=world_size)


def _webdataset_preflight(spec: JobSpec) -> list[str]:
    from temper.data.webdataset import preflight

    return preflight(spec)


def _synthetic_preflight(spec: JobSpec) -> list[str]:
    if spec.objective.kind == "classify" and spec.model.kind not in ("resnet", "vit"):
        raise TemperError(
            f"objective.kind 'classify' needs labels, and data.kind 'synthetic' makes unlabeled token "
            f"sequences for model.kind '{spec.model.kind}'; use labeled shards (data.kind=webdataset "
            "with a label field, e.g. from temper data pack pystdlib-packages)"
        )
    return []


DATA_BUILDERS: dict[str, Callable[..., DataBundle]] = {
    "synthetic": build_synthetic_data,
    "webdataset": _webdataset,
}
DATA_PREFLIGHTS: dict[str, Callable[[JobSpec], list[str]]] = {
    "synthetic": _synthetic_preflight,
    "webdataset": _webdataset_preflight,
}


def with_absolute_paths(spec: JobSpec, *, base: Path) -> JobSpec:
    """`spec` with relative local shard paths made absolute against `base` (the directory
    `temper run` ran in), so workers with another working directory find them."""
    if spec.data.kind != "webdataset":
        return spec

    def absolute(value: str | None) -> str | None:
        if value is None:
            return None
        parts = [p if "://" in p or os.path.isabs(p) else os.path.join(base, p) for p in value.split("::")]
        return "::".join(parts)

    data = spec.data.model_copy(update={"train": absolute(spec.data.train), "eval": absolute(spec.data.eval)})
    return spec.model_copy(update={"data": data})


def preflight_data(spec: JobSpec) -> list[str]:
    """Check the job's data before launching workers; returns warnings and `Note`s, raises TemperError."""
    check = DATA_PREFLIGHTS.get(spec.data.kind)
    return check(spec) if check else []


def build_data(spec: JobSpec, *, rank: int, world_size: int) -> DataBundle:
    """This rank's share of the job's data (same seed -> same batches, run after run)."""
    builder = DATA_BUILDERS.get(spec.data.kind)
    if builder is None:
        raise TemperError(
            f"data.kind '{spec.data.kind}' has no builder; accepted: {', '.join(DATA_BUILDERS)}"
        )
    return builder(spec, rank=rank, world_size=world_size)


__all__ = ["DATA_BUILDERS", "DATA_PREFLIGHTS", "DataBundle", "Note", "build_data", "preflight_data", "with_absolute_paths"]
