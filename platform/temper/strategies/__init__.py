"""Parallelism strategies behind one interface; `build_strategy` picks by `strategy.kind`."""

from __future__ import annotations

from collections.abc import Callable

from temper.dist import DistContext
from temper.spec.job import JobSpec
from temper.strategies.base import Strategy
from temper.strategies.ddp import DDPStrategy
from temper.strategies.deepspeed import DeepSpeedStrategy
from temper.strategies.fsdp import FSDPStrategy
from temper.strategies.pipeline import PipelineStrategy

STRATEGY_BUILDERS: dict[str, Callable[..., Strategy]] = {
    "ddp": DDPStrategy,
    "fsdp": FSDPStrategy,
    "deepspeed": DeepSpeedStrategy,
}


def build_strategy(spec: JobSpec, *, ctx: DistContext) -> Strategy:
    """`strategy.kind`'s engine; with pipeline_parallel > 1 the pipeline, which runs that
    engine (ddp or fsdp) on each stage chunk."""
    if getattr(spec.strategy, "pipeline_parallel", 1) > 1:
        return PipelineStrategy(spec.strategy, ctx=ctx, job=spec)
    return STRATEGY_BUILDERS[spec.strategy.kind](spec.strategy, ctx=ctx, job=spec)


__all__ = ["STRATEGY_BUILDERS", "PipelineStrategy", "Strategy", "build_strategy"]
