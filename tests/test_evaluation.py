"""evaluate() on hand-built material: against MVFA's procedure written out independently (each protocol and
head), and unchanged by the block size of its full-size maps.

A `Collected` holds what one pass over a test set keeps per image (labels, packed masks, the det head's
zero-shot score, the map head's 2-class logits and, few-shot, its distances to the memory bank). Here it is
drawn at random for 23 images, more than one block of CHUNK = 16, so every test set's path through the blocks
is taken.
"""

import numpy as np
import pytest
import torch
from scoring_spec import spec_upsample
from sklearn.metrics import average_precision_score, roc_auc_score

from mvfa.evaluation import CHUNK, Collected, evaluate, save_scores
from mvfa.precision import Precision

N_IMAGES, LAYERS, GRID, SIZE = 23, 4, 4, 24  # a 4x4 patch grid upsampled to 24x24 pixels
CPU = torch.device("cpu")
FP32 = Precision.of("auto", CPU)
SCORE_TOL = 1e-6  # float32 maps and scores computed in another order (the spec's), values in [0, 4]


def hand_built(*, has_masks: bool, fewshot: bool, seed: int = 0) -> Collected:
    """Random material for N_IMAGES images: half of them abnormal, with a blob mask where masks exist."""
    g = torch.Generator().manual_seed(seed)
    c = Collected(has_masks=has_masks, img_size=SIZE, head="seg" if has_masks else "det")
    for i in range(N_IMAGES):
        label = i % 2
        mask = np.zeros((SIZE, SIZE), dtype=bool)
        if label and has_masks:
            top, left = (torch.randint(0, SIZE - 8, (2,), generator=g)).tolist()
            mask[top : top + 8, left : left + 8] = True
        c.labels.append(label)
        c.masks.append(np.packbits(mask.reshape(-1)))
        c.zero_image.append(float(torch.rand(1, generator=g)))
        c.logits.append(torch.randn(LAYERS, GRID * GRID, 2, generator=g) * 3)
        if fewshot:
            c.distances.append(torch.rand(LAYERS, GRID * GRID, generator=g) * 0.5)
    return c


def spec_minmax(x: np.ndarray) -> np.ndarray:
    return (x - x.min()) / (x.max() - x.min())


def spec_result(c: Collected) -> dict:
    """MVFA's test procedure in float64 numpy: maps (zero-shot: sum over layers of the abnormal softmax
    probability of the upsampled logits; few-shot: sum over layers of the upsampled distances), each min-max
    normalised over the whole test set, fused 0.5 / 0.5; image score: few-shot with masks, the fused map's
    maximum; few-shot image-only, 0.5 / 0.5 of the min-max normalised zero-shot score and mean raw few-shot
    map; zero-shot, the min-max normalised det-head score."""
    logits = torch.stack(c.logits).double()  # [N, L, HW, 2]
    zero_maps = sum(spec_upsample(logits[:, k], SIZE).softmax(dim=1)[:, 1] for k in range(LAYERS)).numpy()
    masks = np.stack([np.unpackbits(m, count=SIZE * SIZE).reshape(SIZE, SIZE) for m in c.masks])
    zero_image = np.array(c.zero_image)
    if c.fewshot:
        distances = torch.stack(c.distances).double()  # [N, L, HW]
        few_maps = sum(spec_upsample(distances[:, k, :, None], SIZE)[:, 0] for k in range(LAYERS)).numpy()
        maps = 0.5 * spec_minmax(zero_maps) + 0.5 * spec_minmax(few_maps)
        if c.has_masks:
            image_scores = maps.max(axis=(1, 2))
        else:
            image_scores = 0.5 * spec_minmax(zero_image) + 0.5 * spec_minmax(few_maps.mean(axis=(1, 2)))
    else:
        maps = spec_minmax(zero_maps)
        image_scores = spec_minmax(zero_image)
    return {"image_scores": image_scores, "maps": maps, "masks": masks}


PROTOCOLS = {
    "few-shot, masks (seg head)": {"has_masks": True, "fewshot": True},
    "few-shot, image-only (det head)": {"has_masks": False, "fewshot": True},
    "zero-shot, masks (seg head maps, det score)": {"has_masks": True, "fewshot": False},
    "zero-shot, image-only (det head)": {"has_masks": False, "fewshot": False},
}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_evaluate_matches_the_written_out_procedure(protocol):
    c = hand_built(**PROTOCOLS[protocol])
    result = evaluate(c, CPU, FP32)
    spec = spec_result(c)
    labels = np.array(c.labels)
    np.testing.assert_allclose(result["image_scores"], spec["image_scores"], rtol=0, atol=SCORE_TOL)
    # the metrics of our own scores, by sklearn: the metric code is checked in test_metrics.py
    ours = np.array(result["image_scores"])
    assert result["image_auroc"] == pytest.approx(roc_auc_score(labels, ours), abs=1e-12)
    assert result["image_ap"] == pytest.approx(average_precision_score(labels, ours), abs=1e-12)
    # and the spec's metrics, which equal ours unless a score moved past another
    assert result["image_auroc"] == pytest.approx(roc_auc_score(labels, spec["image_scores"]), abs=1e-12)
    if c.has_masks:
        pixel_auroc = roc_auc_score(spec["masks"].reshape(-1), spec["maps"].reshape(-1))
        assert result["pixel_auroc"] == pytest.approx(pixel_auroc, abs=1e-6)
    else:
        assert "pixel_auroc" not in result


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_saved_maps_are_the_written_out_maps(protocol, tmp_path):
    c = hand_built(**PROTOCOLS[protocol])
    result = evaluate(c, CPU, FP32)
    files = [f"image{i}.png" for i in range(N_IMAGES)]
    saved = np.load(save_scores(tmp_path / "s.npz", c, result, files, CPU, FP32))
    if not c.has_masks:
        assert "maps" not in saved.files
        return
    spec = spec_result(c)
    np.testing.assert_allclose(saved["maps"], spec["maps"], rtol=0, atol=SCORE_TOL)
    assert np.array_equal(saved["masks"], spec["masks"])


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_block_size_changes_nothing(protocol, tmp_path):
    """Metrics, image scores and every saved map and mask bit for bit the same, for blocks of 1, 5, CHUNK
    and more images than the test set has."""
    c = hand_built(**PROTOCOLS[protocol], seed=1)
    files = [f"image{i}.png" for i in range(N_IMAGES)]
    outcomes = []
    for chunk in (1, 5, CHUNK, N_IMAGES + 10):
        result = evaluate(c, CPU, FP32, chunk=chunk)
        saved = np.load(save_scores(tmp_path / f"{chunk}.npz", c, result, files, CPU, FP32, chunk=chunk))
        outcomes.append((chunk, result, {name: saved[name] for name in saved.files}))
    _, first_result, first_saved = outcomes[0]
    for chunk, result, saved in outcomes[1:]:
        assert result == first_result, f"chunk {chunk}"
        for name, array in first_saved.items():
            assert np.array_equal(saved[name], array), f"{name}, chunk {chunk}"
