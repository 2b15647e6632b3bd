"""The `strategy:` section: DDP, FSDP2 and DeepSpeed ZeRO, their named presets, and the
combinations that cannot work (rejected here, at validation, with the reason and the fix).

Three ways to write it:

    strategy: deepspeed_zero3_offload                    # a preset name
    strategy: {preset: fsdp_offload, reshard_after_forward: false}   # a preset, keys override
    strategy: {kind: fsdp, tensor_parallel: 2}           # plain keys (kind defaults to ddp)

Presets are expanded before validation, so the resolved spec (what MLflow records) always
spells out `kind` and every option.
"""

from __future__ import annotations

import difflib
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from temper.spec.base import BaseSpec

STRATEGY_PRESETS: dict[str, dict[str, Any]] = {
    "ddp": {"kind": "ddp"},
    "fsdp": {"kind": "fsdp"},
    "fsdp_offload": {"kind": "fsdp", "cpu_offload": True},
    "deepspeed_zero1": {"kind": "deepspeed", "stage": 1},
    "deepspeed_zero2": {"kind": "deepspeed", "stage": 2},
    "deepspeed_zero3": {"kind": "deepspeed", "stage": 3},
    "deepspeed_zero3_offload": {
        "kind": "deepspeed", "stage": 3, "offload_optimizer": True, "offload_params": True,
    },
}


def expand_strategy_preset(value: Any) -> Any:
    """`"name"` or `{preset: name, **overrides}` -> the preset's keys with overrides on top."""
    if isinstance(value, str):
        name, overrides = value, {}
    elif isinstance(value, dict) and "preset" in value:
        name, overrides = value["preset"], {k: v for k, v in value.items() if k != "preset"}
    else:
        return value
    preset = STRATEGY_PRESETS.get(name) if isinstance(name, str) else None
    if preset is None:
        match = difflib.get_close_matches(str(name), list(STRATEGY_PRESETS), n=1, cutoff=0.6)
        hint = f" (did you mean '{match[0]}'?)" if match else ""
        raise ValueError(
            f"strategy: {name!r} is not a preset{hint}; accepted: {', '.join(STRATEGY_PRESETS)}"
        )
    return {**preset, **overrides}


_OFFLOAD_KEYS = ("cpu_offload", "offload_optimizer", "offload_params")


class DDPSpec(BaseSpec):
    """PyTorch DistributedDataParallel: replicated model, all-reduced gradients."""

    kind: Literal["ddp"] = "ddp"
    bucket_cap_mb: float = Field(default=25.0, gt=0)
    find_unused_parameters: bool = False
    static_graph: bool = False
    tensor_parallel: int = Field(
        default=1, ge=1, description="Tensor-parallel degree (transformers); data parallel over the rest."
    )
    activation_checkpointing: Literal["none", "full", "selective"] = Field(
        default="none", description="Recompute each block's activations: all (full) or all but matmul/attention outputs (selective)."
    )
    compile: bool = Field(default=False, description="torch.compile each block.")

    @model_validator(mode="before")
    @classmethod
    def _no_offload(cls, data: Any) -> Any:
        if isinstance(data, dict) and any(data.get(k) for k in _OFFLOAD_KEYS):
            key = next(k for k in _OFFLOAD_KEYS if data.get(k))
            raise ValueError(
                f"{key}: offload needs a sharded strategy (DDP keeps a full replica per rank); "
                "use strategy: fsdp_offload or strategy: deepspeed_zero3_offload"
            )
        return data


class FSDPSpec(BaseSpec):
    """PyTorch FSDP2 (`fully_shard` per block and root): params, grads and optimizer state sharded."""

    kind: Literal["fsdp"] = "fsdp"
    reshard_after_forward: bool = Field(
        default=True, description="Free gathered params after forward (ZeRO-3-like); false: keep them until backward (ZeRO-2-like, more memory, less communication)."
    )
    param_dtype: Literal["auto", "fp32", "bf16"] = Field(
        default="auto", description="Dtype of gathered params in compute; auto: bf16 when train.precision is bf16."
    )
    reduce_dtype: Literal["fp32", "bf16"] = Field(default="fp32", description="Dtype of gradient reduce-scatter.")
    cpu_offload: bool = Field(
        default=False, description="Keep sharded params, grads and the optimizer step on the CPU."
    )
    tensor_parallel: int = Field(
        default=1, ge=1, description="Tensor-parallel degree; FSDP shards over workers / tensor_parallel (2-D mesh)."
    )
    activation_checkpointing: Literal["none", "full", "selective"] = Field(
        default="none", description="Recompute each block's activations: all (full) or all but matmul/attention outputs (selective)."
    )
    compile: bool = Field(default=False, description="torch.compile each block.")


class DeepSpeedSpec(BaseSpec):
    """DeepSpeed ZeRO (stage 1: optimizer state sharded, 2: + gradients, 3: + parameters)."""

    kind: Literal["deepspeed"] = "deepspeed"
    stage: Literal[1, 2, 3] = Field(default=2, description="ZeRO stage.")
    offload_optimizer: bool = Field(default=False, description="Optimizer state and step on the CPU.")
    offload_params: bool = Field(default=False, description="Parameters on the CPU (stage 3 only).")
    bf16: bool | None = Field(
        default=None, description="DeepSpeed bf16 mode; null: on when train.precision is bf16."
    )
    activation_checkpointing: Literal["none", "full", "selective"] = Field(
        default="none", description="Recompute each block's activations (applied before DeepSpeed wraps the model)."
    )
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="Raw DeepSpeed config merged under Temper's (Temper's keys win, with a warning per conflict).",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_tensor_parallel(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("tensor_parallel", 1) != 1:
            raise ValueError(
                "tensor_parallel: DeepSpeed ZeRO does not compose with DTensor tensor "
                "parallelism; use strategy.kind=fsdp with tensor_parallel, or drop tensor_parallel"
            )
        if isinstance(data, dict) and "tensor_parallel" in data:
            data = {k: v for k, v in data.items() if k != "tensor_parallel"}
        return data

    @model_validator(mode="after")
    def _params_offload_needs_stage3(self) -> DeepSpeedSpec:
        if self.offload_params and self.stage != 3:
            raise ValueError(
                f"offload_params: only ZeRO stage 3 partitions parameters (got stage={self.stage}); "
                "set strategy.stage=3 or strategy.offload_params=false"
            )
        return self


StrategySpec = Annotated[DDPSpec | FSDPSpec | DeepSpeedSpec, Field(discriminator="kind")]

def strategy_problems(*, strategy: Any, model: Any, workers: int, tp_kinds: tuple[str, ...] = ()) -> list[str]:
    """Cross-section checks of the strategy against the model and resources (one line each).
    A model spec with `tensor_parallel_dims()` has a tensor-parallel plan; `tp_kinds` names
    the kinds that do (for the message)."""
    tp = getattr(strategy, "tensor_parallel", 1)
    if tp == 1:
        return []
    dims = getattr(model, "tensor_parallel_dims", None)
    if dims is None:
        return [
            f"strategy.tensor_parallel={tp} needs a transformer; model.kind '{model.kind}' has "
            f"no tensor-parallel plan (accepted: {', '.join(tp_kinds)}): set "
            "strategy.tensor_parallel=1"
        ]
    problems = []
    if workers % tp:
        problems.append(
            f"strategy.tensor_parallel={tp} does not divide resources.workers={workers}; "
            "pick a tensor_parallel that divides resources.workers"
        )
    for size, what, ref in dims():
        if size % tp:
            problems.append(
                f"strategy.tensor_parallel={tp} does not divide {what}; pick a tensor_parallel that divides {ref}"
            )
    return problems
