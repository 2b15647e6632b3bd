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

PIPELINE_SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b")


class PipelineKeys(BaseSpec):
    """Pipeline parallelism (DDP and FSDP): the model's layer stack split into stages across
    ranks; world = pipeline_parallel x data parallel x tensor_parallel."""

    pipeline_parallel: int = Field(default=1, ge=1, description="Pipeline stages across ranks (1: off).")
    pipeline_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b"] = Field(
        default="1f1b", description="gpipe: all forwards then all backwards; 1f1b: one forward, one backward (at most pipeline_parallel micro-batches of activations); interleaved_1f1b: 1f1b over stages_per_rank virtual stages per rank."
    )
    pipeline_microbatches: int = Field(
        default=1, ge=1, description="Micro-batches per optimizer step (>= pipeline_parallel); they split train.micro_batch_size x train.grad_accum samples."
    )
    stages_per_rank: int = Field(default=1, ge=1, description="Virtual stages per rank (interleaved_1f1b: >= 2).")
    pipeline_layers: list[int] | None = Field(
        default=None, description="Explicit split: transformer blocks per stage, in stage order (sum = model.n_layer); null: balanced, the embedding and the head weighed as one block each."
    )

    @model_validator(mode="after")
    def _pipeline_shape(self) -> PipelineKeys:
        pp, v = self.pipeline_parallel, self.stages_per_rank
        if pp == 1:
            return self
        interleaved = self.pipeline_schedule == "interleaved_1f1b"
        if interleaved and v < 2:
            raise ValueError("strategy.stages_per_rank: interleaved_1f1b needs >= 2 virtual stages per rank; "
                             "set strategy.stages_per_rank=2 or pipeline_schedule=1f1b")
        if not interleaved and v != 1:
            raise ValueError(f"strategy.stages_per_rank={v} needs pipeline_schedule=interleaved_1f1b; "
                             "set strategy.stages_per_rank=1")
        if self.pipeline_microbatches < pp:
            raise ValueError(f"strategy.pipeline_microbatches={self.pipeline_microbatches} is below "
                             f"pipeline_parallel={pp}; set pipeline_microbatches >= {pp}")
        if self.pipeline_layers is not None and len(self.pipeline_layers) != pp * v:
            raise ValueError(f"strategy.pipeline_layers has {len(self.pipeline_layers)} stages but the pipeline has "
                             f"pipeline_parallel x stages_per_rank = {pp * v}; give one block count per stage")
        return self


class DDPSpec(PipelineKeys):
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


class FSDPSpec(PipelineKeys):
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
        if isinstance(data, dict) and data.get("pipeline_parallel", 1) != 1:
            raise ValueError(
                "pipeline_parallel: DeepSpeed ZeRO does not compose with Temper's pipeline "
                "(torch.distributed.pipelining); use strategy.kind=fsdp with pipeline_parallel"
            )
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if k not in PipelineKeys.model_fields}
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


#: Model kinds that declare a layer stack the pipeline splits (models/: `pipeline_stack`).
PIPELINE_KINDS = ("gpt", "encoder")


def pipeline_problems(*, strategy: Any, model: Any, workers: int,
                      samples_per_step: int) -> list[str]:
    """Cross-section checks of strategy.pipeline_parallel (one line each); `samples_per_step`
    is train.micro_batch_size x train.grad_accum, what the micro-batches split."""
    pp = getattr(strategy, "pipeline_parallel", 1)
    if pp == 1:
        return []
    if model.kind not in PIPELINE_KINDS:
        return [f"strategy.pipeline_parallel={pp} needs a model with a layer stack; model.kind "
                f"'{model.kind}' has none (accepted: {', '.join(PIPELINE_KINDS)}): set strategy.pipeline_parallel=1"]
    problems = []
    stages = pp * strategy.stages_per_rank
    if stages > model.n_layer:
        problems.append(f"strategy.pipeline_parallel x stages_per_rank = {stages} stages is more than "
                        f"model.n_layer={model.n_layer} layers; use fewer stages or more layers")
    layers = strategy.pipeline_layers
    if layers is not None and (sum(layers) != model.n_layer or min(layers) < 1):
        problems.append(f"strategy.pipeline_layers {layers} must give every stage >= 1 block and sum to "
                        f"model.n_layer={model.n_layer}")
    if samples_per_step % strategy.pipeline_microbatches:
        problems.append(f"strategy.pipeline_microbatches={strategy.pipeline_microbatches} does not divide the "
                        f"per-rank batch (train.micro_batch_size x grad_accum = {samples_per_step}); pick a divisor")
    tp = getattr(strategy, "tensor_parallel", 1)
    if workers % (pp * tp):
        problems.append(f"strategy.pipeline_parallel x tensor_parallel = {pp * tp} does not divide "
                        f"resources.workers={workers}; pick sizes whose product divides the workers")
    return problems
