"""ResNet for image classification (He et al. 2015), BasicBlock or Bottleneck.

Pure single-device model: no parallelism code. `ResNet.blocks` lists every residual block
in order (stage boundaries are the blocks with stride 2), so strategies can wrap per block.
Small images (image_size <= 64) get a CIFAR-style 3x3 stem; larger ones the ImageNet
7x7/2 stem plus max-pool.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from temper.models.base import HEADS, TaskModel, mlp_head
from temper.spec.job import ResNetSpec

#: Images at most this many pixels wide get the CIFAR-style stem (3x3, stride 1, no pool).
CIFAR_STEM_MAX_SIZE = 64


def _conv_bn(c_in: int, c_out: int, *, kernel: int, stride: int = 1) -> list[nn.Module]:
    conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False)
    return [conv, nn.BatchNorm2d(c_out)]


class BasicBlock(nn.Module):
    """Two 3x3 convs; output channels = width."""

    expansion = 1

    def __init__(self, c_in: int, width: int, *, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(c_in, width, kernel=3, stride=stride)
        self.conv2, self.bn2 = _conv_bn(width, width, kernel=3)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(c_in, width, stride=stride)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    @staticmethod
    def macs(c_in: int, width: int, *, size: int, stride: int) -> int:
        """Conv MACs of one block whose input is size x size."""
        out = math.ceil(size / stride)
        macs = _conv_macs(c_in, width, kernel=3, out_size=out)
        macs += _conv_macs(width, width, kernel=3, out_size=out)
        return macs + _shortcut_macs(c_in, width, out_size=out, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (strided) -> 1x1 expand; output channels = 4 * width."""

    expansion = 4

    def __init__(self, c_in: int, width: int, *, stride: int) -> None:
        super().__init__()
        c_out = width * self.expansion
        self.conv1, self.bn1 = _conv_bn(c_in, width, kernel=1)
        self.conv2, self.bn2 = _conv_bn(width, width, kernel=3, stride=stride)
        self.conv3, self.bn3 = _conv_bn(width, c_out, kernel=1)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(c_in, c_out, stride=stride)

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    @staticmethod
    def macs(c_in: int, width: int, *, size: int, stride: int) -> int:
        """Conv MACs of one block whose input is size x size."""
        out, c_out = math.ceil(size / stride), width * Bottleneck.expansion
        macs = _conv_macs(c_in, width, kernel=1, out_size=size)
        macs += _conv_macs(width, width, kernel=3, out_size=out)
        macs += _conv_macs(width, c_out, kernel=1, out_size=out)
        return macs + _shortcut_macs(c_in, c_out, out_size=out, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


def _shortcut(c_in: int, c_out: int, *, stride: int) -> nn.Module:
    """Identity, or 1x1 conv + BN where the shape changes."""
    if stride == 1 and c_in == c_out:
        return nn.Identity()
    return nn.Sequential(*_conv_bn(c_in, c_out, kernel=1, stride=stride))


def _shortcut_macs(c_in: int, c_out: int, *, out_size: int, stride: int) -> int:
    if stride == 1 and c_in == c_out:
        return 0
    return _conv_macs(c_in, c_out, kernel=1, out_size=out_size)


BLOCK_TYPES: dict[str, type[BasicBlock] | type[Bottleneck]] = {
    "basic": BasicBlock,
    "bottleneck": Bottleneck,
}


class ResNet(TaskModel):
    """forward(images [B, in_channels, H, W], head="classify") -> logits [B, num_classes];
    head="proj" (objective simclr) -> projections [B, proj_dim]. `features` is the pooled
    last stage [B, width]."""

    def __init__(self, spec: ResNetSpec, *, objective=None) -> None:
        super().__init__()
        self.spec = spec
        block_cls = BLOCK_TYPES[spec.block]
        self.stem = _build_stem(spec)
        blocks: list[nn.Module] = []
        c_in = spec.base_width
        for stage, depth in enumerate(spec.layers):
            width = spec.base_width * 2**stage
            for i in range(depth):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(block_cls(c_in, width, stride=stride))
                c_in = width * block_cls.expansion
        self.blocks = nn.ModuleList(blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.width = c_in
        kind = getattr(objective, "kind", "classify")
        if kind == "simclr":
            heads = {"proj": mlp_head(c_in, objective.proj_hidden or c_in, objective.proj_dim)}
        else:
            heads = {"classify": nn.Linear(c_in, spec.num_classes)}
        self.heads = nn.ModuleDict(heads)
        self._forward_flops: int | None = None
        self.init_weights()

    @torch.no_grad()
    def init_parameter(
        self, name: str, tensor: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> None:
        """Kaiming-normal convs, BN (1, 0), zero gamma on each branch's last BN, nn.Linear's
        default for the classifier, heads' rule for the other heads; from `generator`."""
        owner_name, _, attr = name.rpartition(".")
        owner = self.get_submodule(owner_name)
        if name.startswith(HEADS) and not isinstance(owner, nn.Linear):
            self.init_head_parameter(name, tensor, generator=generator)
        elif isinstance(owner, nn.Conv2d):
            fan_out = tensor.shape[0] * tensor[0][0].numel()
            tensor.normal_(0.0, math.sqrt(2.0 / fan_out), generator=generator)
        elif isinstance(owner, nn.BatchNorm2d):
            last = attr == "weight" and any(owner is b.last_bn for b in self.blocks)
            tensor.fill_(1.0 if attr == "weight" and not last else 0.0)
        elif isinstance(owner, nn.Linear):  # nn.Linear.reset_parameters: U(+-1/sqrt(fan_in))
            bound = 1.0 / math.sqrt(owner.in_features)
            tensor.uniform_(-bound, bound, generator=generator)

    def forward(self, images: torch.Tensor, head: str = "classify") -> torch.Tensor:
        return self.heads[head](self.features(images))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stem(images)
        for block in self.blocks:
            x = block(x)
        return torch.flatten(self.pool(x), 1)

    def forward_flops_per_sample(self) -> int:
        """2 x MACs of every conv and linear layer for one image, the head the objective uses
        included (cached; BN, ReLU, pooling and additions are not counted)."""
        if self._forward_flops is None:
            backbone = forward_macs(self.spec) - self.width * self.spec.num_classes  # without the classifier
            head = sum(m.in_features * m.out_features for m in self.heads.modules() if isinstance(m, nn.Linear))
            self._forward_flops = 2 * (backbone + head)
        return self._forward_flops

    def train_flops_per_sample(self) -> int:
        """Training FLOPs for one image: forward + backward = 3 x forward (FlopCounterMode's
        convention). Under SimCLR a sample is two views, each run forward and backward."""
        views = 2 if "proj" in self.heads else 1
        return 3 * views * self.forward_flops_per_sample()


def _build_stem(spec: ResNetSpec) -> nn.Sequential:
    if spec.image_size <= CIFAR_STEM_MAX_SIZE:
        return nn.Sequential(
            *_conv_bn(spec.in_channels, spec.base_width, kernel=3), nn.ReLU(inplace=True)
        )
    return nn.Sequential(
        *_conv_bn(spec.in_channels, spec.base_width, kernel=7, stride=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
    )


def _conv_macs(c_in: int, c_out: int, *, kernel: int, out_size: int) -> int:
    return out_size * out_size * c_out * c_in * kernel * kernel


def forward_macs(spec: ResNetSpec) -> int:
    """MACs of one forward pass, computed from the spec alone (mirrors ResNet.__init__).

    Every conv pads kernel // 2 and every pool is 3/2/1, so a stride-s layer maps size
    H to ceil(H / s). Unit tests check this against a forward-hook count.
    """
    block_cls = BLOCK_TYPES[spec.block]
    size, c_in = spec.image_size, spec.base_width
    if size <= CIFAR_STEM_MAX_SIZE:
        macs = _conv_macs(spec.in_channels, c_in, kernel=3, out_size=size)
    else:
        size = math.ceil(size / 2)
        macs = _conv_macs(spec.in_channels, c_in, kernel=7, out_size=size)
        size = math.ceil(size / 2)  # max-pool
    for stage, depth in enumerate(spec.layers):
        width = spec.base_width * 2**stage
        for i in range(depth):
            stride = 2 if stage > 0 and i == 0 else 1
            macs += block_cls.macs(c_in, width, size=size, stride=stride)
            size, c_in = math.ceil(size / stride), width * block_cls.expansion
    return macs + c_in * spec.num_classes
