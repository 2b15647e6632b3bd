"""DistContext: who this worker is, which device it uses, and its process group.

Built from torchrun's standard environment variables (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT), which every launcher exports, so nothing below this module
knows whether Ray, torchrun or the CLI process started it.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from temper.errors import TemperError

log = logging.getLogger(__name__)


@dataclass
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    owns_process_group: bool = field(default=False, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def barrier(self) -> None:
        if self.distributed and self.world_size > 1:
            dist.barrier()

    def all_reduce_mean(self, values: torch.Tensor) -> torch.Tensor:
        """Mean of a tensor across ranks (a no-op on one rank)."""
        if self.distributed and self.world_size > 1:
            values = values.clone()
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
            values /= self.world_size
        return values

    def all_gather_floats(self, value: float) -> list[float]:
        """Every rank's value of a float, in rank order."""
        if not (self.distributed and self.world_size > 1):
            return [value]
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        out = [torch.zeros_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t)
        return [float(x.item()) for x in out]

    def all_gather_rows(self, values: torch.Tensor, *, group: Any = None) -> torch.Tensor:
        """Every rank's 1-D tensor stacked in rank order: shape (world_size, n) (`group`: another
        process group over the same ranks, e.g. a CPU one for CPU tensors)."""
        if not (self.distributed and self.world_size > 1):
            return values.unsqueeze(0)
        out = [torch.empty_like(values) for _ in range(self.world_size)]
        dist.all_gather(out, values.contiguous(), group=group)
        return torch.stack(out)

    def all_gather_objects(self, value: object) -> list[object]:
        """Every rank's picklable value, in rank order (setup only: it pickles)."""
        if not (self.distributed and self.world_size > 1):
            return [value]
        out: list[object] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def close(self, *, wait_for_peers: bool = True) -> None:
        """Destroy the process group this context created. With `wait_for_peers` (a run that
        ended well) every rank first reaches this point: a rank destroying its gloo group
        while a peer was still tearing down made that peer abort ("terminate called without
        an active exception", SIGABRT). A failed run skips the wait: a dead or hung peer would
        hold it until the collective timeout."""
        if self.owns_process_group and self.distributed:
            try:
                if wait_for_peers:
                    self.barrier()
            finally:
                dist.destroy_process_group()


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            raise TemperError(f"environment variable {name} is not set; start workers with a launcher")
        return default
    try:
        return int(raw)
    except ValueError:
        raise TemperError(f"environment variable {name}={raw!r} is not an integer") from None


def resolve_device(requested: str, *, local_rank: int) -> torch.device:
    """Map train.device (auto|cpu|cuda) to this worker's torch.device."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise TemperError("train.device is 'cuda' but this worker sees no CUDA device; use train.device=auto")
    index = local_rank % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def build_dist_context(*, device: str = "auto", timeout_s: float = 1800.0) -> DistContext:
    """Create this worker's context and, if needed, its process group (gloo on CPU, nccl on GPU).

    When a launcher already initialized the default process group (Ray Train does), it is
    reused; otherwise it is created from the env:// variables and destroyed on `close()`.
    """
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    dev = resolve_device(device, local_rank=local_rank)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    owns = False
    if dist.is_available() and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            if world_size > 1:
                raise TemperError("MASTER_PORT is not set for a multi-worker run; use a launcher")
            os.environ["MASTER_PORT"] = str(free_port())
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=dev if dev.type == "cuda" else None,
        )
        owns = True
    elif dist.is_initialized():
        backend = dist.get_backend()
    log.debug("rank %d/%d local_rank %d on %s (%s)", rank, world_size, local_rank, dev, backend)
    return DistContext(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        device=dev,
        backend=backend,
        owns_process_group=owns,
    )


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
