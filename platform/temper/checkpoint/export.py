"""Consolidated weights from a sharded checkpoint, in one process without a process group.

    out_dir/model.safetensors   full fp32 tensors under the bare model's state_dict names
    out_dir/config.json         {"model": <model spec>, "source": {...}, "temper_version": ...}

dcp: the global shapes come from `.metadata`; only the "model" entries are read.
deepspeed: DeepSpeed's own zero_to_fp32 merges the ZeRO partitions.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from temper.checkpoint.catalog import is_step_dir, latest_in, read_checkpoint
from temper.checkpoint.engines import DEEPSPEED_TAG, dcp_reader, quiet_single_process
from temper.checkpoint.manifest import CommittedCheckpoint
from temper.checkpoint.storage import Store, fsync_dir, is_remote, open_store
from temper.errors import MissingDependencyError, TemperError

log = logging.getLogger(__name__)


def export_checkpoint(source: str, out_dir: str, *, model_spec: dict | None = None,
                      storage_options: dict | None = None) -> Path:
    """Write `out_dir`/model.safetensors + config.json from a step or run directory."""
    ckpt = _resolve(source, storage_options=storage_options)
    manifest = ckpt.manifest
    spec = model_spec if model_spec is not None else manifest.extra.get("model")
    if spec is None:
        raise TemperError(
            f"checkpoint {ckpt.path} records no model spec (manifest extra.model); pass "
            "model_spec= (the job's `model:` section) to export it"
        )
    store = open_store(ckpt.path, storage_options=storage_options)
    if manifest.engine == "dcp":
        weights = _dcp_model_weights(store)
    else:
        weights = _deepspeed_model_weights(ckpt.path)
    tensors = _match_model(weights, spec=spec, source=ckpt.path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_safetensors(tensors, out / "model.safetensors")
    config = {
        "model": spec,
        "source": {"checkpoint": ckpt.path, "step": manifest.step, "run_id": manifest.run_id,
                   "spec_hash": manifest.spec_hash},
        "temper_version": manifest.temper_version,
    }
    (out / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
    fsync_dir(str(out))
    log.info("exported %d tensors of %s (step %d) to %s", len(tensors), ckpt.path, manifest.step, out)
    return out


def _resolve(source: str, *, storage_options: dict | None) -> CommittedCheckpoint:
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


def _dcp_model_weights(store: Store) -> dict[str, torch.Tensor]:
    """Read the "model" entries at their full (global) shapes into plain CPU tensors."""
    metadata = dcp_reader(store, store.root).read_metadata()
    state: dict[str, torch.Tensor] = {}
    for key, meta in metadata.state_dict_metadata.items():
        if not key.startswith("model."):
            continue
        if isinstance(meta, TensorStorageMetadata):
            state[key[len("model."):]] = torch.empty(meta.size, dtype=meta.properties.dtype)
        else:
            log.warning("export skips the non-tensor entry %s", key)
    if not state:
        raise TemperError(f"{store.url(store.root)} holds no model tensors; is it a temper checkpoint?")
    with quiet_single_process():
        dcp.load({"model": state}, storage_reader=dcp_reader(store, store.root), no_dist=True)
    return state


def _deepspeed_model_weights(path: str) -> dict[str, torch.Tensor]:
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


def _match_model(weights: dict[str, torch.Tensor], *, spec: dict, source: str) -> dict[str, torch.Tensor]:
    """The bare model's state_dict names and shapes, filled from `weights` (fp32, contiguous,
    no shared storage: safetensors refuses aliases, e.g. tied embeddings)."""
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
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, ref in model.state_dict().items():
        tensor = weights.get(name)
        if tensor is None:
            tensor = next((weights[a] for a in aliases.get(name, ()) if a in weights), None)
        if tensor is None:
            raise TemperError(f"{source} has no tensor for {name}; was it saved from this model spec?")
        if tuple(tensor.shape) != tuple(ref.shape):
            raise TemperError(
                f"{source}: {name} has shape {tuple(tensor.shape)}, the model spec expects "
                f"{tuple(ref.shape)}; pass the model_spec the checkpoint was trained with"
            )
        tensor = tensor.detach().to(torch.float32 if tensor.is_floating_point() else tensor.dtype)
        if tensor.untyped_storage().data_ptr() in seen:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[name] = tensor
    unused = sorted(set(weights) - set(out))
    if unused:
        log.warning("export ignores %d checkpoint tensors the model does not have: %s",
                    len(unused), ", ".join(unused[:5]))
    return out


def _aliases(model: torch.nn.Module) -> dict[str, list[str]]:
    """state_dict name -> the other names of the same parameter (tied weights)."""
    by_param: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_param.setdefault(id(p), []).append(name)
    return {n: [m for m in names if m != n] for names in by_param.values() for n in names}


def _write_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise MissingDependencyError("safetensors", feature="checkpoint export") from None
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
