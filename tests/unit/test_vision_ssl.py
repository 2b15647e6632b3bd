"""ViT, MAE, SimCLR and the SimCLR augmentations: shapes, masking, losses against hand
computations, determinism, the reconstruction grid, meta-device builds."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from temper.data.augment import ViewParams, apply_view, draw_view, simclr_views
from temper.models import MODEL_BUILDERS, build_model
from temper.models.init import apply_deterministic_init, materialize
from temper.models.vit import ViT, patchify, unpatchify
from temper.objectives import MAE, OBJECTIVE_BUILDERS, SimCLR, build_objective
from temper.objectives.mae import ReconstructionReport, reconstruction_rows
from temper.objectives.simclr import nt_xent
from temper.spec.job import ClassifySpec, MAESpec, SimCLRSpec, ViTSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPEC = ViTSpec(image_size=8, patch_size=2, in_channels=1, n_layer=2, n_head=2, d_model=16, mlp_ratio=2.0,
               num_classes=10)
N = SPEC.num_patches  # 16
MAE_SPEC = MAESpec(mask_ratio=0.75, decoder_dim=8, decoder_depth=1, decoder_heads=2)
SIMCLR_SPEC = SimCLRSpec(proj_dim=6, proj_hidden=12)


def _vit(objective=None, spec: ViTSpec = SPEC) -> ViT:
    torch.manual_seed(0)
    return ViT(spec, objective=objective)


# ----------------------------------------------------------------------------------- ViT


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_vit_classify_and_proj_shapes(pool: str) -> None:
    spec = SPEC.model_copy(update={"pool": pool})
    model = _vit(spec=spec)
    x = torch.rand(3, 1, 8, 8)
    assert model(x).shape == (3, 10) and model.features(x).shape == (3, 16)
    assert set(model.heads) == {"classify"} and isinstance(model.blocks, nn.ModuleList) and len(model.blocks) == 2
    names = {n for n, _ in model.blocks[0].named_modules()}
    assert {"attn.q", "attn.k", "attn.v", "attn.proj", "mlp.fc", "mlp.proj"} <= names  # the TP plan's names
    proj = _vit(SIMCLR_SPEC, spec=spec)
    assert set(proj.heads) == {"proj"} and proj(x, head="proj").shape == (3, 6)


def test_vit_pools_differ_and_attention_is_not_causal() -> None:
    model = _vit()
    x = torch.rand(2, 1, 8, 8)
    base = model.features(x)
    x2 = x.clone()
    x2[:, :, -2:, -2:] += 1.0  # the last patch: a causal model's [CLS] would not see it
    assert not torch.allclose(model.features(x2), base)


def test_vit_mae_head_shapes_and_mask_counts() -> None:
    model = _vit(MAE_SPEC)
    assert set(model.heads) == {"mae"}
    x = torch.rand(5, 1, 8, 8)
    out = model(x, head="mae", mask_ratio=0.75)
    assert out["pred"].shape == out["target"].shape == (5, N, 4) and out["mask"].shape == (5, N)
    assert out["mask"].sum(dim=1).tolist() == [round(N * 0.75)] * 5  # 12 masked per sample
    assert len({tuple(m.tolist()) for m in out["mask"]}) > 1  # each sample its own mask
    assert torch.equal(out["target"], patchify(x, 2))
    out = model(x, head="mae", mask_ratio=0.3)
    assert out["mask"].sum(dim=1).tolist() == [round(N * 0.3)] * 5


def test_vit_mae_masks_come_from_the_torch_rng_and_the_encoder_sees_only_visible_patches() -> None:
    model = _vit(MAE_SPEC).eval()
    x = torch.rand(3, 1, 8, 8)
    torch.manual_seed(7)
    a = model(x, head="mae")
    torch.manual_seed(7)
    b = model(x, head="mae")
    assert torch.equal(a["mask"], b["mask"]) and torch.equal(a["pred"], b["pred"])
    # Change only the masked patches' pixels: with the same mask the predictions cannot change.
    noise = torch.rand_like(a["target"]) * a["mask"].unsqueeze(-1)
    torch.manual_seed(7)
    c = model(unpatchify(a["target"] + noise, channels=1), head="mae")
    assert torch.equal(c["mask"], a["mask"]) and torch.allclose(c["pred"], a["pred"], atol=1e-6)
    # ...while changing a visible patch does change them.
    visible = (1 - a["mask"]).unsqueeze(-1)
    torch.manual_seed(7)
    d = model(unpatchify(a["target"] + visible, channels=1), head="mae")
    assert not torch.allclose(d["pred"], a["pred"], atol=1e-4)


def test_patchify_roundtrip_and_layout() -> None:
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    p = patchify(x, 2)
    assert p.shape == (2, 4, 12) and torch.equal(unpatchify(p, channels=3), x)
    # patch 1 is the top-right 2x2 block, flattened (row, col, channel)
    assert p[0, 1].tolist() == x[0, :, 0:2, 2:4].permute(1, 2, 0).reshape(-1).tolist()


@pytest.mark.parametrize("objective", [None, MAE_SPEC, SIMCLR_SPEC])
def test_vit_deterministic_init_is_independent_of_the_global_rng(objective) -> None:
    states = []
    for global_seed, seed in [(1, 5), (2, 5), (1, 6)]:
        torch.manual_seed(global_seed)
        model = ViT(SPEC, objective=objective)
        apply_deterministic_init(model, seed=seed)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not torch.equal(states[0]["pos_emb"], states[2]["pos_emb"])
    s = states[0]
    assert torch.all(s["blocks.0.ln1.weight"] == 1) and torch.all(s["ln_f.bias"] == 0)
    assert torch.all(s["blocks.1.attn.q.bias"] == 0) and torch.all(s["patch_embed.bias"] == 0)
    assert s["blocks.0.mlp.fc.weight"].std().item() == pytest.approx(0.02, rel=0.25)


@pytest.mark.parametrize("objective", [None, MAE_SPEC, SIMCLR_SPEC])
def test_vit_builds_on_meta_and_materializes(objective) -> None:
    with torch.device("meta"):
        model = build_model(SPEC, objective=objective)
    assert all(p.is_meta for p in model.parameters())
    assert model.train_flops_per_sample() > 0  # the loop asks before materializing
    materialize(model, device=torch.device("cpu"), seed=0)
    x = torch.rand(4, 1, 8, 8)
    head = {None: "classify", "mae": "mae", "simclr": "proj"}[getattr(objective, "kind", None)]
    out = model(x, head=head)
    values = out["pred"] if head == "mae" else out
    assert torch.isfinite(values).all()


def test_vit_train_flops_by_hand() -> None:
    d, h, t, n = 16, 32, N + 1, N
    block = 4 * (d * d + d) + (d * h + h) + (h * d + d) + 4 * d
    conv = d * 4 + d
    expected = 2 * (6 * block * t + 12 * d * t * t) + 6 * conv * n + 6 * (d * 10 + 10)
    assert _vit().train_flops_per_sample() == expected
    mae = _vit(MAE_SPEC)
    visible = 1 + N - 12
    dim = 8
    dec_block = 4 * (dim * dim + dim) + 2 * (dim * 16) + 16 + dim + 4 * dim  # decoder mlp: 2.0 x 8 = 16
    expected_mae = (2 * (6 * block * visible + 12 * d * visible**2) + 6 * conv * n
                    + 6 * dec_block * t + 12 * dim * t * t + 6 * (d * dim + dim) * visible + 6 * (dim * 4 + 4) * t)
    assert mae.train_flops_per_sample() == expected_mae


def test_registries_build_vit_mae_and_simclr() -> None:
    assert MODEL_BUILDERS["vit"] is ViT
    assert isinstance(build_model(SPEC, objective=ClassifySpec()), ViT)
    mae = build_objective(MAE_SPEC, SPEC)
    assert isinstance(mae, MAE) and mae.mask_ratio == 0.75 and mae.norm_pix_loss
    simclr = build_objective(SimCLRSpec(temperature=0.3), SPEC)
    assert isinstance(simclr, SimCLR) and simclr.temperature == 0.3
    assert {"mae", "simclr"} <= set(OBJECTIVE_BUILDERS)


# ----------------------------------------------------------------------------------- MAE


def _mae_out(b: int = 2, n: int = 4, dim: int = 4) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    target = torch.rand(b, n, dim)
    mask = torch.zeros(b, n)
    mask[0, 1] = mask[0, 3] = mask[1, 0] = 1
    return {"pred": torch.randn(b, n, dim), "mask": mask, "target": target}


def test_mae_loss_counts_masked_patches_only() -> None:
    out = _mae_out()
    batch = {"image": torch.zeros(2, 1, 4, 4)}
    m = out["mask"].bool().unsqueeze(-1)
    raw = MAE(norm_pix_loss=False)
    perfect = {**out, "pred": torch.where(m, out["target"], out["pred"] + 100.0)}  # visible: way off
    assert raw.loss(perfect, batch).loss.item() == pytest.approx(0.0, abs=1e-12)
    # by hand: mean over the 3 masked patches of each patch's mean squared error
    per_patch = ((out["pred"] - out["target"]) ** 2).mean(-1)
    hand = (per_patch[0, 1] + per_patch[0, 3] + per_patch[1, 0]) / 3
    res = raw.loss(out, batch)
    assert res.loss.item() == pytest.approx(hand.item(), rel=1e-6) and res.num_samples == 2
    assert set(res.outputs) == {"pred", "mask", "target", "images"}


def test_mae_norm_pix_loss_targets_each_patch_normalized() -> None:
    out = _mae_out()
    batch = {"image": torch.zeros(2, 1, 4, 4)}
    t = out["target"]
    normalized = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
    norm = MAE(norm_pix_loss=True)
    assert norm.loss({**out, "pred": normalized}, batch).loss.item() == pytest.approx(0.0, abs=1e-10)
    assert norm.loss({**out, "pred": t}, batch).loss.item() > 0.1  # raw pixels are not the target
    assert MAE(norm_pix_loss=False).loss({**out, "pred": normalized}, batch).loss.item() > 0.1


def test_mae_forward_passes_the_mask_ratio() -> None:
    seen = {}

    class Model(nn.Module):
        def forward(self, images, head, mask_ratio):
            seen.update(head=head, mask_ratio=mask_ratio, shape=tuple(images.shape))
            return {}

    MAE(mask_ratio=0.6).forward(Model(), {"image": torch.zeros(3, 1, 8, 8)})
    assert seen == {"head": "mae", "mask_ratio": 0.6, "shape": (3, 1, 8, 8)}


@pytest.mark.parametrize("norm_pix", [True, False])
def test_reconstruction_rows_mix_original_and_prediction(norm_pix: bool) -> None:
    images = torch.rand(2, 1, 4, 4)
    target = patchify(images, 2)
    mask = torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0]])
    t_mean, t_std = target.mean(-1, keepdim=True), (target.var(-1, keepdim=True) + 1e-6).sqrt()
    perfect = (target - t_mean) / t_std if norm_pix else target
    rows = reconstruction_rows(pred=perfect, mask=mask, target=target, images=images, norm_pix_loss=norm_pix)
    assert len(rows) == 3 and all(len(r) == 2 for r in rows)
    assert torch.allclose(torch.from_numpy(rows[2][0]), images[0, 0], atol=1e-5)  # perfect: the original
    rows = reconstruction_rows(pred=torch.zeros_like(target) + 0.9 if not norm_pix else torch.zeros_like(target),
                               mask=mask, target=target, images=images, norm_pix_loss=norm_pix)
    recon, masked_in = torch.from_numpy(rows[2][0]), torch.from_numpy(rows[1][0])
    assert torch.equal(recon[0:2, 2:4], images[0, 0, 0:2, 2:4])  # visible patch 1: the original
    assert torch.all(masked_in[0:2, 0:2] == 0.5) and torch.equal(masked_in[2:4, 0:2], images[0, 0, 2:4, 0:2])
    expect = t_mean[0, 0].expand(2, 2) if norm_pix else torch.full((2, 2), 0.9)  # zero prediction: the mean
    assert torch.allclose(recon[0:2, 0:2], expect, atol=1e-6)


def test_reconstruction_report_keeps_the_first_images_and_draws_on_main_only() -> None:
    model = _vit(MAE_SPEC)
    obj = MAE(mask_ratio=0.75, grid_images=5)
    report = obj.eval_report()
    assert isinstance(report, ReconstructionReport)
    first = torch.rand(3, 1, 8, 8)
    for images in (first, torch.rand(3, 1, 8, 8), torch.rand(3, 1, 8, 8)):
        report.update(obj(model, {"image": images}), {"image": images})
    assert report.count == 5 and torch.equal(report.kept["images"][0], first)
    assert report.finish(SimpleNamespace(is_main=False)) == {}
    files = report.finish(SimpleNamespace(is_main=True))
    assert list(files) == ["reconstructions.png"] and files["reconstructions.png"].startswith(b"\x89PNG")
    assert MAE(grid_images=0).eval_report() is None


# -------------------------------------------------------------------------------- SimCLR


def _reference_nt_xent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    """NT-Xent as written in the SimCLR paper, one anchor at a time."""
    z = torch.cat([F.normalize(z1, dim=1), F.normalize(z2, dim=1)]).double()
    n, b = z.shape[0], z1.shape[0]
    total = 0.0
    for i in range(n):
        j = (i + b) % n
        sims = [math.exp(float(z[i] @ z[k]) / t) for k in range(n) if k != i]
        total += -math.log(math.exp(float(z[i] @ z[j]) / t) / sum(sims))
    return total / n


def test_nt_xent_matches_the_paper_formula() -> None:
    torch.manual_seed(0)
    z1, z2 = torch.randn(5, 3), torch.randn(5, 3)
    out = torch.cat([z1, z2])
    res = SimCLR(temperature=0.5).loss(out, {"view1": torch.zeros(5, 1, 2, 2)})
    assert res.loss.item() == pytest.approx(_reference_nt_xent(z1, z2, 0.5), rel=1e-5)
    assert res.num_samples == 5 and set(res.metrics) == {"acc"}


def test_nt_xent_is_near_zero_for_aligned_separated_pairs() -> None:
    z = torch.eye(4)
    loss, acc = nt_xent(z, z.clone(), temperature=0.05)
    assert loss.item() < 1e-6 and acc.item() == 1.0
    loss_swapped, acc_swapped = nt_xent(z, z.flip(0), temperature=0.05)  # each positive is another image's view
    assert loss_swapped.item() > 10 and acc_swapped.item() == 0.0


def test_simclr_runs_one_forward_over_both_views() -> None:
    calls = []

    class Model(nn.Module):
        def forward(self, images, head):
            calls.append((head, images.clone()))
            return images.flatten(1)[:, :3]

    v1, v2 = torch.rand(4, 1, 2, 2), torch.rand(4, 1, 2, 2)
    res = SimCLR()(Model(), {"view1": v1, "view2": v2})
    assert len(calls) == 1 and calls[0][0] == "proj" and torch.equal(calls[0][1], torch.cat([v1, v2]))
    assert res.num_samples == 4 and 0.0 <= res.metrics["acc"].item() <= 1.0


# -------------------------------------------------------------------------- augmentation


def test_simclr_views_are_deterministic_per_rng_and_keep_shapes() -> None:
    image = torch.rand(1, 8, 8)
    a = simclr_views({"image": image.clone(), "label": 3}, random.Random(11))
    b = simclr_views({"image": image.clone(), "label": 3}, random.Random(11))
    c = simclr_views({"image": image.clone(), "label": 3}, random.Random(12))
    assert set(a) == {"view1", "view2", "label"} and a["label"] == 3
    assert a["view1"].shape == a["view2"].shape == (1, 8, 8)
    assert torch.equal(a["view1"], b["view1"]) and torch.equal(a["view2"], b["view2"])
    assert not torch.equal(a["view1"], c["view1"]) and not torch.equal(a["view1"], a["view2"])
    for v in (a["view1"], a["view2"]):
        assert v.min() >= 0.0 and v.max() <= 1.0
    rgb = simclr_views({"image": torch.rand(3, 6, 6)}, random.Random(1))
    assert rgb["view1"].shape == (3, 6, 6)


def test_flips_only_for_three_channels() -> None:
    gray = [draw_view(random.Random(s), channels=1) for s in range(200)]
    rgb = [draw_view(random.Random(s), channels=3) for s in range(200)]
    assert not any(p.flip for p in gray) and not any(p.grayscale for p in gray)
    assert 60 < sum(p.flip for p in rgb) < 140


def test_apply_view_identity_flip_and_crop() -> None:
    image = torch.rand(3, 6, 6)
    assert torch.allclose(apply_view(image, ViewParams()), image, atol=1e-6)
    assert torch.allclose(apply_view(image, ViewParams(flip=True)), image.flip(-1), atol=1e-6)
    # the top-left 3x3 quarter resized to 6x6 (bilinear); the outer ring differs by design: the
    # image's edge blends with the zero padding, the crop's edge with the pixels beyond it
    quarter = apply_view(image, ViewParams(width=0.5, height=0.5, cx=-0.5, cy=-0.5))
    expected = F.interpolate(image[None, :, :3, :3], size=(6, 6), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(quarter[:, 1:5, 1:5], expected[:, 1:5, 1:5], atol=1e-5)
    bright = apply_view(image * 0.5, ViewParams(brightness=1.5))
    assert torch.allclose(bright, image * 0.75, atol=1e-6)


def test_simclr_views_through_the_shard_loader(tmp_path) -> None:
    from temper.data.pack import pack
    from temper.data.webdataset import build_webdataset_data
    from temper.spec.job import JobSpec

    pack("digits", tmp_path / "digits", fmt="digits", shard_size=40, limit=80)
    spec = JobSpec.model_validate({
        "name": "d", "model": {"kind": "resnet", "flavor": "tiny", "in_channels": 1, "image_size": 8},
        "objective": {"kind": "simclr"},
        "data": {"kind": "webdataset", "train": str(tmp_path / "digits"), "num_workers": 0,
                 "transform": "temper.data.augment:simclr_views"},
        "train": {"micro_batch_size": 8}, "tracking": {"enabled": False},
    })
    batch = next(build_webdataset_data(spec, rank=0, world_size=1).train_batches())
    assert "image" not in batch
    assert batch["view1"].shape == batch["view2"].shape == (8, 1, 8, 8)
    assert not torch.equal(batch["view1"], batch["view2"])
    again = next(build_webdataset_data(spec, rank=0, world_size=1).train_batches())
    assert torch.equal(batch["view1"], again["view1"])
