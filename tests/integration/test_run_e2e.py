"""`temper run` end to end through the real CLI: Ray (shared head), torchrun, in-process.

Each run logs into the session's real MLflow server; the tests read the run back from it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.fixtures.cli import ROOT, TEMPER, TINY_GPT, TINY_RESNET, run_id_of, temper
from tests.fixtures.mlflow_server import loss_curve


@pytest.mark.ray
def test_launchers_give_the_same_loss_trajectory(tmp_path, mlflow_server, ray_address, client) -> None:
    """Same seed: Ray and torchrun with 2 FSDP2 workers train identically (the sharded
    strategy under both launchers), and one in-process worker with twice the micro-batch (the
    same global batches) trains the same curve up to float32 reduction order. The Ray run is
    also the end-to-end check of what a run records in MLflow."""
    common = ["--set", f"tracking.uri={mlflow_server.uri}", "--set", "tracking.experiment=e2e-same",
              "--set", "train.max_steps=8", "--set", "train.eval_every=0"]
    one_worker = ["--set", "resources.workers=1", "--set", "train.micro_batch_size=16"]
    curves, runs = {}, {}
    for name, extra in {
        "ray-2": ["--address", ray_address, "--set", "strategy=fsdp"],
        "torchrun-2": ["--launcher", "torchrun", "--set", "strategy=fsdp"],
        "inprocess-1": ["--launcher", "inprocess", *one_worker],
    }.items():
        proc = temper("run", TINY_GPT, *common, *extra, cwd=tmp_path)
        assert proc.returncode == 0, f"{name}: {proc.stderr[-4000:]}"
        runs[name] = client.get_run(run_id_of(proc.stderr))
        curves[name] = loss_curve(client, runs[name].info.run_id)
    assert [s for s, _ in curves["ray-2"]] == [s for s, _ in curves["torchrun-2"]] == list(range(1, 9))
    # Same arithmetic in the same order on both launchers: equal to float32 rounding.
    for (_, x), (_, y) in zip(curves["ray-2"], curves["torchrun-2"], strict=True):
        assert y == pytest.approx(x, rel=1e-5), curves
    for (_, x), (_, y) in zip(curves["ray-2"], curves["inprocess-1"], strict=True):
        assert y == pytest.approx(x, rel=1e-5), curves

    run = runs["ray-2"]
    assert run.info.status == "FINISHED"
    assert run.data.params["resources.workers"] == "2" and run.data.params["optim.lr"] == "0.01"
    assert run.data.tags["temper.launcher"] == "ray"
    assert "spec.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert curves["ray-2"][-1][1] < curves["ray-2"][0][1], curves["ray-2"]
    for key in ("perf/samples_per_s", "perf/tokens_per_s", "perf/step_time_s", "train/lr",
                "train/grad_norm", "val/loss"):
        assert key in run.data.metrics, key


def test_torchrun_resnet_classification(tmp_path, mlflow_server, client) -> None:
    proc = temper("run", TINY_RESNET, "--launcher", "torchrun", "--set", f"tracking.uri={mlflow_server.uri}",
                  cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = client.get_run(run_id_of(proc.stderr))
    assert run.info.status == "FINISHED"
    assert "val/acc" in run.data.metrics and "train/acc" in run.data.metrics


def test_default_local_store_in_working_directory(tmp_path) -> None:
    env = {"MLFLOW_TRACKING_URI": ""}
    proc = temper("run", TINY_GPT, "--launcher", "inprocess", "--set", "resources.workers=1",
                  "--set", "train.max_steps=3", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / "mlflow.db").exists()
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path}/mlflow.db" in proc.stderr
    from mlflow import MlflowClient

    store = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    run = store.get_run(run_id_of(proc.stderr))
    assert run.info.status == "FINISHED"
    assert len(loss_curve(store, run.info.run_id)) == 3


def test_worker_failure_marks_run_failed(tmp_path, mlflow_server, client) -> None:
    """A diverging run stops with the cause; the MLflow run is FAILED with that message."""
    proc = temper("run", TINY_GPT, "--launcher", "torchrun", "--set", f"tracking.uri={mlflow_server.uri}",
                  "--set", "optim.lr=1e12", "--set", "optim.grad_clip=null", "--set", "train.max_steps=40",
                  cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-4000:]
    assert "FloatingPointError: train/loss is" in proc.stderr
    run = client.get_run(run_id_of(proc.stderr))
    assert run.info.status == "FAILED"
    assert "train/loss is" in run.data.tags["temper.error"]


@pytest.mark.parametrize("launcher", ["torchrun", "ray"])
def test_ctrl_c_kills_workers_and_marks_run_killed(tmp_path, mlflow_server, ray_address, client, launcher) -> None:
    args = [TEMPER, "run", TINY_GPT, "--set", f"tracking.uri={mlflow_server.uri}",
            "--set", "train.max_steps=100000", "--set", "train.log_every=5"]
    args += ["--address", ray_address] if launcher == "ray" else ["--launcher", "torchrun"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    output = []
    deadline = time.monotonic() + 240
    for line in proc.stderr:  # wait until training is really under way
        output.append(line)
        if "step 10/" in line or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=120)
    text = "".join(output) + rest
    assert proc.returncode == 130, text[-4000:]
    run = client.get_run(run_id_of(text))
    assert run.info.status == "KILLED"
    # The workers stopped at a logging step and flushed: every logged step is in MLflow.
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
    assert steps and steps == list(range(5, steps[-1] + 1, 5)) and steps[-1] < 100000
    assert "stopping the workers at their next logging step" in text


def test_python_stdlib_platform_module_is_not_shadowed() -> None:
    code = "import platform, temper; print(platform.python_version())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ".".join(map(str, sys.version_info[:3]))


def test_digits_from_shards_end_to_end(tmp_path, mlflow_server, client) -> None:
    """Real digits packed by the CLI, streamed by 2 torchrun ranks x 2 loader workers, recorded;
    then a missing shard is a one-line preflight error (exit 2) before any worker starts."""
    packed = temper("data", "pack", "digits", "data/digits", "--format", "digits", "--shard-size", "200",
                    cwd=tmp_path)
    assert packed.returncode == 0, packed.stderr[-2000:]
    job = str(ROOT / "jobs" / "digits-resnet.yaml")
    sets = ["--set", "train.max_steps=60", "--set", "train.eval_every=0", "--set", f"tracking.uri={mlflow_server.uri}",
            "--set", "tracking.experiment=e2e-digits"]
    proc = temper("run", job, "--launcher", "torchrun", *sets, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "warning: data.train" not in proc.stderr  # 7 train shards for 2 ranks x 2 loader workers
    run = client.get_run(run_id_of(proc.stderr))
    assert run.info.status == "FINISHED"
    assert run.data.params["data.train"] == f"{tmp_path}/data/digits/digits-{{000000..000006}}.tar"
    assert run.data.metrics["data/skipped_samples"] == 0
    assert run.data.metrics["val/acc"] > 0.3  # 10 classes: chance is 0.1; 397 held-out real digits
    (tmp_path / "data" / "digits" / "digits-000001.tar").unlink()
    proc = temper("run", job, "--launcher", "torchrun", *sets, cwd=tmp_path)
    assert proc.returncode == 2
    assert f"error: data.train: {tmp_path}/data/digits/digits-000001.tar does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
