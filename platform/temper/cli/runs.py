"""`temper runs` (list runs with their key metrics) and `temper runs compare A B`.

Wired into the main app with `app.add_typer(runs_app, name="runs")`; the MLflow queries are in
temper.tracking.query, this module only renders them (rich tables on the console).
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from temper.console import console

runs_app = typer.Typer(
    name="runs",
    help="List tracked runs with their key metrics; compare two runs (spec diff, metrics).",
    add_completion=False,
    pretty_exceptions_enable=False,
)

TrackingUriOpt = Annotated[
    str | None, typer.Option(help="The MLflow tracking URI (else $MLFLOW_TRACKING_URI, else ./mlflow.db).")
]
METRIC_LABELS = {"train/loss": "train/loss", "val/loss": "val/loss", "val/acc": "val/acc",
                 "perf/samples_per_s": "samples/s"}
WIDE = 240  # render width when stderr is not a terminal: no truncated run ids in logs and pipes


@runs_app.callback(invoke_without_command=True)
def runs_cmd(
    ctx: typer.Context,
    experiment: Annotated[str | None, typer.Option(help="Only this experiment (name or id; default: all).")] = None,
    limit: Annotated[int, typer.Option(help="Show at most this many runs (newest first).")] = 20,
    status: Annotated[str | None, typer.Option(
        help="Only runs with this status: RUNNING, FINISHED, FAILED, KILLED, SCHEDULED.")] = None,
    tracking_uri: TrackingUriOpt = None,
) -> None:
    """List runs, newest first: status, start, duration, steps, key metrics, and the UI link."""
    if ctx.invoked_subcommand is not None:
        return
    from temper.tracking.query import list_runs, open_client

    client, uri = open_client(tracking_uri)
    rows = list_runs(client, uri=uri, experiment=experiment, limit=limit, status=status)
    if not rows:
        where = f"experiment {experiment!r}" if experiment else uri
        console.print(f"no runs in {where}" + (f" with status {status.upper()}" if status else ""))
        return
    _print_table(_runs_table(rows))
    _print_links(uri, [(row.name, row.run_id, row.experiment_id) for row in rows])


@runs_app.command("compare")
def compare_cmd(
    run_a: Annotated[str, typer.Argument(help="The first (baseline) run id.", show_default=False)],
    run_b: Annotated[str, typer.Argument(help="The second run id.", show_default=False)],
    tracking_uri: TrackingUriOpt = None,
) -> None:
    """Show how run B's spec differs from run A's and their final metrics side by side."""
    from temper.tracking.query import (
        KEY_METRICS,
        diff_lines,
        get_run,
        metric_table,
        open_client,
        run_spec,
        spec_diff,
    )

    client, uri = open_client(tracking_uri)
    a, b = get_run(client, run_a, uri=uri), get_run(client, run_b, uri=uri)
    (spec_a, from_a), (spec_b, from_b) = run_spec(client, a), run_spec(client, b)
    for label, run in (("A", a), ("B", b)):
        console.print(f"{label}: {run.info.run_name} {run.info.run_id} ({run.info.status})", markup=False)
    source = from_a if from_a == from_b else f"{from_a} / {from_b}"
    console.print(f"\n[bold]spec diff[/bold] (from {source})")
    for line in diff_lines(spec_diff(spec_a, spec_b), a=f"A {run_a}", b=f"B {run_b}"):
        style = "red" if line.startswith("-") else "green" if line.startswith("+") else None
        console.print(line, style=style, markup=False, highlight=False)
    rows = metric_table(a.data.metrics, b.data.metrics, KEY_METRICS)
    console.print("\n[bold]final metrics[/bold]")
    if rows:
        _print_table(_metrics_table(rows))
    else:
        console.print("neither run logged metrics")
    _print_links(uri, [(run.info.run_name, run.info.run_id, run.info.experiment_id) for run in (a, b)])


@runs_app.command("sync")
def sync_cmd(
    folder: Annotated[Path, typer.Argument(help="A folder of undelivered metrics, as named by the job's "
                                                "warning (under tracking.spool_dir).", show_default=False)],
    tracking_uri: Annotated[str | None, typer.Option(help="Send to this server instead of the one the "
                                                          "folder names.")] = None,
) -> None:
    """Send metrics a job kept on disk because MLflow was unreachable until it ended."""
    from temper.tracking.sync import sync_spool

    result = sync_spool(folder, tracking_uri=tracking_uri)
    what = "created run" if result.created else "run"
    console.print(f"sent {result.sent} metrics to {what} {result.run_id} in {result.tracking_uri}")


def _runs_table(rows: list[Any]) -> Table:
    metrics = [k for k in METRIC_LABELS if any(k in row.metrics for row in rows)]
    table = Table(box=None, pad_edge=False, header_style="bold")
    for title in ("name", "run id", "status", "start", "duration", "steps"):
        table.add_column(title, no_wrap=True, justify="right" if title == "steps" else "left")
    for key in metrics:
        table.add_column(METRIC_LABELS[key], justify="right", no_wrap=True)
    for row in rows:
        table.add_row(row.name, row.run_id, _status(row.status), _start(row.start_ms), _duration(row.duration_s),
                      "" if row.steps is None else str(row.steps), *[_num(row.metrics.get(k)) for k in metrics])
    return table


def _metrics_table(rows: list[tuple[str, float | None, float | None, float | None]]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for title in ("metric", "A", "B", "B - A"):
        table.add_column(title, justify="left" if title == "metric" else "right", no_wrap=True)
    for key, x, y, delta in rows:
        table.add_row(key, _num(x), _num(y), "" if delta is None else f"{delta:+.4g}")
    return table


def _print_links(uri: str, runs: list[tuple[str, str, str]]) -> None:
    from temper.tracking.query import run_link, ui_hint

    if run_link(uri, "0", "x") is None:
        console.print(f"\nMLflow UI: {ui_hint(uri)}", markup=False)
        return
    console.print()
    for name, run_id, experiment_id in runs:
        console.print(f"{name} {run_id[:8]}  {run_link(uri, experiment_id, run_id)}", markup=False)


def _print_table(table: Table) -> None:
    """On a terminal as wide as it is; elsewhere (logs, pipes) WIDE columns, nothing cut."""
    if console.is_terminal:
        console.print(table)
        return
    Console(file=console.file, width=WIDE, highlight=False, soft_wrap=True).print(table)


def _status(status: str) -> str:
    color = {"FINISHED": "green", "FAILED": "red", "KILLED": "yellow", "RUNNING": "cyan"}.get(status)
    return f"[{color}]{status}[/{color}]" if color else status


def _start(ms: int | None) -> str:
    if ms is None:
        return ""
    return datetime.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"
