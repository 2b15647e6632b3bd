"""Worker entry points: one per launcher, all ending in `run_worker`.

- `run_worker(spec_json, run_info)`: the common path. Reads torchrun's env vars into a
  DistContext, trains, returns rank 0's result.
- `ray_train_loop(config)`: Ray Train's `train_loop_per_worker` (Ray already set the env
  vars and the process group).
- `python -m temper.runtime.entry --job-file F`: what each torchrun process executes.

Only this module (and launch/) import Ray, and only inside `ray_train_loop`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch

from temper.console import ProgressDisplay
from temper.dist import build_dist_context
from temper.errors import TemperError
from temper.run_info import RunInfo
from temper.runtime.loop import TrainResult, train
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


def run_worker(spec_json: str, run_info: RunInfo | dict | None, *,
               reporter: Reporter | None = None) -> TrainResult:
    """Rebuild the spec and the RunInfo, join the process group, and train. Every rank calls this."""
    spec = spec_from_json(spec_json)
    run_info = RunInfo.from_dict(run_info)
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
    except RuntimeError as e:
        if "timed out" in str(e).lower() or "timeout" in str(e).lower():
            raise TemperError(
                f"rank {ctx.rank}: a collective waited longer than fault.collective_timeout_s="
                f"{spec.fault.collective_timeout_s:g}s (a peer stalled or died: {str(e).splitlines()[0][:200]}); "
                "check the other ranks' logs, or raise fault.collective_timeout_s"
            ) from e
        raise
    finally:
        reporter.close()
        ctx.close(wait_for_peers=ok)


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
        if self.sink is None:
            return False
        import ray

        try:
            return bool(ray.get(self.sink.stop_requested.remote(), timeout=10))
        except Exception:  # the driver is gone or slow: keep training, Ray ends us if needed
            return False


def ray_train_loop(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function: Ray exported RANK etc. and created the process group."""
    setup_logging()
    sink = config.get("progress_sink")
    if sink is not None:  # where this rank runs, for the driver's `temper.nodes` run tag
        import ray

        node = ray.get_runtime_context().get_node_id()
        sink.register.remote(int(os.environ.get("RANK", "0")), f"{ray.util.get_node_ip_address()}/{node[:12]}")
    reporter = _RayReporter(sink, is_main=os.environ.get("RANK") == "0", tune_metric=config.get("tune_metric"))
    run_worker(config["spec_json"], config.get("run_info"), reporter=reporter)


def main(argv: list[str] | None = None) -> int:
    """torchrun's per-process command: read the job file the driver wrote, train."""
    parser = argparse.ArgumentParser(prog="python -m temper.runtime.entry")
    parser.add_argument("--job-file", required=True, type=Path)
    parser.add_argument("--result-file", type=Path, default=None)
    args = parser.parse_args(argv)
    setup_logging()
    job = json.loads(args.job_file.read_text())
    try:
        result = run_worker(job["spec_json"], job.get("run_info"))
    except BaseException as e:
        _write_error(e)
        raise
    if args.result_file is not None and os.environ.get("RANK", "0") == "0":
        args.result_file.write_text(json.dumps(result.__dict__))
    return 0


def _write_error(error: BaseException) -> None:
    """Leave this rank's error where the torchrun driver looks for the root cause."""
    folder = os.environ.get("TEMPER_ERROR_DIR")
    if not folder or isinstance(error, KeyboardInterrupt):
        return
    rank = os.environ.get("RANK", "0")
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))  # torchrun's restarts
    message = f"{type(error).__name__}: {error}".splitlines()[0]
    Path(folder, f"error-attempt{attempt}-rank{rank}.json").write_text(
        json.dumps({"rank": rank, "attempt": attempt, "error": message}))


if __name__ == "__main__":
    sys.exit(main())
