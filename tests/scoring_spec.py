"""MVFA's scoring and training losses written out from their definition (mvfa/scoring.py,
mvfa/evaluation.py, loss.py, the reference's test and training code) in plain torch: the tests' expectations
of the product's scoring, built from the model's tokens and never from the functions under test.

Token lists hold one tensor per adapted layer, [B, 1+HW, D], the CLS token first; text features are [D, 2]
(normal, abnormal).
"""

import torch
import torch.nn.functional as F


def spec_logits(tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """[B, 1+HW, D] -> [B, HW, 2]: the patch tokens (CLS dropped) over their L2 norm, times 100, times the
    text features [D, 2]."""
    p = tokens[:, 1:]
    return (100.0 * (p / p.norm(dim=-1, keepdim=True))) @ text


def spec_image_score(det: list[torch.Tensor], text: torch.Tensor) -> torch.Tensor:
    """[B]: sum over the layers of the patches' mean abnormal probability (softmax over the 2 logits)."""
    total = torch.zeros(det[0].shape[0])
    for t in det:
        total = total + spec_logits(t, text).softmax(dim=-1)[..., 1].mean(dim=-1)
    return total


def spec_unit(rows: torch.Tensor) -> torch.Tensor:
    return rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-8)


def spec_distances(bank: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[B, HW]: 1 - the best cosine similarity of each patch to the memory rows [M, D], image by image."""
    return torch.stack([1 - torch.mm(bank, spec_unit(p).t()).amax(dim=0) for p in tokens[:, 1:]])


def spec_upsample(values: torch.Tensor, size: int) -> torch.Tensor:
    """Per-patch values [B, HW, C] of a square row-major grid -> [B, C, size, size], bilinear with the
    corners aligned."""
    b, hw, c = values.shape
    side = int(round(hw**0.5))
    grid = values.transpose(1, 2).reshape(b, c, side, side)
    return F.interpolate(grid, size=size, mode="bilinear", align_corners=True)


def spec_pixel_prob(tokens: torch.Tensor, text: torch.Tensor, size: int) -> torch.Tensor:
    """[B, 2, size, size]: the logits upsampled, softmax over the two channels."""
    return spec_upsample(spec_logits(tokens, text), size).softmax(dim=1)


def spec_zero_map(tokens: list[torch.Tensor], text: torch.Tensor, size: int) -> torch.Tensor:
    """[B, size, size]: the zero-shot map, the sum over the layers of the abnormal pixel probability."""
    return sum(spec_pixel_prob(t, text, size)[:, 1] for t in tokens)


def spec_few_map(bank: list[torch.Tensor], tokens: list[torch.Tensor], size: int) -> torch.Tensor:
    """[B, size, size]: the few-shot map, the sum over the layers of the upsampled distances to the layer's
    memory rows."""
    return sum(spec_upsample(spec_distances(m, t)[..., None], size)[:, 0] for m, t in zip(bank, tokens))


def spec_losses(
    seg: list[torch.Tensor], det: list[torch.Tensor], text: torch.Tensor, masks: torch.Tensor, labels
) -> tuple[torch.Tensor, torch.Tensor]:
    """(seg loss, det loss) of a training step. det: per layer, binary cross-entropy with logits between the
    mean abnormal probability (taken as a logit, as the reference) and the label, averaged over the batch.
    seg: per layer, focal (gamma 2; one-hot target clamped to [1e-5, 1 - 1e-5], 1e-5 added to p_t) plus dice
    (1 - mean of (2 |P T| + 1) / (|P| + |T| + 1)) of the upsampled pixel probabilities against masks > 0.5."""
    det_loss = torch.zeros(())
    for t in det:
        x = spec_logits(t, text).softmax(dim=-1)[..., 1].mean(dim=-1)  # [B]
        bce = labels * torch.log1p(torch.exp(-x)) + (1 - labels) * torch.log1p(torch.exp(x))
        det_loss = det_loss + bce.mean()
    target = (masks > 0.5).float().reshape(masks.shape[0], -1)  # [B, HW]
    seg_loss = torch.zeros(())
    for t in seg:
        prob = spec_pixel_prob(t, text, masks.shape[-1])  # [B, 2, H, W]
        p1 = prob[:, 1].reshape(len(target), -1)
        p0 = prob[:, 0].reshape(len(target), -1)
        hot1 = target.clamp(1e-5, 1 - 1e-5)
        hot0 = (1 - target).clamp(1e-5, 1 - 1e-5)
        pt = hot0 * p0 + hot1 * p1 + 1e-5
        focal = (-((1 - pt) ** 2) * pt.log()).mean()
        dice = 1 - ((2 * (p1 * target).sum(1) + 1) / (p1.sum(1) + target.sum(1) + 1)).mean()
        seg_loss = seg_loss + focal + dice
    return seg_loss, det_loss
