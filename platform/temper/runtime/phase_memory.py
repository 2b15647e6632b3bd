"""Each rank's peak resident memory through a model's life (used by
benchmarks/memory_at_scale.py and tests/distributed/test_memory_at_scale.py).

The real build path on the job's model and strategy: init (meta model -> strategy.setup),
steps (optimizer steps on synthetic tokens), save (a checkpoint: DCP, or DeepSpeed's own) in
one process; resume (a fresh model + strategy loading that checkpoint) and init_from (a fresh
model + strategy initialized from a DCP checkpoint) each in a fresh one (PROCESSES). Before
each phase: free what is unused (gc, malloc_trim) and reset the kernel's high-water mark
(/proc/self/clear_refs "5", Linux), so a phase's VmHWM is its own peak. Peaks are reported
above `base`, the resident memory before the first model is built (the Python process,
torch and libraries: the same on any model), so they compare with the theory's tensor bytes.
"""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Callable
from pathlib import Path

import torch

from temper.checkpoint.engines import dcp_load, dcp_save
from temper.checkpoint.storage import open_store
from temper.checkpoint.weights import DcpTensors, PretrainedWeights
from temper.dist import DistContext
from temper.models import build_model
from temper.runtime.allocator import fix_mmap_threshold
from temper.runtime.optim import build_optimizer
from temper.spec.job import JobSpec
from temper.strategies import build_strategy

PHASES = ("init", "steps", "save", "resume", "init_from")
#: How a job meets them: its first start builds, trains and saves in one process; a resume
#: (a restarted job) and an init_from (a fine-tune) each start a fresh one. Measured in one
#: process, a ZeRO-3 resume read 2.4x its theory instead of 1.5x: DeepSpeed keeps part of the
#: previous engine.
PROCESSES = (("init", "steps", "save"), ("resume",), ("init_from",))


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> int:
    """Free what is unused, reset VmHWM to the current RSS; returns that RSS in bytes."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: nothing to trim
        pass
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS") * 1024


def peak_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def _build(spec: JobSpec, ctx: DistContext, pretrained=None):
    strategy = build_strategy(spec, ctx=ctx)
    with torch.device("meta"):
        model = build_model(spec.model, objective=spec.objective)
    strategy.setup(model, build_optimizer=lambda m: build_optimizer(m, spec.optim), pretrained=pretrained)
    return strategy


def _steps(strategy, spec: JobSpec, ctx: DistContext, n: int) -> None:
    m = spec.model
    tokens = torch.randint(0, m.vocab_size, (spec.train.micro_batch_size, m.seq_len + 1),
                           generator=torch.Generator().manual_seed(ctx.rank))
    for _ in range(n):
        logits = strategy.model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        strategy.backward(loss)
        strategy.clip_grad_norm(spec.optim.grad_clip)
        strategy.step()
        del logits, loss


def _save(strategy, folder: str) -> None:
    if strategy.checkpoint_engine == "deepspeed":
        strategy.save_engine_checkpoint(folder, tag="bench")
    else:
        dcp_save(strategy, store=open_store(folder), path=open_store(folder).root)


def _load(strategy, folder: str) -> None:
    if strategy.checkpoint_engine == "deepspeed":
        strategy.load_engine_checkpoint(folder, tag="bench")
    else:
        dcp_load(strategy, store=open_store(folder), path=open_store(folder).root)


def write_source(spec: JobSpec, ctx: DistContext, *, folder: str) -> None:
    """A fresh model's DCP checkpoint in `folder`, built under `spec` (an FSDP spec): the
    init_from source when no FSDP run of the same model wrote one."""
    strategy = _build(spec, ctx)
    _save(strategy, folder)
    strategy.close()


def dcp_weights(folder: str) -> PretrainedWeights:
    """init_from's view of a bare DCP folder (what `_save` writes for FSDP)."""
    src = DcpTensors(open_store(folder))
    return PretrainedWeights(path=folder, shapes=src.shapes, model_spec=None, run_id=None, step=None,
                             loader=src.get, shard_loader=src.load_shards)


def measure_phases(spec: JobSpec, ctx: DistContext, *, folder: str, init_from: str,
                   phases: tuple[str, ...] = PHASES, steps: int = 2) -> dict:
    """{"base": bytes, phase: peak bytes above base} on this rank for `phases`, in PHASES
    order: init, steps and save share one strategy; resume loads what save wrote to `folder`
    (an earlier call's, in another process); init_from starts from the DCP folder
    `init_from` (written by an FSDP run of the same model). The host heap is set up as a
    worker's (run_worker)."""
    if unknown := set(phases) - set(PHASES):
        raise ValueError(f"unknown phases {sorted(unknown)}; choose from {PHASES}")
    fix_mmap_threshold(spec.resources.malloc_mmap_threshold_kib)
    base = reset_peak()
    out: dict[str, int] = {"base": base}

    def phase(name: str, fn: Callable[[], object]):
        ctx.barrier()
        reset_peak()
        result = fn()
        ctx.barrier()
        out[name] = peak_bytes() - base
        return result

    def resume():
        s = _build(spec, ctx)
        _load(s, folder)
        return s

    builders = {"init": lambda: _build(spec, ctx), "resume": resume,
                "init_from": lambda: _build(spec, ctx, pretrained=dcp_weights(init_from))}
    strategy = None
    for name in (p for p in PHASES if p in phases):
        if name in builders:
            if strategy is not None:  # freed before the next one is built
                strategy.close()
                strategy = None
            strategy = phase(name, builders[name])
        elif strategy is None:
            raise ValueError(f"phase {name} needs init in the same call")
        elif name == "steps":
            phase(name, lambda s=strategy: _steps(s, spec, ctx, steps))
        else:
            phase(name, lambda s=strategy: _save(s, folder))
    if strategy is not None:
        strategy.close()
    return out
