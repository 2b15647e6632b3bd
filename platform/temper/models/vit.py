"""Vision Transformer (Dosovitskiy et al. 2020) with the heads of classify, SimCLR and MAE.

Pure single-device model: no parallelism code. Patches come from a Conv2d with kernel and
stride `patch_size`; a learned [CLS] token and a learned position embedding are added; pre-norm
non-causal transformer blocks (`ViT.blocks`, what FSDP, activation checkpointing and compile
wrap) and a final LayerNorm follow. Attention and MLP use the GPT layer names (`attn.q`,
`attn.k`, `attn.v`, `attn.proj`, `mlp.fc`, `mlp.proj`), so tensor-parallel plans carry over.

Heads by objective: classify -> `heads.classify` (Linear on the [CLS] token or the patch mean),
simclr -> `heads.proj` (mlp_head), mae -> `heads.mae` (MAEDecoder, He et al. 2021: the encoder
sees only the visible patches; the decoder gets mask tokens for the rest).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from temper.models.base import TaskModel, mlp_head
from temper.spec.job import ViTSpec


class SelfAttention(nn.Module):
    """Multi-head self-attention over all tokens (`scaled_dot_product_attention`, not causal)."""

    def __init__(self, d_model: int, *, n_head: int, dropout: float) -> None:
        super().__init__()
        self.head_dim = d_model // n_head
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = dropout
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (lin(x).view(b, t, -1, self.head_dim).transpose(1, 2) for lin in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=False,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(b, t, -1)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x)) (GELU MLP)."""

    def __init__(self, d_model: int, *, n_head: int, mlp_ratio: float, dropout: float = 0.0) -> None:
        super().__init__()
        hidden = int(mlp_ratio * d_model)
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_head=n_head, dropout=dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential()
        self.mlp.add_module("fc", nn.Linear(d_model, hidden))
        self.mlp.add_module("act", nn.GELU())
        self.mlp.add_module("proj", nn.Linear(hidden, d_model))
        self.mlp.add_module("drop", nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class MAEDecoder(nn.Module):
    """Encoder tokens [B, 1 + visible, d_model] -> pixel predictions [B, N, patch_size**2 * C]."""

    def __init__(self, spec: ViTSpec, *, dim: int, depth: int, heads: int) -> None:
        super().__init__()
        n = spec.num_patches
        self.embed = nn.Linear(spec.d_model, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_emb = nn.Parameter(torch.zeros(1, n + 1, dim))
        self.blocks = nn.ModuleList(Block(dim, n_head=heads, mlp_ratio=spec.mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, spec.patch_size**2 * spec.in_channels)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.embed(latent)
        b, n = ids_restore.shape
        masked = self.mask_token.expand(b, n + 1 - x.shape[1], -1)
        patches = torch.cat([x[:, 1:], masked], dim=1)  # visible first, in shuffled order
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos_emb
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x))[:, 1:]


class ViT(TaskModel):
    """forward(images [B, C, H, W], head="classify") -> logits [B, num_classes]; head="proj"
    (objective simclr) -> projections [B, proj_dim]; head="mae" -> {"pred", "mask", "target"}
    (see `mae`). `features` is the image summary [B, d_model] ([CLS] or patch mean)."""

    def __init__(self, spec: ViTSpec, *, objective=None) -> None:
        super().__init__()
        self.spec = spec
        self.kind = getattr(objective, "kind", "classify")
        d, n = spec.d_model, spec.num_patches
        self.patch_embed = nn.Conv2d(spec.in_channels, d, spec.patch_size, stride=spec.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_emb = nn.Parameter(torch.zeros(1, n + 1, d))
        self.drop = nn.Dropout(spec.dropout)
        self.blocks = nn.ModuleList(
            Block(d, n_head=spec.n_head, mlp_ratio=spec.mlp_ratio, dropout=spec.dropout) for _ in range(spec.n_layer)
        )
        self.ln_f = nn.LayerNorm(d)
        self.mask_ratio = getattr(objective, "mask_ratio", 0.75)
        if self.kind == "simclr":
            heads: dict[str, nn.Module] = {"proj": mlp_head(d, objective.proj_hidden or d, objective.proj_dim)}
        elif self.kind == "mae":
            heads = {"mae": MAEDecoder(spec, dim=objective.decoder_dim, depth=objective.decoder_depth,
                                       heads=objective.decoder_heads)}
        else:
            heads = {"classify": nn.Linear(d, spec.num_classes)}
        self.heads = nn.ModuleDict(heads)
        self.init_weights()

    def init_backbone_parameter(
        self, name: str, tensor: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> None:
        """LayerNorm (1, 0), biases 0, and N(0, 0.02) for the patch embedding, [CLS], position
        embedding and every Linear weight. Deterministic from `generator`."""
        owner_name, _, attr = name.rpartition(".")
        owner = self.get_submodule(owner_name) if owner_name else self
        if isinstance(owner, nn.LayerNorm):
            tensor.fill_(1.0 if attr == "weight" else 0.0)
        elif attr == "bias":
            tensor.zero_()
        else:
            tensor.normal_(0.0, 0.02, generator=generator)

    def forward(self, images: torch.Tensor, head: str = "classify",
                mask_ratio: float | None = None) -> torch.Tensor | dict[str, torch.Tensor]:
        if head == "mae":
            return self.mae(images, mask_ratio=self.mask_ratio if mask_ratio is None else mask_ratio)
        return self.heads[head](self.features(images))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens with their position embedding, [B, N, d_model] (no [CLS])."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        return x + self.pos_emb[:, 1:]

    def encode(self, patches: torch.Tensor) -> torch.Tensor:
        """[CLS] + patch tokens [B, n, d_model] -> the final-normed states [B, 1 + n, d_model]."""
        cls = (self.cls_token + self.pos_emb[:, :1]).expand(patches.shape[0], -1, -1)
        x = self.drop(torch.cat([cls, patches], dim=1))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.encode(self.embed(images))
        return x[:, 0] if self.spec.pool == "cls" else x[:, 1:].mean(dim=1)

    def mae(self, images: torch.Tensor, *, mask_ratio: float) -> dict[str, torch.Tensor]:
        """Per-sample random masking (MAE: argsort of uniform noise from the global torch RNG,
        so a resumed run draws the same masks); the encoder sees the N - round(N * mask_ratio)
        visible patches, the decoder predicts every patch. Returns pred and target
        [B, N, patch_size**2 * C] (target: the patchified images) and mask [B, N] (1 = masked)."""
        x = self.embed(images)
        b, n, d = x.shape
        keep = max(1, n - round(n * mask_ratio))
        noise = torch.rand(b, n, device=images.device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        visible = torch.gather(x, 1, ids_shuffle[:, :keep].unsqueeze(-1).expand(-1, -1, d))
        pred = self.heads["mae"](self.encode(visible), ids_restore)
        mask = torch.ones(b, n, device=images.device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return {"pred": pred, "mask": mask, "target": patchify(images, self.spec.patch_size)}

    def train_flops_per_sample(self) -> int:
        """Training FLOPs for one image (or, under SimCLR, one image's two views), in
        FlopCounterMode's convention (see TransformerCounts in temper.models.gpt): 6 x (matmul
        parameters) x (tokens they see) plus the attention scores (12 x layers x width x
        tokens^2, not causal). Encoder tokens: 1 + N, or 1 + visible under MAE (the patch
        embedding still runs on all N patches); the MAE decoder sees 1 + N tokens.
        LayerNorm, GELU, softmax and embeddings' additions are not counted."""
        s, n = self.spec, self.spec.num_patches
        tokens = 1 + (max(1, n - round(n * self.mask_ratio)) if self.kind == "mae" else n)
        flops = _stack_flops(self.blocks, width=s.d_model, tokens=tokens)
        flops += 6 * _numel(self.patch_embed) * n
        if self.kind == "mae":
            dec: MAEDecoder = self.heads["mae"]
            dim = dec.embed.out_features
            flops += _stack_flops(dec.blocks, width=dim, tokens=n + 1)
            flops += 6 * _numel(dec.embed) * tokens + 6 * _numel(dec.pred) * (n + 1)
        else:
            flops += 6 * _numel(self.heads)  # applied once per image
        # SimCLR runs the model on both views of each sample (the loop counts samples, not views).
        return 2 * flops if self.kind == "simclr" else flops


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _stack_flops(blocks: nn.ModuleList, *, width: int, tokens: int) -> int:
    return 6 * _numel(blocks) * tokens + 12 * len(blocks) * width * tokens * tokens


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, N, p * p * C], patches row-major, each flattened as (p, p, C) (MAE's)."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, *, channels: int) -> torch.Tensor:
    """Inverse of patchify for square images: [B, N, p * p * C] -> [B, C, H, W]."""
    b, n, dim = patches.shape
    side = round(n**0.5)
    p = round((dim // channels) ** 0.5)
    x = patches.reshape(b, side, side, p, p, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(b, channels, side * p, side * p)
