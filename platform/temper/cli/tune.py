"""`temper tune JOB --space SPACE`: a hyperparameter search on Ray Tune (see docs/tuning.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from temper.console import console
from temper.errors import TemperError


def register(app: typer.Typer) -> None:
    app.command()(tune)


def tune(
    job: Annotated[Path, typer.Argument(help="The job spec YAML file.", show_default=False)],
    space: Annotated[Path, typer.Option("--space", help="The search space file (space:, set:, tune:).",
                                        show_default=False)],
    set_: Annotated[list[str] | None, typer.Option(
        "--set", "-s", help="Override a spec value (--set optim.momentum=0.8) or a search setting "
                            "(--set tune.num_samples=16); repeatable.")] = None,
    address: Annotated[str | None, typer.Option(
        help="Join this Ray cluster (else $RAY_ADDRESS, else a local Ray).")] = None,
    register: Annotated[str | None, typer.Option(
        help="Register the best trial's weights as a version of this MLflow model name.")] = None,
    no_resume: Annotated[bool, typer.Option(
        "--no-resume", help="Start a new search even if this one's folder holds an earlier one.")] = False,
) -> None:
    """Search hyperparameters with Ray Tune: every trial a tracked Temper run (a child of the
    search's MLflow run), ASHA stopping weak trials early. Running the same command again
    resumes an interrupted search; the best trial's job file is written beside it."""
    from temper.launch.tune import SearchRequest, run_search

    try:
        result = run_search(SearchRequest(job=job, space_path=space, sets=tuple(set_ or ()), workdir=Path.cwd(),
                                          address=address, register=register, no_resume=no_resume))
    except KeyboardInterrupt as e:  # typer turns it into exit 130 and drops the message: say it here
        if str(e):
            console.print(str(e), markup=False)
        raise
    console.print(result.table, markup=False)
    counts = {s: sum(t.status == s for t in result.trials) for s in ("finished", "early-stopped", "failed")}
    console.print(f"search {result.name}: {len(result.trials)} trials ({counts['finished']} finished, "
                  f"{counts['early-stopped']} stopped early, {counts['failed']} failed) under MLflow run "
                  f"{result.parent_run_id} ({result.tracking_uri})")
    if result.best is not None:
        console.print(f"best: trial {result.best.trial_id} {result.metric} {result.best.value:.4g} "
                      f"(run {result.best.run_id}); its job file: {result.best_spec_path}")


def space_for_submit(job: Path, *, space: Path, sets: list[str], target) -> str:
    """`temper submit --tune`: the space file checked here like `temper tune` does, as YAML
    for the cluster (tune.* overrides applied)."""
    import yaml

    from temper.launch.submit.ray_jobs import RayJobsTarget
    from temper.spec.tune import check_space, load_space

    if not isinstance(target, RayJobsTarget):
        raise TemperError(f"--tune: --to {target.address} does not run searches yet; submit it to a "
                          "Ray cluster (--to http://HEAD:8265)")
    checked = load_space(space, [s for s in sets if s.startswith("tune.")])
    check_space(checked, job=job, space_path=space, job_sets=[s for s in sets if not s.startswith("tune.")])
    return yaml.safe_dump(checked.model_dump(mode="json", exclude_none=True), sort_keys=False)
