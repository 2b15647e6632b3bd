"""Pipeline schedules side by side at pp=2, m=8: peak activation memory per stage and step time.

Two gloo ranks on CPU (spawned here), a small GPT (4 blocks) under Temper's PipelineStrategy.
Activation memory is measured with saved-tensor hooks: every tensor autograd saves for
backward is counted while it lives (bytes of saved tensors, a tensor saved by two nodes
counted twice), and the peak over one optimizer step is printed per stage next to the
theory in units of one micro-batch's activations A (measured the same way: one micro-batch
through the rank's chunks, forward only): GPipe holds m x A, 1F1B at most (p - rank) x A,
interleaved 1F1B about p x A x (1 + (p-1)/(p v)) on rank 0. Step time (median of a few
steps after a warm-up) is printed with the theoretical bubble (p-1)/(m+p-1), and
(p-1)/(v m + p-1) interleaved. No goal: CPU timings are noisy.

    python benchmarks/pipeline_schedules.py [--steps 5]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
import weakref

import torch

P, M = 2, 8
SCHEDULES = {"gpipe": [], "1f1b": [], "interleaved_1f1b": ["strategy.stages_per_rank=2"]}
SETS = ["tracking.enabled=false", "model.n_layer=4", "model.d_model=128", "model.n_head=4", "model.seq_len=64",
        "model.vocab_size=256", "model.tie_embeddings=false", "train.micro_batch_size=32", "resources.workers=2",
        f"strategy.pipeline_parallel={P}", f"strategy.pipeline_microbatches={M}"]


class SavedBytes:
    """Live and peak bytes of the tensors autograd saves inside `track()`."""

    def __init__(self) -> None:
        self.live = self.peak = 0

    def _free(self, n: int) -> None:
        self.live -= n

    def _pack(self, t: torch.Tensor):
        n = t.numel() * t.element_size()
        self.live += n
        self.peak = max(self.peak, self.live)
        box = [t]
        holder = _Box(box)
        weakref.finalize(holder, self._free, n)
        return holder

    @staticmethod
    def _unpack(holder):
        return holder.box[0]

    def track(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)


class _Box:
    def __init__(self, box: list) -> None:
        self.box = box


class _NoTimer:
    def compute_start(self) -> None: ...
    def compute_end(self) -> None: ...


def _rank(rank: int, port: int, steps: int, out) -> None:
    import os

    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    from temper.data import build_data
    from temper.dist import build_dist_context
    from temper.models import build_model
    from temper.objectives import build_objective
    from temper.runtime.optim import build_optimizer
    from temper.spec import load_spec
    from temper.strategies import build_strategy

    ctx = build_dist_context(device="cpu")
    rows = {}
    for name, extra in SCHEDULES.items():
        spec = load_spec("jobs/ci/tiny-gpt.yaml", [*SETS, f"strategy.pipeline_schedule={name}", *extra])
        strategy = build_strategy(spec, ctx=ctx)
        with torch.device("meta"):
            model = build_model(spec.model, objective=spec.objective)
        objective = build_objective(spec.objective, spec.model)
        strategy.setup(model, build_optimizer=lambda m: build_optimizer(m, spec.optim))  # noqa: B023
        batches = build_data(spec, rank=strategy.data_rank, world_size=strategy.data_world_size).train_batches()
        fetch = lambda: next(batches)  # noqa: E731, B023
        one = _one_microbatch(strategy, spec)
        times, peak = [], 0
        for step in range(steps + 1):
            meter = SavedBytes()
            t0 = time.perf_counter()
            with meter.track():
                strategy.forward_backward(objective=objective, fetch=fetch, micro_steps=1,
                                          autocast=contextlib.nullcontext, timer=_NoTimer())
            strategy.clip_grad_norm(1.0)
            strategy.step()
            if step:  # the first step also infers the stages' shapes
                times.append(time.perf_counter() - t0)
                peak = max(peak, meter.peak)
        rows[name] = (peak, one, statistics.median(times))
        strategy.close()
    out[rank] = rows
    ctx.close()


def _one_microbatch(strategy, spec) -> int:
    """Saved bytes of one micro-batch through this rank's chunks (forward only, inputs made up)."""
    mb, t, d = spec.train.micro_batch_size // M, spec.model.seq_len, spec.model.d_model
    meter = SavedBytes()
    with meter.track():
        outs = []
        for chunk in strategy.chunks:
            x = torch.randint(0, spec.model.vocab_size, (mb, t)) if chunk.first else torch.randn(mb, t, d, requires_grad=True)
            outs.append(chunk(x))
    peak = meter.peak
    del outs
    return peak


def main() -> None:
    import torch.multiprocessing as mp

    from temper.dist import free_port

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    with mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(_rank, args=(free_port(), args.steps, out), nprocs=2, start_method="spawn")
        result = dict(out)
    print(f"pp={P} m={M}; activation memory = peak saved-tensor bytes per stage (rank), A = one micro-batch's")
    print(f"{'schedule':<18}{'rank':>5}{'peak MiB':>10}{'A MiB':>8}{'peak/A':>8}{'theory/A':>10}"
          f"{'meas/theory':>12}{'step s':>9}{'bubble':>8}")
    for name in SCHEDULES:
        v = 2 if name.startswith("interleaved") else 1
        for rank in range(P):
            peak, one, step_s = result[rank][name]
            theory = {"gpipe": M, "1f1b": P - rank}.get(name, P * (1 + (P - 1) / (P * v)) if rank == 0 else P - rank)
            bubble = (P - 1) / (v * M + P - 1)
            print(f"{name:<18}{rank:>5}{peak / 2**20:>10.2f}{one / 2**20:>8.2f}{peak / one:>8.2f}{theory:>10.2f}"
                  f"{peak / one / theory:>12.2f}{step_s:>9.4f}{bubble:>8.3f}")
    g, f = result[0]["gpipe"][0], result[0]["1f1b"][0]
    print(f"rank 0: gpipe / 1f1b peak activation memory = {g / f:.2f} (theory m/p = {M / P:.2f})")


if __name__ == "__main__":
    main()
