"""The core model against the reference's recorded outputs (tests/fixtures/reference/goldens_seed0_small.pt,
recorded on the CPU in fp32; its large tensors are probes, compared with assert_matches_probe)."""

import numpy as np
import pytest
import torch
from conftest import assert_matches_probe
from PIL import Image

from CLIP import tokenize
from dataset import CLASS_NAMES, load_image, load_mask
from dataset.augment import augment
from loss import dice_loss, focal_loss
from mvfa import training
from mvfa.config import ModelConfig, cache_folder
from mvfa.precision import Precision
from mvfa.text_cache import text_cache
from prompt import prompt_name, prompt_sentences, text_features_for

TOKEN_TOL = 1e-4  # absolute, on O(1) values
LOSS_RTOL = 1e-5

# The files under data/Brain_AD/ that the reference's augmentation and loss inputs were loaded from (found by
# comparing every generated image and mask with the full goldens; tests/fixtures/reference/README.md)
AUGMENT_ABNORMAL = "valid/good/img/00000_85.png"
AUGMENT_MASK = "test/Ungood/anomaly_mask/00000_83.png"
AUGMENT_NORMAL = ("valid/good/img/00000_85.png", "valid/good/img/00001_66.png")


def test_token_ids(goldens):
    ids = tokenize(goldens["token_strings"])
    assert ids.dtype == torch.int32 and torch.equal(ids, goldens["tokens_ids"])


# ViT-L text encodings (~30-90 s each on 2 cores): the slow tier. The quick tier's replay of a recorded
# training's first steps (tests/test_reference_runs.py) compares losses computed from Brain's.
@pytest.mark.slow
@pytest.mark.parametrize("obj", CLASS_NAMES)
def test_text_features(goldens, brain_model, reference_assets, obj):
    """Encoded here by the scripts' own function (prompt.text_features_for), then kept in the text cache of
    this session's folder for the later runs on the same weights; an entry an earlier run of this worker kept
    there (the recorded runs share that folder, in any order) is checked against the goldens too."""
    cpu = torch.device("cpu")
    auto = Precision.of("auto", cpu)
    model_cfg = ModelConfig(clip_ckpt=str(reference_assets / "CLIP/ckpt/ViT-L-14-336px.pt"))
    store = text_cache(model_cfg, auto, cpu, cache_folder(None))
    name, sentences = prompt_name(obj), prompt_sentences(prompt_name(obj))
    kept = store.get(name, sentences)
    features = text_features_for(brain_model.clipmodel, [obj], cpu, auto)[obj]  # no store: encoded here
    assert features.shape == (768, 2)
    torch.testing.assert_close(features, goldens["text_features"][obj], atol=TOKEN_TOL, rtol=0, msg=obj)
    if kept is None:
        store.put(name, sentences, features)
        assert torch.equal(store.get(name, sentences), features)
    else:
        torch.testing.assert_close(kept, goldens["text_features"][obj], atol=TOKEN_TOL, rtol=0, msg=obj)


def test_adapted_forward(goldens, brain_model, golden_image):
    with torch.no_grad():
        pooled, seg, det = brain_model(golden_image)
    torch.testing.assert_close(pooled, goldens["pooled"], atol=TOKEN_TOL, rtol=0)
    assert len(seg) == len(det) == 4
    names = [f"seg_tokens[{i}]" for i in range(4)] + [f"det_tokens[{i}]" for i in range(4)]
    for got, expected, name in zip(seg + det, goldens["seg_tokens"] + goldens["det_tokens"], names):
        assert got.shape == (1, 290, 768)
        assert_matches_probe(got, expected, atol=TOKEN_TOL, msg=name)


@pytest.fixture(scope="module")
def augment_inputs(reference_assets, goldens):
    """The augmentation's inputs as the reference loaded them, each checked against the goldens' probe of it:
    (abnormal image [1, 3, 240, 240], its mask [1, 1, 240, 240], two normal images [2, 3, 240, 240])."""
    brain = reference_assets / "data" / "Brain_AD"
    abnormal = load_image(str(brain / AUGMENT_ABNORMAL), 240)[None]
    mask = load_mask(str(brain / AUGMENT_MASK), 240)[None]
    normal = torch.stack([load_image(str(brain / name), 240) for name in AUGMENT_NORMAL])
    assert_matches_probe(abnormal, goldens["augment_in_abnormal"], msg="augment_in_abnormal")
    assert_matches_probe(mask, goldens["augment_in_mask"], msg="augment_in_mask")
    assert_matches_probe(normal, goldens["augment_in_normal"], msg="augment_in_normal")
    return abnormal, mask, normal


def test_augmentations(goldens, augment_inputs):
    abnormal, mask, normal = augment_inputs
    images, masks = augment(abnormal, mask)
    assert_matches_probe(images, goldens["augment_abnormal_img"], atol=TOKEN_TOL, msg="augment_abnormal_img")
    assert_matches_probe(masks, goldens["augment_abnormal_mask"], atol=TOKEN_TOL, msg="augment_abnormal_mask")
    images, masks = augment(normal)
    assert_matches_probe(images, goldens["augment_normal_img"], atol=TOKEN_TOL, msg="augment_normal_img")
    assert_matches_probe(masks, goldens["augment_normal_mask"], msg="augment_normal_mask")


def test_focal_and_dice(goldens, reference_assets):
    """On the reference's probability map (kept whole in the fixture) and its mask, rebuilt from its file."""
    prob = goldens["loss_prob"]
    mask = load_mask(str(reference_assets / "data" / "Brain_AD" / AUGMENT_MASK), 240)
    assert_matches_probe(mask, goldens["loss_mask"], msg="loss_mask")
    assert focal_loss(prob, mask).item() == pytest.approx(goldens["focal"], rel=LOSS_RTOL)
    assert dice_loss(prob[:, 1], mask).item() == pytest.approx(goldens["dice"], rel=LOSS_RTOL)


def test_one_training_step(goldens, brain_model, reference_assets, golden_image, monkeypatch):
    """The project's training step (mvfa.training.train_step with the optimisers of mvfa.training.optimizers)
    on the goldens' image: its det, seg and total losses, and every adapter weight after its Adam steps, as
    the reference's training loop took them."""
    model = brain_model
    state = {k: v.clone() for k, v in model.state_dict().items() if "adapters" in k}
    mask_file = reference_assets / "data" / goldens["image_file"].replace("/img/", "/anomaly_mask/")
    mask = np.asarray(Image.open(mask_file).convert("L").resize((240, 240), Image.NEAREST), np.float32) / 255
    text = goldens["text_features"]["Brain"]
    model.clipmodel.requires_grad_(False)  # frozen, as ModelConfig.build leaves it
    losses = {}  # what the step's two losses returned, recorded on the way

    def recorded(name, loss_fn):
        def call(*args, **kwargs):
            losses[name] = loss_fn(*args, **kwargs)
            return losses[name]

        return call

    monkeypatch.setattr(training, "detection_loss", recorded("det", training.detection_loss))
    monkeypatch.setattr(training, "segmentation_loss", recorded("seg", training.segmentation_loss))
    try:
        loss = training.train_step(
            model,
            golden_image,
            torch.tensor([1.0]),
            torch.from_numpy(mask)[None, None],  # [1, 1, H, W] grey levels / 255: the step binarises them
            text,
            has_masks=True,
            optimizers=training.optimizers(model, 1e-3),
            precision=Precision.of("auto", torch.device("cpu")),
            img_size=240,
        )
        assert losses["det"].item() == pytest.approx(goldens["step_det_loss"], rel=LOSS_RTOL)
        assert losses["seg"].item() == pytest.approx(goldens["step_seg_loss"], rel=LOSS_RTOL)
        assert loss == pytest.approx(goldens["step_loss"], rel=LOSS_RTOL)
        for name in ("seg_adapters", "det_adapters"):
            weights = getattr(model, name).state_dict()
            assert set(weights) == set(goldens[f"step_{name}"])
            for key, probe in goldens[f"step_{name}"].items():
                before = state[f"{name}.{key}"]  # the step changes values, never shape or dtype
                full = {**probe, "shape": tuple(before.shape), "dtype": before.dtype}
                assert_matches_probe(weights[key], full, atol=1e-5, msg=f"{name}.{key}")
                flat = weights[key].flatten()
                assert flat.double().sum().item() == pytest.approx(probe["sum"], abs=1e-3)
                assert flat.double().norm().item() == pytest.approx(probe["norm"], rel=1e-6)
    finally:
        model.load_state_dict(state, strict=False)  # leave the shared model as loaded
