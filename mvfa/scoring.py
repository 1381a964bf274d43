"""MVFA's scoring maths as small pure functions, as the reference's few-shot and zero-shot tests compute
them: text logits, zero-shot and few-shot maps.

Token lists hold one tensor per adapted layer, [B, 1+HW, D] with the CLS token first; `patches` (in
CLIP/tokens.py, shared with the losses) drops it. Operation order follows the reference so that autocast
produces the same dtypes.
"""

import torch

from CLIP.tokens import patches, text_logits, upsample


def zero_shot_logits(tokens: list[torch.Tensor], text_features: torch.Tensor) -> list[torch.Tensor]:
    """Per layer: patch tokens normalised in place -> logits [B, HW, 2]. The reference's test normalises in
    place (under autocast the result stays fp16) where its training does not; both are kept for its dtypes."""
    out = []
    for t in patches(tokens):
        # the in-place division keeps the reference's dtype flow without touching the caller's tensor
        t = t.clone()
        t /= t.norm(dim=-1, keepdim=True)
        out.append(text_logits(t, text_features))
    return out


def zero_shot_image_score(logits: list[torch.Tensor]) -> torch.Tensor:
    """Sum over layers of the mean abnormal probability of the patches -> [B]."""
    score = 0
    for z in logits:
        score = score + z.softmax(dim=-1)[..., 1].mean(dim=-1)
    return score


def zero_shot_map(logits: list[torch.Tensor], size: int) -> torch.Tensor:
    """Sum over layers of the abnormal channel of softmax(upsampled logits) -> [B, size, size]."""
    total = 0
    for z in logits:
        total = total + upsample(z, size).softmax(dim=1)[:, 1]
    return total


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows divided by max(norm, 1e-8), as the reference's cos_sim."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-8)


def few_shot_distances(memory: list[torch.Tensor], tokens: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per layer: 1 - max cosine similarity of each patch to the memory bank -> [B, HW].

    memory: per layer unit rows [M, D] (support tokens; the reference keeps the CLS rows in its memory bank
    while its queries are patches only, kept for its numbers).
    min(1 - cos) equals 1 - max(cos) exactly, as float rounding of 1 - x is monotone.
    """
    out = []
    for mem, t in zip(memory, patches(tokens)):
        q = unit_rows(t)  # [B, HW, D]
        # one image at a time: [M, HW] per image as the reference (M is 11k * (1+HW) rows, too big to batch)
        cos_max = [torch.mm(mem, qi.t()).amax(dim=0) for qi in q]  # B x [HW]
        out.append(1 - torch.stack(cos_max))
    return out


def few_shot_map(distances: list[torch.Tensor], size: int) -> torch.Tensor:
    """Sum over layers (in order, as numpy's sum) of the upsampled distances -> [B, size, size]."""
    total = 0
    for d in distances:
        total = total + upsample(d.unsqueeze(-1), size)[:, 0]
    return total


def minmax(a: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """(a - lo) / (hi - lo): the reference's global normalisation over the whole test set, not per image,
    kept for its AUROCs."""
    return (a - lo) / (hi - lo)
