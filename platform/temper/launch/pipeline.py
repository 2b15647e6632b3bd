"""`temper pipeline FILE`: the stages of a pipeline file, in order, as nested MLflow runs.

    parent run (the pipeline)          tags temper.pipeline; pipeline.yaml; the report
      ├─ stage run(s)                  mlflow.parentRunId = parent; temper.pipeline.stage,
      │                                temper.pipeline.sweep (this run's swept values)
      └─ ...                           init_from: <stage> -> runs:/<that stage's run id>
    report: metric vs the swept x, per stage: mean and standard deviation over the other
            swept settings -> parent metrics report/<stage>/<metric>/<x>, label_fraction.md,
            label_fraction.json and label_fraction.png (the curve) in the parent run

Each stage is an ordinary `temper run` (run_job) in a fresh run: resume is off inside a
pipeline, so running the file again runs every stage again.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from temper.console import console
from temper.errors import TemperError
from temper.spec.pipeline import PipelineSpec, StageSpec

log = logging.getLogger(__name__)


@dataclass
class StageRun:
    stage: str
    values: dict[str, Any]
    run_id: str | None
    metrics: dict[str, float]


@dataclass
class PipelineResult:
    parent_run_id: str
    tracking_uri: str
    runs: list[StageRun] = field(default_factory=list)
    table: str = ""


def _override(key: str, value: Any) -> str:
    return f"{key}={value if isinstance(value, str) else json.dumps(value)}"


def stage_spec(pipeline: PipelineSpec, stage: StageSpec, *, base: Path, values: dict[str, Any],
               init_source: str | None, cli_sets: list[str]):
    """The stage's job spec with the pipeline's, the stage's and this combination's settings."""
    from temper.spec import load_spec

    sets = [_override(k, v) for k, v in {**pipeline.set, **stage.set}.items()]
    sets += [_override(key, v) for k, v in values.items() for key in k.split(",")]
    sets.append(f"tracking.experiment={pipeline.experiment_name}")
    if init_source is not None:
        sets.append(f"init_from.source={init_source}")
        sets.append(f"init_from.freeze_backbone={json.dumps(stage.freeze_backbone)}")
    suffix = "".join(f".{k.split(',')[0].rsplit('.', 1)[-1]}{v}" for k, v in values.items())
    spec = load_spec(base / stage.job, [*sets, *cli_sets])
    spec = spec.model_copy(update={"name": f"{pipeline.name}.{stage.name}{suffix}"[:100]})
    if not spec.tracking.enabled:
        raise TemperError(f"stages.{stage.name}: tracking.enabled is false; a pipeline records every stage "
                          "(remove the setting)")
    return spec


def run_pipeline(pipeline: PipelineSpec, *, path: Path, launcher_factory: Callable[[], Any], workdir: Path,
                 cli_sets: list[str] | None = None) -> PipelineResult:
    from temper.launch.driver import run_job

    cli_sets = list(cli_sets or [])
    base = path.parent
    first = stage_spec(pipeline, pipeline.stages[0], base=base, values={}, init_source=None, cli_sets=cli_sets)
    client, uri, parent = _open_parent(pipeline, path=path, spec=first, workdir=workdir)
    result = PipelineResult(parent_run_id=parent, tracking_uri=uri)
    stage_runs: dict[str, str] = {}
    status = "FAILED"
    try:
        for stage in pipeline.stages:
            init = _init_source(stage, stage_runs)
            if stage.tune:  # a search: its best trial stands for the stage
                stage_runs[stage.name] = _search_stage(pipeline, stage, base=base, init_source=init,
                                                       cli_sets=cli_sets, workdir=workdir, parent=parent,
                                                       result=result)
                continue
            combos = stage.combinations()
            for i, values in enumerate(combos, 1):
                spec = stage_spec(pipeline, stage, base=base, values=values, init_source=init, cli_sets=cli_sets)
                what = ", ".join(f"{k}={v}" for k, v in values.items())
                console.print(f"[bold]pipeline {pipeline.name}[/bold]: stage {stage.name}"
                              + (f" {i}/{len(combos)} ({what})" if combos and values else ""))
                tags = {"mlflow.parentRunId": parent, "temper.pipeline": pipeline.name,
                        "temper.pipeline.stage": stage.name, "temper.pipeline.sweep": json.dumps(values)}
                outcome = run_job(spec, launcher=launcher_factory(), workdir=workdir, no_resume=True,
                                  extra_tags=tags)
                result.runs.append(StageRun(stage.name, values, outcome.run_id, dict(outcome.result.metrics)))
                if not values:
                    stage_runs[stage.name] = outcome.run_id
        status = "FINISHED"
    finally:
        if pipeline.report is not None and result.runs:
            result.table = _report(pipeline, result, client=client)
        client.set_terminated(parent, status="FINISHED" if status == "FINISHED" else "FAILED")
    console.print(f"pipeline {pipeline.name}: {len(result.runs)} runs under MLflow run {parent} ({uri})")
    if result.table:
        console.print(result.table, markup=False)
    return result


def _search_stage(pipeline: PipelineSpec, stage: StageSpec, *, base: Path, init_source: str | None,
                  cli_sets: list[str], workdir: Path, parent: str, result: PipelineResult) -> str:
    """A stage that is a `temper tune` search (a child of the pipeline's run); its best trial's run."""
    from temper.launch.tune import SearchRequest, run_search

    sets = [_override(k, v) for k, v in {**pipeline.set, **stage.set}.items()]
    sets.append(f"tracking.experiment={pipeline.experiment_name}")
    if init_source is not None:
        sets += [f"init_from.source={init_source}",
                 f"init_from.freeze_backbone={json.dumps(stage.freeze_backbone)}"]
    console.print(f"[bold]pipeline {pipeline.name}[/bold]: stage {stage.name} (search {stage.tune})")
    tags = {"mlflow.parentRunId": parent, "temper.pipeline": pipeline.name, "temper.pipeline.stage": stage.name}
    found = run_search(SearchRequest(job=base / stage.job, space_path=base / stage.tune,
                                     sets=(*sets, *cli_sets), workdir=workdir, no_resume=True,
                                     parent_tags=tags, name=f"{pipeline.name}.{stage.name}"))
    if found.best is None or not found.best.run_id:
        raise TemperError(f"stages.{stage.name}: the search found no trial that reported {found.metric}")
    result.runs.append(StageRun(stage.name, {}, found.best.run_id, {found.metric: found.best.value}))
    return found.best.run_id


def _init_source(stage: StageSpec, stage_runs: dict[str, str]) -> str | None:
    ref = stage.init_from
    if ref is None or ref not in stage_runs:
        return ref
    return f"runs:/{stage_runs[ref]}"


def _open_parent(pipeline: PipelineSpec, *, path: Path, spec, workdir: Path):
    from mlflow import MlflowClient

    from temper.tracking.runs import check_reachable, ensure_experiment, resolve_tracking_uri

    uri = resolve_tracking_uri(spec.tracking.uri, workdir=workdir)
    check_reachable(uri)
    client = MlflowClient(tracking_uri=uri)
    experiment_id = ensure_experiment(client, pipeline.experiment_name, uri=uri, workdir=workdir)
    run = client.create_run(experiment_id, run_name=pipeline.name,
                            tags={"temper.pipeline": pipeline.name, "mlflow.source.name": "temper pipeline"})
    client.log_text(run.info.run_id, path.read_text(), "pipeline.yaml")
    console.print(f"pipeline {pipeline.name}: MLflow parent run [bold]{run.info.run_id}[/bold] in {uri}")
    return client, uri, run.info.run_id


def summarize(pipeline: PipelineSpec, runs: list[StageRun]) -> dict[str, list[tuple[float, float, float, int]]]:
    """stage -> [(x, mean, std, n)] of the report metric over runs sharing x."""
    report = pipeline.report
    groups: dict[str, dict[float, list[float]]] = {}
    for run in runs:
        if report.x not in run.values or report.metric not in run.metrics:
            continue
        value = run.metrics[report.metric]
        if math.isfinite(value):
            groups.setdefault(run.stage, {}).setdefault(float(run.values[report.x]), []).append(value)
    return {stage: [(x, statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v))
                    for x, v in sorted(by_x.items())] for stage, by_x in groups.items()}


def format_table(pipeline: PipelineSpec, curves: dict[str, list[tuple[float, float, float, int]]]) -> str:
    report = pipeline.report
    xs = sorted({p[0] for points in curves.values() for p in points})
    head = f"| {report.metric} by {report.x} | " + " | ".join(f"{x:g}" for x in xs) + " |"
    lines = [head, "|" + "---|" * (len(xs) + 1)]
    for stage, points in curves.items():
        by_x = {p[0]: p for p in points}
        cells = [f"{by_x[x][1]:.4f} ± {by_x[x][2]:.4f} (n={by_x[x][3]})" if x in by_x else "-" for x in xs]
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _report(pipeline: PipelineSpec, result: PipelineResult, *, client) -> str:
    from mlflow.entities import Metric

    from temper.figures import label_fraction_png

    curves = summarize(pipeline, result.runs)
    if not curves:
        return ""
    report, now = pipeline.report, int(time.time() * 1000)
    metric = report.metric.replace("/", "_")
    metrics = []
    for stage, points in curves.items():
        for x, mean, std, _n in points:
            metrics += [Metric(f"report/{stage}/{metric}/{x:g}/mean", mean, now, 0),
                        Metric(f"report/{stage}/{metric}/{x:g}/std", std, now, 0)]
    table = format_table(pipeline, curves)
    parent = result.parent_run_id
    try:
        client.log_batch(parent, metrics=metrics)
        client.log_text(parent, table + "\n", "label_fraction.md")
        client.log_text(parent, json.dumps({"x": report.x, "metric": report.metric, "curves": curves,
                                            "runs": [r.__dict__ for r in result.runs]}, indent=1), "label_fraction.json")
        png = label_fraction_png({s: [(x, m, sd) for x, m, sd, _ in pts] for s, pts in curves.items()},
                                 metric=report.metric, title=pipeline.name)
        client.log_image(parent, _png_image(png), "label_fraction.png")
    except Exception as e:  # noqa: BLE001 - the runs exist; the summary is a convenience
        log.warning("pipeline report not fully logged to run %s: %s", parent, e)
    return table


def _png_image(data: bytes):
    import io

    from PIL import Image

    return Image.open(io.BytesIO(data))
