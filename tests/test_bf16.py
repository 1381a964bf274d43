"""--precision bf16 (issue 13): the forwards run under bf16 autocast and everything after them in fp32, so the score
material and the training losses are exactly fp32 maths on the bf16 forward's tokens. Tiny random CLIP, CPU."""
import pytest
import torch
from torch.utils.data import DataLoader

import fewshot
from CLIP import build_model
from dataset.medical_few import MedDataset
from dataset.synth import make_synthetic_bmad
from evaluate import Collected, build_memory, collect, score_batch
from loss import detection_loss, segmentation_loss
from training import optimizers, train_step
from utils import augment, autocast

SIZE = 56
TINY = ["--model_name", "demo-tiny", "--pretrain", "none", "--features_list", "3", "6", "9", "12",
        "--img_size", str(SIZE), "--device", "cpu"]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny adapted CLIP, Brain-style synthetic data (2 images per folder) and unit text features [E, 2]."""
    synth = make_synthetic_bmad(str(tmp_path_factory.mktemp("bf16")), n_per_split=2, seed=0, img_size=SIZE,
                                objs=("Brain",), shots=(1,))
    torch.manual_seed(0)
    model = build_model(fewshot.test_parser().parse_args(TINY), CPU)
    data = MedDataset(synth.data, "Brain", SIZE, 1, 0, seed_root=synth.seed_root)
    text = torch.nn.functional.normalize(torch.randn(model.clipmodel.text_projection.shape[1], 2), dim=0)
    return model, data, text


def test_forward_runs_in_bf16(setup):
    model, data, _ = setup
    with torch.no_grad(), autocast(CPU, "bf16"):
        _, seg, det = model(data[0][0][None])
    assert {t.dtype for t in seg + det} == {torch.bfloat16}


def test_collect_scores_the_bf16_tokens_in_fp32(setup):
    model, data, text = setup
    memory = build_memory(model, augment(data.support.normal)[0], CPU, "bf16", batch_size=4)
    got = collect(model, DataLoader(data, batch_size=2), text.bfloat16(), CPU, has_masks=True, memory=memory,
                  precision="bf16", img_size=SIZE)
    expected = Collected(True, SIZE)
    for images, _, _ in DataLoader(data, batch_size=2):
        with torch.no_grad(), autocast(CPU, "bf16"):
            _, seg, det = model(images)
        with torch.no_grad():  # no autocast: fp32 maths on the bf16 tokens (and text) cast up
            score_batch(expected, [t.float() for t in seg], [t.float() for t in det], text.bfloat16().float(), memory)
    assert {t.dtype for t in got.zero_logits + got.few_distances} == {torch.float32}
    assert all(torch.equal(a, b) for a, b in zip(got.zero_logits + got.few_distances,
                                                 expected.zero_logits + expected.few_distances))
    assert got.zero_image == expected.zero_image and len(got.zero_image) == len(data)


def test_training_losses_in_fp32(setup):
    model, data, text = setup
    items = [data[i] for i in (2, 3)]  # the two abnormal test images
    images, masks = torch.stack([x for x, _, _ in items]), torch.stack([m for _, _, m in items])  # [2, 3|1, H, W]
    labels = torch.tensor([1.0, 1.0])
    state = {k: v.clone() for k, v in model.state_dict().items() if "adapters" in k}
    with torch.no_grad(), autocast(CPU, "bf16"):
        _, seg, det = model(images)
    seg, det = [t.float() for t in seg], [t.float() for t in det]
    expected = segmentation_loss(seg, text, (masks > 0.5).float(), SIZE) + detection_loss(det, text, labels)
    try:
        seg_opt, det_opt = optimizers(model, 1e-3)
        loss = train_step(model, images, labels, masks, text, has_masks=True, seg_opt=seg_opt, det_opt=det_opt,
                          device=CPU, precision="bf16", img_size=SIZE)
        assert loss == pytest.approx(expected.item(), rel=1e-6)
        assert any(not torch.equal(v, state[k]) for k, v in model.state_dict().items() if k in state)
    finally:
        model.load_state_dict(state, strict=False)


def test_bf16_runs_take_the_fused_attention():
    """--precision bf16 builds the fused attention (the explicit path is ~35x slower in bf16 on the CPU at batch >= 2);
    every other precision keeps the reference's explicit path unless --fast."""
    from CLIP.model import Attention

    def fused(flags):
        model = build_model(fewshot.test_parser().parse_args(TINY + flags), CPU)
        return {m.fused for m in model.modules() if isinstance(m, Attention)}
    assert fused(["--precision", "bf16"]) == {True}
    assert fused(["--precision", "fp32"]) == {False}
    assert fused([]) == {False}
    assert fused(["--fast"]) == {True}
