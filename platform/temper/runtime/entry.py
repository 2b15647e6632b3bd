"""Worker entry points: one per launcher, all ending in `run_worker`.

- `run_worker(spec_json, run_info)`: the common path. Reads torchrun's env vars into a
  DistContext, trains, returns rank 0's result.
- `ray_train_loop(config)`: Ray Train's `train_loop_per_worker` (Ray already set the env
  vars and the process group).
- `python -m temper.runtime.entry --job-file F`: what each torchrun process executes.

Only this module (and launch/) import Ray, and only inside `ray_train_loop` and its helpers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from temper.console import ProgressDisplay
from temper.dist import build_dist_context
from temper.errors import JobFailedError, WorkerFailedError
from temper.run_info import RunInfo
from temper.runtime.allocator import fix_mmap_threshold
from temper.runtime.failure import (
    apply_flight_recorder_env,
    close_rank_log,
    describe_timeout,
    failure_record,
    open_rank_log,
)
from temper.runtime.loop import TrainResult, train
from temper.runtime.profile import save_memory_snapshot_on_oom
from temper.runtime.report import Reporter
from temper.spec.loader import spec_from_json

log = logging.getLogger(__name__)


def setup_logging() -> None:
    """Rank-prefixed log lines on stderr, once per process."""
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=os.environ.get("TEMPER_LOG_LEVEL", "WARNING").upper(),
        format=f"[rank{rank}] %(levelname)s %(name)s: %(message)s",
    )


def run_worker(spec_json: str, run_info: RunInfo | dict | None, *, reporter: Reporter | None = None,
               dump_on_sigterm: bool = False, ship_log: Callable[[Path, int], None] | None = None) -> TrainResult:
    """Rebuild the spec and the RunInfo, join the process group, and train. Every rank calls this.
    A failure is raised as JobFailedError("rank R: <root cause>"), the full traceback kept in
    the rank's log (runtime/failure.py); `ship_log(path, start)` then sends the log from byte
    `start` (this attempt's lines) where the driver can upload it (a rank on another node)."""
    spec = spec_from_json(spec_json)
    fix_mmap_threshold(spec.resources.malloc_mmap_threshold_kib)  # before any model tensor
    run_info = RunInfo.from_dict(run_info)
    rank = int(os.environ.get("RANK", "0"))
    rank_log = open_rank_log(run_info.run_folder, rank=rank, dump_on_sigterm=dump_on_sigterm)
    try:
        return _train_worker(spec, run_info, reporter=reporter, rank_log=rank_log)
    finally:
        close_rank_log(rank_log)
        if ship_log is not None and rank_log is not None:
            ship_log(rank_log.path, rank_log.start)


def _train_worker(spec, run_info: RunInfo, *, reporter: Reporter | None, rank_log) -> TrainResult:
    if spec.train.device != "cpu" and torch.cuda.is_available():
        apply_flight_recorder_env(run_info.run_folder)  # Ray set its own before creating the group
    ctx = build_dist_context(device=spec.train.device, timeout_s=spec.fault.collective_timeout_s)
    if ctx.device.type == "cpu":
        # As many intra-op threads as CPUs reserved: every launcher computes identically.
        torch.set_num_threads(max(1, int(spec.resources.cpus_per_worker)))
    if reporter is None:
        display = ProgressDisplay(title=spec.name) if ctx.is_main else None
        reporter = Reporter(display)
    ok = False
    try:
        result = train(spec, ctx, run_info=run_info, reporter=reporter)
        ok = True
        return result
    except Exception as e:
        if rank_log is not None:
            rank_log.record_failure(e)
        save_memory_snapshot_on_oom(e, run_folder=run_info.run_folder, rank=ctx.rank)
        if _is_timeout(e):
            message = describe_timeout(rank=ctx.rank, world_size=ctx.world_size,
                                       timeout_s=spec.fault.collective_timeout_s,
                                       detail=str(e).splitlines()[0][:200])
            failure = WorkerFailedError(f"rank {ctx.rank}: {message}")
        else:
            record = failure_record(e, rank=ctx.rank)
            failure = WorkerFailedError(f"rank {ctx.rank}: {record['error']}", traceback=record["traceback"])
        _write_error(failure)  # before the process group closes: peers then fail on this rank's absence
        raise failure from e
    finally:
        reporter.close()
        ctx.close(wait_for_peers=ok)


def _is_timeout(error: Exception) -> bool:
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("timed out" in text or "timeout" in text)


class _RayReporter(Reporter):
    """Sends rank 0's progress events to the driver's ProgressSink actor, and asks it
    whether the user pressed Ctrl-C."""

    def __init__(self, sink: Any, *, is_main: bool, tune_metric: str | None = None) -> None:
        super().__init__(None)
        self.sink = sink if is_main else None
        self.tune_metric = tune_metric

    def progress(self, event: dict[str, Any]) -> None:
        if self.sink is not None:
            self.sink.push.remote(event)  # fire and forget: never waits on the driver
        if self.tune_metric is not None and self.tune_metric in event:
            # Under `temper tune`: every rank reports (Ray Train counts reports per rank);
            # rank 0's metrics reach the search through Tune's TuneReportCallback.
            import ray.train

            ray.train.report({k: float(v) for k, v in event.items() if isinstance(v, (int, float))})

    def run_id(self, run_info: RunInfo) -> str | None:
        if self.sink is None:
            return None
        import ray

        return ray.get(self.sink.run_id.remote(), timeout=10) or super().run_id(run_info)

    def should_stop(self) -> bool:
        return self._ask("stop_requested")

    def preempt_requested(self) -> bool:
        return self._ask("preempt_requested")

    def _ask(self, method: str) -> bool:
        if self.sink is None:
            return False
        import ray

        try:
            return bool(ray.get(getattr(self.sink, method).remote(), timeout=10))
        except Exception:  # the driver is gone or slow: keep training, Ray ends us if needed
            return False

    def on_sigterm(self, callback):
        """The train function runs in a thread of Ray's worker process, whose main thread owns
        SIGTERM: its handler (ray._private.worker) raises SystemExit through
        raise_sys_exit_with_custom_error_message. That name is swapped, while training, for
        one that calls `callback` for SIGTERM instead, so the rank saves before it exits.
        A private API: when it is not there, a SIGTERM kills the worker as before (the
        group restarts from the previous checkpoint)."""
        if threading.current_thread() is threading.main_thread():
            return super().on_sigterm(callback)
        try:
            import ray._private.worker as ray_worker

            original = ray_worker.raise_sys_exit_with_custom_error_message
        except (ImportError, AttributeError):
            log.warning("preemption: cannot hook Ray's SIGTERM handler; a SIGTERM kills this worker")
            return lambda: None

        def hooked(message, *args, **kwargs):
            if "SIGTERM" in str(message):
                callback()
                return None
            return original(message, *args, **kwargs)

        ray_worker.raise_sys_exit_with_custom_error_message = hooked
        return lambda: setattr(ray_worker, "raise_sys_exit_with_custom_error_message", original)


def ray_train_loop(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function: Ray exported RANK etc. and created the process group."""
    setup_logging()
    if not os.environ.get("TEMPER_VERBOSE"):  # Ray Train re-logs our failure with its traceback
        logging.getLogger("ray.train.v2._internal.util").setLevel(logging.CRITICAL)
    sink = config.get("progress_sink")
    if sink is not None:  # where this rank runs, for the driver's `temper.nodes` run tag
        import ray

        node = ray.get_runtime_context().get_node_id()
        sink.register.remote(int(os.environ.get("RANK", "0")), f"{ray.util.get_node_ip_address()}/{node[:12]}")
    reporter = _RayReporter(sink, is_main=os.environ.get("RANK") == "0", tune_metric=config.get("tune_metric"))
    run_worker(config["spec_json"], config.get("run_info"), reporter=reporter, dump_on_sigterm=True,
               ship_log=_log_shipper(sink))


def _log_shipper(sink: Any) -> Callable[[Path, int], None] | None:
    """On a node other than the driver's, send this attempt's rank log to the driver's run
    folder through the ProgressSink actor (it runs on the driver's node); else nothing to do."""
    if sink is None:
        return None
    import ray

    try:
        if ray.get(sink.node.remote(), timeout=30) == ray.get_runtime_context().get_node_id():
            return None
    except Exception as e:  # noqa: BLE001 - the driver is gone: nobody to upload the log
        log.warning("rank log stays on this node (%s)", e)
        return None

    def ship(path: Path, start: int) -> None:
        try:
            with open(path, "rb") as f:
                f.seek(start)
                ray.get(sink.append_log.remote(str(path), start, f.read()), timeout=60)
        except Exception as e:  # noqa: BLE001 - never hide the worker's own outcome
            log.warning("could not send %s to the driver's node: %s", path, e)

    return ship


def main(argv: list[str] | None = None) -> int:
    """torchrun's per-process command: read the job file the driver wrote, train."""
    parser = argparse.ArgumentParser(prog="python -m temper.runtime.entry")
    parser.add_argument("--job-file", required=True, type=Path)
    parser.add_argument("--result-file", type=Path, default=None)
    args = parser.parse_args(argv)
    setup_logging()
    job = json.loads(args.job_file.read_text())
    try:
        result = run_worker(job["spec_json"], job.get("run_info"), dump_on_sigterm=True)
    except KeyboardInterrupt:
        raise
    except BaseException as e:
        if not isinstance(e, JobFailedError):  # run_worker wrote its own already
            _write_error(e)
        if os.environ.get("TEMPER_VERBOSE"):
            raise
        return 1  # the driver prints the root cause once; the traceback is in the rank's log
    if args.result_file is not None and os.environ.get("RANK", "0") == "0":
        args.result_file.write_text(json.dumps(result.__dict__))
    return 0


def _write_error(error: BaseException) -> None:
    """Leave this rank's error where the torchrun driver looks for the root cause."""
    folder = os.environ.get("TEMPER_ERROR_DIR")
    if not folder:
        return
    rank = os.environ.get("RANK", "0")
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))  # torchrun's restarts
    if isinstance(error, WorkerFailedError):  # run_worker's "rank R: cause"
        message, tb = str(error).split(": ", 1)[1], getattr(error, "traceback", None)
    else:
        record = failure_record(error, rank=int(rank))
        message, tb = record["error"], record["traceback"]
    Path(folder, f"error-attempt{attempt}-rank{rank}.json").write_text(
        json.dumps({"rank": rank, "attempt": attempt, "error": message, "traceback": tb}))


if __name__ == "__main__":
    sys.exit(main())
