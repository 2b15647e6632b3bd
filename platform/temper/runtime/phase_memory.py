"""Each rank's peak resident memory through a model's life (used by
benchmarks/memory_at_scale.py and tests/distributed/test_memory_at_scale.py).

The real build path on the job's model and strategy, one phase after another in one
process: init (meta model -> strategy.setup), steps (optimizer steps on synthetic tokens),
save (a checkpoint: DCP, or DeepSpeed's own), resume (a fresh model + strategy loading that
checkpoint), init_from (a fresh model + strategy initialized from a DCP checkpoint). Before
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
from temper.runtime.optim import build_optimizer
from temper.spec.job import JobSpec
from temper.strategies import build_strategy

PHASES = ("init", "steps", "save", "resume", "init_from")


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


def measure_phases(spec: JobSpec, ctx: DistContext, *, folder: str, init_from: str, steps: int = 2) -> dict:
    """{"base": bytes, phase: peak bytes above base} on this rank; `init_from` names a DCP
    folder written earlier (by an FSDP run of the same model)."""
    base = reset_peak()
    out: dict[str, int] = {"base": base}

    def phase(name: str, fn: Callable[[], object]):
        ctx.barrier()
        reset_peak()
        result = fn()
        ctx.barrier()
        out[name] = peak_bytes() - base
        return result

    strategy = phase("init", lambda: _build(spec, ctx))
    phase("steps", lambda: _steps(strategy, spec, ctx, steps))
    phase("save", lambda: _save(strategy, folder))
    strategy.close()
    del strategy

    def resume():
        s = _build(spec, ctx)
        _load(s, folder)
        return s

    strategy = phase("resume", resume)
    strategy.close()
    del strategy
    strategy = phase("init_from", lambda: _build(spec, ctx, pretrained=dcp_weights(init_from)))
    strategy.close()
    return out
