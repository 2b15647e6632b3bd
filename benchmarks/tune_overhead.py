"""Search overhead: N tiny trials through `temper tune` (max_concurrent_trials 1, no scheduler)
against the same N specs run one after another with `temper run`, on one Ray head.

Both sides join the same head (`ray start --head`, started here) and log to a local sqlite
MLflow store in a temporary folder; the N specs are a grid over optim.lr, so both sides train
exactly the same jobs. Printed: each side's wall time and the ratio tune / run (goal <= 1.0).

    python benchmarks/tune_overhead.py [--trials 4] [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from temper.dist import free_port

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
JOB = str(ROOT / "jobs" / "ci" / "tiny-resnet.yaml")


def _ray_head(port: int, env: dict, *, temp_dir: str) -> subprocess.Popen:
    """Our own head (`--block`, its own session and temp dir): stopped by signalling its process
    group, so other Ray instances on this machine are left alone (unlike `ray stop`). Ready
    when it says so in its log (`ray status` would need the auth token where Ray uses one)."""
    log = Path(temp_dir) / "head.log"
    cmd = [str(BIN / "ray"), "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1",
           f"--temp-dir={temp_dir}", f"--ray-client-server-port={free_port()}", f"--dashboard-port={free_port()}",
           "--num-cpus=4", "--num-gpus=0", "--disable-usage-stats", "--block"]
    head = subprocess.Popen(cmd, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
                            start_new_session=True)
    for _ in range(360):
        if "Ray runtime started" in log.read_text(errors="replace"):
            return head
        if head.poll() is not None:
            break
        time.sleep(0.5)
    sys.exit(f"the Ray head did not start:\n{log.read_text(errors='replace')[-2000:]}")


def _timed(cmd: list[str], *, cwd: Path, env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:3])} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    lrs = [round(0.01 * (i + 1), 4) for i in range(args.trials)]
    fixed = {"resources.workers": 1, "train.max_steps": args.steps, "train.log_every": args.steps,
             "train.eval_every": 0, "checkpoint.every_steps": 0}
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    port = free_port()
    head_dir = tempfile.mkdtemp(prefix="rb-", dir="/tmp")  # short: Ray's unix socket paths
    head = _ray_head(port, env, temp_dir=head_dir)
    address = f"127.0.0.1:{port}"
    try:
        with tempfile.TemporaryDirectory(prefix="temper-tune-bench-") as tmp:
            work = Path(tmp)
            space = work / "space.yaml"
            space.write_text(json.dumps({"space": {"optim.lr": {"grid": lrs}}, "set": fixed,
                                         "tune": {"metric": "val/acc", "num_samples": 1, "search": "grid",
                                                  "max_concurrent_trials": 1, "scheduler": {"kind": "none"}}}))
            sets = [f"{k}={v}" for k, v in fixed.items()]
            (work / "run").mkdir()
            (work / "tune").mkdir()
            run_s = 0.0
            for lr in lrs:
                cmd = [str(BIN / "temper"), "run", JOB, "--address", address, "--set", f"optim.lr={lr}"]
                run_s += _timed(cmd + [a for s in sets for a in ("--set", s)], cwd=work / "run", env=env)
            tune_s = _timed([str(BIN / "temper"), "tune", JOB, "--space", str(space), "--address", address],
                            cwd=work / "tune", env=env)
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=120)
    print(f"{args.trials} trials of {args.steps} steps (tiny ResNet, 1 worker each) on one Ray head")
    print(f"  temper run x {args.trials}, one after another: {run_s:7.1f} s")
    print(f"  temper tune, max_concurrent_trials 1:  {tune_s:7.1f} s")
    print(f"  ratio tune / run: {tune_s / run_s:.2f}  (goal <= 1.0)")


if __name__ == "__main__":
    main()
