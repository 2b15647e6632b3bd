"""Checkpoint save: how long training is blocked by a synchronous vs an async DCP save.

One process on CPU, no Ray, no process group: a >= 100M-parameter GPT under the DDP strategy
(world size 1) with AdamW state (one optimizer step taken), so each save writes parameters
plus both Adam moments (~12 bytes per parameter). Rounds alternate sync/async (A/B/A/B) into
a temporary directory on local disk, which is removed at the end. Printed: the parameter
count, the median blocking time of each mode, their ratio (sync / async), and the median
time until the checkpoint is committed (for async: save() + wait(), i.e. staging + the
background write + the commit).

    python benchmarks/checkpoint_save.py [--rounds 3] [--dir /local/disk/tmp]
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from temper.checkpoint import Checkpointer
from temper.dist import DistContext
from temper.models import build_model
from temper.objectives import build_objective
from temper.runtime.optim import build_optimizer
from temper.spec import load_spec
from temper.strategies import build_strategy

ROOT = Path(__file__).resolve().parents[1]
# GPT-2 small's shape (124M parameters with tied embeddings); a short context keeps the one
# training step cheap on CPU (the position table is 128 x 768).
MODEL = ["model.vocab_size=50304", "model.d_model=768", "model.n_layer=12", "model.n_head=12",
         "model.seq_len=128", "resources.workers=1", "tracking.enabled=false"]


def build(ctx: DistContext):
    spec = load_spec(str(ROOT / "jobs/ci/tiny-gpt.yaml"), MODEL)
    strategy = build_strategy(spec, ctx=ctx)
    with torch.device("meta"):
        model = build_model(spec.model)
    strategy.setup(model, build_optimizer=lambda m: build_optimizer(m, spec.optim))
    tokens = torch.randint(0, spec.model.vocab_size, (1, spec.model.seq_len + 1))
    loss = build_objective(spec.objective)(strategy.model, {"tokens": tokens}).loss
    strategy.backward(loss)
    strategy.step()  # AdamW state exists now
    return spec, strategy


def save_once(ckpt: Checkpointer, *, step: int, strategy, spec) -> tuple[float, float]:
    """(seconds blocked, seconds until committed)."""
    start = time.perf_counter()
    blocked = ckpt.save(step=step, strategy=strategy, spec_hash="bench", run_id=None,
                        data=None, rank_state={"step": step}, extra={"model": spec.model.model_dump()})
    ckpt.wait()
    return blocked, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="saves per mode (alternating)")
    parser.add_argument("--dir", default=None, help="parent of the temporary run directories")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
    spec, strategy = build(ctx)
    params = sum(p.numel() for p in strategy.unwrap().parameters())
    print(f"model: GPT {params / 1e6:.1f}M parameters (fp32 + AdamW state)")
    root = Path(tempfile.mkdtemp(prefix="temper-ckpt-bench-", dir=args.dir))
    results: dict[str, list[tuple[float, float]]] = {"sync": [], "async": []}
    try:
        savers = {mode: Checkpointer(run_dir=str(root / mode), ctx=ctx, keep_last=1,
                                     async_save=mode == "async") for mode in results}
        for step in range(1, args.rounds + 1):
            for mode, ckpt in savers.items():
                results[mode].append(save_once(ckpt, step=step, strategy=strategy, spec=spec))
        size = sum(f.stat().st_size for f in (root / "sync").rglob("*") if f.is_file())
        for ckpt in savers.values():
            ckpt.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"checkpoint size: {size / 2**30:.2f} GiB, {args.rounds} rounds per mode, alternating")
    med = {mode: (statistics.median(b for b, _ in r), statistics.median(t for _, t in r))
           for mode, r in results.items()}
    for mode, (blocked, total) in med.items():
        rounds = ", ".join(f"{b:.2f}" for b, _ in results[mode])
        print(f"{mode:>5}: blocked median {blocked:6.2f} s  (rounds: {rounds})   "
              f"time to commit median {total:6.2f} s")
    print(f"blocking ratio sync / async: {med['sync'][0] / med['async'][0]:.1f}x")


if __name__ == "__main__":
    main()
