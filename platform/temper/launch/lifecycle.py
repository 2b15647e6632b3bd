"""A model's lifecycle on the driver: init_from before the workers start, export and
registration after, and the lineage tags that link them in MLflow.

(The worker side, reading weights out of checkpoints and export folders, is
checkpoint/weights.py; MLflow's registry calls are tracking/registry.py.)

    plan_init_from(spec)     before any worker starts
      checkpoint folder     -> used as is (relative paths against where `temper run` runs)
      runs:/ID              -> that run's checkpoint folder (its temper.checkpoint_dir tag)
      models:/NAME@ALIAS|/V -> the version's exported files, downloaded once into the cache
      -> open the weights, match them against the job's model (a backbone that does not fit
         is an error now, not after the cluster started), print what loads, and return
         where the workers read them (RunInfo.init_from) plus the lineage tags for the new
         run: temper.parent_run_id, temper.init_from[.checkpoint|.step|.model_version|
         .data_manifest|.loaded|.new|.ignored]

    export_command(RUN_ID|CHECKPOINT)   `temper export`: consolidated weights + model config,
      optionally registered as an MLflow model version (lineage tags, aliases). A run id is
      looked up in MLflow (its `temper.checkpoint_dir` tag names the run's checkpoint folder);
      a folder is used as is (a run folder means its newest committed checkpoint).
    register_run_model(...)  tracking.register_model: the same after a finished run
    data_manifest_tags / lineage_tags   what a run or a model version says it was trained on
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from temper.checkpoint.resume import looks_like_path
from temper.console import console
from temper.errors import TemperError
from temper.run_info import InitFromLocation
from temper.spec.job import JobSpec
from temper.tracking.registry import BetterRule

if TYPE_CHECKING:
    from temper.checkpoint.manifest import CommittedCheckpoint

log = logging.getLogger(__name__)


# --- init_from ---
@dataclass
class InitPlan:
    location: InitFromLocation  # RunInfo.init_from: what weights_for_worker reads
    tags: dict[str, str] = field(default_factory=dict)
    summary: str = ""


def _storage_options(path: str) -> dict | None:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3")
    return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint and path.startswith("s3://") else None


def plan_init_from(spec: JobSpec, *, workdir: Path) -> InitPlan | None:
    source = spec.init_from
    if source is None:
        return None
    from temper.checkpoint.weights import compare, open_weights

    tags = {"temper.init_from": source.source}
    model_uri = uri = None
    if source.kind == "run":
        run_id = source.source[len("runs:/"):].strip("/")
        path, uri = run_checkpoint_dir(run_id, tracking_uri=spec.tracking.uri)
        tags["temper.parent_run_id"] = run_id
    elif source.kind == "model":
        from temper.tracking.registry import resolve_model_uri
        from temper.tracking.runs import resolve_tracking_uri

        uri = resolve_tracking_uri(spec.tracking.uri, workdir=workdir)
        folder, info = resolve_model_uri(source.source, uri)
        path = str(folder)
        tags["temper.init_from.model_version"] = f"{info.name}/{info.version}"
        if info.run_id:
            tags["temper.parent_run_id"] = info.run_id
        model_uri = f"models:/{info.name}/{info.version}"
    else:
        path = source.source
        if "://" not in path and not os.path.isabs(path):
            path = str(Path.cwd() / path)
        if "://" not in path and not Path(path).exists():
            raise TemperError(f"init_from: {source.source} does not exist; pass a checkpoint folder, runs:/RUN_ID "
                              "or models:/NAME@ALIAS")
    options = _storage_options(path)
    weights = open_weights(path, storage_options=options)
    match = compare(weights, model_spec=spec.model, objective=spec.objective, source=source.source)
    location = InitFromLocation(path=weights.path, storage_options=options, model_uri=model_uri, tracking_uri=uri)
    tags["temper.init_from.checkpoint"] = weights.origin
    if weights.step is not None:
        tags["temper.init_from.step"] = str(weights.step)
    if weights.run_id:
        tags.setdefault("temper.parent_run_id", weights.run_id)
    tags.update(match.tags())
    tags.update(_parent_data_tags(tags.get("temper.parent_run_id"), uri=uri, spec=spec,
                                  workdir=workdir))
    summary = f"init_from {source.source}: {match.summary()}"
    if source.freeze_backbone:
        summary += "; backbone frozen (linear probe)"
    console.print(summary, markup=False)
    return InitPlan(location=location, tags=tags, summary=summary)


def _parent_data_tags(run_id: str | None, *, uri: str | None, spec: JobSpec, workdir: Path) -> dict[str, str]:
    """The pretraining run's data manifest hash, copied so the fine-tune run names it too."""
    if not run_id or not spec.tracking.enabled:
        return {}
    try:
        from mlflow import MlflowClient

        from temper.tracking.runs import resolve_tracking_uri

        parent = MlflowClient(tracking_uri=uri or resolve_tracking_uri(spec.tracking.uri, workdir=workdir)).get_run(run_id)
    except Exception as e:  # noqa: BLE001 - lineage is best effort: another server, or deleted
        log.warning("init_from: the parent run %s cannot be read (%s); its data is not tagged", run_id, e)
        return {}
    return {f"temper.init_from.{k[len('temper.'):]}": v for k, v in parent.data.tags.items()
            if k.startswith(("temper.data_manifest", "temper.data."))}


# --- export, registration, lineage ---


def run_checkpoint_dir(run_id: str, *, tracking_uri: str | None) -> tuple[str, str]:
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
        folder, uri = run_checkpoint_dir(source, tracking_uri=tracking_uri)
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
