"""Metrics: image AUROC / AP / F1-max, and pixel metrics streamed over chunks of score maps.

Pixel AUROC, AP and F1-max equal sklearn's on the flattened maps without holding the maps: the scores of one
class are kept sorted (float32, the minority class when only AUROC is asked) and the other class is streamed
past them. AUPRO is evaluated at a fixed number of FPR-spaced thresholds taken from the negatives (the usual
approximation).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from utils import BadValue

Chunks = Callable[[], Iterable[tuple]]  # chunks() -> fresh iterable of (scores [n,H,W], masks [n,H,W])
PIXEL_METRICS = ("auroc", "ap", "f1_max", "aupro")
_BLOCK = 1 << 18  # pixels handled at once: bounds every temporary to a few MB whatever the chunk size
_WINDOW = 1 << 23  # positives whose negative counts are held at once (uint32, 32 MB); more: more passes
_IMAGES = 8  # images labelled at once for AUPRO
_RADIX = (16, 8, 8)  # key bits resolved per pass when selecting thresholds
_EIGHT_IN_PLANE = np.zeros((3, 3, 3), bool)
_EIGHT_IN_PLANE[1] = True  # 8-connectivity inside each image, never across images of a [n, H, W] stack
_CHANGED = (
    "pixel_metrics: chunks() gave other data on a later pass; it must return a fresh iterable of the same "
    "chunks at every call"
)


def to_numpy(a) -> np.ndarray:
    if hasattr(a, "detach"):  # torch tensor, on any device
        a = a.detach().cpu()
        a = a.float() if str(a.dtype) == "torch.bfloat16" else a
        a = a.numpy()
    return np.asarray(a)


def _check_both_classes(n_pos: int, n_neg: int, what: str) -> None:
    if n_pos == 0 or n_neg == 0:
        raise BadValue(
            f"AUROC is undefined: the test set has only normal (or only abnormal) {what} "
            f"({n_pos} abnormal, {n_neg} normal); evaluate on a test set that has both"
        )


def _f1(precision, recall) -> np.ndarray:
    """F1 = 2pr / (p + r), 0 where p + r == 0."""
    denom = precision + recall
    return np.divide(2 * precision * recall, denom, out=np.zeros_like(denom, dtype=float), where=denom > 0)


def image_metrics(labels, scores) -> dict[str, float]:
    """AUROC, AP and F1-max (over the PR curve's thresholds) of image scores; labels > 0 are abnormal."""
    y = np.asarray(labels).reshape(-1) > 0
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"image_metrics: {y.size} labels but {s.size} scores; pass one score per test image")
    if np.isnan(s).any():
        raise ValueError("image_metrics: the scores contain NaN (min-max of constant scores?)")
    _check_both_classes(int(y.sum()), int((~y).sum()), "images")
    precision, recall, _ = precision_recall_curve(y, s)
    return {
        "auroc": float(roc_auc_score(y, s)),
        "ap": float(average_precision_score(y, s)),
        "f1_max": float(_f1(precision, recall).max()),
    }


def _maps(chunk) -> tuple[np.ndarray, np.ndarray]:
    """One chunk as numpy scores [n, H, W] and bool masks [n, H, W] (a channel dimension of 1 is dropped)."""
    scores, masks = (to_numpy(a) for a in chunk)
    scores = scores[:, 0] if scores.ndim == 4 and scores.shape[1] == 1 else scores
    masks = masks[:, 0] if masks.ndim == 4 and masks.shape[1] == 1 else masks
    if scores.ndim != 3 or scores.shape != masks.shape:
        raise ValueError(
            f"pixel_metrics: each chunk must be (scores [n,H,W], masks [n,H,W]) of one shape, got "
            f"{scores.shape} and {masks.shape}"
        )
    return scores, masks > 0  # the reference's (gt > 0)


def _blocks(chunks: Chunks) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Flat (scores, masks) pieces of at most _BLOCK pixels, chunk after chunk."""
    for chunk in chunks():
        scores, masks = _maps(chunk)
        scores, masks = scores.reshape(-1), masks.reshape(-1)  # [n*H*W]
        for i in range(0, scores.size, _BLOCK):
            yield scores[i : i + _BLOCK], masks[i : i + _BLOCK]


def _count(chunks: Chunks) -> tuple[int, int, np.dtype]:
    """Pass 1: numbers of positive and negative pixels, and a dtype holding every score exactly."""
    n_pos = n_neg = 0
    dtype = np.dtype(np.float32)
    for s, m in _blocks(chunks):
        dtype = np.result_type(dtype, s.dtype)
        if s.dtype.kind == "f" and np.isnan(s).any():
            raise ValueError("pixel_metrics: the scores contain NaN (min-max of constant maps?)")
        k = int(np.count_nonzero(m))
        n_pos, n_neg = n_pos + k, n_neg + m.size - k
    return n_pos, n_neg, dtype


def _collect(chunks: Chunks, positive: bool, count: int, dtype) -> np.ndarray:
    """Pass 2: the sorted scores of one class (positive or negative pixels)."""
    out, filled = np.empty(count, dtype), 0
    for s, m in _blocks(chunks):
        x = s[m] if positive else s[~m]
        if filled + x.size > count:
            break
        out[filled : filled + x.size] = x
        filled += x.size
    if filled != count:
        raise ValueError(_CHANGED)
    out.sort()
    return out


def _scan(chunks: Chunks, stored: np.ndarray, positive: bool, dtype, window=None, n_streamed=0):
    """Stream one class past the sorted other: sum of #stored < x, sum of #stored == x, and, for
    r = #stored <= x, the counts of r in window [a, b)."""
    below = equal = 0
    hist = (
        None
        if window is None
        else np.zeros(window[1] - window[0], np.uint32 if n_streamed < 2**32 else np.uint64)
    )
    for s, m in _blocks(chunks):
        # sorted: searchsorted ~20x faster
        x = np.sort((s[m] if positive else s[~m]).astype(dtype, copy=False))
        right = np.searchsorted(stored, x, "right")  # [B] #stored <= x, nondecreasing
        tied = (right > 0) & (stored[np.maximum(right - 1, 0)] == x)
        ties = int((right[tied] - np.searchsorted(stored, x[tied], "left")).sum())
        below, equal = below + int(right.sum()) - ties, equal + ties
        if hist is not None:
            r = right[(right >= window[0]) & (right < window[1])] - window[0]
            if r.size:
                starts = np.flatnonzero(np.r_[True, r[1:] != r[:-1]])
                hist[r[starts]] += np.diff(np.r_[starts, r.size]).astype(hist.dtype)
    return below, equal, hist


def _pr_points(pos: np.ndarray, a: int, b: int, hist: np.ndarray, fp_above: int) -> Iterator[tuple]:
    """TP and FP at each distinct positive score pos[f], f in [a, b), highest first, _BLOCK positions at a
    time.

    hist[i] = #negatives x with r = #pos <= x equal to a + i; fp_above = #negatives with r >= b;
    FP(f) = #negatives >= pos[f] = #negatives with r > f.
    """
    for d in range(b, a, -_BLOCK):
        c = max(a, d - _BLOCK)
        # #neg, r >= c + i
        tail = np.r_[np.cumsum(hist[c - a : d - a][::-1], dtype=np.int64)[::-1], 0] + fp_above
        fp_above, hi = int(tail[0]), min(d, pos.size)
        if hi > c:
            # first of its ties
            start = np.r_[c == 0 or pos[c] != pos[c - 1], pos[c + 1 : hi] != pos[c : hi - 1]]
            f = c + np.flatnonzero(start)[::-1]
            if f.size:
                yield pos.size - f, tail[f - c + 1]


def _ap_f1(chunks: Chunks, pos: np.ndarray, n_neg: int, dtype, top_hist: np.ndarray) -> tuple[float, float]:
    """Exact AP (as sklearn's average_precision_score) and F1-max from TP / FP at each distinct positive
    score."""
    ap, f1_max, recall_prev, fp_above = 0.0, 0.0, 0.0, 0
    b = pos.size + 1
    while b > 0:  # windows of positions r = #positives <= score, from the top
        a = max(0, b - _WINDOW)
        hist = (
            top_hist
            if b == pos.size + 1
            else _scan(chunks, pos, positive=False, dtype=dtype, window=(a, b), n_streamed=n_neg)[2]
        )
        for tp, fp in _pr_points(pos, a, b, hist, fp_above):
            recall, precision = tp / pos.size, tp / (tp + fp)
            ap += float(np.sum(np.diff(np.r_[recall_prev, recall]) * precision))
            f1_max, recall_prev = max(f1_max, float(_f1(precision, recall).max())), float(recall[-1])
        fp_above += int(hist.sum())
        b = a
    if fp_above != n_neg:
        raise ValueError(_CHANGED)
    return ap, f1_max


def _keys(x: np.ndarray) -> np.ndarray:
    """float32 -> uint32 keys in the same order."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    return np.where(u >> 31 == 1, ~u, u | np.uint32(1 << 31))


def _from_keys(k: np.ndarray) -> np.ndarray:
    k = k.astype(np.uint32)
    return np.where(k >> 31 == 1, k & np.uint32(2**31 - 1), ~k).view(np.float32)


def _follow(k: np.ndarray, tables: list) -> tuple[np.ndarray, np.ndarray, int]:
    """Through the key bits resolved so far: each key's slot (prefix still searched), the keys kept, bits
    left."""
    slot, left = np.zeros(k.size, np.int64), 32
    for table, width in zip(tables, _RADIX):
        left -= width
        slot = table[(slot << width) | ((k >> left) & ((1 << width) - 1))]  # -1: prefix not searched
        k, slot = k[slot >= 0], slot[slot >= 0]
    return slot, k, left


def _select_negatives(chunks: Chunks, ranks: np.ndarray) -> np.ndarray:
    """The negatives' scores (as float32) of the given ascending 0-based ranks: radix selection on 16+8+8
    key bits, one streamed pass each, memory independent of the number of pixels."""
    slot_of, n_slots, tables = np.zeros(ranks.size, np.int64), 1, []
    rest, prefix = ranks.astype(np.int64), np.zeros(ranks.size, np.int64)
    for width in _RADIX:
        hist = np.zeros(n_slots << width, np.int64)  # [slots * 2**width]
        for s, m in _blocks(chunks):
            slot, k, left = _follow(_keys(s[~m]), tables)
            hist += np.bincount(
                (slot << width) | ((k >> (left - width)) & ((1 << width) - 1)), minlength=hist.size
            )
        cum = np.cumsum(hist.reshape(n_slots, 1 << width), axis=1)  # [slots, 2**width]
        digit = np.array(
            [np.searchsorted(cum[slot_of[i]], rest[i], "right") for i in range(ranks.size)], np.int64
        )
        rest -= np.where(digit > 0, cum[slot_of, np.maximum(digit - 1, 0)], 0)
        prefix = (prefix << width) | digit
        code, slot_of = np.unique((slot_of << width) | digit, return_inverse=True)
        tables.append(np.full(n_slots << width, -1, np.int64))
        tables[-1][code] = np.arange(code.size)
        n_slots = code.size
    return _from_keys(prefix)


def _fpr_thresholds(chunks: Chunks, n_neg: int, dtype, num: int, limit: float) -> np.ndarray:
    """Ascending thresholds: the negatives' scores at FPR k*limit/num (k = 1..num) and just above each (so the
    curve's corners are kept), plus one just past FPR = limit for the interpolation there."""
    top = np.ceil(np.arange(1, num + 1) * (limit * n_neg / num)).astype(np.int64)
    top = np.unique(np.clip(np.r_[top, int(np.floor(limit * n_neg)) + 1], 1, n_neg))  # ranks from the top
    t = _select_negatives(chunks, n_neg - top).astype(dtype)
    return np.unique(np.r_[t, np.nextafter(t, np.inf)])


def _area_to(fpr: np.ndarray, pro: np.ndarray, limit: float) -> float:
    """Trapezoidal area under pro(fpr) on [0, limit]; fpr ascending from 0, interpolated at limit."""
    j = int(np.searchsorted(fpr, limit, "right"))
    x, y = fpr[:j], pro[:j]
    if j < fpr.size:
        y_end = y[-1] + (pro[j] - y[-1]) * (limit - x[-1]) / (fpr[j] - x[-1])
        x, y = np.r_[x, limit], np.r_[y, y_end]
    return float(np.trapezoid(y, x))


def _aupro(chunks: Chunks, n_neg: int, dtype, num: int, limit: float) -> float:
    """Area under PRO(FPR) up to FPR = limit, divided by limit; regions = 8-connected components of each mask.

    The curve is evaluated at ~2*num FPR-spaced thresholds instead of every distinct score (the usual
    approximation; within about 0.5/num of the all-thresholds value, equal to it when limit * n_neg <= num).
    """
    t = _fpr_thresholds(chunks, n_neg, dtype, num, limit)
    below, pro = np.zeros(t.size, np.int64), np.zeros(t.size + 1)
    regions = 0
    for chunk in chunks():
        scores, masks = _maps(chunk)
        for i in range(0, len(scores), _IMAGES):
            s, m = scores[i : i + _IMAGES].astype(dtype, copy=False), masks[i : i + _IMAGES]
            below += np.searchsorted(np.sort(s[~m]), t, "left")  # negatives < each threshold
            labels, n = ndimage.label(m, structure=_EIGHT_IN_PLANE)  # [n_img, H, W], 1..n
            lab = labels[m]
            weight = 1.0 / np.bincount(lab)[lab]  # each region weighs 1 in the sum over regions
            pro += np.bincount(np.searchsorted(t, s[m], "right"), weights=weight, minlength=t.size + 1)
            regions += n
    fpr = (n_neg - below) / n_neg  # [T], thresholds ascending -> fpr descending
    pro = np.cumsum(pro[::-1])[::-1][1:] / regions  # a pixel with b thresholds <= its score counts at 0..b-1
    return _area_to(np.r_[0.0, fpr[::-1]], np.r_[0.0, pro[::-1]], limit) / limit


def pixel_metrics(
    chunks: Chunks, which: Iterable[str] = PIXEL_METRICS, num_thresholds: int = 1000, fpr_limit: float = 0.3
) -> dict[str, float]:
    """Pixel AUROC, AP, F1-max (exact, as sklearn on all pixels) and AUPRO over streamed chunks.

    chunks() must return a fresh iterable of (scores [n,H,W], masks [n,H,W]) numpy arrays or tensors (a
    channel dimension of 1 is allowed; masks > 0 are abnormal); 3 to 8 passes are made. Memory: the sorted
    float32 scores of the minority class (AUROC only) or of the positives (AP / F1-max; more than half the
    pixels only when positives are the majority), plus fixed buffers of at most ~50 MB; the maps themselves
    are never held.
    """
    which = tuple(which)
    if not callable(chunks):
        raise ValueError(
            "pixel_metrics: chunks must be a callable returning a fresh iterable of (scores, masks) "
            f"chunks (several passes are made), got {type(chunks).__name__}"
        )
    if not set(which) <= set(PIXEL_METRICS):
        raise ValueError(
            f"pixel_metrics: unknown metric(s) {sorted(set(which) - set(PIXEL_METRICS))}; choose "
            f"from {PIXEL_METRICS}"
        )
    if num_thresholds < 1 or not 0 < fpr_limit <= 1:
        raise ValueError(
            f"pixel_metrics: need num_thresholds >= 1 and 0 < fpr_limit <= 1, got {num_thresholds} "
            f"and {fpr_limit}"
        )
    n_pos, n_neg, dtype = _count(chunks)
    _check_both_classes(n_pos, n_neg, "pixels")
    out, curve = {}, "ap" in which or "f1_max" in which
    if curve or "auroc" in which:
        store_pos = curve or n_pos <= n_neg  # AP / F1 need the positives; AUROC alone the minority
        stored = _collect(chunks, store_pos, n_pos if store_pos else n_neg, dtype)
        window = (max(0, n_pos + 1 - _WINDOW), n_pos + 1) if curve else None
        below, equal, hist = _scan(chunks, stored, not store_pos, dtype, window, n_neg)
        u2 = 2 * n_pos * n_neg - 2 * below - equal if store_pos else 2 * below + equal  # 2 * Mann-Whitney U
        out["auroc"] = u2 / (2 * n_pos * n_neg)  # exact rational, rounded once
        if curve:
            out["ap"], out["f1_max"] = _ap_f1(chunks, stored, n_neg, dtype, hist)
        del stored
    if "aupro" in which:
        out["aupro"] = _aupro(chunks, n_neg, dtype, num_thresholds, fpr_limit)
    return {k: out[k] for k in which}
