"""Text models beyond GPT: the BERT-style encoder, the MLM objective, LSTM/GRU classifiers,
and the `pystdlib-packages` classification pack."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch
import webdataset as wds
from torch import nn

from temper.data.manifest import Manifest
from temper.data.pack import pack
from temper.data.pack.pystdlib_packages import STDLIB_PACKAGES
from temper.errors import TemperError
from temper.models import Encoder, Recurrent, build_model
from temper.models.init import apply_deterministic_init, materialize
from temper.objectives import MLM, build_objective
from temper.spec.job import ClassifySpec, EncoderSpec, GPTSpec, MLMSpec, RecurrentSpec

ENC = EncoderSpec(vocab_size=40, seq_len=16, n_layer=2, n_head=2, d_model=16, num_classes=5)


def tokens(b: int = 3, t: int = 16, vocab: int = 39, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------- encoder


@pytest.mark.parametrize("pool", ["mean", "cls"])
def test_encoder_heads_give_token_logits_and_class_logits(pool) -> None:
    spec = ENC.model_copy(update={"pool": pool})
    mlm = build_model(spec, objective=MLMSpec())
    assert set(mlm.heads) == {"mlm"} and mlm(tokens(), head="mlm").shape == (3, 16, 40)
    clf = build_model(spec, objective=ClassifySpec())
    assert set(clf.heads) == {"classify"} and clf(tokens(), head="classify").shape == (3, 5)
    assert ("cls_token" in dict(clf.named_parameters())) == (pool == "cls")
    # The backbone is the same for both objectives: init_from carries every name over.
    backbone = {k for k in mlm.state_dict() if not k.startswith("heads.")}
    assert backbone == {k for k in clf.state_dict() if not k.startswith("heads.")}
    with pytest.raises(TemperError, match="model.seq_len is 16"):
        clf(tokens(t=17), head="classify")


def test_encoder_is_bidirectional() -> None:
    model = build_model(ENC, objective=MLMSpec()).eval()
    x = tokens(b=1)
    y = x.clone()
    y[0, -1] = (x[0, -1] + 1) % 39  # change only the last token
    first = model(x, head="mlm")[0, 0], model(y, head="mlm")[0, 0]
    assert not torch.allclose(*first)  # position 0 sees the future


def test_mlm_decoder_is_tied_to_the_embedding_after_meta_build_and_materialize() -> None:
    with torch.device("meta"):
        model = build_model(ENC, objective=MLMSpec())
    materialize(model, device=torch.device("cpu"), seed=3)
    decoder = model.heads["mlm"].decoder
    assert decoder.weight is model.tok_emb.weight and not decoder.weight.is_meta
    assert torch.equal(decoder.bias, torch.zeros(40))  # its own bias, zero-initialized
    assert decoder.weight.std().item() == pytest.approx(0.02, rel=0.2)
    names = [n for n, _ in model.named_parameters()]
    assert "tok_emb.weight" in names and "heads.mlm.decoder.weight" not in names  # listed once
    eager = build_model(ENC, objective=MLMSpec())
    apply_deterministic_init(eager, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(eager.state_dict().values(), model.state_dict().values(), strict=True))


# ------------------------------------------------------------------------------------- MLM


def test_mlm_chooses_mask_prob_and_splits_80_10_10() -> None:
    torch.manual_seed(0)
    obj = MLM(mask_prob=0.15, mask_id=257, vocab_size=258)
    x = torch.randint(0, 257, (256, 128))
    m = obj.corrupt(x)
    n = m.chosen.sum().item()
    # 32768 positions: the chosen share's std is 0.002, so +-0.01 is 5 sigma.
    assert n / x.numel() == pytest.approx(0.15, abs=0.01)
    # ~4900 chosen: each share's std is <= 0.006, so +-0.03 is 5 sigma.
    masked, randomized = m.masked.sum().item() / n, m.randomized.sum().item() / n
    assert masked == pytest.approx(0.8, abs=0.03) and randomized == pytest.approx(0.1, abs=0.03)
    kept = m.chosen & ~m.masked & ~m.randomized
    assert kept.sum().item() / n == pytest.approx(0.1, abs=0.03)
    assert torch.equal(m.inputs[~m.chosen], x[~m.chosen]) and torch.equal(m.inputs[kept], x[kept])
    assert (m.inputs[m.masked] == 257).all()
    assert not (m.masked & m.randomized).any() and not (m.masked & ~m.chosen).any()


def test_mlm_random_replacements_never_use_the_mask_id_and_cover_the_rest() -> None:
    torch.manual_seed(1)
    obj = MLM(mask_prob=0.9, mask_id=3, vocab_size=10)  # a mask id inside the range
    m = obj.corrupt(torch.zeros(64, 256, dtype=torch.long))
    replaced = m.inputs[m.randomized]
    assert replaced.numel() > 1000
    assert set(replaced.tolist()) == {0, 1, 2, 4, 5, 6, 7, 8, 9}


def test_mlm_chooses_at_least_one_position_per_sequence() -> None:
    torch.manual_seed(2)
    m = MLM(mask_prob=0.001, mask_id=9, vocab_size=10).corrupt(torch.zeros(500, 8, dtype=torch.long))
    assert (m.chosen.sum(dim=1) >= 1).all()


def test_mlm_loss_counts_only_the_chosen_positions() -> None:
    obj = build_objective(MLMSpec(mask_prob=0.3), ENC)
    model = build_model(ENC, objective=MLMSpec())
    batch = {"tokens": tokens(b=4, t=17)}  # packed as seq_len + 1: cut to 16
    torch.manual_seed(4)
    out = obj.forward(model, batch)
    chosen = out["chosen"]
    assert chosen.shape == (4, 16) and 0 < chosen.sum() < chosen.numel()
    result = obj.loss(out, batch)
    targets = batch["tokens"][:, :16]
    expected = nn.functional.cross_entropy(out["logits"][chosen], targets[chosen])
    assert torch.allclose(result.loss, expected) and result.num_tokens == int(chosen.sum())
    scrambled = out["logits"].detach().clone()
    scrambled[~chosen] = torch.randn_like(scrambled[~chosen]) * 100
    same = obj.loss({"logits": scrambled, "chosen": chosen}, batch)
    assert torch.allclose(same.loss, result.loss) and torch.equal(same.metrics["acc"], result.metrics["acc"])
    scrambled[chosen] += 1.0 * torch.randn_like(scrambled[chosen])
    assert not torch.allclose(obj.loss({"logits": scrambled, "chosen": chosen}, batch).loss, result.loss)


def test_mlm_masks_the_same_way_from_the_same_rng_state() -> None:
    obj = MLM(mask_prob=0.15, mask_id=257, vocab_size=258)
    x = torch.randint(0, 257, (8, 64))
    torch.manual_seed(5)
    a = obj.corrupt(x)
    torch.manual_seed(5)
    b = obj.corrupt(x)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.chosen, b.chosen)


def test_mlm_needs_an_encoder() -> None:
    with pytest.raises(TemperError, match="needs an encoder model"):
        build_objective(MLMSpec(), GPTSpec())


# ----------------------------------------------------------------------------- LSTM / GRU


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_recurrent_classify_shapes(kind, bidirectional) -> None:
    spec = RecurrentSpec(kind=kind, vocab_size=40, seq_len=16, d_model=8, hidden_size=12, n_layer=2,
                         bidirectional=bidirectional, num_classes=5)
    model = build_model(spec, objective=ClassifySpec())
    assert isinstance(model, Recurrent) and isinstance(model.blocks, nn.ModuleList) and len(model.blocks) == 1
    assert model(tokens()).shape == (3, 5) and model(tokens(), head="classify").shape == (3, 5)
    assert model.heads["classify"].in_features == 12 * (2 if bidirectional else 1)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_bidirectional_summary_is_forward_last_step_and_backward_first_step(kind) -> None:
    spec = RecurrentSpec(kind=kind, vocab_size=40, seq_len=16, d_model=8, hidden_size=6, bidirectional=True)
    model = build_model(spec, objective=ClassifySpec()).eval()
    x = tokens()
    emb = model.tok_emb(x)
    one_way = {"lstm": nn.LSTM, "gru": nn.GRU}[kind](8, 6, batch_first=True)
    with torch.no_grad():
        feats = model.features(x)
        for suffix, inputs, take in (("", emb, -1), ("_reverse", emb.flip(1), -1)):
            for name, param in one_way.named_parameters():
                param.copy_(getattr(model.rnn, name + suffix))
            direction = one_way(inputs)[0][:, take]
            half = feats[:, :6] if suffix == "" else feats[:, 6:]
            assert torch.allclose(half, direction, atol=1e-6), suffix


@pytest.mark.parametrize("spec", [
    RecurrentSpec(kind="lstm", vocab_size=40, seq_len=16, hidden_size=16, n_layer=2, bidirectional=True),
    RecurrentSpec(kind="gru", vocab_size=40, seq_len=16, hidden_size=16),
    ENC,
], ids=["lstm", "gru", "encoder"])
def test_deterministic_init_is_equal_across_builds_and_depends_on_the_seed(spec) -> None:
    objective = ClassifySpec()
    builds = []
    for torch_seed, seed in ((0, 7), (1, 7), (0, 8)):
        torch.manual_seed(torch_seed)  # a different construction-time RNG must not matter
        model = build_model(spec, objective=objective)
        apply_deterministic_init(model, seed=seed)
        builds.append(model.state_dict())
    assert all(torch.equal(builds[0][k], builds[1][k]) for k in builds[0])
    assert not all(torch.equal(builds[0][k], builds[2][k]) for k in builds[0] if builds[0][k].is_floating_point())
    if isinstance(spec, RecurrentSpec):
        bound = 1 / spec.hidden_size ** 0.5
        rnn = [v for k, v in builds[0].items() if k.startswith("blocks.0.")]
        assert rnn and all(v.abs().max() <= bound for v in rnn)
    else:
        assert isinstance(build_model(spec, objective=objective), Encoder)


# ------------------------------------------------------------------------ pystdlib-packages


@pytest.fixture(scope="module")
def packages(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pkg") / "out"
    pack("pystdlib-packages", out, fmt="pystdlib-packages", limit=3, seq_len=32, shard_size=10)
    return out


def test_pystdlib_packages_writes_balanced_labelled_splits(packages) -> None:
    for split in ("train", "eval"):
        m = Manifest.load(packages / split)
        assert m.extras["split"] == split and m.extras["classes"] == list(STDLIB_PACKAGES)
        assert m.extras["num_classes"] == len(STDLIB_PACKAGES) == 8
        assert m.keys == {"cls": "int", "tokens.npy": "uint16[33]"} and m.num_samples == 8 * 3
        labels = [int(s["cls"]) for s in wds.WebDataset(m.shard_urls(packages / split), shardshuffle=False).decode()]
        assert sorted(labels) == sorted(list(range(8)) * 3)
        assert m.extras["class_counts"] == dict.fromkeys(STDLIB_PACKAGES, 3)


def test_pystdlib_packages_splits_by_file(packages) -> None:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = {s: Manifest.load(packages / s).extras["files"] for s in ("train", "eval")}
    assert files["train"] and files["eval"] and not set(files["train"]) & set(files["eval"])
    for split in ("train", "eval"):
        m = Manifest.load(packages / split)
        texts = {name: (root / name).read_bytes() for name in files[split]}
        for sample in wds.WebDataset(m.shard_urls(packages / split), shardshuffle=False).decode():
            window = bytes(sample["tokens.npy"].astype("uint8").tolist())  # byte ids < 256: no EOS
            package = STDLIB_PACKAGES[int(sample["cls"])]
            homes = [n for n, text in texts.items() if window in text]
            # The window comes from a file of its own split and of its labelled package (short
            # windows may also occur elsewhere: boilerplate, indentation runs).
            assert any(n.split("/")[0] == package for n in homes), (split, package, homes)
