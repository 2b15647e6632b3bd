"""The `temper` command. User mistakes print one line each and exit 2, without a traceback."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from temper.console import console
from temper.errors import TemperError

app = typer.Typer(
    name="temper",
    help="Distributed training from one YAML job spec: run locally or on a Ray cluster, tracked in MLflow.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

from temper.cli.data import data_app  # noqa: E402 - sub-app registered right after `app`

app.add_typer(data_app, name="data")
from temper.cli.runs import runs_app  # noqa: E402

app.add_typer(runs_app, name="runs")

from temper.cli.cluster import register as register_cluster_commands  # noqa: E402

register_cluster_commands(app)  # submit, status, logs, stop, list
from temper.cli.plan import register as register_plan_command  # noqa: E402

register_plan_command(app)  # plan

from temper.cli.tune import register as register_tune_command  # noqa: E402

register_tune_command(app)  # tune

JobArg = Annotated[Path, typer.Argument(help="The job spec YAML file.", show_default=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a spec value: --set optim.lr=1e-3 (repeatable)."),
]


@app.command()
def run(
    job: JobArg,
    set_: SetOpt = None,
    launcher: Annotated[
        str, typer.Option(help="ray (default): Ray Train workers; torchrun: local processes; "
                               "inprocess: one worker in this process.")
    ] = "ray",
    address: Annotated[
        str | None, typer.Option(help="Join this Ray cluster (else $RAY_ADDRESS, else a local Ray).")
    ] = None,
    resume: Annotated[
        str | None, typer.Option(help="Continue this run: an MLflow run id, or a run's checkpoint "
                                      "folder (default: the newest unfinished run in checkpoint.dir).")
    ] = None,
    no_resume: Annotated[
        bool, typer.Option("--no-resume", help="Start a new run even if an unfinished one exists.")
    ] = False,
    run_id: Annotated[
        str | None, typer.Option("--run-id", help="Log into this existing MLflow run (what `temper "
                                 "submit` passes); resumes from its newest checkpoint if it has one.")
    ] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", help="On failure, show every rank's traceback and the launcher's "
                           "own reports (default: the root cause only; every rank's log is in the run).")
    ] = False,
) -> None:
    """Train the job: start the workers, record the run in MLflow, wait for the end.

    Running the same job again resumes its newest unfinished run from the last committed
    checkpoint (same MLflow run, same data position)."""
    from temper.launch import build_launcher, run_job
    from temper.spec import load_spec

    if sum(map(bool, (resume, no_resume, run_id))) > 1:
        raise TemperError("--resume, --no-resume and --run-id exclude each other; pass one")
    spec = load_spec(job, set_ or [])
    if verbose:
        import os

        os.environ["TEMPER_VERBOSE"] = "1"  # read by the workers and the torchrun agent
    chosen = build_launcher(launcher, address=address)
    outcome = run_job(spec, launcher=chosen, workdir=Path.cwd(), resume=resume, no_resume=no_resume,
                      run_id=run_id)
    m = outcome.result.metrics
    summary = [f"finished {spec.name}: {outcome.result.steps or spec.train.max_steps} steps"]
    for key in ("train/loss", "val/loss", "val/acc", "perf/samples_per_s"):
        if key in m:
            summary.append(f"{key} {m[key]:.4g}")
    console.print("  ".join(summary))
    if outcome.run_id:
        console.print(f"MLflow run {outcome.run_id} ({outcome.tracking_uri})")


@app.command()
def pipeline(
    file: Annotated[Path, typer.Argument(help="The pipeline YAML file (name, stages, report).", show_default=False)],
    set_: SetOpt = None,
    launcher: Annotated[str, typer.Option(help="How every stage runs: ray (default), torchrun, inprocess.")] = "ray",
    address: Annotated[str | None, typer.Option(help="Join this Ray cluster (ray launcher).")] = None,
) -> None:
    """Run a pipeline: its stages in order (pretrain, then fine-tune from it, sweeps included)
    as child runs of one parent MLflow run, which gets the report table and plot."""
    from temper.launch import build_launcher
    from temper.launch.pipeline import run_pipeline
    from temper.spec.pipeline import load_pipeline

    spec = load_pipeline(file)
    build_launcher(launcher, address=address)  # a bad --launcher fails before any run exists
    run_pipeline(spec, path=file, launcher_factory=lambda: build_launcher(launcher, address=address),
                 workdir=Path.cwd(), cli_sets=set_ or [])


@app.command()
def export(
    source: Annotated[str, typer.Argument(help="An MLflow run id, a run's checkpoint folder, or one "
                                               "checkpoint (step) folder.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write.")] = Path("exported"),
    tracking_uri: Annotated[
        str | None, typer.Option(help="Where to look up a run id (else $MLFLOW_TRACKING_URI, else ./mlflow.db).")
    ] = None,
    register: Annotated[
        str | None, typer.Option(help="Also log the folder to the run and register it as a version "
                                      "of this MLflow model name (tagged with run, step, spec hash, data manifest).")
    ] = None,
    alias: Annotated[
        list[str] | None, typer.Option("--alias", help="With --register: point this alias at the new "
                                       "version, e.g. pretrained, best (repeatable).")
    ] = None,
    if_better: Annotated[
        str | None, typer.Option("--if-better", metavar="METRIC", help="Move the aliases only if the run's "
                                 "final METRIC beats the run of the version holding them (e.g. val/loss).")
    ] = None,
    mode: Annotated[
        str | None, typer.Option(help="For --if-better: min (lower wins) or max (default: from the "
                                      "metric name: loss/error -> min, acc/score -> max).")
    ] = None,
    description: Annotated[
        str | None, typer.Option(help="With --register: the model version's description.")
    ] = None,
) -> None:
    """Write consolidated weights (model.safetensors) and the model config (config.json)."""
    from temper.launch.lifecycle import RegisterOptions, export_command
    from temper.tracking.registry import build_better_rule, check_alias

    better = build_better_rule(if_better, mode)
    if not register and (alias or better or description):
        raise TemperError("--alias, --if-better, --mode and --description need --register NAME")
    options = RegisterOptions(name=register, aliases=tuple(check_alias(a) for a in alias or ()), better=better,
                              description=description) if register else None
    export_command(source, out=out, tracking_uri=tracking_uri, register=options)


@app.command()
def validate(
    job: JobArg,
    set_: SetOpt = None,
    show: Annotated[bool, typer.Option("--print", help="Print the resolved spec as YAML.")] = False,
) -> None:
    """Check a job spec without running it; --print shows it with every default filled in."""
    from temper.spec import load_spec, spec_to_yaml

    spec = load_spec(job, set_ or [])
    if show:
        typer.echo(spec_to_yaml(spec), nl=False)
    console.print(
        f"ok: {spec.name}: model {spec.model.kind}, objective {spec.objective.kind}, "
        f"strategy {spec.strategy.kind}, {spec.resources.workers} worker(s), "
        f"global batch {spec.global_batch_size}, {spec.train.max_steps} steps"
    )


@app.command()
def schema(
    markdown: Annotated[bool, typer.Option("--markdown", help="Print the reference tables instead.")] = False,
) -> None:
    """Print the JSON Schema of the job spec (for editors and CI validation)."""
    if markdown:
        from temper.spec.reference import render_reference

        typer.echo(render_reference(), nl=False)
        return
    from temper.spec.job import JobSpec

    typer.echo(json.dumps(JobSpec.model_json_schema(), indent=2))


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: maps errors to exit codes (2 = user error)."""
    try:
        # Non-standalone typer returns exit codes instead of exiting (Ctrl-C becomes 130).
        code = app(args=argv, standalone_mode=False)
    except TemperError as e:
        for line in e.problems:
            console.print(f"[red]error:[/red] {escape(line)}", soft_wrap=True)
        return e.exit_code
    except (KeyboardInterrupt, typer.Abort):
        console.print("[yellow]interrupted[/yellow]")
        return 130
    except typer.Exit as e:
        return e.exit_code
    except typer.TyperException as e:  # usage errors (typer vendors click's exceptions)
        e.show()
        return getattr(e, "exit_code", 2)
    if code == 130:
        console.print("[yellow]interrupted[/yellow]")
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
