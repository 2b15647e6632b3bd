"""Deterministic initialization that does not depend on how the model is sharded.

Every parameter is generated in full on the CPU from a generator seeded by
(seed, parameter name), by the model's own rule (`model.init_parameter`), and each rank
copies in the part it holds. So DDP, FSDP, ZeRO and tensor parallel start from bit-identical
weights, and peak extra memory is one full parameter (the largest), never the model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Protocol

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from temper.errors import TemperError


class InitWeights(Protocol):
    """Tensors to start from instead of the init rule where name and shape match (init_from;
    checkpoint/weights.py's PretrainedWeights is one)."""

    shapes: Mapping[str, tuple[int, ...]]

    def get(self, name: str) -> torch.Tensor: ...

    def load_shards(self, targets: Mapping[str, DTensor]) -> bool:
        """Fill each DTensor with its own shard only, reading just those chunks (a DCP
        checkpoint: one collective load); False when this source cannot (read in full)."""
        ...


_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def param_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed that depends only on the job seed and the parameter name."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def clean_name(name: str) -> str:
    """The parameter's name in the bare model (wrapper prefixes removed)."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def is_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in (*model.parameters(), *model.buffers()))


def _pretrained(weights: InitWeights | None, name: str, shape) -> torch.Tensor | None:
    """The pretrained tensor for `name` when `weights` (init_from) has it at this shape."""
    if weights is None or tuple(weights.shapes.get(name, ())) != tuple(shape):
        return None
    return weights.get(name)


def _init_rule(model: nn.Module):
    init = getattr(model, "init_parameter", None)
    if init is None:
        raise TemperError(
            f"{type(model).__name__} has no init_parameter(name, tensor, generator=...); "
            "models built on the meta device need one"
        )
    return init


@torch.no_grad()
def initial_tensor(model: nn.Module, name: str, shape, *, seed: int,
                   weights: InitWeights | None = None) -> torch.Tensor:
    """The full float32 CPU tensor parameter `name` (bare-model name, global `shape`) starts
    from: `weights`' tensor where it has one of this shape (init_from), else the model's own
    rule from a generator seeded by (seed, name)."""
    full = _pretrained(weights, name, shape)
    if full is None:
        full = torch.empty(tuple(shape), dtype=torch.float32)  # a DTensor's shape is global
        _init_rule(model)(name, full, generator=torch.Generator().manual_seed(param_seed(seed, name)))
    return full


def apply_buffer_init(model: nn.Module, *, weights: InitWeights | None = None) -> None:
    """Reset BatchNorm statistics; `weights` (init_from) supplies the buffers it has."""
    for module in model.modules():
        if hasattr(module, "reset_running_stats"):  # BatchNorm statistics
            module.reset_running_stats()
    if weights is not None:
        for name, buffer in model.named_buffers():
            loaded = _pretrained(weights, clean_name(name), buffer.shape)
            if loaded is not None:
                buffer.copy_(loaded.to(buffer.dtype))


@torch.no_grad()
def apply_deterministic_init(model: nn.Module, *, seed: int, weights: InitWeights | None = None) -> None:
    """Initialize every parameter (full or a DTensor shard) from (seed, name); reset buffers.
    `weights` (InitWeights, for init_from) supplies the tensors it has at
    the same name and shape instead, buffers (BatchNorm statistics) included."""
    _init_rule(model)
    sharded = _load_shards(model, weights)
    for name, param in model.named_parameters():  # tied parameters are listed once
        if clean_name(name) in sharded:
            continue
        full = initial_tensor(model, clean_name(name), param.shape, seed=seed, weights=weights)
        if isinstance(param, DTensor):
            local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
            param.to_local().copy_(local.to_local())
        else:
            param.copy_(full)
    apply_buffer_init(model, weights=weights)


def _load_shards(model: nn.Module, weights: InitWeights | None) -> set[str]:
    """init_from into DTensor parameters (FSDP, FSDP x TP): every rank reads only its own
    shards, in one collective load, where the source can; the names it filled."""
    if weights is None or not hasattr(weights, "load_shards"):
        return set()
    targets = {}
    for name, param in model.named_parameters():
        name = clean_name(name)
        if isinstance(param, DTensor) and tuple(weights.shapes.get(name, ())) == tuple(param.shape):
            targets[name] = param.detach()  # shares the local shard's storage
    if targets and weights.load_shards(targets):
        return set(targets)
    return set()


def materialize(model: nn.Module, *, device: torch.device, seed: int, weights: InitWeights | None = None) -> None:
    """Allocate a meta-device model (already sharded, if it is) on `device` and initialize it
    (from `weights` where they have a tensor: init_from).

    A model that already holds real tensors keeps its weights. On the meta device there is
    nothing to allocate or initialize (`temper plan` sizes the model without its values).
    """
    if device.type == "meta":
        return
    if is_meta(model):
        shared = shared_parameters(model)
        model.to_empty(device=device)
        apply_ties(shared)
        apply_deterministic_init(model, seed=seed, weights=weights)


def apply_ties(shared: list[list[tuple[nn.Module, str]]]) -> None:
    """Make every user of a shared parameter (`shared_parameters`, taken before `to_empty`,
    which may give each user its own copy) hold its first user's parameter again."""
    for (owner, attr), *others in shared:
        for module, name in others:
            setattr(module, name, getattr(owner, attr))


def shared_parameters(model: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    """Every parameter used by more than one (module, attribute), e.g. tied embeddings."""
    users: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None:
                users.setdefault(id(param), []).append((module, name))
    return [refs for refs in users.values() if len(refs) > 1]
