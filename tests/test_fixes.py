"""Opt-in fixes of reference quirks that are not tested elsewhere: --bce_on_probability (the reference applies
BCE-with-logits to a probability), --sort_listing (its draws follow the unsorted file listing) and
--deterministic (cudnn.deterministic alone does not make its CUDA training reproducible). Known answers for
the maths, and each flag followed from the command line to the code it changes."""

import inspect
import math
import os
import random

import pytest
import torch
from test_scripts import TINY, script_args

import dataset.files
import loss
import test_few
import train_few
import train_zero
from dataset.medical_zero import MedTrainDataset
from mvfa import protocol, training
from mvfa.config import configs
from mvfa.seeding import setup_seed

pytestmark = pytest.mark.usefixtures("one_thread")

D = 8  # token width of the hand-made detection tokens


def tokens_with_score(p: float, batch: int = 1, patches: int = 4) -> torch.Tensor:
    """Det tokens [B, 1+HW, D] whose every patch has abnormal probability p against TEXT
    (the CLS row is junk)."""
    gap = math.log(p / (1 - p)) / 100  # softmax(100 * [cos t, sin t])[1] == p when sin t - cos t == gap
    angle = math.pi / 4 + math.asin(gap / math.sqrt(2))
    patch = torch.zeros(D)
    patch[0], patch[1] = math.cos(angle), math.sin(angle)
    # [1+HW, D]; rows get normalised
    rows = torch.cat([torch.full((1, D), 7.0), patch.expand(patches, D) * 3.0])
    return rows.expand(batch, -1, -1).clone()


TEXT = torch.zeros(D, 2)
TEXT[0, 0] = TEXT[1, 1] = 1.0  # [D, 2]: normal column e0, abnormal column e1


@pytest.mark.parametrize("p,label", [(0.9, 1.0), (0.2, 1.0), (0.7, 0.0)])
def test_detection_loss_known_answers(p, label):
    tokens = tokens_with_score(p)
    layers = [tokens, tokens, tokens]
    labels = torch.tensor([label])
    reference = loss.detection_loss(layers, TEXT, labels)
    fixed = loss.detection_loss(layers, TEXT, labels, bce_on_probability=True)
    # as the reference: BCE-with-logits of the probability,
    # i.e. log(1 + e^-p) for label 1, log(1 + e^p) for label 0
    with_logits = math.log1p(math.exp(-p)) if label else math.log1p(math.exp(p))
    plain = -math.log(p) if label else -math.log(1 - p)
    assert reference.item() == pytest.approx(3 * with_logits, rel=1e-5)
    assert fixed.item() == pytest.approx(3 * plain, rel=1e-5)
    assert fixed.dtype == torch.float32


def test_reference_loss_has_a_floor_the_fix_does_not():
    """The quirk in numbers: a perfect abnormal score still costs log(1 + 1/e) per layer;
    the fix goes to zero."""
    sure = [tokens_with_score(1 - 1e-6)]
    assert loss.detection_loss(sure, TEXT, torch.tensor([1.0])).item() == pytest.approx(
        math.log1p(math.exp(-1)), rel=1e-4
    )
    assert loss.detection_loss(sure, TEXT, torch.tensor([1.0]), bce_on_probability=True).item() < 1e-4


def test_bce_on_probability_under_autocast():
    """Plain BCE refuses autocast on CUDA; the fix computes it outside autocast in fp32
    (here under CPU bf16)."""
    tokens = [tokens_with_score(0.5, batch=2)]  # equal logits, also in bf16: p = 0.5 exactly
    labels = torch.tensor([1.0, 0.0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fixed = loss.detection_loss(tokens, TEXT, labels, bce_on_probability=True)
    assert fixed.dtype == torch.float32 and fixed.item() == pytest.approx(math.log(2), rel=1e-6)


@pytest.mark.parametrize("module,obj", [(train_few, "Brain"), (train_zero, "Chest")])
@pytest.mark.parametrize("flag", [False, True])
def test_bce_flag_reaches_every_training_step(module, obj, flag, synth, tmp_path, monkeypatch):  # noqa: F811
    """Each training step's detection loss gets the flag (checked by a spy; the maths is tested above)."""
    seen = []

    def spy(det, text, labels, bce_on_probability=False):
        seen.append(bce_on_probability)
        return real(det, text, labels, bce_on_probability)

    real = loss.detection_loss
    monkeypatch.setattr(training, "detection_loss", spy)
    extra = [
        "--epoch",
        "1",
        "--select",
        "last",
        "--save_model",
        "0",
        *(["--bce_on_probability"] if flag else []),
    ]
    seed_dir = synth.seed_root if module is train_few else None
    if module is train_few:
        extra += ["--shot", "1"]
    module.main(script_args(synth.data, tmp_path, obj, *extra, seed_dir=seed_dir))
    assert len(seen) > 0 and set(seen) == {flag}


def reversed_listing(monkeypatch) -> None:
    """os.listdir as another file system might order it: reversed."""
    listdir = os.listdir
    monkeypatch.setattr(dataset.files.os, "listdir", lambda path: sorted(listdir(path), reverse=True))


def drawn_support(synth, *flags: str) -> tuple[list[str], list[str]]:  # noqa: F811
    flags = vars(
        test_few.parser().parse_args(
            [*TINY, "--obj", "Liver", "--data_path", synth.data, "--shot", "2", "--iterate", "-1", *flags]
        )
    )
    run = configs(flags, protocol="few")[1]
    setup_seed(run.seed)
    support = protocol.test_set(run, -1).support
    return support.normal_files, support.abnormal_files


def expected_draw(synth, order) -> tuple[list[str], list[str]]:  # noqa: F811
    """The reference's draw: random.sample over the listing, normal then abnormal, after setup_seed(111)."""
    root = os.path.join(synth.data, "Liver_AD", "valid")
    random.seed(111)
    return tuple(
        random.sample(order(os.listdir(os.path.join(root, state, "img"))), 2) for state in ("good", "Ungood")
    )


def test_sort_listing_draws_do_not_depend_on_the_listing(synth, monkeypatch):  # noqa: F811
    sorted_draw = expected_draw(synth, sorted)
    assert drawn_support(synth, "--sort_listing") == sorted_draw
    with monkeypatch.context() as m:
        reversed_listing(m)
        assert drawn_support(synth, "--sort_listing") == sorted_draw
        # the reference's behaviour, kept by default: the draw follows the listing order
        reversed_draw = expected_draw(synth, lambda names: sorted(names, reverse=True))
        assert drawn_support(synth) == reversed_draw
    assert reversed_draw != sorted_draw  # the seed and data make the two orders give different draws


def test_train_zero_sort_listing_groups(synth, tmp_path, monkeypatch):  # noqa: F811
    """--sort_listing reaches MedTrainDataset, whose groups then do not depend on the listing order."""
    made = []

    class Stop(Exception):
        pass

    def spy(*args, **kwargs):
        made.append(inspect.signature(MedTrainDataset).bind(*args, **kwargs).arguments.get("sort_listing"))
        raise Stop

    monkeypatch.setattr(protocol, "MedTrainDataset", spy)
    for flags, expected in (([], False), (["--sort_listing"], True)):
        with pytest.raises(Stop):
            train_zero.main(
                [
                    *TINY,
                    "--data_path",
                    synth.data,
                    *flags,
                    "--save_path",
                    str(tmp_path / "ckpt"),
                    "--out_dir",
                    str(tmp_path),
                ]
            )
        assert made.pop() is expected

    def groups() -> list:
        random.seed(3)
        return MedTrainDataset(synth.data, "Brain", img_size=16, batch_size=2, sort_listing=True).data

    in_order = groups()
    reversed_listing(monkeypatch)
    assert groups() == in_order


@pytest.fixture
def restore_determinism():
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def test_deterministic_training_on_the_cpu(synth, tmp_path, restore_determinism):  # noqa: F811
    """--deterministic turns torch's deterministic mode on;
    on the CPU the trained adapters equal those without it."""
    saved = []
    for name, flags in (("plain", []), ("deterministic", ["--deterministic"])):
        torch.use_deterministic_algorithms(False)
        extra = ["--epoch", "1", "--shot", "1", "--select", "last", *flags]
        train_few.main(script_args(synth.data, tmp_path / name, "Brain", *extra, seed_dir=synth.seed_root))
        assert torch.are_deterministic_algorithms_enabled() == bool(flags)
        saved.append(
            torch.load(tmp_path / name / "ckpt" / "Brain.pth", map_location="cpu", weights_only=True)
        )
    for part in ("seg_adapters", "det_adapters"):
        assert saved[0][part].keys() == saved[1][part].keys()
        assert all(torch.equal(saved[0][part][k], saved[1][part][k]) for k in saved[0][part])
