"""`temper tune`'s space file: every mistake is one line, exit 2, before Ray starts or any trial
runs (unknown key with did-you-mean, a value out of range at a distribution's end, a bad
distribution, an empty space, a metric the job never reports)."""

from __future__ import annotations

from pathlib import Path

import pytest

from temper.cli import main
from temper.spec.tune import load_space, reported_metrics

ROOT = Path(__file__).resolve().parents[2]
TINY_RESNET = str(ROOT / "jobs" / "ci" / "tiny-resnet.yaml")
CI_SPACE = ROOT / "jobs" / "ci" / "tiny-tune-space.yaml"


@pytest.fixture(autouse=True)
def no_ray(monkeypatch):
    """Any of these reaching Ray is a failure: the checks come first."""
    import temper.launch.tune as tune_driver

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started before the space was checked")

    monkeypatch.setattr(tune_driver, "_init_ray", refuse)


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ("space: {optim.lrr: {loguniform: [1.0e-3, 0.1]}}",
         "space.optim.lrr: unknown key (did you mean 'lr'?); accepted: betas, eps, grad_clip, implementation, kind, lr, "
         "momentum, nesterov, schedule, weight_decay"),
        ("space: {optim.momentum: {uniform: [0.5, 1.5]}}",
         "space.optim.momentum: uniform value 1.5: input should be less than 1 (got 1.5)"),
        ("space: {train.micro_batch_size: {grid: [8, 0]}}",
         "space.train.micro_batch_size: grid value 0: input should be greater than or equal to 1 (got 0)"),
        ("space: {optim.lr: {lognormal: [1, 2]}}",
         "space.optim.lr: unknown distribution 'lognormal'; accepted: loguniform, uniform, randint, choice, grid"),
        ("space: {optim.lr: {uniform: [0.1, 0.01]}}", "space.optim.lr: uniform: low must be below high (got [0.1, 0.01])"),
        ("space: {optim.lr: {loguniform: [0, 0.1]}}", "space.optim.lr: loguniform: low must be > 0 (got 0.0)"),
        ("space: {}", "space: the space is empty; name at least one spec key with a distribution, "
         "e.g. optim.lr: {loguniform: [1.0e-4, 1.0e-2]}"),
        ("space: {optim.lr: {choice: [0.1]}}\ntune: {metric: val/perplexity}",
         f"tune.metric: 'val/perplexity' is never reported by {TINY_RESNET}; it reports: train/loss, "
         "train/lr, val/acc, val/loss"),
        ("space: {optim.lr: {choice: [0.1]}}\ntune: {scheduler: {kind: hyperband}}",
         "tune.scheduler: 'hyperband' is not a known kind; accepted: asha, none"),
        ("space: {optim.lr: {uniform: [0.01, 0.1]}}\ntune: {search: grid}",
         "tune.search grid: optim.lr is a uniform; every key needs a grid (or use search: random)"),
    ],
)
def test_bad_space_is_one_line_exit_2_before_any_trial(tmp_path, capsys, space, message) -> None:
    path = tmp_path / "space.yaml"
    path.write_text(space + "\n")
    assert main(["tune", TINY_RESNET, "--space", str(path)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {path}: {message}"


def test_metric_needs_held_out_data(tmp_path, capsys) -> None:
    path = tmp_path / "space.yaml"
    path.write_text("space: {optim.lr: {choice: [0.1]}}\ntune: {metric: val/acc}\n")
    assert main(["tune", TINY_RESNET, "--space", str(path), "--set", "data.eval_samples=0"]) == 2
    assert "'val/acc' is never reported" in capsys.readouterr().err


def test_tune_overrides_and_mode_default() -> None:
    space = load_space(CI_SPACE, ["tune.num_samples=16", "tune.metric=val/acc", "tune.mode=null"])
    assert space.tune.num_samples == 16 and space.tune.resolved_mode == "max"
    assert load_space(CI_SPACE).tune.resolved_mode == "min"


def test_reported_metrics_follow_the_objective() -> None:
    from temper.spec import load_spec

    gpt = load_spec(ROOT / "jobs" / "ci" / "tiny-gpt.yaml")
    assert "val/acc" not in reported_metrics(gpt) and "val/loss" in reported_metrics(gpt)


def test_submit_tune_runs_temper_tune_on_the_cluster(capsys) -> None:
    import json

    assert main(["submit", TINY_RESNET, "--tune", str(CI_SPACE), "--to", "http://127.0.0.1:9", "--dry-run",
                 "--set", "tune.num_samples=2", "--set", "optim.lr=0.01"]) == 0
    request = json.loads(capsys.readouterr().out)
    assert request["entrypoint"] == "temper tune temper-job.yaml --space temper-space.yaml"
    assert "temper-space.yaml (the search space)" in request["added"]
    assert main(["submit", TINY_RESNET, "--tune", str(CI_SPACE), "--to", "k8s://ns", "--dry-run"]) == 2
    assert "does not run searches yet" in capsys.readouterr().err


def test_pipeline_stage_may_be_a_search_but_not_a_sweep_too(tmp_path, capsys) -> None:
    from temper.spec.pipeline import load_pipeline

    path = tmp_path / "p.yaml"
    path.write_text("name: p\nstages:\n  - {name: search, job: j.yaml, tune: s.yaml}\n"
                    "  - {name: final, job: j.yaml, init_from: search}\n")
    assert load_pipeline(path).stages[0].tune == "s.yaml"
    path.write_text("name: p\nstages:\n  - {name: search, job: j.yaml, tune: s.yaml, sweep: {seed: [0, 1]}}\n")
    assert main(["pipeline", str(path)]) == 2
    assert "tune and sweep exclude each other" in capsys.readouterr().err


@pytest.mark.parametrize(("space", "job"), [("jobs/ci/tiny-tune-space.yaml", "jobs/ci/tiny-resnet.yaml"),
                                            ("jobs/tune/digits-finetune-space.yaml", "jobs/digits-finetune.yaml")])
def test_shipped_space_files_fit_their_jobs(space, job) -> None:
    from temper.spec.tune import check_space

    base = check_space(load_space(ROOT / space), job=ROOT / job, space_path=space, job_sets=[])
    assert base.train.eval_every > 0  # ASHA needs evals before the end
