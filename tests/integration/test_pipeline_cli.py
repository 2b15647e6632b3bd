"""A pipelined job end to end through the `temper` CLI: torchrun (2 ranks) and Ray."""

from __future__ import annotations

import pytest

from tests.fixtures.cli import TINY_GPT, temper

SETS = [a for s in (
    "tracking.enabled=false", "train.max_steps=4", "train.eval_every=2", "checkpoint.every_steps=4",
    "model.n_layer=2", "model.tie_embeddings=false", "strategy.pipeline_parallel=2",
    "strategy.pipeline_microbatches=4") for a in ("--set", s)]


@pytest.mark.parametrize("launcher", ["torchrun", pytest.param("ray", marks=pytest.mark.ray)])
def test_pipelined_run_through_the_cli(tmp_path, request, launcher: str) -> None:
    extra = ("--address", request.getfixturevalue("ray_address")) if launcher == "ray" else ()
    proc = temper("run", TINY_GPT, "--launcher", launcher, *extra, *SETS, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    steps = sorted(p.name for p in tmp_path.glob("temper-runs/*/*/step-*"))
    assert steps == ["step-000000004"], steps  # both stages' shards, committed once
