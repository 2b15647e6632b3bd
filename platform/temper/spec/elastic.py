"""Elastic world size: which sizes keep the global batch, and the accumulation at each.

`resources.min_workers` below `resources.workers` makes a job elastic (the ray launcher
only): it trains on any worker count in [min_workers, workers]. The global batch
(micro_batch_size x grad_accum x data-parallel size at `workers`) stays the same at every
size by changing the gradient accumulation steps; tensor-parallel degree stays fixed, so a
size must be a multiple of it. No torch, no ray: `temper validate` stays fast.
"""

from __future__ import annotations

from typing import Any


def elastic_sizes(spec: Any) -> range:
    """The worker counts the job may run at (one size when not elastic)."""
    r = spec.resources
    low = r.min_workers if r.min_workers is not None else r.workers
    return range(low, r.workers + 1)


def grad_accum_at(spec: Any, *, workers: int) -> int | None:
    """The accumulation that keeps the global batch at `workers` workers; None when no
    whole number does (or `workers` is not a multiple of the tensor-parallel degree)."""
    tp = getattr(spec.strategy, "tensor_parallel", 1)
    if workers < 1 or workers % tp:
        return None
    per_step = spec.train.micro_batch_size * (workers // tp)
    total = spec.global_batch_size
    return total // per_step if total % per_step == 0 else None


def elastic_problems(spec: Any) -> list[str]:
    """Why the elastic range cannot run (one line each); [] when it can or is not elastic."""
    r = spec.resources
    if r.min_workers is None or r.min_workers == r.workers:
        return []
    if r.min_workers > r.workers:
        return [f"resources.min_workers={r.min_workers} is above resources.workers={r.workers}; "
                "set min_workers <= workers (workers is the most the job uses)"]
    problems = []
    bad = [n for n in elastic_sizes(spec) if grad_accum_at(spec, workers=n) is None]
    if bad:
        tp = getattr(spec.strategy, "tensor_parallel", 1)
        tp_note = f", a multiple of strategy.tensor_parallel={tp}" if tp > 1 else ""
        problems.append(
            f"resources.min_workers={r.min_workers}: the global batch {spec.global_batch_size} "
            f"(train.micro_batch_size={spec.train.micro_batch_size} x train.grad_accum="
            f"{spec.train.grad_accum} x {r.workers // tp} data-parallel workers) cannot be kept at "
            f"{_listing(bad)} workers by changing train.grad_accum; pick a range where every size "
            f"divides it{tp_note} (e.g. raise train.grad_accum, or min_workers={_smallest_ok(spec)})")
    kind = spec.strategy.kind
    if kind == "deepspeed":
        problems.append("resources.min_workers: strategy.kind 'deepspeed' fixes its accumulation and "
                        "checkpoint layout per world size; use strategy.kind=ddp or fsdp for an elastic job")
    if not spec.checkpoint.enabled:
        problems.append("resources.min_workers: an elastic job resumes from its checkpoints at every "
                        "resize; set checkpoint.enabled=true")
    return problems


def _listing(sizes: list[int]) -> str:
    return ", ".join(map(str, sizes))


def _smallest_ok(spec: Any) -> int:
    """The lowest min_workers from which every size up to `workers` keeps the batch."""
    n = spec.resources.workers
    while n - 1 >= 1 and grad_accum_at(spec, workers=n - 1) is not None:
        n -= 1
    return n
