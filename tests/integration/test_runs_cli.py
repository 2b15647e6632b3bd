"""`temper runs`, `temper runs compare`, `temper export --register --alias [--if-better]` and
`resolve_model_uri`, against the session's real MLflow server.

Two real 6-step training runs (same packed token shards, optim.lr 0.01 vs 1e-4) are recorded
once per module; a third, FAILED run is created through the MLflow client (its status is all
the listing tests need).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fixtures.cli import TINY_GPT, run_id_of, temper


@dataclass(frozen=True)
class Runs:
    uri: str
    experiment: str
    experiment_id: str
    a: str  # optim.lr 0.01
    b: str  # optim.lr 1e-4
    failed: str
    root: Path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, mlflow_server, client) -> Runs:
    root = tmp_path_factory.mktemp("runs-cli")
    packed = temper("data", "pack", "tokens", "tok", "--format", "synthetic", "--seq-len", "16", "--limit", "256",
                    "--shard-size", "128", cwd=root)
    assert packed.returncode == 0, packed.stderr[-2000:]
    experiment = f"runs-cli-{uuid.uuid4().hex[:8]}"
    data = f"{{kind: webdataset, train: {root}/tok, eval: {root}/tok, num_workers: 0}}"
    common = ["--launcher", "inprocess", "--set", "resources.workers=1", "--set", "train.max_steps=6",
              "--set", "train.eval_every=3", "--set", "model.vocab_size=257", "--set", f"data={data}",
              "--set", f"tracking.uri={mlflow_server.uri}", "--set", f"tracking.experiment={experiment}"]
    ids = []
    for name, lr in (("a", "0.01"), ("b", "1e-4")):
        (root / name).mkdir()
        proc = temper("run", TINY_GPT, *common, "--set", f"optim.lr={lr}", cwd=root / name)
        assert proc.returncode == 0, proc.stderr[-4000:]
        ids.append(run_id_of(proc.stderr))
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    failed = client.create_run(experiment_id, run_name="crashed").info.run_id
    client.set_terminated(failed, status="FAILED")
    return Runs(mlflow_server.uri, experiment, experiment_id, *ids, failed, root)


def link(runs: Runs, run_id: str) -> str:
    return f"{runs.uri}/#/experiments/{runs.experiment_id}/runs/{run_id}"


def line_of(output: str, needle: str) -> str:
    return next(line for line in output.splitlines() if needle in line)


def test_runs_lists_newest_first_with_key_metrics_and_links(runs, client) -> None:
    proc = temper("runs", "--experiment", runs.experiment, "--tracking-uri", runs.uri, cwd=runs.root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stderr
    header = line_of(out, "run id")
    for column in ("name", "status", "start", "duration", "steps", "train/loss", "val/loss", "samples/s"):
        assert column in header
    rows = [line_of(out, run_id) for run_id in (runs.failed, runs.b, runs.a)]
    assert [out.index(row) for row in rows] == sorted(out.index(row) for row in rows)  # newest first
    assert "FAILED" in rows[0] and "crashed" in rows[0]
    for row, run_id in zip(rows[1:], (runs.b, runs.a), strict=True):
        metrics = client.get_run(run_id).data.metrics
        cells = row.split()
        assert cells[:3] == ["ci-tiny-gpt", run_id, "FINISHED"] and cells[6] == "6"  # steps
        for key in ("train/loss", "val/loss", "perf/samples_per_s"):
            assert f"{metrics[key]:.4g}" in cells, (key, row)
    for run_id in (runs.failed, runs.b, runs.a):
        assert link(runs, run_id) in out

    failed = temper("runs", "--experiment", runs.experiment, "--status", "failed", "--tracking-uri", runs.uri,
                    cwd=runs.root)
    assert failed.returncode == 0 and runs.failed in failed.stderr
    assert runs.a not in failed.stderr and runs.b not in failed.stderr
    newest = temper("runs", "--experiment", runs.experiment, "--limit", "2", env={"MLFLOW_TRACKING_URI": runs.uri},
                    cwd=runs.root)
    assert newest.returncode == 0 and runs.failed in newest.stderr and runs.b in newest.stderr
    assert runs.a not in newest.stderr


def test_runs_on_an_sqlite_store_print_the_mlflow_ui_command(runs, mlflow_server) -> None:
    store = mlflow_server.backend_store_uri  # the server's own store, read directly
    proc = temper("runs", "--experiment", runs.experiment, "--tracking-uri", store, cwd=runs.root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert runs.a in proc.stderr and runs.b in proc.stderr
    assert f"MLflow UI: mlflow ui --backend-store-uri {store}" in proc.stderr
    assert "/#/experiments/" not in proc.stderr


def test_runs_compare_prints_the_spec_diff_and_final_metrics(runs, client) -> None:
    proc = temper("runs", "compare", runs.a, runs.b, "--tracking-uri", runs.uri, cwd=runs.root)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stderr
    diff = [line for line in out.splitlines() if line.startswith(("-", "+")) and line[:3] not in ("---", "+++")]
    assert diff == ["-optim.lr: 0.01", "+optim.lr: 0.0001"]  # the only difference, from spec.yaml
    assert "spec diff (from spec.yaml)" in out and f"--- A {runs.a}" in out and f"+++ B {runs.b}" in out
    a, b = client.get_run(runs.a).data.metrics, client.get_run(runs.b).data.metrics
    for key in ("train/loss", "val/loss"):
        assert line_of(out, key).split()[1:] == [f"{a[key]:.4g}", f"{b[key]:.4g}", f"{b[key] - a[key]:+.4g}"]
    assert link(runs, runs.a) in out and link(runs, runs.b) in out


def test_unknown_run_experiment_or_status_is_one_line(runs) -> None:
    uri = ["--tracking-uri", runs.uri]
    for args, message in (
        (["runs", "compare", runs.a, "0123456789abcdef", *uri], "run '0123456789abcdef' is not in"),
        (["runs", "--experiment", "no-such-experiment", *uri], "experiment 'no-such-experiment' is not in"),
        (["runs", "--status", "done", *uri], "--status 'done' is not one of"),
    ):
        proc = temper(*args, cwd=runs.root)
        assert proc.returncode == 2, proc.stderr[-2000:]
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], proc.stderr
        assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Registered:
    name: str
    better: str  # the run with the lower val/loss
    worse: str
    outputs: list[str]


@pytest.fixture(scope="module")
def registered(runs, client) -> Registered:
    """worse -> v1 (@pretrained, @best: nobody held it); better -> v2 (@best moves);
    worse again -> v3 (@best stays on v2)."""
    losses = {r: client.get_run(r).data.metrics["val/loss"] for r in (runs.a, runs.b)}
    assert losses[runs.a] != losses[runs.b]
    better, worse = sorted(losses, key=losses.get)
    name = f"{runs.experiment}-model"
    outputs = []
    for i, (run_id, aliases) in enumerate(((worse, ["pretrained", "best"]), (better, ["best"]), (worse, ["best"]))):
        args = [a for alias in aliases for a in ("--alias", alias)]
        proc = temper("export", run_id, "-o", f"out{i}", "--tracking-uri", runs.uri, "--register", name, *args,
                      "--if-better", "val/loss", cwd=runs.root)
        assert proc.returncode == 0, proc.stderr[-4000:]
        outputs.append(proc.stderr)
    return Registered(name, better, worse, outputs)


def test_best_alias_moves_only_to_a_better_run(registered, client) -> None:
    name = registered.name
    assert client.get_model_version_by_alias(name, "pretrained").version == "1"
    assert client.get_model_version_by_alias(name, "best").version == "2"
    assert client.get_model_version(name, "2").run_id == registered.better
    assert client.get_model_version(name, "3").run_id == registered.worse  # registered, but not @best
    assert f"@best -> version 2  (models:/{name}@best)" in registered.outputs[1]
    assert "version 2 keeps @best: its val/loss" in registered.outputs[2]


def test_model_version_tags_link_run_checkpoint_spec_and_data(registered, runs, client) -> None:
    version = client.get_model_version(registered.name, "2")
    run = client.get_run(registered.better)
    tags = version.tags
    assert tags["temper.run_id"] == registered.better and tags["temper.step"] == "6"
    assert tags["temper.spec_hash"] == run.data.tags["temper.spec_hash"]
    assert Path(tags["temper.checkpoint"]) == Path(run.data.tags["temper.checkpoint_dir"]) / "step-000000006"
    manifest = hashlib.sha256((runs.root / "tok" / "manifest.json").read_bytes()).hexdigest()
    assert tags["temper.data_manifest"] == f"sha256:{manifest}"
    assert tags["temper.data.train"] == str(runs.root / "tok")
    assert float(tags["temper.metric.val/loss"]) == run.data.metrics["val/loss"]
    assert registered.better in version.description and "step 6" in version.description


def test_resolve_model_uri_by_version_and_alias(registered, runs, tmp_path) -> None:
    from safetensors.torch import load_file

    from temper.errors import TemperError
    from temper.tracking.registry import resolve_model_uri

    folder, info = resolve_model_uri(f"models:/{registered.name}@best", runs.uri, cache_dir=tmp_path)
    assert info.version == "2" and info.run_id == registered.better and "best" in info.aliases
    config = json.loads((folder / "config.json").read_text())
    assert config["source"]["run_id"] == registered.better and config["model"]["kind"] == "gpt"
    assert load_file(folder / "model.safetensors")  # real weights, not an empty file
    folder1, info1 = resolve_model_uri(f"models:/{registered.name}/1", runs.uri, cache_dir=tmp_path)
    assert info1.run_id == registered.worse and folder1 != folder
    assert json.loads((folder1 / "config.json").read_text())["source"]["run_id"] == registered.worse
    for uri, message in ((f"models:/{registered.name}@champion", "has no alias @champion"),
                         (f"models:/{registered.name}/99", "has no version 99"),
                         ("models:/no-such-model/1", "model 'no-such-model' has no version 1")):
        with pytest.raises(TemperError, match=message):
            resolve_model_uri(uri, runs.uri, cache_dir=tmp_path)


def test_export_option_mistakes_are_caught_before_writing(runs) -> None:
    uri = ["--tracking-uri", runs.uri]
    for args, message in (
        (["--register", "m", "--alias", "latest"], "--alias 'latest'"),
        (["--register", "m", "--alias", "best", "--if-better", "val/nope", "--mode", "min"], "logged no val/nope"),
    ):
        proc = temper("export", runs.a, "-o", "never", *uri, *args, cwd=runs.root)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
        assert not (runs.root / "never").exists()
