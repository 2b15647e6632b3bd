"""Sharded, resumable checkpoints: one directory per run, one committed step directory per save.

    ckpt = Checkpointer(run_dir=..., ctx=ctx, keep_last=3, async_save=False)
    found = ckpt.latest()                      # newest committed + intact, same on every rank
    if found: state = ckpt.load(found, strategy=strategy)
    ...
    blocked_s = ckpt.save(step=..., strategy=strategy, spec_hash=..., run_id=..., data=cursor,
                          rank_state={...})
    ckpt.close()                               # commits an async save still in flight

`find_latest` / `read_checkpoint` select without a process group (the driver);
`export_checkpoint` writes consolidated safetensors weights in one process.
"""

from __future__ import annotations

from temper.checkpoint.catalog import find_latest, read_checkpoint
from temper.checkpoint.checkpointer import Checkpointer
from temper.checkpoint.manifest import CheckpointManifest, CommittedCheckpoint, LoadedState
from temper.checkpoint.weights import export_checkpoint

__all__ = [
    "CheckpointManifest", "Checkpointer", "CommittedCheckpoint", "LoadedState",
    "export_checkpoint", "find_latest", "read_checkpoint",
]
