"""--precision bf16 (this repository's addition, for speed on CPUs with bf16 instructions): the forwards run
under bf16 autocast and everything after them in fp32, so the score material and the training losses are
exactly fp32 maths on the bf16 forward's tokens, which these tests recompute from their definition in plain
torch. Tiny random CLIP, CPU."""

import pytest
import torch
from conftest import SIZE, TINY
from scoring_spec import spec_distances, spec_image_score, spec_logits, spec_losses, spec_unit
from torch.utils.data import DataLoader

import test_few
from dataset.augment import augment
from dataset.medical_few import MedDataset
from dataset.synthetic import make_synthetic_bmad
from mvfa.config import configs
from mvfa.evaluation import build_memory, collect
from mvfa.precision import Precision
from mvfa.training import optimizers, train_step

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


# bf16 keeps 8 significant bits: unit roundoff u = 2^-8. The tiny model's tokens pass 12 blocks (two rounded
# branch outputs each) and an adapter (two rounded products): n = 26 roundings of relative size u, which add
# like a random walk, sqrt(n) u ~ 0.02 of a token's norm; twice that for rounding errors that happen to align.
BF16_U = 2.0**-8
BF16_TOKEN_REL = 2 * (2 * 12 + 2) ** 0.5 * BF16_U


def test_forward_runs_in_bf16_near_the_fp32_forward(setup):
    """The bf16 forward's tokens are bf16, and within bf16's rounding of the fp32 forward's (relative L2
    error per token), yet not equal to them (the forward did run in bf16)."""
    model, data, _ = setup
    image = data[0][0][None]
    with torch.no_grad():
        _, seg32, det32 = model(image)
        with BF16.forward():
            _, seg, det = model(image)
    assert {t.dtype for t in seg + det} == {torch.bfloat16}
    assert {t.dtype for t in seg32 + det32} == {torch.float32}
    for low, full in zip(seg + det, seg32 + det32):
        assert low.shape == full.shape
        relative = (low.float() - full).norm(dim=-1) / full.norm(dim=-1)  # [1, 1+HW]
        assert float(relative.max()) <= BF16_TOKEN_REL
        assert not torch.equal(low.float(), full)


def test_memory_bank_rows_are_unit_rows_of_the_bf16_tokens(setup):
    """build_memory under bf16: the forward in bf16, the rows (CLS included) made unit in fp32."""
    model, data, _ = setup
    support = augment(data.support.normal)[0]  # [11, 3, H, W]
    seg_bank, det_bank = build_memory(model, support, BF16, batch_size=4)
    seg_rows, det_rows = [[] for _ in seg_bank], [[] for _ in det_bank]
    for batch in support.split(4):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            _, seg, det = model(batch)
        for rows, layers in ((seg_rows, seg), (det_rows, det)):
            for kept, t in zip(rows, layers):
                kept.append(t.reshape(-1, t.shape[-1]))  # [b * (1+HW), D]
    for bank, rows in ((seg_bank, seg_rows), (det_bank, det_rows)):
        for got, kept in zip(bank, rows):
            expected = spec_unit(torch.cat(kept).float())
            assert got.dtype == torch.float32 and torch.equal(got, expected)
            torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(got)), rtol=0, atol=1e-6)


def test_collect_scores_the_bf16_tokens_in_fp32(setup):
    """collect's logits, distances and image scores are the fp32 maths of the bf16 forward's tokens (and of
    the text features rounded to bf16 as given), computed here from their definition."""
    model, data, text = setup
    memory = build_memory(model, augment(data.support.normal)[0], BF16, batch_size=4)
    got = collect(model, DataLoader(data, batch_size=2), text.bfloat16(), BF16, has_masks=True, memory=memory)
    assert got.head == "seg" and got.fewshot
    logits, distances, zero_image = [], [], []  # the seg head's map material and the det head's image scores
    unit_text = text.bfloat16().float()
    for images, _, _ in DataLoader(data, batch_size=2):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            _, seg, det = model(images)
        seg, det = [t.float() for t in seg], [t.float() for t in det]
        with torch.no_grad():
            logits += list(torch.stack([spec_logits(t, unit_text) for t in seg], 1))  # B x [L, HW, 2]
            distances += list(torch.stack([spec_distances(m, t) for m, t in zip(memory[0], seg)], 1))
            zero_image += spec_image_score(det, unit_text).tolist()
    assert {t.dtype for t in got.logits + got.distances} == {torch.float32}
    assert len(got.logits) == len(got.distances) == len(logits) == len(distances) == len(data)
    for a, b in zip(got.logits + got.distances, logits + distances):
        assert a.shape == b.shape and torch.equal(a, b)
    assert got.zero_image == zero_image
    # the values themselves: probabilities summed over 4 layers, cosine distances in [0, 2], logits at 100
    assert all(0 < s < 4 for s in got.zero_image)
    assert all(float(d.min()) >= 0 and float(d.max()) <= 2 for d in got.distances)
    assert all(float(z.abs().max()) <= 100 * (1 + 1e-6) for z in got.logits)


def test_training_losses_in_fp32(setup):
    """train_step under bf16: the loss is the fp32 loss of the bf16 forward's tokens, computed here from its
    definition; both Adam steps are taken, each weight moving by lr * g / (|g| + eps) (Adam's first step),
    g the gradient of that loss."""
    model, data, text = setup
    items = [data[i] for i in (2, 3)]  # the two abnormal test images
    # [2, 3|1, H, W]
    images, masks = torch.stack([x for x, _, _ in items]), torch.stack([m for _, _, m in items])
    labels = torch.tensor([1.0, 1.0])
    lr = 1e-3
    state = {k: v.clone() for k, v in model.state_dict().items() if "adapters" in k}
    params = {k: p for k, p in model.named_parameters() if "adapters" in k}
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, seg, det = model(images)
        seg, det = [t.float() for t in seg], [t.float() for t in det]
        seg_loss, det_loss = spec_losses(seg, det, text, masks, labels)
        expected = seg_loss + det_loss
        grads = dict(zip(params, torch.autograd.grad(expected, list(params.values()), allow_unused=True)))
        # the last block's fc2 outputs feed only the pooled output, which no loss reads: no gradient, no step
        unused = {k for k, g in grads.items() if g is None}
        assert unused == {f"{head}.{len(seg) - 1}.fc2.0.weight" for head in ("seg_adapters", "det_adapters")}
        loss = train_step(
            model,
            images,
            labels,
            masks,
            text,
            has_masks=True,
            optimizers=optimizers(model, lr),
            precision=BF16,
            img_size=SIZE,
        )
        assert loss == pytest.approx(expected.item(), rel=1e-6)
        after = model.state_dict()
        for key, g in grads.items():
            step = after[key] - state[key]
            expected_step = torch.zeros_like(step) if g is None else -lr * g / (g.abs() + 1e-8)
            torch.testing.assert_close(step, expected_step, rtol=0, atol=lr * 1e-3, msg=key)
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
