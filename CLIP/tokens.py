"""The adapted ViT's output tokens as the losses (loss.py) and the scoring (mvfa/scoring.py) both read them:
patch tokens without the CLS token, their logits against text features, and the patch grid upsampled to
pixels. Token lists hold one tensor per adapted layer, [B, 1+HW, D] with the CLS token first."""

import torch
import torch.nn.functional as F


def patches(tokens: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per layer [B, 1+HW, D] -> [B, HW, D] (the CLS token dropped, here and nowhere else)."""
    return [t[:, 1:] for t in tokens]


def text_logits(unit_tokens: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """Unit-norm tokens [..., HW, D] x text features [D, 2] -> logits [..., HW, 2] at CLIP's scale 100."""
    return (100.0 * unit_tokens) @ text_features


def upsample(patch_values: torch.Tensor, size: int) -> torch.Tensor:
    """Patch values [B, HW, C] (row-major square grid) -> [B, C, size, size], bilinear with
    align_corners=True."""
    b, hw, c = patch_values.shape
    side = round(hw**0.5)
    grid = patch_values.permute(0, 2, 1).reshape(b, c, side, side)  # [B, C, g, g]
    return F.interpolate(grid, size=size, mode="bilinear", align_corners=True)
