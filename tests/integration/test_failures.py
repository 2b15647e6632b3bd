"""The failure matrix: each way a job can die, through the real CLI, asserting what the user
sees (docs/troubleshooting.md): the last stderr line `error: rank R: <cause>` naming the cause,
at most one traceback on the console, the documented exit code (1: the job failed while
running; 2: refused before anything started), the MLflow run FAILED with that same line, and
every rank's log uploaded to it as logs/rank-N.txt.

Kept lean: 3-step tiny jobs, torchrun with 2 ranks or in-process; three kinds also under Ray
(the session's Ray head).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.fixtures.cli import TINY_GPT, run_id_of, temper
from tests.fixtures.shard_servers import write_shards

SHORT = ("--set", "train.max_steps=3", "--set", "train.eval_every=0")


def _last_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def check_failure(proc, *, cause: str, code: int, client=None, ranks: int = 0) -> str:
    """The user's view of a failure; returns the error line (without `error: `)."""
    last = _last_line(proc)
    assert proc.returncode == code, proc.stderr[-4000:]
    assert last.startswith("error: ") and cause in last, proc.stderr[-4000:]
    assert proc.stderr.count("Traceback (most recent call last)") <= 1, proc.stderr[-6000:]
    line = last[len("error: "):]
    if client is not None:
        run_id = run_id_of(proc.stderr)
        run = client.get_run(run_id)
        assert run.info.status == "FAILED"
        assert run.data.tags["temper.error"] == line
        logs = {a.path for a in client.list_artifacts(run_id, "logs")}
        assert logs == {f"logs/rank-{r}.txt" for r in range(ranks)}, logs
    return line


@pytest.fixture(scope="module")
def truncated(tmp_path_factory) -> Path:
    """Shards whose third tar is cut mid-way (its manifest still counts every sample)."""
    folder = tmp_path_factory.mktemp("truncated")
    write_shards(folder, [40, 40, 40, 40])
    path = folder / "toy-000002.tar"
    path.write_bytes(path.read_bytes()[: 10 * 2048])
    return folder


def _shard_job(folder: Path, tmp_path: Path, uri: str) -> tuple[str, ...]:
    return ("--set", "model={kind: gpt, flavor: tiny, seq_len: 8}",
            "--set", f"data={{kind: webdataset, train: {folder}, num_workers: 2, verify: none, on_error: fail}}",
            "--set", "train.micro_batch_size=8", "--set", "train.max_steps=30", "--set", f"tracking.uri={uri}")


LAUNCHERS = ["torchrun", pytest.param("ray", marks=pytest.mark.ray)]


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_truncated_shard_names_the_shard(launcher, truncated, tmp_path, mlflow_server, client, request) -> None:
    extra = ("--address", request.getfixturevalue("ray_address")) if launcher == "ray" else ()
    proc = temper("run", TINY_GPT, "--launcher", launcher, *extra, *_shard_job(truncated, tmp_path, mlflow_server.uri),
                  cwd=tmp_path)
    line = check_failure(proc, cause="toy-000002.tar", code=1, client=client, ranks=2)
    assert "set data.on_error=skip" in line and "DataLoader" not in line
    assert "Traceback" not in proc.stderr  # our own error: the message is the whole story


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_exception_in_forward(launcher, tmp_path, mlflow_server, client, request) -> None:
    extra = ("--address", request.getfixturevalue("ray_address")) if launcher == "ray" else ()
    proc = temper("run", TINY_GPT, "--launcher", launcher, *extra, *SHORT, "--set", f"tracking.uri={mlflow_server.uri}",
                  cwd=tmp_path, env={"TEMPER_FAULT": "forward:2:1"})
    line = check_failure(proc, cause="injected fault in DistributedDataParallel.forward at step 2 on rank 1",
                         code=1, client=client, ranks=2)
    assert line.startswith("rank 1: RuntimeError: ")
    assert proc.stderr.count("Traceback (most recent call last)") == 1  # the root cause's, once
    assert "in hook" in proc.stderr and "ChildFailedError" not in proc.stderr


def test_more_deaths_than_max_failures(tmp_path, mlflow_server, client) -> None:
    proc = temper("run", TINY_GPT, "--launcher", "torchrun", *SHORT, "--set", f"tracking.uri={mlflow_server.uri}",
                  "--set", "fault.max_failures=1", cwd=tmp_path, env={"TEMPER_FAULT": "raise:2:1"})
    line = check_failure(proc, cause="injected fault at step 2 on rank 1", code=1, client=client, ranks=2)
    assert line.startswith("rank 1: RuntimeError: injected fault") and "restarted 1 time(s)" in line


@pytest.mark.parametrize("launcher", ["inprocess", pytest.param("ray", marks=pytest.mark.ray)])
def test_nan_under_on_nan_stop(launcher, tmp_path, mlflow_server, client, request) -> None:
    extra = ("--address", request.getfixturevalue("ray_address")) if launcher == "ray" else ()
    workers = 2 if launcher == "ray" else 1
    proc = temper("run", TINY_GPT, "--launcher", launcher, *extra, *SHORT, "--set", f"resources.workers={workers}",
                  "--set", f"tracking.uri={mlflow_server.uri}", cwd=tmp_path, env={"TEMPER_FAULT": "nan:2:*"})
    line = check_failure(proc, cause="train/loss is nan at step 2", code=1, client=client, ranks=workers)
    # every rank sees the same reduced loss and stops; whichever Ray reports first is named
    assert re.match(rf"rank [0-{workers - 1}]: FloatingPointError: ", line), line


def test_hung_collective_names_the_rank_and_dumps_stacks(tmp_path, mlflow_server, client) -> None:
    proc = temper("run", TINY_GPT, "--launcher", "torchrun", *SHORT, "--set", f"tracking.uri={mlflow_server.uri}",
                  "--set", "fault.collective_timeout_s=5", cwd=tmp_path, env={"TEMPER_FAULT": "hang:2:1"})
    line = check_failure(proc, cause="rank(s) 1 never reached it", code=1, client=client, ranks=2)
    assert "in step 2 waited longer than fault.collective_timeout_s=5s" in line
    assert "last step finished: rank 0: 1, rank 1: 1" in line
    run_id = run_id_of(proc.stderr)
    logs = {r: client.download_artifacts(run_id, f"logs/rank-{r}.txt", str(tmp_path)) for r in (0, 1)}
    hung, waiting = Path(logs[1]).read_text(), Path(logs[0]).read_text()
    assert "most recent call first" in hung and "in before_step" in hung  # faulthandler: where rank 1 slept
    assert "most recent call first" in waiting and "in train_step" in waiting  # rank 0, in its collective


def test_missing_shard_and_unreachable_s3_are_refused_before_launch(tmp_path) -> None:
    gone = tmp_path / "gone"
    write_shards(gone, [40, 40])
    (gone / "toy-000001.tar").unlink()
    proc = temper("run", TINY_GPT, "--launcher", "inprocess", "--set", "resources.workers=1",
                  "--set", "model={kind: gpt, flavor: tiny, seq_len: 8}",
                  "--set", f"data={{kind: webdataset, train: {gone}}}", cwd=tmp_path)
    check_failure(proc, cause="toy-000001.tar does not exist", code=2)
    assert "MLflow run" not in proc.stderr  # nothing was started or recorded
    s3 = ("--set", "data={kind: webdataset, train: 's3://nobucket/shards'}")
    proc = temper("run", TINY_GPT, "--launcher", "inprocess", "--set", "resources.workers=1", *s3,
                  "--set", "model={kind: gpt, flavor: tiny, seq_len: 8}", cwd=tmp_path,
                  env={"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x",
                       "AWS_SECRET_ACCESS_KEY": "x", "AWS_MAX_ATTEMPTS": "1"})
    check_failure(proc, cause="s3://nobucket/shards", code=2)
    assert "MLflow run" not in proc.stderr


def test_resume_compatibility_is_checked_before_launch(tmp_path, mlflow_server, client) -> None:
    """An architecture change is refused (exit 2, the diff, both ways out) before any worker
    starts; an lr change resumes and is recorded in the run (tag + spec-resume-1.yaml)."""
    job = ("run", TINY_GPT, "--launcher", "inprocess", "--set", "resources.workers=1", "--set", "train.eval_every=0",
           "--set", "checkpoint.enabled=true", "--set", "checkpoint.every_steps=2",
           "--set", f"tracking.uri={mlflow_server.uri}")
    first = temper(*job, "--set", "train.max_steps=4", cwd=tmp_path, env={"TEMPER_FAULT": "raise:3:0"})
    assert first.returncode == 1, first.stderr[-3000:]
    run_id = run_id_of(first.stderr)
    refused = temper(*job, "--set", "train.max_steps=4", "--set", "model.d_model=64", cwd=tmp_path)
    line = check_failure(refused, cause="model.d_model: 32 -> 64", code=2)
    assert "--no-resume" in line and "--set model.d_model=32" in line
    assert "MLflow run" not in refused.stderr and "step 3/4" not in refused.stderr  # no worker started
    resumed = temper(*job, "--set", "train.max_steps=4", "--set", "optim.lr=0.005", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert run_id_of(resumed.stderr) == run_id
    run = client.get_run(run_id)
    assert "optim.lr: 0.01 -> 0.005" in run.data.tags["temper.spec_changes"]
    spec = Path(client.download_artifacts(run_id, "spec-resume-1.yaml", str(tmp_path))).read_text()
    assert "lr: 0.005" in spec


def test_profile_writes_every_ranks_trace_and_a_top_ops_table(tmp_path, mlflow_server, client) -> None:
    proc = temper("run", TINY_GPT, "--launcher", "torchrun", *SHORT, "--set", f"tracking.uri={mlflow_server.uri}",
                  "--set", "train.profile={start_step: 2, steps: 1}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_id = run_id_of(proc.stderr)
    files = {a.path for a in client.list_artifacts(run_id, "profile")}
    assert files == {f"profile/rank-{r}{s}" for r in (0, 1) for s in (".trace.json.gz", "-top-ops.txt")}, files
    table = Path(client.download_artifacts(run_id, "profile/rank-1-top-ops.txt", str(tmp_path))).read_text()
    assert "aten::" in table and "Self CPU" in table
    logs = {a.path for a in client.list_artifacts(run_id, "logs")}
    assert logs == {"logs/rank-0.txt", "logs/rank-1.txt"}  # uploaded at the end of a good run too
