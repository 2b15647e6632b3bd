"""Image augmentations for `data.transform` (called per decoded sample in the loader's
workers as transform(sample, rng), rng a random.Random seeded by (seed, epoch, sample key)).

    data:
      transform: temper.data.augment:simclr_views

`simclr_views` replaces sample["image"] (float [C, H, W] in [0, 1]) by two views, "view1"
and "view2", each drawn independently:

- random resized crop: area 35-100% of the image, aspect ratio 3/4-4/3, resized back to H x W
  (bilinear), with a random rotation of up to +-15 degrees folded into the same affine
  sampling grid (outside the image reads 0);
- horizontal flip with probability 1/2, only for 3-channel images (digits and other
  one-channel images are not mirror-symmetric);
- brightness (x0.6-1.4) and contrast (x0.6-1.4 around the mean); for 3 channels also
  saturation (x0.6-1.4) and grayscale with probability 0.2;
- Gaussian noise of a std drawn from 0-0.05; the result is clipped to [0, 1].

Every random number comes from `rng`, so the views are the same for the same (seed, epoch,
key) on any machine, rank layout or resume.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

CROP_SCALE = (0.35, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
MAX_ROTATION_DEG = 15.0
JITTER = 0.4  # brightness, contrast, saturation factors in 1 +- JITTER
GRAYSCALE_P = 0.2
MAX_NOISE_STD = 0.05


@dataclass(frozen=True)
class ViewParams:
    """One view's random draws. Sizes are fractions of the image side; center in [-1, 1]."""

    width: float = 1.0
    height: float = 1.0
    cx: float = 0.0
    cy: float = 0.0
    angle: float = 0.0  # radians
    flip: bool = False
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    grayscale: bool = False
    noise_std: float = 0.0
    noise_seed: int = 0


def draw_view(rng: random.Random, *, channels: int) -> ViewParams:
    """Draw one view's parameters from `rng` (flip, saturation, grayscale only for C == 3)."""
    area = rng.uniform(*CROP_SCALE)
    ratio = math.exp(rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
    width, height = min(1.0, math.sqrt(area * ratio)), min(1.0, math.sqrt(area / ratio))
    cx, cy = rng.uniform(width - 1.0, 1.0 - width), rng.uniform(height - 1.0, 1.0 - height)
    angle = math.radians(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG))
    color = channels == 3
    flip = color and rng.random() < 0.5
    brightness, contrast = rng.uniform(1 - JITTER, 1 + JITTER), rng.uniform(1 - JITTER, 1 + JITTER)
    saturation = rng.uniform(1 - JITTER, 1 + JITTER) if color else 1.0
    grayscale = color and rng.random() < GRAYSCALE_P
    return ViewParams(width=width, height=height, cx=cx, cy=cy, angle=angle, flip=flip, brightness=brightness,
                      contrast=contrast, saturation=saturation, grayscale=grayscale,
                      noise_std=rng.uniform(0.0, MAX_NOISE_STD), noise_seed=rng.getrandbits(63))


def apply_view(image: torch.Tensor, params: ViewParams) -> torch.Tensor:
    """The view of `image` [C, H, W] described by `params`: same shape, values in [0, 1]."""
    c, h, w = image.shape
    cos, sin = math.cos(params.angle), math.sin(params.angle)
    sx = -params.width if params.flip else params.width
    theta = torch.tensor([[sx * cos, -params.height * sin, params.cx],
                          [sx * sin, params.height * cos, params.cy]], dtype=torch.float32)
    grid = F.affine_grid(theta[None], [1, c, h, w], align_corners=False)
    x = F.grid_sample(image[None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    x = x * params.brightness
    mean = x.mean()
    x = (x - mean) * params.contrast + mean
    if c == 3:
        gray = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]
        x = gray.expand(3, h, w).clone() if params.grayscale else gray + (x - gray) * params.saturation
    if params.noise_std > 0:
        gen = torch.Generator().manual_seed(params.noise_seed)
        x = x + params.noise_std * torch.randn(x.shape, generator=gen)
    return x.clamp(0.0, 1.0)


def simclr_views(sample: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """data.transform for SimCLR: "image" [C, H, W] -> "view1", "view2" (see the module doc)."""
    image = sample.pop("image")
    channels = image.shape[0]
    sample["view1"] = apply_view(image, draw_view(rng, channels=channels))
    sample["view2"] = apply_view(image, draw_view(rng, channels=channels))
    return sample
