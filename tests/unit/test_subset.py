"""`data.subset`: a seeded fraction of the training samples, the same in every run and world
size, counted by the plan (equal batches, epoch length), resumable mid-epoch, refused on a
resume with another subset, too small named with the fraction that works; eval untouched.

Ranks are built side by side in this process (tests.fixtures.shards), as in tests/unit/test_webdataset.py.
"""

from __future__ import annotations

import re
import shutil
from collections import Counter
from pathlib import Path

import pytest

from temper.data import Note
from temper.data.subset import kept_count
from temper.data.webdataset import preflight
from temper.errors import TemperError
from temper.spec.job import JobSpec
from tests.fixtures.shard_servers import write_shards
from tests.fixtures.shards import corrupt_sample, ranks, take

SIZES = [120, 7, 0, 95, 60, 18]  # uneven, one empty: 300 samples
FIRST = [sum(SIZES[:i]) for i in range(len(SIZES))]
TOTAL = sum(SIZES)


def job(train: str, *, fraction: float | None = 0.2, seed: int = 1, workers: int = 2, batch: int = 4,
        **data) -> JobSpec:
    subset = {"fraction": fraction, "seed": seed} if fraction is not None else None
    return JobSpec.model_validate({
        "name": "subset", "seed": 3,
        "model": {"kind": "gpt", "flavor": "tiny", "seq_len": 8},
        "data": {"kind": "webdataset", "train": train, "num_workers": 0, "shuffle_buffer": 8,
                 "subset": subset, **data},
        "train": {"micro_batch_size": batch, "eval_batches": 100},
        "resources": {"workers": workers},
        "tracking": {"enabled": False},
    })


def epoch_keys(spec: JobSpec) -> list[list[str]]:
    """Each rank's keys of one whole epoch, in read order."""
    data = ranks(spec)
    return [take(d, d.batches_per_epoch)[0] for d in data]


def per_shard(keys) -> list[int]:
    """How many of `keys` fall in each shard."""
    counts = [0] * len(SIZES)
    for k in keys:
        i = int(k.rsplit("/", 1)[1])
        counts[max(s for s in range(len(SIZES)) if FIRST[s] <= i and SIZES[s])] += 1
    return counts


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("subset") / "toy"
    write_shards(folder, SIZES)
    return folder


def test_kept_count_rounds_and_keeps_one_per_shard():
    assert [kept_count(n, 0.2) for n in SIZES] == [24, 1, 0, 19, 12, 4]
    assert kept_count(5, 0.01) == 1 and kept_count(0, 1.0) == 0 and kept_count(7, 1.0) == 7


def test_same_seed_same_samples_in_every_run_and_world_size(shards):
    one = epoch_keys(job(str(shards), workers=1, remainder="pad"))
    again = epoch_keys(job(str(shards), workers=1, remainder="pad"))
    two = epoch_keys(job(str(shards), workers=2, remainder="pad", num_workers=2))  # loader processes too
    assert one == again  # run after run: the same samples in the same order
    kept = set(one[0])
    assert per_shard(kept) == [24, 1, 0, 19, 12, 4]  # round(0.2 * n), at least 1 per non-empty shard
    assert {k for keys in two for k in keys} == kept  # the same subset whatever the world size
    first_shard = sorted(int(k.rsplit("/", 1)[1]) for k in kept if int(k.rsplit("/", 1)[1]) < 120)
    assert first_shard != list(range(24)) and first_shard[-1] > 60  # spread over the shard, not a prefix


def test_another_seed_another_subset_and_fraction_one_is_everything(shards):
    a = {k for keys in epoch_keys(job(str(shards), seed=1, remainder="pad")) for k in keys}
    b = {k for keys in epoch_keys(job(str(shards), seed=2, remainder="pad")) for k in keys}
    assert len(a) == len(b) == 60 and a != b
    full = epoch_keys(job(str(shards), fraction=1.0))
    assert full == epoch_keys(job(str(shards), fraction=None))  # 1.0 reads exactly what no subset reads
    assert len({k for keys in full for k in keys}) > TOTAL - 2 * 4  # everything but the drop remainder


@pytest.mark.parametrize(("workers", "remainder", "per"), [(2, "drop", 7), (3, "drop", 5), (2, "pad", 8)])
def test_epoch_counts_kept_samples_only(shards, workers, remainder, per):
    spec = job(str(shards), workers=workers, remainder=remainder)
    data = ranks(spec)
    assert all(d.batches_per_epoch == per for d in data)  # 60 kept: (60 // ranks) // 4, or rounded up under pad
    keys = [take(d, per)[0] for d in data]
    counts = Counter(k for ks in keys for k in ks)
    if remainder == "drop":
        assert max(counts.values()) == 1 and 60 - len(counts) < workers * 4
    else:
        assert len(counts) == 60 and sum(counts.values()) == workers * per * 4
    assert all(d.state_dict()["epoch"] == 1 for d in data)  # one epoch = the kept samples


@pytest.mark.parametrize(("old", "new"), [(2, 2), (2, 1)])
def test_resume_mid_epoch_with_a_subset(shards, old, new):
    spec_old, spec_new = job(str(shards), workers=old), job(str(shards), workers=new)
    k = 3  # of 7 batches per rank: mid-epoch, not on a shuffle-window boundary (8 samples)
    first = ranks(spec_old)
    consumed = [take(d, k)[0] for d in first]
    state = first[0].state_dict()
    assert state["subset"] == {"fraction": 0.2, "seed": 1}
    resumed = ranks(spec_new)
    for d in resumed:
        d.load_state_dict(state)
    if old == new:  # exactly the uninterrupted run, into the next epoch
        whole = [take(d, 7 + 4)[0] for d in ranks(spec_old)]
        rest = [take(d, 7 + 4 - k)[0] for d in resumed]
        assert [c + r for c, r in zip(consumed, rest, strict=True)] == whole
    else:  # the unread rest of the subset's epoch, re-split: nothing twice, nothing outside it
        kept = {x for keys in epoch_keys(job(str(shards), workers=1, remainder="pad")) for x in keys}
        rest = [take(d, d._build_plan().batches_per_rank)[0] for d in resumed]
        seen = [x for keys in consumed + rest for x in keys]
        assert len(seen) == len(set(seen)) and set(seen) <= kept
        assert 60 - len(seen) < old * 4 + new * 4
        assert resumed[0].state_dict()["epoch"] == 1


def test_resume_with_another_subset_is_refused(shards):
    state = ranks(job(str(shards), workers=1))[0].state_dict()
    for other in (job(str(shards), workers=1, seed=2), job(str(shards), workers=1, fraction=None)):
        with pytest.raises(TemperError, match=r"data state was written with data.subset fraction=0.2 seed=1, "
                           r"this run has .*; resume with the same data.subset"):
            ranks(other)[0].load_state_dict(state)
    plain = ranks(job(str(shards), workers=1, fraction=None))[0].state_dict()
    with pytest.raises(TemperError, match=r"written with data.subset null \(all samples\), this run has fraction=0.2"):
        ranks(job(str(shards), workers=1))[0].load_state_dict(plain)


def test_skipped_samples_are_not_decoded(shards, tmp_path):
    kept = {x for keys in epoch_keys(job(str(shards), workers=1, remainder="pad")) for x in keys}
    unkept = next(f"toy/{i:09d}" for i in range(120) if f"toy/{i:09d}" not in kept)
    kept_one = min(k for k in kept if int(k.rsplit("/", 1)[1]) < 120)
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    corrupt_sample(bad, "toy-000000.tar", unkept)
    assert len(epoch_keys(job(str(bad), workers=1, remainder="pad"))[0]) == 60  # on_error=fail: never decoded
    corrupt_sample(bad, "toy-000000.tar", kept_one)
    with pytest.raises(TemperError, match=rf"sample {kept_one}: field 'tokens.npy' cannot be decoded"):
        epoch_keys(job(str(bad), workers=1, remainder="pad"))


def test_eval_split_is_read_whole(shards):
    keys = {k for d in ranks(job(str(shards), eval=str(shards))) for b in d.eval_batches() for k in b["__key__"]}
    plain = {k for d in ranks(job(str(shards), fraction=None, eval=str(shards)))
             for b in d.eval_batches() for k in b["__key__"]}
    assert keys == plain and len(keys) == TOTAL  # eval_batches 100 x 4 x 2 ranks covers all 300


def test_preflight_says_how_many_samples_the_subset_keeps(shards):
    notes = preflight(job(str(shards), fraction=0.05, seed=7))
    assert notes == ["data.subset keeps 16 of 300 training samples (5%, seed 7)"]  # 6 + 1 + 5 + 3 + 1
    assert isinstance(notes[0], Note)
    assert preflight(job(str(shards), fraction=None)) == []


def test_a_too_small_subset_names_the_fraction_that_works(shards):
    spec = job(str(shards), fraction=0.02, workers=2, batch=4)  # keeps 2 + 1 + 2 + 1 + 1 = 7 < 8
    with pytest.raises(TemperError) as e:
        preflight(spec)
    message = str(e.value)
    assert "\n" not in message and message.startswith(
        "data.subset keeps 7 of 300 training samples (2%, seed 1), fewer than 2 data-parallel rank(s) x "
        "train.micro_batch_size 4; set data.subset.fraction>=")
    assert message.endswith(", or lower train.micro_batch_size or resources.workers")
    f = float(re.search(r"fraction>=([0-9.]+)", message).group(1))
    assert f == 0.021  # 0.021 x 120 rounds to 3: the first shard to gain a sample (0.02084 and up)
    assert preflight(job(str(shards), fraction=f, workers=2, batch=4))[0].startswith("data.subset keeps 8 of 300")
    with pytest.raises(TemperError, match="data.subset.fraction>=0.021"):
        preflight(job(str(shards), fraction=0.0208, workers=2, batch=4))  # just below still keeps 7
    with pytest.raises(TemperError, match=re.escape(message)):
        ranks(spec)  # the ranks refuse it the same way
