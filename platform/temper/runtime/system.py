"""What every rank measures about itself for the logging step: its own step time and its
node's CPU, memory and GPU use. Rank 0 receives every rank's row in the window's one
collective (loop._close_window) and logs them, tagged by node; no other rank talks to MLflow.

    perf/step_time_s/rank<r>        rank r's own work per step: waiting for its batch,
                                    forward and the optimizer step (backward is left out: it
                                    waits in the gradient all-reduce for the slowest rank, so
                                    it would make every rank look as slow as the straggler)
    perf/step_time_max_over_median  the slowest rank's step time over the median rank's
    perf/straggler_rank             which rank that is
    perf/data_wait_s                the longest wait for a batch, per step, over ranks
    system/<node>/cpu_percent, memory_used_gb, memory_percent          one per node
    system/<node>/gpu<local rank>/utilization_percent, memory_used_gb  one per GPU
"""

from __future__ import annotations

import re
import socket
import statistics
import time

import torch

#: Per-rank step times are logged up to this many ranks; beyond, only their summary.
MAX_RANKS_LOGGED = 64
#: The row each rank contributes: its step time and data wait, then its node's usage.
ROW = ("step_s", "data_wait_s", "cpu_percent", "memory_used_gb", "memory_percent",
       "gpu_utilization_percent", "gpu_memory_used_gb")


def node_name() -> str:
    """This machine's name, as a metric-name-safe string."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:60] or "node"


class StepTimer:
    """Times the rank's own work per step without a device sync per step: host clocks
    for the batch wait; CUDA events for forward and optimizer step on a GPU (read at the
    logging step, after the PerfMeter's synchronize)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._data_s = self._host_s = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._steps = 0
        self._t0 = 0.0

    def data_start(self) -> None:
        self._t0 = time.perf_counter()

    def data_end(self) -> None:
        self._data_s += time.perf_counter() - self._t0

    def compute_start(self) -> None:
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self._events.append((start, torch.cuda.Event(enable_timing=True)))
        else:
            self._t0 = time.perf_counter()

    def compute_end(self) -> None:
        if self.cuda:
            self._events[-1][1].record()
        else:
            self._host_s += time.perf_counter() - self._t0

    def step(self) -> None:
        self._steps += 1

    def window(self) -> tuple[float, float]:
        """(own step time, batch wait) per step since the last call."""
        compute = self._host_s + sum(a.elapsed_time(b) for a, b in self._events) / 1000.0
        steps = max(self._steps, 1)
        out = ((self._data_s + compute) / steps, self._data_s / steps)
        self._data_s = self._host_s = 0.0
        self._events.clear()
        self._steps = 0
        return out


class SystemSampler:
    """This node's CPU and memory use (psutil) and this rank's GPU (torch.cuda); -1 where
    unknown. A sample costs tens of microseconds; taken at logging steps only."""

    def __init__(self, device: torch.device, *, enabled: bool = True) -> None:
        self.device, self.enabled = device, enabled
        self._psutil = None
        if enabled:
            try:
                import psutil

                psutil.cpu_percent(interval=None)  # the first call only starts the interval
                self._psutil = psutil
            except ImportError:
                self._psutil = None

    def sample(self) -> list[float]:
        cpu = mem_gb = mem_pct = gpu_util = gpu_gb = -1.0
        if self._psutil is not None:
            cpu = self._psutil.cpu_percent(interval=None)
            vm = self._psutil.virtual_memory()
            mem_gb, mem_pct = (vm.total - vm.available) / 2**30, vm.percent
        if self.enabled and self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            gpu_gb = (total - free) / 2**30
            try:
                gpu_util = float(torch.cuda.utilization(self.device))
            except Exception:  # noqa: BLE001 - needs pynvml (nvidia-ml-py); absent: unknown
                gpu_util = -1.0
        return [cpu, mem_gb, mem_pct, gpu_util, gpu_gb]


def rank_metrics(rows: list[list[float]], *, nodes: list[str], local_ranks: list[int],
                 system: bool) -> dict[str, float]:
    """Rank 0's view of every rank's row (see ROW): straggler summary and per-node usage."""
    steps = [r[0] for r in rows]
    median = statistics.median(steps)
    slowest = max(range(len(steps)), key=steps.__getitem__)
    out = {
        "perf/step_time_max_over_median": steps[slowest] / median if median > 0 else 1.0,
        "perf/straggler_rank": float(slowest),
        "perf/data_wait_s": max(r[1] for r in rows),
    }
    if len(rows) <= MAX_RANKS_LOGGED:
        out.update({f"perf/step_time_s/rank{i}": s for i, s in enumerate(steps)})
    if not system:
        return out
    seen: set[str] = set()
    for row, node, local in zip(rows, nodes, local_ranks, strict=True):
        if node not in seen:  # CPU and memory are the node's: one rank reports them
            seen.add(node)
            for name, value in zip(ROW[2:5], row[2:5], strict=True):
                if value >= 0:
                    out[f"system/{node}/{name}"] = value
        for name, value in (("utilization_percent", row[5]), ("memory_used_gb", row[6])):
            if value >= 0:
                out[f"system/{node}/gpu{local}/{name}"] = value
    return out
