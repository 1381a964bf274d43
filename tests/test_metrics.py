"""mvfa/metrics.py: known answers, equality with sklearn over many chunkings, AUPRO against an exact
implementation; mvfa/scoring.py: each function against hand-computed known answers."""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from mvfa import metrics, scoring
from mvfa.metrics import image_metrics, pixel_metrics
from mvfa.scoring import minmax


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


# ---- scoring (mvfa/scoring.py): hand-computed known answers ----------------------------------------------

L3 = math.log(3.0)  # softmax([0, k L3]) gives the abnormal probability 3^k / (3^k + 1)


def _close(got: torch.Tensor, expected, atol: float = 1e-6) -> None:
    """float32 results of a few operations against the exact values: within a few float32 roundings."""
    torch.testing.assert_close(got, torch.tensor(expected, dtype=got.dtype), rtol=1e-6, atol=atol)


def test_minmax_known_answers_dtype_and_chunks():
    a = torch.tensor([[1.0, 3.0, 5.0], [2.0, 9.0, 7.0]])
    # (a - 1) / (9 - 1), each value a multiple of 1/8: exact in binary
    assert minmax(a, a.min(), a.max()).tolist() == [[0.0, 0.25, 0.5], [0.125, 1.0, 0.75]]
    half = torch.tensor([[2.0, 4.0], [3.0, 6.0]], dtype=torch.float16)  # the reference's fp16 maps stay fp16
    out = minmax(half, half.min(), half.max())
    assert out.dtype == torch.float16 and out.tolist() == [[0.0, 0.5], [0.25, 1.0]]
    # lo / hi given: the global extremes of a larger set, not this chunk's
    assert minmax(torch.tensor([1.0, 2.0]), torch.tensor(0.0), torch.tensor(4.0)).tolist() == [0.25, 0.5]
    b = torch.from_numpy(np.random.default_rng(0).random((5, 3, 4)).astype(np.float32))
    whole = minmax(b, b.min(), b.max())
    parts = torch.cat([minmax(b[i : i + 2], b.min(), b.max()) for i in range(0, 5, 2)])
    assert torch.equal(whole, parts) and whole.dtype == torch.float32
    assert (whole.min(), whole.max()) == (0.0, 1.0)


def test_minmax_of_constant_scores_is_nan():
    """max == min: 0 / 0, NaN everywhere, as the reference's numpy division gives."""
    a = torch.full((2, 3), 0.25)
    assert torch.isnan(minmax(a, a.min(), a.max())).all()


def test_patches_drop_the_cls_token():
    tokens = [torch.arange(2 * 3 * 2.0).reshape(2, 3, 2), torch.zeros(1, 5, 4)]  # [B, 1+HW, D]
    got = scoring.patches(tokens)
    assert got[0].tolist() == [[[2.0, 3.0], [4.0, 5.0]], [[8.0, 9.0], [10.0, 11.0]]]
    assert got[1].shape == (1, 4, 4)


def test_text_logits_known_answer():
    unit = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # [1, HW=2, D=2]
    text = torch.tensor([[0.25, 0.5], [0.75, -0.5]])  # [D, 2]
    assert scoring.text_logits(unit, text).tolist() == [[[25.0, 50.0], [75.0, -50.0]]]  # 100 * unit @ text


def test_upsample_known_answer():
    """A 2x2 grid to 3x3, bilinear with aligned corners: corners kept, edge midpoints and centre the means."""
    values = torch.tensor([0.0, 2.0, 4.0, 6.0])  # row-major [[0, 2], [4, 6]]
    patch_values = torch.stack([values, 10 * values], -1)[None]  # [1, HW=4, C=2]
    got = scoring.upsample(patch_values, 3)
    expected = [[0.0, 1.0, 2.0], [2.0, 3.0, 4.0], [4.0, 5.0, 6.0]]
    assert got.shape == (1, 2, 3, 3)
    assert got[0, 0].tolist() == expected
    assert got[0, 1].tolist() == [[10 * v for v in row] for row in expected]


def test_unit_rows_known_answer():
    """x / max(|x|, 1e-8): a zero row stays zero, a row shorter than 1e-8 is divided by 1e-8."""
    got = scoring.unit_rows(torch.tensor([[3.0, 4.0], [0.0, 0.0], [1e-9, 0.0]]))
    _close(got, [[0.6, 0.8], [0.0, 0.0], [0.1, 0.0]])


def test_zero_shot_logits_known_answer():
    """Patch tokens (3, 4) and (0, -2): unit (0.6, 0.8) and (0, -1), logits 100x those against the identity;
    the CLS token is left out and the caller's tokens are left as they were."""
    tokens = torch.tensor([[[9.0, 9.0], [3.0, 4.0], [0.0, -2.0]]])  # [1, 1+HW, D]
    before = tokens.clone()
    (got,) = scoring.zero_shot_logits([tokens], torch.eye(2))
    assert got.shape == (1, 2, 2)
    _close(got, [[[60.0, 80.0], [0.0, -100.0]]], atol=1e-5)
    assert torch.equal(tokens, before)


def test_zero_shot_image_score_known_answer():
    """Layer 1: abnormal probabilities 1/2 and 3/4 (mean 5/8); layer 2: 1/4 and 1/2 (mean 3/8); sum 1."""
    layer1 = torch.tensor([[[0.0, 0.0], [0.0, L3]]])  # [B=1, HW=2, 2]
    layer2 = torch.tensor([[[L3, 0.0], [0.0, 0.0]]])
    got = scoring.zero_shot_image_score([layer1, layer2])
    assert got.shape == (1,) and got.item() == pytest.approx(1.0, rel=1e-6)
    assert scoring.zero_shot_image_score([layer1]).item() == pytest.approx(0.625, rel=1e-6)


def test_zero_shot_map_known_answer():
    """Abnormal-minus-normal logits [[0, 2 L3], [2 L3, 4 L3]] upsampled to 3x3 are k L3, k = row + column;
    the abnormal probability there is 3^k / (3^k + 1). A second layer of equal logits adds 1/2 everywhere."""
    abnormal = torch.tensor([0.0, 2 * L3, 2 * L3, 4 * L3])
    layer1 = torch.stack([torch.zeros(4), abnormal], -1)[None]  # [1, HW=4, 2]
    layer2 = torch.zeros(1, 4, 2)
    p = [3**k / (3**k + 1) for k in range(5)]
    expected = [[p[i + j] for j in range(3)] for i in range(3)]
    got = scoring.zero_shot_map([layer1], 3)
    assert got.shape == (1, 3, 3)
    _close(got[0], expected)
    both = scoring.zero_shot_map([layer1, layer2], 3)
    _close(both[0], [[v + 0.5 for v in row] for row in expected])


def test_few_shot_distances_known_answer():
    """Memory rows (1, 0) and (0, 1). Image 0: patches (3, 4) -> best cosine 0.8, distance 0.2; (-1, 0) ->
    best cosine 0, distance 1. Image 1: (0, 5) and (2, 0) lie on a memory row: distance 0. CLS left out."""
    memory = [torch.eye(2)]  # [M=2, D=2] unit rows
    tokens = torch.tensor(
        [[[7.0, -7.0], [3.0, 4.0], [-1.0, 0.0]], [[-7.0, 7.0], [0.0, 5.0], [2.0, 0.0]]]
    )  # [B=2, 1+HW, D]
    (got,) = scoring.few_shot_distances(memory, [tokens])
    assert got.shape == (2, 2)
    _close(got, [[0.2, 1.0], [0.0, 0.0]])


def test_few_shot_map_known_answer():
    """Distances [[0, 2], [4, 6]] upsampled to 3x3, plus a second layer of ones."""
    layer1 = torch.tensor([[0.0, 2.0, 4.0, 6.0]])  # [B=1, HW=4]
    got = scoring.few_shot_map([layer1, torch.ones(1, 4)], 3)
    assert got.shape == (1, 3, 3)
    assert got[0].tolist() == [[1.0, 2.0, 3.0], [3.0, 4.0, 5.0], [5.0, 6.0, 7.0]]


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
