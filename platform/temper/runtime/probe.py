"""Measure a strategy's per-rank memory on the job's model (used by the tests and
benchmarks/strategy_memory.py): the real build path (meta model -> strategy.setup), one
optimizer step on synthetic tokens."""

from __future__ import annotations

import torch

from temper.dist import DistContext
from temper.models import build_model
from temper.runtime.optim import build_optimizer
from temper.spec.job import JobSpec
from temper.strategies import build_strategy
from temper.strategies.memory import MemoryReport


def measure_strategy_memory(spec: JobSpec, *, ctx: DistContext) -> MemoryReport:
    strategy = build_strategy(spec, ctx=ctx)
    with torch.device("meta"):
        model = build_model(spec.model, objective=spec.objective)
    strategy.setup(model, build_optimizer=lambda m: build_optimizer(m, spec.optim))
    m = spec.model
    tokens = torch.randint(0, m.vocab_size, (spec.train.micro_batch_size, m.seq_len + 1),
                           generator=torch.Generator().manual_seed(ctx.rank))
    tokens = tokens.to(ctx.device)

    def micro_step() -> torch.Tensor:
        logits = strategy.model(tokens[:, :-1])
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())

    try:
        return strategy.measure_memory(micro_step)
    finally:
        strategy.close()
