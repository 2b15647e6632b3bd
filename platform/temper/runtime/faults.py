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


def fault_from_env() -> Fault | None:
    return parse_fault(os.environ.get("TEMPER_FAULT"), once=os.environ.get("TEMPER_FAULT_ONCE"))
