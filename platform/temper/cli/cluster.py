"""`temper submit | status | logs | stop | list`: jobs on a cluster (Ray Jobs API or KubeRay).

Registered on the main app with `register(app)`; each command goes through
`temper.launch.submit.build_target(--to)` and prints TemperErrors as one line (exit 2).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Annotated

import typer

from temper.console import console
from temper.errors import TemperError

ToOpt = Annotated[str | None, typer.Option(
    "--to", help="The cluster: http(s)://HEAD:8265 (Ray Jobs API), k8s or k8s://NAMESPACE "
                 "(default: $TEMPER_CLUSTER).", show_default=False)]
IdArg = Annotated[str, typer.Argument(help="The job id `temper submit` printed.", show_default=False)]
FollowOpt = Annotated[bool, typer.Option("--follow", "-f", help="Stream the logs until the job ends.")]
OUTPUTS = ("text", "yaml", "json")


def submit(
    job: Annotated[Path, typer.Argument(help="The job spec YAML file.", show_default=False)],
    to: ToOpt = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", "-s", help="Override a spec value: --set optim.lr=1e-3 (repeatable).")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Print what would be sent; create nothing (no MLflow run either).")] = False,
    output: Annotated[str, typer.Option("--output", "-o", help="text, yaml or json.")] = "text",
    follow: FollowOpt = False,
    no_plan: Annotated[bool, typer.Option(
        "--no-plan", help="Skip the `temper plan` memory check before submitting.")] = False,
    tune: Annotated[Path | None, typer.Option(
        "--tune", help="A search space file: the cluster runs `temper tune` (docs/tuning.md).",
        show_default=False)] = None,
) -> None:
    """Send the job to a cluster; print its id, its MLflow run and what to run next.
    First checks that it fits its GPUs (`temper plan`; exit 2 when it does not)."""
    from temper.launch.submit import build_target
    from temper.spec import load_spec

    if output not in OUTPUTS:
        raise TemperError(f"--output {output!r} is not known; accepted: {', '.join(OUTPUTS)}")
    sets = [s for s in set_ or [] if not (tune and s.startswith("tune."))]
    spec = load_spec(job, sets)
    fits = None
    if not no_plan:  # before anything is created; its summary prints once the job is sent
        from temper.cli.plan import check_fits

        fits = check_fits(spec)
    target = build_target(to)
    if tune is not None:
        from temper.cli.tune import space_for_submit

        sub = target.submit(spec, workdir=Path.cwd(), run_id=None, dry_run=dry_run,
                            space_yaml=space_for_submit(job, space=tune, sets=set_ or [], target=target))
    else:
        sub = target.submit(spec, workdir=Path.cwd(), run_id=None, dry_run=dry_run)
    if fits:
        console.print(fits, markup=False, highlight=False)
    if dry_run:
        typer.echo(_render(sub.manifest or "", output), nl=False)
        return
    if output != "text":
        fields = {"job_id": sub.job_id, "target": sub.target, "run_id": sub.run_id, "run_url": sub.run_url}
        typer.echo(_render(json.dumps(fields), output), nl=False)
    addr = f"--to {sub.target}"
    console.print(f"job [bold]{sub.job_id}[/bold] submitted to {sub.target}")
    if sub.run_id:
        console.print(f"MLflow run [bold]{sub.run_id}[/bold]" + (f": {sub.run_url}" if sub.run_url else ""))
    if follow:
        _follow(target, sub.job_id)
        return
    console.print(f"  logs:   temper logs {sub.job_id} {addr} -f\n"
                  f"  status: temper status {sub.job_id} {addr}\n"
                  f"  stop:   temper stop {sub.job_id} {addr}", markup=False)


def status(job_id: IdArg, to: ToOpt = None) -> None:
    """The job's state: PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
    from temper.launch.submit import build_target

    st = build_target(to).status(job_id)
    typer.echo(f"{st.job_id}  {st.state}" + (f"  {st.message}" if st.message else ""))
    if st.extra.get("temper.run_id"):
        typer.echo(f"MLflow run {st.extra['temper.run_id']}")


def logs(job_id: IdArg, to: ToOpt = None, follow: FollowOpt = False) -> None:
    """Print the job's driver log (rank 0's progress and every worker's errors)."""
    from temper.launch.submit import build_target

    for chunk in build_target(to).logs(job_id, follow=follow):
        typer.echo(chunk, nl=False)


def stop(job_id: IdArg, to: ToOpt = None) -> None:
    """Stop the job (SIGTERM to its driver, which marks the MLflow run KILLED)."""
    from temper.launch.submit import build_target

    st = build_target(to).stop(job_id)
    typer.echo(f"{st.job_id}  {st.state}" + (f"  {st.message}" if st.message else ""))


def list_jobs(to: ToOpt = None) -> None:
    """The cluster's jobs, newest first."""
    from rich.console import Console
    from rich.table import Table

    from temper.launch.submit import build_target

    target = build_target(to)
    table = Table(title=f"jobs on {target.address}")
    for column in ("job id", "state", "started", "ended", "spec", "MLflow run"):
        table.add_column(column, overflow="fold")
    for st in target.list():
        table.add_row(st.job_id, st.state, _when(st.start_time), _when(st.end_time),
                      st.extra.get("temper.spec", ""), st.extra.get("temper.run_id", ""))
    Console(soft_wrap=True).print(table)


def register(app: typer.Typer) -> None:
    app.command()(submit)
    app.command()(status)
    app.command()(logs)
    app.command()(stop)
    app.command("list")(list_jobs)


def _follow(target, job_id: str) -> None:
    cause = None  # the driver's `error: rank R: <root cause>` line, repeated last
    for chunk in target.logs(job_id, follow=True):
        typer.echo(chunk, nl=False)
        cause = next((line for line in reversed(chunk.splitlines()) if line.startswith("error: ")), cause)
    st = target.status(job_id)
    for _ in range(20):  # the log stream can close a moment before the state is final
        if st.state in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(0.5)
        st = target.status(job_id)
    console.print(f"job {job_id} {st.state}" + (f": {st.message.splitlines()[0]}" if st.message else ""),
                  markup=False)
    if st.state != "SUCCEEDED":
        if cause:
            console.print(cause, markup=False)
        raise typer.Exit(_exit_code(st.message))


def _exit_code(message: str | None) -> int:
    """The driver's own exit code where the cluster reports it (Ray: "... failed with exit code
    2, ..."), so an input error is 2 under `submit --follow` as under `temper run`; else 1."""
    found = re.search(r"exit code (\d+)", message or "")
    return 2 if found and found.group(1) == "2" else 1


def _render(text: str, output: str) -> str:
    """The manifest (JSON for Ray, YAML for k8s) in the asked format; text: as it is."""
    if output == "text" or not text:
        return text
    import yaml

    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    if output == "json":
        return json.dumps(docs[0] if len(docs) == 1 else docs, indent=2) + "\n"
    if not text.lstrip().startswith(("{", "[")):
        return text  # already YAML
    return yaml.safe_dump_all(docs, sort_keys=False)


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else ""
