"""`temper submit / logs / status / stop / list --to http://HEAD:PORT` against a real Ray head
(with its dashboard, the Jobs API) started by the tests, tracking into a real MLflow server.

Stopping a job: Ray sends SIGTERM to the job's `temper run`, which marks the MLflow run
KILLED (not FAILED: nothing went wrong, someone asked it to stop) and stops the workers.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from tests.fixtures.cli import TINY_GPT, submitted
from tests.fixtures.cli import temper_to_cluster as temper


def one_error_line(proc) -> str:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not line.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def head(ray_jobs_head) -> str:
    return ray_jobs_head.dashboard


def tiny(mlflow_server, experiment: str, *extra: str) -> list[str]:
    return [TINY_GPT, "--set", f"tracking.uri={mlflow_server.uri}", "--set", f"tracking.experiment={experiment}",
            "--set", "train.eval_every=0", *extra]


def test_unreachable_or_wrong_address_is_one_line(tmp_path, mlflow_server, client) -> None:
    from temper.dist import free_port

    nobody = f"http://127.0.0.1:{free_port()}"
    line = one_error_line(temper("submit", *tiny(mlflow_server, "submit-unreachable"), "--to", nobody, cwd=tmp_path))
    assert nobody in line and "no Ray Jobs API answers there" in line and "8265" in line
    assert client.get_experiment_by_name("submit-unreachable") is None  # no MLflow run for nothing
    line = one_error_line(temper("status", "x", "--to", mlflow_server.uri, cwd=tmp_path))  # not Ray
    assert "no Ray Jobs API answers there" in line
    line = one_error_line(temper("list", cwd=tmp_path))
    assert "--to" in line and "TEMPER_CLUSTER" in line


@pytest.mark.ray
def test_submit_follow_status_list_and_mlflow_run(tmp_path, mlflow_server, head, client) -> None:
    (tmp_path / "notes.txt").write_text("travels with the job\n")
    (tmp_path / ".venv").mkdir()
    (tmp_path / ".venv" / "big").write_text("stays here")
    ckpt = tmp_path / "shared-ckpt"  # stands in for shared storage: every node sees this path
    proc = temper("submit", *tiny(mlflow_server, "submit-ray", "--set", "train.max_steps=6",
                                  "--set", f"checkpoint.dir={ckpt}"), "--to", head, cwd=tmp_path)
    job_id, run_id = submitted(proc)
    assert job_id.startswith("temper-ci-tiny-gpt-")
    assert f"temper logs {job_id} --to {head} -f" in proc.stderr

    logs = temper("logs", job_id, "--to", head, "-f", cwd=tmp_path)
    assert logs.returncode == 0, logs.stderr[-3000:]
    assert f"temper run temper-job.yaml --run-id {run_id}" in logs.stdout
    assert "finished ci-tiny-gpt: 6 steps" in logs.stdout, logs.stdout[-3000:]

    status = temper("status", job_id, "--to", head, cwd=tmp_path)
    assert status.returncode == 0 and f"{job_id}  SUCCEEDED" in status.stdout, status.stdout
    assert f"MLflow run {run_id}" in status.stdout
    listing = temper("list", "--to", head, cwd=tmp_path, env={"COLUMNS": "200"})
    assert listing.returncode == 0 and job_id in listing.stdout and "SUCCEEDED" in listing.stdout

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["temper.launcher"] == f"submit:{head}"
    history = sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))
    assert history == [1, 2, 3, 4, 5, 6]
    assert "perf/samples_per_s" in run.data.metrics
    assert (ckpt / run_id / "step-000000006").is_dir()  # the job ran in the uploaded dir

    gone = one_error_line(temper("status", "temper-no-such-job", "--to", head, cwd=tmp_path))
    assert "temper-no-such-job is not on the Ray cluster" in gone and "temper list" in gone


@pytest.mark.ray
def test_stop_long_job_marks_run_killed(tmp_path, mlflow_server, head, client) -> None:
    proc = temper("submit", *tiny(mlflow_server, "submit-stop", "--set", "train.max_steps=1000000",
                                  "--set", "checkpoint.enabled=false"), "--to", head, "-o", "json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sub = json.loads(proc.stdout)
    job_id, run_id = sub["job_id"], sub["run_id"]
    deadline = time.monotonic() + 240  # until rank 0 has logged a step: the driver is training
    while "step 3/1000000" not in temper("logs", job_id, "--to", head, cwd=tmp_path).stdout:
        assert time.monotonic() < deadline, temper("logs", job_id, "--to", head, cwd=tmp_path).stdout[-3000:]
        time.sleep(2)
    stopped = temper("stop", job_id, "--to", head, cwd=tmp_path)
    assert stopped.returncode == 0 and f"{job_id}  STOPPED" in stopped.stdout, (stopped.stdout, stopped.stderr)
    run = client.get_run(run_id)
    assert run.info.status == "KILLED", run.data.tags
    assert "SIGTERM" in run.data.tags["temper.error"]
    assert client.get_metric_history(run_id, "train/loss")


@pytest.mark.ray
def test_rejected_job_is_one_line_and_fails_its_run(tmp_path, mlflow_server, head, client) -> None:
    """The head refuses a working directory over its package limit (512 MiB by default; the
    test head's is lowered to HEAD_MAX_PACKAGE rather than writing 512 MiB here)."""
    from tests.fixtures.ray_jobs import HEAD_MAX_PACKAGE

    (tmp_path / "data.bin").write_bytes(os.urandom(HEAD_MAX_PACKAGE + (1 << 20)))  # under our 50 MiB cut
    line = one_error_line(temper("submit", *tiny(mlflow_server, "submit-rejected"), "--to", head, cwd=tmp_path))
    assert head in line and "Ray refused the job" in line and "exceeds the maximum size" in line, line
    (run,) = client.search_runs([client.get_experiment_by_name("submit-rejected").experiment_id])
    assert run.info.status == "FAILED" and "refused the job" in run.data.tags["temper.error"]


@pytest.mark.ray
def test_submit_follow_ends_with_the_root_cause(tmp_path, mlflow_server, head, client) -> None:
    """A submitted job that fails: `--follow` ends with the driver's `error: rank R: <cause>`
    line (docs/troubleshooting.md), the run is FAILED with it and the rank logs are in it."""
    proc = temper("submit", *tiny(mlflow_server, "submit-fails", "--set", "train.max_steps=3",
                                  "--set", "optim.lr=1e12", "--set", "optim.grad_clip=null"),
                  "--to", head, "--follow", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error: rank 0: FloatingPointError: train/loss is"), proc.stderr[-3000:]
    run_id = next(line.split()[2].rstrip(":") for line in proc.stderr.splitlines() if line.startswith("MLflow run "))
    run = client.get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["temper.error"] == last[len("error: "):]
    assert {a.path for a in client.list_artifacts(run_id, "logs")} == {"logs/rank-0.txt", "logs/rank-1.txt"}
