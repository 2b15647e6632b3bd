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
def straight_run(tmp_path_factory, mlflow_server) -> tuple[dict[str, torch.Tensor], str]:
    """The uninterrupted run (torchrun, 2 ranks): its last checkpoint's model tensors, its run id."""
    cwd = tmp_path_factory.mktemp("straight")
    proc = temper("run", TINY_GPT, "--launcher", "torchrun", *COMMON, "--set", f"tracking.uri={mlflow_server.uri}",
                  "--set", "tracking.experiment=preempt-straight", cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (run_dir,) = (cwd / "temper-runs" / "ci-tiny-gpt").iterdir()
    return final_weights(run_dir), run_id_of(proc.stderr)


@pytest.fixture
def straight(straight_run) -> dict[str, torch.Tensor]:
    return straight_run[0]


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


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_elastic_2_1_2_through_resume_keeps_the_global_batch_and_the_loss(tmp_path, mlflow_server, client,
                                                                          straight_run) -> None:
    """An elastic job (min_workers=1) that changes size at the same steps a Ray resize would:
    2 workers for steps 1-3 (preempted), 1 worker for 4-6 (in-process: grad_accum 2, preempted),
    2 workers for 7-8. One MLflow run, each step logged once, world size and accumulation
    logged per step, a tag event per resize, and the loss curve equal to the uninterrupted
    2-worker run's within the 2 -> 1 resume test's tolerance (atol 1e-5, rtol 1e-4:
    float32 reduction order)."""
    sets = [*COMMON, "--set", "resources.min_workers=1", "--set", f"tracking.uri={mlflow_server.uri}",
            "--set", "tracking.experiment=elastic-resume"]
    first = temper("run", TINY_GPT, "--launcher", "torchrun", *sets, cwd=tmp_path, env={"TEMPER_FAULT": "sigterm:3:1"})
    assert first.returncode == PREEMPTED, first.stderr[-4000:]
    run_id = run_id_of(first.stderr)
    one = temper("run", TINY_GPT, "--launcher", "inprocess", *sets, cwd=tmp_path, env={"TEMPER_FAULT": "sigterm:6:0"})
    assert one.returncode == PREEMPTED and f"resuming run {run_id} from step 3" in one.stderr, one.stderr[-4000:]
    two = temper("run", TINY_GPT, "--launcher", "torchrun", *sets, cwd=tmp_path)
    assert two.returncode == 0 and f"resuming run {run_id} from step 6" in two.stderr, two.stderr[-4000:]

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    sizes = history(client, run_id, "perf/world_size")
    assert sizes == [(s, 2.0 if s <= 3 or s >= 7 else 1.0) for s in range(1, 9)], sizes
    accum = history(client, run_id, "train/grad_accum")
    assert accum == [(s, 1.0 if s <= 3 or s >= 7 else 2.0) for s in range(1, 9)], accum
    events = {k: v for k, v in run.data.tags.items() if ".resize-" in k}
    assert sorted(events) == ["temper.event.step-000003.resize-1", "temper.event.step-000006.resize-2"], events
    assert "world size 2 -> 1" in events["temper.event.step-000003.resize-1"]
    got = history(client, run_id, "train/loss")
    reference = history(client, straight_run[1], "train/loss")
    assert [s for s, _ in got] == [s for s, _ in reference] == list(range(1, 9))
    torch.testing.assert_close(torch.tensor([v for _, v in got]), torch.tensor([v for _, v in reference]),
                               atol=1e-5, rtol=1e-4)


def test_sigterm_to_the_driver_saves_on_every_rank_and_exits_preempted(tmp_path, mlflow_server, client) -> None:
    """`temper run` itself gets the SIGTERM (a pod eviction): it tells rank 0, the ranks agree
    on a step, save and exit; the driver exits 75 and the run is KILLED, tagged preempted."""
    import os
    import signal
    import subprocess
    import time

    from tests.fixtures.cli import TEMPER

    sets = ["--launcher", "torchrun", "--set", "train.max_steps=100000", "--set", "checkpoint.every_steps=3",
            "--set", "train.eval_every=0", "--set", f"tracking.uri={mlflow_server.uri}"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with open(tmp_path / "err.txt", "w") as err:
        proc = subprocess.Popen([TEMPER, "run", TINY_GPT, *sets], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                                stderr=err)
        runs = tmp_path / "temper-runs" / "ci-tiny-gpt"
        deadline = time.monotonic() + 240
        while not list(runs.glob("*/step-000000003")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    stderr = (tmp_path / "err.txt").read_text()
    assert code == PREEMPTED, stderr[-4000:]
    run = client.get_run(run_id_of(stderr))
    saved = int(run.data.tags["temper.preempted"])
    assert run.info.status == "KILLED" and saved > 3, run.data.tags
    assert (Path(run.data.tags["temper.checkpoint_dir"]) / f"step-{saved:09d}").is_dir()
    assert "the driver (SIGTERM)" in run.data.tags[f"temper.event.step-{saved:06d}.preempted"]
