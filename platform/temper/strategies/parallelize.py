"""What strategies apply to a bare model, in torchtitan's order: TP, AC, compile, sharding.

Models hold no parallelism code; the tensor-parallel plans for each model class live here.
A model exposes its repeated layers as `model.blocks` (the unit of AC, compile and FSDP).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from temper.dist import DistContext
from temper.models.gpt import GPT


def build_mesh(ctx: DistContext, *, tensor_parallel: int) -> DeviceMesh:
    """A 2-D (dp, tp) mesh over all ranks; tp is the inner (fastest-varying) dimension."""
    dp = ctx.world_size // tensor_parallel
    return init_device_mesh(ctx.device.type, (dp, tensor_parallel), mesh_dim_names=("dp", "tp"))


def _gpt_tensor_parallel(model: GPT, tp_mesh: DeviceMesh) -> None:
    """Megatron-style: q/k/v and mlp.fc column-wise, attn.proj and mlp.proj row-wise, so each
    block does one all-reduce in attention and one in the MLP (forward and backward)."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    plan = {
        "attn.q": ColwiseParallel(), "attn.k": ColwiseParallel(), "attn.v": ColwiseParallel(),
        "attn.proj": RowwiseParallel(), "mlp.fc": ColwiseParallel(), "mlp.proj": RowwiseParallel(),
    }
    for block in model.blocks:
        parallelize_module(block, tp_mesh, plan)


#: Model class -> its tensor-parallel plan. Validation admits TP only for these kinds.
TENSOR_PARALLEL_PLANS: dict[type[nn.Module], Callable[[nn.Module, DeviceMesh], None]] = {
    GPT: _gpt_tensor_parallel,
}


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    plan = TENSOR_PARALLEL_PLANS.get(type(model))
    if plan is None:  # validation rejects this first; a guard for direct callers
        raise TypeError(f"{type(model).__name__} has no tensor-parallel plan")
    plan(model, tp_mesh)


_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
}


def _selective_policy(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """none | full (recompute the whole block) | selective (keep matmul and attention outputs,
    recompute norms, activations and elementwise ops). Composable: parameter names unchanged."""
    if mode == "none":
        return
    from torch.distributed._composable import checkpoint
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    kwargs = {}
    if mode == "selective":
        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _selective_policy)
    for block in model.blocks:
        checkpoint(block, **kwargs)


def apply_compile(model: nn.Module) -> None:
    """torch.compile each block in place (names unchanged; repeated blocks reuse one graph)."""
    for block in model.blocks:
        block.compile()
