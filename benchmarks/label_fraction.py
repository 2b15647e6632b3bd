"""Does self-supervised pretraining help when labels are scarce? (issue 6's evidence)

Runs jobs/digits-ssl-pipeline.yaml end to end on scikit-learn's real 8x8 digits: SimCLR
pretraining of a tiny ResNet without labels, then, at 2%, 5%, 10% and 100% of the 1400
training labels and 3 seeds each (the seed picks both the label subset and the init),
    finetune   all weights trained from the SimCLR backbone
    probe      the SimCLR backbone frozen, a linear head trained (linear probe)
    scratch    the same network from random weights
and prints held-out accuracy (397 digits never seen in training) as mean ± std over seeds,
plus the fine-tune's gain over scratch at each fraction. Everything is recorded in a
local MLflow store (one parent run, the table and the plot as its files).

    .venv/bin/python benchmarks/label_fraction.py [--workdir DIR] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIPELINE = ROOT / "jobs" / "digits-ssl-pipeline.yaml"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="Where data/, mlflow.db and runs go.")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="Override every stage.")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="temper-label-fraction-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)
    temper = Path(sys.executable).with_name("temper")
    if not (workdir / "data" / "digits" / "manifest.json").exists():
        subprocess.run([str(temper), "data", "pack", "digits", "data/digits", "--format", "digits",
                        "--shard-size", "200"], check=True)

    import torch

    from temper.launch import build_launcher
    from temper.launch.pipeline import run_pipeline, summarize
    from temper.spec.pipeline import load_pipeline

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    pipeline = load_pipeline(PIPELINE)
    started = time.perf_counter()
    # torchrun: the pretraining keeps its 2 workers (SimCLR's negatives span both ranks)
    result = run_pipeline(pipeline, path=PIPELINE, launcher_factory=lambda: build_launcher("torchrun"),
                          workdir=workdir, cli_sets=[f"tracking.uri=sqlite:///{workdir}/mlflow.db", *args.sets])
    minutes = (time.perf_counter() - started) / 60
    curves = {stage: {x: (m, s) for x, m, s, _ in pts} for stage, pts in summarize(pipeline, result.runs).items()}
    print(f"\nlabel-fraction study on digits ({len(result.runs)} runs, {minutes:.1f} min, {workdir}): the table above")
    print("\n| fraction | finetune - scratch (points) | probe - scratch (points) |\n|---|---|---|")
    for x in sorted(curves.get("scratch", {})):
        base = curves["scratch"][x][0]
        gains = [f"{100 * (curves[s][x][0] - base):+.1f}" if x in curves.get(s, {}) else "-"
                 for s in ("finetune", "probe")]
        print(f"| {x:g} | {gains[0]} | {gains[1]} |")
    print(f"\nMLflow parent run {result.parent_run_id}: mlflow ui --backend-store-uri {result.tracking_uri}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
