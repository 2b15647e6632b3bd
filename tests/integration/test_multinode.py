"""Two real Ray nodes (a head and a worker, separate `ray start` processes), one training
worker per node (`resources.placement=strict_spread`), submitted with `temper submit`.

The nodes run in two network namespaces joined by veth pairs and a bridge when `ip netns`
works (root); else on 127.0.0.1 / 127.0.0.2. Which one ran is printed (pytest -s) and kept
in the assertion messages. Evidence that the ranks ran on different nodes: each worker
reports its node IP and node id, and the driver tags the MLflow run `temper.nodes`.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pytest

from tests.fixtures.cli import TINY_GPT, submitted
from tests.fixtures.cli import temper_to_cluster as temper
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


@pytest.mark.ray
def test_two_nodes_one_worker_each(tmp_path, cluster) -> None:
    nodes, dashboard, server = cluster
    from mlflow import MlflowClient

    proc = temper("submit", TINY_GPT, "--to", dashboard, "--set", f"tracking.uri={server.uri}",
                  "--set", "tracking.experiment=two-nodes", "--set", "train.max_steps=6",
                  "--set", "train.eval_every=0", "--set", "checkpoint.enabled=false",
                  "--set", "resources.workers=2", "--set", "resources.placement=strict_spread",
                  "--follow", cwd=tmp_path)
    job_id, run_id = submitted(proc)
    assert "finished ci-tiny-gpt: 6 steps" in proc.stdout, (nodes.mode, proc.stdout[-3000:])
    assert f"job {job_id} SUCCEEDED" in proc.stderr

    run = MlflowClient(server.uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    placed = dict(part.split("=", 1) for part in run.data.tags["temper.nodes"].split(","))
    assert sorted(placed) == ["0", "1"], placed
    ips = {rank: where.split("/")[0] for rank, where in placed.items()}
    node_ids = {where.split("/")[1] for where in placed.values()}
    assert len(node_ids) == 2 and len(set(ips.values())) == 2, (nodes.mode, placed)
    if nodes.namespaces:
        assert set(ips.values()) == {"10.211.0.1", "10.211.0.2"}, placed
    history = MlflowClient(server.uri).get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]
    assert re.search(r"samples/s", proc.stdout)
    # Every rank's log is in the run, once (the rank on the other node sent its lines through
    # the driver's ProgressSink; the nodes here share a filesystem, so the copy is deduplicated).
    client = MlflowClient(server.uri)
    assert {a.path for a in client.list_artifacts(run_id, "logs")} == {"logs/rank-0.txt", "logs/rank-1.txt"}
    for rank in (0, 1):
        text = Path(client.download_artifacts(run_id, f"logs/rank-{rank}.txt", str(tmp_path))).read_text()
        assert text.count(f"=== rank {rank}, pid") == 1, text[:2000]
