"""Models: shapes, deterministic init, causal masking, FLOP formulas, registry."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from temper.errors import TemperError
from temper.models import MODEL_BUILDERS, build_model
from temper.models.gpt import GPT
from temper.models.resnet import Bottleneck, ResNet, forward_macs
from temper.spec import GPTSpec, ResNetSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")


TINY_GPT = GPTSpec(vocab_size=50, seq_len=16, n_layer=2, n_head=2, d_model=16, mlp_ratio=2.0)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------- GPT


def test_gpt_logits_shape_and_blocks() -> None:
    model = GPT(TINY_GPT)
    logits = model(torch.randint(0, 50, (3, 16)))
    assert logits.shape == (3, 16, 50) and logits.dtype == torch.float32
    assert isinstance(model.blocks, nn.ModuleList) and len(model.blocks) == 2
    names = {n for n, _ in model.blocks[0].named_modules()}
    assert {"attn.q", "attn.k", "attn.v", "attn.proj", "mlp.fc", "mlp.proj"} <= names
    assert model.blocks[0].mlp.fc.out_features == 32  # int(mlp_ratio * d_model)


def test_gpt_shorter_input_ok_longer_rejected() -> None:
    model = GPT(TINY_GPT)
    assert model(torch.zeros(1, 5, dtype=torch.long)).shape == (1, 5, 50)
    with pytest.raises(TemperError, match="model.seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_gpt_init_is_deterministic_and_follows_the_scheme() -> None:
    torch.manual_seed(3)
    a = _state(GPT(TINY_GPT))
    torch.manual_seed(3)
    b = _state(GPT(TINY_GPT))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(4)
    assert not torch.equal(GPT(TINY_GPT).tok_emb.weight, a["tok_emb.weight"])
    # init_weights alone re-initializes every parameter from the RNG
    model = GPT(TINY_GPT)
    torch.manual_seed(5)
    model.init_weights()
    c = _state(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    torch.manual_seed(5)
    model.init_weights()
    assert all(torch.equal(c[k], v) for k, v in model.state_dict().items())
    blk = model.blocks[1]
    assert torch.all(blk.attn.q.bias == 0) and torch.all(blk.mlp.proj.bias == 0)
    assert torch.all(blk.ln1.weight == 1) and torch.all(blk.ln1.bias == 0)
    assert torch.all(model.ln_f.weight == 1)


def test_gpt_init_std_scales_residual_projections() -> None:
    spec = GPTSpec(vocab_size=64, seq_len=8, n_layer=8, n_head=4, d_model=256)
    torch.manual_seed(0)
    model = GPT(spec)
    assert model.blocks[0].mlp.fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    expected = 0.02 / math.sqrt(2 * spec.n_layer)
    assert model.blocks[0].mlp.proj.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert model.blocks[0].attn.proj.weight.std().item() == pytest.approx(expected, rel=0.05)


def test_gpt_tied_and_untied_embeddings() -> None:
    tied = GPT(TINY_GPT)
    assert tied.head.weight is tied.tok_emb.weight
    untied = GPT(TINY_GPT.model_copy(update={"tie_embeddings": False}))
    assert untied.head.weight is not untied.tok_emb.weight
    assert untied.num_params() - tied.num_params() == 50 * 16


def test_gpt_is_causal() -> None:
    torch.manual_seed(0)
    model = GPT(TINY_GPT).eval()
    tokens = torch.randint(0, 50, (2, 16))
    changed = tokens.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 50
    a, b = model(tokens), model(changed)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def _gpt_param_count(s: GPTSpec, *, tied: bool) -> tuple[int, int]:
    """(total, position-embedding) parameters by hand."""
    d, h = s.d_model, int(s.mlp_ratio * s.d_model)
    attn = 4 * (d * d + d)
    mlp = d * h + h + h * d + d
    block = attn + mlp + 2 * 2 * d
    emb = s.vocab_size * d
    total = emb + s.seq_len * d + s.n_layer * block + 2 * d + (0 if tied else emb)
    return total, s.seq_len * d


def test_gpt_param_count_and_flops_by_hand() -> None:
    model = GPT(TINY_GPT)
    total, pos = _gpt_param_count(TINY_GPT, tied=True)
    assert model.num_params(non_embedding=False) == total
    assert model.num_params() == total - pos
    n = total - pos
    expected = 6 * n + 12 * 2 * 16 * 16  # 6N + 12 * n_layer * d_model * seq_len
    assert model.flops_per_token() == expected
    assert model.train_flops_per_sample() == expected * 16


def test_gpt_dropout_only_in_train_mode() -> None:
    model = GPT(TINY_GPT.model_copy(update={"dropout": 0.5}))
    tokens = torch.randint(0, 50, (2, 16))
    model.eval()
    assert torch.equal(model(tokens), model(tokens))
    model.train()
    assert not torch.allclose(model(tokens), model(tokens))


# -------------------------------------------------------------------------------- ResNet


@pytest.mark.parametrize(
    ("spec", "stem_stride"),
    [
        (ResNetSpec(num_classes=7, image_size=32, base_width=8), 1),
        (ResNetSpec(num_classes=5, in_channels=1, image_size=72, base_width=4, block="bottleneck",
                    layers=(1, 2, 1, 1)), 4),
    ],
)
def test_resnet_shapes_and_blocks(spec: ResNetSpec, stem_stride: int) -> None:
    model = ResNet(spec)
    size = spec.image_size
    out = model(torch.randn(2, spec.in_channels, size, size))
    assert out.shape == (2, spec.num_classes)
    assert len(model.blocks) == sum(spec.layers)
    stem_out = model.stem(torch.randn(1, spec.in_channels, size, size))
    assert stem_out.shape[-1] == math.ceil(size / stem_stride)
    expansion = 4 if spec.block == "bottleneck" else 1
    assert model.heads["classify"].in_features == spec.base_width * 8 * expansion


def test_resnet_init_is_deterministic_with_zero_last_bn() -> None:
    spec = ResNetSpec(block="bottleneck", base_width=4)
    torch.manual_seed(1)
    a = _state(ResNet(spec))
    torch.manual_seed(1)
    model = ResNet(spec)
    b = _state(model)
    assert all(torch.equal(a[k], b[k]) for k in a)
    for block in model.blocks:
        assert isinstance(block, Bottleneck)
        assert torch.all(block.bn3.weight == 0) and torch.all(block.bn1.weight == 1)
    assert torch.all(model.stem[1].weight == 1)


def _hook_forward_flops(model: nn.Module, spec: ResNetSpec) -> int:
    """Independent count: 2 x MACs of every conv / linear from a real forward pass."""
    macs = 0

    def hook(module, inputs, out):
        nonlocal macs
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            macs += out.numel() * module.in_channels // module.groups * kh * kw
        else:
            macs += out.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(torch.zeros(1, spec.in_channels, spec.image_size, spec.image_size))
    for h in handles:
        h.remove()
    return 2 * macs


def test_resnet_flops_by_hand_for_a_tiny_net() -> None:
    # 8x8 input, 1 channel, width 4, one basic block per stage, 3 classes.
    spec = ResNetSpec(num_classes=3, in_channels=1, image_size=8, base_width=4)
    model = ResNet(spec)
    macs = 64 * 4 * 1 * 9  # stem: 8x8 out, 4 ch, from 1 ch, 3x3
    macs += 2 * 64 * 4 * 4 * 9  # stage 1: two 3x3 convs 4->4 at 8x8
    size, c = 8, 4
    for _ in range(3):  # stages 2-4 halve the size, double the width, 1x1 shortcut conv
        size //= 2
        hw = size * size
        macs += hw * 2 * c * c * 9 + hw * 2 * c * 2 * c * 9 + hw * 2 * c * c
        c *= 2
    macs += c * 3  # head
    assert model.train_flops_per_sample() == 3 * 2 * macs


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_resnet_flops_match_a_forward_hook_count_and_leave_model_alone(block: str) -> None:
    spec = ResNetSpec(block=block, layers=(1, 2, 1, 1), base_width=8, image_size=72)
    model = ResNet(spec).train()
    before = _state(model)
    rng = torch.get_rng_state()
    flops = model.train_flops_per_sample()
    assert torch.equal(rng, torch.get_rng_state())
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert flops == 3 * _hook_forward_flops(model, spec)


def test_resnet50_and_18_flops_are_the_published_gmacs() -> None:
    r50 = ResNetSpec(flavor="resnet50", image_size=224, num_classes=1000)
    r18 = ResNetSpec(flavor="resnet18", image_size=224, num_classes=1000)
    assert forward_macs(r50) == pytest.approx(4.09e9, rel=0.01)
    assert forward_macs(r18) == pytest.approx(1.81e9, rel=0.01)


# ------------------------------------------------------------------------------ registry


def test_build_model_dispatches_on_kind() -> None:
    assert set(MODEL_BUILDERS) >= {"gpt", "resnet"}
    assert isinstance(build_model(TINY_GPT), GPT)
    assert isinstance(build_model(ResNetSpec(base_width=4)), ResNet)


def test_build_model_unknown_kind_is_a_temper_error() -> None:
    class Fake:
        kind = "nope"

    with pytest.raises(TemperError, match="model.kind 'nope'"):
        build_model(Fake())
