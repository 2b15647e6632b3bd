"""Model weights out of checkpoints: read them for init_from, consolidate them for export.

The worker side of a model's lifecycle (the driver side is launch/lifecycle.py):

    open_weights(path) -> PretrainedWeights
        a `temper export` folder (model.safetensors + config.json): tensors read lazily, one
            at a time (a rank never holds a second copy of the model)
        a checkpoint (a run folder: its newest committed step; or a step-N folder): DCP's
            metadata gives the shapes; each tensor is read in full when asked for, one at a
            time (DeepSpeed: merged once by its zero_to_fp32)
    weights.shapes            name -> shape (model state names: parameters and buffers)
    weights.get(name)         a CPU tensor (float32 for floating point)
    weights.model_spec        the `model:` section it was trained with (kind, sizes)
    weights.run_id / step     where it came from (lineage)
    compare(weights, ...)     what loads, what is new (the task head), what is ignored (a
                              pretraining head), and what cannot match (an error)
    weights_for_worker(...)   init_from's weights on a worker, where the driver found them

    export_checkpoint(source, out_dir) consolidated weights, in one process without a group,
      streamed one tensor at a time (checkpoint/tensorfile.py):
        out_dir/model.safetensors   full fp32 tensors under the bare model's state_dict names
        out_dir/config.json         {"model": <model spec>, "source": {...}, "temper_version": ...}
      dcp: the global shapes come from `.metadata`; only the "model" entries are read.
      deepspeed: DeepSpeed's own zero_to_fp32 merges the ZeRO partitions.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from temper.checkpoint.catalog import is_step_dir, latest_in, read_checkpoint
from temper.checkpoint.engines import DEEPSPEED_TAG, dcp_reader, quiet_single_process
from temper.checkpoint.manifest import CommittedCheckpoint
from temper.checkpoint.storage import Store, fsync_dir, is_remote, open_store
from temper.checkpoint.tensorfile import write_streaming
from temper.errors import MissingDependencyError, TemperError
from temper.run_info import InitFromLocation

log = logging.getLogger(__name__)

MODEL_FILE, CONFIG_FILE = "model.safetensors", "config.json"
_SPEC_FIELDS_IGNORED = {"num_classes", "flavor", "dropout", "pool"}

class PretrainedWeights:
    def __init__(self, *, path: str, shapes: dict[str, tuple[int, ...]], model_spec: dict | None,
                 run_id: str | None, step: int | None, loader, origin: str | None = None,
                 shard_loader: Callable[[dict[str, Any]], bool] | None = None) -> None:
        self.path, self.shapes, self.model_spec = path, shapes, model_spec or {}
        self.run_id, self.step = run_id, step
        self.origin = origin or path  # the checkpoint an exported folder was made from
        self._loader = loader
        self._shard_loader = shard_loader

    def get(self, name: str) -> torch.Tensor:
        tensor = self._loader(name)
        return tensor.float() if tensor.is_floating_point() else tensor

    def load_shards(self, targets: dict[str, Any]) -> bool:
        """Fill DTensors with their local shards only (a DCP checkpoint); False otherwise."""
        return self._shard_loader is not None and self._shard_loader(targets)


def open_weights(path: str, *, storage_options: dict | None = None) -> PretrainedWeights:
    """An export folder or a checkpoint; a TemperError names `path` when it is neither."""
    folder = Path(path)
    if "://" not in path and (folder / MODEL_FILE).is_file():
        return _from_export(folder)
    try:
        ckpt = resolve_checkpoint(path, storage_options=storage_options)
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
    manifest = ckpt.manifest
    source = checkpoint_tensors(ckpt, storage_options=storage_options)
    return PretrainedWeights(path=ckpt.path, shapes=source.shapes, model_spec=manifest.extra.get("model"),
                             run_id=manifest.run_id, step=manifest.step, loader=source.get,
                             shard_loader=getattr(source, "load_shards", None))


class DcpTensors:
    """A DCP checkpoint's "model" entries, read one full (unsharded) tensor at a time: a
    rank or an export never holds more than the tensor it is copying."""

    def __init__(self, store: Store) -> None:
        self.store = store
        metadata = dcp_reader(store, store.root).read_metadata()
        self.meta: dict[str, TensorStorageMetadata] = {}
        for key, meta in metadata.state_dict_metadata.items():
            if not key.startswith("model."):
                continue
            if isinstance(meta, TensorStorageMetadata):
                self.meta[key[len("model."):]] = meta
            else:
                log.warning("skipping the non-tensor checkpoint entry %s", key)
        if not self.meta:
            raise TemperError(f"{store.url(store.root)} holds no model tensors; is it a temper checkpoint?")
        self.shapes = {name: tuple(meta.size) for name, meta in self.meta.items()}
        self.dtypes = {name: meta.properties.dtype for name, meta in self.meta.items()}

    def get(self, name: str) -> torch.Tensor:
        meta = self.meta[name]
        tensor = torch.empty(meta.size, dtype=meta.properties.dtype)
        with quiet_single_process():
            dcp.load({"model": {name: tensor}}, storage_reader=dcp_reader(self.store, self.store.root),
                     no_dist=True)
        return tensor


    def load_shards(self, targets: dict[str, Any]) -> bool:
        """One collective dcp.load into the ranks' DTensors: each reads only the chunks that
        overlap its own shards. Only when every target has the saved dtype (else False: the
        caller reads full tensors and converts)."""
        if not torch.distributed.is_initialized() or any(
                t.dtype != self.dtypes[name] for name, t in targets.items()):
            return False
        dcp.load({"model": dict(targets)}, storage_reader=dcp_reader(self.store, self.store.root))
        return True


class MergedTensors:
    """A DeepSpeed checkpoint's fp32 weights, merged from the ZeRO partitions by DeepSpeed's
    own zero_to_fp32 (which holds them all: DeepSpeed offers no per-tensor read)."""

    def __init__(self, path: str) -> None:
        self.tensors = deepspeed_model_weights(path)
        self.shapes = {name: tuple(t.shape) for name, t in self.tensors.items()}
        self.dtypes = {name: t.dtype for name, t in self.tensors.items()}

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]


def checkpoint_tensors(ckpt: CommittedCheckpoint, *, storage_options: dict | None) -> DcpTensors | MergedTensors:
    if ckpt.manifest.engine == "dcp":
        return DcpTensors(open_store(ckpt.path, storage_options=storage_options))
    return MergedTensors(ckpt.path)


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


def weights_for_worker(spec: Any, location: InitFromLocation | None, *,
                       fetch: Callable[[InitFromLocation], str] | None = None) -> PretrainedWeights | None:
    """init_from's weights on a worker: where the driver resolved them (`RunInfo.init_from`);
    `fetch` gets them again on a node where that folder is absent (a models:/ download lives
    in the driver's cache); without a driver (tests, in-process use) a path is used as given."""
    if spec.init_from is None:
        return None
    path = location.path if location is not None else None
    if path is None and spec.init_from.kind == "checkpoint":
        path = spec.init_from.source
    if path is None:
        raise TemperError(f"init_from {spec.init_from.source}: the driver did not resolve it; start the job "
                          "with `temper run` (or pass a checkpoint folder)")
    if location is not None and "://" not in path and not Path(path).exists() and location.model_uri and fetch:
        path = fetch(location)
    return open_weights(path, storage_options=location.storage_options if location is not None else None)


# --- export: consolidated safetensors from a sharded checkpoint ---


def export_checkpoint(source: str, out_dir: str, *, model_spec: dict | None = None,
                      storage_options: dict | None = None) -> Path:
    """Write `out_dir`/model.safetensors + config.json from a step or run directory."""
    ckpt = resolve_checkpoint(source, storage_options=storage_options)
    manifest = ckpt.manifest
    spec = model_spec if model_spec is not None else manifest.extra.get("model")
    if spec is None:
        raise TemperError(
            f"checkpoint {ckpt.path} records no model spec (manifest extra.model); pass "
            "model_spec= (the job's `model:` section) to export it"
        )
    source = checkpoint_tensors(ckpt, storage_options=storage_options)
    names = _export_names(source.shapes, spec=spec, source=ckpt.path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = [(name, source.shapes[src], _export_dtype(source.dtypes[src])) for name, src in names.items()]
    write_streaming(entries, lambda name: source.get(names[name]), out / MODEL_FILE)
    config = {
        "model": spec,
        "source": {"checkpoint": ckpt.path, "step": manifest.step, "run_id": manifest.run_id,
                   "spec_hash": manifest.spec_hash},
        "temper_version": manifest.temper_version,
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
    fsync_dir(str(out))
    log.info("exported %d tensors of %s (step %d) to %s", len(entries), ckpt.path, manifest.step, out)
    return out


def resolve_checkpoint(source: str, *, storage_options: dict | None) -> CommittedCheckpoint:
    store = open_store(source, storage_options=storage_options)
    if is_step_dir(store):
        return read_checkpoint(source, storage_options=storage_options)
    found = latest_in(store)
    if found is None:
        raise TemperError(
            f"{source} holds no committed checkpoint; pass a run directory with a finished save "
            "or a step-N directory with a COMMITTED marker"
        )
    return found


def deepspeed_model_weights(path: str) -> dict[str, torch.Tensor]:
    if is_remote(path):
        raise TemperError(f"{path}: DeepSpeed checkpoints are read from local or shared paths only")
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError:
        raise MissingDependencyError("deepspeed", feature="exporting a DeepSpeed checkpoint",
                                     extra="deepspeed") from None
    local = open_store(path).root
    return dict(get_fp32_state_dict_from_zero_checkpoint(local, tag=DEEPSPEED_TAG))


def _export_names(shapes: dict[str, tuple[int, ...]], *, spec: dict, source: str) -> dict[str, str]:
    """The bare model's state_dict names (what the export holds) -> the checkpoint tensor each
    is read from (itself, or a tied alias); a missing tensor or another shape is an error."""
    from pydantic import TypeAdapter, ValidationError

    from temper.models import build_model
    from temper.spec.job import ModelSpec

    try:
        model_spec = TypeAdapter(ModelSpec).validate_python(spec)
    except ValidationError as e:
        raise TemperError(f"model spec for export is invalid: {e.errors()[0]['msg']}; pass model_spec=") from None
    with torch.device("meta"):
        model = build_model(model_spec)
    aliases = _aliases(model)
    names: dict[str, str] = {}
    for name, ref in model.state_dict().items():
        src = name if name in shapes else next((a for a in aliases.get(name, ()) if a in shapes), None)
        if src is None:
            raise TemperError(f"{source} has no tensor for {name}; was it saved from this model spec?")
        if tuple(shapes[src]) != tuple(ref.shape):
            raise TemperError(
                f"{source}: {name} has shape {tuple(shapes[src])}, the model spec expects "
                f"{tuple(ref.shape)}; pass the model_spec the checkpoint was trained with"
            )
        names[name] = src
    unused = sorted(set(shapes) - set(names.values()))
    if unused:
        log.warning("export ignores %d checkpoint tensors the model does not have: %s",
                    len(unused), ", ".join(unused[:5]))
    return names


def _export_dtype(dtype: torch.dtype) -> torch.dtype:
    """Exports hold fp32 floating point (a bf16 checkpoint is widened), other dtypes as saved."""
    return torch.float32 if dtype.is_floating_point else dtype


def _aliases(model: torch.nn.Module) -> dict[str, list[str]]:
    """state_dict name -> the other names of the same parameter (tied weights)."""
    by_param: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_param.setdefault(id(p), []).append(name)
    return {n: [m for m in names if m != n] for names in by_param.values() for n in names}
