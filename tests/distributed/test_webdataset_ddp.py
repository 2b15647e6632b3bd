"""The real loop on 2 gloo ranks streaming 5 uneven WebDataset shards with 2 loader workers per
rank: it finishes (a hang fails the test by its timeout) across an epoch boundary, with a
corrupt sample skipped, and the ranks agree; the same with a `data.subset`. (Equal batch counts
under both remainder policies, for many layouts, and the subset's samples are tested without
processes in tests/unit/.)"""

from __future__ import annotations

import pytest

from tests.distributed.spawn import run_ranks
from tests.fixtures.shard_servers import write_shards

pytestmark = pytest.mark.distributed

SIZES = [29, 3, 17, 41, 8]  # 98 samples: 2 ranks x 4 per batch leaves a remainder every epoch


def _train(spec_json: str) -> dict:
    from temper.dist import build_dist_context
    from temper.runtime.loop import train
    from temper.spec import spec_from_json

    ctx = build_dist_context(device="cpu")
    try:
        result = train(spec_from_json(spec_json), ctx)
        return {"steps": result.steps, "history": result.loss_history, "metrics": result.metrics}
    finally:
        ctx.close()


def _spec_json(train: str, max_steps: int = 20, **data) -> str:
    from temper.spec import JobSpec, spec_to_json

    return spec_to_json(JobSpec.model_validate({
        "name": "wds-ddp",
        "model": {"kind": "gpt", "flavor": "tiny", "seq_len": 8},
        "data": {"kind": "webdataset", "train": train, "num_workers": 2, "shuffle_buffer": 8, **data},
        "train": {"max_steps": max_steps, "micro_batch_size": 4, "log_every": 10},  # 13 batches/epoch/rank
        "resources": {"workers": 2},
        "tracking": {"enabled": False},
    }))


@pytest.mark.timeout(240)
def test_two_ranks_two_workers_uneven_shards_finish_and_agree(tmp_path) -> None:
    folder = tmp_path / "uneven"
    write_shards(folder, SIZES)
    blob = bytearray((folder / "toy-000003.tar").read_bytes())
    blob[blob.index(b"\x93NUMPY") + 1] ^= 0xFF  # break the shard's first tokens.npy
    (folder / "toy-000003.tar").write_bytes(bytes(blob))
    ranks = run_ranks(_train, 2, _spec_json(str(folder), remainder="pad", on_error="skip"))
    assert [r["steps"] for r in ranks] == [20, 20]
    assert ranks[0]["history"] == ranks[1]["history"]  # all-reduced: the ranks agree
    # the corrupt sample is read once per epoch (pad reads every sample): 2 epochs started
    assert ranks[0]["metrics"]["data/skipped_samples"] == 2


@pytest.mark.timeout(240)
def test_two_ranks_train_on_a_subset_across_an_epoch_boundary(tmp_path) -> None:
    folder = tmp_path / "uneven"
    write_shards(folder, SIZES)
    # fraction 0.5 keeps 14 + 2 + 8 + 20 + 4 = 48 samples: 6 batches per rank per epoch
    ranks = run_ranks(_train, 2, _spec_json(str(folder), max_steps=9, subset={"fraction": 0.5, "seed": 4}))
    assert [r["steps"] for r in ranks] == [9, 9]
    assert ranks[0]["history"] == ranks[1]["history"]
