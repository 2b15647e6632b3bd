"""DDP: every rank holds the whole model; gradients are all-reduced in buckets."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from temper.runtime.context import DistContext
from temper.spec.models import DDPSpec
from temper.strategies.base import Strategy


class DDPStrategy(Strategy):
    def __init__(self, spec: DDPSpec, *, ctx: DistContext) -> None:
        super().__init__(ctx=ctx)
        self.spec = spec

    def setup(
        self,
        model: nn.Module,
        *,
        build_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        model = model.to(self.ctx.device)
        if self.ctx.world_size > 1:
            device_ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
            model = DistributedDataParallel(
                model,
                device_ids=device_ids,
                bucket_cap_mb=self.spec.bucket_cap_mb,
                find_unused_parameters=self.spec.find_unused_parameters,
                static_graph=self.spec.static_graph,
            )
        self.model = model
        self.optimizer = build_optimizer(model)
        return self.model, self.optimizer

    @contextlib.contextmanager
    def accumulate(self, sync: bool) -> Iterator[None]:
        if sync or not isinstance(self.model, DistributedDataParallel):
            yield
        else:
            with self.model.no_sync():
                yield

    def unwrap(self) -> nn.Module:
        if isinstance(self.model, DistributedDataParallel):
            return self.model.module
        return self.model
