"""On a CUDA GPU: the reference's fp16 autocast against fp32 (adapted forward, text features, memory bank,
scores), batch 1 against batch 8, a checkpoint saved from CUDA loaded on the CPU, the four recorded reference
runs (in fp32 and under fp16 autocast) against their recorded lines and per-image scores, and training steps
under autocast. Skipped, with the reason, where CUDA is absent; `bash tools/bench/gpu_check.sh` runs them.

fp32 here is true fp32 (TF32 off). Every tolerance is derived from the unit roundoff u of the precision (fp16:
2^-11 ~ 4.9e-4, relative) and the magnitudes and depths involved, as written beside it; on the CPU, fp16
autocast (--precision amp) of the goldens' image gave a quarter or less of each bound (in brackets).
"""

import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import assert_matches_probe, reference_model
from PIL import Image
from recordings import recorded_runs, reference_scores
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader

from CLIP import CLIP_Inplanted, create_model
from dataset.augment import augment
from dataset.medical_few import MedDataset
from mvfa.evaluation import build_memory, collect, evaluate, raw_maps
from mvfa.precision import Precision
from mvfa.records import save_checkpoint
from mvfa.training import optimizers, train_step
from prompt import encode_text_with_prompt_ensemble, text_features_for

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device here; on a GPU machine run bash tools/bench/gpu_check.sh",
)
CUDA = torch.device("cuda")
FP32_TOL = 1e-3  # CUDA fp32 against the CPU's goldens, absolute (other summation orders)
UNIT_ROUNDOFF = {"fp32": 2.0**-24, "bf16": 2.0**-8, "fp16": 2.0**-11}
U16 = UNIT_ROUNDOFF["fp16"]


def token_rel(u: float) -> float:
    """Relative (L2, per token) error of the adapted tokens: the 24 blocks round their attention and MLP
    outputs (fp32 accumulation inside), the adapter its two products: n = 50 roundings of relative size u
    along the residual stream, adding like a random walk (sqrt(n) u), doubled for roundings that align."""
    return 2 * math.sqrt(2 * 24 + 2) * u


def text_rel(u: float) -> float:
    """The same for the text features: 12 blocks (2 roundings each) and the projection, n = 25."""
    return 2 * math.sqrt(2 * 12 + 1) * u


def logit_tol(u: float, magnitude: float) -> float:
    """Logits 100 cos(token, text), at most `magnitude` in size: relative errors of the token and of the
    text, plus the rounding of the logit itself."""
    return magnitude * (token_rel(u) + text_rel(u) + u)


def distance_tol(u: float) -> float:
    """1 - max cos to the memory bank, distances at most D_MAX: a token direction error e moves cos by its
    component across the bank row, e sin(angle) <= e sqrt(2 D_MAX); plus the roundings of the cosine and of
    the bank rows under autocast (2u)."""
    return token_rel(u) * math.sqrt(2 * D_MAX) + 2 * u


# the seed-0 inputs on the CPU in fp32: the largest |logit| (Brain's test set 10.7; all four recorded runs
# 13.8) and distance (Brain 0.026, Chest 0.039)
LOGIT_MAX_BRAIN, LOGIT_MAX, D_MAX = 11.0, 14.0, 0.04
TOKEN_REL = token_rel(U16)  # 6.9e-3 (CPU fp16: 1.7e-3)
TOKEN_TOL = 4.5 * TOKEN_REL  # max |diff| on tokens |x| <= 4.5: 0.031 (CPU fp16: 5.8e-3)
TEXT_TOL = 1e-3  # unit columns: tighter than text_rel (4.9e-3), the prompt ensemble averages (CPU bf16: 8e-4)
LOGIT_TOL = logit_tol(U16, LOGIT_MAX_BRAIN)  # 0.14 (CPU fp16: 0.022)
DIST_TOL = distance_tol(U16)  # 2.9e-3 (CPU fp16: 6.9e-4)
# zero-shot image score, the sum over 4 layers of the mean abnormal probability of 289 patches: each
# probability moves by at most LOGIT_TOL / 2 (two-class softmax: slope <= 1/4 in a logit difference off by
# <= 2 LOGIT_TOL), 4 layers; the patches' independent rounding errors average down by sqrt(289)
SCORE_TOL = 4 * (LOGIT_TOL / 2) / math.sqrt(289)  # 0.016 (CPU fp16: 4.3e-4)


def loss_rel(u: float) -> float:
    """Relative error of the training loss, a mean over 4 layers, 289 patches and the image's pixels: the
    tokens' error without the factor 2 for aligned roundings, which such a mean averages out."""
    return math.sqrt(2 * 24 + 2) * u  # fp16: 3.5e-3 (CPU fp16: 1.2e-4); bf16: 2.8e-2


LR = 1e-3


def on_cuda(name: str) -> Precision:
    """The --precision policy `name` on the GPU."""
    return Precision.of(name, CUDA)


def report(line: str) -> None:
    """A figure for the GPU check's summary: appended to $MVFA_CUDA_REPORT when set, and printed."""
    print(line)
    if os.environ.get("MVFA_CUDA_REPORT"):
        with open(os.environ["MVFA_CUDA_REPORT"], "a") as f:
            f.write(line + "\n")


@pytest.fixture(scope="module", autouse=True)
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="module")
def brain(reference_assets) -> CLIP_Inplanted:
    """The seed-0 ViT-L (frozen) with the few-shot Brain adapters, on CUDA."""
    return reference_model(reference_assets, CUDA)


@pytest.fixture(scope="module")
def brain_data(reference_assets) -> MedDataset:
    return MedDataset(
        str(reference_assets / "data"),
        "Brain",
        240,
        4,
        0,
        seed_root=str(reference_assets / "dataset/fewshot_seed"),
    )


def within(got: torch.Tensor, expected: torch.Tensor, atol: float) -> float:
    """Max |got - expected| (both as float32 on the CPU), asserted to be at most atol."""
    diff = float((got.float().cpu() - expected.float().cpu()).abs().max())
    assert diff <= atol
    return diff


def within_reference(got: torch.Tensor, expected, atol: float, rel: float | None = None) -> None:
    """`got` (as float32 on the CPU) against a golden tensor, or a probe of one (assert_matches_probe), at
    atol; with `rel`, also |got - expected| / |expected| (L2 norms) at most rel: in full for a tensor; for a
    probe at its positions, and the norms themselves (| |got| - |expected| | <= |got - expected|)."""
    got = got.float().cpu()
    if isinstance(expected, torch.Tensor):
        within(got, expected, atol)
        if rel is not None:
            assert float((got - expected).norm() / expected.norm()) <= rel
        return
    assert_matches_probe(got, expected, atol=atol)
    if rel is not None:
        sampled = got.reshape(-1)[expected["index"]]
        assert float((sampled - expected["values"]).norm() / expected["values"].norm()) <= rel
        assert abs(float(got.double().norm()) - expected["norm"]) <= rel * expected["norm"]


def test_adapted_forward_fp16_autocast_against_fp32(brain, goldens, golden_image):
    image = golden_image.to(CUDA)
    with torch.no_grad():
        fp32 = brain(image)
        with on_cuda("auto").forward():
            fp16 = brain(image)
    # adapter tokens stay fp16 under the reference's autocast
    assert fp16[1][0].dtype == torch.float16
    expected = [goldens["pooled"], *goldens["seg_tokens"], *goldens["det_tokens"]]
    for got32, got16, ref in zip([fp32[0], *fp32[1], *fp32[2]], [fp16[0], *fp16[1], *fp16[2]], expected):
        within_reference(got32, ref, FP32_TOL)
        within_reference(got16, ref, TOKEN_TOL, TOKEN_REL)


def test_text_features_fp16_autocast_against_fp32(brain, goldens):
    with torch.no_grad():
        fp32 = encode_text_with_prompt_ensemble(brain.clipmodel, "Brain", CUDA)
        with on_cuda("auto").forward():
            fp16 = encode_text_with_prompt_ensemble(brain.clipmodel, "Brain", CUDA)
    # under autocast the reference's text features end in fp16: its in-place normalisations store fp16
    assert (fp32.dtype, fp16.dtype, fp16.shape) == (torch.float32, torch.float16, (768, 2))
    within(fp32, goldens["text_features"]["Brain"], FP32_TOL)
    report(f"text features fp16 - fp32: max {within(fp16, fp32, TEXT_TOL):.2e}")


def scored(model, data: MedDataset, precision: str, batch_size: int):
    """Few-shot memory bank and collected score material of the seed-0 Brain test set on CUDA."""
    policy = on_cuda(precision)
    text = text_features_for(model.clipmodel, ["Brain"], CUDA, policy)["Brain"]
    memory = build_memory(model, augment(data.support.normal)[0], policy, batch_size)
    loader = DataLoader(data, batch_size=batch_size, shuffle=False)
    return memory, collect(model, loader, text, policy, has_masks=True, memory=memory)


@pytest.fixture(scope="module")
def runs(brain, brain_data) -> dict:
    return {(p, b): scored(brain, brain_data, p, b) for p in ("fp32", "auto") for b in (1, 8)}


def assert_close_material(a, b, logit_tol: float, dist_tol: float, score_tol: float) -> list[float]:
    """Two collected runs of the same images: the seg head's logits and distances (Brain has masks), image
    scores within the tolerances."""
    assert a.head == b.head == "seg"
    return [
        within(torch.stack(a.logits), torch.stack(b.logits), logit_tol),
        within(torch.stack(a.distances), torch.stack(b.distances), dist_tol),
        within(torch.tensor(a.zero_image), torch.tensor(b.zero_image), score_tol),
    ]


def test_memory_bank_and_scores_fp16_autocast_against_fp32(runs):
    (bank32, c32), (bank16, c16) = runs["fp32", 1], runs["auto", 1]
    for a, b in zip(bank32[0] + bank32[1], bank16[0] + bank16[1]):
        # the bank runs without autocast, as the reference's does
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)
    diffs = assert_close_material(c16, c32, LOGIT_TOL, DIST_TOL, SCORE_TOL)
    assert c32.fewshot and c16.fewshot
    # the full-size maps before their min-max: zero-shot, the sum over 4 layers of probabilities that each
    # move by at most LOGIT_TOL / 2; few-shot, the sum over 4 layers of distances
    n = len(c32.labels)
    (zero32, few32), (zero16, few16) = (
        raw_maps(c, 0, n, CUDA, on_cuda(p)) for c, p in ((c32, "fp32"), (c16, "auto"))
    )
    map_diffs = [within(zero16, zero32, 4 * LOGIT_TOL / 2), within(few16, few32, 4 * DIST_TOL)]
    m32, m16 = (evaluate(c, CUDA, on_cuda(p)) for c, p in ((c32, "fp32"), (c16, "auto")))
    report(
        f"Brain scores fp16 - fp32: logits {diffs[0]:.3f}, distances {diffs[1]:.2e}, "
        f"image scores {diffs[2]:.2e}, zero-shot maps {map_diffs[0]:.2e}, few-shot maps {map_diffs[1]:.2e}; "
        f"pixel AUROC {m16['pixel_auroc']:.4f} vs {m32['pixel_auroc']:.4f}, image AUROC "
        f"{m16['image_auroc']:.4f} vs {m32['image_auroc']:.4f}"
    )


@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_batch_1_equals_batch_8(runs, precision):
    """Other kernels for other batch sizes: equal within float32 rounding in fp32, fp16 rounding under
    autocast."""
    (bank1, c1), (bank8, c8) = runs[precision, 1], runs[precision, 8]
    for a, b in zip(bank1[0] + bank1[1], bank8[0] + bank8[1]):
        within(a, b, 1e-4)
    tol = (1e-3, 1e-5, 1e-5) if precision == "fp32" else (LOGIT_TOL, DIST_TOL, SCORE_TOL)
    diffs = assert_close_material(c1, c8, *tol)
    assert c1.labels == c8.labels
    report(
        f"batch 1 vs 8 ({precision}): logits {diffs[0]:.2e}, distances {diffs[1]:.2e}, scores {diffs[2]:.2e}"
    )


def test_checkpoint_saved_on_cuda_loads_on_the_cpu(tmp_path):
    """Both the released layout saved with CUDA tensors (as the reference does) and save_checkpoint's."""
    torch.manual_seed(0)
    model = CLIP_Inplanted(create_model("demo-tiny", 56, "none", CUDA), (3, 6, 9, 12)).to(CUDA)
    torch.save(model.adapter_state(), tmp_path / "raw.pth")
    save_checkpoint(model, tmp_path / "saved.pth", {"epoch": 0})
    expected = {k: v.cpu() for k, v in model.state_dict().items() if "adapters" in k}
    for name in ("raw.pth", "saved.pth"):
        cpu_model = CLIP_Inplanted(create_model("demo-tiny", 56, "none", "cpu"), (3, 6, 9, 12))
        cpu_model.load_adapters(tmp_path / name)
        got = {k: v for k, v in cpu_model.state_dict().items() if "adapters" in k}
        assert got.keys() == expected.keys()
        assert all(v.device.type == "cpu" and torch.equal(v, expected[k]) for k, v in got.items())


def printed_metrics(text: str) -> dict[str, float]:
    """{'AUC': x, 'pAUC': y} of the printed lines `{obj} AUC : x`, `{obj} pAUC : y`."""
    return {m[2]: float(m[3]) for m in re.finditer(r"^(\w+) (p?AUC) : ([0-9.]+)$", text, re.MULTILINE)}


# The range (max - min) of the raw scores behind each recorded run's min-max normalised ones, on the CPU in
# fp32 (the seed-0 inputs): of the det head's zero-shot image scores S, the few-shot image means F (image-only
# few-shot), the full-size zero-shot maps Z and few-shot maps M (datasets with masks). The random-weight model
# scores the 12 test images nearly alike (S spans 0.002-0.003 around 2.4), which magnifies every error.
RAW_RANGES = {
    "test_few.py --obj Brain --shot 4 --iterate 0": {"Z": 0.2570, "M": 0.0770},
    "test_few.py --obj Chest --shot 4 --iterate 0": {"S": 0.00234, "F": 0.00343},
    "test_zero.py --obj Liver": {"S": 0.00313, "Z": 0.3745},
    "test_zero.py --obj Histopathology": {"S": 0.00301},
}


def normalised_tolerances(command: str, u: float) -> tuple[float, float | None]:
    """Bounds on how far a run's normalised (image scores, maps) may be from the recorded ones when its
    forward rounds with unit roundoff u: raw S and Z move by at most 2 logit_tol (4 layers of probabilities,
    each off by <= logit_tol / 2), raw F and M by 4 distance_tol (4 layers of distances); the min-max
    (x - lo) / range, with x, lo and hi each off by e, moves by at most 4 e / range; fused scores are
    0.5 / 0.5 of two such; Brain's image score is its fused map's max. None: no maps."""
    raw = {"S": 2 * logit_tol(u, LOGIT_MAX), "Z": 2 * logit_tol(u, LOGIT_MAX), "F": 4 * distance_tol(u)}
    raw["M"] = raw["F"]
    normalised = {k: 4 * raw[k] / spread for k, spread in RAW_RANGES[command].items()}
    if "M" in normalised:  # few-shot with masks: maps and image scores from the fused map
        fused = 0.5 * normalised["Z"] + 0.5 * normalised["M"]
        return fused, fused
    if "F" in normalised:  # few-shot, image-only
        return 0.5 * normalised["S"] + 0.5 * normalised["F"], None
    return normalised["S"], normalised.get("Z")


def auroc_bounds(labels: np.ndarray, scores: np.ndarray, tol: float) -> tuple[float, float]:
    """The AUROCs reachable from `scores` when each moves by at most tol: a (positive, negative) pair whose
    scores differ by more than 2 tol keeps its order, the others may go either way (ties included)."""
    positives, negatives = scores[labels == 1], np.sort(scores[labels == 0])
    surely = np.searchsorted(negatives, positives - 2 * tol, side="left").sum()
    possibly = np.searchsorted(negatives, positives + 2 * tol, side="right").sum()
    pairs = len(positives) * len(negatives)
    return float(surely / pairs), float(possibly / pairs)


@pytest.mark.parametrize("precision", ["fp32", "auto"])
@pytest.mark.parametrize("command,expected", recorded_runs())
def test_recorded_run_on_cuda(checkout_for, tmp_path, command, expected, precision):
    """The reference's recorded commands on CUDA, in fp32 and with --precision auto (its fp16 autocast).

    Both: the labels and masks are the recorded ones, and the printed lines are the AUROCs sklearn gives on
    the run's own --save_scores, rounded as printed. Where the derived bound on the normalised scores is
    informative (below 1): every image score and map value within it of the recorded ones, and each printed
    AUROC among those the recorded scores reach within it (the recorded line itself when no pair of recorded
    scores is that close). In fp32 the bounds are 4e-4 to 0.06. Under fp16 they exceed 1: fp16 rounding can
    reorder these nearly tied random-weight scores entirely, so those runs are reported, not bounded."""
    precision_u = UNIT_ROUNDOFF["fp32" if precision == "fp32" else "fp16"]
    scores_file = tmp_path / "scores.npz"
    out = subprocess.run(
        [
            sys.executable,
            *command.split(),
            "--device",
            "cuda",
            "--precision",
            precision,
            "--out_dir",
            str(tmp_path),
            "--save_scores",
            str(scores_file),
        ],
        cwd=checkout_for(0, 6),
        capture_output=True,
        text=True,
        timeout=900,
        # true fp32: no TF32 in cuBLAS and cuDNN (torch leaves cuDNN's convolutions, the patch embedding, on
        # TF32 by default)
        env={**os.environ, "NVIDIA_TF32_OVERRIDE": "0"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got, want = printed_metrics(out.stdout), printed_metrics("\n".join(expected))
    assert got.keys() == want.keys()
    recorded, saved = reference_scores(command), np.load(scores_file)
    image_tol, map_tol = normalised_tolerances(command, precision_u)
    levels = {"AUC": ("image", saved["labels"], saved["image_scores"], image_tol)}
    if "pAUC" in want:
        levels["pAUC"] = ("pixel", saved["masks"].reshape(-1), saved["maps"].reshape(-1), map_tol)
    if precision == "fp32":
        assert max(tol for *_, tol in levels.values()) < 0.1
    lines = []
    for name, (level, labels, scores, tol) in levels.items():
        recorded_labels, recorded_scores = recorded[level]
        assert np.array_equal(labels, recorded_labels)
        assert got[name] == round(roc_auc_score(labels, scores), 4)  # the line is the saved scores' AUROC
        difference = float(np.abs(scores.astype(np.float64) - recorded_scores).max())
        lo, hi = auroc_bounds(recorded_labels, recorded_scores, tol)
        lines.append(
            f"{name} {got[name]:.4f} (recorded {want[name]:.4f}, bounds [{lo:.4f}, {hi:.4f}]), scores differ "
            f"by up to {difference:.2e} (bound {tol:.2e})"
        )
        if tol < 1:
            assert difference <= tol, lines[-1]
            assert lo - 5e-5 <= got[name] <= hi + 5e-5, lines[-1]  # the printed line rounds to 4 decimals
            assert lo - 5e-5 <= want[name] <= hi + 5e-5  # (the recorded line too, as it must)
    report(f"{command} on CUDA, --precision {precision}: " + "; ".join(lines))


@pytest.mark.parametrize("precision", ["auto", "bf16"])
def test_training_step_under_autocast(brain, goldens, reference_assets, golden_image, precision):
    """One step of both optimisers on the goldens' image: the loss near the CPU fp32 one, every adapter weight
    moved by at most the learning rate (Adam's first step), nothing non-finite. No GradScaler, as the
    reference (it trains under fp16 autocast without loss scaling)."""
    state = {k: v.clone() for k, v in brain.state_dict().items() if "adapters" in k}
    mask_file = reference_assets / "data" / goldens["image_file"].replace("/img/", "/anomaly_mask/")
    mask = np.asarray(Image.open(mask_file).convert("L").resize((240, 240), Image.NEAREST), np.float32) / 255
    seg_opt, det_opt = optimizers(brain, LR)
    try:
        loss = train_step(
            brain,
            golden_image,
            torch.tensor([1.0]),
            torch.from_numpy(mask)[None, None],
            goldens["text_features"]["Brain"].to(CUDA),
            has_masks=True,
            optimizers=(seg_opt, det_opt),
            precision=on_cuda(precision),
            img_size=240,
        )
        u = UNIT_ROUNDOFF["fp16" if precision == "auto" else "bf16"]
        assert loss == pytest.approx(goldens["step_loss"], rel=loss_rel(u))
        moved = 0
        for key, before in state.items():
            step = (brain.state_dict()[key] - before).abs()
            assert torch.isfinite(step).all() and float(step.max()) <= LR * 1.001
            moved += int((step > 0).sum())
        assert moved > 0
        report(
            f"training step ({precision}): loss {loss:.5f} (CPU fp32 {goldens['step_loss']:.5f}), "
            f"{moved / sum(v.numel() for v in state.values()):.1%} of the adapter weights moved"
        )
    finally:
        brain.load_state_dict(state, strict=False)
