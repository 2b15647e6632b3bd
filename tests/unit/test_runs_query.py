"""Pure pieces of `temper runs` and the registry: spec diff, metric deltas, models:/ references,
the --if-better rule, lineage tags (no MLflow server needed)."""

from __future__ import annotations

import hashlib
import json

import pytest

from temper.checkpoint.manifest import CheckpointManifest, CommittedCheckpoint
from temper.errors import TemperError
from temper.launch.lifecycle import lineage_tags
from temper.tracking.query import diff_lines, metric_table, spec_diff
from temper.tracking.registry import (
    BetterRule,
    build_better_rule,
    check_alias,
    infer_mode,
    parse_model_uri,
)


def test_spec_diff_lists_changed_added_and_removed_keys_sorted() -> None:
    a = {"optim.lr": "0.01", "seed": "1", "train.max_steps": "6", "only.a": "x"}
    b = {"optim.lr": "0.005", "seed": "1", "train.max_steps": "6", "only.b": "y"}
    assert spec_diff(a, b) == [("only.a", "x", None), ("only.b", None, "y"), ("optim.lr", "0.01", "0.005")]
    assert spec_diff(a, dict(a)) == []


def test_diff_lines_are_unified_style() -> None:
    lines = diff_lines([("only.a", "x", None), ("optim.lr", "0.01", "0.005")], a="A r1", b="B r2")
    assert lines == ["--- A r1", "+++ B r2", "-only.a: x", "-optim.lr: 0.01", "+optim.lr: 0.005"]
    assert diff_lines([], a="r1", b="r2") == ["specs of r1 and r2 are identical"]


def test_metric_table_puts_key_metrics_first_with_deltas() -> None:
    a = {"train/loss": 2.0, "val/loss": 2.5, "perf/mfu": 0.1, "system/cpu": 50.0, "only/a": 1.0}
    b = {"train/loss": 1.5, "val/acc": 0.5, "perf/mfu": 0.2, "system/cpu": 60.0}
    rows = metric_table(a, b, ("train/loss", "val/loss", "val/acc", "perf/samples_per_s"))
    assert rows == [("train/loss", 2.0, 1.5, -0.5), ("val/loss", 2.5, None, None),
                    ("val/acc", None, 0.5, None), ("perf/mfu", 0.1, 0.2, pytest.approx(0.1))]


@pytest.mark.parametrize(("uri", "parsed"), [
    ("models:/tiny-gpt/3", ("tiny-gpt", "3", None)),
    ("models:/tiny-gpt@pretrained", ("tiny-gpt", None, "pretrained")),
    ("models:/my_model@best/", ("my_model", None, "best")),
])
def test_parse_model_uri(uri, parsed) -> None:
    assert parse_model_uri(uri) == parsed


@pytest.mark.parametrize("uri", ["models:/tiny-gpt", "runs:/abc/model", "models:/x/latest", "models:/x@"])
def test_parse_model_uri_rejects_other_forms(uri) -> None:
    with pytest.raises(TemperError, match="models:/NAME/VERSION or models:/NAME@ALIAS"):
        parse_model_uri(uri)


@pytest.mark.parametrize(("metric", "mode"), [
    ("val/loss", "min"), ("train/loss", "min"), ("eval/perplexity", "min"), ("val/error_rate", "min"),
    ("val/acc", "max"), ("val/top1_accuracy", "max"), ("val/f1", "max"), ("perf/samples_per_s", "max"),
])
def test_mode_is_inferred_from_the_metric_name(metric, mode) -> None:
    assert infer_mode(metric) == mode
    assert build_better_rule(metric, None) == BetterRule(metric, mode)


def test_unclear_metric_or_bad_mode_needs_an_explicit_mode() -> None:
    with pytest.raises(TemperError, match="add --mode min or --mode max"):
        build_better_rule("val/bpb_gain", None)
    assert build_better_rule("val/bpb_gain", "max") == BetterRule("val/bpb_gain", "max")
    with pytest.raises(TemperError, match="pass min"):
        build_better_rule("val/loss", "lowest")
    with pytest.raises(TemperError, match="--mode needs --if-better"):
        build_better_rule(None, "min")
    assert build_better_rule(None, None) is None


def test_better_is_strict() -> None:
    low, high = BetterRule("val/loss", "min"), BetterRule("val/acc", "max")
    assert low.beats(1.0, 2.0) and not low.beats(2.0, 1.0) and not low.beats(1.0, 1.0)
    assert high.beats(0.9, 0.8) and not high.beats(0.8, 0.9) and not high.beats(0.8, 0.8)


@pytest.mark.parametrize("alias", ["latest", "Latest", "v3", "has space", "a/b", ""])
def test_reserved_or_malformed_aliases_are_refused(alias) -> None:
    with pytest.raises(TemperError, match="--alias"):
        check_alias(alias)
    assert check_alias("best") == "best" and check_alias("pre-trained_2") == "pre-trained_2"


def _ckpt(tmp_path, *, data: dict | None) -> CommittedCheckpoint:
    manifest = CheckpointManifest(
        format_version=1, step=12, engine="dcp", world_size=1, mesh=None, spec_hash="abc123", run_id="r1",
        data=data, files={}, created="2026-01-01T00:00:00+00:00", temper_version="0.1.0",
        extra={"model": {"kind": "gpt"}, "name": "job"})
    return CommittedCheckpoint(path=str(tmp_path / "step-000000012"), manifest=manifest)


def test_lineage_tags_link_run_checkpoint_and_data_manifest(tmp_path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text(json.dumps({"format": "tokens", "shards": []}))
    digest = hashlib.sha256((shards / "manifest.json").read_bytes()).hexdigest()
    spec = {"data": {"kind": "webdataset", "train": str(shards), "eval": str(tmp_path / "missing")}}
    tags = lineage_tags(_ckpt(tmp_path, data={"fingerprint": "f00d"}), spec=spec)
    assert tags["temper.run_id"] == "r1" and tags["temper.step"] == "12"
    assert tags["temper.checkpoint"] == str(tmp_path / "step-000000012")
    assert tags["temper.spec_hash"] == "abc123" and tags["temper.model_kind"] == "gpt"
    assert tags["temper.data_manifest"] == f"sha256:{digest}"
    assert tags["temper.data.train"] == str(shards) and tags["temper.data_fingerprint"] == "f00d"
    assert "temper.data_manifest.eval" not in tags  # unreadable: left out (with a warning), not guessed
    # Shard URL patterns find the manifest beside the shards.
    pattern = {"data": {"kind": "webdataset", "train": f"{shards}/x-{{000000..000001}}.tar"}}
    assert lineage_tags(_ckpt(tmp_path, data=None), spec=pattern)["temper.data_manifest"] == f"sha256:{digest}"


def test_lineage_tags_of_synthetic_data_have_no_data_manifest(tmp_path) -> None:
    tags = lineage_tags(_ckpt(tmp_path, data={"epoch": 0}), spec={"data": {"kind": "synthetic"}})
    assert not any(k.startswith("temper.data") for k in tags)
