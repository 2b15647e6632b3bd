"""Pipeline parallelism through the real loop on 2 gloo ranks vs the 1-process reference.

One 2-rank spawn trains every schedule (gpipe, 1f1b, interleaved_1f1b with 2 virtual stages
per rank) 20 steps with clipping active, an interrupted-and-resumed 1f1b run, GPT with tied
embeddings and the encoder's MLM; one 1-rank spawn computes the references and resumes a
pp=2 checkpoint on one rank; one 4-rank spawn runs the 3-D compositions, resumes the pp=2
checkpoint on pp=2 x dp=2 and starts a job from it (init_from). fp32 on CPU: the pipeline
changes only the order of float32 reductions (micro-batch gradient sums).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.distributed.spawn import StopAt, run_ranks

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[2]
REL = 1e-5  # loss, every step, relative to the 1-process reference
STEPS = 20
INIT_STEPS = 2  # the init_from job
BASE = ["tracking.enabled=false", f"train.max_steps={STEPS}", "train.log_every=2", "train.eval_every=10",
        "data.eval_samples=16", "optim.grad_clip=0.5", "model.n_layer=4", "model.tie_embeddings=false",
        "checkpoint.every_steps=0"]
PP = ["resources.workers=2", "strategy.pipeline_parallel=2", "strategy.pipeline_microbatches=4"]
SCHEDULES = {"gpipe": ["strategy.pipeline_schedule=gpipe"], "1f1b": ["strategy.pipeline_schedule=1f1b"],
             "interleaved_1f1b": ["strategy.pipeline_schedule=interleaved_1f1b", "strategy.stages_per_rank=2"]}


#: Tied input/output embeddings (the last stage's copy of tok_emb, gradients summed with the
#: first stage's): GPT with tie_embeddings (interleaved: stages 0 and 3 on ranks 0 and 1) and
#: the BERT-style encoder's MLM (4 micro-batches of 2 on both sides: MLM's loss is a mean over
#: each micro-batch's masked positions, so the reference accumulates the same 4 micro-batches).
TIED = ["model.tie_embeddings=true"]
MLM = ["model.kind=encoder", "objective.kind=mlm", "train.micro_batch_size=2", "train.grad_accum=4"]


def _spec(extra: list[str]) -> str:
    from temper.spec.loader import load_spec, spec_to_json

    base = [b for b in BASE if "model.kind=encoder" not in extra or "tie_embeddings" not in b]
    return spec_to_json(load_spec(str(ROOT / "jobs" / "ci" / "tiny-gpt.yaml"), base + extra))


def _train(jobs: list[tuple[str, str, str | None, list[int | None]]]) -> dict:
    """On each rank: train every (name, spec, checkpoint folder, stops) in segments."""
    from temper.dist import build_dist_context
    from temper.run_info import RunInfo
    from temper.runtime.loop import train
    from temper.spec.loader import spec_from_json

    ctx = build_dist_context(device="cpu")
    out = {}
    try:
        for name, spec_json, folder, stops in jobs:
            segments = []
            for stop in stops:
                r = train(spec_from_json(spec_json), ctx, run_info=RunInfo(checkpoint_dir=folder),
                          reporter=StopAt(stop))
                segments.append((r.resumed_from, r.steps, r.loss_history, r.metrics))
            out[name] = segments
    finally:
        ctx.close()
    return out


def _weights(folder: str, tmp: Path, *, step: int = STEPS) -> dict[str, torch.Tensor]:
    """`temper export` of the run's final checkpoint (model.safetensors)."""
    from safetensors.torch import load_file

    from temper.checkpoint import export_checkpoint, find_latest

    ckpt = find_latest(folder)
    assert ckpt is not None and ckpt.manifest.step == step
    out = tmp / f"export-{Path(folder).name}"
    export_checkpoint(ckpt.path, str(out))
    return load_file(str(out / "model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict, dict, Path]:
    tmp = tmp_path_factory.mktemp("pipeline")
    jobs = [(name, _spec(PP + extra), None, [None]) for name, extra in SCHEDULES.items()]
    ckpt = ["checkpoint.async_save=false"]
    jobs += [("straight", _spec(PP + ckpt), str(tmp / "straight"), [None]),
             ("twice", _spec(PP + ckpt), str(tmp / "twice"), [10, None]),
             ("then-1", _spec(PP + ckpt), str(tmp / "then-1"), [10]),
             ("tied", _spec(PP + TIED + SCHEDULES["interleaved_1f1b"]), None, [None]),
             ("mlm", _spec(PP + MLM), None, [None])]
    two = run_ranks(_train, 2, jobs)
    shutil.copytree(tmp / "then-1", tmp / "then-4")  # the step-10 checkpoint, resumed on 4 ranks too
    one = run_ranks(_train, 1, [("ref", _spec(["resources.workers=1"]), None, [None]),
                                ("then-1", _spec(["resources.workers=1", *ckpt]), str(tmp / "then-1"), [None]),
                                ("ref-tied", _spec(["resources.workers=1", *TIED]), None, [None]),
                                ("ref-mlm", _spec(["resources.workers=1", *MLM]), None, [None])])[0]
    return two, one, tmp


@pytest.mark.parametrize(("schedule", "reference"), [*((s, "ref") for s in SCHEDULES),
                                                     ("tied", "ref-tied"), ("mlm", "ref-mlm")])
def test_schedule_equals_reference(runs, schedule: str, reference: str) -> None:
    two, one, _ = runs
    (ref,) = one[reference]
    for rank in two:  # every rank logs the last stage's loss (the window's one all-gather)
        (got,) = rank[schedule]
        assert [s for s, _ in got[2]] == [s for s, _ in ref[2]] and len(ref[2]) == STEPS // 2
        for (_, x), (_, y) in zip(ref[2], got[2], strict=True):
            assert y == pytest.approx(x, rel=REL)
        # Clipping needs the global norm: the stages' norms summed over the pipeline.
        assert got[3]["train/grad_norm"] == pytest.approx(ref[3]["train/grad_norm"], rel=1e-4)
        assert got[3]["val/loss"] == pytest.approx(ref[3]["val/loss"], rel=REL)


def test_resume_at_same_layout_is_exact(runs) -> None:
    two, _, tmp = runs
    (straight,) = two[0]["straight"]
    first, second = two[0]["twice"]
    assert (first[0], first[1]) == (None, 10) and second[:2] == (10, STEPS)
    assert first[2] + second[2] == straight[2]
    a, b = _weights(str(tmp / "straight"), tmp), _weights(str(tmp / "twice"), tmp)
    assert a.keys() == b.keys() and "tok_emb.weight" in a and "blocks.3.mlp.fc.weight" in a  # original names
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_pp2_on_one_rank(runs) -> None:
    """pp=2 to step 10, then one plain DDP rank to the end: the same curve and weights up to
    float32 reduction order (stated: rel 1e-5 on the loss; atol 1e-4 on the weights: AdamW
    at lr 1e-2 normalizes each element's update, so reduction-order noise in a near-zero
    gradient moves that element by up to ~lr x its relative noise per step)."""
    two, one, tmp = runs
    (straight,) = two[0]["straight"]
    (resumed,) = one["then-1"]
    assert resumed[:2] == (10, STEPS)
    for (s1, x), (s2, y) in zip(straight[2][5:], resumed[2], strict=True):
        assert s1 == s2 and y == pytest.approx(x, rel=REL)
    a, b = _weights(str(tmp / "straight"), tmp), _weights(str(tmp / "then-1"), tmp)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def four_rank_runs(runs) -> tuple[dict, dict, Path]:
    """On 4 ranks, in one spawn: pp=2 x FSDP dp=2, pp=2 x TP 2 (DDP kind), tied GPT at
    pp=2 x FSDP 2 and at pp=4, the pp=2 step-10
    checkpoint resumed on pp=2 x DDP dp=2, and a pp=2 x dp=2 job whose init_from is the
    pp=2 run's final checkpoint (lr 1e-9: its weights stay where init_from put them)."""
    tmp = runs[2]
    pp2_dp2 = ["resources.workers=4", "strategy.pipeline_parallel=2", "strategy.pipeline_microbatches=4",
               "train.micro_batch_size=4", "checkpoint.async_save=false"]  # the same global batch (8)
    jobs = [("pp2_fsdp2", _spec(["resources.workers=4", "strategy.kind=fsdp", "strategy.pipeline_parallel=2",
                                 "strategy.pipeline_microbatches=4", "train.micro_batch_size=4"]), None, [None]),
            ("pp2_tp2", _spec(["resources.workers=4", "strategy.tensor_parallel=2", "strategy.pipeline_parallel=2",
                               "strategy.pipeline_microbatches=4"]), None, [None]),
            ("pp2_fsdp2_tied", _spec(["resources.workers=4", "strategy.kind=fsdp", "strategy.pipeline_parallel=2",
                                      "strategy.pipeline_microbatches=4", "train.micro_batch_size=4", *TIED]),
             None, [None]),
            # 4 stages: the tied embedding's gradient group is ranks 0 and 3, not the pp group
            ("pp4_tied", _spec(["resources.workers=4", "strategy.pipeline_parallel=4",
                                "strategy.pipeline_microbatches=4", *TIED]), None, [None]),
            ("then-4", _spec(pp2_dp2), str(tmp / "then-4"), [None]),
            ("init", _spec([*pp2_dp2, f"init_from={tmp / 'straight'}", f"train.max_steps={INIT_STEPS}",
                            f"train.eval_every={INIT_STEPS}", "optim.lr=1e-9"]), str(tmp / "init"), [None])]
    return run_ranks(_train, 4, jobs), runs[1], tmp


@pytest.mark.parametrize(("case", "reference"), [("pp2_fsdp2", "ref"), ("pp2_tp2", "ref"),
                                                 ("pp2_fsdp2_tied", "ref-tied"), ("pp4_tied", "ref-tied")])
def test_3d_compositions_equal_reference(four_rank_runs, case: str, reference: str) -> None:
    four, one, _ = four_rank_runs
    (ref,) = one[reference]
    for rank in four:
        (got,) = rank[case]
        assert [s for s, _ in got[2]] == [s for s, _ in ref[2]]
        for (_, x), (_, y) in zip(ref[2], got[2], strict=True):
            assert y == pytest.approx(x, rel=REL)
        assert got[3]["train/grad_norm"] == pytest.approx(ref[3]["train/grad_norm"], rel=1e-4)


def test_resume_pp2_on_pp2_x_dp2(runs, four_rank_runs) -> None:
    """pp=2 to step 10, then pp=2 x DDP dp=2 (4 ranks, DCP reshards the stages' checkpoint
    onto replicated chunks) to the end: the tolerances of test_resume_pp2_on_one_rank."""
    four, _, tmp = four_rank_runs
    (straight,) = runs[0][0]["straight"]
    for rank in four:
        (resumed,) = rank["then-4"]
        assert resumed[:2] == (10, STEPS)
        for (s1, x), (s2, y) in zip(straight[2][5:], resumed[2], strict=True):
            assert s1 == s2 and y == pytest.approx(x, rel=REL)
    a, b = _weights(str(tmp / "straight"), tmp), _weights(str(tmp / "then-4"), tmp)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-4, rtol=1e-4)


def test_export_of_a_pipelined_checkpoint_is_the_full_model(runs, four_rank_runs) -> None:
    """The export of the pp=2 run is the bare model's state (its names, shapes, no stage
    prefixes), tensor for tensor what DCP itself reads back from the stages' shards; a
    pp=2 x dp=2 job with init_from that checkpoint starts from exactly those weights (lr
    1e-9 for 2 steps moves no weight by more than 1e-8) and scores the same val/loss."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from temper.checkpoint import find_latest
    from temper.models import build_model
    from temper.spec.loader import spec_from_json

    four, _, tmp = four_rank_runs
    exported = _weights(str(tmp / "straight"), tmp)
    spec = spec_from_json(_spec(PP))
    with torch.device("meta"):
        bare = build_model(spec.model, objective=spec.objective).state_dict()
    assert {k: tuple(v.shape) for k, v in exported.items()} == {k: tuple(v.shape) for k, v in bare.items()}
    dcp_to_torch_save(find_latest(str(tmp / "straight")).path, str(tmp / "straight.pt"))
    saved = torch.load(str(tmp / "straight.pt"), weights_only=False)["model"]
    for key, tensor in exported.items():
        assert torch.equal(tensor, saved[key]), key
    started = _weights(str(tmp / "init"), tmp, step=INIT_STEPS)
    for key, tensor in exported.items():
        torch.testing.assert_close(started[key], tensor, atol=1e-8, rtol=0)
    for rank in four:
        (init,) = rank["init"]
        assert init[3]["val/loss"] == pytest.approx(runs[0][0]["straight"][0][3]["val/loss"], rel=REL)

