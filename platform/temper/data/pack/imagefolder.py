"""`--format imagefolder`: SOURCE/<class>/<image>.png|jpg -> the image's bytes (`png` or `jpg`,
checked by signature, stored as they are) and `cls`, the class folder's index in name order."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from temper.data.pack.source import PackOptions, Source, existing_path, permutation, source_name
from temper.errors import TemperError

IMAGE_SUFFIXES = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg"}
IMAGE_MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "jpg": b"\xff\xd8\xff"}


def open_imagefolder(source: str, opts: PackOptions) -> Source:
    root = existing_path(source, "imagefolder")
    layout = "--format imagefolder expects SOURCE/<class>/<image>.png|jpg"
    if not root.is_dir():
        raise TemperError(f"SOURCE {source} is a file; {layout}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise TemperError(f"SOURCE {source} has no class subfolders; {layout}")
    items: list[tuple[Path, int]] = []
    for cid, name in enumerate(classes):
        files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise TemperError(
                f"SOURCE class folder {root / name} has no .png/.jpg/.jpeg images; add images or remove the folder"
            )
        items += [(p, cid) for p in files]
    order = permutation(len(items), opts.seed)
    samples = (_image_sample(*items[i]) for i in order)
    return Source(source_name(root.resolve().name), str(root), samples, {"classes": classes})


def _image_sample(path: Path, cid: int) -> dict[str, Any]:
    ext = IMAGE_SUFFIXES[path.suffix.lower()]
    data = path.read_bytes()
    if not data.startswith(IMAGE_MAGIC[ext]):
        raise TemperError(f"SOURCE image {path} is not a {ext.upper()} file (bad signature); fix or remove it")
    return {ext: data, "cls": cid}
