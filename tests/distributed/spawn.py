"""Run a function on N real gloo ranks (torch.multiprocessing spawn, free-port rendezvous)."""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

from temper.dist import free_port


def _rank_main(rank: int, world_size: int, port: int, out_dir: str, fn: Callable, args: tuple) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    import torch

    torch.set_num_threads(1)
    result = fn(*args)
    Path(out_dir, f"rank{rank}.pkl").write_bytes(pickle.dumps(result))


def run_ranks(fn: Callable, world_size: int, *args: Any) -> list[Any]:
    """Call fn(*args) on `world_size` processes; return each rank's return value, in rank order."""
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_rank_main, args=(world_size, free_port(), out, fn, args),
                           nprocs=world_size, join=True, start_method="spawn")
        return [pickle.loads(Path(out, f"rank{r}.pkl").read_bytes()) for r in range(world_size)]


class StopAt:
    """A Reporter whose driver 'presses Ctrl-C' once step `at` has been logged."""

    def __init__(self, at: int | None) -> None:
        self.at, self.step = at, 0

    def progress(self, event: dict) -> None:
        self.step = event.get("step", self.step)

    def should_stop(self) -> bool:
        # Asked at each logging step (every 2) before that step's progress event arrives.
        return self.at is not None and self.step + 2 >= self.at

    def close(self) -> None:
        pass
