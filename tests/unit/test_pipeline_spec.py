"""strategy.pipeline_*: the keys, the split, and every refused combination in one line (exit 2)."""

from __future__ import annotations

import pytest

from temper.errors import SpecError
from temper.spec import load_spec
from temper.strategies.pipeline_split import apply_stage_pruning, split_layers, stage_ranges

GPT = "jobs/ci/tiny-gpt.yaml"  # workers: 2, n_layer: 1
RESNET = "jobs/ci/tiny-resnet.yaml"
PP = ["strategy.pipeline_parallel=2", "strategy.pipeline_microbatches=4", "model.n_layer=2",
      "model.tie_embeddings=false"]


def problems(job: str, sets: list[str]) -> list[str]:
    with pytest.raises(SpecError) as info:
        load_spec(job, sets)
    return info.value.problems


def test_pipeline_keys_validate_and_default_off() -> None:
    s = load_spec(GPT, [*PP, "strategy.kind=fsdp", "strategy.pipeline_schedule=gpipe"])
    assert (s.strategy.pipeline_parallel, s.strategy.pipeline_schedule, s.strategy.pipeline_microbatches) == (2, "gpipe", 4)
    assert s.global_batch_size == 8  # dp = 2 workers / pp 2
    assert load_spec(GPT).strategy.pipeline_parallel == 1


@pytest.mark.parametrize(("job", "sets", "expected"), [
    (RESNET, ["strategy.pipeline_parallel=2", "strategy.pipeline_microbatches=2"],
     "strategy.pipeline_parallel=2 needs a model with a layer stack; model.kind 'resnet' has none "
     "(accepted: gpt, encoder): set strategy.pipeline_parallel=1"),
    (GPT, [*PP, "model.n_layer=1"], "strategy.pipeline_parallel x stages_per_rank = 2 stages is more than "
     "model.n_layer=1 layers; use fewer stages or more layers"),
    (GPT, [*PP, "strategy.pipeline_microbatches=3"], "strategy.pipeline_microbatches=3 does not divide the "
     "per-rank batch (train.micro_batch_size x grad_accum = 8); pick a divisor"),
    (GPT, [*PP, "resources.workers=3"], "strategy.pipeline_parallel x tensor_parallel = 2 does not divide "
     "resources.workers=3; pick sizes whose product divides the workers"),
    (GPT, [*PP, "strategy.pipeline_layers=[1, 2]"], "strategy.pipeline_layers [1, 2] must give every stage "
     ">= 1 block and sum to model.n_layer=2"),
])
def test_refused_combinations(job: str, sets: list[str], expected: str) -> None:
    lines = problems(job, sets)
    assert len(lines) == 1 and lines[0].endswith(expected), lines


@pytest.mark.parametrize(("sets", "expected"), [
    (["strategy=deepspeed_zero2", "strategy.pipeline_parallel=2"],
     "pipeline_parallel: DeepSpeed ZeRO does not compose with Temper's pipeline (torch.distributed.pipelining); "
     "use strategy.kind=fsdp with pipeline_parallel"),
    ([*PP, "strategy.pipeline_schedule=interleaved_1f1b"], "strategy.stages_per_rank: interleaved_1f1b needs >= 2 "
     "virtual stages per rank; set strategy.stages_per_rank=2 or pipeline_schedule=1f1b"),
    ([*PP, "strategy.stages_per_rank=2"], "strategy.stages_per_rank=2 needs pipeline_schedule=interleaved_1f1b; "
     "set strategy.stages_per_rank=1"),
    ([*PP, "strategy.pipeline_microbatches=1"], "strategy.pipeline_microbatches=1 is below pipeline_parallel=2; "
     "set pipeline_microbatches >= 2"),
])
def test_refused_strategy_shapes(sets: list[str], expected: str) -> None:
    lines = problems(GPT, sets)
    assert len(lines) == 1 and lines[0].endswith(expected), lines


def test_validate_exits_2_with_one_line(capfd: pytest.CaptureFixture) -> None:
    from temper.cli import main

    code = main(["validate", GPT, "--set", "strategy=deepspeed_zero1", "--set", "strategy.pipeline_parallel=2"])
    captured = capfd.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "DeepSpeed ZeRO does not compose" in lines[0], lines


def test_balanced_split_weighs_embedding_and_head_as_layers() -> None:
    assert split_layers(n_layer=8, stages=4) == [1, 3, 3, 1]  # 10 units: 3, 3 middle, 2 + 2 ends
    assert split_layers(n_layer=6, stages=2) == [3, 3]
    assert split_layers(n_layer=4, stages=4) == [1, 1, 1, 1]
    assert split_layers(n_layer=5, stages=2, explicit=[4, 1]) == [4, 1]
    assert [list(r) for r in stage_ranges([1, 3])] == [[0], [1, 2, 3]]


def test_pruning_keeps_original_names() -> None:
    import torch

    from temper.models import build_model

    spec = load_spec(GPT, [*PP, "model.n_layer=4"])
    with torch.device("meta"):
        full = build_model(spec.model, objective=spec.objective)
        names = set(dict(full.named_parameters()))
        first = build_model(spec.model, objective=spec.objective)
        last = build_model(spec.model, objective=spec.objective)
    apply_stage_pruning(first, blocks=[0, 1], first=True, last=False)
    apply_stage_pruning(last, blocks=[2, 3], first=False, last=True)
    a, b = set(dict(first.named_parameters())), set(dict(last.named_parameters()))
    assert a | b == names and not a & b
    assert "tok_emb.weight" in a and "blocks.3.mlp.fc.weight" in b and "head.weight" in b


@pytest.mark.parametrize(("sets", "head"), [
    (["model.tie_embeddings=true"], "head"),
    (["model.kind=encoder", "objective.kind=mlm"], "heads.mlm.decoder"),
], ids=["gpt-tied", "encoder-mlm"])
def test_tied_embedding_is_kept_on_the_last_stage_too(sets: list[str], head: str) -> None:
    """Tied input/output embeddings: the last stage keeps its own copy of the token embedding
    (the same name, still tied to its head there); the first stage has no head."""
    import torch

    from temper.models import build_model

    spec = load_spec(GPT, [*PP[:3], *sets])  # pp=2, n_layer=2
    with torch.device("meta"):
        first, last = (build_model(spec.model, objective=spec.objective) for _ in range(2))
    apply_stage_pruning(first, blocks=[0], first=True, last=False)
    apply_stage_pruning(last, blocks=[1], first=False, last=True)
    a, b = dict(first.named_parameters()), dict(last.named_parameters())
    assert set(a) & set(b) == {"tok_emb.weight"}  # the one parameter both stages hold
    assert last.get_submodule(head).weight is last.tok_emb.weight and "pos_emb.weight" not in b
    assert not any(name.startswith("head") for name in a)


def test_gpt_7b_3d_recipe_validates() -> None:
    spec = load_spec("jobs/scale/gpt-7b-3d.yaml")
    s = spec.strategy
    assert (s.kind, s.pipeline_parallel, s.tensor_parallel) == ("fsdp", 4, 8)
    assert spec.resources.workers == spec.cluster.workers * spec.cluster.worker.gpus == 128
    assert spec.resources.workers // (s.pipeline_parallel * s.tensor_parallel) == 4  # FSDP over 4
    assert spec.global_batch_size * spec.model.seq_len == 4 * 64 * 2048
