"""`temper export RUN_ID|CHECKPOINT`: consolidated weights + model config, optionally
registered as an MLflow model version.

A run id is looked up in MLflow (its `temper.checkpoint_dir` tag names the run's checkpoint
folder); a folder is used as is (a run folder means its newest committed checkpoint).
"""

from __future__ import annotations

import os
from pathlib import Path

from temper.console import console
from temper.errors import TemperError
from temper.launch.resume import looks_like_path


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


def export_command(source: str, *, out: Path, tracking_uri: str | None, register: str | None) -> Path:
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
    written = export_checkpoint(ckpt.path, str(out), storage_options=opts)
    console.print(f"exported step {ckpt.manifest.step} of {ckpt.path} to {written}")
    if register:
        run_id = ckpt.manifest.run_id
        if not run_id:
            raise TemperError("--register needs a checkpoint written by a tracked run (tracking.enabled=true)")
        if uri is None:
            from temper.tracking.runs import resolve_tracking_uri

            uri = resolve_tracking_uri(tracking_uri, workdir=Path.cwd())
        version = register_export(Path(written), name=register, run_id=run_id, tracking_uri=uri)
        console.print(f"registered as MLflow model {register} version {version} (run {run_id})")
    return Path(written)


def register_export(folder: Path, *, name: str, run_id: str, tracking_uri: str) -> str:
    """Log `folder` under the run's artifacts `model/` and register it as a version of `name`."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    client.log_artifacts(run_id, str(folder), artifact_path="model")
    try:
        client.get_registered_model(name)
    except Exception:  # noqa: BLE001 - not registered yet
        client.create_registered_model(name)
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/model"
    version = client.create_model_version(name, source=source, run_id=run_id,
                                          tags={"temper.source": "temper export"})
    return str(version.version)
