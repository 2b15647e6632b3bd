"""`temper export RUN_ID|CHECKPOINT`: consolidated weights + model config, optionally
registered as an MLflow model version (with lineage tags and aliases: see
temper.tracking.registry).

A run id is looked up in MLflow (its `temper.checkpoint_dir` tag names the run's checkpoint
folder); a folder is used as is (a run folder means its newest committed checkpoint).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from temper.checkpoint.resume import looks_like_path
from temper.console import console
from temper.errors import TemperError
from temper.tracking.registry import BetterRule

if TYPE_CHECKING:
    from temper.checkpoint.manifest import CommittedCheckpoint

log = logging.getLogger(__name__)


def _run_checkpoint_dir(run_id: str, *, tracking_uri: str | None) -> tuple[str, str]:
    """(checkpoint folder, tracking uri) of an MLflow run."""
    from mlflow import MlflowClient

    from temper.tracking.runs import check_reachable, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri, workdir=Path.cwd())
    check_reachable(uri)
    try:
        run = MlflowClient(tracking_uri=uri).get_run(run_id)
    except Exception:  # noqa: BLE001 - MlflowException for an unknown id
        raise TemperError(f"run {run_id!r} is not in {uri}; pass --tracking-uri, or a checkpoint folder") from None
    folder = run.data.tags.get("temper.checkpoint_dir")
    if not folder:
        raise TemperError(f"run {run_id} has no temper.checkpoint_dir tag (checkpointing was off); "
                          "pass its checkpoint folder instead")
    return folder, uri


@dataclass(frozen=True)
class RegisterOptions:
    """`temper export --register NAME [--alias A ...] [--if-better METRIC [--mode min|max]]`."""

    name: str
    aliases: tuple[str, ...] = ()
    better: BetterRule | None = None
    description: str | None = None


def export_command(source: str, *, out: Path, tracking_uri: str | None,
                   register: RegisterOptions | None = None) -> Path:
    from temper.checkpoint import export_checkpoint, find_latest, read_checkpoint

    uri = None
    folder = source if looks_like_path(source) else None
    if folder is None:
        folder, uri = _run_checkpoint_dir(source, tracking_uri=tracking_uri)
    if out.exists() and any(out.iterdir()):
        raise TemperError(f"--out {out} is not empty; pass an empty or new folder")
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3")  # s3:// folders on S3-compatible stores
    opts = {"client_kwargs": {"endpoint_url": endpoint}} if endpoint and "://" in folder else None
    ckpt = find_latest(folder, storage_options=opts) or read_checkpoint(folder, storage_options=opts)
    client = run = None
    if register:  # everything --register needs is checked before anything is written
        client, run = _registration_run(ckpt, tracking_uri=uri or tracking_uri, options=register)
    written = export_checkpoint(ckpt.path, str(out), storage_options=opts)
    console.print(f"exported step {ckpt.manifest.step} of {ckpt.path} to {written}")
    if register:
        register_export(Path(written), ckpt=ckpt, options=register, client=client, run=run)
    return Path(written)


def _registration_run(ckpt: CommittedCheckpoint, *, tracking_uri: str | None,
                      options: RegisterOptions) -> tuple[Any, Any]:
    """(MlflowClient, the checkpoint's run); the --if-better metric must be in that run."""
    from mlflow import MlflowClient

    from temper.tracking.registry import run_metric
    from temper.tracking.runs import check_reachable, resolve_tracking_uri

    run_id = ckpt.manifest.run_id
    if not run_id:
        raise TemperError("--register needs a checkpoint written by a tracked run (tracking.enabled=true)")
    uri = resolve_tracking_uri(tracking_uri, workdir=Path.cwd())
    check_reachable(uri)
    client = MlflowClient(tracking_uri=uri)
    try:
        run = client.get_run(run_id)
    except Exception:  # noqa: BLE001 - MlflowException for an unknown id
        raise TemperError(f"--register: run {run_id} (of {ckpt.path}) is not in {uri}; "
                          "pass the --tracking-uri it was logged to") from None
    better = options.better
    if better is not None and run_metric(run, better) is None:
        raise TemperError(f"--if-better {better.metric}: run {run_id} logged no {better.metric}; "
                          f"pick a metric it has ({', '.join(sorted(run.data.metrics)) or 'none'})")
    return client, run


def register_export(folder: Path, *, ckpt: CommittedCheckpoint, options: RegisterOptions,
                    client: Any, run: Any) -> str:
    """Log `folder` (model.safetensors + config.json) under the run's artifacts `model/`,
    register it as a version of `options.name` with lineage tags, and set the aliases."""
    from temper.tracking.query import spec_artifact
    from temper.tracking.registry import register_version

    run_id = run.info.run_id
    tags = lineage_tags(ckpt, spec=spec_artifact(client, run_id))
    description = options.description or (
        f"{run.info.run_name or 'run'} step {ckpt.manifest.step}, exported by temper from "
        f"{ckpt.path} (run {run_id})")
    result = register_version(folder, client=client, name=options.name, run_id=run_id, tags=tags,
                              description=description, aliases=options.aliases, better=options.better)
    console.print(f"registered as MLflow model {options.name} version {result.version} (run {run_id})")
    for alias in result.moved:
        console.print(f"  @{alias} -> version {result.version}  (models:/{options.name}@{alias})")
    for why in result.kept.values():
        console.print(f"  {why}")
    return result.version


def lineage_tags(ckpt: CommittedCheckpoint, *, spec: dict | None) -> dict[str, str]:
    """Tags linking a model version to its run, checkpoint and training data."""
    m = ckpt.manifest
    tags = {"temper.source": "temper export", "temper.run_id": m.run_id or "",
            "temper.checkpoint": ckpt.path, "temper.step": str(m.step), "temper.spec_hash": m.spec_hash}
    model = m.extra.get("model") or {}
    if model.get("kind"):
        tags["temper.model_kind"] = str(model["kind"])
    fingerprint = (m.data or {}).get("fingerprint")
    if fingerprint:
        tags["temper.data_fingerprint"] = str(fingerprint)  # what a resume checks the shards against
    tags.update(data_manifest_tags((spec or {}).get("data") or {}))
    return tags


def data_manifest_tags(data: dict) -> dict[str, str]:
    """temper.data.train/eval (where) and temper.data_manifest[.eval] (sha256 of the shards'
    manifest.json: what) for a `data:` section; nothing for synthetic data."""
    tags: dict[str, str] = {}
    if data.get("kind") != "webdataset":
        return tags
    for split, tag in (("train", "temper.data_manifest"), ("eval", "temper.data_manifest.eval")):
        if data.get(split):
            tags[f"temper.data.{split}"] = str(data[split])
            digest = _manifest_sha256(str(data[split]), data=data)
            if digest:
                tags[tag] = f"sha256:{digest}"
    subset = data.get("subset")
    if subset:
        tags["temper.data.subset"] = f"fraction={subset['fraction']},seed={subset['seed']}"
    return tags


def _manifest_sha256(source: str, *, data: dict) -> str | None:
    """sha256 of the manifest.json a data.train/data.eval value names (None: none or unreadable)."""
    from temper.data import io
    from temper.data.manifest import MANIFEST_NAME

    last = source.rstrip("/").rsplit("/", 1)[-1]
    if last.endswith(".json"):
        url = source
    elif ".tar" in last:
        url = io.join(io.parent(io.expand(source)[0]), MANIFEST_NAME)
    else:
        url = io.join(source, MANIFEST_NAME)
    options = io.IOOptions(s3_endpoint_url=data.get("s3_endpoint_url"), timeout_s=float(data.get("timeout_s", 60)))
    try:
        return hashlib.sha256(io.read_bytes(url, options=options)).hexdigest()
    except Exception as e:  # noqa: BLE001 - lineage is best effort: the export itself is fine
        log.warning("no temper.data_manifest tag: cannot read %s (%s)", url, e)
        return None


def register_run_model(spec, *, handle, checkpoint_dir: str | None) -> str | None:
    """tracking.register_model: the finished run's last checkpoint, exported and registered
    (aliases tracking.register_aliases). A failure is a warning: the training itself is done."""
    import tempfile

    from temper.checkpoint import find_latest

    name = spec.tracking.register_model
    try:
        if not checkpoint_dir:
            raise TemperError("checkpointing is off (checkpoint.enabled=false)")
        ckpt = find_latest(checkpoint_dir)
        if ckpt is None:
            raise TemperError(f"no committed checkpoint in {checkpoint_dir}")
        options = RegisterOptions(name=name, aliases=tuple(spec.tracking.register_aliases))
        client, run = _registration_run(ckpt, tracking_uri=handle.tracking_uri, options=options)
        with tempfile.TemporaryDirectory(prefix="temper-register-") as tmp:
            from temper.checkpoint import export_checkpoint

            folder = export_checkpoint(ckpt.path, str(Path(tmp) / "model"))
            return register_export(Path(folder), ckpt=ckpt, options=options, client=client, run=run)
    except Exception as e:  # noqa: BLE001 - reported; the run itself finished
        console.print(f"[yellow]warning:[/yellow] tracking.register_model {name}: not registered ({e})")
        return None
