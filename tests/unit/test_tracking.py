"""Tracking against a real `mlflow server`: the non-blocking tracker, outages, the driver's run."""

from __future__ import annotations

import logging
import math
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import temper.tracking.mlflow_tracker as mlflow_tracker
from temper.errors import TemperError
from temper.run_info import RunInfo
from temper.spec import flatten, load_spec, spec_hash, spec_to_dict, spec_to_yaml
from temper.tracking import (
    MlflowTracker,
    NoopTracker,
    build_tracker,
    end_run,
    resolve_tracking_uri,
    start_run,
)
from temper.tracking.backend import MlflowBackend
from tests.fixtures.mlflow_server import free_port

ROOT = Path(__file__).resolve().parents[2]
TINY_GPT = ROOT / "jobs" / "ci" / "tiny-gpt.yaml"


@pytest.fixture
def run_id(client) -> str:
    experiment = client.get_experiment_by_name("unit-tracker")
    exp_id = experiment.experiment_id if experiment else client.create_experiment("unit-tracker")
    return client.create_run(exp_id).info.run_id


def wait_until(condition, *, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


class HeldSends:
    """The tracker's sends held at a gate: its MlflowBackend is the real one, except that
    log_batch first says a send has begun (`reached`), then waits until the test opens `gate`.
    While the gate is shut, the sender thread is provably stuck inside a send."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self.gate = threading.Event()

    def backend_class(self) -> type[MlflowBackend]:
        held = self

        class HeldBackend(MlflowBackend):
            def log_batch(self, run_id: str, **batch) -> None:
                held.reached.set()
                held.gate.wait()
                super().log_batch(run_id, **batch)

        return HeldBackend


@pytest.fixture
def held(monkeypatch) -> Iterator[HeldSends]:
    sends = HeldSends()
    monkeypatch.setattr(mlflow_tracker, "MlflowBackend", sends.backend_class())
    yield sends
    sends.gate.set()  # never leave a sender thread waiting after its test


class ResettingPort:
    """A TCP port that accepts every connection and resets it at once, counting them: an
    MLflow server that cannot be reached, whose connection attempts can be counted."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.uri = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            self.connections += 1  # before the reset: the client fails only after this
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() above
        self.sock.close()
        self._thread.join(10)


# ------------------------------------------------------------------------- tracker


def test_tracker_delivers_3000_metrics_in_order(mlflow_server, client, run_id, held) -> None:
    tracker = MlflowTracker(run_id=run_id, tracking_uri=mlflow_server.uri, flush_every_s=0.5)
    for step in range(1, 1001):
        tracker.log_metrics({"a": step, "b": 0.5 * step, "c": -step}, step=step)
        if step == 334:  # 1,002 waiting: a full batch is due, and its send is held at the gate
            assert held.reached.wait(timeout=30), "the sender never began a send"
    # The other 1,998 calls returned while that send was stuck: logging only appends to memory.
    assert tracker.pending == 3000
    assert tracker.sent == 0
    held.gate.set()  # the server gets them now, in order
    tracker.close(timeout_s=30)
    assert (tracker.sent, tracker.pending, tracker.dropped, tracker.rejected) == (3000, 0, 0, 0)
    steps = list(range(1, 1001))
    assert history(client, run_id, "a") == [(s, float(s)) for s in steps]
    assert history(client, run_id, "b") == [(s, 0.5 * s) for s in steps]
    assert history(client, run_id, "c") == [(s, float(-s)) for s in steps]


def test_tracker_logs_nan_inf_and_tags(mlflow_server, client, run_id) -> None:
    tracker = MlflowTracker(run_id=run_id, tracking_uri=mlflow_server.uri, flush_every_s=0.1)
    tracker.set_tags({"phase": "warmup"})
    tracker.log_metrics({"loss": float("nan"), "grad": float("inf")}, step=3)
    tracker.log_metrics({"bad": "not-a-number", "ok": 1.0}, step=4)  # skipped with a warning
    tracker.close(timeout_s=10)
    assert tracker.sent == 3
    assert math.isnan(client.get_metric_history(run_id, "loss")[0].value)
    # MLflow stores +inf as the largest float (its sqlalchemy store clamps infinities).
    assert client.get_metric_history(run_id, "grad")[0].value >= sys.float_info.max
    assert client.get_run(run_id).data.tags["phase"] == "warmup"


def test_dead_server_never_blocks_drops_oldest_and_closes_in_time(caplog) -> None:
    tracker = MlflowTracker(run_id="0" * 32, tracking_uri=f"http://127.0.0.1:{free_port()}",
                            flush_every_s=0.05, max_buffered=500, backoff_initial_s=0.05,
                            backoff_max_s=0.2)
    for step in range(400):
        tracker.log_metrics({f"m{i}": float(step) for i in range(5)}, step=step)
        if step % 50 == 0:
            time.sleep(0.05)  # let the sender fail a few times meanwhile
    wait_until(lambda: tracker.unreachable_s > 0, timeout_s=10, what="a failed send")
    assert tracker.sent == 0
    assert tracker.dropped + tracker.pending == 2000
    # At most max_buffered waiting, plus one batch (<= 1000) taken out to be sent.
    assert tracker.pending <= 500 + 1000 and tracker.dropped >= 500
    caplog.set_level(logging.WARNING, logger="temper.tracking.mlflow_tracker")
    # The port refuses every send, so only close's own deadline can end the retries: close
    # returning at all is the behaviour (a close that waited for delivery would hang, and the
    # suite's timeout would fail it). What was not delivered stays counted.
    tracker.close(timeout_s=1.0)
    assert tracker.pending > 0
    assert "not delivered" in caplog.text and "unreachable for" in caplog.text
    tracker.log_metrics({"after": 1.0}, step=1)  # closed: ignored, no error


def test_close_gives_up_on_a_send_that_never_returns(held, caplog) -> None:
    """A server that takes a request and does not answer: close(timeout_s) returns while the
    send is still stuck (its deadline, not the server, ends it) and reports the loss."""
    tracker = MlflowTracker(run_id="0" * 32, tracking_uri=f"http://127.0.0.1:{free_port()}",
                            flush_every_s=0.05, request_timeout_s=0.1)
    tracker.log_metrics({"loss": 1.0}, step=1)
    assert held.reached.wait(timeout=30), "the sender never began a send"
    caplog.set_level(logging.WARNING, logger="temper.tracking.mlflow_tracker")
    tracker.close(timeout_s=0.1)
    # Returned although the send it waited for is still held: the gate opens only below.
    assert (tracker.sent, tracker.pending) == (0, 1)
    assert "not delivered" in caplog.text
    held.gate.set()


def test_outage_then_recovery_delivers_everything(mlflow_server, client, run_id) -> None:
    tracker = MlflowTracker(run_id=run_id, tracking_uri=mlflow_server.uri, flush_every_s=0.2,
                            backoff_initial_s=0.1, backoff_max_s=0.5, request_timeout_s=5)
    try:
        for step in range(0, 200):
            tracker.log_metrics({"x": step, "y": 2 * step}, step=step)
        wait_until(lambda: tracker.sent == 400, timeout_s=15, what="the first 400 metrics")
        mlflow_server.stop()
        for step in range(200, 400):
            tracker.log_metrics({"x": step, "y": 2 * step}, step=step)
        wait_until(lambda: tracker.unreachable_s > 0, timeout_s=10, what="a failed send")
        assert tracker.pending == 400
        mlflow_server.start()
        for step in range(400, 500):
            tracker.log_metrics({"x": step, "y": 2 * step}, step=step)
        tracker.close(timeout_s=30)
    finally:
        mlflow_server.start()  # no-op when running; keeps the session server for other tests
    assert (tracker.sent, tracker.pending, tracker.dropped) == (1000, 0, 0)
    assert history(client, run_id, "x") == [(s, float(s)) for s in range(500)]
    assert history(client, run_id, "y") == [(s, float(2 * s)) for s in range(500)]


def test_build_tracker_only_rank0_of_a_tracked_job(mlflow_server) -> None:
    spec = load_spec(TINY_GPT)
    info = RunInfo(run_id="0" * 32, tracking_uri=mlflow_server.uri)
    assert isinstance(build_tracker(info, rank=1, spec=spec), NoopTracker)
    assert isinstance(build_tracker(RunInfo(), rank=0, spec=spec), NoopTracker)
    assert isinstance(build_tracker(RunInfo(run_id="x"), rank=0, spec=spec), NoopTracker)
    disabled = load_spec(TINY_GPT, ["tracking.enabled=false"])
    assert isinstance(build_tracker(info, rank=0, spec=disabled), NoopTracker)
    tracker = build_tracker(info, rank=0, spec=spec)
    assert isinstance(tracker, MlflowTracker)
    tracker.close(timeout_s=1)


# ---------------------------------------------------------------------- driver side


def git_repo(path: Path) -> None:
    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=path,
                       check=True, capture_output=True)

    git("init", "-q")
    (path / "README").write_text("x\n")
    git("add", "README")
    git("commit", "-q", "-m", "init")


def test_start_run_records_params_spec_and_tags(mlflow_server, client, tmp_path) -> None:
    git_repo(tmp_path)
    spec = load_spec(TINY_GPT, [f"tracking.uri={mlflow_server.uri}", "tracking.experiment=unit-runs"])
    user_tags = {"team": "ml", "temper.launcher": "spoofed"}  # temper.* provenance is not overridable
    spec = spec.model_copy(update={"tracking": spec.tracking.model_copy(update={"tags": user_tags})})
    handle = start_run(spec, launcher="torchrun", workdir=tmp_path)
    assert handle.tracking_uri == mlflow_server.uri
    assert handle.ui_url == (f"{mlflow_server.uri}/#/experiments/{handle.experiment_id}"
                             f"/runs/{handle.run_id}")
    assert handle.run_info() == RunInfo(run_id=handle.run_id, tracking_uri=mlflow_server.uri)
    run = client.get_run(handle.run_id)
    assert run.info.run_name == spec.name and run.info.status == "RUNNING"
    assert run.data.params == flatten(spec_to_dict(spec))
    assert run.data.params["resources.workers"] == "2" and run.data.params["optim.lr"] == "0.01"
    tags = run.data.tags
    assert tags["temper.launcher"] == "torchrun"
    assert tags["temper.spec_hash"] == spec_hash(spec)
    assert tags["temper.version"] and tags["mlflow.user"]
    assert tags["team"] == "ml"
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True,
                            text=True, check=True).stdout.strip()
    assert tags["mlflow.source.git.commit"] == commit and tags["temper.git_dirty"] == "false"
    assert [a.path for a in client.list_artifacts(handle.run_id)] == ["spec.yaml"]
    from mlflow.artifacts import load_text

    assert load_text(f"{run.info.artifact_uri}/spec.yaml") == spec_to_yaml(spec)
    end_run(handle, status="FINISHED")
    finished = client.get_run(handle.run_id)
    assert finished.info.status == "FINISHED" and finished.info.end_time
    assert "temper.error" not in finished.data.tags


def test_end_run_failed_records_the_error(mlflow_server, client, tmp_path) -> None:
    spec = load_spec(TINY_GPT, [f"tracking.uri={mlflow_server.uri}"])
    handle = start_run(spec, launcher="ray", workdir=tmp_path)
    error = "FloatingPointError: train/loss is nan at step 7\n" + "x" * 6000
    assert end_run(handle, status="FAILED", error=error) is True
    run = client.get_run(handle.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["temper.error"].startswith("FloatingPointError: train/loss is nan")
    assert len(run.data.tags["temper.error"]) == 5000
    assert run.data.tags["mlflow.note.content"] == run.data.tags["temper.error"]
    assert "mlflow.source.git.commit" not in run.data.tags  # tmp_path is no git repository
    with pytest.raises(ValueError, match="FINISHED, FAILED, KILLED"):
        end_run(handle, status="DONE")


def test_resolve_tracking_uri_precedence(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking_uri("http://spec:5000", workdir=tmp_path) == "http://spec:5000"
    assert resolve_tracking_uri(None, workdir=tmp_path) == "http://env:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    default = resolve_tracking_uri(None, workdir=tmp_path)
    assert default == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert default.startswith("sqlite:////")  # absolute: Ray workers have another cwd
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert resolve_tracking_uri(None, workdir=tmp_path) == default
    assert resolve_tracking_uri("sqlite:///runs/m.db", workdir=tmp_path) == (
        f"sqlite:///{tmp_path.resolve()}/runs/m.db")


def test_local_sqlite_store_keeps_artifacts_under_workdir(tmp_path, monkeypatch) -> None:
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    workdir = tmp_path / "work"
    workdir.mkdir()
    handle = start_run(load_spec(TINY_GPT), launcher="inprocess", workdir=workdir)
    assert handle.tracking_uri == f"sqlite:///{workdir.resolve()}/mlflow.db"
    assert handle.ui_url is None
    local = MlflowClient(tracking_uri=handle.tracking_uri)
    experiment = local.get_experiment(handle.experiment_id)
    assert experiment.name == "ci"
    assert experiment.artifact_location == (workdir / "mlartifacts").resolve().as_uri()
    assert list((workdir / "mlartifacts").rglob("spec.yaml"))
    assert not list(elsewhere.iterdir())
    end_run(handle, status="KILLED", error="interrupted by the user (Ctrl-C)")
    assert local.get_run(handle.run_id).info.status == "KILLED"


def test_start_run_unreachable_server_fails_fast(tmp_path) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    spec = load_spec(TINY_GPT, [f"tracking.uri={uri}"])
    with pytest.raises(TemperError) as info:
        start_run(spec, launcher="ray", workdir=tmp_path)
    message = str(info.value)
    assert message.startswith(f"tracking.uri {uri}: cannot reach the MLflow server (")
    assert message.endswith("start it or set tracking.enabled=false")
    assert "\n" not in message
    # Fast: one attempt, then the error; never MLflow's retry loop (7 retries with backoff,
    # minutes). Counted at a port that resets every connection.
    port = ResettingPort()
    try:
        with pytest.raises(TemperError, match="cannot reach the MLflow server"):
            start_run(load_spec(TINY_GPT, [f"tracking.uri={port.uri}"]), launcher="ray", workdir=tmp_path)
    finally:
        port.close()
    assert port.connections == 1


def test_start_run_sqlite_in_missing_folder_is_a_user_error(tmp_path) -> None:
    uri = f"sqlite:///{tmp_path}/missing/mlflow.db"
    with pytest.raises(TemperError, match="missing does not exist"):
        start_run(load_spec(TINY_GPT, [f"tracking.uri={uri}"]), launcher="ray", workdir=tmp_path)
