"""On a CUDA GPU: the reference's fp16 autocast against fp32 (adapted forward, text features, memory bank,
scores), batch 1 against batch 8, a checkpoint saved from CUDA loaded on the CPU, the four recorded reference
runs, and training steps under autocast. Skipped, with the reason, where CUDA is absent;
`bash tools/bench/gpu_check.sh` runs them.

fp32 here is true fp32 (TF32 off). The fp16 tolerances are the largest differences that bf16 autocast gives on
the CPU for the same inputs (seed-0 ViT-L, Brain adapters): fp16 keeps 3 more significand bits, about 8x
margin.
"""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import assert_matches_probe
from PIL import Image
from test_reference_runs import recorded_runs, user_checkout  # noqa: F401 (a fixture)
from torch.utils.data import DataLoader

from CLIP import CLIP_Inplanted, create_model
from dataset.medical_few import MedDataset
from mvfa.evaluation import build_memory, collect, evaluate
from mvfa.precision import Precision
from mvfa.records import save_checkpoint
from mvfa.training import optimizers, train_step
from prompt import encode_text_with_prompt_ensemble, text_features_for
from utils import augment

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device here; on a GPU machine run bash tools/bench/gpu_check.sh",
)
CUDA = torch.device("cuda")
FP32_TOL = 1e-3  # CUDA fp32 against the CPU's goldens, absolute (other summation orders)
# fp16 tokens (|x| up to 4.5): max |diff|, |diff| / |x| (CPU bf16: 0.050, 0.012)
TOKEN_TOL, TOKEN_REL = 0.05, 0.015
TEXT_TOL = 1e-3  # fp16 text features, unit columns (CPU bf16: 8e-4)
LOGIT_TOL = 0.15  # text logits at CLIP's scale 100 (CPU bf16: 0.14)
DIST_TOL = 0.01  # 1 - max cosine similarity to the memory bank (CPU bf16: 0.008)
SCORE_TOL = 0.02  # zero-shot image scores, sums of 4 mean probabilities
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
    clip = create_model(
        "ViT-L-14-336", 240, "openai", CUDA, checkpoint=reference_assets / "CLIP/ckpt/ViT-L-14-336px.pt"
    )
    clip.requires_grad_(False)
    model = CLIP_Inplanted(clip).to(CUDA).eval()
    model.load_adapters(reference_assets / "ckpt/few-shot/Brain.pth")
    return model


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
    m32, m16 = (evaluate(c, CUDA, on_cuda(p)) for c, p in ((c32, "fp32"), (c16, "auto")))
    assert abs(m16["pixel_auroc"] - m32["pixel_auroc"]) <= 0.01
    report(
        f"Brain scores fp16 - fp32: logits {diffs[0]:.3f}, distances {diffs[1]:.2e}, "
        f"image scores {diffs[2]:.2e}; "
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
    return {m[1]: float(m[2]) for m in re.finditer(r"^(\w+) (p?AUC) : ([0-9.]+)$", text, re.MULTILINE)}


@pytest.mark.parametrize("command,expected", recorded_runs())
def test_recorded_run_on_cuda(user_checkout, tmp_path, command, expected):  # noqa: F811
    """The reference's recorded commands on CUDA with --precision auto (its fp16 autocast): pixel AUROC within
    0.01 of the recorded line; image AUROC reported (12 random-weight test images nearly tie)."""
    out = subprocess.run(
        [
            sys.executable,
            *command.split(),
            "--device",
            "cuda",
            "--precision",
            "auto",
            "--out_dir",
            str(tmp_path),
        ],
        cwd=user_checkout,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got, want = printed_metrics(out.stdout), printed_metrics("\n".join(expected))
    assert got.keys() == want.keys()
    report(f"{command} on CUDA: " + ", ".join(f"{k} {got[k]:.4f} (recorded {want[k]:.4f})" for k in want))
    if "pAUC" in want:
        assert abs(got["pAUC"] - want["pAUC"]) <= 0.01
    assert 0.0 <= got["AUC"] <= 1.0


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
        assert loss == pytest.approx(goldens["step_loss"], rel=0.02 if precision == "auto" else 0.05)
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
