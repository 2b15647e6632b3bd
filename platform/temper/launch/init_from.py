"""`init_from:` on the driver, before any worker starts.

    plan_init_from(spec)
      checkpoint folder     -> used as is (relative paths against where `temper run` runs)
      runs:/ID              -> that run's checkpoint folder (its temper.checkpoint_dir tag)
      models:/NAME@ALIAS|/V -> the version's exported files, downloaded once into the cache
      -> open the weights, match them against the job's model (a backbone that does not fit
         is an error now, not after the cluster started), print what loads, and return
         where the workers read them plus the lineage tags for the new run:
         temper.parent_run_id, temper.init_from[.checkpoint|.step|.model_version|
         .data_manifest|.loaded|.new|.ignored]
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from temper.console import console
from temper.errors import TemperError
from temper.spec.job import JobSpec

log = logging.getLogger(__name__)


@dataclass
class InitPlan:
    location: dict  # run_info["init_from"]: what weights_for_worker reads
    tags: dict[str, str] = field(default_factory=dict)
    summary: str = ""


def _storage_options(path: str) -> dict | None:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3")
    return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint and path.startswith("s3://") else None


def plan_init_from(spec: JobSpec, *, workdir: Path) -> InitPlan | None:
    source = spec.init_from
    if source is None:
        return None
    from temper.checkpoint.pretrained import compare, open_weights

    tags = {"temper.init_from": source.source}
    location: dict = {}
    if source.kind == "run":
        from temper.launch.export import _run_checkpoint_dir

        run_id = source.source[len("runs:/"):].strip("/")
        path, uri = _run_checkpoint_dir(run_id, tracking_uri=spec.tracking.uri)
        tags["temper.parent_run_id"] = run_id
        location["tracking_uri"] = uri
    elif source.kind == "model":
        from temper.tracking.registry import resolve_model_uri
        from temper.tracking.runs import resolve_tracking_uri

        uri = resolve_tracking_uri(spec.tracking.uri, workdir=workdir)
        folder, info = resolve_model_uri(source.source, uri)
        path = str(folder)
        tags["temper.init_from.model_version"] = f"{info.name}/{info.version}"
        if info.run_id:
            tags["temper.parent_run_id"] = info.run_id
        location.update(model_uri=f"models:/{info.name}/{info.version}", tracking_uri=uri)
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
    location.update(path=weights.path, storage_options=options)
    tags["temper.init_from.checkpoint"] = weights.origin
    if weights.step is not None:
        tags["temper.init_from.step"] = str(weights.step)
    if weights.run_id:
        tags.setdefault("temper.parent_run_id", weights.run_id)
    tags.update(match.tags())
    tags.update(_parent_data_tags(tags.get("temper.parent_run_id"), uri=location.get("tracking_uri"), spec=spec,
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
