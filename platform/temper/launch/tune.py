"""`temper tune JOB --space SPACE`: a hyperparameter search on Ray Tune, every trial a Temper run.

    check the space        every key and every distribution end validated (spec/tune.py), before Ray
    parent MLflow run      the search: space.yaml, tune.* params; at the end trials.md/json/png,
                           best.yaml and the best metric (reopened when the search resumes)
    Tuner(...).fit()       Ray Tune runs trials (launch/tune_trial.py), ASHA may stop them early;
                           <workdir>/.temper/tune/<name>/ holds Tune's state and every trial's
                           checkpoints. Running the same command again restores it (Tuner.restore):
                           unfinished trials resume from their checkpoints into their own runs
    finish                 early-stopped trials' runs tagged and ended; interrupted ones KILLED;
                           the best trial's job file beside the search; --register NAME
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from temper.console import console
from temper.errors import MissingDependencyError, TemperError
from temper.launch.tune_trial import TRIAL_TAG, TrialSetup, run_trial, trial_spec
from temper.spec.tune import SpaceFileSpec, TuneSettingsSpec

log = logging.getLogger(__name__)

STATE_FILE = "temper-search.json"  # the parent run of the search, beside Tune's own state
EARLY_TAG = "temper.tune.early_stopped"
ASHA_STATE = "asha-state.pkl"  # RememberingASHA's rungs, in the search's folder


@dataclass
class TrialRow:
    trial_id: str
    params: dict[str, Any]
    status: str  # finished | early-stopped | failed | killed
    step: int | None
    value: float | None
    run_id: str | None = None


@dataclass
class SearchResult:
    name: str
    folder: Path
    parent_run_id: str
    tracking_uri: str
    metric: str
    mode: str
    trials: list[TrialRow] = field(default_factory=list)
    best: TrialRow | None = None
    best_spec_path: Path | None = None
    table: str = ""


@dataclass(frozen=True)
class SearchRequest:
    job: Path
    space_path: Path
    sets: tuple[str, ...] = ()
    workdir: Path = Path(".")
    address: str | None = None
    register: str | None = None
    no_resume: bool = False
    parent_tags: dict[str, str] = field(default_factory=dict)  # a pipeline's parent run
    name: str | None = None  # the search's name (a pipeline stage's)


def prepare_search(request: SearchRequest):
    """Everything checked before Ray starts: the space, every sampled key, the metric, optuna."""
    from temper.data import with_absolute_paths
    from temper.spec.loader import apply_overrides, read_yaml
    from temper.spec.tune import check_space, load_space, override

    tune_sets = [s for s in request.sets if s.startswith("tune.")]
    job_sets = [s for s in request.sets if not s.startswith("tune.")]
    space = load_space(request.space_path, tune_sets)
    base = check_space(space, job=request.job, space_path=request.space_path, job_sets=job_sets)
    if not base.tracking.enabled:
        raise TemperError("tracking.enabled is false; a search records every trial in MLflow (remove the setting)")
    if space.tune.search == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise MissingDependencyError("optuna", feature="tune.search optuna", extra="tune") from None
    base = with_absolute_paths(base, base=request.workdir)
    data, _ = apply_overrides(read_yaml(request.job), [override(k, v) for k, v in space.set.items()] + job_sets)
    data["data"] = base.data.model_dump(mode="json")  # absolute shard paths
    return space, base, data


def run_search(request: SearchRequest) -> SearchResult:
    """Run (or resume) the search to its end; raise KeyboardInterrupt after Ctrl-C (runs KILLED)."""
    space, base, data = prepare_search(request)
    settings = space.tune
    name = request.name or settings.name or f"{base.name}-search"
    root = (request.workdir / ".temper" / "tune").resolve()
    folder = root / name
    if request.no_resume and folder.exists():
        aside = folder.with_name(f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
        folder.rename(aside)
        console.print(f"--no-resume: the earlier search moved to {aside}")
    _init_ray(request.address, base)
    from ray import tune

    restoring = tune.Tuner.can_restore(str(folder))
    client, uri, parent = _open_parent(space, request=request, base=base, folder=folder, name=name,
                                       restoring=restoring)
    setup = TrialSetup(base_data=data, source=str(request.job), search=name, folder=str(folder),
                       workdir=str(request.workdir.resolve()), metric=settings.metric, parent_run_id=parent,
                       tags={k: v for k, v in request.parent_tags.items() if k != "mlflow.parentRunId"},
                       tracking_uri=uri)
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), {"CPU": 0.01})  # the trial only drives its workers
    result = SearchResult(name=name, folder=folder, parent_run_id=parent, tracking_uri=uri,
                          metric=settings.metric, mode=settings.resolved_mode)
    status = "FAILED"
    try:
        if restoring:
            console.print(f"resuming the search {name} from {folder}")
            tuner = tune.Tuner.restore(str(folder), trainable=trainable, resume_unfinished=True)
        else:
            tuner = _new_tuner(trainable, space=space, base=base, root=root, name=name)
        try:
            grid = tuner.fit()
        except KeyboardInterrupt:  # Ctrl-C (Tune's own handler is off: see _init_ray)
            status = "KILLED"
            cut = _stop_trials_and_kill_their_runs(client, parent)
            raise KeyboardInterrupt(f"the search was interrupted (Ctrl-C) before trial(s) {cut or 'none'} "
                                    "finished; run the same command to resume it") from None
        interrupted = _settle_trials(grid, result=result, client=client, base=base)
        status = "KILLED" if interrupted else "FINISHED"
        _finish(result, client=client, setup=setup, space=space, register=request.register)
        if interrupted:
            raise KeyboardInterrupt("the search was interrupted (Ctrl-C); run the same command to resume it")
    finally:
        client.set_terminated(parent, status=status)
    return result


def _init_ray(address: str | None, base) -> None:
    from temper.launch.ray_launcher import FORWARDED_ENV, use_token_auth_if_available

    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        use_token_auth_if_available()
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")  # Tune's state, saved often enough to resume
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    # Ctrl-C raises KeyboardInterrupt out of fit(): Tune's own handler would end the trials it
    # cuts short as TERMINATED, indistinguishable from ASHA's stops. Its state is saved every
    # TUNE_GLOBAL_CHECKPOINT_S, so the same command resumes as after a driver crash.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    import ray

    if ray.is_initialized():
        return
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    kwargs: dict[str, Any] = {"runtime_env": {"env_vars": env}, "log_to_driver": True,
                              "configure_logging": True, "logging_level": "WARNING"}
    if address:
        # Ray Train's detached PlacementGroupCleaner (it frees the workers of a trial Tune
        # stopped) finds the cluster through RAY_ADDRESS; without it, it may pick another one.
        env.setdefault("RAY_ADDRESS", address)
        ray.init(address=address, **kwargs)
    else:
        r = base.resources
        ray.init(num_cpus=max(os.cpu_count() or 1, int(r.workers * r.cpus_per_worker + 0.999)), **kwargs)


def _distribution(dist) -> Any:
    from ray import tune

    kind, value = dist.kind, getattr(dist, dist.kind)
    builders = {"loguniform": lambda v: tune.loguniform(*v), "uniform": lambda v: tune.uniform(*v),
                "randint": lambda v: tune.randint(v[0], v[1] + 1),  # ours includes high
                "choice": tune.choice, "grid": tune.grid_search}
    return builders[kind](value)


def _searcher(settings: TuneSettingsSpec):
    """Tune's search algorithm and the max_concurrent_trials to pass to TuneConfig."""
    if settings.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=settings.seed), settings.max_concurrent_trials
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=settings.seed, max_concurrent=settings.max_concurrent_trials), None


def _scheduler(settings: TuneSettingsSpec, *, max_t: int, folder: Path):
    if settings.scheduler.kind == "none":
        return None
    from temper.launch.tune_asha import RememberingASHA

    s = settings.scheduler
    # max_t one past the last step: ASHA stops a trial that reaches max_t, and a trial that
    # ends by itself must finish its job (final checkpoint, metrics flushed, run FINISHED).
    return RememberingASHA(state_file=str(folder / ASHA_STATE), time_attr="step", max_t=max_t + 1,
                           grace_period=s.grace_period, reduction_factor=s.reduction_factor)


def _new_tuner(trainable, *, space: SpaceFileSpec, base, root: Path, name: str):
    from ray import tune

    settings = space.tune
    search_alg, max_concurrent = _searcher(settings)
    max_steps = space.space["train.max_steps"].probes()[-1] if "train.max_steps" in space.space else None
    scheduler = _scheduler(settings, max_t=int(max_steps or base.train.max_steps), folder=root / name)
    config = tune.TuneConfig(metric=settings.metric, mode=settings.resolved_mode, num_samples=settings.num_samples,
                             search_alg=search_alg, max_concurrent_trials=max_concurrent, scheduler=scheduler)
    run_config = tune.RunConfig(name=name, storage_path=str(root), verbose=0,
                                failure_config=tune.FailureConfig(max_failures=0))
    params = {"params": {key: _distribution(d) for key, d in space.space.items()}}
    return tune.Tuner(trainable, param_space=params, tune_config=config, run_config=run_config)


def _open_parent(space: SpaceFileSpec, *, request: SearchRequest, base, folder: Path, name: str,
                 restoring: bool):
    """The search's parent MLflow run: created, or reopened when the search resumes."""
    import yaml
    from mlflow import MlflowClient

    from temper.tracking.runs import check_reachable, ensure_experiment, resolve_tracking_uri

    uri = resolve_tracking_uri(base.tracking.uri, workdir=request.workdir)
    check_reachable(uri)
    client = MlflowClient(tracking_uri=uri)
    state = folder / STATE_FILE
    if restoring and state.is_file():
        parent = json.loads(state.read_text())["parent_run_id"]
        client.update_run(parent, status="RUNNING")
        console.print(f"search {name}: MLflow parent run [bold]{parent}[/bold] (resumed) in {uri}")
        return client, uri, parent
    experiment_id = ensure_experiment(client, base.tracking.experiment, uri=uri, workdir=request.workdir)
    tags = {"temper.tune": name, "mlflow.source.name": "temper tune", **request.parent_tags}
    parent = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    settings = space.tune.model_dump(mode="json")
    client.log_batch(parent, params=_params({**{f"tune.{k}": v for k, v in settings.items()},
                                             **{f"space.{k}": d.model_dump(exclude_none=True)
                                                for k, d in space.space.items()}}))
    client.log_text(parent, yaml.safe_dump(space.model_dump(mode="json", exclude_none=True), sort_keys=False),
                    "space.yaml")
    folder.mkdir(parents=True, exist_ok=True)
    state.write_text(json.dumps({"parent_run_id": parent, "tracking_uri": uri}))
    console.print(f"search {name}: MLflow parent run [bold]{parent}[/bold] in {uri}")
    return client, uri, parent


def _params(values: dict[str, Any]):
    from mlflow.entities import Param

    return [Param(k, v if isinstance(v, str) else json.dumps(v)) for k, v in values.items()]


def _collect(grid, *, result: SearchResult, client, base) -> bool:
    """Fill result.trials from Tune's trials and their child runs; True if the search was cut short."""
    runs = _child_runs(client, result.parent_run_id)
    interrupted = False
    for trial in grid._experiment_analysis.trials:  # Tune's Trial objects carry the status
        last = trial.last_result or {}
        step = int(last["step"]) if "step" in last else None
        max_steps = int(last.get("max_steps", trial.config["params"].get("train.max_steps", base.train.max_steps)))
        if trial.status == "ERROR":
            status = "failed"
        elif trial.status != "TERMINATED":
            status, interrupted = "killed", True
        else:
            status = "early-stopped" if step is not None and step < max_steps else "finished"
        value = last.get(result.metric)
        run = runs.get(trial.trial_id)
        row = TrialRow(trial.trial_id, dict(trial.config["params"]), status, step,
                       float(value) if value is not None else None, run.info.run_id if run else None)
        result.trials.append(row)
        if run is not None:
            _settle_run(client, run, row, metric=result.metric)
    return interrupted


SETTLE_S, QUIET_S = 30.0, 4.0  # how long to watch the trials' runs as Ray stops them


def _stop_trials_and_kill_their_runs(client, parent: str) -> str:
    """After Ctrl-C: end this driver's Ray job (Ray stops its trials and their workers), and
    end KILLED every trial run left RUNNING; returns their trial ids.

    A trial can still write for a moment after the interrupt: one starting up creates (or
    reopens) its run, one whose workers go away may end its run FAILED. So the runs are
    watched until QUIET_S pass with nothing to correct (SETTLE_S at most)."""
    import ray

    cut = _kill_running_trials(client, parent, set())
    ray.shutdown()
    _watch_until_quiet(lambda: bool(_kill_running_trials(client, parent, cut)))
    return ", ".join(sorted(cut))


def _watch_until_quiet(correct: Callable[[], bool]) -> None:
    """Call `correct` (True: it changed a run) every second until QUIET_S pass with nothing
    to correct, SETTLE_S at most: the trials' processes Ray is ending may still write."""
    start = last_change = time.monotonic()
    while time.monotonic() - start < SETTLE_S and time.monotonic() - last_change < QUIET_S:
        time.sleep(1.0)
        if correct():
            last_change = time.monotonic()


def _kill_running_trials(client, parent: str, cut: set[str]) -> set[str]:
    """The trials' runs still RUNNING, and those in `cut` (already interrupted) that ended
    FAILED since, end KILLED; their trial ids are added to `cut` and returned."""
    changed = set()
    for trial_id, run in _child_runs(client, parent).items():
        if run.info.status == "RUNNING" or (trial_id in cut and run.info.status == "FAILED"):
            client.set_terminated(run.info.run_id, status="KILLED")
            changed.add(trial_id)
    cut |= changed
    return changed


def _child_runs(client, parent: str) -> dict[str, Any]:
    experiment = client.get_run(parent).info.experiment_id
    runs = client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'",
                              max_results=10000)
    return {r.data.tags[TRIAL_TAG]: r for r in runs if TRIAL_TAG in r.data.tags}


def _settle_trials(grid, *, result: SearchResult, client, base) -> bool:
    """After fit(): end this driver's Ray job, then settle every trial's run (_collect).

    A trial ASHA stopped runs on for a few steps while Tune moves on, so the search may end
    before its process does; Ray ends those processes with the job, and until QUIET_S pass
    with nothing to correct (SETTLE_S at most) a run that a late write moved away from its
    trial's outcome is put back. Returns True if the search was cut short."""
    import ray

    ray.shutdown()
    interrupted = _collect(grid, result=result, client=client, base=base)

    def correct() -> bool:
        runs = _child_runs(client, result.parent_run_id)
        # every row is settled (no short-circuit), then whether any changed
        return any([_end_run_as(client, runs[row.trial_id], row) for row in result.trials if row.trial_id in runs])

    _watch_until_quiet(correct)
    return interrupted


OUTCOME = {"finished": "FINISHED", "early-stopped": "FINISHED", "failed": "FAILED", "killed": "KILLED"}


def _settle_run(client, run, row: TrialRow, *, metric: str) -> None:
    """Record on a child run what the search ranked it by (`tune/<metric>`, its last reported
    value), and end one whose trial Tune stopped (ASHA) or the interrupt left running."""
    if row.value is not None:
        client.log_metric(run.info.run_id, f"tune/{metric}", row.value, step=row.step or 0)
    _end_run_as(client, run, row)


def _end_run_as(client, run, row: TrialRow) -> bool:
    """The run's status as its trial's outcome; True if it changed anything. An early-stopped
    trial's run ends FINISHED (an error its driver recorded as the workers went away is
    removed); a run still RUNNING ends as its trial did (finished: FINISHED, failed: FAILED,
    killed: KILLED); a run its own driver ended otherwise keeps that."""
    run_id = run.info.run_id
    if row.status == "early-stopped":
        # Tune ends the trial's process: its workers may have run a few steps past the stop
        # decision, and its driver may have failed the run as its actors went away.
        changed = run.info.status != "FINISHED" or "temper.error" in run.data.tags
        if EARLY_TAG not in run.data.tags:
            client.set_tag(run_id, EARLY_TAG, "true")
            client.set_tag(run_id, "temper.tune.stopped_at_step", str(row.step))
        if "temper.error" in run.data.tags:
            client.delete_tag(run_id, "temper.error")
            client.delete_tag(run_id, "mlflow.note.content")
        if run.info.status != "FINISHED":
            client.set_terminated(run_id, status="FINISHED")
        return changed
    if run.info.status == "RUNNING":
        client.set_terminated(run_id, status=OUTCOME[row.status])
        return True
    return False


def _finish(result: SearchResult, *, client, setup: TrialSetup, space: SpaceFileSpec, register: str | None) -> None:
    from temper.launch.tune_report import best_trial, log_report

    result.best = best_trial(result.trials, mode=result.mode)
    log_report(result, client=client)
    if result.best is None:
        console.print(f"[yellow]warning:[/yellow] search {result.name}: no trial reported {result.metric}")
        return
    best = result.best
    spec = trial_spec(setup, best.params, trial_id=None)
    from temper.spec.loader import spec_to_yaml

    result.best_spec_path = result.folder / "best.yaml"
    header = (f"# The best trial ({best.trial_id}, run {best.run_id}) of the search {result.name}: "
              f"{result.metric} {best.value:.6g}\n")
    result.best_spec_path.write_text(header + spec_to_yaml(spec))
    client.log_text(result.parent_run_id, header + spec_to_yaml(spec), "best.yaml")
    client.log_metric(result.parent_run_id, f"best/{result.metric}", best.value)
    client.set_tag(result.parent_run_id, "temper.tune.best_run_id", best.run_id or "")
    if register and best.run_id:
        _register_best(spec, run_id=best.run_id, name=register, client=client, uri=result.tracking_uri)


def _register_best(spec, *, run_id: str, name: str, client, uri: str) -> None:
    from temper.launch.lifecycle import register_run_model
    from temper.tracking.runs import RunHandle

    run = client.get_run(run_id)
    spec = spec.model_copy(update={"tracking": spec.tracking.model_copy(update={"register_model": name})})
    handle = RunHandle(run_id=run_id, experiment_id=run.info.experiment_id, tracking_uri=uri, ui_url=None)
    register_run_model(spec, handle=handle, checkpoint_dir=run.data.tags.get("temper.checkpoint_dir"))
