"""`temper plan` for a pipelined job: every pipeline rank is planned with its own stages'
parameters (the real PipelineStrategy.setup on a fake process group, meta device) and the
activations its schedule keeps in flight; the plan shown is the fullest rank's."""

from __future__ import annotations

import pytest
import torch

from temper.cli import main
from temper.models import build_model
from temper.runtime.activations import estimate_activations, pipeline_activations
from temper.runtime.plan import build_plan, pipeline_plans
from temper.spec import load_spec

GPT = "jobs/ci/tiny-gpt.yaml"  # vocab 64, d_model 32, seq_len 16, micro_batch_size 8
PP = ["resources.workers=2", "strategy.pipeline_parallel=2", "strategy.pipeline_microbatches=8",
      "model.n_layer=4"]


def _elements(spec, prefix: tuple[str, ...]) -> int:
    with torch.device("meta"):
        model = build_model(spec.model, objective=spec.objective)
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))


@pytest.mark.parametrize("tied", [False, True])
def test_each_pipeline_rank_holds_its_own_stages(tied: bool) -> None:
    spec = load_spec(GPT, [*PP, f"model.tie_embeddings={str(tied).lower()}"])
    plans = pipeline_plans(spec, common=_common(spec))
    first, last = (p.memory for p in plans)
    assert [p.pipeline_rank for p in plans] == [0, 1] and [p.rank for p in plans] == [0, 1]
    # split_layers(4, 2) = [2, 2]: rank 0 the embeddings and blocks 0-1, rank 1 blocks 2-3 and the head
    assert first.params == 4 * _elements(spec, ("tok_emb", "pos_emb", "blocks.0.", "blocks.1."))
    head = ("blocks.2.", "blocks.3.", "ln_f", "head") + (("tok_emb",) if tied else ())
    assert last.params == 4 * _elements(spec, head)  # tied: the last stage's copy of tok_emb
    for m in (first, last):
        assert m.grads == m.params and m.optim == 2 * m.params  # AdamW: exp_avg, exp_avg_sq
    assert plans[0].buffers == plans[1].buffers == 0  # DDP kind at dp 1: no gradient buckets


def test_activations_follow_the_schedule() -> None:
    """In flight on rank r of p with m micro-batches: gpipe m, 1f1b p - r, interleaved (v=2)
    (v - 1) p + 2 (p - 1 - r) + 1 stage-micro-batches of half the rank's blocks; gpipe's
    ranks together hold what the job without a pipeline holds for one micro_batch_size."""
    def saved(schedule: list[str], rank: int) -> int:
        return pipeline_activations(load_spec(GPT, [*PP, *schedule]), pipeline_rank=rank).saved

    gpipe = [saved(["strategy.pipeline_schedule=gpipe"], r) for r in (0, 1)]
    f1b = [saved([], r) for r in (0, 1)]
    inter = saved(["strategy.pipeline_schedule=interleaved_1f1b", "strategy.stages_per_rank=2"], 0)
    assert gpipe[0] == pytest.approx(4 * f1b[0], rel=1e-6)  # m / (p - 0) = 8 / 2
    assert inter == pytest.approx(1.25 * f1b[0], rel=1e-6)  # (2 + 2 + 1) / 2 = 2.5 vs 2
    plain = estimate_activations(load_spec(GPT, ["resources.workers=1", "model.n_layer=4"]))
    assert sum(gpipe) == pytest.approx(plain.saved, rel=1e-6)
    assert f1b[1] < gpipe[1] / 7  # the last rank: one micro-batch (plus the head's) of eight


def test_plan_shows_the_fullest_pipeline_rank(capsys) -> None:
    spec = load_spec(GPT, PP)
    best = max(pipeline_plans(spec, common=_common(spec)), key=lambda p: p.total)
    plan = build_plan(spec)
    assert (plan.pipeline_rank, plan.rank, plan.total) == (best.pipeline_rank, best.rank, best.total)
    assert main(["plan", GPT, *(a for s in PP for a in ("--set", s)), "--gpu", "l4"]) == 0
    err = capsys.readouterr().err
    assert f"per rank (rank {best.rank}, pipeline rank {best.pipeline_rank} of 2: the fullest stage):" in err
    assert "fits" in err


def _common(spec) -> dict:
    return dict(spec=spec, activations=None, gpu=None, mfu=0.4, flops_per_step=None)
