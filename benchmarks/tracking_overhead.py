"""What does MLflow tracking cost the training step?

Runs a small real training step (the tiny GPT from temper.models, or a 2-layer MLP when
that is not importable) three ways, logging 5 metrics EVERY step:

    off   no tracker (the metrics dict is still built: the loop prints it anyway)
    up    MlflowTracker -> a real `mlflow server` on 127.0.0.1 (started here)
    down  MlflowTracker -> the same server, stopped (connection refused, retried; the
          overflow beyond 100 metrics spilled to disk, as in a long outage)

and prints the median step times and their ratios to `off` (goal: <= 1.01).

    .venv/bin/python benchmarks/tracking_overhead.py [--steps 300] [--warmup 30]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.fixtures.mlflow_server: the same server the tests use

from tests.fixtures.mlflow_server import MlflowServer  # noqa: E402

from temper.tracking import MlflowTracker, NoopTracker, Tracker  # noqa: E402

GOAL = 1.01


def build_step(batch_size: int):
    """(description, step) where step() runs forward/backward/optimizer and returns the loss."""
    try:
        from temper.models import build_model
        from temper.spec import GPTSpec

        spec = GPTSpec(flavor="tiny")
        model = build_model(spec)
        tokens = torch.randint(0, spec.vocab_size, (batch_size, spec.seq_len + 1))
        inputs, targets = tokens[:, :-1], tokens[:, 1:]

        def loss_fn() -> torch.Tensor:
            logits = model(inputs)
            return nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())

        what = f"tiny GPT ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params)"
    except Exception:  # noqa: BLE001 - the model zoo may not exist yet
        model = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 10))
        x, y = torch.randn(batch_size, 256), torch.randint(0, 10, (batch_size,))

        def loss_fn() -> torch.Tensor:
            return nn.functional.cross_entropy(model(x), y)

        what = "2-layer MLP 256-1024-10"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step() -> tuple[float, float]:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item(), grad_norm.item()

    return f"{what}, batch {batch_size}", step


def timed_steps(step, tracker: Tracker, *, n: int, first: int, out: dict[str, list]) -> None:
    """Run n steps logging 5 metrics each; append step times and log-call times to `out`."""
    for i in range(first, first + n):
        t0 = time.perf_counter()
        loss, grad_norm = step()
        metrics = {"train/loss": loss, "train/grad_norm": grad_norm, "train/lr": 1e-3,
                   "perf/step_time_s": 0.0, "perf/samples_per_s": 0.0}
        t1 = time.perf_counter()
        tracker.log_metrics(metrics, step=i)
        t2 = time.perf_counter()
        out["step"].append(t2 - t0)
        out["call"].append(t2 - t1)


def interleaved(step, tracker: Tracker, *, steps: int, block: int) -> tuple[dict, dict]:
    """Alternate blocks without and with `tracker` so machine-load drift hits both equally."""
    off: dict[str, list] = {"step": [], "call": []}
    on: dict[str, list] = {"step": [], "call": []}
    done = 0
    while done < steps:
        n = min(block, steps - done)
        timed_steps(step, NoopTracker(), n=n, first=done, out=off)
        timed_steps(step, tracker, n=n, first=done, out=on)
        done += n
    return off, on


def new_run(uri: str) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("bench-tracking")
    exp_id = experiment.experiment_id if experiment else client.create_experiment("bench-tracking")
    return client.create_run(exp_id, run_name="tracking-overhead").info.run_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="timed steps per mode")
    parser.add_argument("--block", type=int, default=20, help="steps per alternating block")
    parser.add_argument("--warmup", type=int, default=30, help="untimed steps per mode")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 leaves a core to the co-located MLflow server)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="  [log] %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    what, step = build_step(args.batch_size)

    with tempfile.TemporaryDirectory(prefix="temper-bench-") as tmp:
        t0 = time.monotonic()
        server = MlflowServer(Path(tmp)).start()
        print(f"mlflow server up in {time.monotonic() - t0:.1f} s at {server.uri}; model: {what}; "
              f"{args.steps} steps/mode in blocks of {args.block} alternating with no-tracking "
              f"blocks; 5 metrics/step; torch threads {args.threads}")
        try:
            timed_steps(step, NoopTracker(), n=args.warmup, first=0, out={"step": [], "call": []})
            up = MlflowTracker(run_id=new_run(server.uri), tracking_uri=server.uri)
            off_a, on_up = interleaved(step, up, steps=args.steps, block=args.block)
            up.close(timeout_s=30)
            run_id = new_run(server.uri)
            server.stop()
            # max_buffered at its minimum (100) so that the outage also spills to disk every
            # few steps: the sender thread writes segments while the step runs.
            down = MlflowTracker(run_id=run_id, tracking_uri=server.uri, max_buffered=100,
                                 spool_dir=Path(tmp) / "spool")
            off_b, on_down = interleaved(step, down, steps=args.steps, block=args.block)
            down.close(timeout_s=1)
        finally:
            server.stop()
    print_table([("no tracking", off_a, None, None), ("MlflowTracker, server up", on_up, up, off_a),
                 ("no tracking", off_b, None, None), ("MlflowTracker, server DOWN", on_down, down, off_b)])


def print_table(rows) -> None:
    median = statistics.median
    print(f"{'mode':<28}{'median step':>12}{'ratio':>8}{'log call':>10}"
          f"{'sent':>7}{'pending':>9}{'dropped':>9}")
    ratios = []
    for label, times, tracker, base in rows:
        step_s = median(times["step"])
        ratio = step_s / median(base["step"]) if base else 1.0
        ratios += [ratio] if base else []
        counters = ("", "", "") if tracker is None else (tracker.sent, tracker.pending, tracker.dropped)
        print(f"{label:<28}{step_s * 1e3:>9.3f} ms{ratio:>8.3f}{median(times['call']) * 1e6:>7.1f} us"
              f"{counters[0]:>7}{counters[1]:>9}{counters[2]:>9}")
    worst = max(ratios)
    print(f"goal: ratio <= {GOAL} -> worst {worst:.3f} {'OK' if worst <= GOAL else 'ABOVE GOAL'}"
          "  (ratio: vs the no-tracking blocks interleaved with it; counters after close)")


if __name__ == "__main__":
    main()
