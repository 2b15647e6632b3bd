"""Fault injection for testing fault tolerance: `TEMPER_FAULT` in the workers' environment.

    TEMPER_FAULT=KIND:STEPS:RANK      e.g.  kill:6:1   nan:5-7:*   raise:4:0   hang:3:1

KIND is `kill` (the worker SIGKILLs itself before step STEPS), `raise` (a RuntimeError),
`forward` (a RuntimeError from inside the model's forward, through a forward pre-hook),
`hang` (the worker sleeps, so its peers' next collective times out), `oom` (an allocation
larger than any device: on CUDA a real torch.cuda.OutOfMemoryError), `nan` (the training
loss of those steps becomes NaN) or `sigterm` (the worker sends itself SIGTERM before the
step and trains on: a spot notice, fault.preemption_grace_s). STEPS is one step or a range
`A-B`; RANK a rank or `*`.
With `TEMPER_FAULT_ONCE=PATH` the fault fires only while PATH does not exist (it is
created when the fault fires), so a restarted worker group runs clean: one failure.

Used by the tests and by anyone who wants to rehearse a failure on a real cluster; unset,
it costs one dictionary lookup per step.

`TEMPER_TRACE_SAMPLES=DIR` makes every rank write the keys of the samples it trains on,
one `STEP<TAB>KEY` line each, to `DIR/ws{W}-from{S}-rank{R}.tsv` (W the world size, S the
first step this worker group trained): what a rehearsal of a resize or a preemption checks
against the epoch's samples (webdataset data: its `__key__`s).

`TEMPER_HOLD=PATH` pauses training at a chosen step: while PATH holds a step number below
the next step, every rank waits before that step (outside any collective), after writing
`PATH.waiting-step{S}-ws{W}-rank{R}`; write a higher number (or remove PATH) to go on. A
rehearsal moves training from phase to phase with it (train to step 6, lose a node, ...).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from temper.errors import TemperError

log = logging.getLogger(__name__)
KINDS = ("kill", "raise", "forward", "hang", "oom", "nan", "sigterm")


@dataclass(frozen=True)
class Fault:
    kind: str
    first: int
    last: int
    rank: int | None  # None: every rank
    once_file: Path | None = None
    step: list[int] = field(default_factory=lambda: [0])  # the step running now (for `forward`)

    def hits(self, *, step: int, rank: int) -> bool:
        if not self.first <= step <= self.last or self.rank not in (None, rank):
            return False
        return self.once_file is None or not self.once_file.exists()

    def before_step(self, *, step: int, rank: int) -> None:
        """kill / raise / hang right before `step` runs."""
        self.step[0] = step
        if self.kind in ("nan", "forward") or not self.hits(step=step, rank=rank):
            return
        self._mark()
        log.warning("TEMPER_FAULT: injecting %s at step %d on rank %d", self.kind, step, rank)
        if self.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.kind == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
            return
        if self.kind == "raise":
            raise RuntimeError(f"injected fault at step {step} on rank {rank} (TEMPER_FAULT)")
        if self.kind == "oom":
            cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
            torch.empty(1 << 50, dtype=torch.uint8, device="cuda" if cuda else "cpu")  # 1 PiB
        time.sleep(10**6)  # hang: a peer's collective times out first

    def install(self, model: torch.nn.Module, *, rank: int) -> None:
        """`forward`: raise from the model's forward during the fault's steps."""
        if self.kind != "forward":
            return

        def hook(module, args):
            if self.hits(step=self.step[0], rank=rank):
                self._mark()
                raise RuntimeError(f"injected fault in {type(module).__name__}.forward at step "
                                   f"{self.step[0]} on rank {rank} (TEMPER_FAULT)")

        model.register_forward_pre_hook(hook)

    def poison(self, loss: torch.Tensor, *, step: int, rank: int) -> torch.Tensor:
        """The loss, NaN when a `nan` fault covers this step and rank."""
        if self.kind != "nan" or not self.hits(step=step, rank=rank):
            return loss
        if step == self.last:
            self._mark()
        return loss * float("nan")

    def _mark(self) -> None:
        if self.once_file is not None:
            self.once_file.touch()


def parse_fault(text: str | None, *, once: str | None = None) -> Fault | None:
    """`TEMPER_FAULT`'s value -> a Fault (None when unset)."""
    if not text:
        return None
    parts = text.split(":")
    if len(parts) != 3 or parts[0] not in KINDS:
        raise TemperError(f"TEMPER_FAULT={text!r} must look like KIND:STEP[-STEP]:RANK|* with KIND one of "
                          f"{', '.join(KINDS)} (e.g. kill:6:1)")
    kind, steps, rank = parts
    try:
        first, _, last = steps.partition("-")
        lo, hi = int(first), int(last or first)
        who = None if rank == "*" else int(rank)
    except ValueError:
        raise TemperError(f"TEMPER_FAULT={text!r}: steps and rank must be integers (rank may be *)") from None
    return Fault(kind=kind, first=lo, last=hi, rank=who, once_file=Path(once) if once else None)


class SampleTrace:
    """TEMPER_TRACE_SAMPLES: the keys of the samples each step trains on, per rank."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.file = folder, None

    def record(self, batch: dict, *, step: int, rank: int, world_size: int) -> None:
        if self.file is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.file = open(self.folder / f"ws{world_size}-from{step:06d}-rank{rank}.tsv", "a", buffering=1)
        self.file.writelines(f"{step}\t{key}\n" for key in batch.get("__key__", ()))


class Hold:
    """TEMPER_HOLD: wait before a step while the file's number is below it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def before_step(self, *, step: int, rank: int, world_size: int) -> None:
        marked = False
        while (limit := self._limit()) is not None and limit < step:
            if not marked:
                log.warning("TEMPER_HOLD: waiting before step %d (%s says %d)", step, self.path, limit)
                Path(f"{self.path}.waiting-step{step}-ws{world_size}-rank{rank}").touch()
                marked = True
            time.sleep(0.1)

    def _limit(self) -> int | None:
        try:
            return int(self.path.read_text().strip() or 0)
        except (OSError, ValueError):
            return None


def hold_from_env() -> Hold | None:
    path = os.environ.get("TEMPER_HOLD")
    return Hold(Path(path)) if path else None


def trace_from_env() -> SampleTrace | None:
    folder = os.environ.get("TEMPER_TRACE_SAMPLES")
    return SampleTrace(Path(folder)) if folder else None


def fault_from_env() -> Fault | None:
    return parse_fault(os.environ.get("TEMPER_FAULT"), once=os.environ.get("TEMPER_FAULT_ONCE"))
