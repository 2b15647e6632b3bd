"""The job spec: pydantic v2 models, frozen, unknown keys rejected.

One YAML file maps onto `JobSpec`. Sections with alternatives (`model`, `data`,
`strategy`, `objective`) are discriminated unions on `kind:`; each alternative is a
`*Spec` class registered in the union below. Strategies (and their presets) live in
temper.spec.strategy. Later issues add alternatives by adding a
class to the union, never by `if` chains in the loop.

This module imports neither torch nor ray: `temper validate` and `temper schema` stay fast.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

# The model and objective specs live in temper.spec.architectures and are re-exported here.
from temper.spec.architectures import (  # noqa: F401
    MODEL_INPUTS,
    OBJECTIVES_FOR_MODEL,
    TENSOR_PARALLEL_KINDS,
    CausalLMSpec,
    ClassifySpec,
    EncoderSpec,
    GPTSpec,
    MAESpec,
    MLMSpec,
    ModelSpec,
    ObjectiveSpec,
    RecurrentSpec,
    ResNetSpec,
    SimCLRSpec,
    ViTSpec,
    objective_problems,
)
from temper.spec.base import BaseSpec
from temper.spec.cluster import ClusterSpec
from temper.spec.elastic import elastic_problems
from temper.spec.finetune import InitFromSpec, SubsetSpec
from temper.spec.strategy import (  # the strategy specs are re-exported from here
    DDPSpec,
    DeepSpeedSpec,  # noqa: F401
    FSDPSpec,  # noqa: F401
    StrategySpec,
    expand_strategy_preset,
    pipeline_problems,
    strategy_problems,
)

# ------------------------------------------------------------------------------- data


class SyntheticDataSpec(BaseSpec):
    """Deterministic, seeded, learnable synthetic data shaped for the model.

    Token models get sequences from a seeded sparse Markov chain; image models get
    class-specific templates plus noise. Sample i is a pure function of (seed, i).
    """

    kind: Literal["synthetic"] = "synthetic"
    num_samples: int = Field(default=4096, ge=1, description="Training samples per epoch.")
    eval_samples: int = Field(default=256, ge=0, description="Held-out samples (0: no eval).")
    noise: float = Field(default=0.1, ge=0.0, le=1.0, description="Randomness mixed into samples.")
    num_workers: int = Field(default=0, ge=0, description="DataLoader worker processes per rank.")


class WebDatasetSpec(BaseSpec):
    """WebDataset tar shards (as written by `temper data pack`) streamed from a local folder,
    http(s):// or s3://, with a deterministic plan that gives every rank the same number of
    batches, a seeded shuffle, and a resumable position."""

    kind: Literal["webdataset"] = "webdataset"
    train: str = Field(
        min_length=1,
        description="Folder/URL with manifest.json, a manifest URL, or shard URLs ('.../x-{000000..000009}.tar').",
    )
    eval: str | None = Field(default=None, description="Held-out split, same forms as train (null: no eval).")
    remainder: Literal["drop", "pad"] = Field(
        default="drop",
        description="Samples that do not divide into equal batches per rank: drop them (per epoch) or pad by re-reading.",
    )
    shuffle_buffer: int = Field(
        default=1000, ge=0, description="Samples each loader worker shuffles together (0: read order)."
    )
    num_workers: int = Field(default=2, ge=0, description="DataLoader worker processes per rank.")
    prefetch_factor: int = Field(default=2, ge=1, description="Batches each worker keeps ready.")
    on_error: Literal["fail", "skip"] = Field(
        default="fail",
        description="A sample that cannot be read or decoded: fail naming shard and key, or skip it (counted).",
    )
    verify: Literal["none", "size", "sha256"] = Field(
        default="size",
        description="Preflight: shards exist (none), and match the manifest's byte sizes (size) or sha256 (reads all).",
    )
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="Batch field -> sample key (e.g. {image: png, label: cls}); default: from the manifest's keys.",
    )
    transform: str | None = Field(
        default=None,
        description="'module:function' applied to each decoded sample (dict of tensors, random.Random).",
    )
    s3_endpoint_url: str | None = Field(
        default=None, description="S3-compatible endpoint (MinIO, Ceph); else $AWS_ENDPOINT_URL_S3/$AWS_ENDPOINT_URL."
    )
    timeout_s: float = Field(default=60.0, gt=0, description="Connect/read timeout for remote shards.")
    subset: SubsetSpec | None = Field(
        default=None, description="Train on a seeded fraction of the training samples (null: all)."
    )


DataSpec = Annotated[SyntheticDataSpec | WebDatasetSpec, Field(discriminator="kind")]

# ------------------------------------------------------------------------- strategies


# DDPSpec, FSDPSpec, DeepSpeedSpec and their presets live in temper.spec.strategy.

# -------------------------------------------------------------------- optim and train


class ScheduleSpec(BaseSpec):
    """Learning-rate schedule: linear warmup, then constant, linear or cosine decay."""

    kind: Literal["constant", "linear", "cosine"] = Field(default="cosine", description="Decay after warmup.")
    warmup_steps: int = Field(default=0, ge=0, description="Linear warmup from 0 to lr.")
    min_lr_ratio: float = Field(default=0.1, ge=0.0, le=1.0, description="Final lr / peak lr.")


class OptimSpec(BaseSpec):
    """Optimizer (AdamW or SGD), its learning rate, weight decay and gradient clipping."""

    kind: Literal["adamw", "sgd"] = Field(default="adamw", description="Optimizer.")
    lr: float = Field(default=3e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(default=0.0, ge=0, description="Decoupled (AdamW) or L2 (SGD); matrices only.")
    betas: tuple[float, float] = Field(default=(0.9, 0.95), description="AdamW only.")
    eps: float = Field(default=1e-8, gt=0, description="AdamW only.")
    momentum: float = Field(default=0.9, ge=0, lt=1, description="SGD only.")
    nesterov: bool = Field(default=False, description="SGD only.")
    implementation: Literal["fused", "foreach", "for_loop"] = Field(
        default="fused", description="torch's update kernel: fused (one pass per tensor, no temporaries; "
        "CPU and CUDA), foreach (batched ops, about one extra copy of the parameters during the step) "
        "or for_loop (per tensor). The same update up to float rounding.")
    grad_clip: float | None = Field(
        default=1.0, gt=0, description="Clip the global gradient norm to this; null: off."
    )
    schedule: ScheduleSpec = ScheduleSpec()


class ProfileSpec(BaseSpec):
    """A torch.profiler trace of a few steps on every rank (`train.profile`)."""

    start_step: int = Field(default=20, ge=1, description="First profiled step.")
    steps: int = Field(default=5, ge=1, le=100, description="Steps recorded (keep it small: traces grow fast).")
    record_shapes: bool = Field(default=True, description="Record operator input shapes.")
    profile_memory: bool = Field(default=True, description="Record tensor allocations.")
    with_stack: bool = Field(default=False, description="Record Python stacks (larger, slower traces).")
    memory_snapshot: bool = Field(
        default=True, description="On CUDA: record the allocator history (torch.cuda.memory) over the "
        "profiled steps and write a snapshot; also written if the job dies of out-of-memory.")


class TrainSpec(BaseSpec):
    """Steps, batch sizes, logging and evaluation cadence, precision and device."""

    max_steps: int = Field(default=100, ge=1, description="Optimizer steps to run.")
    micro_batch_size: int = Field(
        default=16, ge=1, description="Samples per worker per micro-step."
    )
    grad_accum: int = Field(default=1, ge=1, description="Micro-steps per optimizer step.")
    log_every: int = Field(default=10, ge=1, description="Log train metrics every N steps.")
    eval_every: int = Field(default=0, ge=0, description="Evaluate every N steps (0: at end only).")
    eval_batches: int = Field(default=4, ge=1, description="Micro-batches per evaluation.")
    precision: Literal["fp32", "bf16"] = Field(
        default="fp32", description="bf16: autocast matmuls to bfloat16, fp32 master weights."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="auto: cuda when the worker has a GPU, else cpu."
    )
    on_nan: Literal["stop", "skip"] = Field(
        default="stop",
        description="NaN/Inf loss or gradient: stop (error naming the step; no NaN checkpoint is "
        "written) or skip that optimizer step (costs one small all-reduce per step).",
    )
    max_nan_skips: int = Field(
        default=5, ge=1, description="on_nan=skip: fail after this many consecutive skipped steps."
    )
    profile: ProfileSpec | None = Field(
        default=None, description="Profile steps start_step.. on every rank: traces, a top-ops table "
        "and (CUDA) a memory snapshot go to the MLflow run under profile/ (docs/troubleshooting.md).")


class ResourcesSpec(BaseSpec):
    """How many workers, and what each one reserves."""

    workers: int = Field(default=1, ge=1, description="Training processes (ranks); the most an elastic job uses.")
    min_workers: int | None = Field(
        default=None, ge=1,
        description="Elastic when below workers (ray launcher): start once this many can be placed, "
        "shrink to it when workers are lost, grow back to workers when room appears; every size "
        "resumes from the last checkpoint and keeps the global batch by changing train.grad_accum "
        "(docs/checkpoints.md).")
    resize_interval_s: float = Field(
        default=60.0, gt=0,
        description="Elastic jobs: how often Ray checks for room to grow the worker group "
        "(ScalingConfig.elastic_resize_monitor_interval_s).")
    gpus_per_worker: float = Field(default=0, ge=0, description="GPUs per worker (0: CPU).")
    cpus_per_worker: float = Field(default=1, gt=0, description="CPUs Ray reserves per worker.")
    malloc_mmap_threshold_kib: int | None = Field(
        default=1024, ge=0, le=32 * 1024,
        description="Host memory: glibc's mmap threshold on every rank, fixed, in KiB: blocks above it "
        "are mapped on their own and return to the OS when freed, so the tensors a step frees do not "
        "stay resident in the heap (CPU ranks: up to 0.8 GiB per rank at 729M under FSDP; "
        "docs/parallelism.md). null: glibc's dynamic threshold. No effect without glibc.")
    placement: Literal["pack", "spread", "strict_spread"] = Field(
        default="pack",
        description="Where Ray puts the workers (Ray Train's placement_strategy): pack: as few nodes "
        "as possible; spread: across nodes when it can; strict_spread: one worker per node, waiting "
        "until that many nodes have room. The ray launcher only.",
    )


class CheckpointSpec(BaseSpec):
    """Sharded checkpoints: where, how often, how many; resume is automatic (see docs/checkpoints.md)."""

    enabled: bool = Field(default=True, description="false: never save or resume.")
    dir: str | None = Field(
        default=None,
        description="Root folder or URL (s3://bucket/prefix) shared by all workers; each run writes "
        "<dir>/<run id>/step-N. Default: temper-runs/<name> where `temper run` runs.",
    )
    every_steps: int = Field(default=0, ge=0, description="Save every N steps (0: only at the end).")
    keep_last: int = Field(default=3, ge=1, description="Committed checkpoints kept per run.")
    async_save: bool = Field(
        default=False, description="Write files in the background while training continues (DCP only)."
    )
    s3_endpoint_url: str | None = Field(
        default=None, description="S3-compatible store for an s3:// dir; else $AWS_ENDPOINT_URL_S3."
    )


class FaultSpec(BaseSpec):
    """What happens when a worker dies or a collective hangs."""

    max_failures: int = Field(
        default=0, ge=0,
        description="Restarts of the worker group after a worker failure (Ray FailureConfig, "
        "torchrun --max-restarts); each restart resumes from the last committed checkpoint.",
    )
    collective_timeout_s: float = Field(
        default=1800.0, gt=0, description="A collective waiting longer than this fails the job."
    )
    preemption_grace_s: float = Field(
        default=30.0, ge=0,
        description="SIGTERM to the driver or any worker (spot notice, pod eviction): every rank saves "
        "a checkpoint at the next step boundary within this many seconds and the job exits preempted "
        "(resumable); 0: SIGTERM stops the job like Ctrl-C (docs/checkpoints.md).")


class TrackingSpec(BaseSpec):
    """Where and how the job is recorded in MLflow (one run per job, rank 0 logs)."""

    enabled: bool = Field(default=True, description="false: no MLflow run at all.")
    uri: str | None = Field(
        default=None,
        description="MLflow tracking URI; else $MLFLOW_TRACKING_URI; else sqlite:///mlflow.db here.",
    )
    experiment: str = Field(default="temper", min_length=1, description="MLflow experiment name.")
    tags: dict[str, str] = Field(default_factory=dict, description="Extra tags on the run.")
    flush_every_s: float = Field(default=2.0, gt=0, description="Max seconds between batches.")
    max_buffered: int = Field(default=100_000, ge=100, description=(
        "Metrics rank 0 holds in memory while MLflow is unreachable; the oldest beyond go to disk."))
    spool_dir: str | None = Field(default=None, description=(
        "Where undelivered metrics wait on disk (null: $TEMPER_SPOOL_DIR, else "
        "~/.cache/temper/tracking-spool), one folder per run."))
    max_spill_mb: float = Field(default=1024.0, gt=0, description=(
        "Disk for undelivered metrics per run; beyond it the oldest are dropped (warned)."))
    close_timeout_s: float = Field(default=30.0, ge=0, description=(
        "At the end of a job, how long to wait for an unreachable MLflow before keeping the "
        "undelivered metrics on disk (`temper runs sync`)."))
    register_model: str | None = Field(default=None, description=(
        "When the job finishes: export its last checkpoint and register it as a version of this "
        "MLflow model, with lineage tags (e.g. a pretrained backbone for init_from: models:/NAME@current)."))
    register_aliases: tuple[str, ...] = Field(default=("current",), description=(
        "Aliases the registered version gets (register_model); MLflow reserves 'latest' and v<N>."))

    @field_validator("register_aliases")
    @classmethod
    def _aliases(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for alias in value:
            if not re.fullmatch(r"[\w-]{1,255}", alias) or alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
                raise ValueError(f"alias {alias!r}: use letters, digits, _ and - (not 'latest' or v<number>, "
                                 "which MLflow reserves), e.g. current")
        return value
    system_metrics: bool = Field(default=True, description=(
        "Log CPU, memory and GPU use per node and each rank's step time (system/..., perf/...)."))


class JobSpec(BaseSpec):
    """A training job: what to train, on what, how, where, and where it is recorded."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)
    seed: int = Field(default=0, ge=0)
    model: ModelSpec
    objective: ObjectiveSpec | None = Field(
        default=None, description="Defaults to the model's natural objective (gpt: causal_lm)."
    )
    data: DataSpec = SyntheticDataSpec()
    init_from: InitFromSpec | None = Field(
        default=None, description="Pretrained weights to start from (a checkpoint, runs:/ID or models:/NAME@ALIAS)."
    )
    strategy: StrategySpec = DDPSpec()
    optim: OptimSpec = OptimSpec()
    train: TrainSpec = TrainSpec()
    resources: ResourcesSpec = ResourcesSpec()
    checkpoint: CheckpointSpec = CheckpointSpec()
    fault: FaultSpec = FaultSpec()
    tracking: TrackingSpec = TrackingSpec()
    cluster: ClusterSpec = ClusterSpec()

    @model_validator(mode="before")
    @classmethod
    def _default_kinds(cls, data: Any) -> Any:
        """Fill `kind` where it can only mean one thing: the default strategy/data kind, and
        the model's natural objective."""
        if not isinstance(data, dict):
            return data
        if "strategy" in data:
            data = {**data, "strategy": expand_strategy_preset(data["strategy"])}
        for section, default in (("data", "synthetic"), ("strategy", "ddp")):
            value = data.get(section)
            if isinstance(value, dict) and "kind" not in value:
                if section == "data" and "train" in value:
                    default = "webdataset"
                data = {**data, section: {"kind": default, **value}}
        objective = data.get("objective")
        if objective is None or (isinstance(objective, dict) and "kind" not in objective):
            model = data.get("model")
            kind = model.get("kind") if isinstance(model, dict) else getattr(model, "kind", None)
            if kind in OBJECTIVES_FOR_MODEL:
                data = {**data, "objective": {"kind": OBJECTIVES_FOR_MODEL[kind][0], **(objective or {})}}
        return data

    @model_validator(mode="after")
    def _cross_checks(self) -> JobSpec:
        problems = objective_problems(model=self.model, objective=self.objective)
        if problems:
            raise ValueError("; ".join(problems))
        if self.train.device == "cuda" and self.resources.gpus_per_worker == 0:
            raise ValueError(
                "train.device is 'cuda' but resources.gpus_per_worker is 0; "
                "set resources.gpus_per_worker>=1 or train.device=cpu"
            )
        if self.train.device == "cpu" and self.resources.gpus_per_worker > 0:
            raise ValueError(
                "train.device is 'cpu' but resources.gpus_per_worker > 0 reserves GPUs it "
                "will not use; set resources.gpus_per_worker=0 or train.device=auto"
            )
        if self.train.on_nan == "skip" and self.strategy.kind == "deepspeed":
            raise ValueError(
                "train.on_nan 'skip' cannot be used with strategy.kind 'deepspeed' (its engine owns "
                "the optimizer step); use train.on_nan=stop"
            )
        if self.checkpoint.async_save and self.strategy.kind == "deepspeed":
            raise ValueError(
                "checkpoint.async_save cannot be used with strategy.kind 'deepspeed' (DeepSpeed saves "
                "synchronously); set checkpoint.async_save=false"
            )
        if (self.strategy.kind == "deepspeed" and self.checkpoint.dir
                and "://" in self.checkpoint.dir and not self.checkpoint.dir.startswith("file://")):
            raise ValueError(
                f"checkpoint.dir '{self.checkpoint.dir}': DeepSpeed writes checkpoints to a file "
                "system only; use a shared mount (NFS, FSx, a PVC) or strategy.kind=fsdp"
            )
        problems = elastic_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        problems = strategy_problems(
            strategy=self.strategy, model=self.model, workers=self.resources.workers,
            tp_kinds=TENSOR_PARALLEL_KINDS,
        ) + pipeline_problems(
            strategy=self.strategy, model=self.model, workers=self.resources.workers,
            samples_per_step=self.train.micro_batch_size * self.train.grad_accum,
        )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def global_batch_size(self) -> int:
        """Samples per optimizer step across all workers."""
        model_parallel = getattr(self.strategy, "tensor_parallel", 1) * getattr(self.strategy, "pipeline_parallel", 1)
        data_parallel = self.resources.workers // model_parallel
        return self.train.micro_batch_size * self.train.grad_accum * data_parallel
