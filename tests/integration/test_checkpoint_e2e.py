"""Checkpoints, resume and fault tolerance through the real CLI and a real MLflow server.

Failures are injected with TEMPER_FAULT (temper.runtime.faults): a worker raising, SIGKILLing
itself, or hanging at a given step on a given rank.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.cli import TINY_GPT, run_id_of, temper
from tests.fixtures.mlflow_server import loss_curve

COMMON = ["--set", "train.max_steps=12", "--set", "checkpoint.every_steps=3", "--set", "train.eval_every=0"]


def test_rerun_resumes_the_same_run_then_export_and_register(tmp_path, mlflow_server, client) -> None:
    sets = [*COMMON, "--set", f"tracking.uri={mlflow_server.uri}", "--set", "tracking.experiment=ckpt-e2e"]
    crashed = temper("run", TINY_GPT, "--launcher", "torchrun", *sets, cwd=tmp_path,
                     env={"TEMPER_FAULT": "raise:8:0"})
    assert crashed.returncode == 1, crashed.stderr[-4000:]
    assert "injected fault at step 8 on rank 0" in crashed.stderr
    run_id = run_id_of(crashed.stderr)
    assert client.get_run(run_id).info.status == "FAILED"
    assert [s for s, _ in loss_curve(client, run_id)] == list(range(1, 8))

    resumed = temper("run", TINY_GPT, "--launcher", "torchrun", *sets, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resuming run {run_id} from step 6" in resumed.stderr
    assert run_id_of(resumed.stderr) == run_id
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["temper.resumes"] == "1"
    # Steps 7 were trained twice (before the crash and after the resume) but logged once.
    assert [s for s, _ in loss_curve(client, run_id)] == list(range(1, 13))
    assert "perf/ckpt_block_s" in run.data.metrics
    run_dir = Path(run.data.tags["temper.checkpoint_dir"])
    assert run_dir == tmp_path / "temper-runs" / "ci-tiny-gpt" / run_id
    assert sorted(p.name for p in run_dir.iterdir()) == ["step-000000006", "step-000000009", "step-000000012"]

    again = temper("run", TINY_GPT, "--launcher", "torchrun", *sets, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-4000:]
    assert f"run {run_id} already reached step 12" in again.stderr
    assert run_id_of(again.stderr) != run_id

    exported = temper("export", run_id, "-o", "out", "--tracking-uri", mlflow_server.uri,
                      "--register", "ci-tiny-gpt", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr[-4000:]
    assert (tmp_path / "out" / "model.safetensors").stat().st_size > 0
    assert (tmp_path / "out" / "config.json").exists()
    version = client.get_latest_versions("ci-tiny-gpt")[0]
    assert version.run_id == run_id


@pytest.mark.ray
def test_ray_worker_killed_restarts_and_matches_the_uninterrupted_run(tmp_path, mlflow_server, ray_address,
                                                                      client) -> None:
    sets = [*COMMON, "--set", f"tracking.uri={mlflow_server.uri}", "--set", "tracking.experiment=ckpt-ray"]
    once = tmp_path / "killed-once"
    proc = temper("run", TINY_GPT, "--address", ray_address, *sets, "--set", "fault.max_failures=1",
                  cwd=tmp_path, env={"TEMPER_FAULT": "kill:8:1", "TEMPER_FAULT_ONCE": str(once)})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert once.exists()  # rank 1 really SIGKILLed itself once
    run = client.get_run(run_id_of(proc.stderr))
    assert run.info.status == "FINISHED"
    assert run.data.tags.get("temper.resumed_from", "").endswith("step-000000006"), proc.stderr[-6000:]
    killed = loss_curve(client, run.info.run_id)
    assert [s for s, _ in killed] == list(range(1, 13))
    (tmp_path / "straight").mkdir()
    straight = temper("run", TINY_GPT, "--launcher", "torchrun", *sets, cwd=tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-4000:]
    reference = loss_curve(client, run_id_of(straight.stderr))
    for (s1, x), (s2, y) in zip(reference, killed, strict=True):
        assert s1 == s2 and y == pytest.approx(x, rel=1e-5)


def test_run_id_logs_into_a_submitted_run_and_a_retry_resumes_it(tmp_path, mlflow_server, client) -> None:
    """`temper submit` creates the run and the cluster runs `temper run --run-id`: the first
    start logs from step 0 into that run; a retried start resumes from its checkpoint."""
    experiment = client.create_experiment(f"run-id-{tmp_path.name}")
    run_id = client.create_run(experiment, run_name="ci-tiny-gpt").info.run_id
    sets = [*COMMON, "--set", f"tracking.uri={mlflow_server.uri}", "--set", "resources.workers=1"]
    crashed = temper("run", TINY_GPT, "--launcher", "inprocess", "--run-id", run_id, *sets,
                     cwd=tmp_path, env={"TEMPER_FAULT": "raise:8:0"})
    assert crashed.returncode == 1, crashed.stderr[-4000:]
    assert f"logging into MLflow run {run_id} from step 0" in crashed.stderr
    assert "temper.resumes" not in client.get_run(run_id).data.tags
    retried = temper("run", TINY_GPT, "--launcher", "inprocess", "--run-id", run_id, *sets, cwd=tmp_path)
    assert retried.returncode == 0, retried.stderr[-4000:]
    assert f"resuming run {run_id} from step 6" in retried.stderr
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["temper.resumes"] == "1"
    assert [s for s, _ in loss_curve(client, run_id)] == list(range(1, 13))
    both = temper("run", TINY_GPT, "--run-id", run_id, "--no-resume", *sets, cwd=tmp_path)
    assert both.returncode == 2 and "exclude each other" in both.stderr


def test_a_checkpoint_dir_shared_by_two_jobs_resumes_only_the_same_job(tmp_path) -> None:
    """Automatic resume continues this job's unfinished run, never another job's that happens to
    share checkpoint.dir (its model may differ: loading it would fail or, worse, succeed)."""
    sets = ["--launcher", "inprocess", "--set", "tracking.enabled=false", "--set", "train.eval_every=0",
            "--set", "checkpoint.dir=shared", "--set", "resources.workers=1"]
    first = temper("run", TINY_GPT, *sets, "--set", "name=job-a", "--set", "train.max_steps=4", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-4000:]
    other = temper("run", TINY_GPT, *sets, "--set", "name=job-b", "--set", "train.max_steps=6", cwd=tmp_path)
    assert other.returncode == 0, other.stderr[-4000:]
    assert "holds runs of other jobs (job-a), none of 'job-b': starting a new run" in other.stderr
    assert "resuming run" not in other.stderr
    again = temper("run", TINY_GPT, *sets, "--set", "name=job-a", "--set", "train.max_steps=8", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "from step 4" in again.stderr  # job-a's own run goes on
    assert len(list((tmp_path / "shared").iterdir())) == 2
