"""The one line that names a failure (errors.root_cause) and the resume compatibility rule
(checkpoint/compat.py), without processes; the CLI's view is tests/integration/test_failures.py."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from temper.checkpoint.compat import check_resume
from temper.errors import TemperError, root_cause


class _Broken(Dataset):
    def __init__(self, error: Exception) -> None:
        self.error = error

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int):
        raise self.error


def _loader_error(error: Exception) -> Exception:
    """The exception a DataLoader with a worker process raises for `error` in the worker."""
    with pytest.raises(Exception) as caught:
        next(iter(DataLoader(_Broken(error), num_workers=1)))
    assert "in DataLoader worker process 0" in str(caught.value)
    return caught.value


def test_dataloader_wrapper_is_unwrapped_to_the_original_message() -> None:
    ours = _loader_error(TemperError("data: shard s.tar ends after 3 samples, its manifest says 6; set data.on_error=skip"))
    assert root_cause(ours) == ("data: shard s.tar ends after 3 samples, its manifest says 6; set data.on_error=skip",
                                None)  # our own error: no traceback needed
    line, tb = root_cause(_loader_error(ValueError("bad pixel")))
    assert line == "ValueError: bad pixel"
    assert "Original Traceback" in tb and "__getitem__" in tb


def test_plain_exceptions_keep_their_type_and_traceback() -> None:
    try:
        torch.zeros(2) @ torch.zeros(3)
    except RuntimeError as e:
        line, tb = root_cause(e)
    assert line.startswith("RuntimeError: ") and "size" in line
    assert "test_plain_exceptions_keep_their_type_and_traceback" in tb
    assert root_cause(TemperError("first line\nsecond")) == ("first line", None)


SAVED = {"model": {"kind": "gpt", "d_model": 32, "dropout": 0.0}, "objective": {"kind": "mae", "mask_ratio": 0.75},
         "optim": {"lr": 0.01}, "strategy": {"kind": "ddp"}, "resources": {"workers": 2}}


def _with(**changes) -> dict:
    spec = {k: dict(v) for k, v in SAVED.items()}
    for key, value in changes.items():
        section, name = key.split("__")
        spec[section][name] = value
    return spec


def test_changes_that_load_are_listed_and_those_that_cannot_are_refused() -> None:
    ok = check_resume(saved=SAVED, now=_with(optim__lr=0.005, resources__workers=1, model__dropout=0.1,
                                             objective__mask_ratio=0.5, strategy__kind="fsdp"), where="run r")
    assert ok == ("model.dropout: 0.0 -> 0.1", "objective.mask_ratio: 0.75 -> 0.5", "optim.lr: 0.01 -> 0.005",
                  "resources.workers: 2 -> 1", "strategy.kind: ddp -> fsdp")
    assert check_resume(saved=SAVED, now=SAVED, where="run r") == ()
    for change, old in ((dict(model__d_model=64), "model.d_model=32"), (dict(objective__kind="simclr"), "objective.kind=mae"),
                        (dict(strategy__kind="deepspeed"), "strategy.kind=ddp")):
        with pytest.raises(TemperError, match=rf"cannot resume run r: .* -> .*--no-resume.*--set {old}"):
            check_resume(saved=SAVED, now=_with(**change), where="run r")
    # a checkpoint that kept only its model: only the model is compared
    assert check_resume(saved={"model": SAVED["model"]}, now=_with(optim__lr=1.0), where="run r") == ()


def test_a_rank_log_shipped_from_another_node_lands_once(tmp_path) -> None:
    """A rank on another node sends this attempt's log lines to the driver's run folder: they
    are appended after what the folder holds; on shared storage (already there) nothing is."""
    from temper.launch.ray_launcher import append_shipped_log

    path = tmp_path / "logs" / "rank-1.txt"
    first = b"=== rank 1, pid 10, attempt 0 ===\nline\n"
    append_shipped_log(str(path), start=0, data=first)  # the driver's node had no file
    assert path.read_bytes() == first
    second = b"=== rank 1, pid 11, attempt 1 ===\nother\n"
    append_shipped_log(str(path), start=len(first), data=second)
    assert path.read_bytes() == first + second
    append_shipped_log(str(path), start=len(first), data=second)  # shared storage: already there
    assert path.read_bytes() == first + second
    path.write_bytes(b"=== rank 1, pid 12, attempt 0 ===\n")  # the rank ran here before
    append_shipped_log(str(path), start=0, data=first)
    assert path.read_bytes() == b"=== rank 1, pid 12, attempt 0 ===\n" + first


def test_the_oom_fault_is_a_real_allocation_failure() -> None:
    """TEMPER_FAULT=oom:S:R asks the allocator for 1 PiB (on CUDA: torch.cuda.OutOfMemoryError;
    here the CPU allocator's own error), only at its step and rank."""
    from temper.runtime.faults import parse_fault

    fault = parse_fault("oom:3:0")
    fault.before_step(step=2, rank=0)
    fault.before_step(step=3, rank=1)
    with pytest.raises(RuntimeError, match="(?i)alloc|memory"):
        fault.before_step(step=3, rank=0)


def test_hold_waits_before_the_step_until_the_file_allows_it(tmp_path) -> None:
    import threading
    import time

    from temper.runtime.faults import Hold

    path = tmp_path / "hold"
    path.write_text("4")
    hold = Hold(path)
    hold.before_step(step=4, rank=0, world_size=2)  # 4 <= 4: no wait, no marker
    assert not list(tmp_path.glob("hold.waiting-*"))
    done = threading.Event()
    worker = threading.Thread(target=lambda: (hold.before_step(step=5, rank=1, world_size=2), done.set()))
    worker.start()
    deadline = time.monotonic() + 10
    while not (tmp_path / "hold.waiting-step5-ws2-rank1").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (tmp_path / "hold.waiting-step5-ws2-rank1").exists() and not done.is_set()
    path.write_text("5")
    worker.join(timeout=10)
    assert done.is_set()


def test_sample_trace_writes_one_line_per_key(tmp_path) -> None:
    from temper.runtime.faults import SampleTrace

    trace = SampleTrace(tmp_path / "t")
    trace.record({"__key__": ["a/1", "a/2"]}, step=7, rank=1, world_size=2)
    trace.record({"__key__": ["a/3"]}, step=8, rank=1, world_size=2)
    trace.record({"tokens": torch.zeros(2)}, step=9, rank=1, world_size=2)  # no keys: nothing
    assert (tmp_path / "t" / "ws2-from000007-rank1.tsv").read_text() == "7\ta/1\n7\ta/2\n8\ta/3\n"
