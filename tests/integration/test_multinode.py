"""Two real Ray nodes (a head and a worker, separate `ray start` processes), one training
worker per node (`resources.placement=strict_spread`), submitted with `temper submit`; the
job is elastic (min_workers=1), and loses the second node mid-run and gets it back.

The nodes run in two network namespaces joined by veth pairs and a bridge when `ip netns`
works (root); else on 127.0.0.1 / 127.0.0.2. Which one ran is printed (pytest -s) and kept
in the assertion messages. Evidence that the ranks ran on different nodes: each worker
reports its node IP and node id, and the driver tags the MLflow run `temper.nodes`.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.fixtures.cli import TEMPER as TEMPER_BIN
from tests.fixtures.cli import TINY_GPT, submitted
from tests.fixtures.mlflow_server import MlflowServer
from tests.fixtures.ray_jobs import two_nodes


@pytest.fixture(scope="module")
def cluster():
    nodes, dashboard = two_nodes()
    try:
        with MlflowServer(Path(tempfile.mkdtemp(prefix="mlflow-2n-")), host=nodes.host_ip) as server:
            print(f"\ntwo-node cluster: {nodes.mode}")
            yield nodes, dashboard, server
    finally:
        nodes.stop()


def _wait_for(path: Path, proc, *, what: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert proc.poll() is None, f"the job ended while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what} ({path})"
        time.sleep(0.2)


def _trained(trace: Path) -> dict[int, set[str]]:
    """The samples each step finally trained on: per step, the keys of the last worker group
    that trained it (a group that resumed from an earlier checkpoint trains later steps again)."""
    groups: dict[tuple[int, int], dict[int, list[str]]] = {}
    for path in trace.glob("ws*-from*-rank*.tsv"):
        ws, start = (int(x) for x in re.match(r"ws(\d+)-from(\d+)-rank\d+", path.name).groups())
        steps = groups.setdefault((start, ws), {})
        for line in path.read_text().splitlines():
            step, key = line.split("\t")
            steps.setdefault(int(step), []).append(key)
    final: dict[int, list[str]] = {}
    for (_start, _ws), steps in sorted(groups.items()):  # later groups start later
        for step, keys in steps.items():
            final[step] = keys
    assert all(len(k) == len(set(k)) for k in final.values()), "a sample trained twice in one step"
    return {step: set(keys) for step, keys in final.items()}


@pytest.mark.ray
def test_two_nodes_lose_one_shrink_and_grow_back(tmp_path, cluster) -> None:
    """workers=2, min_workers=1: the second node is killed at step 4 (its raylet and all it
    ran), the job goes on at 1 worker (grad_accum 2) from the step-4 checkpoint; the node comes
    back at step 8 and the job grows to 2 workers again. One MLflow run, every step logged
    once, perf/world_size 2 -> 1 -> 2, and each epoch's samples trained exactly once (each
    rank writes the keys it trains on: TEMPER_TRACE_SAMPLES). TEMPER_HOLD pauses the ranks
    before a step while the test changes the cluster, so the phases do not depend on timing."""
    nodes, dashboard, server = cluster
    from mlflow import MlflowClient

    from tests.fixtures.shard_servers import write_shards

    shards, trace, hold = tmp_path / "shards", tmp_path / "trace", tmp_path / "hold"
    write_shards(shards, [24, 24, 24, 24])  # 96 samples: 12 steps of 2 x 4 per epoch
    hold.write_text("4")
    cmd = [TEMPER_BIN, "submit", TINY_GPT, "--to", dashboard, "--follow",
           "--set", "model={kind: gpt, flavor: tiny, seq_len: 8}",
           "--set", f"data={{kind: webdataset, train: {shards}, num_workers: 0, verify: none}}",
           "--set", "train.micro_batch_size=4", "--set", "train.max_steps=24", "--set", "train.eval_every=0",
           "--set", "checkpoint.every_steps=2", "--set", f"checkpoint.dir={tmp_path / 'runs'}",
           "--set", "resources.workers=2", "--set", "resources.min_workers=1",
           "--set", "resources.resize_interval_s=2", "--set", "resources.placement=strict_spread",
           "--set", f"tracking.uri={server.uri}", "--set", "tracking.experiment=elastic-nodes"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "TEMPER_CLUSTER", "MLFLOW_TRACKING_URI")}
    env |= {"TEMPER_TRACE_SAMPLES": str(trace), "TEMPER_HOLD": str(hold),
            "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10"}  # Ray tries the lost size first, this long
    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=err)
        try:
            _wait_for(Path(f"{hold}.waiting-step5-ws2-rank0"), proc, what="2 workers at step 4")
            nodes.kill_worker()
            _wait_for(Path(f"{hold}.waiting-step5-ws1-rank0"), proc, what="1 worker after the node loss")
            hold.write_text("8")
            _wait_for(Path(f"{hold}.waiting-step9-ws1-rank0"), proc, what="1 worker at step 8")
            nodes.restart_worker()
            _wait_for(Path(f"{hold}.waiting-step9-ws2-rank1"), proc, what="2 workers after the node came back")
            hold.write_text("999")
            code = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    stdout, stderr = (tmp_path / "out.txt").read_text(), (tmp_path / "err.txt").read_text()
    assert code == 0, (nodes.mode, stderr[-4000:])
    job_id, run_id = submitted(subprocess.CompletedProcess(cmd, 0, stdout, stderr))
    assert "finished ci-tiny-gpt: 24 steps" in stdout, (nodes.mode, stdout[-3000:])
    assert f"job {job_id} SUCCEEDED" in stderr and re.search(r"samples/s", stdout)

    client = MlflowClient(server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    def history(key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
    assert [s for s, _ in history("train/loss")] == list(range(1, 25))  # every step once
    sizes = history("perf/world_size")
    assert sizes == [(s, 1.0 if 5 <= s <= 8 else 2.0) for s in range(1, 25)], sizes
    accum = history("train/grad_accum")
    assert accum == [(s, 2.0 if 5 <= s <= 8 else 1.0) for s in range(1, 25)], accum
    events = sorted(k for k in run.data.tags if ".resize-" in k)
    assert events == ["temper.event.step-000004.resize-1", "temper.event.step-000008.resize-2"], events

    # The last worker group ran on both nodes (each rank reports its node IP and id).
    placed = dict(part.split("=", 1) for part in run.data.tags["temper.nodes"].split(","))
    assert sorted(placed) == ["0", "1"], placed
    ips = {rank: where.split("/")[0] for rank, where in placed.items()}
    assert len({where.split("/")[1] for where in placed.values()}) == 2 and len(set(ips.values())) == 2, placed
    if nodes.namespaces:
        assert set(ips.values()) == {f"{nodes.subnet}.1", f"{nodes.subnet}.2"}, placed
    # Every rank's log is in the run, each attempt once (the rank on the other node sent its
    # lines through the driver's ProgressSink; the nodes share a filesystem here, so the copy
    # is deduplicated): rank 0 ran in 3 worker groups, rank 1 in 2.
    assert {a.path for a in client.list_artifacts(run_id, "logs")} == {"logs/rank-0.txt", "logs/rank-1.txt"}
    for rank, attempts in ((0, 3), (1, 2)):
        text = Path(client.download_artifacts(run_id, f"logs/rank-{rank}.txt", str(tmp_path))).read_text()
        assert text.count(f"=== rank {rank}, pid") == attempts, text[:3000]

    trained = _trained(trace)
    assert sorted(trained) == list(range(1, 25))
    assert all(len(keys) == 8 for keys in trained.values()), {s: len(k) for s, k in trained.items()}
    every = {f"toy/{i:09d}" for i in range(96)}
    for epoch in (0, 1):
        seen = [k for s in range(12 * epoch + 1, 12 * epoch + 13) for k in trained[s]]
        assert len(seen) == 96 and set(seen) == every, f"epoch {epoch}: not each sample exactly once"
