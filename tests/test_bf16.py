"""--precision bf16 (this repository's addition, for speed on CPUs with bf16 instructions): the forwards run
under bf16 autocast and everything after them in fp32, so the score material and the training losses are
exactly fp32 maths on the bf16 forward's tokens. Tiny random CLIP, CPU."""

import pytest
import torch
from conftest import SIZE, TINY
from torch.utils.data import DataLoader

import test_few
from dataset.medical_few import MedDataset
from loss import detection_loss, segmentation_loss
from mvfa.config import configs
from mvfa.evaluation import build_memory, collect
from mvfa.precision import Precision
from mvfa.scoring import few_shot_distances, zero_shot_image_score, zero_shot_logits
from mvfa.training import optimizers, train_step
from tools.synth import make_synthetic_bmad
from utils import augment

CPU = torch.device("cpu")
BF16 = Precision.of("bf16", CPU)


def tiny_model(*flags: str):
    """The tiny adapted CLIP as test_few.py builds it from these flags."""
    model_cfg, _, precision, device = configs(
        vars(test_few.parser().parse_args(TINY + list(flags))), protocol="few"
    )
    return model_cfg.build(device, precision)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny adapted CLIP, Brain-style synthetic data (2 images per folder) and unit text features
    [E, 2]."""
    synth = make_synthetic_bmad(
        str(tmp_path_factory.mktemp("bf16")),
        n_per_split=2,
        seed=0,
        img_size=SIZE,
        objs=("Brain",),
        shots=(1,),
    )
    torch.manual_seed(0)
    model = tiny_model()
    data = MedDataset(synth.data, "Brain", SIZE, 1, 0, seed_root=synth.seed_root)
    text = torch.nn.functional.normalize(torch.randn(model.clipmodel.text_projection.shape[1], 2), dim=0)
    return model, data, text


def test_forward_runs_in_bf16(setup):
    model, data, _ = setup
    with torch.no_grad(), BF16.forward():
        _, seg, det = model(data[0][0][None])
    assert {t.dtype for t in seg + det} == {torch.bfloat16}


def test_collect_scores_the_bf16_tokens_in_fp32(setup):
    model, data, text = setup
    memory = build_memory(model, augment(data.support.normal)[0], BF16, batch_size=4)
    got = collect(model, DataLoader(data, batch_size=2), text.bfloat16(), BF16, has_masks=True, memory=memory)
    assert got.head == "seg" and got.fewshot
    logits, distances, zero_image = [], [], []  # the seg head's map material and the det head's image scores
    for images, _, _ in DataLoader(data, batch_size=2):
        with torch.no_grad(), BF16.forward():
            _, seg, det = model(images)
        with torch.no_grad():  # no autocast: fp32 maths on the bf16 tokens (and text) cast up
            seg, det, unit_text = [t.float() for t in seg], [t.float() for t in det], text.bfloat16().float()
            # before the in-place scoring
            distances += list(torch.stack(few_shot_distances(memory[0], seg), 1))
            zero_image += zero_shot_image_score(zero_shot_logits(det, unit_text)).tolist()
            logits += list(torch.stack(zero_shot_logits(seg, unit_text), 1))
    assert {t.dtype for t in got.logits + got.distances} == {torch.float32}
    assert len(got.logits) == len(got.distances) == len(logits) == len(distances) == len(data)
    assert all(torch.equal(a, b) for a, b in zip(got.logits + got.distances, logits + distances))
    assert got.zero_image == zero_image and len(got.zero_image) == len(data)


def test_training_losses_in_fp32(setup):
    model, data, text = setup
    items = [data[i] for i in (2, 3)]  # the two abnormal test images
    # [2, 3|1, H, W]
    images, masks = torch.stack([x for x, _, _ in items]), torch.stack([m for _, _, m in items])
    labels = torch.tensor([1.0, 1.0])
    state = {k: v.clone() for k, v in model.state_dict().items() if "adapters" in k}
    with torch.no_grad(), BF16.forward():
        _, seg, det = model(images)
    seg, det = [t.float() for t in seg], [t.float() for t in det]
    expected = segmentation_loss(seg, text, (masks > 0.5).float(), SIZE) + detection_loss(det, text, labels)
    try:
        loss = train_step(
            model,
            images,
            labels,
            masks,
            text,
            has_masks=True,
            optimizers=optimizers(model, 1e-3),
            precision=BF16,
            img_size=SIZE,
        )
        assert loss == pytest.approx(expected.item(), rel=1e-6)
        assert any(not torch.equal(v, state[k]) for k, v in model.state_dict().items() if k in state)
    finally:
        model.load_state_dict(state, strict=False)


def test_bf16_runs_take_the_fused_attention():
    """--precision bf16 builds the fused attention (the explicit path is ~35x slower in bf16 on the CPU at
    batch >= 2); every other precision keeps the reference's explicit path unless --fast."""
    from CLIP.model import Attention

    def fused(flags):
        model = tiny_model(*flags)
        return {m.fused for m in model.modules() if isinstance(m, Attention)}

    assert fused(["--precision", "bf16"]) == {True}
    assert fused(["--precision", "fp32"]) == {False}
    assert fused([]) == {False}
    assert fused(["--fast"]) == {True}
