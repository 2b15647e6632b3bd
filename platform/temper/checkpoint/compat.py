"""Can a checkpoint continue under the job's new spec? Decided by the driver before launch.

The checkpoint's manifest keeps the spec it was saved with (`extra.spec`; older checkpoints
only their model, `extra.model`). Changes that change the shapes or the layout of what was
saved cannot load: the model's architecture (vocabulary included), the objective's heads,
DeepSpeed's ZeRO layout (its engine does not reshard). Every other change (optim.lr,
train.max_steps, log cadence, the number of workers under DCP) loads and applies from the
resumed step on; the driver records those in the run (`temper.spec_changes`).
"""

from __future__ import annotations

from typing import Any

from temper.errors import TemperError
from temper.spec.loader import flatten

#: objective keys that shape parameters (the rest, e.g. mask_ratio or temperature, are loss settings)
OBJECTIVE_SHAPES = ("kind", "decoder_dim", "decoder_depth", "decoder_heads", "proj_dim", "proj_hidden")


def spec_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(dotted key, saved value, new value) for every leaf that differs."""
    old, new = flatten(saved), flatten(now)
    missing = "(unset)"
    return [(k, old.get(k, missing), new.get(k, missing)) for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)]


def cannot_load(key: str, *, saved: dict[str, Any], now: dict[str, Any]) -> bool:
    """Does a change of `key` make the checkpoint unloadable?"""
    section, _, rest = key.partition(".")
    if section == "model":
        return "dropout" not in rest
    if section == "objective":
        return rest in OBJECTIVE_SHAPES
    deepspeed = "deepspeed" in (saved.get("strategy", {}).get("kind"), now.get("strategy", {}).get("kind"))
    if key == "strategy.kind":
        return deepspeed  # DDP and FSDP checkpoints are both DCP: they load into each other
    if deepspeed and key in ("strategy.stage", "resources.workers"):
        return True  # ZeRO partitions are saved per rank and stage
    return False


def check_resume(*, saved: dict[str, Any], now: dict[str, Any], where: str) -> tuple[str, ...]:
    """The changes a resume may carry on with ("key: old -> new"); TemperError (exit 2) naming
    the ones that cannot load and the two ways out. `saved` may hold only the model section."""
    now = {k: v for k, v in now.items() if k in saved}
    changes = spec_changes(saved, now)
    blocking = [c for c in changes if cannot_load(c[0], saved=saved, now=now)]
    if blocking:
        diff = ", ".join(f"{k}: {old} -> {new}" for k, old, new in blocking)
        back = " ".join(f"--set {k}={old}" for k, old, _ in blocking)
        raise TemperError(
            f"cannot resume {where}: {diff} (a checkpoint loads only into the model, heads and ZeRO layout that "
            f"saved it); pass --no-resume to start a new run, or set the old value back: {back}")
    return tuple(f"{k}: {old} -> {new}" for k, old, new in changes)
