"""Profiling on demand (`train.profile`) and the CUDA memory snapshot.

    <run folder>/profile/rank-N.trace.json.gz   torch.profiler's Chrome/Perfetto trace
    <run folder>/profile/rank-N-top-ops.txt     the ops that took the most time
    <run folder>/profile/rank-N-memory.pickle   CUDA only: the allocator history (drag it
                                                into https://pytorch.org/memory_viz)

The driver uploads the run folder to MLflow at the end. With `train.profile` unset the loop
holds a `NoProfiler`, whose `step` does nothing.
"""

from __future__ import annotations

import gzip
import logging
import shutil
from pathlib import Path

import torch

from temper.spec.job import ProfileSpec

log = logging.getLogger(__name__)
_recording_memory = False


class NoProfiler:
    def step(self, step: int) -> None:
        """Called after every step: nothing to do."""

    def close(self) -> None:
        pass


class StepProfiler:
    """Profiles steps start_step .. start_step+steps-1, then writes this rank's files."""

    def __init__(self, spec: ProfileSpec, *, folder: Path, rank: int, device: torch.device) -> None:
        self.spec, self.folder, self.rank, self.device = spec, folder, rank, device
        self.last = spec.start_step + spec.steps - 1
        self.prof: torch.profiler.profile | None = None

    def step(self, step: int) -> None:
        """Called after `step` finished: start before the first profiled step, stop after the last."""
        if step == self.spec.start_step - 1:
            self._start()
        elif step == self.last and self.prof is not None:
            self._finish()

    def _start(self) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(activities=activities, record_shapes=self.spec.record_shapes,
                                           profile_memory=self.spec.profile_memory, with_stack=self.spec.with_stack)
        self.prof.__enter__()

    def _finish(self) -> None:
        prof, self.prof = self.prof, None
        prof.__exit__(None, None, None)
        self.folder.mkdir(parents=True, exist_ok=True)
        trace = self.folder / f"rank-{self.rank}.trace.json"
        prof.export_chrome_trace(str(trace))
        with open(trace, "rb") as src, gzip.open(f"{trace}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        trace.unlink()
        sort = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages(group_by_input_shape=self.spec.record_shapes).table(sort_by=sort, row_limit=30)
        (self.folder / f"rank-{self.rank}-top-ops.txt").write_text(table + "\n")
        if self.device.type == "cuda" and self.spec.memory_snapshot:
            dump_memory_snapshot(self.folder / f"rank-{self.rank}-memory.pickle")
        log.warning("train.profile: steps %d-%d profiled; files in %s", self.spec.start_step, self.last, self.folder)

    def close(self) -> None:
        if self.prof is not None:  # the run ended inside the window: keep what was recorded
            self._finish()


def build_profiler(spec: ProfileSpec | None, *, run_folder: str | None, rank: int, device: torch.device):
    if spec is None:
        return NoProfiler()
    if not run_folder:
        log.warning("train.profile: no run folder to write the traces to; profiling is off")
        return NoProfiler()
    if device.type == "cuda" and spec.memory_snapshot:
        record_memory_history()  # from the start: an out-of-memory death gets its snapshot too
    return StepProfiler(spec, folder=Path(run_folder) / "profile", rank=rank, device=device)


def record_memory_history() -> None:
    global _recording_memory
    torch.cuda.memory._record_memory_history(max_entries=100_000)
    _recording_memory = True


def dump_memory_snapshot(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.cuda.memory._dump_snapshot(str(path))


def save_memory_snapshot_on_oom(error: BaseException, *, run_folder: str | None, rank: int) -> None:
    """An out-of-memory death while the allocator history is recorded: write the snapshot."""
    if not (_recording_memory and run_folder and isinstance(error, torch.cuda.OutOfMemoryError)):
        return
    try:
        dump_memory_snapshot(Path(run_folder) / "profile" / f"rank-{rank}-oom-memory.pickle")
    except Exception as e:  # noqa: BLE001 - the snapshot must not hide the OOM itself
        log.warning("could not write the OOM memory snapshot: %s", e)
