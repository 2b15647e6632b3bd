"""Checkpointer: save, select and load one run's checkpoints from every rank.

One directory per run, one per saved step:

    <run_dir>/step-000000100/
        .metadata, __0_0.distcp, __1_0.distcp ...   (dcp)   or   deepspeed/...   (deepspeed)
        rank-00000.pt, rank-00001.pt ...            each rank's extra state (RNG, ...)
        manifest.json                               rank 0, after every rank's files are done
        COMMITTED                                   last: the sha256 of manifest.json

Order of a save: every rank writes its files; all ranks agree they succeeded; rank 0 lists the
files with their sizes into the manifest, writes it, then the marker, then prunes old
checkpoints. A crash at any point leaves a committed checkpoint or a marker-less directory,
which is never loaded and is removed by the next commit.

Async saves (dcp only) stage the state to CPU while the caller waits, write in a background
thread whose collectives use a gloo group of their own, and are committed at the start of the
next save (or in `wait()` / `close()`): never two in flight.
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from temper.checkpoint.catalog import latest_in, prune
from temper.checkpoint.engines import (
    DEEPSPEED_TAG,
    FAILURES,
    build_stager,
    check_deepspeed_world,
    check_engine,
    dcp_async_save,
    dcp_load,
    dcp_save,
    describe,
)
from temper.checkpoint.manifest import CommittedCheckpoint, LoadedState, build_manifest, sha256
from temper.checkpoint.storage import (
    MANIFEST,
    MARKER,
    Store,
    fsync_dir,
    is_remote,
    open_store,
    rank_file_name,
    step_dir_name,
)
from temper.dist import DistContext
from temper.errors import TemperError
from temper.strategies.base import Strategy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Meta:
    """What rank 0 needs to write the manifest of one save."""

    step: int
    engine: str
    spec_hash: str
    run_id: str | None
    data: dict | None
    extra: dict | None
    mesh: dict | None


@dataclass
class _Pending:
    meta: _Meta
    path: str
    future: Any  # concurrent.futures.Future of the background write
    error: BaseException | None  # this rank's failure so far (its rank file)


class Checkpointer:
    """Every rank builds one with the same arguments and calls its methods together."""

    def __init__(self, *, run_dir: str, ctx: DistContext, keep_last: int = 3,
                 async_save: bool = False, storage_options: dict | None = None) -> None:
        if keep_last < 1:
            raise TemperError(f"checkpoint.keep_last={keep_last} keeps nothing; use 1 or more")
        self.run_dir = run_dir
        self.ctx = ctx
        self.keep_last = keep_last
        self.async_save = async_save
        self.store: Store = open_store(run_dir, storage_options=storage_options)
        self._group: Any = None  # gloo group of the background writes, created on first use
        self._stager: Any = None  # CPU staging buffers reused by every async save
        self._pending: _Pending | None = None

    # -- selection ---------------------------------------------------------------------------

    def latest(self) -> CommittedCheckpoint | None:
        """The newest committed and intact checkpoint: rank 0 decides, every rank gets it."""
        self.wait()
        found, error = None, None
        if self.ctx.rank == 0:
            try:
                found = latest_in(self.store)
            except Exception as e:  # noqa: BLE001 - every rank must learn of it, not hang
                error = f"{type(e).__name__}: {e}"
        if self._multi:
            box = [(found, error)]
            dist.broadcast_object_list(box, src=0, device=self._object_device)
            found, error = box[0]
        if error is not None:
            raise TemperError(
                f"cannot list checkpoints in checkpoint.dir={self.run_dir} ({error}); check the "
                "path and its credentials"
            )
        return found

    # -- saving ------------------------------------------------------------------------------

    def save(self, *, step: int, strategy: Strategy, spec_hash: str, run_id: str | None,
             data: dict | None, rank_state: dict, extra: dict | None = None,
             mesh: dict | None = None) -> float:
        """Save `step` (every rank calls this); returns the seconds the caller was blocked."""
        start = time.perf_counter()
        engine = strategy.checkpoint_engine
        if engine == "deepspeed" and is_remote(self.run_dir):
            raise _remote_deepspeed(self.run_dir)
        try:
            json.dumps({"data": data, "extra": extra, "mesh": mesh})
        except (TypeError, ValueError) as e:
            raise TypeError(f"checkpoint data/extra/mesh must be JSON-able: {e}") from None
        self._finish_pending()
        meta = _Meta(step=step, engine=engine, spec_hash=spec_hash, run_id=run_id, data=data,
                     extra=extra, mesh=mesh)
        path = self.store.path(step_dir_name(step))
        self._prepare(path)
        if engine == "dcp" and self.async_save:
            error = self._write_rank_state(path, rank_state)
            if self._stager is None:
                self._stager = build_stager(self.ctx.device.type)
            future = dcp_async_save(strategy, store=self.store, path=path,
                                    group=self._checkpoint_group(), stager=self._stager)
            self._pending = _Pending(meta=meta, path=path, future=future, error=error)
            return time.perf_counter() - start
        if engine == "deepspeed":
            strategy.save_engine_checkpoint(path, tag=DEEPSPEED_TAG)
        else:
            dcp_save(strategy, store=self.store, path=path)
        error = self._write_rank_state(path, rank_state)
        self._commit_when_done(meta, path=path, error=error, group=None)
        return time.perf_counter() - start

    def wait(self) -> None:
        """Finish and commit a save still writing in the background (every rank calls it)."""
        self._finish_pending()

    def close(self) -> None:
        """wait(), then drop the checkpoint process group."""
        try:
            self.wait()
        finally:
            if self._stager is not None:
                self._stager.close()
            if self._group is not None and self.ctx.distributed:
                dist.destroy_process_group(self._group)
            self._stager = self._group = None

    # -- loading -----------------------------------------------------------------------------

    def load(self, ckpt: CommittedCheckpoint, *, strategy: Strategy) -> LoadedState:
        """Load `ckpt` into `strategy` (every rank calls this) and return the saved extra state."""
        self.wait()
        manifest = ckpt.manifest
        check_engine(saved=manifest.engine, strategy=strategy, path=ckpt.path)
        store = open_store(ckpt.path, storage_options=self.store.storage_options)
        if manifest.engine == "deepspeed":
            if is_remote(ckpt.path):
                raise _remote_deepspeed(ckpt.path)
            check_deepspeed_world(saved=manifest.world_size, world_size=self.ctx.world_size,
                                  path=ckpt.path)
            strategy.load_engine_checkpoint(store.root, tag=DEEPSPEED_TAG)
        else:
            dcp_load(strategy, store=store, path=store.root)
        rank0 = _read_rank_state(store, 0)
        rank = self.ctx.rank
        mine = rank0 if rank == 0 else (
            _read_rank_state(store, rank) if rank < manifest.world_size else None)
        log.info("loaded checkpoint %s (step %d)", ckpt.path, manifest.step)
        return LoadedState(step=manifest.step, manifest=manifest, rank_state=mine, rank0_state=rank0)

    # -- internals ---------------------------------------------------------------------------

    @property
    def _multi(self) -> bool:
        return self.ctx.distributed and self.ctx.world_size > 1

    @property
    def _object_device(self) -> torch.device | None:
        return self.ctx.device if self.ctx.device.type == "cuda" else None

    def _checkpoint_group(self) -> Any:
        if not self.ctx.distributed:
            return None
        if self._group is None:  # collective: every rank reaches its first async save together
            self._group = dist.new_group(backend="gloo")
        return self._group

    def _all_ok(self, ok: bool, *, group: Any) -> bool:
        """Whether `ok` holds on every rank (doubles as the barrier before the commit)."""
        if not self._multi:
            return ok
        device = torch.device("cpu") if group is not None else self.ctx.device
        flag = torch.tensor([int(ok)], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
        return bool(flag.item())

    def _prepare(self, path: str) -> None:
        """Rank 0 clears a directory left by an earlier save of the same step (uncommitting it
        first), so no stale file can enter the new manifest; then every rank may write."""
        error = None
        if self.ctx.rank == 0:
            try:
                self.store.refresh(path)
                if self.store.exists(path):
                    log.warning("overwriting the earlier save of %s", self.store.url(path))
                    self.store.remove_tree(path)
                self.store.makedirs(path)
            except Exception as e:  # noqa: BLE001 - the other ranks must not wait forever
                error = e
        if not self._all_ok(error is None, group=None):
            raise TemperError(
                f"cannot create {self.store.url(path)} ({error or 'failed on rank 0'}); check that "
                "checkpoint.dir is writable"
            ) from error

    def _write_rank_state(self, path: str, rank_state: dict) -> BaseException | None:
        try:
            buf = io.BytesIO()
            torch.save(rank_state, buf)
            self.store.write_bytes(f"{path}/{rank_file_name(self.ctx.rank)}", buf.getvalue())
        except Exception as e:  # noqa: BLE001 - reported once every rank has agreed
            return e
        return None

    def _finish_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        error = pending.error
        try:
            pending.future.result()
        except FAILURES as e:
            error = error or e
        self._commit_when_done(pending.meta, path=pending.path, error=error, group=self._group)

    def _commit_when_done(self, meta: _Meta, *, path: str, error: BaseException | None,
                          group: Any) -> None:
        if not self._all_ok(error is None, group=group):
            why = f"this rank failed: {describe(error)}" if error else "another rank failed to write its files"
            raise TemperError(
                f"checkpoint {self.store.url(path)} was not committed ({why}); check that "
                "checkpoint.dir is writable from every worker and has space"
            ) from error
        if self.ctx.rank == 0:
            self._commit(meta, path)

    def _commit(self, meta: _Meta, path: str) -> None:
        """Rank 0: manifest (every file with its size), then the marker, then pruning."""
        skip = {MANIFEST, MARKER, f"{MANIFEST}.tmp", f"{MARKER}.tmp"}
        files = {k: v for k, v in self.store.sizes(path).items() if k not in skip}
        expected = {rank_file_name(r) for r in range(self.ctx.world_size)}
        if meta.engine == "dcp":
            expected.add(".metadata")
        missing = sorted(expected - files.keys())
        if missing:
            raise TemperError(
                f"checkpoint {self.store.url(path)} lacks {', '.join(missing)} after every rank "
                "wrote; checkpoint.dir must be one directory shared by all workers"
            )
        if meta.engine == "deepspeed":
            self.store.fsync_tree(path)  # DeepSpeed's torch.save does not fsync
        manifest = build_manifest(
            step=meta.step, engine=meta.engine, world_size=self.ctx.world_size, mesh=meta.mesh,
            spec_hash=meta.spec_hash, run_id=meta.run_id, data=meta.data, files=files,
            extra=meta.extra,
        )
        raw = manifest.to_json().encode()
        self.store.write_bytes(f"{path}/{MANIFEST}", raw)
        self.store.write_bytes(f"{path}/{MARKER}", sha256(raw).encode())
        if self.store.local:
            fsync_dir(self.store.root)
        log.info("committed checkpoint %s (%d files)", self.store.url(path), len(files))
        prune(self.store, committed_step=meta.step, keep_last=self.keep_last)


def _read_rank_state(store: Store, rank: int) -> dict:
    raw = store.read_bytes(store.path(rank_file_name(rank)))
    return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=False)


def _remote_deepspeed(url: str) -> TemperError:
    return TemperError(
        f"checkpoint.dir={url} is remote, but DeepSpeed writes checkpoints only to local or "
        "shared filesystems; set checkpoint.dir to a path every worker shares (e.g. an NFS or "
        "Lustre mount), or use strategy.kind=fsdp, whose checkpoints can go to s3://"
    )
