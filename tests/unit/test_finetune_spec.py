"""init_from, pipeline files and the pretrained-weights matcher, without training."""

from __future__ import annotations

import textwrap

import pytest
import torch
from safetensors.torch import save_file

from temper.checkpoint.weights import compare, open_weights
from temper.errors import SpecError, TemperError
from temper.models import build_model
from temper.models.init import apply_deterministic_init
from temper.spec import load_spec
from temper.spec.job import ClassifySpec, JobSpec, ResNetSpec, SimCLRSpec
from temper.spec.pipeline import load_pipeline


def job(**extra) -> JobSpec:
    return JobSpec.model_validate({"name": "x", "model": {"kind": "resnet", "flavor": "tiny"}, **extra})


@pytest.mark.parametrize(("source", "kind"), [
    ("runs:/0a1b2c", "run"), ("models:/backbone@current", "model"), ("models:/backbone/3", "model"),
    ("temper-runs/x/abc", "checkpoint"), ("s3://bucket/runs/abc/step-000000100", "checkpoint"),
])
def test_init_from_accepts_three_forms_and_a_shorthand(source, kind) -> None:
    spec = job(init_from=source)
    assert spec.init_from.source == source and spec.init_from.kind == kind
    assert not spec.init_from.freeze_backbone


@pytest.mark.parametrize("source", ["models:/backbone", "models:/a/b/c", "runs:/"])
def test_init_from_rejects_malformed_references(tmp_path, source) -> None:
    path = tmp_path / "j.yaml"
    path.write_text(f"name: x\nmodel: {{kind: resnet}}\ninit_from: '{source}'\n")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert "init_from" in info.value.problems[0]


def _export_folder(tmp_path, model, spec_dict):
    import json

    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model": spec_dict, "source": {"run_id": "r1", "step": 7}}))
    return open_weights(str(tmp_path))


def test_compare_loads_the_backbone_adds_the_head_and_ignores_the_projection(tmp_path) -> None:
    spec = ResNetSpec(flavor="tiny", in_channels=1, image_size=8)
    pre = build_model(spec, objective=SimCLRSpec())
    weights = _export_folder(tmp_path, pre, spec.model_dump(mode="json"))
    match = compare(weights, model_spec=spec, objective=ClassifySpec(), source="x")
    assert set(match.new) == {"heads.classify.weight", "heads.classify.bias"}
    assert match.ignored and all(n.startswith("heads.proj.") for n in match.ignored)
    assert not any(n.startswith("heads.") for n in match.loaded)
    assert weights.run_id == "r1" and weights.step == 7

    # the strategies' init path copies every loaded tensor, buffers included
    with torch.no_grad():
        pre.blocks[0].bn1.running_mean.fill_(0.5)
    weights = _export_folder(tmp_path, pre, spec.model_dump(mode="json"))
    fine = build_model(spec, objective=ClassifySpec())
    apply_deterministic_init(fine, seed=3, weights=weights)
    for name, tensor in pre.state_dict().items():
        if not name.startswith("heads."):
            assert torch.equal(fine.state_dict()[name], tensor), name
    assert torch.equal(fine.blocks[0].bn1.running_mean, torch.full_like(fine.blocks[0].bn1.running_mean, 0.5))


def test_compare_names_the_sizes_that_differ(tmp_path) -> None:
    small = ResNetSpec(flavor="tiny", base_width=8)
    weights = _export_folder(tmp_path, build_model(small), small.model_dump(mode="json"))
    with pytest.raises(TemperError, match="base_width 8 there vs 16 here"):
        compare(weights, model_spec=ResNetSpec(flavor="tiny"), objective=ClassifySpec(), source="x")


def test_freeze_backbone_leaves_only_heads_trainable_and_norms_in_eval() -> None:
    model = build_model(ResNetSpec(flavor="tiny"), objective=ClassifySpec())
    trainable = model.freeze_backbone()
    assert trainable == sum(p.numel() for p in model.heads.parameters())
    assert all(p.requires_grad == n.startswith("heads.") for n, p in model.named_parameters())
    model.train()
    assert not model.blocks[0].bn1.training and model.heads.training


def _pipeline(tmp_path, body: str):
    path = tmp_path / "p.yaml"
    path.write_text(textwrap.dedent(body))
    return path


def test_pipeline_file_validates_stage_references(tmp_path) -> None:
    ok = load_pipeline(_pipeline(tmp_path, """\
        name: p
        stages:
          - {name: pre, job: a.yaml}
          - {name: ft, job: b.yaml, init_from: pre, sweep: {"seed,data.subset.seed": [0, 1], data.subset.fraction: [0.1, 1.0]}}
        report: {x: data.subset.fraction}
        """))
    assert len(ok.stages[1].combinations()) == 4 and ok.experiment_name == "p"
    for body, message in [
        ("stages: [{name: ft, job: b.yaml, init_from: pre}]", "'pre' is not an earlier stage"),
        ("stages: [{name: a, job: a.yaml}, {name: a, job: b.yaml}]", "two stages are named 'a'"),
        ("stages: [{name: a, job: a.yaml, sweep: {seed: [0, 1]}}, {name: b, job: b.yaml, init_from: a}]",
         "stage 'a' sweeps"),
        ("stages: [{name: a, job: a.yaml, freeze_backbone: true}]", "freeze_backbone needs init_from"),
        ("stages: [{name: a, job: a.yaml}]\nreport: {x: seed}", "report.x: no stage sweeps 'seed'"),
    ]:
        with pytest.raises(SpecError) as info:
            load_pipeline(_pipeline(tmp_path, f"name: p\n{body}\n"))
        assert message in info.value.problems[0], info.value.problems
