"""Optimizers (AdamW, SGD) and learning-rate schedules (constant, linear, cosine; warmup)."""

from __future__ import annotations

import math

import torch
from torch import nn

from temper.spec.job import OptimSpec, ScheduleSpec


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices and convolution kernels; never biases, norms or 1-D parameters."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            ndim = len(getattr(p, "ds_shape", p.shape))  # a ZeRO-3 partition is flat: its full shape
            (decay if ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, spec: OptimSpec) -> torch.optim.Optimizer:
    """AdamW or SGD with `spec.implementation`'s kernel: fused, foreach or for_loop.

    fused updates each tensor in one pass and allocates nothing beyond the optimizer state;
    foreach's batched ops hold about one more copy of the (local) parameters during the step.
    """
    groups = _param_groups(model, spec.weight_decay)
    kernel = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}
    implementation = spec.implementation
    if implementation == "fused" and any(p.device.type == "meta" for p in model.parameters()):
        implementation = "foreach"  # no fused kernel for meta tensors (temper plan): same state
    if spec.kind == "adamw":
        return torch.optim.AdamW(groups, lr=spec.lr, betas=spec.betas, eps=spec.eps,
                                 **kernel[implementation])
    return torch.optim.SGD(groups, lr=spec.lr, momentum=spec.momentum, nesterov=spec.nesterov,
                           **kernel[implementation])


def lr_factor(step: int, *, spec: ScheduleSpec, max_steps: int) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based).

    Warmup rises linearly to 1 over `warmup_steps` (step 0 already takes 1/warmup of the
    peak, so no step is wasted at lr=0); then constant, linear or cosine decay to
    `min_lr_ratio` at the last step.
    """
    if step < spec.warmup_steps:
        return (step + 1) / spec.warmup_steps
    if spec.kind == "constant":
        return 1.0
    span = max(1, max_steps - 1 - spec.warmup_steps)
    progress = min(1.0, (step - spec.warmup_steps) / span)
    floor = spec.min_lr_ratio
    if spec.kind == "linear":
        return floor + (1.0 - floor) * (1.0 - progress)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, *, spec: ScheduleSpec, max_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, spec=spec, max_steps=max_steps)
    )
