"""Pretrain -> fine-tune through the real CLI and a real MLflow server: init_from (a
registered model, a run, a checkpoint folder), freeze_backbone, lineage tags, run files
(confusion matrix), mismatch errors before anything starts, and `temper pipeline`."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.fixtures.cli import TINY_GPT, TINY_RESNET, run_id_of, temper

ONE = ["--launcher", "inprocess", "--set", "resources.workers=1"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, mlflow_server, client):
    """A tiny ResNet trained 12 steps and registered as ft-backbone@current."""
    cwd = tmp_path_factory.mktemp("pretrain")
    out = temper("run", TINY_RESNET, *ONE, "--set", f"tracking.uri={mlflow_server.uri}",
                 "--set", "tracking.experiment=finetune", "--set", "tracking.register_model=ft-backbone", cwd=cwd)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "@current -> version" in out.stdout + out.stderr
    return run_id_of(out.stderr), cwd


def _export(run_dir: Path, out: Path) -> dict[str, torch.Tensor]:
    from temper.checkpoint import export_checkpoint

    export_checkpoint(str(run_dir), str(out))
    return load_file(str(out / "model.safetensors"))


def test_linear_probe_from_a_registered_model_keeps_the_backbone_and_records_lineage(
        tmp_path, mlflow_server, client, pretrained) -> None:
    parent_id, parent_cwd = pretrained
    out = temper("run", TINY_RESNET, *ONE, "--set", f"tracking.uri={mlflow_server.uri}",
                 "--set", "tracking.experiment=finetune", "--set", "init_from.source=models:/ft-backbone@current",
                 "--set", "init_from.freeze_backbone=true", "--set", "optim.lr=0.2", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "init_from models:/ft-backbone@current: " in out.stderr
    run = client.get_run(run_id_of(out.stderr))
    tags = run.data.tags
    assert tags["temper.parent_run_id"] == parent_id
    assert tags["temper.init_from.model_version"] == "ft-backbone/1"
    assert tags["temper.init_from.step"] == "12"
    parent_dir = Path(client.get_run(parent_id).data.tags["temper.checkpoint_dir"])
    assert tags["temper.init_from.checkpoint"].startswith(str(parent_dir))
    assert int(tags["temper.init_from.loaded"]) > 40 and tags["temper.init_from.ignored"] == "-"

    before = _export(parent_dir, tmp_path / "before")
    after = _export(Path(tags["temper.checkpoint_dir"]), tmp_path / "after")
    backbone = [k for k in before if not k.startswith("heads.")]
    assert all(torch.equal(before[k], after[k]) for k in backbone), "a frozen backbone changed"
    # BatchNorm statistics came from the pretrained run and stay (eval mode while frozen).
    assert any("running_mean" in k and before[k].abs().sum() > 0 for k in backbone)
    assert not torch.equal(before["heads.classify.weight"], after["heads.classify.weight"])

    files = [f.path for f in client.list_artifacts(run.info.run_id, "eval/step-000012")]
    assert files == ["eval/step-000012/confusion_matrix.json", "eval/step-000012/confusion_matrix.png"]
    local = client.download_artifacts(run.info.run_id, "eval/step-000012/confusion_matrix.json", str(tmp_path))
    counts = json.loads(Path(local).read_text())["counts"]
    assert len(counts) == 4 and sum(map(sum, counts)) == 2 * 8  # train.eval_batches x micro_batch_size


def test_full_fine_tune_from_a_run_starts_from_its_weights(tmp_path, mlflow_server, client, pretrained) -> None:
    parent_id, _ = pretrained
    out = temper("run", TINY_RESNET, *ONE, "--set", f"tracking.uri={mlflow_server.uri}", "--set",
                 "tracking.experiment=finetune", "--set", f"init_from=runs:/{parent_id}", "--set", "train.max_steps=1",
                 "--set", "optim.lr=1e-9", "--set", "optim.schedule.warmup_steps=0", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-4000:]
    tags = client.get_run(run_id_of(out.stderr)).data.tags
    assert tags["temper.init_from"] == f"runs:/{parent_id}" and tags["temper.parent_run_id"] == parent_id
    before = _export(Path(client.get_run(parent_id).data.tags["temper.checkpoint_dir"]), tmp_path / "b")
    after = _export(Path(tags["temper.checkpoint_dir"]), tmp_path / "a")
    conv = "blocks.0.conv1.weight"
    assert torch.allclose(before[conv], after[conv], atol=1e-6)  # lr 1e-9: one step barely moves it


@pytest.mark.parametrize(("job", "sets", "message"), [
    (TINY_RESNET, ["model.base_width=16"], "does not fit model"),
    (TINY_GPT, [], "it holds a resnet model, but model.kind is gpt"),
])
def test_a_backbone_that_does_not_fit_fails_before_any_run(tmp_path, mlflow_server, client, pretrained,
                                                           job, sets, message) -> None:
    parent_id, _ = pretrained
    experiment = f"finetune-bad-{len(sets)}"
    args = [a for s in sets for a in ("--set", s)]
    out = temper("run", job, *ONE, "--set", f"tracking.uri={mlflow_server.uri}", "--set",
                 f"tracking.experiment={experiment}", "--set", f"init_from=runs:/{parent_id}", *args, cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-3000:]
    assert message in out.stderr and "Traceback" not in out.stderr
    if "does not fit" in message:
        assert "base_width 8 there vs 16 here" in out.stderr
    assert client.get_experiment_by_name(experiment) is None or not client.search_runs(
        [client.get_experiment_by_name(experiment).experiment_id])


def test_pipeline_runs_stages_as_nested_runs_with_a_report(tmp_path, mlflow_server, client) -> None:
    (tmp_path / "p.yaml").write_text(textwrap.dedent(f"""\
        name: ci-pipe
        experiment: ci-pipeline
        set: {{resources.workers: 1, tracking.uri: "{mlflow_server.uri}", train.max_steps: 4,
               train.eval_every: 0}}
        stages:
          - {{name: pretrain, job: {TINY_RESNET}}}
          - name: probe
            job: {TINY_RESNET}
            init_from: pretrain
            freeze_backbone: true
            sweep: {{seed: [0, 1], train.micro_batch_size: [4, 8]}}
        report: {{x: train.micro_batch_size, metric: val/acc}}
        """))
    out = temper("pipeline", "p.yaml", "--launcher", "inprocess", cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    experiment = client.get_experiment_by_name("ci-pipeline")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 6 and len(children) == 5
    pretrain = next(r for r in children if r.data.tags["temper.pipeline.stage"] == "pretrain")
    probes = [r for r in children if r.data.tags["temper.pipeline.stage"] == "probe"]
    assert {r.data.tags["temper.parent_run_id"] for r in probes} == {pretrain.info.run_id}
    assert {r.data.tags["temper.pipeline.sweep"] for r in probes} == {
        json.dumps({"seed": s, "train.micro_batch_size": b}) for s in (0, 1) for b in (4, 8)}
    assert {"report/probe/val_acc/4/mean", "report/probe/val_acc/8/std"} <= set(parent.data.metrics)
    names = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert {"pipeline.yaml", "label_fraction.md", "label_fraction.json", "label_fraction.png"} <= names
    assert "| probe |" in out.stdout + out.stderr
