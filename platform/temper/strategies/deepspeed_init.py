"""ZeRO-3 models that are never whole on a rank: built partitioned from the meta device.

`apply_partitioned_init` walks the meta model's modules, children before parents; for each
module it allocates its own parameters in full on the CPU, fills them with our deterministic
(seed, name) init (models/init.py: bit-identical to what DDP or FSDP start from) or with
init_from's tensor, and hands the module at once to `deepspeed.zero.Init(module=...)`, which
keeps only this rank's partition of each. So the most a rank holds beyond its partitions is
one module's parameters (the largest: the embedding), never the model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from temper.models.init import InitWeights, apply_buffer_init, clean_name, initial_tensor


@torch.no_grad()
def apply_partitioned_init(model: nn.Module, *, deepspeed: Any, config: dict, device: torch.device,
                           seed: int, weights: InitWeights | None = None) -> None:
    """Allocate, initialize and ZeRO-3-partition a meta-device `model` one module at a time."""
    names = {id(p): clean_name(n) for n, p in model.named_parameters()}  # a tied one: its first name
    users: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for attr, p in module._parameters.items():
            if p is not None:
                users.setdefault(id(p), []).append((module, attr))
    for module in reversed(list(model.modules())):  # every descendant before its ancestors
        fresh = False
        for p in list(module._parameters.values()):
            if p is None or not p.is_meta:
                continue
            full = initial_tensor(model, names[id(p)], p.shape, seed=seed, weights=weights)
            param = nn.Parameter(full.to(device=device, dtype=p.dtype), requires_grad=p.requires_grad)
            for owner, name in users[id(p)]:  # tied weights stay one parameter
                owner._parameters[name] = param
            fresh = True
        if fresh:  # partitions this module's new parameters; those already partitioned are skipped
            deepspeed.zero.Init(module=module, config_dict_or_path=config)
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta:
                module._buffers[name] = torch.empty_like(buf, device=device)
    apply_buffer_init(model, weights=weights)


def gathered_state(model: nn.Module, *, deepspeed: Any) -> dict[str, torch.Tensor]:
    """Every parameter of a ZeRO-3 model in full (bare names), gathered one at a time; for
    tests and small models only (the result is the whole model)."""
    out = {}
    for name, p in model.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            out[clean_name(name)] = p.detach().clone()
    return out
