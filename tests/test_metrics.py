"""mvfa/metrics.py: known answers, equality with sklearn over many chunkings,
AUPRO against an exact implementation."""

import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from mvfa import metrics
from mvfa.metrics import image_metrics, pixel_metrics, to_numpy


def _one(scores, masks):
    return lambda: [(scores, masks)]


def _chunked(scores, masks, size):
    return lambda: ((scores[i : i + size], masks[i : i + size]) for i in range(0, len(scores), size))


def _sklearn(scores, masks) -> dict:
    y, s = np.asarray(masks).reshape(-1), np.asarray(scores, np.float64).reshape(-1)
    p, r, _ = precision_recall_curve(y, s)
    f1 = np.where(p + r > 0, 2 * p * r / np.where(p + r > 0, p + r, 1), 0)
    return {"auroc": roc_auc_score(y, s), "ap": average_precision_score(y, s), "f1_max": f1.max()}


def _exact_aupro(scores, masks, limit=0.3) -> float:
    """Every distinct score as a threshold; PRO = mean over 8-connected regions of the covered fraction."""
    regions, neg = [], np.sort(scores[~masks])
    for s, m in zip(scores, masks):
        lab, n = ndimage.label(m, structure=np.ones((3, 3)))
        regions += [np.sort(s[lab == r]) for r in range(1, n + 1)]
    fpr, pro = [0.0], [0.0]
    for t in np.unique(scores)[::-1]:
        fpr.append((neg.size - np.searchsorted(neg, t)) / neg.size)
        pro.append(np.mean([(r.size - np.searchsorted(r, t)) / r.size for r in regions]))
    area = 0.0
    for x0, y0, x1, y1 in zip(fpr, pro, fpr[1:], pro[1:]):
        if x0 >= limit:
            break
        if x1 > limit:
            x1, y1 = limit, y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        area += (x1 - x0) * (y0 + y1) / 2
    return area / limit


def _random_maps(seed, n=7, h=9, w=11, levels=6, frac=0.3):
    """Scores rounded to a few values (many ties), blob-ish masks, positives scoring a bit higher."""
    rng = np.random.default_rng(seed)
    masks = ndimage.binary_dilation(rng.random((n, h, w)) < frac / 5, structure=np.ones((1, 3, 3)))
    scores = np.round((rng.random((n, h, w)) + 0.4 * masks) * levels) / levels
    return scores.astype(np.float32), masks


# ---- image metrics -----------------------------------------------------------------------------------------


def test_image_metrics_known_answers():
    y = np.array([0, 0, 1, 1, 0, 1])
    perfect = image_metrics(y, y * 0.7 + 0.1)
    assert perfect == {"auroc": 1.0, "ap": 1.0, "f1_max": 1.0}
    assert image_metrics(y, -y.astype(float))["auroc"] == 0.0
    assert image_metrics(y, np.full(6, 0.3))["auroc"] == 0.5
    assert image_metrics(y, np.full(6, 0.3))["f1_max"] == pytest.approx(2 * 0.5 / 1.5)  # p = 0.5, r = 1


def test_image_metrics_match_sklearn_with_ties():
    rng = np.random.default_rng(0)
    y = rng.random(200) < 0.3
    s = np.round(rng.random(200) + 0.3 * y, 1)
    got, ref = image_metrics(torch.tensor(y), s), _sklearn(s, y)
    for k in ref:
        assert got[k] == pytest.approx(ref[k], abs=1e-15)


def test_image_metrics_errors():
    with pytest.raises(ValueError, match="AUROC is undefined: the test set has only normal .* images"):
        image_metrics([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="3 labels but 2 scores"):
        image_metrics([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        image_metrics([0, 1], [np.nan, np.nan])


# ---- normalisation -----------------------------------------------------------------------------------------


# a numpy version of mvfa.scoring.minmax with its NaN warning, as the reference's numpy normalisation
def normalize_minmax(a, lo=None, hi=None) -> np.ndarray:
    """(a - min) / (max - min) over the whole array, in a's dtype (float16 stays float16: the reference's
    few-shot maps can be float16 arrays).

    lo / hi: the global min / max when a is one chunk of a larger set. max == min gives NaN as in the
    reference, with a warning.
    """
    a = to_numpy(a)
    lo = a.min() if lo is None else np.asarray(lo, dtype=a.dtype)
    hi = a.max() if hi is None else np.asarray(hi, dtype=a.dtype)
    if hi == lo:
        warnings.warn(
            f"normalize_minmax: all scores are equal ({lo}); the normalised scores are NaN as in the "
            "reference",
            RuntimeWarning,
            stacklevel=2,
        )
    with np.errstate(invalid="ignore", divide="ignore"):
        return (a - lo) / (hi - lo)


def test_normalize_minmax_values_dtype_and_chunks():
    a = np.array([[2.0, 4.0], [3.0, 6.0]], np.float16)
    out = normalize_minmax(a)
    assert out.dtype == np.float16 and out.tolist() == [[0.0, 0.5], [0.25, 1.0]]
    b = np.random.default_rng(0).random((5, 3, 4)).astype(np.float32)
    whole = normalize_minmax(b)
    parts = np.concatenate([normalize_minmax(b[i : i + 2], b.min(), b.max()) for i in range(0, 5, 2)])
    assert np.array_equal(whole, parts) and whole.dtype == np.float32


def test_normalize_minmax_constant_warns_and_gives_nan():
    with pytest.warns(RuntimeWarning, match="all scores are equal"):
        out = normalize_minmax(np.full((2, 3), 0.25, np.float32))
    assert np.isnan(out).all()


# ---- pixel metrics: known answers --------------------------------------------------------------------------


def test_pixel_perfect_inverted_constant():
    _, masks = _random_maps(1)
    perfect = pixel_metrics(_one(masks.astype(np.float32), masks))
    assert perfect == pytest.approx({"auroc": 1.0, "ap": 1.0, "f1_max": 1.0, "aupro": 1.0}, abs=1e-12)
    assert pixel_metrics(_one(-masks.astype(np.float32), masks), which=("auroc",)) == {"auroc": 0.0}
    const = pixel_metrics(_one(np.zeros(masks.shape, np.float32), masks))
    assert const["auroc"] == 0.5 and const["ap"] == pytest.approx(masks.mean(), abs=1e-15)


# ---- pixel metrics: equality with sklearn ------------------------------------------------------------------


@pytest.mark.parametrize("size", [7, 1, 3])  # one chunk, one image per chunk, a size that does not divide n
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pixel_metrics_match_sklearn(seed, size):
    scores, masks = _random_maps(seed)
    got, ref = (
        pixel_metrics(_chunked(scores, masks, size), which=("auroc", "ap", "f1_max")),
        _sklearn(scores, masks),
    )
    for k in ref:
        assert got[k] == pytest.approx(ref[k], abs=1e-12), k


def test_pixel_metrics_tiny_blocks_and_windows(monkeypatch):
    """Blocks and threshold windows much smaller than the data: many partial pieces, several AP passes."""
    monkeypatch.setattr(metrics, "_BLOCK", 13)
    monkeypatch.setattr(metrics, "_WINDOW", 5)
    monkeypatch.setattr(metrics, "_IMAGES", 2)
    scores, masks = _random_maps(3, levels=40)
    got, ref = pixel_metrics(_chunked(scores, masks, 3)), _sklearn(scores, masks)
    for k in ref:
        assert got[k] == pytest.approx(ref[k], abs=1e-12), k
    assert got["aupro"] == pytest.approx(_exact_aupro(scores, masks), abs=1e-12)


@pytest.mark.parametrize("which", [("auroc",), ("auroc", "ap", "f1_max")])
def test_pixel_metrics_positives_majority(which):
    """AUROC alone keeps the negatives (minority); AP / F1 keep the positives."""
    scores, masks = _random_maps(4, frac=3.0)
    assert masks.mean() > 0.6
    got, ref = pixel_metrics(_chunked(scores, masks, 2), which=which), _sklearn(scores, masks)
    for k in which:
        assert got[k] == pytest.approx(ref[k], abs=1e-12), k


def test_pixel_metrics_tensor_float16_and_channel_dim():
    scores, masks = _random_maps(5, levels=30)
    half = torch.from_numpy(scores).half()[:, None]  # [n, 1, H, W] float16, like the reference's maps
    got = pixel_metrics(lambda: [(half, torch.from_numpy(masks).float())], which=("auroc", "ap"))
    ref = _sklearn(half.float().numpy(), masks)
    assert got["auroc"] == pytest.approx(ref["auroc"], abs=1e-12)
    assert got["ap"] == pytest.approx(ref["ap"], abs=1e-12)


def test_pixel_auroc_float64_large_counts_exact():
    """Many pixels with heavy ties: the integer Mann-Whitney count gives sklearn's value."""
    rng = np.random.default_rng(6)
    masks = rng.random((40, 50, 50)) < 0.05
    scores = np.round(rng.normal(size=masks.shape) + masks, 1)  # float64 input kept as float64
    got = pixel_metrics(_chunked(scores, masks, 9), which=("auroc",))["auroc"]
    assert got == pytest.approx(roc_auc_score(masks.reshape(-1), scores.reshape(-1)), abs=1e-13)


# ---- AUPRO -------------------------------------------------------------------------------------------------


def test_aupro_one_region_found_one_missed():
    """Region A scores above every negative, region B below: PRO = 0.5 over the whole FPR range."""
    rng = np.random.default_rng(7)
    scores = rng.uniform(0.2, 0.8, (2, 12, 12)).astype(np.float32)
    masks = np.zeros(scores.shape, bool)
    masks[0, 2:5, 2:6] = True  # region A
    masks[1, 6:9, 7:9] = True  # region B (another image)
    scores[0][masks[0]], scores[1][masks[1]] = 1.0, 0.0
    assert pixel_metrics(_one(scores, masks), which=("aupro",))["aupro"] == pytest.approx(0.5, abs=1e-12)


def test_aupro_regions_are_eight_connected_and_per_image():
    """Two diagonal blocks touching at a corner are one region; PRO averages regions, not pixels."""
    scores = np.random.default_rng(9).uniform(0.1, 0.5, (1, 10, 10)).astype(np.float32)  # negatives
    masks = np.zeros_like(scores, bool)
    masks[0, 1:3, 1:3] = masks[0, 3:5, 3:5] = True  # one 8-connected region of 8 pixels
    masks[0, 7:9, 6:9] = True  # second region, 6 pixels
    scores[masks] = 0.0  # not found ...
    scores[0, 1:3, 1:3] = 1.0  # ... except half of the first region
    got = pixel_metrics(_one(scores, masks), which=("aupro",))["aupro"]
    # PRO = (0.5 + 0) / 2 at every FPR; 4-connectivity would give (1 + 0 + 0) / 3, a pixel average 4 / 14
    assert got == pytest.approx(0.25, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aupro_exact_when_thresholds_suffice(seed):
    scores, masks = _random_maps(seed, n=4, h=16, w=16, levels=50)
    got = pixel_metrics(_chunked(scores, masks, 3), which=("aupro",))["aupro"]
    assert got == pytest.approx(_exact_aupro(scores, masks), abs=1e-12)


def test_aupro_approximation_on_a_larger_set():
    """~4.7k negatives below FPR 0.3, more than the 1000 thresholds: the approximation stays within 1e-3."""
    rng = np.random.default_rng(8)
    masks = ndimage.binary_dilation(
        rng.random((10, 40, 40)) < 0.003, structure=np.ones((1, 5, 5)), iterations=2
    )
    scores = (rng.random(masks.shape) + masks * rng.random((10, 1, 1))).astype(np.float32)
    scores = np.round(scores * 2000) / 2000  # keeps the exact reference fast
    exact = _exact_aupro(scores, masks)
    assert pixel_metrics(_chunked(scores, masks, 8), which=("aupro",))["aupro"] == pytest.approx(
        exact, abs=1e-3
    )
    coarse = pixel_metrics(_one(scores, masks), which=("aupro",), num_thresholds=20)["aupro"]
    assert coarse == pytest.approx(exact, abs=0.5 / 20) and coarse != pytest.approx(exact, abs=1e-6)


# ---- errors ------------------------------------------------------------------------------------------------


def test_pixel_metrics_errors():
    scores, masks = _random_maps(0)
    with pytest.raises(ValueError, match="AUROC is undefined: the test set has only normal .* pixels"):
        pixel_metrics(_one(scores, np.zeros_like(masks)))
    with pytest.raises(ValueError, match="NaN"):
        pixel_metrics(_one(np.full(scores.shape, np.nan, np.float32), masks))
    with pytest.raises(ValueError, match="must be a callable"):
        pixel_metrics(iter([(scores, masks)]))
    with pytest.raises(ValueError, match=r"\(scores \[n,H,W\], masks \[n,H,W\]\)"):
        pixel_metrics(_one(scores, masks[:, :-1]))
    with pytest.raises(ValueError, match="unknown metric"):
        pixel_metrics(_one(scores, masks), which=("auroc", "iou"))
    with pytest.raises(ValueError, match="0 < fpr_limit <= 1"):
        pixel_metrics(_one(scores, masks), fpr_limit=0.0)
    once = iter([(scores, masks)])
    with pytest.raises(ValueError, match="fresh iterable"):
        pixel_metrics(lambda: once)  # the same, exhausted iterator on the second pass
