"""GPU tier of the failure tooling (docs/troubleshooting.md): what only CUDA has.

- train.profile on CUDA: the trace holds CUDA kernels, and the allocator snapshot is written;
  an out-of-memory death writes its own snapshot (rank-N-oom-memory.pickle).
- NCCL's flight recorder dumps each rank's record on a collective timeout (needs 2 GPUs).
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from temper.run_info import RunInfo
from temper.spec import load_spec, spec_to_json

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
ROOT = Path(__file__).resolve().parents[2]


def test_cuda_profile_and_the_out_of_memory_snapshot(tmp_path, monkeypatch) -> None:
    from temper.errors import WorkerFailedError
    from temper.runtime.entry import run_worker

    spec = load_spec(str(ROOT / "jobs" / "ci" / "tiny-gpt.yaml"), [
        "resources.workers=1", "resources.gpus_per_worker=1", "train.device=cuda", "tracking.enabled=false",
        "train.max_steps=8", "checkpoint.enabled=false", "train.profile.start_step=2", "train.profile.steps=2",
    ])
    monkeypatch.setenv("TEMPER_FAULT", "oom:6:0")
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"})
    with pytest.raises(WorkerFailedError, match="OutOfMemoryError"):
        run_worker(spec_to_json(spec), RunInfo(run_folder=str(tmp_path)))
    profile = tmp_path / "profile"
    trace = gzip.decompress((profile / "rank-0.trace.json.gz").read_bytes()).decode()
    assert '"cat": "kernel"' in trace or '"cat":"kernel"' in trace  # CUDA kernels were recorded
    assert "CUDA" in (profile / "rank-0-top-ops.txt").read_text()
    assert (profile / "rank-0-memory.pickle").stat().st_size > 0
    assert (profile / "rank-0-oom-memory.pickle").stat().st_size > 0
    assert "OutOfMemoryError" in (tmp_path / "logs" / "rank-0.txt").read_text()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="the flight recorder needs 2 NCCL ranks (2 GPUs)")
def test_nccl_flight_recorder_dumps_on_a_collective_timeout(tmp_path) -> None:
    cmd = [sys.executable, "-c", "import sys; from temper.cli import main; sys.exit(main())", "run", str(ROOT / "jobs" / "ci" / "tiny-gpt.yaml"),
           "--launcher", "torchrun", "--set", "resources.workers=2", "--set", "resources.gpus_per_worker=1",
           "--set", "train.device=cuda", "--set", "fault.collective_timeout_s=20", "--set", "train.max_steps=6",
           "--set", "checkpoint.enabled=false", "--set", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    proc = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "TEMPER_FAULT": "hang:3:1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "rank(s) 1 never reached it" in proc.stderr.splitlines()[-1]
    dumps = list((tmp_path / ".temper" / "runs").glob("*/nccl/rank_*"))
    assert any(d.name == "rank_0" for d in dumps), (dumps, proc.stderr[-2000:])
