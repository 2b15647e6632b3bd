"""Data registry: `data.kind` in the spec -> this rank's DataBundle.

A builder takes (spec, rank=, world_size=) and returns an object with the DataBundle
interface: train_batches(), eval_batches(), has_eval, batches_per_epoch, state_dict(),
load_state_dict().
"""

from __future__ import annotations

from collections.abc import Callable

from temper.data.base import DataBundle
from temper.data.synthetic import build_synthetic_data
from temper.errors import TemperError
from temper.spec.models import JobSpec

DATA_BUILDERS: dict[str, Callable[..., DataBundle]] = {
    "synthetic": build_synthetic_data,
}


def build_data(spec: JobSpec, *, rank: int, world_size: int) -> DataBundle:
    """This rank's share of the job's data (same seed -> same batches, run after run)."""
    builder = DATA_BUILDERS.get(spec.data.kind)
    if builder is None:
        raise TemperError(
            f"data.kind '{spec.data.kind}' has no builder; accepted: {', '.join(DATA_BUILDERS)}"
        )
    return builder(spec, rank=rank, world_size=world_size)


__all__ = ["DATA_BUILDERS", "DataBundle", "build_data"]
