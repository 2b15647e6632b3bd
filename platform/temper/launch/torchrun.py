"""torchrun launcher: N local worker processes under torch.distributed.run, no Ray.

The driver writes the job to a file, runs `torchrun --standalone --nproc-per-node N -m
temper.runtime.entry --job-file F`, and reads rank 0's result (or the failing rank's
error) from files next to it. This is the launcher for machines without Ray.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from temper.console import console
from temper.errors import JobFailedError, WorkerFailedError
from temper.launch.base import STOP_GRACE_S, Job, Launcher, LaunchResult
from temper.runtime.report import PREEMPT_FILE_ENV, STOP_FILE_ENV

#: Seconds past fault.preemption_grace_s before the driver kills workers still saving.
PREEMPT_MARGIN_S = 10.0


class TorchrunLauncher(Launcher):
    name = "torchrun"

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._preempt_file: Path | None = None
        self._kill_timer: threading.Timer | None = None

    def command(self, job: Job, *, job_file: Path, result_file: Path) -> list[str]:
        return [
            sys.executable, "-m", "temper.launch.torchrun_agent",  # torchrun, quiet on failure
            "--standalone", "--nnodes=1", f"--nproc-per-node={job.spec.resources.workers}",
            # fault.max_failures: torchrun restarts the workers, which resume from the last checkpoint
            f"--max-restarts={job.spec.fault.max_failures}",
            "-m", "temper.runtime.entry",
            "--job-file", str(job_file), "--result-file", str(result_file),
        ]

    def launch(self, job: Job) -> LaunchResult:
        with tempfile.TemporaryDirectory(prefix="temper-torchrun-") as tmp:
            tmpdir = Path(tmp)
            job_file, result_file = tmpdir / "job.json", tmpdir / "result.json"
            job_file.write_text(json.dumps(job.payload()))
            env = {**os.environ, "TEMPER_ERROR_DIR": str(tmpdir), "OMP_NUM_THREADS": "1",
                   STOP_FILE_ENV: str(tmpdir / "stop"), PREEMPT_FILE_ENV: str(tmpdir / "preempt"),
                   # A fresh rendezvous store per restart: with torchrun's shared store, a
                   # restarted group read the previous attempt's gloo addresses and could not
                   # connect (fault.max_failures; seen with torch 2.13).
                   "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
            # A session of its own: the terminal's Ctrl-C reaches the driver only, which
            # then stops the workers gracefully (they flush their metrics) via the stop file.
            self._proc = subprocess.Popen(
                self.command(job, job_file=job_file, result_file=result_file),
                env=env, cwd=job.workdir, start_new_session=True,
            )
            self._preempt_file, grace = tmpdir / "preempt", job.spec.fault.preemption_grace_s
            self._grace_s = grace
            try:
                code = self._proc.wait()
            except KeyboardInterrupt:
                self._graceful_stop(tmpdir / "stop")
                raise
            finally:
                if self._kill_timer is not None:
                    self._kill_timer.cancel()
            if code != 0:
                raise _root_cause(tmpdir, code)
            data = json.loads(result_file.read_text())
        return LaunchResult(
            steps=data["steps"], metrics=data["metrics"],
            loss_history=[tuple(x) for x in data["loss_history"]],
            preempted=bool(data.get("preempted")), checkpoint_step=data.get("checkpoint_step"),
        )

    def preempt(self) -> None:
        """SIGTERM: the workers save at their next step (rank 0 polls the file) and exit; past
        the grace time (and a margin) they are killed."""
        if self._preempt_file is None:
            raise KeyboardInterrupt("stopped by SIGTERM before the workers started")
        self._preempt_file.touch()
        console.print(f"SIGTERM: the workers save at their next step and exit (fault.preemption_grace_s="
                      f"{self._grace_s:g})...")
        self._kill_timer = threading.Timer(self._grace_s + PREEMPT_MARGIN_S, self.stop)
        self._kill_timer.daemon = True
        self._kill_timer.start()

    def _graceful_stop(self, stop_file: Path) -> None:
        stop_file.touch()
        console.print(f"stopping the workers at their next logging step (up to {STOP_GRACE_S:.0f} s)...")
        try:
            self._proc.wait(timeout=STOP_GRACE_S)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            self.stop()  # a second Ctrl-C, or too slow: kill them now

    def stop(self) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)  # torchrun and its workers share the group
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _root_cause(tmpdir: Path, code: int) -> JobFailedError:
    """The original cause: the first failing rank's error in the first failed attempt (with
    restarts, later attempts may fail differently, e.g. on a peer that is already gone)."""
    errors = [json.loads(p.read_text()) | {"mtime": p.stat().st_mtime} for p in tmpdir.glob("error-*.json")]
    if not errors:
        return JobFailedError(f"torchrun exited with code {code} and no worker left an error (killed? out of "
                              "memory?); see the rank logs in the run folder")
    errors.sort(key=lambda e: (e.get("attempt", 0), _secondary(e["error"]), e["mtime"]))
    first, last = errors[0], errors[-1]
    text = f"rank {first['rank']}: {first['error']}"
    if last.get("attempt", 0) > first.get("attempt", 0):
        text += (f" (the workers were restarted {last['attempt']} time(s), fault.max_failures; "
                 f"the last attempt failed with rank {last['rank']}: {last['error'][:300]})")
    return WorkerFailedError(text, traceback=first.get("traceback"))


#: what a rank reports when a peer died first: never the root cause while a peer has its own
SECONDARY = ("connection closed by peer", "connection reset by peer", "remote worker crashing", "broken pipe")


def _secondary(message: str) -> bool:
    return any(s in message.lower() for s in SECONDARY)
