"""The global read plan: equal batches on every rank, no double reads (drop) / full coverage
(pad), determinism, exact mid-epoch resume, layout changes, and the error messages."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from temper.data.plan import (
    ReadSegment,
    ShardSlice,
    build_epoch_plan,
    resume_arguments,
    shard_order,
)
from temper.errors import TemperError

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
shard_lists = st.lists(
    st.one_of(st.integers(0, 3), st.integers(0, 40)), min_size=1, max_size=9
)
layouts = st.tuples(st.integers(1, 8), st.integers(0, 4), st.integers(1, 16))
windows = st.sampled_from([0, 0, 1, 3, 8, 50])
policies = st.sampled_from(["drop", "pad"])


def plan(sizes, *, world=2, workers=2, batch=2, policy="drop", epoch=0, seed=1, **kw):
    return build_epoch_plan(
        shard_sizes=sizes, epoch=epoch, seed=seed, world_size=world, num_workers=workers,
        batch_size=batch, policy=policy, **kw,
    )


def all_samples(sizes):
    return {(s, i) for s, n in enumerate(sizes) for i in range(n)}


def reads(p):
    return [x for r in range(p.world_size) for x in p.sample_ids(r)]


def check_balanced(p, sizes, world, workers, batch):
    nw = max(1, workers)
    assert len(p.workers) == world * nw
    for r in range(world):
        counts = p.worker_batches(r)
        assert sum(counts) == p.batches_per_rank
        assert max(counts) - min(counts) <= 1
        assert all(w.num_samples % batch == 0 for w in p.for_rank(r))
        assert all(w.num_samples == sum(len(s) for s in w.slices) - w.skip for w in p.for_rank(r))
        ids = p.sample_ids(r)
        assert len(ids) == p.batches_per_rank * batch
        assert all(0 <= off < sizes[sh] for sh, off in ids)


@SETTINGS
@given(sizes=shard_lists, layout=layouts, policy=policies, epoch=st.integers(0, 3))
def test_every_rank_reads_the_same_number_of_batches(sizes, layout, policy, epoch):
    world, workers, batch = layout
    total = sum(sizes)
    assume(total >= world * batch)
    p = plan(sizes, world=world, workers=workers, batch=batch, policy=policy, epoch=epoch)
    check_balanced(p, sizes, world, workers, batch)
    got = reads(p)
    assert len(got) == p.batches_per_rank * batch * world
    counts = Counter(got)
    if policy == "drop":
        assert max(counts.values()) == 1
        assert p.padded == 0 and 0 <= p.dropped < world * batch
        assert len(got) + p.dropped == total
    else:
        assert set(counts) == all_samples(sizes)
        assert p.dropped == 0 and 0 <= p.padded < world * batch
        assert len(got) == total + p.padded
    assert sorted(p.shard_order) == [s for s, n in enumerate(sizes) if n > 0]
    assert p.shards_per_worker_min == len(p.shard_order) // (world * max(1, workers))
    again = plan(sizes, world=world, workers=workers, batch=batch, policy=policy, epoch=epoch)
    assert again == p


def test_epochs_shuffle_the_shard_order_differently():
    sizes = [5, 7, 3, 9, 4, 6]
    orders = [plan(sizes, epoch=e).shard_order for e in range(6)]
    assert len(set(orders)) >= 5
    assert all(sorted(o) == list(range(6)) for o in orders)
    assert plan(sizes, epoch=1, seed=2).shard_order != plan(sizes, epoch=1, seed=3).shard_order
    assert shard_order(num_shards=6, seed=1, epoch=4) == list(orders[4])


def test_ranks_read_contiguous_runs_of_shards():
    sizes = [100] * 8
    p = plan(sizes, world=4, workers=2, batch=10)
    for w in p.workers:
        assert len(w.slices) <= 2  # 100 samples per worker: at most one shard boundary
        for s in w.slices:
            assert 0 <= s.start < s.stop <= 100


@SETTINGS
@given(sizes=shard_lists, layout=layouts, policy=policies, window=windows, data=st.data())
def test_resume_reads_exactly_the_rest(sizes, layout, policy, window, data):
    world, workers, batch = layout
    assume(sum(sizes) >= world * batch)
    full = plan(sizes, world=world, workers=workers, batch=batch, policy=policy, shuffle_window=window)
    k = data.draw(st.integers(0, full.batches_per_rank)) * batch
    rest = plan(sizes, world=world, workers=workers, batch=batch, policy=policy, start_sample=k,
                shuffle_window=window)
    check_balanced(rest, sizes, world, workers, batch)
    assert rest.batches_per_rank == full.batches_per_rank - k // batch
    for r in range(world):
        assert rest.sample_ids(r) == full.sample_ids(r)[k:]
    assert resume_arguments(
        full.segments(k), world_size=world, num_workers=workers, batch_size=batch,
        shuffle_window=window,
    ) == ((), k)


@SETTINGS
@given(sizes=shard_lists, layout=layouts, policy=policies, window=st.sampled_from([1, 3, 8, 50]))
def test_shuffle_window_permutes_within_windows_only(sizes, layout, policy, window):
    world, workers, batch = layout
    assume(sum(sizes) >= world * batch)
    flat = plan(sizes, world=world, workers=workers, batch=batch, policy=policy)
    mixed = plan(sizes, world=world, workers=workers, batch=batch, policy=policy, shuffle_window=window)
    check_balanced(mixed, sizes, world, workers, batch)
    for r in range(world):
        for a, b in zip(flat.for_rank(r), mixed.for_rank(r), strict=True):
            assert a.slices == b.slices  # the same reads, in the same (tar streaming) order
            plain = list(a.deliver(range(a.num_samples)))
            shuffled = list(b.deliver(range(b.num_samples)))
            for i in range(0, len(plain), window):  # each window delivers exactly its own reads
                assert sorted(shuffled[i : i + window]) == plain[i : i + window]
    if window >= 8 and sum(sizes) >= 40 * world * max(1, workers):
        assert reads(mixed) != reads(flat)


@SETTINGS
@given(sizes=shard_lists, old=layouts, new=layouts, policy=policies, window=windows, data=st.data())
def test_layout_change_neither_repeats_nor_skips(sizes, old, new, policy, window, data):
    total = sum(sizes)
    assume(total >= old[0] * old[2] and total >= new[0] * new[2])
    assume((old[0], max(1, old[1]), old[2]) != (new[0], max(1, new[1]), new[2]))
    first = plan(sizes, world=old[0], workers=old[1], batch=old[2], policy=policy, shuffle_window=window)
    k = data.draw(st.integers(0, first.batches_per_rank)) * old[2]
    consumed = [x for r in range(old[0]) for x in first.sample_ids(r)[:k]]
    history, start = resume_arguments(
        first.segments(k), world_size=new[0], num_workers=new[1], batch_size=new[2],
        shuffle_window=window,
    )
    assert start == 0 and history == (first.segments(k) if k else ())
    second = plan(sizes, world=new[0], workers=new[1], batch=new[2], policy=policy, history=history,
                  shuffle_window=window)
    check_balanced(second, sizes, *new)
    got = reads(second)
    if policy == "drop":
        assert not set(consumed) & set(got)
        assert max(Counter(consumed + got).values()) == 1
        assert len(consumed) + len(got) + second.dropped == total
        assert second.dropped < new[0] * new[2]
    else:
        assert set(consumed) | set(got) == all_samples(sizes)


def test_two_layout_changes_and_a_same_layout_resume_chain():
    sizes = [13, 0, 29, 7, 31, 5]
    a = plan(sizes, world=4, workers=2, batch=2)
    used = [x for r in range(4) for x in a.sample_ids(r)[:4]]
    b = plan(sizes, world=3, workers=3, batch=3, history=a.segments(4))
    used += [x for r in range(3) for x in b.sample_ids(r)[:3]]
    hist, start = resume_arguments(b.segments(3), world_size=3, num_workers=3, batch_size=3)
    assert (hist, start) == (a.segments(4), 3)
    b2 = plan(sizes, world=3, workers=3, batch=3, history=hist, start_sample=start)
    assert all(b2.sample_ids(r) == b.sample_ids(r)[3:] for r in range(3))
    c = plan(sizes, world=2, workers=0, batch=1, history=b.segments(3))
    got = reads(c)
    assert len(set(used + got)) == len(used) + len(got) == sum(sizes) - c.dropped
    assert c.segments(2) == (*b.segments(3), ReadSegment(2, 1, 1, 2))


def test_sample_ids_match_a_real_dataloader_with_two_workers():
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader, IterableDataset, get_worker_info

    p = plan([9, 4, 15, 6], world=2, workers=2, batch=3, start_sample=3)

    class Reads(IterableDataset):
        def __iter__(self):
            mine = p.for_rank(1)[get_worker_info().id]
            for s in mine.slices:
                for i in range(s.start, s.stop):
                    yield torch.tensor([s.shard, i])

    loader = DataLoader(Reads(), batch_size=3, num_workers=2, multiprocessing_context="fork")
    seen = [tuple(row.tolist()) for batch in loader for row in batch]
    assert seen == p.sample_ids(1)


def test_big_dataset_plans_with_ranges_not_lists():
    sizes = [1_000_003 + i for i in range(2000)]
    p = plan(sizes, world=64, workers=8, batch=256, policy="pad", start_sample=256 * 40)
    assert all(len(w.slices) <= 6 for w in p.workers)  # ~3.9 shards of samples each
    assert len({sum(w.num_samples for w in p.for_rank(r)) for r in range(64)}) == 1
    assert p.shards_per_worker_min == 3


def test_fewer_shards_than_workers_is_allowed():
    p = plan([10, 10], world=2, workers=4, batch=1)
    assert p.shards_per_worker_min == 0
    assert p.batches_per_rank == 10 and p.worker_batches(0) == (3, 3, 2, 2)
    assert p.for_rank(0)[0].slices == (ShardSlice(p.shard_order[0], 0, 3),)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sizes": []}, "data has no shards; point data at a folder written by `temper data pack`"),
        ({"sizes": [3, -1]},
         "data shard 1 has num_samples=-1; counts must be >= 0 (re-run `temper data pack`)"),
        ({"sizes": [0, 0]},
         "data has 0 samples, fewer than world_size 2 x batch_size 2; need at least 4 samples "
         "(pack more data or use fewer ranks or a smaller batch)"),
        ({"sizes": [5, 6], "world": 3, "batch": 4},
         "data has 11 samples, fewer than world_size 3 x batch_size 4; need at least 12 samples "
         "(pack more data or use fewer ranks or a smaller batch)"),
        ({"sizes": [5], "world": 0}, "world_size=0 must be >= 1"),
        ({"sizes": [5], "workers": -1}, "num_workers=-1 must be >= 0"),
        ({"sizes": [5], "batch": 0}, "batch_size=0 must be >= 1"),
        ({"sizes": [5], "epoch": -1}, "epoch=-1 must be >= 0"),
        ({"sizes": [5], "policy": "wrap"},
         "policy='wrap' is not one of 'drop', 'pad'; use 'drop' for large sets, 'pad' for small/eval"),
        ({"sizes": [10], "start_sample": 3},
         "start_sample=3 must be a multiple of batch_size 2 in 0..4 (the samples per rank of "
         "epoch 0); the checkpoint does not match this data or layout"),
        ({"sizes": [10], "start_sample": 6},
         "start_sample=6 must be a multiple of batch_size 2 in 0..4 (the samples per rank of "
         "epoch 0); the checkpoint does not match this data or layout"),
        ({"sizes": [10], "history": (ReadSegment(1, 1, 2, 12),)},
         "data position segment 0 samples_per_rank=12 must be a multiple of batch_size 2 in "
         "0..10 (the samples per rank of epoch 0); the checkpoint does not match this data or layout"),
        ({"sizes": [10], "history": (ReadSegment(4, 1, 4, 4),)},
         "data position segment 0 (world_size 4 x batch_size 4) needs more than the 10 samples "
         "of this data; the checkpoint was written for other data"),
    ],
)
def test_errors_name_the_field_and_the_fix(kwargs, message):
    kwargs = dict(kwargs)
    with pytest.raises(TemperError) as err:
        plan(kwargs.pop("sizes"), **kwargs)
    assert str(err.value) == message
    assert "\n" not in str(err.value)


def test_for_rank_rejects_a_rank_outside_the_world():
    with pytest.raises(TemperError, match=r"^rank=2 is outside 0\.\.1; pass a rank of this world$"):
        plan([10]).for_rank(2)
