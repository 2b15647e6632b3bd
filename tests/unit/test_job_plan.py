"""`temper plan`: the 1B job at 64 ranks on a fake process group, sized from its sharded
tensors; the one-line refusal when it does not fit; DeepSpeed says it is not planned.
(Its accuracy against real ranks: tests/distributed/test_plan_accuracy.py.)"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from temper.cli import main
from temper.runtime.perf import peak_flops_by_name
from temper.runtime.plan import GPUS, RESERVE, build_plan
from temper.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]
GPT_1B = str(ROOT / "jobs" / "scale" / "gpt-1b.yaml")


def _shard(n: int, ranks: int) -> int:
    """FSDP2's dim-0 chunk on rank 0 (the largest): ceil(n / ranks)."""
    return math.ceil(n / ranks)


def test_gpt_1b_at_64_ranks_is_sized_from_its_shards() -> None:
    spec = load_spec(GPT_1B)
    plan = build_plan(spec, gpu="h100-80gb")
    m = spec.model
    d, hidden, dp, tp = m.d_model, 4 * m.d_model, 32, 2
    # rank 0's elements: embeddings sharded over dp only (TP leaves them), each block's
    # colwise weights split by tp on dim 0 then dp, rowwise ones split on dim 1 by tp, dim 0 by dp.
    per_block = (3 * _shard(d // tp, dp) * d + 3 * _shard(d // tp, dp)  # q, k, v
                 + _shard(d, dp) * (d // tp) + _shard(d, dp)  # attn.proj (its bias is replicated over tp)
                 + _shard(hidden // tp, dp) * d + _shard(hidden // tp, dp)  # mlp.fc
                 + _shard(d, dp) * (hidden // tp) + _shard(d, dp)  # mlp.proj
                 + 4 * _shard(d, dp))  # ln1, ln2
    elements = (_shard(m.vocab_size, dp) * d + _shard(m.seq_len, dp) * d + m.n_layer * per_block
                + 2 * _shard(d, dp))
    assert plan.memory.params == 4 * elements  # fp32 master shards
    assert plan.memory.grads == plan.memory.params
    assert plan.memory.optim == 2 * plan.memory.params  # AdamW's exp_avg and exp_avg_sq
    assert plan.total <= GPUS["h100-80gb"].memory * (1 - RESERVE) and plan.problem() is None
    peak = peak_flops_by_name("NVIDIA H100 80GB HBM3", "bf16")
    assert plan.step_time_s == pytest.approx(plan.flops_per_step / (peak * 0.4 * 64), rel=1e-9)
    assert plan.flops_per_step == pytest.approx(256 * 6 * 1.3e9 * 2048, rel=0.25)  # ~6 N T per sample


def test_plan_cli_prints_the_plan_and_refuses_what_does_not_fit(capsys) -> None:
    assert main(["plan", GPT_1B, "--mfu", "0.5"]) == 0  # the GPU comes from cluster.node_selector
    err = capsys.readouterr().err
    assert "64 ranks, strategy fsdp x tensor_parallel 2" in err and "on h100-80gb" in err
    assert "fits" in err and "at 50% MFU:" in err and "h to max_steps=50000" in err
    code = main(["plan", GPT_1B, "--world-size", "8", "--gpu", "a100-40gb",
                 "--set", "strategy.activation_checkpointing=none", "--set", "train.micro_batch_size=32"])
    err = capsys.readouterr().err
    assert code == 2 and "8 ranks" in err and "DOES NOT FIT" in err
    line = [x for x in err.splitlines() if x.startswith("error: ")]
    assert len(line) == 1 and "a100-40gb" in line[0]
    assert "strategy.activation_checkpointing=full" in line[0] and "train.micro_batch_size=16" in line[0]
    assert main(["plan", GPT_1B, "--gpu", "b300"]) == 2
    assert "--gpu 'b300' is not known" in capsys.readouterr().err


def test_deepspeed_is_not_planned_in_one_line(capsys) -> None:
    sets = ["strategy=deepspeed_zero3", "checkpoint.async_save=false", "checkpoint.dir=/tmp/x"]
    assert main(["plan", GPT_1B, *sum((["--set", s] for s in sets), [])]) == 0
    err = capsys.readouterr().err
    assert "not planned for strategy.kind=deepspeed" in err and "at 40% MFU" in err


def test_submit_checks_the_plan_before_contacting_anything(capsys) -> None:
    from temper.dist import free_port

    nobody = f"http://127.0.0.1:{free_port()}"
    too_big = ["--set", "strategy.activation_checkpointing=none", "--set", "train.micro_batch_size=64"]
    assert main(["submit", GPT_1B, *too_big, "--to", nobody]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not fit" in err[0] and "h100-80gb" in err[0] and "--no-plan" in err[0]
    assert main(["submit", GPT_1B, *too_big, "--to", nobody, "--no-plan"]) == 2
    err = capsys.readouterr().err
    assert "does not fit" not in err and nobody in err  # skipped the plan, reached the target


def test_offloaded_shards_are_not_counted_on_the_gpu() -> None:
    tiny = str(ROOT / "jobs" / "ci" / "tiny-gpt.yaml")
    on_gpu = build_plan(load_spec(tiny, ["strategy=fsdp"]), gpu="l4")
    offloaded = build_plan(load_spec(tiny, ["strategy=fsdp_offload"]), gpu="l4")
    assert offloaded.memory == on_gpu.memory and offloaded.memory.total > 0
    assert offloaded.total == on_gpu.total - on_gpu.memory.total


def test_frozen_backbone_holds_gradients_and_state_for_the_heads_only() -> None:
    job, source = str(ROOT / "jobs" / "digits-finetune.yaml"), "init_from.source=/nowhere"
    full = build_plan(load_spec(job, [source, "init_from.freeze_backbone=false"])).memory
    probe = build_plan(load_spec(job, [source, "init_from.freeze_backbone=true"])).memory
    assert probe.params == full.params and full.grads == full.params
    assert 0 < probe.grads < full.grads / 10 and probe.optim == 2 * probe.grads
