"""Preemption: a SIGTERM becomes a checkpoint at the next step boundary, then a clean exit.

    Preemption(spec, ctx, reporter)   installs the SIGTERM hook (reporter.on_sigterm) and, on
                                      rank 0, polls the driver's notice (reporter.preempt_requested)
    agreed()      every step, one tiny all-gather: did any rank get a SIGTERM (or the driver
                  a notice)? every rank gets the same answer at the same step. On GPUs it runs
                  on a CPU (gloo) group of the same ranks: no device synchronization per step
    save(...)     at that step: save and commit within fault.preemption_grace_s; when the time
                  left is shorter than the last save took, say so and keep the previous
                  checkpoint (the next run resumes from it)

A spot notice or a pod eviction sends SIGTERM to one process (a worker, or the driver); the
grace time counts from when the first rank learned of it. fault.preemption_grace_s=0 turns
this off (SIGTERM then stops the job like Ctrl-C, the run KILLED, not resumable on purpose).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from temper.dist import DistContext

log = logging.getLogger(__name__)

#: How often rank 0 asks the driver whether it was told to stop (seconds).
POLL_S = 0.5


@dataclass
class Preemption:
    grace_s: float
    ctx: DistContext
    noticed_at: float | None = None  # monotonic time this process learned of the preemption
    source: str = ""
    _uninstall: Any = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _group: Any = None  # the CPU process group of the per-step flag (accelerators only)

    @classmethod
    def build(cls, *, grace_s: float, ctx: DistContext, reporter: Any) -> Preemption:
        self = cls(grace_s=grace_s, ctx=ctx)
        if grace_s <= 0:
            return self
        if ctx.device.type != "cpu" and ctx.distributed and ctx.world_size > 1:
            import torch.distributed as dist

            self._group = dist.new_group(backend="gloo")  # every rank, here, in the same order
        install = getattr(reporter, "on_sigterm", None)  # a duck-typed test reporter may lack both
        if install is not None:
            self._uninstall = install(lambda: self.notice("SIGTERM"))
        if ctx.is_main and hasattr(reporter, "preempt_requested"):
            threading.Thread(target=self._poll, args=(reporter,), name="temper-preempt-poll",
                             daemon=True).start()
        return self

    @property
    def enabled(self) -> bool:
        return self.grace_s > 0

    def notice(self, source: str) -> None:
        """Called from a signal handler or the poll thread: remember, never block."""
        if self.noticed_at is None:
            self.noticed_at, self.source = time.monotonic(), source

    def _poll(self, reporter: Any) -> None:
        while not self._stop.wait(POLL_S):
            if self.noticed_at is None and reporter.preempt_requested():
                self.notice("the driver (SIGTERM)")

    def agreed(self, *, last_save_s: float) -> Decision | None:
        """Every rank's answer at this step boundary: None, or what to do (the same on all ranks)."""
        if not self.enabled:
            return None
        elapsed = time.monotonic() - self.noticed_at if self.noticed_at is not None else 0.0
        # On CPU: a flag on an accelerator would need its .item() (a device sync) every step
        on = "cpu" if self._group is not None else self.ctx.device
        row = torch.tensor([float(self.noticed_at is not None), elapsed, last_save_s], dtype=torch.float64,
                           device=on)
        rows = self.ctx.all_gather_rows(row, group=self._group)
        if rows[:, 0].max().item() == 0:
            return None
        sources = [self.source] if self.source else []
        return Decision(elapsed_s=rows[:, 1].max().item(), save_estimate_s=rows[:, 2].max().item(),
                        grace_s=self.grace_s, source=", ".join(sources) or "a peer's SIGTERM")

    def close(self) -> None:
        self._stop.set()
        if self._uninstall is not None:
            self._uninstall()
            self._uninstall = None


@dataclass(frozen=True)
class Decision:
    elapsed_s: float  # since the first rank learned of it (the most over ranks)
    save_estimate_s: float  # the slowest rank's last save (0: none yet)
    grace_s: float
    source: str

    @property
    def left_s(self) -> float:
        return self.grace_s - self.elapsed_s

    @property
    def can_save(self) -> bool:
        return self.save_estimate_s < self.left_s


def preempt_save(decision: Decision, *, step: int, keeper: Any, save: Any, tracker: Any) -> int | None:
    """Save at `step` and commit (every rank), or keep the previous checkpoint when the grace
    time left is shorter than the last save took. Returns the step the next run resumes from."""
    previous = keeper.latest_step()
    if not decision.can_save:
        log.warning("preempted at step %d: %.1f s of fault.preemption_grace_s=%.0f s left, the last save "
                    "took %.1f s: not saving; the next run resumes from %s", step, decision.left_s,
                    decision.grace_s, decision.save_estimate_s,
                    f"step {previous} (the previous checkpoint)" if previous else "the start (no checkpoint)")
        resume = previous
    else:
        started = time.monotonic()
        save()
        keeper.close()  # commit now: an async save in flight too
        took = time.monotonic() - started
        resume = keeper.latest_step()
        if decision.elapsed_s + took > decision.grace_s:
            log.warning("preempted at step %d: the checkpoint took %.1f s and ended %.1f s after the notice, "
                        "past fault.preemption_grace_s=%.0f s (raise it if the process was killed first)",
                        step, took, decision.elapsed_s + took, decision.grace_s)
        elif resume is None:
            log.warning("preempted (%s) at step %d: checkpointing is off, nothing saved; exiting",
                        decision.source, step)
        else:
            log.warning("preempted (%s): checkpoint at step %d committed in %.1f s; exiting, resumable",
                        decision.source, step, took)
    tracker.set_tags({"temper.preempted": str(step),
                      f"temper.event.step-{step:06d}.preempted":
                          f"step {step}: preempted ({decision.source}); resumes from step {resume or 0}"})
    return resume
