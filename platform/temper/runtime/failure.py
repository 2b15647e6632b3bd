"""What a worker leaves behind when it fails or hangs: its log file, its stacks, its cause.

    <run folder>/logs/rank-N.txt     every log line of rank N, its full traceback on failure,
                                     and its Python stacks (all threads) on a hang: written
                                     when a step runs past 90% of fault.collective_timeout_s and
                                     when the launcher stops it (SIGTERM)

`StepWatch` is the loop's side: each step it re-arms the stack dump (faulthandler) and notes the
step this rank entered, which a background thread writes to the process group's store, so that the rank whose collective
times out can name the ranks that never reached it (`describe_timeout`).
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import time
import traceback
from pathlib import Path
from typing import IO

import torch.distributed as dist

from temper.errors import root_cause

log = logging.getLogger(__name__)
_BEACON = "temper/entered_step/"
_TIMED_OUT = "temper/timed_out/"
_current: RankLog | None = None


class RankLog:
    """This process's rank log: a logging handler, faulthandler's file, the failure record."""

    def __init__(self, path: Path, *, rank: int, dump_on_sigterm: bool) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.rank = path, rank
        self.start = path.stat().st_size if path.exists() else 0  # where this attempt's lines begin
        self.file: IO[str] = open(path, "a", buffering=1)  # noqa: SIM115 - lives as long as the worker
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.file.write(f"=== rank {rank}, pid {os.getpid()}, attempt {attempt} ===\n")
        self.handler = logging.StreamHandler(self.file)
        self.handler.setFormatter(logging.Formatter(f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(self.handler)  # at TEMPER_LOG_LEVEL, as the console
        logging.captureWarnings(True)
        self.sigterm = dump_on_sigterm and _main_thread()
        if self.sigterm:
            faulthandler.register(signal.SIGTERM, file=self.file, all_threads=True, chain=True)

    def record_failure(self, error: BaseException) -> None:
        self.file.write("=== failed ===\n" + "".join(traceback.format_exception(error)) + "\n")
        self.file.flush()

    def arm(self, timeout_s: float) -> None:
        """Dump every thread's stack into the log if the next `timeout_s` pass without re-arming."""
        faulthandler.dump_traceback_later(timeout_s, repeat=False, file=self.file, exit=False)

    def close(self) -> None:
        faulthandler.cancel_dump_traceback_later()
        if self.sigterm:
            faulthandler.unregister(signal.SIGTERM)
        logging.getLogger().removeHandler(self.handler)
        self.file.close()


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def open_rank_log(run_folder: str | None, *, rank: int, dump_on_sigterm: bool) -> RankLog | None:
    """Start writing this rank's log under the run folder (None: no run folder, no file)."""
    global _current
    if not run_folder:
        return None
    _current = RankLog(Path(run_folder) / "logs" / f"rank-{rank}.txt", rank=rank, dump_on_sigterm=dump_on_sigterm)
    return _current


def close_rank_log(rank_log: RankLog | None) -> None:
    global _current
    if rank_log is not None:
        rank_log.close()
        if _current is rank_log:
            _current = None


class StepWatch:
    """Per step: re-arm the stack dump and note the step this rank entered.

    The dump fires at DUMP_AT of the collective timeout after a step began, so every rank's
    stacks are in its log before the collective's own timeout ends the process. The step
    reaches the process group's store from a background thread (at most every PUBLISH_S, and
    once more on a hang: a rank blocked in a collective releases the GIL), so the step itself
    never waits on a store round trip (one TCP round trip to the master per step otherwise)."""

    #: re-arm at most this often (re-arming costs ~40 us): the dump then fires up to this much
    #: before DUMP_AT x timeout, never later
    REARM_S = 1.0
    DUMP_AT = 0.9
    PUBLISH_S = 0.5

    def __init__(self, *, rank: int, world_size: int, timeout_s: float) -> None:
        self.rank, self.timeout_s = rank, timeout_s
        self.log = _current
        self.rearm_s = min(self.REARM_S, timeout_s / 4)
        self.armed_at = -self.rearm_s
        self.entered: int | None = None
        self.publisher = _BeaconPublisher(_store(), rank=rank, every_s=min(self.PUBLISH_S, timeout_s / 8),
                                          read=lambda: self.entered) if world_size > 1 else None

    def step(self, step: int) -> None:
        if self.log is not None and time.monotonic() - self.armed_at >= self.rearm_s:
            self.armed_at = time.monotonic()
            self.log.arm(self.DUMP_AT * self.timeout_s)
        self.entered = step

    def close(self) -> None:
        if self.log is not None:
            faulthandler.cancel_dump_traceback_later()
        if self.publisher is not None:
            self.publisher.close()


class _BeaconPublisher:
    """A daemon thread that writes the rank's latest entered step to the store when it changes."""

    def __init__(self, store, *, rank: int, every_s: float, read) -> None:
        import threading

        self.store, self.key, self.every_s, self.read = store, f"{_BEACON}{rank}", every_s, read
        self.stop = threading.Event()
        self.published: int | None = None
        self.thread = threading.Thread(target=self._run, name="temper-step-beacon", daemon=True)
        if store is not None:
            self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(self.every_s):
            self.publish()

    def publish(self) -> None:
        step = self.read()
        if step is None or step == self.published:
            return
        try:
            self.store.set(self.key, str(step))
            self.published = step
        except Exception:  # noqa: BLE001 - the store's host is gone: the job is ending anyway
            self.stop.set()

    def close(self) -> None:
        if self.thread.is_alive():
            self.stop.set()
            self.thread.join(timeout=5)


def _store():
    try:
        return dist.distributed_c10d._get_default_store() if dist.is_initialized() else None
    except Exception:  # noqa: BLE001 - no store: the timeout error just names fewer ranks
        return None


def describe_timeout(*, rank: int, world_size: int, timeout_s: float, detail: str) -> str:
    """The collective-timeout message: which ranks never reached the collective (those that do
    not time out themselves within a short grace), and the last step each rank finished."""
    store = _store()
    steps = _read_keys(store, _BEACON, world_size)
    late = _stragglers(store, rank=rank, world_size=world_size, grace_s=min(5.0, timeout_s / 2))
    mine = steps.get(rank)
    where = f" in step {mine}" if mine is not None else ""
    text = f"a collective{where} waited longer than fault.collective_timeout_s={timeout_s:g}s"
    if late:
        text += f": rank(s) {', '.join(map(str, late))} never reached it"
    if steps:
        text += " (last step finished: " + ", ".join(f"rank {r}: {s - 1}" for r, s in sorted(steps.items())) + ")"
    else:
        text += f" ({detail})"
    return (text + "; every rank's stack is in its log (logs/rank-N.txt in the run folder and the "
            "MLflow run); fix the stalled rank, or raise fault.collective_timeout_s")


def _stragglers(store, *, rank: int, world_size: int, grace_s: float) -> list[int]:
    """Ranks that reached the collective time out too: each says so in the store; the ones
    that have not said so after `grace_s` never got there."""
    if store is None or world_size < 2:
        return []
    try:
        store.set(f"{_TIMED_OUT}{rank}", "1")
    except Exception:  # noqa: BLE001 - the store's host may be gone
        return []
    deadline = time.monotonic() + grace_s
    while True:
        missing = sorted(set(range(world_size)) - set(_read_keys(store, _TIMED_OUT, world_size)))
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(0.2)


def _read_keys(store, prefix: str, world_size: int) -> dict[int, int]:
    if store is None:
        return {}
    found = {}
    for r in range(world_size):
        key = f"{prefix}{r}"
        try:
            if store.check([key]):
                found[r] = int(store.get(key))
        except Exception:  # noqa: BLE001 - the store's host may be gone
            continue
    return found


def failure_record(error: BaseException, *, rank: int) -> dict[str, str | int | None]:
    """What the driver needs to name the cause: `rank R: <cause>` and the cause's traceback."""
    line, tb = root_cause(error)
    return {"rank": rank, "error": line, "traceback": tb}


def flight_recorder_env(run_folder: str | None) -> dict[str, str]:
    """NCCL's flight recorder (CUDA): the last 2000 collectives per rank, dumped on a collective
    timeout to <run folder>/nccl/rank_<N>. Must be in the environment before the process group
    exists; values the user set win (the launchers apply them with setdefault)."""
    env = {"TORCH_NCCL_TRACE_BUFFER_SIZE": "2000", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1"}
    if run_folder:
        env["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"] = str(Path(run_folder) / "nccl" / "rank_")
    return env


def apply_flight_recorder_env(run_folder: str | None) -> None:
    """In this process, before the process group is created (torchrun, in-process)."""
    for key, value in flight_recorder_env(run_folder).items():
        os.environ.setdefault(key, value)
    if run_folder:
        Path(os.environ["TORCH_NCCL_DEBUG_INFO_TEMP_FILE"]).parent.mkdir(parents=True, exist_ok=True)
