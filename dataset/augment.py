"""The few-shot augmentation: each support image in 11 views (4 rotations, 4 translations, 2 flips), as the
reference's utils.augment."""

import math

import torch
import torch.nn.functional as F

VIEWS = 11  # views per image; of k images, view j of image i is row j * k + i of augment's output


def _warp(x: torch.Tensor, matrix: list[list[torch.Tensor]]) -> torch.Tensor:
    """Affine warp of x [N, C, H, W] by one float32 2x3 matrix, bilinear, reflection padding, align_corners
    False."""
    theta = torch.tensor(matrix, dtype=torch.float32).expand(x.shape[0], 2, 3)  # [N, 2, 3]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def rotate(x: torch.Tensor, angle: float) -> torch.Tensor:
    # the angle is rounded to float32 before cos/sin, as the reference's float32 matrices
    t = torch.tensor(angle, dtype=torch.float32)
    c, s = float(torch.cos(t)), float(torch.sin(t))
    return _warp(x, [[c, -s, 0.0], [s, c, 0.0]])


def translate(x: torch.Tensor, dx: float, dy: float) -> torch.Tensor:
    return _warp(x, [[1.0, 0.0, dx], [0.0, 1.0, dy]])


def augment(images: torch.Tensor, masks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """k images [k, C, H, W] -> 11k: originals, 4 rotations, 4 translations, h-flip, v-flip (blocks in this
    order).

    Masks get the same warps (so they become fractional; training binarises them at 0.5); without masks,
    zeros.
    """
    images = images.float()

    def views(x):
        return [
            x,
            *(rotate(x, a) for a in (-math.pi / 8, -math.pi / 16, math.pi / 16, math.pi / 8)),
            *(translate(x, dx, dy) for dx, dy in ((0.1, 0.1), (-0.1, 0.1), (-0.1, -0.1), (0.1, -0.1))),
            x.flip(-1),
            x.flip(-2),
        ]

    out = torch.cat(views(images))  # [VIEWS * k, C, H, W]
    if masks is None:
        return out, torch.zeros(out.shape[0], 1, *out.shape[2:])
    return out, torch.cat(views(masks.float()))
