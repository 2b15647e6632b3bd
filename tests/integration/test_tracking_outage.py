"""MLflow outages, run ownership and basic auth, against real `mlflow server` processes.

Each test that stops a server gets its own (the session's shared server stays up).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from temper.tracking import MlflowTracker
from tests.fixtures.cli import TEMPER, TINY_GPT, run_id_of, temper
from tests.fixtures.mlflow_server import MlflowServer
from tests.fixtures.recording_proxy import RecordingProxy

LONG = ["--set", "train.max_steps=100000", "--set", "train.log_every=5", "--set", "train.eval_every=0",
        "--set", "tracking.flush_every_s=0.5", "--set", "resources.workers=1"]


@pytest.fixture
def server(tmp_path):
    """A private server (these tests stop and restart it)."""
    s = MlflowServer(tmp_path / "mlflow-private")
    yield s
    s.stop()


def client_for(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


class Job:
    """`temper run` in the background; its stderr collected line by line."""

    def __init__(self, *args: str, cwd: Path, env: dict | None = None) -> None:
        full_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        full_env.update(env or {})
        self.proc = subprocess.Popen([TEMPER, "run", *args], cwd=cwd, env=full_env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self._reader.start()

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def last_step(self) -> int:
        steps = re.findall(r"step (\d+)/100000", self.text)
        return int(steps[-1]) if steps else 0

    def wait_for(self, what, *, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while not what():
            if self.proc.poll() is not None and not self._reader.is_alive():
                raise AssertionError(f"the job ended (exit {self.proc.returncode}):\n{self.text[-4000:]}")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"timed out waiting; output:\n{self.text[-4000:]}")
            time.sleep(0.2)

    def stop_after_recovery(self, *, back_marker: str) -> tuple[str, int]:
        """Wait for the line saying MLflow answers again, train 20 more steps, Ctrl-C; returns
        (output, the step at which the server was back)."""
        self.wait_for(lambda: back_marker in self.text)
        back_at = self.last_step()
        self.wait_for(lambda: self.last_step() >= back_at + 20)
        text = self.interrupt()
        assert self.proc.returncode == 130, text[-4000:]
        return text, back_at

    def interrupt(self) -> str:
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=120)
        self._reader.join(10)
        return self.text


def assert_every_step_in_order(client, run_id: str, *, every: int = 5) -> list[int]:
    """Every logged train/loss step is there once, and the server received them in order."""
    history = client.get_metric_history(run_id, "train/loss")
    steps = [m.step for m in history]
    assert sorted(steps) == list(range(every, max(steps) + 1, every)), steps
    by_step = sorted(history, key=lambda m: m.step)
    assert [m.timestamp for m in by_step] == sorted(m.timestamp for m in by_step)
    return sorted(steps)


def test_server_down_for_20s_mid_run_loses_nothing(tmp_path, server) -> None:
    server.start()
    job = Job(TINY_GPT, *LONG, "--set", f"tracking.uri={server.uri}", "--launcher", "torchrun",
              cwd=tmp_path, env={"TEMPER_SPOOL_DIR": str(tmp_path / "spool")})
    job.wait_for(lambda: job.last_step() >= 20)
    server.stop()
    down_at = job.last_step()
    time.sleep(20)
    assert job.last_step() > down_at  # training went on while the server was down
    server.start()
    text, back_at = job.stop_after_recovery(back_marker="reachable again after")
    client = client_for(server.uri)
    run = client.get_run(run_id_of(text))
    assert run.info.status == "KILLED"
    steps = assert_every_step_in_order(client, run.info.run_id)
    assert steps[-1] > back_at
    outage = float(re.search(r"reachable again after ([\d.]+) s unreachable", text).group(1))
    assert outage >= 15, text[-3000:]


def test_server_down_at_start_training_goes_on_and_the_run_appears(tmp_path, server) -> None:
    experiment = f"down-at-start-{tmp_path.name}"
    job = Job(TINY_GPT, *LONG, "--set", f"tracking.uri={server.uri}", "--set", f"tracking.experiment={experiment}",
              "--launcher", "torchrun", cwd=tmp_path, env={"TEMPER_SPOOL_DIR": str(tmp_path / "spool")})
    job.wait_for(lambda: job.last_step() >= 30)
    assert "is unreachable; training starts anyway" in job.text
    server.start()
    text, back_at = job.stop_after_recovery(back_marker="answers after")
    client = client_for(server.uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == run_id_of(text)
    run = runs[0]
    assert run.info.status == "KILLED"
    assert run.data.params["train.max_steps"] == "100000"
    steps = assert_every_step_in_order(client, run.info.run_id)
    assert steps[0] == 5 and steps[-1] > back_at  # the steps trained before the run existed too
    ckpt_dir = Path(run.data.tags["temper.checkpoint_dir"])
    assert ckpt_dir.name.startswith("pending-")
    assert (ckpt_dir / "mlflow-run-id").read_text() == run.info.run_id
    # Run again: it resumes that run (found through the pending folder's marker).
    again = temper("run", TINY_GPT, *LONG[:-2], "--set", "train.max_steps=" + str(steps[-1] + 10),
                   "--set", f"tracking.uri={server.uri}", "--set", f"tracking.experiment={experiment}",
                   "--launcher", "inprocess", "--set", "resources.workers=1", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert run_id_of(again.stderr) == run.info.run_id


def test_tracker_spills_to_disk_keeps_order_and_a_later_sync_delivers(tmp_path, server) -> None:
    server.start()
    client = client_for(server.uri)
    run_id = client.create_run(client.create_experiment("spill")).info.run_id
    server.stop()
    spool = tmp_path / "spool" / run_id
    tracker = MlflowTracker(run_id=run_id, tracking_uri=server.uri, flush_every_s=0.1, max_buffered=200,
                            backoff_initial_s=0.1, backoff_max_s=0.3, request_timeout_s=2, spool_dir=spool)
    for step in range(1, 601):
        tracker.log_metrics({"a": step, "b": -step}, step=step)
        time.sleep(0.001)
    deadline = time.monotonic() + 20
    while tracker.spilled == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert tracker.spilled > 0 and list(spool.glob("seg-*.jsonl"))  # the overflow went to disk
    assert tracker.sent == 0 and tracker.dropped == 0 and tracker.pending == 1200
    tracker.close(timeout_s=1)  # still down: everything stays on disk, in order
    assert tracker.pending == 1200 and tracker.dropped == 0 and not list(spool.glob("*.sending"))
    # The job ended while the server was down; it is back now: `temper runs sync`.
    server.start()
    synced = temper("runs", "sync", str(spool), cwd=tmp_path)
    assert synced.returncode == 0, synced.stderr[-3000:]
    assert f"sent 1200 metrics to run {run_id}" in synced.stdout + synced.stderr
    for key, sign in (("a", 1), ("b", -1)):
        history = client.get_metric_history(run_id, key)
        assert sorted((m.step, m.value) for m in history) == [(s, float(sign * s)) for s in range(1, 601)]
        by_step = sorted(history, key=lambda m: m.step)
        assert [m.timestamp for m in by_step] == sorted(m.timestamp for m in by_step)
    assert not spool.exists()


def test_four_ranks_only_rank0_talks_to_the_server(tmp_path, mlflow_server) -> None:
    """Checked at the server: a proxy in front of it records which process sent each request."""
    with RecordingProxy(mlflow_server.port) as proxy:
        proc = temper("run", TINY_GPT, "--launcher", "torchrun", "--set", "resources.workers=4",
                      "--set", "train.max_steps=10", "--set", "train.log_every=2",
                      "--set", "train.micro_batch_size=2", "--set", f"tracking.uri={proxy.uri}",
                      "--set", "tracking.flush_every_s=0.2", cwd=tmp_path, timeout=400)
        assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [r["rank"] for r in proxy.requests]
    assert ranks.count("0") > 0  # rank 0 sent the metrics
    assert None in ranks  # the driver created and ended the run
    assert not [r for r in proxy.requests if r["rank"] not in (None, "0")], proxy.requests
    assert all(r["pid"] is not None for r in proxy.requests)
    run = client_for(mlflow_server.uri).get_run(run_id_of(proc.stderr))
    assert run.data.tags["temper.world_size"] == "4"
    assert {f"perf/step_time_s/rank{r}" for r in range(4)} <= set(run.data.metrics)
    assert "perf/step_time_max_over_median" in run.data.metrics
    node = run.data.tags["temper.hosts"]
    assert f"system/{node}/cpu_percent" in run.data.metrics
    assert f"system/{node}/memory_used_gb" in run.data.metrics


def test_basic_auth_server(tmp_path) -> None:
    password = "temper-admin-pw-1234"
    with MlflowServer(tmp_path / "auth", admin_password=password) as server:
        sets = ["--launcher", "inprocess", "--set", "resources.workers=1", "--set", "train.max_steps=6",
                "--set", "train.log_every=2", "--set", f"tracking.uri={server.uri}"]
        good = temper("run", TINY_GPT, *sets, cwd=tmp_path,
                      env={"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": password})
        assert good.returncode == 0, good.stderr[-3000:]
        os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = "admin", password
        try:
            history = client_for(server.uri).get_metric_history(run_id_of(good.stderr), "train/loss")
        finally:
            del os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]
        assert sorted(m.step for m in history) == [2, 4, 6]
        (tmp_path / "bad").mkdir()
        bad = temper("run", TINY_GPT, *sets, cwd=tmp_path / "bad",
                     env={"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "wrong"})
        assert bad.returncode == 2
        lines = [line for line in bad.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "refused the credentials (HTTP 401)" in lines[0], bad.stderr
        assert "MLFLOW_TRACKING_PASSWORD" in lines[0]
