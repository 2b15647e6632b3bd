"""The MLflow model registry side of Temper: register exported models, move aliases, resolve
`models:/NAME/VERSION` and `models:/NAME@ALIAS` back to a local folder.

    register_version(folder, name=, run_id=, ...)  -> RegisterResult (version, aliases moved/kept)
    resolve_model_uri("models:/gpt@pretrained")    -> (folder with model.safetensors + config.json,
                                                       ModelVersionInfo)

An alias given with a `BetterRule` (`temper export --alias best --if-better val/loss`) moves
only when the new version's run beats the run of the version holding it (strictly: a tie
keeps it where it is).
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from temper.errors import TemperError
from temper.tracking.backend import short_reason

log = logging.getLogger(__name__)

MODEL_FILES = ("model.safetensors", "config.json")
ARTIFACT_PATH = "model"  # where the exported folder goes in the run's artifacts
METRIC_TAG = "temper.metric."  # + metric name: the value a --if-better comparison used
_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))/?$")
_MIN_WORDS = ("loss", "error", "err", "perplexity", "ppl", "mse", "mae", "rmse", "time", "wer", "cer")
_MAX_WORDS = ("acc", "accuracy", "f1", "auc", "precision", "recall", "score", "bleu", "rouge",
              "map", "iou", "samples_per_s", "tokens_per_s", "mfu")


@dataclass(frozen=True)
class BetterRule:
    """Move an alias only when `metric` improves: mode "min" (lower wins) or "max"."""

    metric: str
    mode: str

    def beats(self, new: float, old: float) -> bool:
        return new < old if self.mode == "min" else new > old


@dataclass(frozen=True)
class ModelVersionInfo:
    name: str
    version: str
    run_id: str | None
    source: str
    aliases: tuple[str, ...]
    tags: dict[str, str] = field(default_factory=dict)
    description: str = ""


@dataclass
class RegisterResult:
    version: str
    moved: list[str] = field(default_factory=list)  # aliases now on `version`
    kept: dict[str, str] = field(default_factory=dict)  # alias -> why it stayed where it was


def build_better_rule(metric: str | None, mode: str | None) -> BetterRule | None:
    """--if-better METRIC [--mode min|max]; the mode is inferred from the metric's name."""
    if metric is None:
        if mode is not None:
            raise TemperError("--mode needs --if-better METRIC (the metric it applies to)")
        return None
    if mode is None:
        mode = infer_mode(metric)
    if mode not in ("min", "max"):
        raise TemperError(f"--mode {mode!r}: pass min (lower is better) or max (higher is better)")
    return BetterRule(metric=metric, mode=mode)


def infer_mode(metric: str) -> str:
    """min for losses and errors, max for accuracies and scores; else a TemperError."""
    words = re.split(r"[/._\-\s]+", metric.lower())
    last = metric.lower().rsplit("/", 1)[-1]
    if any(w in _MIN_WORDS for w in words):
        return "min"
    if any(w in _MAX_WORDS for w in words) or last in _MAX_WORDS:
        return "max"
    raise TemperError(f"--if-better {metric}: cannot tell whether lower or higher is better; "
                      "add --mode min or --mode max")


def check_alias(alias: str) -> str:
    """MLflow's alias rules, checked before anything is exported: letters, digits, _ and -;
    not `latest` nor `v<digits>` (both reserved for versions)."""
    if not re.fullmatch(r"[\w-]{1,255}", alias) or alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        raise TemperError(f"--alias {alias!r}: use letters, digits, _ and - (not 'latest' or "
                          "v<number>, which MLflow reserves), e.g. --alias best")
    return alias


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """(name, version, alias) of models:/NAME/VERSION or models:/NAME@ALIAS."""
    match = _URI.match(uri.strip())
    if not match:
        raise TemperError(f"model reference {uri!r} is not models:/NAME/VERSION or models:/NAME@ALIAS; "
                          "e.g. models:/tiny-gpt/3 or models:/tiny-gpt@pretrained")
    return match["name"], match["version"], match["alias"]


def register_version(folder: Path, *, client: Any, name: str, run_id: str, tags: dict[str, str],
                     description: str, aliases: tuple[str, ...] = (),
                     better: BetterRule | None = None) -> RegisterResult:
    """Log `folder` to the run under `model/`, create a version of `name` with `tags` and
    `description`, then set `aliases` on it (each gated by `better` when given)."""
    run = client.get_run(run_id)
    value = run_metric(run, better) if better else None
    if better is not None and value is None:
        raise TemperError(f"--if-better {better.metric}: run {run_id} logged no {better.metric}")
    client.log_artifacts(run_id, str(folder), artifact_path=ARTIFACT_PATH)
    try:
        client.get_registered_model(name)
    except Exception:  # noqa: BLE001 - not registered yet
        client.create_registered_model(name)
    if better is not None:
        tags = {**tags, METRIC_TAG + better.metric: repr(value)}
    source = f"{run.info.artifact_uri.rstrip('/')}/{ARTIFACT_PATH}"
    created = client.create_model_version(name, source=source, run_id=run_id, tags=tags,
                                          description=description)
    result = RegisterResult(version=str(created.version))
    for alias in aliases:
        why = _holds_better(client, name=name, alias=alias, better=better, value=value)
        if why:
            result.kept[alias] = why
            continue
        client.set_registered_model_alias(name, alias, result.version)
        result.moved.append(alias)
    return result


def run_metric(run: Any, better: BetterRule) -> float | None:
    """The run's final value of the rule's metric (None: not logged, or NaN)."""
    value = run.data.metrics.get(better.metric)
    return None if value is None or math.isnan(value) else float(value)


def _holds_better(client: Any, *, name: str, alias: str, better: BetterRule | None,
                  value: float | None) -> str | None:
    """Why `alias` stays on its current version, or None when it should move."""
    if better is None:
        return None
    try:
        holder = client.get_model_version_by_alias(name, alias)
    except Exception:  # noqa: BLE001 - MlflowException: the alias is not set yet
        return None
    old = None
    if holder.run_id:
        try:
            old = run_metric(client.get_run(holder.run_id), better)
        except Exception:  # noqa: BLE001 - the holder's run was deleted: use the version's tag
            old = None
    if old is None and METRIC_TAG + better.metric in (holder.tags or {}):
        old = float(holder.tags[METRIC_TAG + better.metric])
    if old is None:
        log.warning("@%s is on version %s, which records no %s; moving it", alias, holder.version,
                    better.metric)
        return None
    if better.beats(value, old):
        return None
    word = "lower" if better.mode == "min" else "higher"
    return (f"version {holder.version} keeps @{alias}: its {better.metric} {old:.6g} vs "
            f"{value:.6g} here ({better.mode} mode: only a strictly {word} value moves it)")


def model_version(uri: str, *, client: Any, tracking_uri: str) -> ModelVersionInfo:
    """The registered version a models:/ reference names; unknown ones are a TemperError."""
    name, version, alias = parse_model_uri(uri)
    try:
        if alias is not None:
            found = client.get_model_version_by_alias(name, alias)
        else:
            found = client.get_model_version(name, version)
    except Exception as e:  # noqa: BLE001 - MlflowException: no such model/version/alias
        what = f"alias @{alias}" if alias is not None else f"version {version}"
        raise TemperError(f"{uri}: model {name!r} has no {what} in {tracking_uri} ({short_reason(e)}); "
                          f"list its versions with `mlflow models` or the UI, or register one with "
                          f"`temper export RUN --register {name}`") from None
    return ModelVersionInfo(name=found.name, version=str(found.version), run_id=found.run_id,
                            source=found.source, aliases=tuple(found.aliases or ()),
                            tags=dict(found.tags or {}), description=found.description or "")


def resolve_model_uri(uri: str, tracking_uri: str | None = None, *,
                      cache_dir: Path | None = None) -> tuple[Path, ModelVersionInfo]:
    """A local folder holding the version's model.safetensors + config.json, and its info.

    Downloads once per version into `cache_dir` (default $XDG_CACHE_HOME/temper/models, else
    ~/.cache/temper/models); an alias is resolved to its version first, so moving the alias
    later gives the new version's weights.
    """
    from mlflow import MlflowClient

    from temper.tracking.runs import check_reachable, resolve_tracking_uri

    resolved = resolve_tracking_uri(tracking_uri, workdir=Path.cwd())
    check_reachable(resolved)
    info = model_version(uri, client=MlflowClient(tracking_uri=resolved), tracking_uri=resolved)
    # Keyed by the run too: version 1 of a model on another server (or a re-created one) is
    # other weights under the same name and number.
    folder = _cache_root(cache_dir) / _safe(info.name) / f"{info.version}-{_safe(info.run_id or 'norun')[:32]}"
    if all((folder / f).is_file() for f in MODEL_FILES):
        return folder, info
    _download(info, folder=folder, tracking_uri=resolved, uri=uri)
    return folder, info


def _download(info: ModelVersionInfo, *, folder: Path, tracking_uri: str, uri: str) -> None:
    import mlflow.artifacts

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{info.version}-", dir=folder.parent))
    try:
        got = Path(mlflow.artifacts.download_artifacts(artifact_uri=info.source, dst_path=str(tmp),
                                                       tracking_uri=tracking_uri))
        missing = [f for f in MODEL_FILES if not (got / f).is_file()]
        if missing:
            raise TemperError(f"{uri} (version {info.version}, {info.source}) lacks {', '.join(missing)}; "
                              "it was not registered by `temper export`: re-export its run")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(got, folder)
    except TemperError:
        raise
    except Exception as e:  # noqa: BLE001 - artifact store errors
        raise TemperError(f"{uri}: downloading {info.source} failed ({short_reason(e)}); check the "
                          "artifact store is reachable from here") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cache_root(cache_dir: Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "temper" / "models"


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]", "_", name)
