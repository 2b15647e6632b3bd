"""Throughput and MFU arithmetic of the loop's PerfMeter."""

from __future__ import annotations

import pytest
import torch

from temper.runtime import perf
from temper.runtime.perf import PerfMeter, peak_flops


def test_peak_flops_table_and_override(monkeypatch) -> None:
    monkeypatch.delenv("TEMPER_PEAK_TFLOPS", raising=False)
    assert peak_flops(torch.device("cpu"), "bf16") is None  # unknown: no MFU metric
    monkeypatch.setenv("TEMPER_PEAK_TFLOPS", "2.5")
    assert peak_flops(torch.device("cpu"), "fp32") == 2.5e12
    names = [name for name, _ in perf._PEAK_TFLOPS]
    assert names.index("H100 PCIe") < names.index("H100")  # the more specific name wins


def test_window_rates_and_mfu(monkeypatch) -> None:
    clock = iter([100.0, 102.0])  # construction, then the window closes 2 s later
    monkeypatch.setattr(perf.time, "perf_counter", lambda: next(clock))
    meter = PerfMeter(device=torch.device("cpu"), world_size=4, flops_per_sample=1e9,
                      peak_flops_per_device=1e12)
    for _ in range(5):
        meter.tick(samples=8, tokens=8 * 64)
    out = meter.window()
    assert out["perf/step_time_s"] == pytest.approx(2.0 / 5)
    assert out["perf/samples_per_s"] == pytest.approx(5 * 8 * 4 / 2.0)
    assert out["perf/tokens_per_s"] == pytest.approx(5 * 8 * 64 * 4 / 2.0)
    # 160 samples x 1 GFLOP in 2 s = 80 GFLOP/s over 4 devices of 1 TFLOP/s = 2%.
    assert out["perf/mfu"] == pytest.approx(0.02)


def test_no_tokens_no_mfu_without_peak() -> None:
    meter = PerfMeter(device=torch.device("cpu"), world_size=1, flops_per_sample=1e9,
                      peak_flops_per_device=None)
    meter.tick(samples=4, tokens=0)
    out = meter.window()
    assert "perf/tokens_per_s" not in out and "perf/mfu" not in out
