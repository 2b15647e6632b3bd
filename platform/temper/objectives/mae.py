"""Masked autoencoding of images (He et al. 2021): MSE on the masked patches only, optionally
against each patch's pixels normalized by their own mean and variance (norm_pix_loss).
Evaluation logs a grid of originals, masked inputs and reconstructions."""

from __future__ import annotations

import torch
from torch import nn

from temper.objectives.base import EvalReport, Objective, ObjectiveOutput

#: Added to a patch's variance before the square root (MAE's).
NORM_PIX_EPS = 1e-6
#: Pixel value shown for the masked patches of the grid's middle row.
MASKED_GREY = 0.5


def patch_stats(target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each patch's mean and std, sqrt(var + eps) (unbiased var, as MAE), over its last dim."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return mean, (var + NORM_PIX_EPS).sqrt()


class MAE(Objective):
    """batch["image"]: float [B, C, H, W]; the model's head "mae" masks, encodes and decodes."""

    def __init__(self, *, mask_ratio: float = 0.75, norm_pix_loss: bool = True, grid_images: int = 8) -> None:
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.grid_images = grid_images

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return model(batch["image"], head="mae", mask_ratio=self.mask_ratio)

    def loss(self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> ObjectiveOutput:
        pred, mask, target = out["pred"].float(), out["mask"].float(), out["target"].float()
        if self.norm_pix_loss:
            mean, std = patch_stats(target)
            target = (target - mean) / std
        per_patch = (pred - target).pow(2).mean(dim=-1)
        loss = (per_patch * mask).sum() / mask.sum().clamp_min(1.0)
        images = batch["image"]
        return ObjectiveOutput(
            loss=loss, num_samples=images.shape[0],
            outputs={"pred": pred.detach(), "mask": mask.detach(), "target": out["target"].detach(),
                     "images": images.detach()},
        )

    def eval_report(self) -> EvalReport | None:
        return ReconstructionReport(self.grid_images, norm_pix_loss=self.norm_pix_loss) if self.grid_images else None


class ReconstructionReport(EvalReport):
    """Keeps the first `grid_images` images this rank evaluates; rank 0 draws its own (no
    collectives: every rank returns without waiting for another)."""

    def __init__(self, grid_images: int, *, norm_pix_loss: bool) -> None:
        self.grid_images = grid_images
        self.norm_pix_loss = norm_pix_loss
        self.kept: dict[str, list[torch.Tensor]] = {"pred": [], "mask": [], "target": [], "images": []}
        self.count = 0

    def update(self, out: ObjectiveOutput, batch: dict[str, torch.Tensor]) -> None:
        take = min(self.grid_images - self.count, out.outputs["images"].shape[0])
        if take <= 0:
            return
        for key, items in self.kept.items():
            items.append(out.outputs[key][:take].detach().float().cpu())
        self.count += take

    def finish(self, ctx) -> dict[str, bytes]:
        if not ctx.is_main or not self.count:
            return {}
        from temper.figures import image_grid_png

        kept = {k: torch.cat(v) for k, v in self.kept.items()}
        rows = reconstruction_rows(**kept, norm_pix_loss=self.norm_pix_loss)
        return {"reconstructions.png": image_grid_png(
            rows, row_titles=["original", "masked input", "reconstruction"],
            title=f"MAE reconstructions ({int(kept['mask'][0].sum())} of {kept['mask'].shape[1]} patches masked)")}


def reconstruction_rows(*, pred: torch.Tensor, mask: torch.Tensor, target: torch.Tensor, images: torch.Tensor,
                        norm_pix_loss: bool) -> list[list]:
    """Three rows of numpy images in [0, 1]: originals; masked inputs (masked patches grey);
    reconstructions (visible patches from the original, masked ones predicted; with
    norm_pix_loss the prediction is un-normalized with the original patch's own mean/std)."""
    from temper.models.vit import unpatchify

    channels = images.shape[1]
    pixels = pred
    if norm_pix_loss:
        mean, std = patch_stats(target)
        pixels = pred * std + mean
    masked = mask.bool().unsqueeze(-1)
    grey = torch.full_like(target, MASKED_GREY)
    inputs = unpatchify(torch.where(masked, grey, target), channels=channels)
    recon = unpatchify(torch.where(masked, pixels, target), channels=channels)
    return [[_picture(img) for img in batch] for batch in (images, inputs, recon)]


def _picture(image: torch.Tensor):
    """[C, H, W] -> a numpy [H, W] (one channel: the first unless three) or [H, W, 3] in [0, 1]."""
    image = image.clamp(0.0, 1.0)
    if image.shape[0] == 3:
        return image.permute(1, 2, 0).numpy()
    return image[0].numpy()
