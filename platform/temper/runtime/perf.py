"""Throughput and MFU bookkeeping for the loop, without a device sync per step."""

from __future__ import annotations

import os
import time

import torch

# Dense peak FLOP/s per device (no sparsity), by substring of torch.cuda.get_device_name().
# fp32 training on these parts runs its matmuls in TF32, so fp32 maps to the TF32 peak.
_PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bf16": 989.4, "fp32": 494.7}),
    ("H100 PCIe", {"bf16": 756.0, "fp32": 378.0}),
    ("H100", {"bf16": 989.4, "fp32": 494.7}),
    ("A100", {"bf16": 312.0, "fp32": 156.0}),
    ("L40S", {"bf16": 362.1, "fp32": 183.0}),
    ("A10G", {"bf16": 70.0, "fp32": 35.0}),
    ("L4", {"bf16": 121.0, "fp32": 60.0}),
]


def peak_flops(device: torch.device, precision: str) -> float | None:
    """Peak FLOP/s of one device for `precision`, or None when unknown.

    $TEMPER_PEAK_TFLOPS overrides the table (e.g. for a CPU or an unlisted GPU).
    """
    override = os.environ.get("TEMPER_PEAK_TFLOPS")
    if override:
        return float(override) * 1e12
    if device.type != "cuda":
        return None
    return peak_flops_by_name(torch.cuda.get_device_name(device), precision)


def peak_flops_by_name(name: str, precision: str) -> float | None:
    """Peak FLOP/s of the GPU named `name` (as CUDA reports it), or None when unknown."""
    for key, table in _PEAK_TFLOPS:
        if key in name:
            return table[precision] * 1e12
    return None


class PerfMeter:
    """Accumulates samples/tokens over a logging window and turns them into rates.

    `tick()` is called once per optimizer step and costs one perf_counter() call; the
    device is synchronized only when `window()` closes a window at a logging step.
    """

    def __init__(
        self,
        *,
        device: torch.device,
        world_size: int,
        flops_per_sample: float | None,
        peak_flops_per_device: float | None,
        replicas: int | None = None,
    ) -> None:
        self.device = device
        self.world_size = world_size  # devices (for MFU)
        self.replicas = replicas or world_size  # data-parallel replicas (TP peers share samples)
        self.flops_per_sample = flops_per_sample
        self.peak = peak_flops_per_device
        self._start = time.perf_counter()
        self._steps = self._samples = self._tokens = 0

    def tick(self, *, samples: int, tokens: int) -> None:
        """Count one optimizer step of this rank's samples and tokens."""
        self._steps += 1
        self._samples += samples
        self._tokens += tokens

    def window(self) -> dict[str, float]:
        """Close the window: per-step time and global rates since the last call."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        elapsed = max(now - self._start, 1e-9)
        steps = max(self._steps, 1)
        samples = self._samples * self.replicas  # every replica processes an equal share
        out = {
            "perf/step_time_s": elapsed / steps,
            "perf/samples_per_s": samples / elapsed,
        }
        if self._tokens:
            out["perf/tokens_per_s"] = self._tokens * self.replicas / elapsed
        if self.flops_per_sample and self.peak:
            achieved = self.flops_per_sample * samples / elapsed
            out["perf/mfu"] = achieved / (self.peak * self.world_size)
        self._start, self._steps, self._samples, self._tokens = now, 0, 0, 0
        return out
