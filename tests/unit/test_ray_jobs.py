"""RayJobsTarget without a cluster: what is staged for upload, the dry-run request, ids, errors."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from temper.launch.submit import ray_jobs
from temper.launch.submit.ray_jobs import RayJobsTarget, stage_workdir, submission_id_for
from temper.spec import load_spec

TINY = Path(__file__).resolve().parents[2] / "jobs" / "ci" / "tiny-gpt.yaml"


def test_stage_workdir_leaves_out_stores_caches_and_big_files(tmp_path, monkeypatch) -> None:
    src, dest = tmp_path / "src", tmp_path / "dest"
    for rel in ("train.py", "pkg/mod.py", ".venv/lib/x.py", ".git/HEAD", "mlruns/0/meta.yaml",
                "pkg/__pycache__/mod.pyc", "mlflow.db", "temper-runs/a/step-1/x", "big.bin"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text("x" * (2000 if rel == "big.bin" else 1))
    dest.mkdir()
    monkeypatch.setattr(ray_jobs, "MAX_FILE_BYTES", 1000)
    spec = load_spec(TINY, ["train.max_steps=3"])
    skipped = stage_workdir(src, dest, spec=spec)
    staged = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert staged == ["pkg/mod.py", "temper-job.yaml", "train.py"]
    assert skipped == ["big.bin"]
    assert yaml.safe_load((dest / "temper-job.yaml").read_text())["train"]["max_steps"] == 3


def test_dry_run_request_forwards_env_and_masks_secrets(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://minio:9000")
    monkeypatch.setenv("TEMPER_LOG_LEVEL", "INFO")
    monkeypatch.setenv("HOME_SECRET_UNRELATED", "no")
    sub = RayJobsTarget("http://head:8265/").submit(load_spec(TINY, []), workdir=tmp_path, run_id=None,
                                                     dry_run=True)
    request = json.loads(sub.manifest)
    env = request["runtime_env"]["env_vars"]
    assert env["MLFLOW_TRACKING_PASSWORD"] == "***" and "hunter2" not in sub.manifest
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000" and env["TEMPER_LOG_LEVEL"] == "INFO"
    assert "HOME_SECRET_UNRELATED" not in env and env["RAY_JOB_STOP_WAIT_TIME_S"] == "30"
    assert request["entrypoint"] == "temper run temper-job.yaml"
    assert request["submission_id"] == sub.job_id and sub.target == "http://head:8265"
    assert request["metadata"] == {"temper.spec": "ci-tiny-gpt"}


def test_submission_ids_and_error_reasons() -> None:
    assert submission_id_for("My Job_v2!").startswith("temper-my-job-v2-")
    assert len(submission_id_for("x").rsplit("-", 1)[1]) == 8
    server = RuntimeError("Request failed with status code 500: Traceback (most recent call last):\n"
                          "  File \"x.py\", line 1\nValueError: Package size (9MiB) exceeds the maximum\n.")
    assert ray_jobs._reason(server) == "status code 500: ValueError: Package size (9MiB) exceeds the maximum"
