"""Checkpoint files through fsspec: the same code for local paths and s3:// (or any fsspec URL).

A `Store` is an fsspec filesystem plus the run directory in that filesystem's own path form
(`bucket/prefix` for S3, an absolute path locally). Local writes go through a temporary file,
fsync and rename, so a crash leaves either the old file, no file, or the whole new one; remote
object stores write each object whole.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from temper.errors import TemperError

MANIFEST = "manifest.json"
MARKER = "COMMITTED"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step-{step:09d}"


def rank_file_name(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def is_remote(url: str) -> bool:
    """True for an fsspec URL other than a local path (s3://, gs://, memory://, ...)."""
    return "://" in url and not url.startswith("file://")


@dataclass(frozen=True)
class Store:
    fs: Any  # fsspec AbstractFileSystem
    root: str  # the directory, in the filesystem's path form
    storage_options: dict

    @property
    def local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def url(self, path: str) -> str:
        """What users see and pass around: a local path, or the full URL of a remote one."""
        return path if self.local else self.fs.unstrip_protocol(path)

    def child(self, name: str) -> Store:
        return Store(fs=self.fs, root=self.path(name), storage_options=self.storage_options)

    def refresh(self, path: str | None = None) -> None:
        """Forget cached listings (s3fs caches them per prefix; other ranks wrote since).
        Remote: all of them, so no child listing of `path` survives either."""
        if self.local:
            self.fs.invalidate_cache(path or self.root)
        else:
            self.fs.invalidate_cache()

    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def read_bytes(self, path: str) -> bytes:
        return self.fs.cat_file(path)

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write `path` whole: locally tmp + fsync + rename + fsync of the directory."""
        if not self.local:
            self.fs.pipe_file(path, data)
            return
        tmp = f"{path}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(path))

    def makedirs(self, path: str) -> None:
        self.fs.makedirs(path, exist_ok=True)

    def sizes(self, path: str) -> dict[str, int]:
        """Every file under `path` (recursively) -> its size in bytes, keyed relative to `path`."""
        self.refresh(path)
        try:
            found = self.fs.find(path, detail=True)
        except FileNotFoundError:
            return {}
        prefix = path.rstrip("/") + "/"
        return {name[len(prefix):]: int(info["size"]) for name, info in found.items()
                if name.startswith(prefix) and info.get("type") != "directory"}

    def step_dirs(self) -> list[tuple[int, str]]:
        """(step, path) of every `step-N` directory in the run directory, newest first."""
        self.refresh()
        try:
            entries = self.fs.ls(self.root, detail=True)
        except FileNotFoundError:
            return []
        out = []
        for entry in entries:
            match = _STEP_DIR.match(entry["name"].rstrip("/").rpartition("/")[2])
            if match and entry.get("type") == "directory":
                out.append((int(match.group(1)), entry["name"].rstrip("/")))
        return sorted(out, reverse=True)

    def remove_tree(self, path: str) -> None:
        """Uncommit first (the marker goes before any data file), then delete everything."""
        marker = f"{path}/{MARKER}"
        if self.fs.exists(marker):
            self.fs.rm_file(marker)
            if self.local:
                fsync_dir(path)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)
        self.refresh(path)

    def fsync_tree(self, path: str) -> None:
        """Flush every local file under `path` to disk (for engines that do not fsync)."""
        if not self.local:
            return
        for dirpath, _, files in os.walk(path):
            for name in files:
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            fsync_dir(dirpath)


def open_store(url: str, *, storage_options: dict | None = None) -> Store:
    """The store of a directory URL; an unknown protocol or a missing driver is a TemperError."""
    options = dict(storage_options or {})
    try:
        fs, root = url_to_fs(url, **options)
    except (ImportError, ValueError) as e:
        raise TemperError(
            f"checkpoint.dir={url!r} cannot be opened ({e}); use a local path or an s3:// URL "
            "(pip install 'temper[s3]')"
        ) from None
    return Store(fs=fs, root=root.rstrip("/") or root, storage_options=options)


def fsync_dir(path: str) -> None:
    """Persist a directory's entries (renames, new files) on POSIX filesystems."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories
    finally:
        os.close(fd)


def storage_options(spec) -> dict | None:
    """fsspec options for the job's checkpoint.dir (an S3-compatible endpoint, if set)."""
    endpoint = spec.checkpoint.s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
    return {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else None
