"""The two ways a strategy's model and optimizer reach the files of a step directory.

dcp: torch.distributed.checkpoint. Every rank writes its own shards (`__{rank}_0.distcp`), the
coordinator the `.metadata` with global shapes; loading reshards to any world size or strategy.
Local directories go through `FileSystemWriter` (fsync per file), remote ones through
`FsspecWriter` / `FsspecReader` with the run's storage options.

deepspeed: the engine's own `save_checkpoint` / `load_checkpoint` into a tag folder (local or
shared filesystems only; ZeRO partitions do not reshard).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from temper.checkpoint.storage import Store
from temper.errors import TemperError
from temper.strategies.base import Strategy

DEEPSPEED_TAG = "deepspeed"  # the engine's folder inside the step directory


def _fsspec_io() -> tuple[type, type]:
    """FsspecWriter/FsspecReader: private module in torch 2.13, exported in some releases."""
    try:
        from torch.distributed.checkpoint import FsspecReader, FsspecWriter
    except ImportError:
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
    return FsspecWriter, FsspecReader


def dcp_writer(store: Store, path: str) -> Any:
    if store.local:
        return dcp.FileSystemWriter(path, single_file_per_rank=True, sync_files=True)
    writer, _ = _fsspec_io()
    # One object per rank; an object store has no fsync (each object is whole once written).
    return writer(store.url(path), sync_files=False, **store.storage_options)


def dcp_reader(store: Store, path: str) -> Any:
    if store.local:
        return dcp.FileSystemReader(path)
    _, reader = _fsspec_io()
    return reader(store.url(path), **store.storage_options)


def _no_dist() -> bool:
    return not (dist.is_available() and dist.is_initialized())


@contextlib.contextmanager
def quiet_single_process() -> Iterator[None]:
    """DCP warns on every single-process save/load, even when told no_dist=True on purpose."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is .*assuming the intent")
        yield


#: What a failed DCP save/load raises: CheckpointException derives from BaseException.
FAILURES = (Exception, CheckpointException)


def describe(error: BaseException) -> str:
    """One line for a failure; a CheckpointException shows its first rank's root cause."""
    if isinstance(error, CheckpointException) and error.failures:
        rank, (cause, _) = next(iter(error.failures.items()))
        return f"rank {rank}: {type(cause).__name__}: {cause}"
    return f"{type(error).__name__}: {error}".splitlines()[0]


def dcp_save(strategy: Strategy, *, store: Store, path: str) -> None:
    try:
        with quiet_single_process():
            dcp.save(strategy.checkpoint_state(), storage_writer=dcp_writer(store, path),
                     no_dist=_no_dist())
    except CheckpointException as e:  # raised on every rank alike
        raise TemperError(
            f"cannot write checkpoint {store.url(path)} ({describe(e)}); check that "
            "checkpoint.dir is writable from every worker and has space"
        ) from e


def build_stager(device_type: str) -> Any:
    """A CPU staging area kept across saves (DCP caches one buffer per source storage, so the
    next save copies without allocating; safe because saves are never in flight together).
    On CUDA: pinned buffers and non-blocking copies. Staging itself stays synchronous: the
    caller may change the parameters as soon as `async_save` returns."""
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

    cuda = device_type == "cuda"
    return DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                        use_async_staging=False, use_non_blocking_copy=cuda))


def dcp_async_save(strategy: Strategy, *, store: Store, path: str, group: Any, stager: Any) -> Future:
    """Stage this rank's state to CPU (the blocking part), then write it in a thread; the
    thread's collectives run on `group` (a gloo group of their own, never the training one)."""
    no_dist = _no_dist()
    if no_dist:  # the background thread's warning would escape a scoped filter
        warnings.filterwarnings("ignore", message=r"torch\.distributed is .*assuming the intent")
    response = dcp.async_save(
        strategy.checkpoint_state(), storage_writer=dcp_writer(store, path),
        process_group=group, async_stager=stager, no_dist=no_dist,
    )
    return getattr(response, "upload_completion", response)  # Future or AsyncSaveResponse


def dcp_load(strategy: Strategy, *, store: Store, path: str) -> None:
    """Load into this strategy's own layout (DCP reshards), then hand it to the strategy."""
    state = strategy.checkpoint_state()
    try:
        with quiet_single_process():
            dcp.load(state, storage_reader=dcp_reader(store, path), no_dist=_no_dist())
    except CheckpointException as e:  # raised on every rank alike
        raise TemperError(
            f"cannot load checkpoint {store.url(path)} ({describe(e)}); if the model or optimizer "
            "changed since it was saved, resume with the spec it was saved with or use a new "
            "checkpoint.dir"
        ) from e
    strategy.load_checkpoint_state(state)


def check_engine(*, saved: str, strategy: Strategy, path: str) -> None:
    wanted = strategy.checkpoint_engine
    if saved == wanted:
        return
    kind = getattr(getattr(strategy, "spec", None), "kind", type(strategy).__name__)
    other = "strategy.kind=deepspeed" if saved == "deepspeed" else "strategy.kind=ddp or fsdp"
    raise TemperError(
        f"checkpoint {path} was written by the {saved} engine but strategy.kind={kind} uses "
        f"{wanted}; resume it with {other}, or export its weights (export_checkpoint) and start "
        "a new run from them"
    )


def check_deepspeed_world(*, saved: int, world_size: int, path: str) -> None:
    if saved != world_size:
        raise TemperError(
            f"checkpoint {path} holds DeepSpeed ZeRO partitions of {saved} ranks but this run has "
            f"{world_size}; ZeRO checkpoints do not reshard: resume with resources.workers={saved}, "
            "or export its weights (export_checkpoint) and start a new run from them"
        )
