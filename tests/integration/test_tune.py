"""`temper tune` end to end on the shared Ray head and the session's MLflow server.

One search (jobs/ci/tiny-tune-space.yaml: a grid of 4 learning rates, trials of 8 steps over
the tiny ResNet, 1 worker each, ASHA with grace 1), stopped with Ctrl-C (SIGINT) once its
trials run (exit 130, the search's and the running trials' runs KILLED), resumed with the same
command and its driver killed (SIGKILL) once a trial has a committed checkpoint, then run
again to its end. It must finish with 4 child runs under one parent, the trial that does not
learn (lr 1e-6) stopped early by ASHA, at least one resumed from its own checkpoint into
its own run, none started twice from scratch, and a best trial whose job file validates and
whose ranked metric is the best in MLflow. (The bad space files are unit tests:
tests/unit/test_tune_space.py.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.fixtures.cli import ROOT, TEMPER, TINY_RESNET, temper

SPACE = str(ROOT / "jobs" / "ci" / "tiny-tune-space.yaml")
SEARCH = "ci-tiny-resnet-search"
FIRST_LOG_STEP = 2  # the space's train.log_every


def _checkpointed_and_saved(folder: Path) -> bool:
    """A trial committed a checkpoint and Tune's saved state already knows that trial."""
    trials = folder / "trials"
    states = list(folder.glob("experiment_state-*.json"))
    if not trials.is_dir() or not states:
        return False
    text = states[0].read_text(errors="replace")
    return any(list(t.glob("*/step-*")) and t.name in text for t in trials.iterdir())


def _ctrl_c_stops_the_search(args: list[str], *, env: dict, folder: Path, cwd: Path, client) -> None:
    """SIGINT once Tune saved its state and a trial's run exists: the command ends with 130
    and the interrupt's line, and no run of the search is left RUNNING."""
    proc = subprocess.Popen([TEMPER, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline, running = time.monotonic() + 240, False
    while not running and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
        experiment = client.get_experiment_by_name("tune")
        if experiment is not None and list(folder.glob("experiment_state-*.json")):
            runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`temper.tune` = '{SEARCH}'")
            running = any(r.info.status == "RUNNING" and "mlflow.parentRunId" in r.data.tags for r in runs)
    if not running:
        proc.kill()
        pytest.fail("no trial ran before Ctrl-C:\n" + proc.communicate()[0][-4000:])
    proc.send_signal(signal.SIGINT)
    err, _ = proc.communicate(timeout=180)
    assert proc.returncode == 130, err[-3000:]
    # (Ray's copies of the trials' output may come after it)
    assert "the search was interrupted (Ctrl-C) before trial(s)" in err, err[-3000:]
    assert any(line == "interrupted" for line in err.splitlines()), err[-3000:]
    experiment = client.get_experiment_by_name("tune").experiment_id
    runs = client.search_runs([experiment], filter_string=f"tags.`temper.tune` = '{SEARCH}'")
    assert runs and all(r.info.status in ("KILLED", "FINISHED") for r in runs), \
        [(r.info.run_name, r.info.status) for r in runs]
    assert any(r.info.status == "KILLED" for r in runs if "mlflow.parentRunId" not in r.data.tags)


@pytest.mark.ray
def test_search_asha_kill_the_driver_resume_and_the_best_trial(tmp_path, mlflow_server, ray_address, client) -> None:
    args = ["tune", TINY_RESNET, "--space", SPACE, "--address", ray_address,
            "--set", f"tracking.uri={mlflow_server.uri}", "--set", "tracking.experiment=tune",
            "--set", "tune.max_concurrent_trials=2"]  # the space's grid is ordered for 2 at a time
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    folder = tmp_path / ".temper" / "tune" / SEARCH
    _ctrl_c_stops_the_search(args, env=env, folder=folder, cwd=tmp_path, client=client)
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen([TEMPER, *args], cwd=tmp_path, env=env, stdout=log, stderr=log)
        deadline = time.monotonic() + 240
        while not _checkpointed_and_saved(folder) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(2.5)  # one more save of Tune's state (TUNE_GLOBAL_CHECKPOINT_S=2)
        assert proc.poll() is None, "the search ended before the driver could be killed:\n" + \
            (tmp_path / "first.log").read_text()[-3000:]
        proc.kill()  # the driver dies; its trials go with it
        proc.wait(timeout=60)

    again = temper(*args, cwd=tmp_path, timeout=400, env=env)
    assert again.returncode == 0, again.stderr[-5000:]
    assert f"resuming the search {SEARCH}" in again.stderr

    experiment = client.get_experiment_by_name("tune").experiment_id
    parents = client.search_runs([experiment], filter_string=f"tags.`temper.tune` = '{SEARCH}'")
    parents = [r for r in parents if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    children = client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 4, [c.info.run_name for c in children]  # no trial got a second run
    assert {c.info.status for c in children} == {"FINISHED"}
    stopped = {c.data.tags.get("temper.tune.params") for c in children if c.data.tags.get("temper.tune.early_stopped") == "true"}
    assert '{"optim.lr": 1e-06}' in stopped, f"ASHA did not stop the trial that does not learn: {stopped}"
    assert any(int(c.data.tags.get("temper.resumes", "0")) >= 1 for c in children), "no trial resumed"
    for c in children:  # resumed from a checkpoint, never from step 1 again
        first = [m for m in client.get_metric_history(c.info.run_id, "train/loss") if m.step == FIRST_LOG_STEP]
        assert len(first) <= 1, f"{c.info.run_name} logged step {FIRST_LOG_STEP} twice: started over"
    assert len(list((folder / "trials").iterdir())) == 4

    ranked = {c.info.run_id: c.data.metrics["tune/val/loss"] for c in children}
    best_id = parent.data.tags["temper.tune.best_run_id"]
    assert ranked[best_id] == min(ranked.values()) == parent.data.metrics["best/val/loss"]
    assert {"trials.md", "trials.json", "trials.png", "best.yaml", "space.yaml"} <= \
        {a.path for a in client.list_artifacts(parent.info.run_id)}
    best = folder / "best.yaml"
    checked = temper("validate", str(best), cwd=tmp_path, timeout=60)
    assert checked.returncode == 0, checked.stderr
    assert best_id in best.read_text().splitlines()[0]
