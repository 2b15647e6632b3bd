"""A safetensors file written one tensor at a time (the format's header first, then each
tensor's bytes), so exporting a model never holds more than one of its tensors.

The layout is safetensors' own: an 8-byte little-endian header length, a JSON header
(name -> dtype, shape, data_offsets; "__metadata__"), padded with spaces to 8 bytes, then
the tensors' bytes in header order. `safetensors.safe_open` reads it like any other file.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}


def write_streaming(entries: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
                    produce: Callable[[str], torch.Tensor], path: Path,
                    *, metadata: dict[str, str] | None = None) -> None:
    """Write `entries` (name, shape, dtype) to `path`, asking `produce(name)` for each tensor
    only when its bytes are due; atomic (a temp file, fsync, rename)."""
    header: dict[str, object] = {}
    offset = 0
    for name, shape, dtype in entries:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = dict(metadata or {"format": "pt"})
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype in entries:
            tensor = produce(name).detach().to(dtype=dtype, device="cpu").contiguous()
            if tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"{name}: produced shape {tuple(tensor.shape)}, the header says {tuple(shape)}")
            f.write(tensor.reshape(-1).view(torch.uint8).numpy())  # little-endian, as on every host we run
            del tensor
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
