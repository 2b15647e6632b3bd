"""The worker's side of an elastic job (resources.min_workers < resources.workers).

Ray Train restarts the worker group at another size when a worker or node is lost or room
appears; every start resumes from the last committed checkpoint (model, optimizer, LR
schedule, data cursor). Here: the gradient accumulation that keeps the global batch at this
size (spec/elastic.py), and one MLflow tag event per resize.
"""

from __future__ import annotations

import logging
from typing import Any

from temper.dist import DistContext
from temper.errors import TemperError
from temper.spec.elastic import grad_accum_at
from temper.spec.job import JobSpec

log = logging.getLogger(__name__)


def grad_accum_for(spec: JobSpec, *, ctx: DistContext) -> int:
    """train.grad_accum, or for an elastic job the accumulation that keeps the global batch
    at this world size."""
    if spec.resources.min_workers is None or ctx.world_size == spec.resources.workers:
        return spec.train.grad_accum
    accum = grad_accum_at(spec, workers=ctx.world_size)
    if accum is None:  # validation refuses such ranges; a launcher gave another size
        raise TemperError(f"resources.min_workers: {ctx.world_size} workers cannot keep the global batch "
                          f"{spec.global_batch_size}; see docs/checkpoints.md (elastic training)")
    return accum


def tag_resize(tracker: Any, *, resumed: Any, ctx: DistContext, accum: int) -> None:
    """A start at another world size than the checkpoint's: one tag event with step and reason."""
    before = getattr(resumed, "world_size", None)
    if resumed is None or before is None or before == ctx.world_size:
        return
    how = "shrank" if ctx.world_size < before else "grew"
    reason = ("a worker or node was lost" if how == "shrank" else "room for more workers appeared")
    text = (f"step {resumed.step}: world size {before} -> {ctx.world_size} ({how}: {reason}; "
            f"train.grad_accum now {accum}); resumed from {resumed.path}")
    log.warning("elastic: %s", text)
    tracker.set_tags({f"temper.event.step-{resumed.step:06d}.resize-{ctx.world_size}": text})
