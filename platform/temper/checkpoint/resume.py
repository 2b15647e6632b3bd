"""The driver's decision before any worker starts: a new run, or which run to continue.

    <checkpoint.dir>/                 default: temper-runs/<name> where `temper run` runs
        <run id>/step-000000100/      one folder per run (the MLflow run id), one per checkpoint

- default: the newest committed checkpoint among the runs in checkpoint.dir, if its run has
  not reached train.max_steps: that run continues (same MLflow run, same folder). A finished
  run is not continued: a new run starts (raise train.max_steps to train a finished run on).
- `--resume RUN_ID`: that run's folder; `--resume PATH`: a run folder or its newest step
  folder (an older step would mix two histories in one run: refused).
- `--no-resume`: a new run; earlier runs' checkpoints are left alone.
- `--run-id RUN_ID`: log into this existing MLflow run (`temper submit` creates it before the
  cluster starts the job): its newest checkpoint if it has one (a retried job), else step 0.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from temper.checkpoint.storage import storage_options
from temper.errors import TemperError
from temper.spec.job import JobSpec


@dataclass(frozen=True)
class ResumePlan:
    root: str  # checkpoint.dir, absolute
    run_id: str | None = None  # the run to continue (None: a new run)
    step: int | None = None  # the checkpoint step it continues from
    path: str | None = None  # that checkpoint's folder
    note: str | None = None  # what the driver tells the user
    marker_run_id: str | None = None  # a `pending-` folder's MLflow run, created after it
    changes: tuple[str, ...] = ()  # spec changes since the checkpoint that it loads with ("key: old -> new")

    def run_dir(self, run_id: str) -> str:
        return join(self.root, run_id)

    @property
    def mlflow_run_id(self) -> str | None:
        """The MLflow run to continue: the folder's name, except for folders of runs that
        had none when they started (`local-`: tracking off; `pending-`: the server was
        down, see write_run_marker)."""
        if self.run_id is None or self.run_id.startswith("local-"):
            return None
        if self.run_id.startswith("pending-"):
            return self.marker_run_id
        return self.run_id


def join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}" if "://" in base else str(Path(base) / name)


def checkpoint_root(spec: JobSpec, *, workdir: Path) -> str:
    folder = spec.checkpoint.dir or str(Path("temper-runs") / spec.name)
    if folder.startswith("file://"):
        folder = folder[len("file://"):]
    if "://" in folder or os.path.isabs(folder):
        return folder
    return str((Path(workdir) / folder).resolve())


def looks_like_path(target: str) -> bool:
    """A folder or URL (else an MLflow run id): what --resume and `temper export` accept."""
    return "/" in target or "://" in target or os.path.exists(target)


def new_local_run_id() -> str:
    """A run id when MLflow tracking is off (the folder name of the run's checkpoints)."""
    return f"local-{uuid.uuid4().hex[:12]}"


def plan_resume(spec: JobSpec, *, workdir: Path, resume: str | None = None, no_resume: bool = False,
                run_id: str | None = None) -> ResumePlan:
    """The plan; a resume whose checkpoint cannot load under `spec` is refused here (exit 2),
    before any run or worker starts (checkpoint/compat.py)."""
    plan = _plan(spec, workdir=workdir, resume=resume, no_resume=no_resume, run_id=run_id)
    if plan.step is None or plan.path is None:
        return plan
    from dataclasses import replace

    from temper.checkpoint import read_checkpoint
    from temper.checkpoint.compat import check_resume
    from temper.spec.loader import spec_to_dict

    extra = read_checkpoint(plan.path, storage_options=storage_options(spec)).manifest.extra or {}
    saved = extra.get("spec") or ({"model": extra["model"]} if "model" in extra else {})
    changes = check_resume(saved=saved, now=spec_to_dict(spec), where=f"run {plan.run_id} from step {plan.step}")
    return replace(plan, changes=changes)


def _plan(spec: JobSpec, *, workdir: Path, resume: str | None, no_resume: bool, run_id: str | None) -> ResumePlan:
    root = checkpoint_root(spec, workdir=workdir)
    if run_id is not None:
        return _attach(spec, root=root, run_id=run_id)
    if not spec.checkpoint.enabled:
        if resume:
            raise TemperError("--resume needs checkpoint.enabled=true")
        return ResumePlan(root=root)
    if no_resume:
        return ResumePlan(root=root)
    if resume:
        return _explicit(spec, root=root, target=resume)
    return _automatic(spec, root=root)


def _explicit(spec: JobSpec, *, root: str, target: str) -> ResumePlan:
    from temper.checkpoint import find_latest, read_checkpoint

    opts = storage_options(spec)
    if not looks_like_path(target):  # a run id
        latest = find_latest(join(root, target), storage_options=opts)
        if latest is None:
            raise TemperError(f"--resume {target}: no committed checkpoint in {join(root, target)}; "
                              "check the run id and checkpoint.dir, or pass --no-resume")
        return _plan_from(latest, root=root, run_id=target, storage_options=opts)
    target = str(Path(target).resolve()) if "://" not in target else target.rstrip("/")
    latest = find_latest(target, storage_options=opts)
    if latest is not None:  # a run folder
        return _plan_from(latest, root=_parent(target), run_id=_name(target), storage_options=opts)
    ckpt = read_checkpoint(target, storage_options=opts)  # a step folder: TemperError if broken
    run_dir = _parent(target)
    newest = find_latest(run_dir, storage_options=opts)
    if newest is not None and newest.manifest.step != ckpt.manifest.step:
        raise TemperError(
            f"--resume {target}: run {_name(run_dir)} has a newer checkpoint (step {newest.manifest.step}); "
            "resuming an older step would mix two histories in one run: resume the run, or copy the "
            "step folder into a new checkpoint.dir"
        )
    return _plan_from(ckpt, root=_parent(run_dir), run_id=_name(run_dir), storage_options=opts)


def _attach(spec: JobSpec, *, root: str, run_id: str) -> ResumePlan:
    if looks_like_path(run_id):
        raise TemperError(f"--run-id {run_id!r} is not an MLflow run id (a folder? use --resume)")
    if spec.checkpoint.enabled:
        from temper.checkpoint import find_latest

        latest = find_latest(join(root, run_id), storage_options=storage_options(spec))
        if latest is not None:
            return _plan_from(latest, root=root, run_id=run_id, storage_options=storage_options(spec))
    return ResumePlan(root=root, run_id=run_id, note=f"logging into MLflow run {run_id} from step 0")


def _automatic(spec: JobSpec, *, root: str) -> ResumePlan:
    from temper.checkpoint import find_latest

    opts = storage_options(spec)
    candidates, others = [], set()
    for run_dir in _run_dirs(root, opts):
        latest = find_latest(run_dir, storage_options=opts)
        if latest is None:
            continue
        # A checkpoint.dir shared by several jobs: only this job's runs are continued.
        name = (latest.manifest.extra or {}).get("name", spec.name)
        if name != spec.name:
            others.add(name)
            continue
        candidates.append((latest.manifest.created, run_dir, latest))
    if not candidates:
        note = None
        if others:
            note = (f"checkpoint.dir {root} holds runs of other jobs ({', '.join(sorted(others))}), none of "
                    f"'{spec.name}': starting a new run")
        return ResumePlan(root=root, note=note)
    _, run_dir, latest = max(candidates, key=lambda c: c[0])
    if latest.manifest.step >= spec.train.max_steps:
        return ResumePlan(root=root, note=(
            f"run {_name(run_dir)} already reached step {latest.manifest.step} (train.max_steps="
            f"{spec.train.max_steps}): starting a new run; raise train.max_steps to train it on "
            f"(--resume {_name(run_dir)})"))
    return _plan_from(latest, root=root, run_id=_name(run_dir), storage_options=opts)


def _plan_from(ckpt, *, root: str, run_id: str, storage_options: dict | None = None) -> ResumePlan:
    marker = read_run_marker(join(root, run_id), storage_options) if run_id.startswith("pending-") else None
    return ResumePlan(root=root, run_id=run_id, step=ckpt.manifest.step, path=ckpt.path, marker_run_id=marker,
                      note=f"resuming run {marker or run_id} from step {ckpt.manifest.step} ({ckpt.path})")


MARKER = "mlflow-run-id"


def write_run_marker(run_dir: str, run_id: str, *, spec: JobSpec) -> None:
    """A `pending-` run folder (MLflow was down when the job started) names its run once
    the driver created it, so that a resumed job continues that run."""
    import fsspec

    with fsspec.open(join(run_dir, MARKER), "w", **(storage_options(spec) or {})) as f:
        f.write(run_id)


def read_run_marker(run_dir: str, opts: dict | None) -> str | None:
    import fsspec

    try:
        with fsspec.open(join(run_dir, MARKER), "r", **(opts or {})) as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None


def _run_dirs(root: str, opts: dict | None) -> list[str]:
    import fsspec

    fs, path = fsspec.core.url_to_fs(root, **(opts or {}))
    if not fs.exists(path):
        return []
    dirs = [e["name"] for e in fs.ls(path, detail=True) if e.get("type") == "directory"]
    prefix = root.split("://")[0] + "://" if "://" in root else ""
    return [d if "://" in d or not prefix else prefix + d for d in dirs]


def _parent(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[0]


def _name(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]
