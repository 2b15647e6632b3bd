"""temper.checkpoint on real gloo ranks: every strategy saves and loads its own sharded state,
and DCP checkpoints reshard (2 ranks FSDP -> 1 rank DDP, 1 rank DDP -> 2 ranks FSDP).

Two spawns in all: one 2-rank spawn runs every 2-rank case in one process group (DDP, FSDP,
TP=2, FSDP x TP, async FSDP, DeepSpeed ZeRO-2, and loading a 1-process checkpoint written
here into FSDP); one 1-rank spawn loads the 2-rank FSDP checkpoint into DDP. A checkpoint
stores tensors bit for bit: every comparison is torch.equal (no tolerance).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from temper.spec import load_spec
from tests.distributed.spawn import run_ranks
from tests.fixtures.steps import flat_state, train_steps

pytestmark = pytest.mark.distributed

BASE = ["tracking.enabled=false", "train.micro_batch_size=4"]
CASES = {  # name -> overrides for 2 ranks; each case saves after 3 steps and loads into a fresh build
    "ddp": [],
    "fsdp": ["strategy=fsdp"],
    "tp2": ["strategy.tensor_parallel=2"],
    "fsdp_x_tp": ["strategy=fsdp", "strategy.tensor_parallel=2"],
}


def _build(overrides: list[str], *, ctx, workers: int):
    from temper.models import build_model
    from temper.runtime.optim import build_optimizer
    from temper.strategies import build_strategy

    spec = load_spec("jobs/ci/tiny-gpt.yaml", [*BASE, f"resources.workers={workers}", *overrides])
    strategy = build_strategy(spec, ctx=ctx)
    with torch.device("meta"):
        model = build_model(spec.model)
    strategy.setup(model, build_optimizer=lambda m: build_optimizer(m, spec.optim))
    return spec, strategy


def _local(strategy) -> dict:
    """This rank's model + optimizer state (local shards), detached copies."""
    from torch.distributed.tensor import DTensor

    out = {}
    for key, value in flat_state(strategy.checkpoint_state()).items():
        if isinstance(value, DTensor):
            value = value.to_local()
        out[key] = value.detach().clone() if isinstance(value, torch.Tensor) else value
    return out


def _full(strategy) -> dict:
    """The whole (unsharded) model + optimizer state; collective under FSDP/TP."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
            for k, v in flat_state(strategy.checkpoint_state()).items() if isinstance(v, torch.Tensor)}


def _mismatches(a: dict, b: dict) -> list[str]:
    if a.keys() != b.keys():
        return [f"keys differ: {sorted(a.keys() ^ b.keys())[:5]}"]
    return [k for k, v in a.items()
            if not (torch.equal(v, b[k]) if isinstance(v, torch.Tensor) else v == b[k])]


def _deepspeed_state(strategy) -> dict:
    """ZeRO-2: replicated module parameters, this rank's fp32 master partitions and their
    Adam state."""
    zero = strategy.engine.optimizer
    out = {f"param.{n}": p.detach().clone() for n, p in strategy.engine.module.named_parameters()}
    for i, master in enumerate(zero.single_partition_of_fp32_groups):
        out[f"master.{i}"] = master.detach().clone()
        for key, value in zero.optimizer.state.get(master, {}).items():
            out[f"adam.{i}.{key}"] = value.detach().clone()
    return out


def _save(ckpt, strategy, step: int, spec) -> float:
    rank = ckpt.ctx.rank
    return ckpt.save(step=step, strategy=strategy, spec_hash="h", run_id="r", data={"step": step},
                     rank_state={"rank": rank, "rng": torch.get_rng_state()},
                     extra={"model": spec.model.model_dump()}, mesh={"dp": strategy.data_world_size})


def _round_trip(root: Path, name: str, overrides: list[str], *, ctx) -> dict:
    from temper.checkpoint import Checkpointer

    spec, a = _build(overrides, ctx=ctx, workers=2)
    train_steps(spec, a, 3)
    ckpt = Checkpointer(run_dir=str(root / name), ctx=ctx)
    _save(ckpt, a, 3, spec)
    found = ckpt.latest()
    _, b = _build(overrides, ctx=ctx, workers=2)
    for group in b.optimizer.param_groups:  # non-tensor state must come back too
        group["lr"] = 0.5
    before = _mismatches(_local(a), _local(b))
    loaded = ckpt.load(found, strategy=b)
    out = {"step": found.manifest.step, "differed": bool(before), "rank_state": loaded.rank_state["rank"],
           "mismatch": _mismatches(_local(a), _local(b)), "files": sorted(found.manifest.files)}
    if name == "fsdp":
        out["full"] = _full(a)
    for s in (a, b):
        s.close()
    ckpt.close()
    return out


def _async_fsdp(root: Path, *, ctx) -> dict:
    """Step 2 is written in the background while step 3 trains: the files hold step 2."""
    from temper.checkpoint import Checkpointer, read_checkpoint

    spec, a = _build(["strategy=fsdp"], ctx=ctx, workers=2)
    ckpt = Checkpointer(run_dir=str(root / "async"), ctx=ctx, async_save=True)
    train_steps(spec, a, 2)
    at2 = _local(a)
    blocked = _save(ckpt, a, 2, spec)
    train_steps(spec, a, 1, seed=7)  # changes parameters while step 2 may still be writing
    _save(ckpt, a, 3, spec)  # commits step 2 first
    committed_2 = (root / "async" / "step-000000002" / "COMMITTED").exists()
    ckpt.wait()
    latest = ckpt.latest()
    _, b = _build(["strategy=fsdp"], ctx=ctx, workers=2)
    ckpt.load(read_checkpoint(str(root / "async" / "step-000000002")), strategy=b)
    mismatch_2 = _mismatches(at2, _local(b))
    ckpt.load(latest, strategy=b)
    out = {"blocked": blocked, "committed_2": committed_2, "latest": latest.manifest.step,
           "mismatch_2": mismatch_2, "mismatch_3": _mismatches(_local(a), _local(b))}
    for s in (a, b):
        s.close()
    ckpt.close()
    return out


def _one_process_into_fsdp(source: str, *, ctx) -> dict:
    """A checkpoint written by one process (DDP, world 1) loads into 2-rank FSDP."""
    from temper.checkpoint import Checkpointer, find_latest

    _, b = _build(["strategy=fsdp"], ctx=ctx, workers=2)
    loaded = Checkpointer(run_dir=source, ctx=ctx).load(find_latest(source), strategy=b)
    out = {"full": _full(b), "rank_state": loaded.rank_state, "rank0": loaded.rank0_state["rank"]}
    b.close()
    return out


def _zero2(root: Path, *, ctx) -> dict:
    from temper.checkpoint import Checkpointer, export_checkpoint

    overrides = ["strategy=deepspeed_zero2"]
    spec, a = _build(overrides, ctx=ctx, workers=2)
    train_steps(spec, a, 2)
    ckpt = Checkpointer(run_dir=str(root / "zero2"), ctx=ctx)
    _save(ckpt, a, 2, spec)
    found = ckpt.latest()
    _, b = _build(overrides, ctx=ctx, workers=2)
    before = _mismatches(_deepspeed_state(a), _deepspeed_state(b))
    ckpt.load(found, strategy=b)
    out = {"differed": bool(before), "mismatch": _mismatches(_deepspeed_state(a), _deepspeed_state(b)),
           "engine": found.manifest.engine, "files": sorted(found.manifest.files)}
    if ctx.rank == 0:
        from safetensors.torch import load_file

        exported = load_file(str(export_checkpoint(found.path, str(root / "zero2-export")) / "model.safetensors"))
        out["export_mismatch"] = _mismatches(exported, a.unwrap().state_dict())
    for s in (a, b):
        s.close()
    ckpt.close()
    return out


def _two_ranks(root: str, one_process_ckpt: str) -> dict:
    from temper.dist import build_dist_context

    torch.manual_seed(0)
    ctx = build_dist_context(device="cpu")
    out: dict = {}
    try:
        for name, overrides in CASES.items():
            out[name] = _round_trip(Path(root), name, overrides, ctx=ctx)
        out["async"] = _async_fsdp(Path(root), ctx=ctx)
        out["from_one_process"] = _one_process_into_fsdp(one_process_ckpt, ctx=ctx)
        out["zero2"] = _zero2(Path(root), ctx=ctx)
    finally:
        ctx.close()
    if ctx.rank != 0:  # the full tensors are checked once, from rank 0
        out["fsdp"].pop("full", None)
        out["from_one_process"].pop("full", None)
    return out


def _fsdp_into_one_rank_ddp(run_dir: str) -> dict:
    from temper.checkpoint import Checkpointer
    from temper.dist import build_dist_context

    ctx = build_dist_context(device="cpu")
    try:
        ckpt = Checkpointer(run_dir=run_dir, ctx=ctx)
        _, ddp = _build([], ctx=ctx, workers=1)
        loaded = ckpt.load(ckpt.latest(), strategy=ddp)
        out = {"full": _full(ddp), "rank_state": loaded.rank_state["rank"],
               "weights": {k: v.detach().clone() for k, v in ddp.unwrap().state_dict().items()}}
        ddp.close()
    finally:
        ctx.close()
    return out


def _one_process_checkpoint(run_dir: Path) -> dict:
    """Written here, in the test process without a process group (DDP at world size 1)."""
    from temper.checkpoint import Checkpointer
    from temper.dist import DistContext

    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
    spec, strategy = _build([], ctx=ctx, workers=1)
    train_steps(spec, strategy, 2, seed=3)
    _save(Checkpointer(run_dir=str(run_dir), ctx=ctx), strategy, 2, spec)
    return _full(strategy)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("ckpt")
    one_process_full = _one_process_checkpoint(root / "one-process")
    two = run_ranks(_two_ranks, 2, str(root), str(root / "one-process"))
    one = run_ranks(_fsdp_into_one_rank_ddp, 1, str(root / "fsdp"))[0]
    return {"root": root, "two": two, "one": one, "one_process_full": one_process_full}


@pytest.mark.parametrize("name", list(CASES))
def test_two_rank_save_then_load_into_a_fresh_strategy_is_exact(runs, name):
    for rank, result in enumerate(runs["two"]):
        case = result[name]
        assert case["differed"]  # a fresh build differs, so equality after loading means something
        assert case["mismatch"] == [], (rank, case["mismatch"][:5])
        assert case["step"] == 3 and case["rank_state"] == rank
        assert case["files"] == [".metadata", "__0_0.distcp", "__1_0.distcp", "rank-00000.pt", "rank-00001.pt"]


def test_fsdp_checkpoint_loads_into_one_rank_ddp(runs):
    fsdp_full, ddp_full = runs["two"][0]["fsdp"]["full"], runs["one"]["full"]
    assert ddp_full.keys() == fsdp_full.keys() and any(".exp_avg" in k for k in ddp_full)
    for key, tensor in fsdp_full.items():
        assert torch.equal(ddp_full[key], tensor), key
    assert runs["one"]["rank_state"] == 0


def test_export_of_fsdp_checkpoint_equals_ddp_gathered_weights(runs, tmp_path):
    """Export runs here, in one process without a process group."""
    from safetensors.torch import load_file

    from temper.checkpoint import export_checkpoint

    out = export_checkpoint(str(runs["root"] / "fsdp"), str(tmp_path / "export"))
    exported = load_file(str(out / "model.safetensors"))
    weights = runs["one"]["weights"]
    assert exported.keys() == weights.keys()
    for name, tensor in weights.items():
        assert torch.equal(exported[name], tensor), name


def test_one_process_checkpoint_loads_into_two_rank_fsdp(runs):
    expected = runs["one_process_full"]
    got = runs["two"][0]["from_one_process"]["full"]
    assert got.keys() == expected.keys()
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key
    assert runs["two"][1]["from_one_process"]["rank_state"] is None  # rank 1 did not exist then
    assert all(r["from_one_process"]["rank0"] == 0 for r in runs["two"])


def test_async_save_commits_and_loads_identically(runs):
    for result in runs["two"]:
        case = result["async"]
        assert case["committed_2"] and case["latest"] == 3 and case["blocked"] > 0
        assert case["mismatch_2"] == [] and case["mismatch_3"] == []


def test_deepspeed_zero2_round_trip(runs):
    for result in runs["two"]:
        case = result["zero2"]
        assert case["engine"] == "deepspeed" and case["differed"] and case["mismatch"] == []
        assert "rank-00001.pt" in case["files"] and any(f.startswith("deepspeed/") for f in case["files"])
    assert runs["two"][0]["zero2"]["export_mismatch"] == []
