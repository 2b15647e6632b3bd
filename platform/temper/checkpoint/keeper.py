"""The loop's side of checkpoints: what goes into one, and putting it back.

A checkpoint holds the strategy's model and optimizer (DCP, or DeepSpeed's own files), and:
- in its manifest (the same on every rank): the step, the data loader's position, the spec
  hash, the MLflow run id, the model spec (for `temper export`);
- per rank (`rank-N.pt`): the LR scheduler and every RNG this rank draws from (torch CPU and
  CUDA, Python, NumPy), so dropout and augmentations continue exactly.

Resuming on another world size restores model, optimizer (DCP reshards), scheduler and data
position exactly; ranks that did not exist before start their RNGs from (seed, step, rank).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from temper.checkpoint.storage import storage_options
from temper.dist import DistContext
from temper.run_info import RunInfo
from temper.spec.job import JobSpec
from temper.spec.loader import spec_hash, spec_to_dict

log = logging.getLogger(__name__)


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Resumed:
    step: int
    path: str
    world_size: int | None = None  # the world size the checkpoint was written at


def build_keeper(spec: JobSpec, *, ctx: DistContext, run_info: RunInfo) -> CheckpointKeeper | NoCheckpoints:
    """The run's keeper; checkpointing needs the folder the launcher chose for this run
    (tests may train without one)."""
    if not spec.checkpoint.enabled or not run_info.checkpoint_dir:
        return NoCheckpoints()
    return CheckpointKeeper(spec=spec, ctx=ctx, run_info=run_info)


class NoCheckpoints:
    """Checkpointing off: nothing to restore, never due, a stop saves nothing."""

    last_save_s = 0.0

    def restore(self, **_: Any) -> Resumed | None:
        return None

    def latest_step(self) -> int | None:
        return None

    def due(self, step: int) -> bool:
        return False

    def save(self, **_: Any) -> float | None:
        return None

    def close(self) -> None:
        pass


class CheckpointKeeper:
    """Owns the Checkpointer for one run and decides when to save: the loop calls
    `restore()` once, asks `due(step)` once per step, and calls `save()` when it is due or
    when the job stops early (Ctrl-C); `close()` commits an async save in flight."""

    def __init__(self, *, spec: JobSpec, ctx: DistContext, run_info: RunInfo) -> None:
        from temper.checkpoint import Checkpointer

        self.spec, self.ctx = spec, ctx
        self.run_id = run_info.run_id
        self.hash = spec_hash(spec)
        self.last_save_s = 0.0  # how long the last save() took (a preemption's estimate)
        self.checkpointer = Checkpointer(
            run_dir=run_info.checkpoint_dir, ctx=ctx, keep_last=spec.checkpoint.keep_last,
            async_save=spec.checkpoint.async_save, storage_options=storage_options(spec),
        )

    def restore(self, *, strategy, scheduler, data, tracker) -> Resumed | None:
        """Load the run's newest committed checkpoint, if any, into everything; its step."""
        ckpt = self.checkpointer.latest()
        if ckpt is None:
            return None
        if ckpt.manifest.spec_hash != self.hash and self.ctx.is_main:
            # The driver checked the change and recorded it (temper.spec_changes, spec-resume-<k>.yaml).
            log.info("resuming %s, written with another spec (hash %s, now %s): the new values apply "
                     "from here on", ckpt.path, ckpt.manifest.spec_hash, self.hash)
        loaded = self.checkpointer.load(ckpt, strategy=strategy)  # a mismatch is a TemperError
        scheduler.load_state_dict(loaded.rank0_state["scheduler"])
        tracker.resume_after(loaded.step, carried=loaded.rank0_state.get("metrics", []))
        if loaded.manifest.data is not None:
            data.load_state_dict(loaded.manifest.data)
        if loaded.rank_state is not None and loaded.manifest.world_size == self.ctx.world_size:
            set_rng_state(loaded.rank_state["rng"])
        else:  # a new layout: fresh, reproducible streams for this rank
            torch.manual_seed(self.spec.seed + 7919 * loaded.step + self.ctx.rank)
        return Resumed(step=loaded.step, path=ckpt.path, world_size=loaded.manifest.world_size)

    def latest_step(self) -> int | None:
        """The newest committed checkpoint's step (every rank calls it)."""
        ckpt = self.checkpointer.latest()
        return ckpt.manifest.step if ckpt is not None else None

    def due(self, step: int) -> bool:
        """A save at this step: every checkpoint.every_steps, and at train.max_steps."""
        every = self.spec.checkpoint.every_steps
        return step == self.spec.train.max_steps or bool(every and step % every == 0)

    def save(self, *, step: int, strategy, scheduler, data, tracker) -> float | None:
        """Save at `step` (every rank); returns the seconds training was blocked. Rank 0's
        metrics not yet delivered to MLflow ride along (a killed worker would lose them)."""
        started = time.monotonic()
        rank_state = {"rng": rng_state(), "scheduler": scheduler.state_dict(), "metrics": tracker.unsent()}
        try:
            return self._save(step=step, strategy=strategy, data=data, rank_state=rank_state)
        finally:
            self.last_save_s = time.monotonic() - started

    def _save(self, *, step: int, strategy, data, rank_state: dict) -> float | None:
        return self.checkpointer.save(
            step=step, strategy=strategy, spec_hash=self.hash, run_id=self.run_id,
            data=data.state_dict(), rank_state=rank_state,
            extra={"model": self.spec.model.model_dump(mode="json"), "name": self.spec.name,
                   "spec": spec_to_dict(self.spec)},  # the driver's resume check compares it (compat.py)
            mesh=_mesh(strategy),
        )

    def close(self) -> None:
        self.checkpointer.close()


def _mesh(strategy) -> dict | None:
    tp = getattr(getattr(strategy, "spec", None), "tensor_parallel", None) or 1
    return {"dp": strategy.data_world_size, "tp": tp}
