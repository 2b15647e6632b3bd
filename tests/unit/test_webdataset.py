"""`data.kind: webdataset` end to end below the training loop: equal batches per rank, exact
mid-epoch resume (same and different world size), both corrupt-data policies, every preflight
error, and the same keys read from disk, a real HTTP server and a real S3-compatible server.

No process group is needed: a rank's reads are a pure function of the plan, so the ranks of a
world are built side by side in this process (the 2-rank DDP run is tests/distributed/).
"""

from __future__ import annotations

import logging
import shutil
from collections import Counter
from pathlib import Path

import pytest

from temper.data.webdataset import ShardedData, build_webdataset_data, preflight
from temper.errors import TemperError
from temper.spec.job import JobSpec
from tests.fixtures.shard_servers import HttpShardServer, write_shards
from tests.fixtures.shards import corrupt_sample, ranks, take

SIZES = [37, 5, 61, 0, 23, 14]  # uneven, one empty: 140 samples
TOTAL = sum(SIZES)


def job(train: str, *, workers: int = 2, batch: int = 4, **data) -> JobSpec:
    return JobSpec.model_validate({
        "name": "wds", "seed": 3,
        "model": {"kind": "gpt", "flavor": "tiny", "seq_len": 8},
        "data": {"kind": "webdataset", "train": train, "num_workers": 2, "shuffle_buffer": 16, **data},
        "train": {"micro_batch_size": batch, "eval_batches": 3},
        "resources": {"workers": workers},
        "tracking": {"enabled": False},
    })


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("shards") / "toy"
    write_shards(folder, SIZES)
    return folder


@pytest.mark.parametrize("remainder", ["drop", "pad"])
def test_every_rank_reads_the_same_number_of_batches(shards, remainder):
    spec = job(str(shards), workers=3, batch=4, remainder=remainder)
    data = ranks(spec)
    per = data[0].batches_per_epoch
    epoch = [take(d, per)[0] for d in data]
    assert all(len(k) == per * 4 for k in epoch)
    counts = Counter(k for keys in epoch for k in keys)
    if remainder == "drop":
        assert max(counts.values()) == 1 and TOTAL - len(counts) < 3 * 4
    else:
        assert len(counts) == TOTAL  # every sample, a few twice
    assert all(d.state_dict()["epoch"] == 1 for d in data)  # a whole epoch taken: at the next one


def test_epochs_differ_and_runs_repeat(shards):
    spec = job(str(shards), workers=2)
    a, b = ranks(spec)[0], ranks(spec)[0]
    per = a.batches_per_epoch
    first, it = take(a, per)
    second, _ = take(a, per, it)
    assert first != second  # a new shard order and new shuffle windows each epoch
    assert sorted(first) != first  # shuffled, not read in key order
    assert take(b, per)[0] == first  # same seed, same order, run after run


@pytest.mark.parametrize(("old", "new"), [(2, 2), (2, 1), (1, 3)])
def test_resume_mid_epoch_yields_what_an_uninterrupted_run_would(shards, old, new):
    spec_old, spec_new = job(str(shards), workers=old), job(str(shards), workers=new)
    per = ranks(spec_old)[0].batches_per_epoch
    k = per // 2 + 1  # mid-epoch, not on a shuffle-window boundary
    first = ranks(spec_old)
    consumed = [take(d, k)[0] for d in first]
    states = [d.state_dict() for d in first]
    assert all(s == states[0] for s in states)  # one position for the whole world
    resumed = ranks(spec_new)
    for d in resumed:
        d.load_state_dict(states[0])
    if old == new:  # exactly the keys of the uninterrupted run, in order, into the next epoch
        whole = [take(d, per + 3)[0] for d in ranks(spec_old)]
        rest = [take(d, per + 3 - k)[0] for d in resumed]
        assert [c + r for c, r in zip(consumed, rest, strict=True)] == whole
    else:  # the unread rest of the epoch, re-split: nothing twice, nothing lost beyond a batch row
        rest_per = resumed[0]._build_plan().batches_per_rank
        rest = [take(d, rest_per)[0] for d in resumed]
        seen = [x for keys in consumed + rest for x in keys]
        assert len(seen) == len(set(seen))
        assert TOTAL - len(seen) < old * 4 + new * 4
        assert resumed[0].state_dict()["epoch"] == 1  # the rest of epoch 0 done: at epoch 1


def test_resume_rejects_other_data(shards, tmp_path):
    other = tmp_path / "other"
    write_shards(other, [10, 10])
    state = ranks(job(str(shards), workers=1))[0].state_dict()
    with pytest.raises(TemperError, match=r"data state was written for other shards than .*other"):
        ranks(job(str(other), workers=1))[0].load_state_dict(state)


@pytest.fixture
def corrupt(shards, tmp_path) -> Path:
    folder = tmp_path / "corrupt"
    shutil.copytree(shards, folder)
    corrupt_sample(folder, "toy-000000.tar", "toy/000000003")
    corrupt_sample(folder, "toy-000002.tar", "toy/000000050")
    return folder


@pytest.mark.parametrize("loader_workers", [0, 2])
def test_on_error_skip_counts_and_keeps_batches_equal(corrupt, caplog, loader_workers):
    spec = job(str(corrupt), workers=2, on_error="skip", num_workers=loader_workers)
    data = ranks(spec)
    per = data[0].batches_per_epoch
    with caplog.at_level(logging.WARNING):
        epoch = [take(d, per)[0] for d in data]
    assert all(len(k) == per * 4 for k in epoch)
    read = {x for keys in epoch for x in keys}
    bad = {"toy/000000003", "toy/000000050"} & _planned(data)  # the corrupt ones this epoch reads
    assert bad and sum(d.skipped for d in data) == len(bad)
    assert not bad & read  # never delivered: a good sample took each one's place
    if loader_workers == 0:  # (loader worker processes log to their own stderr)
        assert "skipping shard" in caplog.text and all(k in caplog.text for k in bad)


def _planned(data: list[ShardedData]) -> set[str]:
    plan = data[0]._build_plan()
    return {f"toy/{data[0].train.first_index[s] + i:09d}"
            for r in range(plan.world_size) for s, i in plan.sample_ids(r)}


def test_on_error_fail_names_shard_and_key(corrupt):
    data = ranks(job(str(corrupt), workers=1, on_error="fail", num_workers=0))[0]
    with pytest.raises(TemperError, match=r"shard .*toy-00000[02]\.tar sample toy/0000000(03|50): field "
                       r"'tokens.npy' cannot be decoded .*set data.on_error=skip"):
        take(data, data.batches_per_epoch)


def test_truncated_shard_is_skipped_or_fails(shards, tmp_path):
    folder = tmp_path / "trunc"
    shutil.copytree(shards, folder)
    path = folder / "toy-000002.tar"
    path.write_bytes(path.read_bytes()[: 30 * 2048])  # cut mid-shard
    skip = ranks(job(str(folder), workers=2, on_error="skip"))
    per = skip[0].batches_per_epoch
    assert all(len(take(d, per)[0]) == per * 4 for d in skip)
    assert sum(d.skipped for d in skip) > 0
    fail = ranks(job(str(folder), workers=1, on_error="fail", num_workers=0))[0]
    with pytest.raises(TemperError, match=r"toy-000002\.tar sample toy/0000000\d\d: the shard (ends|could not be read)"):
        take(fail, fail.batches_per_epoch)
    with pytest.raises(TemperError, match=r"data.train: .*toy-000002.tar has \d+ bytes but its manifest says \d+"):
        preflight(job(str(folder)))


def test_preflight_errors_name_the_url_and_the_fix(shards, tmp_path):
    assert preflight(job(str(shards))) == []
    with pytest.raises(TemperError, match=r"data.train: .*/nowhere/manifest.json is missing or unreachable; point data.train at"):
        preflight(job(str(tmp_path / "nowhere")))
    gone = tmp_path / "gone"
    shutil.copytree(shards, gone)
    (gone / "toy-000004.tar").unlink()
    with pytest.raises(TemperError, match=r"data.train: .*toy-000004.tar does not exist"):
        preflight(job(str(gone)))
    changed = tmp_path / "changed"
    shutil.copytree(shards, changed)
    blob = bytearray((changed / "toy-000001.tar").read_bytes())
    blob[512 + 130] ^= 0xFF  # a token byte of the first sample: same size, other content
    (changed / "toy-000001.tar").write_bytes(bytes(blob))
    assert preflight(job(str(changed), verify="size")) == []
    with pytest.raises(TemperError, match=r"toy-000001.tar has sha256 .* but its manifest says"):
        preflight(job(str(changed), verify="sha256"))
    with pytest.raises(TemperError, match=r"data.train has 140 samples, fewer than 4 data-parallel "
                       r"rank\(s\) x train.micro_batch_size 64; pack more data"):
        preflight(job(str(shards), workers=4, batch=64))
    small = JobSpec.model_validate({**job(str(shards)).model_dump(), "model": {"kind": "gpt", "flavor": "tiny", "seq_len": 16}})
    with pytest.raises(TemperError, match=r"sequences hold 8 tokens \+ 1 but model.seq_len is 16; set model.seq_len<=8"):
        preflight(small)
    with pytest.raises(TemperError, match=r"data.fields.tokens: 'txt' is not a key of the shards; accepted: cls, tokens.npy"):
        preflight(job(str(shards), fields={"tokens": "txt"}))
    with pytest.raises(TemperError, match=r"data.transform 'nope:fn' cannot be imported"):
        preflight(job(str(shards), transform="nope:fn"))


def test_preflight_warns_when_workers_share_shards(shards):
    warnings = preflight(job(str(shards), workers=3, num_workers=2))
    assert len(warnings) == 1 and "5 shard(s) for 3 data-parallel rank(s) x 2 loader worker(s)" in warnings[0]


def test_shard_patterns_with_and_without_a_manifest(shards, tmp_path):
    pattern = str(shards / "toy-{000000..000002}.tar")
    data = ranks(job(pattern, workers=1, shuffle_buffer=0))[0]
    assert data.train.sizes == (37, 5, 61) and data.train.manifest is not None
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("toy-000000.tar", "toy-000001.tar"):
        shutil.copy(shards / name, bare / name)
    counted = ranks(job(str(bare / "toy-{000000..000001}.tar"), workers=1))[0]
    assert counted.train.sizes == (37, 5) and counted.train.manifest is None
    keys, _ = take(counted, counted.batches_per_epoch)
    assert len(set(keys)) == 40


def add_offset(sample, rng):
    """A transform for the hook test: deterministic per (seed, epoch, key)."""
    sample["tokens"] = sample["tokens"] * 0 + rng.randrange(1000)
    return sample


def test_transform_hook_is_applied_deterministically(shards):
    spec = job(str(shards), workers=1, transform="tests.unit.test_webdataset:add_offset", num_workers=0)
    a = next(ranks(spec)[0].train_batches())
    b = next(ranks(spec)[0].train_batches())
    assert a["tokens"].equal(b["tokens"]) and a["tokens"][:, 0].tolist() != [int(k[-3:]) % 256 for k in a["__key__"]]


def test_eval_split_reads_each_sample_once_capped(shards):
    spec = job(str(shards), workers=2, eval=str(shards))
    data = ranks(spec)
    keys = [k for d in data for batch in d.eval_batches() for k in batch["__key__"]]
    assert len(keys) == len(set(keys)) == 2 * 3 * 4  # eval_batches x batch per rank, no duplicates


def test_digits_images_decode_for_a_resnet(tmp_path):
    from temper.data.pack import pack

    pack("digits", tmp_path / "digits", fmt="digits", shard_size=500, limit=600)
    base = {"name": "d", "data": {"kind": "webdataset", "train": str(tmp_path / "digits"), "num_workers": 0},
            "train": {"micro_batch_size": 8}, "tracking": {"enabled": False}}
    spec = JobSpec.model_validate({**base, "model": {"kind": "resnet", "flavor": "tiny", "in_channels": 1, "image_size": 8}})
    batch = next(build_webdataset_data(spec, rank=0, world_size=1).train_batches())
    assert batch["image"].shape == (8, 1, 8, 8) and batch["label"].shape == (8,)
    assert 0.0 <= float(batch["image"].min()) and float(batch["image"].max()) <= 1.0
    wrong = JobSpec.model_validate({**base, "model": {"kind": "resnet", "flavor": "tiny"}})
    with pytest.raises(TemperError) as e:
        preflight(wrong)
    assert e.value.problems == [
        "data.train: images have 1 channel(s) but model.in_channels is 3; set model.in_channels=1",
        "data.train: images are 8x8 but model.image_size is 32; set model.image_size=8",
    ]


def test_http_shards_read_like_local_ones(shards, tmp_path):
    server = HttpShardServer(shards.parent)
    try:
        url = f"{server.url}/{shards.name}"
        assert preflight(job(url, verify="sha256")) == []
        local = ranks(job(str(shards), workers=2))
        remote = ranks(job(url, workers=2))
        per = local[0].batches_per_epoch
        assert [take(d, per)[0] for d in remote] == [take(d, per)[0] for d in local]
        with pytest.raises(TemperError, match=rf"data.train: {server.url}/toy/toy-00000[6-9].tar is missing or unreachable"):
            preflight(job(f"{server.url}/toy/toy-{{000000..000009}}.tar"))
        with pytest.raises(TemperError, match=rf"{server.url}/nothing/manifest.json is missing or unreachable"):
            preflight(job(f"{server.url}/nothing"))
    finally:
        server.stop()
    with pytest.raises(TemperError, match=r"missing or unreachable"):
        preflight(job(url))  # the server is down


def test_s3_shards_read_like_local_ones(shards, s3_server):
    url = s3_server.upload(shards, "toy")
    spec = job(url, workers=2, s3_endpoint_url=s3_server.endpoint)
    assert preflight(spec) == []
    local, remote = ranks(job(str(shards), workers=2)), ranks(spec)
    per = local[0].batches_per_epoch
    assert [take(d, per)[0] for d in remote] == [take(d, per)[0] for d in local]
    s3_server.client().delete_object(Bucket="shards", Key="toy/toy-000005.tar")
    with pytest.raises(TemperError, match=r"data.train: s3://shards/toy/toy-000005.tar is missing or unreachable"):
        preflight(spec)


def test_inspect_reads_remote_shards(shards, s3_server, monkeypatch):
    from temper.data.inspection import inspect_lines

    url = s3_server.upload(shards, "inspect")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint)
    lines = "\n".join(inspect_lines(url, check=True))
    for expected in ("verified   6 shard(s)", "samples    140", "sample     toy/000000000",
                     "tokens.npy   uint16 (9,): [0, 0, 0"):
        assert expected in lines
