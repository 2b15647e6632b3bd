"""GPU tier: bf16 FSDP and ZeRO-3 train the tiny GPT on one GPU and track the fp32 loss.

Skipped without CUDA (never in CI; not yet run: no GPU was available when written).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from temper.spec import load_spec, spec_to_json

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _train(strategy: str, precision: str):
    from temper.runtime.entry import run_worker

    spec = load_spec("jobs/ci/tiny-gpt.yaml", [
        "resources.workers=1", "resources.gpus_per_worker=1", "train.device=cuda",
        f"strategy={strategy}", f"train.precision={precision}", "tracking.enabled=false",
        "train.max_steps=40", "train.log_every=5",
    ])
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"})
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    return run_worker(spec_to_json(spec), None)


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed_zero3"])
def test_bf16_strategy_tracks_fp32_on_gpu(strategy: str) -> None:
    fp32 = _train(strategy, "fp32")
    bf16 = _train(strategy, "bf16")
    assert bf16.loss_history[-1][1] < 0.8 * bf16.loss_history[0][1]
    for (_, a), (_, b) in zip(fp32.loss_history, bf16.loss_history, strict=True):
        assert math.isfinite(b) and b == pytest.approx(a, rel=0.05)  # bf16: ~3 significant digits
