"""What strategies apply to a bare model, in torchtitan's order: TP, AC, compile, sharding.

`apply_model_parallelism` is the one sequence every strategy runs before it shards or wraps
the model (DDP, FSDP, DeepSpeed); the sharding itself is the strategy's own. Models hold no
parallelism code: a model declares its tensor-parallel plan as data
(`TaskModel.tensor_parallel_plan`) and exposes its repeated layers as `model.blocks` (the
unit of TP, AC, compile and FSDP).
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from temper.dist import DistContext
from temper.strategies.pipeline_split import stack_blocks


def build_mesh(ctx: DistContext, *, tensor_parallel: int) -> DeviceMesh:
    """A 2-D (dp, tp) mesh over all ranks; tp is the inner (fastest-varying) dimension.
    A meta-device context (`temper plan`: nothing is allocated) gets a CPU mesh."""
    dp = ctx.world_size // tensor_parallel
    device_type = "cpu" if ctx.device.type == "meta" else ctx.device.type
    return init_device_mesh(device_type, (dp, tensor_parallel), mesh_dim_names=("dp", "tp"))


def apply_model_parallelism(model: nn.Module, *, tp_mesh: DeviceMesh | None,
                            activation_checkpointing: str, compile: bool) -> None:
    """Tensor parallel (when `tp_mesh` is given), then activation checkpointing, then
    torch.compile, each per block and in place (parameter names unchanged)."""
    if tp_mesh is not None:
        apply_tensor_parallel(model, tp_mesh)
    apply_activation_checkpointing(model, activation_checkpointing)
    if compile:
        apply_compile(model)


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Split each block's Linear layers as the model's `tensor_parallel_plan` says."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    plan = getattr(model, "tensor_parallel_plan", None)
    if plan is None:  # validation rejects this first; a guard for direct callers
        raise TypeError(f"{type(model).__name__} has no tensor-parallel plan")
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    for block in stack_blocks(model):
        parallelize_module(block, tp_mesh, {name: styles[style]() for name, style in plan.items()})


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
    for block in stack_blocks(model):
        checkpoint(block, **kwargs)


def apply_compile(model: nn.Module) -> None:
    """torch.compile each block in place (names unchanged; repeated blocks reuse one graph)."""
    for block in stack_blocks(model):
        block.compile()
