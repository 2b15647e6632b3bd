"""Pretrained weights for `init_from:`, read the same way wherever they come from.

    open_weights(path) -> PretrainedWeights
        a `temper export` folder (model.safetensors + config.json): tensors read lazily, one
            at a time (a rank never holds a second copy of the model)
        a checkpoint (a run folder: its newest committed step; or a step-N folder): DCP's
            metadata gives the shapes; the model's tensors are read in full on first use
    weights.shapes            name -> shape (model state names: parameters and buffers)
    weights.get(name)         a CPU tensor (float32 for floating point)
    weights.model_spec        the `model:` section it was trained with (kind, sizes)
    weights.run_id / step     where it came from (lineage)

`compare` matches them against the model a job builds: what loads, what is new (the task
head), what is ignored (a pretraining head), and what cannot match (an error).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from temper.errors import TemperError

log = logging.getLogger(__name__)

MODEL_FILE, CONFIG_FILE = "model.safetensors", "config.json"
_SPEC_FIELDS_IGNORED = {"num_classes", "flavor", "dropout", "pool"}


class PretrainedWeights:
    def __init__(self, *, path: str, shapes: dict[str, tuple[int, ...]], model_spec: dict | None,
                 run_id: str | None, step: int | None, loader, origin: str | None = None) -> None:
        self.path, self.shapes, self.model_spec = path, shapes, model_spec or {}
        self.run_id, self.step = run_id, step
        self.origin = origin or path  # the checkpoint an exported folder was made from
        self._loader = loader

    def get(self, name: str) -> torch.Tensor:
        tensor = self._loader(name)
        return tensor.float() if tensor.is_floating_point() else tensor


def open_weights(path: str, *, storage_options: dict | None = None) -> PretrainedWeights:
    """An export folder or a checkpoint; a TemperError names `path` when it is neither."""
    folder = Path(path)
    if "://" not in path and (folder / MODEL_FILE).is_file():
        return _from_export(folder)
    from temper.checkpoint.export import _resolve

    try:
        ckpt = _resolve(path, storage_options=storage_options)
    except TemperError:
        raise
    except Exception as e:  # noqa: BLE001 - fsspec/OS errors for a wrong path
        raise TemperError(f"init_from: {path} is neither a `temper export` folder ({MODEL_FILE} + {CONFIG_FILE}) "
                          f"nor a checkpoint ({type(e).__name__}: {e}); pass a run or step-N folder") from None
    return _from_checkpoint(ckpt, storage_options=storage_options)


def _from_export(folder: Path) -> PretrainedWeights:
    from safetensors import safe_open

    config = json.loads((folder / CONFIG_FILE).read_text()) if (folder / CONFIG_FILE).is_file() else {}
    handle = safe_open(str(folder / MODEL_FILE), framework="pt")
    shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}  # noqa: SIM118
    source = config.get("source") or {}
    return PretrainedWeights(path=str(folder), shapes=shapes, model_spec=config.get("model"),
                             run_id=source.get("run_id"), step=source.get("step"), loader=handle.get_tensor,
                             origin=source.get("checkpoint"))


def _from_checkpoint(ckpt, *, storage_options: dict | None) -> PretrainedWeights:
    from temper.checkpoint.export import _dcp_model_weights, _deepspeed_model_weights
    from temper.checkpoint.storage import open_store

    manifest = ckpt.manifest
    cache: dict[str, torch.Tensor] = {}

    def full() -> dict[str, torch.Tensor]:
        if not cache:
            if manifest.engine == "dcp":
                cache.update(_dcp_model_weights(open_store(ckpt.path, storage_options=storage_options)))
            else:
                cache.update(_deepspeed_model_weights(ckpt.path))
        return cache

    if manifest.engine == "dcp":
        shapes = _dcp_shapes(ckpt.path, storage_options=storage_options)
    else:
        shapes = {k: tuple(v.shape) for k, v in full().items()}
    return PretrainedWeights(path=ckpt.path, shapes=shapes, model_spec=manifest.extra.get("model"),
                             run_id=manifest.run_id, step=manifest.step, loader=lambda name: full()[name])


def _dcp_shapes(path: str, *, storage_options: dict | None) -> dict[str, tuple[int, ...]]:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from temper.checkpoint.engines import dcp_reader
    from temper.checkpoint.storage import open_store

    store = open_store(path, storage_options=storage_options)
    metadata = dcp_reader(store, store.root).read_metadata()
    return {key[len("model."):]: tuple(meta.size) for key, meta in metadata.state_dict_metadata.items()
            if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)}


@dataclass
class Match:
    """How a source's tensors map onto a job's model."""

    loaded: list[str] = field(default_factory=list)  # same name and shape: copied in
    new: list[str] = field(default_factory=list)  # the model's, absent from the source (task heads)
    reshaped: list[str] = field(default_factory=list)  # a head whose shape differs: initialized anew
    ignored: list[str] = field(default_factory=list)  # the source's, absent from the model

    def summary(self) -> str:
        return (f"{len(self.loaded)} tensors loaded, {len(self.new) + len(self.reshaped)} new "
                f"({_few(self.new + self.reshaped)}), {len(self.ignored)} ignored ({_few(self.ignored)})")

    def tags(self) -> dict[str, str]:
        return {"temper.init_from.loaded": str(len(self.loaded)),
                "temper.init_from.new": ",".join(self.new + self.reshaped)[:4000] or "-",
                "temper.init_from.ignored": ",".join(self.ignored)[:4000] or "-"}


def compare(weights: PretrainedWeights, *, model_spec: Any, objective: Any, source: str) -> Match:
    """Match `weights` to the model this job builds; a backbone tensor that is missing or of
    another shape is a TemperError naming the spec fields that differ."""
    from temper.models import build_model, is_head

    src_kind = weights.model_spec.get("kind")
    if src_kind and src_kind != model_spec.kind:
        raise TemperError(f"init_from {source}: it holds a {src_kind} model, but model.kind is {model_spec.kind}; "
                          f"fine-tune the architecture that was pretrained (model.kind: {src_kind})")
    with torch.device("meta"):
        model = build_model(model_spec, objective=objective)
    match, problems = Match(), []
    for name, ref in model.state_dict().items():
        shape = weights.shapes.get(name)
        if shape == tuple(ref.shape):
            match.loaded.append(name)
        elif is_head(name):
            (match.new if shape is None else match.reshaped).append(name)
        elif shape is None:
            problems.append(f"{name} is missing")
        else:
            problems.append(f"{name} is {list(shape)}, the model expects {list(ref.shape)}")
    if problems:
        raise TemperError(f"init_from {source} does not fit model ({len(problems)} backbone tensors: "
                          f"{'; '.join(problems[:3])}){_spec_diff(weights.model_spec, model_spec)}; set the model "
                          "section to the sizes it was pretrained with")
    match.ignored = sorted(set(weights.shapes) - set(model.state_dict()))
    if not any(not is_head(n) for n in match.loaded):
        raise TemperError(f"init_from {source}: no backbone tensor matches model.kind {model_spec.kind}; "
                          "is it a checkpoint of this architecture?")
    return match


def _spec_diff(source: dict, model_spec: Any) -> str:
    if not source:
        return ""
    mine = model_spec.model_dump(mode="json")
    diffs = [f"{k} {source[k]} there vs {mine[k]} here" for k in sorted(set(source) & set(mine))
             if k not in _SPEC_FIELDS_IGNORED and source[k] != mine[k]]
    return f"; pretrained with {', '.join(diffs)}" if diffs else ""


def _few(names: list[str], n: int = 3) -> str:
    if not names:
        return "none"
    heads = sorted({".".join(x.split(".")[:2]) if x.startswith("heads.") else x for x in names})
    return ", ".join(heads[:n]) + (", ..." if len(heads) > n else "")


def weights_for_worker(spec: Any, run_info: dict | None) -> PretrainedWeights | None:
    """init_from's weights on a worker: where the driver resolved them (run_info["init_from"]),
    fetched again on this node when that folder is not here (a models:/ download lives in
    the driver's cache); without a driver (tests, in-process use) a path is used as given."""
    if spec.init_from is None:
        return None
    where = (run_info or {}).get("init_from") or {}
    path = where.get("path")
    if path is None and spec.init_from.kind == "checkpoint":
        path = spec.init_from.source
    if path is None:
        raise TemperError(f"init_from {spec.init_from.source}: the driver did not resolve it; start the job "
                          "with `temper run` (or pass a checkpoint folder)")
    if "://" not in path and not Path(path).exists() and where.get("model_uri"):
        from temper.tracking.registry import resolve_model_uri

        path = str(resolve_model_uri(where["model_uri"], where.get("tracking_uri"))[0])
    return open_weights(path, storage_options=where.get("storage_options"))
