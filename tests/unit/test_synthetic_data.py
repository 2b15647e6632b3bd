"""Synthetic data and rank sharding: determinism, shapes, disjoint equal shards, resume,
and that the data is learnable by the models it is shaped for."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import Dataset

from temper.data import DATA_BUILDERS, DataBundle, build_data
from temper.data.base import epoch_permutation
from temper.data.synthetic import MarkovTokens, TemplateImages, markov_table
from temper.errors import TemperError
from temper.models import build_model
from temper.objectives import build_objective
from temper.spec import JobSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def gpt_job(**data) -> JobSpec:
    return JobSpec(
        name="t", seed=7, model={"kind": "gpt", "vocab_size": 32, "seq_len": 12},
        data={"num_samples": 64, "eval_samples": 16, **data},
        train={"micro_batch_size": 4, "eval_batches": 3},
    )


def resnet_job(**data) -> JobSpec:
    return JobSpec(
        name="t", seed=3, model={"kind": "resnet", "num_classes": 5, "image_size": 16,
                                 "in_channels": 2, "base_width": 4},
        data={"num_samples": 40, "eval_samples": 8, **data}, train={"micro_batch_size": 4},
    )


def take(it, n: int) -> list[dict[str, torch.Tensor]]:
    return list(itertools.islice(it, n))


def same(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    if len(a) != len(b):
        return False
    return all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
        for x, y in zip(a, b, strict=True)
    )


class _Index(Dataset):
    """Sample i is {"idx": i}: lets tests see exactly which indices a rank received."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"idx": torch.tensor(i)}


def index_bundle(n: int, *, rank: int, world: int, batch: int, seed: int = 0,
                 eval_n: int = 0, eval_batches: int = 4) -> DataBundle:
    return DataBundle(
        train=_Index(n), eval=_Index(eval_n) if eval_n else None, seed=seed, rank=rank,
        world_size=world, micro_batch_size=batch, eval_batches=eval_batches,
    )


def indices(batches) -> list[list[int]]:
    return [b["idx"].tolist() for b in batches]


# ------------------------------------------------------------------------ synthetic samples


def test_gpt_batches_shape_dtype_and_range() -> None:
    data = build_data(gpt_job(), rank=0, world_size=1)
    batch = next(data.train_batches())
    assert batch.keys() == {"tokens"}
    assert batch["tokens"].shape == (4, 13) and batch["tokens"].dtype == torch.long
    assert 0 <= batch["tokens"].min() and batch["tokens"].max() < 32
    assert data.batches_per_epoch == 16


def test_resnet_batches_shape_dtype_and_range() -> None:
    data = build_data(resnet_job(), rank=0, world_size=1)
    batch = next(data.train_batches())
    assert batch.keys() == {"image", "label"}
    assert batch["image"].shape == (4, 2, 16, 16) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (4,) and batch["label"].dtype == torch.long
    labels = torch.cat([b["label"] for b in take(data.train_batches(), 10)])
    assert 0 <= labels.min() and labels.max() < 5 and len(labels.unique()) > 2


@pytest.mark.parametrize("job", [gpt_job, resnet_job])
def test_same_seed_same_batches_across_runs(job) -> None:
    torch.manual_seed(0)
    a = take(build_data(job(), rank=0, world_size=1).train_batches(), 12)
    torch.manual_seed(123)  # the global RNG must not matter
    b = take(build_data(job(), rank=0, world_size=1).train_batches(), 12)
    assert same(a, b)
    other = job().model_copy(update={"seed": 99})
    assert not same(a, take(build_data(other, rank=0, world_size=1).train_batches(), 12))


def test_sample_is_a_pure_function_of_seed_split_index() -> None:
    kw = {"vocab_size": 32, "seq_len": 12, "noise": 0.1, "seed": 1}
    a = MarkovTokens(**kw, split="train", length=10)
    b = MarkovTokens(**kw, split="train", length=1000)
    assert torch.equal(a[3]["tokens"], b[3]["tokens"])
    assert torch.equal(a[3]["tokens"], a[3]["tokens"])
    ev = MarkovTokens(**kw, split="eval", length=10)
    assert not any(torch.equal(a[i]["tokens"], ev[i]["tokens"]) for i in range(10))
    with pytest.raises(IndexError):
        a[10]


def test_markov_chain_without_noise_only_takes_listed_transitions() -> None:
    succ, cum = markov_table(vocab_size=32, seed=1)
    probs = torch.diff(cum, dim=1, prepend=torch.zeros(32, 1))
    allowed = {(a, int(succ[a, j])) for a in range(32) for j in range(4) if probs[a, j] > 0}
    counts = (probs > 0).sum(1)
    assert counts.min() >= 2 and counts.max() <= 4
    clean = MarkovTokens(vocab_size=32, seq_len=50, noise=0.0, seed=1, split="train", length=20)
    pairs = [(int(a), int(b)) for i in range(20) for a, b in itertools.pairwise(clean[i]["tokens"])]
    assert set(pairs) <= allowed
    noisy = MarkovTokens(vocab_size=32, seq_len=50, noise=1.0, seed=1, split="train", length=20)
    pairs = [(int(a), int(b)) for i in range(20) for a, b in itertools.pairwise(noisy[i]["tokens"])]
    assert sum(p not in allowed for p in pairs) > 0.6 * len(pairs)


def test_images_are_template_plus_noise() -> None:
    kw = {"num_classes": 4, "in_channels": 3, "image_size": 16, "seed": 2, "split": "train",
          "length": 50}
    clean = TemplateImages(**kw, noise=0.0)
    for i in range(10):
        sample = clean[i]
        label = int(sample["label"])
        template = clean.template(label)
        shifted = [torch.roll(template, (dy, dx), (1, 2))
                   for dy in range(-2, 3) for dx in range(-2, 3)]
        assert any(torch.allclose(sample["image"], t) for t in shifted)
    noisy = TemplateImages(**kw, noise=0.5)
    diff = noisy[0]["image"] - clean[0]["image"]
    assert diff.std().item() == pytest.approx(0.5, rel=0.2)


def test_unknown_model_kind_for_synthetic_is_a_temper_error(monkeypatch) -> None:
    from temper.data import synthetic

    monkeypatch.delitem(synthetic.SYNTHETIC_DATASETS, "resnet")
    with pytest.raises(TemperError, match="model.kind 'resnet'"):
        build_data(resnet_job(), rank=0, world_size=1)
    assert "synthetic" in DATA_BUILDERS


# ---------------------------------------------------------------------------- sharding


def test_ranks_get_disjoint_shards_that_cover_an_epoch() -> None:
    world, n, b = 3, 50, 4
    shards = [sum(indices(take(index_bundle(n, rank=r, world=world, batch=b).train_batches(), 4)),
                  []) for r in range(world)]
    assert all(len(s) == 16 for s in shards)  # floor(50/3)=16 -> 4 batches of 4
    flat = sum(shards, [])
    assert len(set(flat)) == len(flat) == 48
    assert set(flat) <= set(range(n))


def test_union_of_ranks_at_a_step_is_a_chunk_of_the_epoch_permutation() -> None:
    world, b, n, seed = 4, 3, 100, 5
    perm = epoch_permutation(seed=seed, epoch=0, num_samples=n).tolist()
    per_rank = [indices(take(index_bundle(n, rank=r, world=world, batch=b, seed=seed)
                             .train_batches(), 8)) for r in range(world)]
    for step in range(8):
        union = sorted(i for r in range(world) for i in per_rank[r][step])
        assert union == sorted(perm[step * b * world:(step + 1) * b * world])


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 300), world=st.integers(1, 8), batch=st.integers(1, 16))
def test_every_rank_gets_the_same_number_of_full_batches(n: int, world: int, batch: int) -> None:
    if (n // world) // batch == 0:
        with pytest.raises(TemperError, match="data.num_samples"):
            index_bundle(n, rank=0, world=world, batch=batch)
        return
    bundles = [index_bundle(n, rank=r, world=world, batch=batch) for r in range(world)]
    expected = (n // world) // batch
    used = expected * batch * world
    seen: list[list[int]] = [[], []]  # epochs 0 and 1, all ranks
    for bundle in bundles:
        assert bundle.batches_per_epoch == expected
        got = indices(take(bundle.train_batches(), 2 * expected))
        assert all(len(x) == batch for x in got)
        assert bundle.state_dict() == {"kind": "synthetic", "epoch": 2, "samples_in_epoch": 0}
        seen[0] += sum(got[:expected], [])
        seen[1] += sum(got[expected:], [])
    for epoch, got in enumerate(seen):
        perm = epoch_permutation(seed=0, epoch=epoch, num_samples=n).tolist()
        assert len(got) == len(set(got)) == used
        assert set(got) == set(perm[:used])


def test_too_few_samples_is_a_temper_error_naming_the_minimum() -> None:
    job = gpt_job(num_samples=7)
    with pytest.raises(TemperError, match=r"data.num_samples=7 .* >= 8"):
        build_data(job, rank=0, world_size=2)
    enough = job.model_copy(update={"data": job.data.model_copy(update={"num_samples": 8})})
    assert build_data(enough, rank=1, world_size=2).batches_per_epoch == 1


def test_epochs_reshuffle_and_continue_forever() -> None:
    bundle = index_bundle(12, rank=0, world=1, batch=4)
    got = indices(take(bundle.train_batches(), 9))  # 3 epochs of 3 batches
    epochs = [sum(got[i:i + 3], []) for i in (0, 3, 6)]
    assert all(sorted(e) == list(range(12)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    assert bundle.state_dict() == {"kind": "synthetic", "epoch": 3, "samples_in_epoch": 0}


def test_resume_from_state_dict_continues_the_same_stream() -> None:
    reference = indices(take(index_bundle(30, rank=1, world=2, batch=4).train_batches(), 10))
    first = index_bundle(30, rank=1, world=2, batch=4)
    head = indices(take(first.train_batches(), 5))
    state = first.state_dict()
    # 15 per rank -> 3 batches per epoch; 2 batches x 4 samples x 2 ranks into epoch 1
    assert state == {"kind": "synthetic", "epoch": 1, "samples_in_epoch": 16}
    resumed = index_bundle(30, rank=1, world=2, batch=4)
    resumed.load_state_dict(state)
    assert head + indices(take(resumed.train_batches(), 5)) == reference
    with pytest.raises(TemperError, match="not 'synthetic'"):
        resumed.load_state_dict({"kind": "webdataset", "epoch": 0})


def test_resume_on_another_world_size_with_the_same_global_batch() -> None:
    """2 ranks x 4 -> 1 rank x 8: the samples of every later step are the same set."""
    two = [index_bundle(40, rank=r, world=2, batch=4) for r in range(2)]
    streams = [two[r].train_batches() for r in range(2)]
    for _ in range(3):  # 3 steps on 2 ranks
        for s in streams:
            next(s)
    one = index_bundle(40, rank=0, world=1, batch=8)
    one.load_state_dict(two[0].state_dict())
    after_resume = indices(take(one.train_batches(), 4))
    uninterrupted = [index_bundle(40, rank=r, world=2, batch=4) for r in range(2)]
    per_rank = [indices(take(b.train_batches(), 7))[3:] for b in uninterrupted]
    assert [sorted(x) for x in after_resume] == [sorted(a + b) for a, b in zip(*per_rank, strict=True)]


def test_workers_yield_the_same_batches_as_the_main_process() -> None:
    job = resnet_job()
    a = take(build_data(job, rank=0, world_size=2).train_batches(), 6)
    spec = job.model_copy(update={"data": job.data.model_copy(update={"num_workers": 2})})
    b = take(build_data(spec, rank=0, world_size=2).train_batches(), 6)
    assert same(a, b)


# -------------------------------------------------------------------------------- eval


def test_no_eval_split_when_eval_samples_is_zero() -> None:
    data = build_data(gpt_job(eval_samples=0), rank=0, world_size=1)
    assert data.eval_batches() is None and not data.has_eval


def test_eval_shards_are_equal_disjoint_capped_and_repeatable() -> None:
    world = 3
    bundles = [index_bundle(40, rank=r, world=world, batch=4, eval_n=20, eval_batches=5)
               for r in range(world)]
    shards = [indices(b.eval_batches()) for b in bundles]
    assert all(sum(map(len, s)) == 6 for s in shards)  # 20 // 3
    assert [len(x) for x in shards[0]] == [4, 2]
    flat = sum((sum(s, []) for s in shards), [])
    assert len(set(flat)) == len(flat)
    assert indices(bundles[0].eval_batches()) == shards[0]  # a fresh pass every call
    capped = index_bundle(40, rank=0, world=1, batch=4, eval_n=20, eval_batches=2)
    assert [len(x) for x in indices(capped.eval_batches())] == [4, 4]
    with pytest.raises(TemperError, match="data.eval_samples"):
        index_bundle(40, rank=0, world=4, batch=2, eval_n=3)


def test_eval_split_differs_from_train() -> None:
    data = build_data(gpt_job(), rank=0, world_size=1)
    train = torch.cat([b["tokens"] for b in take(data.train_batches(), 16)])
    evals = torch.cat([b["tokens"] for b in data.eval_batches()])
    assert evals.shape == (12, 13)  # min(16, 3 batches x 4)
    assert not any(torch.equal(e, t) for e in evals for t in train)


# ------------------------------------------------------------------------- learnability


def test_tiny_gpt_learns_the_markov_chain() -> None:
    vocab = 64
    spec = JobSpec(
        name="t", seed=0,
        model={"kind": "gpt", "vocab_size": vocab, "seq_len": 32, "n_layer": 2, "n_head": 4,
               "d_model": 64},
        data={"num_samples": 2048, "eval_samples": 0}, train={"micro_batch_size": 16},
    )
    torch.manual_seed(0)
    model = build_model(spec.model)
    objective = build_objective(spec.objective)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batches = build_data(spec, rank=0, world_size=1).train_batches()
    target, losses = 0.7 * math.log(vocab), []
    for _ in range(150):
        loss = objective(model, next(batches)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if len(losses) >= 5 and sum(losses[-5:]) / 5 < target:
            break
    assert losses[0] > 0.95 * math.log(vocab)
    assert sum(losses[-5:]) / 5 < target, losses[-5:]


def test_tiny_resnet_beats_chance_on_template_images() -> None:
    spec = JobSpec(
        name="t", seed=0,
        model={"kind": "resnet", "num_classes": 10, "image_size": 16, "base_width": 8},
        data={"num_samples": 1024, "eval_samples": 128, "noise": 0.5},
        train={"micro_batch_size": 32, "eval_batches": 4},
    )
    torch.manual_seed(0)
    model = build_model(spec.model)
    objective = build_objective(spec.objective)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    data = build_data(spec, rank=0, world_size=1)
    for batch in take(data.train_batches(), 40):
        loss = objective(model, batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        accs = [objective(model, b).metrics["acc"].item() for b in data.eval_batches()]
    assert sum(accs) / len(accs) > 0.3  # chance is 0.1


def test_classify_on_synthetic_text_is_refused_before_launch() -> None:
    """Synthetic text data has no labels: a GPT classify job says so before any worker starts
    (it used to die in the first step with KeyError: 'label')."""
    from temper.data import preflight_data
    from temper.errors import TemperError
    from temper.spec import load_spec

    spec = load_spec("jobs/ci/tiny-gpt.yaml", ["objective={kind: classify}", "model.num_classes=4"])
    with pytest.raises(TemperError, match="needs labels.*data.kind=webdataset"):
        preflight_data(spec)
    assert preflight_data(load_spec("jobs/ci/tiny-resnet.yaml", [])) == []
