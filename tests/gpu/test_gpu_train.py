"""GPU tier: runs only where CUDA is present (`pytest -m gpu tests/gpu`), never in CI.

The worker loop runs in-process (no Ray: the GPU machines cannot install it) on nccl.
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


def _train(precision: str):
    from temper.runtime.entry import run_worker

    spec = load_spec("jobs/ci/tiny-gpt.yaml", [
        "resources.workers=1", "resources.gpus_per_worker=1", "train.device=cuda",
        f"train.precision={precision}", "tracking.enabled=false", "train.max_steps=40",
        "train.log_every=5",
    ])
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"})
    return run_worker(spec_to_json(spec), None)


def test_bf16_on_gpu_tracks_fp32_and_reports_mfu() -> None:
    fp32 = _train("fp32")
    bf16 = _train("bf16")
    assert bf16.loss_history[-1][1] < 0.8 * bf16.loss_history[0][1]
    for (_, a), (_, b) in zip(fp32.loss_history, bf16.loss_history, strict=True):
        assert math.isfinite(b) and b == pytest.approx(a, rel=0.05)
    if "H100" in torch.cuda.get_device_name() or "H200" in torch.cuda.get_device_name():
        assert 0 < bf16.metrics["perf/mfu"] < 1
