"""Preemption (fault.preemption_grace_s): a SIGTERM to any worker saves a checkpoint at the next
step boundary on every rank, the job exits 75 with its MLflow run KILLED and tagged
temper.preempted, and the next `temper run` resumes from that step and ends bit for bit where
an uninterrupted run ends. The SIGTERM is injected with TEMPER_FAULT=sigterm:STEP:RANK (the
worker signals itself before STEP: the handler runs before the step's end, so every rank
agrees on STEP itself under torchrun)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.fixtures.cli import TINY_GPT, run_id_of, temper

COMMON = ["--set", "train.max_steps=8", "--set", "checkpoint.every_steps=3", "--set", "train.eval_every=0"]
PREEMPTED = 75  # JobPreemptedError.exit_code (EX_TEMPFAIL: try again)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from temper.checkpoint.weights import open_weights

    weights = open_weights(str(run_dir))
    return {name: weights.get(name) for name in weights.shapes}


@pytest.fixture(scope="module")
def straight(tmp_path_factory, mlflow_server) -> dict[str, torch.Tensor]:
    """The uninterrupted run (torchrun, 2 ranks): its last checkpoint's model tensors."""
    cwd = tmp_path_factory.mktemp("straight")
    proc = temper("run", TINY_GPT, "--launcher", "torchrun", *COMMON, "--set", "tracking.enabled=false", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (run_dir,) = (cwd / "temper-runs" / "ci-tiny-gpt").iterdir()
    return final_weights(run_dir)


def check_preempted_then_resumed(proc, *, cwd: Path, client, uri: str, launch: list[str], straight,
                                 step: int | None) -> None:
    assert proc.returncode == PREEMPTED, proc.stderr[-4000:]
    run_id = run_id_of(proc.stderr)
    run = client.get_run(run_id)
    saved = int(run.data.tags["temper.preempted"])
    assert run.info.status == "KILLED" and (step is None or saved == step), run.data.tags
    assert any(k.startswith(f"temper.event.step-{saved:06d}.preempted") for k in run.data.tags)
    run_dir = Path(run.data.tags["temper.checkpoint_dir"])
    assert (run_dir / f"step-{saved:09d}").is_dir()
    resumed = temper("run", TINY_GPT, *launch, *COMMON, "--set", f"tracking.uri={uri}", cwd=cwd)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"resuming run {run_id} from step {saved}" in resumed.stderr
    assert client.get_run(run_id).info.status == "FINISHED"
    got = final_weights(run_dir)
    assert got.keys() == straight.keys()
    assert all(torch.equal(got[k], straight[k]) for k in got), "the resumed run differs from the uninterrupted one"


def test_sigterm_to_a_torchrun_worker_saves_then_the_rerun_resumes_exactly(tmp_path, mlflow_server, client,
                                                                           straight) -> None:
    launch = ["--launcher", "torchrun"]
    proc = temper("run", TINY_GPT, *launch, *COMMON, "--set", f"tracking.uri={mlflow_server.uri}", cwd=tmp_path,
                  env={"TEMPER_FAULT": "sigterm:5:1"})
    assert "checkpoint at step 5 committed" in proc.stderr, proc.stderr[-4000:]
    check_preempted_then_resumed(proc, cwd=tmp_path, client=client, uri=mlflow_server.uri, launch=launch, straight=straight, step=5)


@pytest.mark.ray
def test_sigterm_to_a_ray_worker_saves_then_the_rerun_resumes_exactly(tmp_path, mlflow_server, client,
                                                                      ray_address, straight) -> None:
    launch = ["--address", ray_address]
    proc = temper("run", TINY_GPT, *launch, *COMMON, "--set", f"tracking.uri={mlflow_server.uri}", cwd=tmp_path,
                  env={"TEMPER_FAULT": "sigterm:5:1"})
    # Ray's worker handles the signal on its main thread, the loop runs in another: the
    # ranks agree at step 5 or the next one.
    check_preempted_then_resumed(proc, cwd=tmp_path, client=client, uri=mlflow_server.uri, launch=launch, straight=straight, step=None)


def test_a_grace_time_too_short_keeps_the_previous_checkpoint(tmp_path) -> None:
    sets = ["--launcher", "inprocess", *COMMON, "--set", "tracking.enabled=false", "--set", "resources.workers=1",
            "--set", "fault.preemption_grace_s=0.000001"]
    proc = temper("run", TINY_GPT, *sets, cwd=tmp_path, env={"TEMPER_FAULT": "sigterm:5:0"})
    assert proc.returncode == PREEMPTED, proc.stderr[-4000:]
    assert "not saving; the next run resumes from step 3 (the previous checkpoint)" in proc.stderr
    (run_dir,) = (tmp_path / "temper-runs" / "ci-tiny-gpt").iterdir()
    assert sorted(p.name for p in run_dir.glob("step-*")) == ["step-000000003"]
    resumed = temper("run", TINY_GPT, *sets, cwd=tmp_path)
    assert resumed.returncode == 0 and "from step 3" in resumed.stderr, resumed.stderr[-4000:]
