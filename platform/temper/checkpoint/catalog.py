"""Which checkpoints of a run are committed and intact, and which may go.

A step directory is committed when its COMMITTED marker holds the sha256 of its manifest.json,
and intact when, in addition, every file the manifest lists exists with exactly its size.
A directory without a marker is partial (a save that never finished): never loaded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from temper.checkpoint.manifest import CheckpointManifest, CommittedCheckpoint, sha256
from temper.checkpoint.storage import MANIFEST, MARKER, Store, open_store
from temper.errors import TemperError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Inspection:
    state: str  # "ok" | "partial" | "damaged"
    problem: str | None = None
    manifest: CheckpointManifest | None = None


def inspect_step_dir(store: Store, path: str, *, step: int | None = None) -> Inspection:
    """Check one step directory: its marker, its manifest, and every listed file's size."""
    sizes = store.sizes(path)
    if MARKER not in sizes:
        return Inspection("partial", "no COMMITTED marker (the save did not finish)")
    if MANIFEST not in sizes:
        return Inspection("damaged", "manifest.json is missing")
    raw = store.read_bytes(f"{path}/{MANIFEST}")
    marker = store.read_bytes(f"{path}/{MARKER}").decode("ascii", "replace").strip()
    if marker != sha256(raw):
        return Inspection("damaged", "COMMITTED does not match the sha256 of manifest.json")
    try:
        manifest = CheckpointManifest.from_json(raw, where=f"{store.url(path)}/{MANIFEST}")
    except TemperError as e:
        return Inspection("damaged", str(e))
    if step is not None and manifest.step != step:
        return Inspection("damaged", f"manifest.json says step {manifest.step}")
    for name, size in manifest.files.items():
        found = sizes.get(name)
        if found is None:
            return Inspection("damaged", f"{name} is missing", manifest)
        if found != size:
            what = "empty (0 bytes)" if found == 0 else f"{found} bytes"
            return Inspection("damaged", f"{name} is {what}, the manifest says {size}", manifest)
    return Inspection("ok", None, manifest)


def latest_in(store: Store) -> CommittedCheckpoint | None:
    """The newest intact committed checkpoint; damaged ones are reported and skipped."""
    for step, path in store.step_dirs():
        found = inspect_step_dir(store, path, step=step)
        if found.state == "ok":
            return CommittedCheckpoint(path=store.url(path), manifest=found.manifest)
        if found.state == "partial":
            log.debug("ignoring %s: %s", store.url(path), found.problem)
        else:
            log.warning("checkpoint %s is damaged (%s); falling back to the previous one",
                        store.url(path), found.problem)
    return None


def find_latest(run_dir: str, *, storage_options: dict | None = None) -> CommittedCheckpoint | None:
    """The newest committed and intact checkpoint in `run_dir` (None if there is none)."""
    return latest_in(open_store(run_dir, storage_options=storage_options))


def read_checkpoint(path: str, *, storage_options: dict | None = None) -> CommittedCheckpoint:
    """A step directory -> its checked CommittedCheckpoint; TemperError if not committed/intact."""
    store = open_store(path, storage_options=storage_options)
    found = inspect_step_dir(store, store.root)
    if found.state != "ok":
        raise TemperError(
            f"{path} is not a usable checkpoint: {found.problem}; pick another step directory "
            "or pass the run directory to use its newest committed checkpoint"
        )
    return CommittedCheckpoint(path=store.url(store.root), manifest=found.manifest)


def is_step_dir(store: Store) -> bool:
    """Whether `store.root` looks like one checkpoint (has a manifest or a marker)."""
    store.refresh()
    return store.exists(store.path(MARKER)) or store.exists(store.path(MANIFEST))


def prune(store: Store, *, committed_step: int, keep_last: int) -> None:
    """After committing `committed_step`: drop older committed checkpoints beyond `keep_last`
    (counting the new one) and older partial directories. Newer directories are left alone."""
    older = [path for step, path in store.step_dirs() if step < committed_step]
    kept = 1
    for path in older:  # newest first
        committed = store.exists(f"{path}/{MARKER}")
        if committed and kept < keep_last:
            kept += 1
            continue
        try:
            store.remove_tree(path)
            log.info("removed %s checkpoint %s", "old" if committed else "partial", store.url(path))
        except OSError as e:  # a failed cleanup must not fail the run
            log.warning("could not remove %s (%s); delete it by hand", store.url(path), e)
