"""Raw WebDataset samples (bytes per field) -> the tensors a model's batch needs.

Batch fields by objective: causal_lm and mlm read `tokens`; mae and simclr read `image`
(simclr's views come from data.transform); classify reads the model's input (`image` or
`tokens`) and `label`.
Each batch field comes from one sample key (the tar member suffix), chosen from the
manifest's keys unless `data.fields` says otherwise:

    tokens <- tokens.npy            (int64 [seq_len + 1], cropped to the model's seq_len + 1)
    image  <- image.npy | data.npy | png | jpg | jpeg
              arrays: [H, W] -> [1, H, W]; [H, W, C] -> [C, H, W]; integers scaled to [0, 1]
              with the manifest's value_range (digits: 0..16), else the dtype's range;
              encoded images: Pillow, to L or RGB by model.in_channels, resized to image_size
    label  <- cls                   (int64)

Any other key named in `data.fields` decodes by its extension (`.npy` -> tensor, `cls` ->
int64, `txt`/`json` -> str). A field that cannot be decoded raises `DecodeError`, which the
loader turns into `data.on_error` (fail, or skip and count).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from temper.errors import TemperError

FIELDS_FOR_OBJECTIVE: dict[str, tuple[str, ...]] = {
    "causal_lm": ("tokens",),
    "mlm": ("tokens",),
    "mae": ("image",),
    "simclr": ("image",),
    "classify": ("label",),  # plus the model's input, see batch_fields
}
CANDIDATES: dict[str, tuple[str, ...]] = {
    "tokens": ("tokens.npy",),
    "image": ("image.npy", "data.npy", "png", "jpg", "jpeg"),
    "label": ("cls",),
}
IMAGE_EXTS = ("png", "jpg", "jpeg")


class DecodeError(Exception):
    """A sample's field could not be decoded (corrupt bytes, wrong shape, missing key)."""


@dataclass(frozen=True)
class Decoder:
    """Picklable: built once per rank, called in the loader's worker processes."""

    fields: dict[str, str]  # batch field -> sample key
    value_range: tuple[float, float] | None = None
    image_size: int | None = None
    in_channels: int | None = None
    seq_len: int | None = None  # model's; tokens are cropped to seq_len + 1
    extra: dict[str, Any] = field(default_factory=dict)

    def __call__(self, raw: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, key in self.fields.items():
            if key not in raw:
                present = sorted(k for k in raw if not k.startswith("__"))
                raise DecodeError(f"has no '{key}' (for batch field '{name}'); it has {', '.join(present) or 'nothing'}")
            try:
                out[name] = self._decode(name, key, raw[key])
            except DecodeError:
                raise
            except Exception as e:  # noqa: BLE001 - numpy/PIL raise many types on bad bytes
                raise DecodeError(f"field '{key}' cannot be decoded ({type(e).__name__}: {e})") from e
        return out

    def _decode(self, name: str, key: str, data: bytes) -> Any:
        ext = key.rsplit(".", 1)[-1].lower()
        if name == "tokens":
            tokens = torch.from_numpy(_npy(data).astype(np.int64))
            return tokens[: self.seq_len + 1] if self.seq_len else tokens
        if name == "image":
            return self._image(ext, data)
        if ext in ("cls", "cls2", "index"):
            return torch.tensor(int(data), dtype=torch.long)
        if ext == "npy":
            return torch.from_numpy(_npy(data))
        if ext in ("txt", "text", "json"):
            return data.decode("utf-8")
        return data

    def _image(self, ext: str, data: bytes) -> torch.Tensor:
        if ext in IMAGE_EXTS:
            from PIL import Image

            img = Image.open(io.BytesIO(data))
            img = img.convert("L" if self.in_channels == 1 else "RGB")
            if self.image_size and img.size != (self.image_size, self.image_size):
                img = img.resize((self.image_size, self.image_size), Image.BILINEAR)
            arr = np.asarray(img, dtype=np.float32) / 255.0
            return torch.from_numpy(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1).copy())
        arr = _npy(data)
        if arr.ndim == 2:
            arr = arr[None]
        elif arr.ndim == 3 and arr.shape[-1] in (1, 3, 4) and arr.shape[0] not in (1, 3, 4):
            arr = arr.transpose(2, 0, 1)
        if arr.ndim != 3:
            raise DecodeError(f"image array has shape {arr.shape}; expected [H, W], [C, H, W] or [H, W, C]")
        if np.issubdtype(arr.dtype, np.integer):
            lo, hi = self.value_range or (0.0, float(np.iinfo(arr.dtype).max))
            arr = (arr.astype(np.float32) - lo) / max(hi - lo, 1e-12)
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


def _npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def batch_fields(objective: str, model_input: str | None = None) -> tuple[str, ...]:
    """The batch fields `objective` reads; classify adds what the model reads (image/tokens)."""
    needed = FIELDS_FOR_OBJECTIVE.get(objective, ())
    if objective == "classify":
        return (model_input or "image", *needed)
    return needed


def resolve_fields(*, objective: str, manifest_keys: dict[str, str] | None,
                   overrides: dict[str, str], model_input: str | None = None) -> dict[str, str]:
    """Batch field -> sample key for `objective`: the overrides, else the first candidate the
    manifest has, else (no manifest) the first candidate; errors name data.fields."""
    needed = batch_fields(objective, model_input)
    fields = dict(overrides)
    for name in needed:
        if name in fields:
            continue
        options = CANDIDATES.get(name, (name,))
        if manifest_keys is None:
            fields[name] = options[0]
            continue
        found = [k for k in options if k in manifest_keys]
        if not found:
            raise TemperError(
                f"data: the shards have no key for batch field '{name}' (objective {objective}); "
                f"their keys are {', '.join(sorted(manifest_keys))}; set data.fields.{name} to one of them"
            )
        fields[name] = found[0]
    if manifest_keys is not None:
        for name, key in overrides.items():
            if key not in manifest_keys:
                raise TemperError(
                    f"data.fields.{name}: '{key}' is not a key of the shards; "
                    f"accepted: {', '.join(sorted(manifest_keys))}"
                )
    return fields


def array_shape(type_text: str) -> tuple[int, ...] | None:
    """'uint8[8,8]' -> (8, 8); None when shapes vary or it is not an array type."""
    if "[" not in type_text or "*" in type_text:
        return None
    inner = type_text[type_text.index("[") + 1 : type_text.rindex("]")]
    try:
        return tuple(int(x) for x in inner.split(",") if x.strip())
    except ValueError:
        return None
