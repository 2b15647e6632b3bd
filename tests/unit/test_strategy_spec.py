"""strategy: presets, options, and every impossible combination rejected with field + fix."""

from __future__ import annotations

import sys

import pytest

from temper.errors import MissingDependencyError, SpecError
from temper.spec import load_spec

GPT = "jobs/ci/tiny-gpt.yaml"  # workers: 2, n_head: 2
RESNET = "jobs/ci/tiny-resnet.yaml"


def problems(job: str, sets: list[str]) -> list[str]:
    with pytest.raises(SpecError) as info:
        load_spec(job, sets)
    return info.value.problems


def test_bare_preset_name_expands() -> None:
    s = load_spec(GPT, ["strategy=deepspeed_zero3_offload"]).strategy
    assert (s.kind, s.stage, s.offload_optimizer, s.offload_params) == ("deepspeed", 3, True, True)


def test_preset_keys_can_be_overridden() -> None:
    s = load_spec(GPT, ["strategy.preset=fsdp_offload", "strategy.reshard_after_forward=false"]).strategy
    assert (s.kind, s.cpu_offload, s.reshard_after_forward) == ("fsdp", True, False)
    s = load_spec(GPT, ["strategy=deepspeed_zero3", "strategy.offload_params=true"]).strategy
    assert s.stage == 3 and s.offload_params and not s.offload_optimizer


def test_every_preset_validates() -> None:
    from temper.spec.strategy import STRATEGY_PRESETS

    for name, preset in STRATEGY_PRESETS.items():
        assert load_spec(GPT, [f"strategy={name}"]).strategy.kind == preset["kind"]


def test_tensor_parallel_shrinks_the_global_batch() -> None:
    spec = load_spec(GPT, ["strategy=fsdp", "strategy.tensor_parallel=2"])
    assert spec.global_batch_size == spec.train.micro_batch_size  # 2 workers = 1 replica x 2


@pytest.mark.parametrize(("job", "sets", "expected"), [
    (GPT, ["strategy=fsdp_ofload"],
     "strategy: 'fsdp_ofload' is not a preset (did you mean 'fsdp_offload'?); accepted: ddp, fsdp, "
     "fsdp_offload, deepspeed_zero1, deepspeed_zero2, deepspeed_zero3, deepspeed_zero3_offload"),
    (GPT, ["resources.workers=3", "strategy.kind=fsdp", "strategy.tensor_parallel=2"],
     "strategy.tensor_parallel=2 does not divide resources.workers=3; pick a tensor_parallel "
     "that divides resources.workers"),
    (GPT, ["resources.workers=4", "model.n_head=1", "strategy.tensor_parallel=2"],
     "strategy.tensor_parallel=2 does not divide model.n_head=1; pick a tensor_parallel that "
     "divides model.n_head"),
    (GPT, ["strategy.kind=deepspeed", "strategy.tensor_parallel=2"],
     "strategy: tensor_parallel: DeepSpeed ZeRO does not compose with DTensor tensor "
     "parallelism; use strategy.kind=fsdp with tensor_parallel, or drop tensor_parallel"),
    (GPT, ["strategy.cpu_offload=true"],
     "strategy: cpu_offload: offload needs a sharded strategy (DDP keeps a full replica per "
     "rank); use strategy: fsdp_offload or strategy: deepspeed_zero3_offload"),
    (GPT, ["strategy.kind=ddp", "strategy.offload_optimizer=true"],
     "strategy: offload_optimizer: offload needs a sharded strategy (DDP keeps a full replica "
     "per rank); use strategy: fsdp_offload or strategy: deepspeed_zero3_offload"),
    (RESNET, ["strategy.kind=fsdp", "strategy.tensor_parallel=2"],
     "strategy.tensor_parallel=2 needs a transformer; model.kind 'resnet' has no tensor-parallel "
     "plan (accepted: gpt): set strategy.tensor_parallel=1"),
    (GPT, ["strategy=deepspeed_zero2", "strategy.offload_params=true"],
     "strategy: offload_params: only ZeRO stage 3 partitions parameters (got stage=2); set "
     "strategy.stage=3 or strategy.offload_params=false"),
])
def test_impossible_combinations_are_rejected(job: str, sets: list[str], expected: str) -> None:
    lines = problems(job, sets)
    assert len(lines) == 1 and lines[0].split(": ", 1)[1] == expected


def test_validate_prints_one_line(capfd: pytest.CaptureFixture) -> None:
    from temper.cli import main

    code = main(["validate", GPT, "--set", "strategy.kind=deepspeed", "--set", "strategy.tensor_parallel=2"])
    captured = capfd.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: ") and lines[0].endswith(
        "strategy: tensor_parallel: DeepSpeed ZeRO does not compose with DTensor "
        "tensor parallelism; use strategy.kind=fsdp with tensor_parallel, or drop tensor_parallel")


def test_deepspeed_config_ours_wins_and_warns() -> None:
    from temper.strategies.deepspeed_config import build_deepspeed_config

    spec = load_spec(GPT, ["strategy=deepspeed_zero2", "train.grad_accum=4",
                           "strategy.config={zero_optimization: {stage: 3, overlap_comm: true}, "
                           "gradient_accumulation_steps: 4, fp16: {enabled: false}}"])
    warnings: list[str] = []
    config = build_deepspeed_config(spec.strategy, job=spec, warn=lambda m, *a: warnings.append(m % a))
    d = spec.model.d_model  # bucket sized to the model's width
    assert config["zero_optimization"] == {"stage": 2, "overlap_comm": True, "reduce_bucket_size": d * d}
    assert config["fp16"] == {"enabled": False} and config["gradient_accumulation_steps"] == 4
    assert config["train_micro_batch_size_per_gpu"] == spec.train.micro_batch_size
    assert config["gradient_clipping"] == spec.optim.grad_clip
    assert warnings == ["strategy.config.zero_optimization.stage=3 is overridden by Temper's value 2 "
                        "(set it through the job spec's own keys instead)"]  # equal values: silent


def test_zero_buckets_are_sized_to_the_model_unless_the_config_sets_them() -> None:
    from temper.strategies.deepspeed_config import build_deepspeed_config

    spec = load_spec(GPT, ["strategy=deepspeed_zero3", "model.d_model=640", "model.n_head=10",
                           "strategy.config={zero_optimization: {reduce_bucket_size: 1000}}"])
    zero = build_deepspeed_config(spec.strategy, job=spec)["zero_optimization"]
    assert zero == {"stage": 3, "memory_efficient_linear": False, "reduce_bucket_size": 1000,
                    "stage3_prefetch_bucket_size": 368640, "stage3_param_persistence_threshold": 6400}
    resnet = load_spec("jobs/ci/tiny-resnet.yaml", ["strategy=deepspeed_zero3"])
    assert "reduce_bucket_size" not in build_deepspeed_config(resnet.strategy, job=resnet)["zero_optimization"]
    zero1 = load_spec(GPT, ["strategy=deepspeed_zero1"])
    assert "reduce_bucket_size" not in build_deepspeed_config(zero1.strategy, job=zero1)["zero_optimization"]


def test_missing_deepspeed_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from temper.strategies.deepspeed import import_deepspeed

    monkeypatch.setitem(sys.modules, "deepspeed", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'temper\[deepspeed\]'"):
        import_deepspeed(device=torch.device("cpu"))
