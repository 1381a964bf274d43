"""MVFA's training losses: focal and dice on the zero-shot pixel map, BCE on the image score."""

import torch
import torch.nn.functional as F

from CLIP.tokens import patches, text_logits, upsample


def focal_loss(
    prob: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5
) -> torch.Tensor:
    """Focal loss on probabilities prob [N, C, H, W] against a {0,1} mask [N, H, W] or [N, 1, H, W].

    As the reference, exactly, for its numbers: the one-hot target is clamped to [smooth/(C-1), 1-smooth]
    *and* smooth is added to p_t; alpha is all ones.
    """
    n, c = prob.shape[:2]
    p = prob.reshape(n, c, -1).transpose(1, 2).reshape(-1, c)  # [N*HW, C]
    index = target.reshape(-1, 1).long()  # [N*HW, 1]
    one_hot = torch.zeros_like(p).scatter_(1, index, 1.0).clamp(smooth / (c - 1), 1.0 - smooth)
    pt = (one_hot * p).sum(1) + smooth  # [N*HW]
    return (-1 * torch.pow(1.0 - pt, gamma) * pt.log()).mean()


def dice_loss(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - mean over the batch of (2|P∩T| + 1) / (|P| + |T| + 1)."""
    n = target.shape[0]
    p, t = prob.reshape(n, -1), target.reshape(n, -1)
    dice = (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)
    return 1 - dice.sum() / n


def detection_loss(
    det_tokens: list[torch.Tensor],
    text_features: torch.Tensor,
    labels: torch.Tensor,
    bce_on_probability: bool = False,
) -> torch.Tensor:
    """Sum over layers of BCE-with-logits between the mean abnormal probability of the patches and the label.

    det_tokens: per layer [B, 1+HW, D]; labels [B] float. As the reference, the probability is passed where
    a logit is expected (a sigmoid on top of a probability), so the loss never goes below log(1 + e^-1) for an
    abnormal label; kept by default for its numbers. bce_on_probability=True (fix) takes the plain BCE of the
    probability instead, in fp32 outside autocast.
    """
    loss = 0
    for tokens in patches(det_tokens):  # [B, HW, D]
        score = (
            text_logits(tokens / tokens.norm(dim=-1, keepdim=True), text_features)
            .softmax(-1)[..., 1]
            .mean(-1)
        )
        if bce_on_probability:
            # BCE on probabilities is unsafe under autocast
            with torch.autocast(score.device.type, enabled=False):
                loss = loss + F.binary_cross_entropy(score.float(), labels.float())
        else:
            loss = loss + F.binary_cross_entropy_with_logits(score, labels)  # score [B]
    return loss


def segmentation_loss(
    seg_tokens: list[torch.Tensor], text_features: torch.Tensor, masks: torch.Tensor, img_size: int
) -> torch.Tensor:
    """Sum over layers of focal + dice between the upsampled zero-shot pixel probabilities and {0,1} masks
    [B, H, W]."""
    loss = 0
    for tokens in patches(seg_tokens):  # [B, HW, D]
        logits = text_logits(tokens / tokens.norm(dim=-1, keepdim=True), text_features)  # [B, HW, 2]
        prob = upsample(logits, img_size).softmax(dim=1)  # [B, 2, H, W]
        loss = loss + focal_loss(prob, masks) + dice_loss(prob[:, 1], masks)
    return loss
