"""temper.checkpoint in one process (no process group): the tiny GPT under the DDP strategy
at world size 1, saved with DCP to a temp dir or to a real moto S3 server.

Exactness: a checkpoint stores the tensors bit for bit, so every restored model and optimizer
tensor must be torch.equal to the saved one (no tolerance).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import uuid
from pathlib import Path

import pytest
import torch

from temper.checkpoint import (
    Checkpointer,
    CheckpointManifest,
    export_checkpoint,
    find_latest,
    read_checkpoint,
)
from temper.dist import DistContext
from temper.errors import TemperError
from temper.models import build_model
from temper.runtime.optim import build_optimizer
from temper.spec import load_spec
from temper.strategies import build_strategy
from tests.fixtures.steps import flat_state, train_steps

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CTX = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")


def _build(extra: tuple[str, ...] = ()):
    spec = load_spec("jobs/ci/tiny-gpt.yaml", ["tracking.enabled=false", "resources.workers=1", *extra])
    strategy = build_strategy(spec, ctx=CTX)
    with torch.device("meta"):
        model = build_model(spec.model)
    strategy.setup(model, build_optimizer=lambda m: build_optimizer(m, spec.optim))
    return spec, strategy


def _assert_same_state(a, b) -> None:
    fa, fb = flat_state(a.checkpoint_state()), flat_state(b.checkpoint_state())
    assert fa.keys() == fb.keys()
    for key, va in fa.items():
        if isinstance(va, torch.Tensor):
            assert torch.equal(va, fb[key]), key
        else:
            assert va == fb[key], key


def _differs(a, b) -> bool:
    fa, fb = flat_state(a.checkpoint_state()), flat_state(b.checkpoint_state())
    return any(isinstance(v, torch.Tensor) and not torch.equal(v, fb[k]) for k, v in fa.items())


def _save(ckpt: Checkpointer, strategy, step: int, *, spec=None, rank_state=None) -> float:
    extra = {"model": spec.model.model_dump()} if spec is not None else None
    return ckpt.save(step=step, strategy=strategy, spec_hash="abc123", run_id="run-1",
                     data={"epoch": 0, "consumed": step * 4}, rank_state=rank_state or {"step": step},
                     extra=extra)


@pytest.fixture(scope="module")
def trained():
    spec, strategy = _build()
    train_steps(spec, strategy, 3)
    return spec, strategy


def _steps(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.name.startswith("step-"))


def test_round_trip_restores_model_optimizer_and_rank_state(tmp_path, trained):
    spec, strategy = trained
    rng = torch.get_rng_state()
    ckpt = Checkpointer(run_dir=str(tmp_path), ctx=CTX)
    blocked = _save(ckpt, strategy, 3, spec=spec, rank_state={"rng": rng, "note": "r0"})
    assert blocked > 0
    step_dir = tmp_path / "step-000000003"
    names = sorted(os.listdir(step_dir))
    assert names == [".metadata", "COMMITTED", "__0_0.distcp", "manifest.json", "rank-00000.pt"]
    _, fresh = _build()
    for group in fresh.optimizer.param_groups:  # non-tensor state too (the schedule sets lr)
        group["lr"] = 0.5
    assert _differs(strategy, fresh)  # the comparison below can fail
    found = ckpt.latest()
    assert found is not None and found.path == str(step_dir) and found.manifest.step == 3
    loaded = ckpt.load(found, strategy=fresh)
    _assert_same_state(strategy, fresh)
    assert loaded.step == 3 and loaded.rank_state["note"] == "r0"
    assert torch.equal(loaded.rank_state["rng"], rng) and loaded.rank0_state["note"] == "r0"
    m = loaded.manifest
    assert (m.engine, m.world_size, m.spec_hash, m.run_id) == ("dcp", 1, "abc123", "run-1")
    assert m.data == {"epoch": 0, "consumed": 12} and m.extra["model"]["d_model"] == 32
    assert m.files == {n: (step_dir / n).stat().st_size for n in names if n not in ("COMMITTED", "manifest.json")}
    assert (step_dir / "COMMITTED").read_text() == __import__("hashlib").sha256(
        (step_dir / "manifest.json").read_bytes()).hexdigest()
    assert CheckpointManifest.from_json(m.to_json()) == m
    assert find_latest(str(tmp_path)) == found == read_checkpoint(str(step_dir))
    ckpt.close()


def test_keep_last_deletes_older_checkpoints(tmp_path, trained):
    _, strategy = trained
    ckpt = Checkpointer(run_dir=str(tmp_path), ctx=CTX, keep_last=2)
    for step in (1, 2, 3, 4):
        _save(ckpt, strategy, step)
    assert _steps(tmp_path) == ["step-000000003", "step-000000004"]
    with pytest.raises(TemperError, match="keep_last=0"):
        Checkpointer(run_dir=str(tmp_path), ctx=CTX, keep_last=0)


def test_partial_directories_are_ignored_and_older_ones_cleaned(tmp_path, trained):
    _, strategy = trained
    for step in (2, 9):  # saves that died before their marker
        (tmp_path / f"step-00000000{step}").mkdir()
        (tmp_path / f"step-00000000{step}" / "__0_0.distcp").write_bytes(b"half")
    ckpt = Checkpointer(run_dir=str(tmp_path), ctx=CTX)
    assert ckpt.latest() is None
    _save(ckpt, strategy, 5)
    assert ckpt.latest().manifest.step == 5  # the newer partial step 9 is ignored
    assert _steps(tmp_path) == ["step-000000005", "step-000000009"]  # older partial removed


def test_crash_before_the_marker_falls_back_to_the_previous_checkpoint(tmp_path, trained):
    _, strategy = trained
    ckpt = Checkpointer(run_dir=str(tmp_path), ctx=CTX)
    _save(ckpt, strategy, 1)
    _save(ckpt, strategy, 2)
    (tmp_path / "step-000000002" / "COMMITTED").unlink()  # data files complete, marker never written
    assert ckpt.latest().manifest.step == 1


@pytest.mark.parametrize("damage", ["truncate", "zero", "delete", "marker"])
def test_damaged_newest_checkpoint_warns_and_falls_back(tmp_path, trained, caplog, damage):
    _, strategy = trained
    ckpt = Checkpointer(run_dir=str(tmp_path), ctx=CTX)
    _save(ckpt, strategy, 1)
    _save(ckpt, strategy, 2)
    newest = tmp_path / "step-000000002"
    shard = newest / "__0_0.distcp"
    if damage == "truncate":
        os.truncate(shard, shard.stat().st_size // 2)
    elif damage == "zero":
        os.truncate(newest / "rank-00000.pt", 0)
    elif damage == "delete":
        (newest / ".metadata").unlink()
    else:
        (newest / "COMMITTED").write_text("0" * 64)
    caplog.set_level(logging.WARNING, logger="temper.checkpoint")
    assert ckpt.latest().manifest.step == 1
    expected = {"truncate": "__0_0.distcp is", "zero": "rank-00000.pt is empty (0 bytes)",
                "delete": ".metadata is missing", "marker": "COMMITTED does not match"}[damage]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "step-000000002" in warnings[0] and expected in warnings[0]
    with pytest.raises(TemperError, match="not a usable checkpoint"):
        read_checkpoint(str(newest))


def test_all_damaged_gives_none(tmp_path, trained, caplog):
    _, strategy = trained
    ckpt = Checkpointer(run_dir=str(tmp_path), ctx=CTX)
    for step in (1, 2):
        _save(ckpt, strategy, step)
        os.truncate(tmp_path / f"step-00000000{step}" / "__0_0.distcp", 10)
    caplog.set_level(logging.WARNING, logger="temper.checkpoint")
    assert ckpt.latest() is None
    assert sum("is damaged" in r.getMessage() for r in caplog.records) == 2
    assert find_latest(str(tmp_path / "does-not-exist")) is None


def test_saving_the_same_step_twice_replaces_it(tmp_path, trained):
    spec, strategy = trained
    ckpt = Checkpointer(run_dir=str(tmp_path), ctx=CTX)
    _save(ckpt, strategy, 4, rank_state={"v": 1})
    (tmp_path / "step-000000004" / "stale.bin").write_bytes(b"from an earlier world size")
    _save(ckpt, strategy, 4, rank_state={"v": 2})
    found = ckpt.latest()
    assert found.manifest.step == 4 and "stale.bin" not in found.manifest.files
    _, fresh = _build()
    assert ckpt.load(found, strategy=fresh).rank_state == {"v": 2}
    _assert_same_state(strategy, fresh)


def test_bad_manifest_and_engine_mismatch_are_temper_errors(tmp_path, trained):
    spec, strategy = trained
    ckpt = Checkpointer(run_dir=str(tmp_path), ctx=CTX)
    _save(ckpt, strategy, 1)
    found = ckpt.latest()
    # A DeepSpeed checkpoint offered to a DCP strategy, and the reverse.
    ds_found = dataclasses.replace(found, manifest=dataclasses.replace(found.manifest, engine="deepspeed"))
    with pytest.raises(TemperError, match="written by the deepspeed engine.*strategy.kind=ddp"):
        ckpt.load(ds_found, strategy=strategy)
    ds_spec = load_spec("jobs/ci/tiny-gpt.yaml", ["resources.workers=1", "strategy=deepspeed_zero2"])
    deepspeed = build_strategy(ds_spec, ctx=CTX)  # not set up: the checks come first
    with pytest.raises(TemperError, match="written by the dcp engine.*strategy.kind=deepspeed"):
        ckpt.load(found, strategy=deepspeed)
    two_ranks = dataclasses.replace(ds_found, manifest=dataclasses.replace(ds_found.manifest, world_size=2))
    with pytest.raises(TemperError, match="resources.workers=2"):
        ckpt.load(two_ranks, strategy=deepspeed)
    with pytest.raises(TemperError, match=r"checkpoint.dir=s3://b/run is remote.*shared"):
        Checkpointer(run_dir="s3://b/run", ctx=CTX).save(
            step=1, strategy=deepspeed, spec_hash="x", run_id=None, data=None, rank_state={})
    # A manifest that is not one (its marker matches it, so only the content is wrong).
    step_dir = tmp_path / "step-000000001"
    for text, why in [("{not json", "not JSON"), (json.dumps({"step": 1}), "missing"),
                      (found.manifest.to_json().replace('"dcp"', '"tensorflow"'), "engine")]:
        (step_dir / "manifest.json").write_text(text)
        (step_dir / "COMMITTED").write_text(__import__("hashlib").sha256(text.encode()).hexdigest())
        with pytest.raises(TemperError, match=f"not a temper checkpoint manifest: {why}"):
            CheckpointManifest.from_json(text)
        with pytest.raises(TemperError, match="not a usable checkpoint"):
            read_checkpoint(str(step_dir))
    with pytest.raises(TemperError, match="newer than this temper reads"):
        CheckpointManifest.from_json(found.manifest.to_json().replace('"format_version": 1', '"format_version": 99'))


def test_loading_into_a_changed_model_is_a_temper_error(tmp_path, trained):
    _, strategy = trained
    ckpt = Checkpointer(run_dir=str(tmp_path), ctx=CTX)
    _save(ckpt, strategy, 1)
    _, wider = _build(("model.d_model=64",))
    with pytest.raises(TemperError, match=r"Size mismatch.*resume with the spec it was saved with"):
        ckpt.load(ckpt.latest(), strategy=wider)


def test_export_writes_the_bare_model_weights(tmp_path, trained):
    from safetensors.torch import load_file

    spec, strategy = trained
    ckpt = Checkpointer(run_dir=str(tmp_path / "run"), ctx=CTX)
    _save(ckpt, strategy, 3, spec=spec)
    out = export_checkpoint(str(tmp_path / "run"), str(tmp_path / "export"))  # a run dir: its latest
    weights = load_file(str(out / "model.safetensors"))
    expected = strategy.unwrap().state_dict()
    assert weights.keys() == expected.keys() and "head.weight" in weights  # tied: both names
    for name, tensor in expected.items():
        assert weights[name].dtype == torch.float32 and torch.equal(weights[name], tensor), name
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == spec.model.model_dump()
    assert config["source"] == {"checkpoint": str(tmp_path / "run" / "step-000000003"), "step": 3,
                                "run_id": "run-1", "spec_hash": "abc123"}
    _save(ckpt, strategy, 4)  # no model spec recorded: export needs one
    with pytest.raises(TemperError, match="pass model_spec="):
        export_checkpoint(str(tmp_path / "run" / "step-000000004"), str(tmp_path / "e2"))
    wrong = {**spec.model.model_dump(), "d_model": 64, "n_head": 2}
    with pytest.raises(TemperError, match="the model spec expects"):
        export_checkpoint(str(tmp_path / "run"), str(tmp_path / "e3"), model_spec=wrong)
    with pytest.raises(TemperError, match="holds no committed checkpoint"):
        export_checkpoint(str(tmp_path / "empty"), str(tmp_path / "e4"))


def test_async_save_without_process_group_commits_on_wait(tmp_path, trained):
    spec, strategy = trained
    ckpt = Checkpointer(run_dir=str(tmp_path), ctx=CTX, async_save=True)
    _save(ckpt, strategy, 1)
    _save(ckpt, strategy, 2)  # commits step 1 first
    assert (tmp_path / "step-000000001" / "COMMITTED").exists()
    ckpt.wait()
    found = find_latest(str(tmp_path))
    assert found.manifest.step == 2
    _, fresh = _build()
    ckpt.load(found, strategy=fresh)
    _assert_same_state(strategy, fresh)
    ckpt.close()


def test_s3_round_trip(s3_server, trained, tmp_path):
    spec, strategy = trained
    prefix = f"ckpt-{uuid.uuid4().hex[:8]}"
    run_dir = f"s3://shards/{prefix}"
    options = {"endpoint_url": s3_server.endpoint, "key": "testing", "secret": "testing"}
    ckpt = Checkpointer(run_dir=run_dir, ctx=CTX, keep_last=1, storage_options=options)
    assert ckpt.latest() is None  # nothing under the prefix yet
    _save(ckpt, strategy, 1, spec=spec)
    _save(ckpt, strategy, 2, spec=spec, rank_state={"on": "s3"})
    keys = {o["Key"] for o in s3_server.client().list_objects_v2(Bucket="shards", Prefix=prefix)["Contents"]}
    assert {k.split("/")[1] for k in keys} == {"step-000000002"}  # keep_last=1 pruned step 1
    assert f"{prefix}/step-000000002/COMMITTED" in keys
    found = ckpt.latest()
    assert found.path == f"{run_dir}/step-000000002"
    assert read_checkpoint(found.path, storage_options=options) == found
    _, fresh = _build()
    assert _differs(strategy, fresh)
    assert ckpt.load(found, strategy=fresh).rank_state == {"on": "s3"}
    _assert_same_state(strategy, fresh)
    out = export_checkpoint(run_dir, str(tmp_path / "export"), storage_options=options)
    assert (out / "model.safetensors").stat().st_size > 0
    # A truncated object is detected remotely too.
    client = s3_server.client()
    client.put_object(Bucket="shards", Key=f"{prefix}/step-000000002/__0_0.distcp", Body=b"cut")
    assert ckpt.latest() is None
