"""Anomaly maps: the drawing helpers of mvfa/maps.py, --save_maps of test_few.py / test_zero.py, and
tools/predict.py on one's own images (8-bit, grey, 16-bit and TIFF inputs, few-shot, calibration), with the
tiny random CLIP on synthetic data."""

import csv
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SIZE, TINY
from PIL import Image
from scoring_spec import spec_few_map, spec_unit, spec_zero_map
from sklearn.metrics import roc_auc_score

import prompt
import test_few
import test_zero
from dataset import load_image
from dataset.augment import augment
from dataset.synthetic import make_synthetic_bmad
from mvfa import maps, text_cache
from mvfa.config import ModelConfig, configs, pick
from mvfa.precision import Precision
from tools import predict

OVERLAY_PX = (900, 460)  # figsize (4.2 * 2 + 0.6, 4.6) at 100 dpi
NAME = re.compile(r"^(\d{5})_(normal|abnormal)_(\d{5})\.png$")


@pytest.fixture(scope="module", autouse=True)
def fast():
    """The tiny CLIP is the same seed-0 model in every run, so are its text features: encode each name once.
    One thread: on a shared 2-core machine, torch's thread pool makes these tiny forwards ~30x slower."""
    real, cache, threads = text_cache.text_features_for, {}, torch.get_num_threads()
    torch.set_num_threads(1)

    def cached(clip_model, objs, device, precision, store=None):
        if tuple(objs) not in cache:
            cache[tuple(objs)] = real(clip_model, objs, device, precision)
        return cache[tuple(objs)]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(text_cache, "text_features_for", cached)  # the scripts' and predict's one path to them
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Synthetic Brain (masks) and Chest (image-only), 3 images per folder, and a tiny adapter checkpoint."""
    root = tmp_path_factory.mktemp("maps")
    synth = make_synthetic_bmad(
        str(root / "synth"), n_per_split=3, seed=0, img_size=64, objs=("Brain", "Chest"), shots=(2,)
    )
    model_cfg, _, precision, device = configs(vars(test_few.parser().parse_args(TINY)), protocol="few")
    torch.manual_seed(0)
    torch.save(model_cfg.build(device, precision).adapter_state(), root / "tiny.pth")
    return synth, root / "tiny.pth"


def _size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        return img.size


def _pngs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.png") if p.name != "grid.png")


TEST_LABELS = [0, 0, 0, 1, 1, 1]  # the synthetic test sets: 3 normal, then 3 abnormal images


def _assert_image_auroc(result: dict) -> None:
    """A run's image AUROC is sklearn's on its own image scores and the test set's labels."""
    assert len(result["image_scores"]) == len(TEST_LABELS)
    assert result["image_auroc"] == roc_auc_score(TEST_LABELS, result["image_scores"])


def _resize_aligned(a: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear resize of [H0, W0] to [h, w] with the corner pixels' centres aligned, in float64."""
    y, x = np.linspace(0, a.shape[0] - 1, h), np.linspace(0, a.shape[1] - 1, w)
    y0 = np.minimum(np.floor(y).astype(int), a.shape[0] - 2)
    x0 = np.minimum(np.floor(x).astype(int), a.shape[1] - 2)
    wy, wx = (y - y0)[:, None], (x - x0)[None, :]
    a = a.astype(np.float64)
    top = a[y0][:, x0] * (1 - wx) + a[y0][:, x0 + 1] * wx
    bottom = a[y0 + 1][:, x0] * (1 - wx) + a[y0 + 1][:, x0 + 1] * wx
    return top * (1 - wy) + bottom * wy


# ---------------------------------------------------------------- drawing helpers, no model


def test_grid_selection_known_answers():
    labels, scores = [0, 0, 1, 1, 1], [0.9, 0.1, 0.5, 0.8, 0.2]
    assert maps.grid_selection(labels, scores, 3) == [3, 2, 0]  # 2 best abnormal, then the worst normal
    assert maps.grid_selection(labels, scores, 8) == [3, 2, 4, 0, 1]  # everything, abnormal first
    assert maps.grid_selection([0, 0, 0, 1], [0.3, 0.2, 0.1, 0.0], 3) == [3, 0, 1]  # normals fill in


def test_overlay_draws_heat_outline_and_sizes(tmp_path):
    image = torch.full((3, 40, 40), 0.5)
    mask = np.zeros((40, 40))
    mask[10:30, 10:30] = 1

    def pixels(heat, mask, name):
        path = maps.overlay(image, heat, mask, 0.75, "t", tmp_path / name)
        assert _size(path) == OVERLAY_PX
        return np.asarray(Image.open(path).convert("RGB")).astype(int)

    hot, cold = pixels(np.ones((40, 40)), None, "hot.png"), pixels(np.zeros((40, 40)), None, "cold.png")
    assert (hot[..., 0] - hot[..., 2]).mean() > (cold[..., 0] - cold[..., 2]).mean() + 5  # red vs blue map
    magenta = lambda a: ((a[..., 0] > 180) & (a[..., 1] < 90) & (a[..., 2] > 180)).sum()
    assert magenta(pixels(np.zeros((40, 40)), mask, "outlined.png")) > 50 and magenta(cold) == 0
    # uint8 images, [1, H, W] masks and a missing map are accepted; a wrong shape is refused
    path = maps.overlay(
        torch.full((3, 40, 40), 128, dtype=torch.uint8), None, mask[None], 0.1, "t", tmp_path / "plain.png"
    )
    assert _size(path) == (420, 460)
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        maps.overlay(np.zeros((40, 40, 3)), None, None, 0.0, "t", tmp_path / "bad.png")
    with pytest.raises(ValueError, match=r"size \(20, 20\) over an image of size \(40, 40\)"):
        maps.overlay(image, np.zeros((20, 20)), None, 0.0, "t", tmp_path / "bad.png")


# ---------------------------------------------------------------- --save_maps of the test scripts


def test_few_shot_save_maps_brain(setup, tmp_path):
    synth, ckpt = setup
    out = tmp_path / "maps"
    record = test_few.main(
        TINY
        + [
            "--obj",
            "Brain",
            "--data_path",
            synth.data,
            "--seed_dir",
            synth.seed_root,
            "--shot",
            "2",
            "--ckpt",
            str(ckpt),
            "--out_dir",
            str(tmp_path / "rec"),
            "--save_maps",
            str(out),
            "--grid_n",
            "4",
        ]
    )
    assert "pixel_auroc" in record  # the run's record: it completed
    _assert_image_auroc(record)
    names = _pngs(out)
    parsed = [NAME.match(n).groups() for n in names]
    assert [int(i) for i, _, _ in parsed] == list(range(6))
    assert [label for _, label, _ in parsed] == ["normal"] * 3 + ["abnormal"] * 3  # the test list's order
    assert all(_size(out / n) == OVERLAY_PX for n in names)
    assert _size(out / "grid.png") == (840, round(100 * (2.7 * 4 + 0.4)))  # 4 rows


def test_several_draws_get_a_folder_each(setup, tmp_path):
    synth, ckpt = setup
    out = tmp_path / "maps"
    record = test_few.main(
        TINY
        + [
            "--obj",
            "Brain",
            "--data_path",
            synth.data,
            "--seed_dir",
            synth.seed_root,
            "--shot",
            "2",
            "--iterate",
            "0",
            "1",
            "--ckpt",
            str(ckpt),
            "--out_dir",
            str(tmp_path / "rec"),
            "--save_maps",
            str(out),
            "--grid_n",
            "2",
        ]
    )
    for it in (0, 1):
        assert len(_pngs(out / f"iterate_{it}")) == 6 and (out / f"iterate_{it}" / "grid.png").is_file()
    # what main returns: each draw's metrics, and their mean and standard deviation (ddof 0)
    draws = record["draws"]
    assert [d["iterate"] for d in draws] == [0, 1]
    for draw in draws:
        _assert_image_auroc(draw)
    for key in ("image_auroc", "pixel_auroc"):
        values = [d[key] for d in draws]
        assert record["summary"][key] == {"mean": np.mean(values), "std": np.std(values)}


def test_zero_shot_save_maps_image_only_chest(setup, tmp_path, capsys):
    synth, ckpt = setup
    out = tmp_path / "maps"
    common = TINY + [
        "--obj",
        "Chest",
        "--data_path",
        synth.data,
        "--ckpt",
        str(ckpt),
        "--out_dir",
        str(tmp_path),
    ]
    record = test_zero.main(common + ["--save_maps", str(out)])  # det-head maps of an image-only dataset
    assert "pixel_auroc" not in record
    _assert_image_auroc(record)
    assert len(_pngs(out)) == 6 and all(_size(out / n) == OVERLAY_PX for n in _pngs(out))
    assert _size(out / "grid.png") == (840, round(100 * (2.7 * 6 + 0.4)))  # --grid_n 8 > 6 images: all rows
    with pytest.raises(SystemExit):
        test_zero.main(common + ["--save_maps", str(out), "--grid_n", "0"])
    assert "--grid_n: must be at least 1, got 0" in capsys.readouterr().err


# ---------------------------------------------------------------- tools/predict.py


@pytest.fixture(scope="module")
def inputs(setup, tmp_path_factory):
    """A folder with an 8-bit RGB png, a grey png, a 16-bit png (up to 60000)
    and a tif of the same grey scan."""
    synth, _ = setup
    folder = tmp_path_factory.mktemp("inputs")
    grey = np.asarray(Image.open(Path(synth.data) / "Brain_AD/test/Ungood/img/00000.png"))  # uint8 [64, 64]
    Image.fromarray(np.stack([grey, grey // 2, grey], -1)).save(folder / "a_rgb.png")
    Image.fromarray(grey).save(folder / "b_grey.png")
    Image.fromarray(grey.astype(np.uint16) * 235).save(folder / "c_deep.png")  # 255 * 235 = 59925
    Image.fromarray(grey).save(folder / "d_scan.tif")
    return folder


def _run_predict(setup, tmp_path, inputs, *extra) -> list[dict]:
    _, ckpt = setup
    out = tmp_path / "pred"
    returned = predict.main(TINY + ["--input", str(inputs), "--ckpt", str(ckpt), "--out", str(out), *extra])
    with open(out / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [{**r, "score": str(r["score"])} for r in returned] == rows  # main returns the rows of scores.csv
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == [f"{i:05d}_{Path(r['file']).stem}.png" for i, r in enumerate(rows)]
    assert all(_size(out / p) == OVERLAY_PX for p in pngs)
    return rows


def test_predict_zero_shot_scores_are_absolute(setup, inputs, tmp_path):
    rows = _run_predict(setup, tmp_path / "all", inputs, "--obj", "Brain")
    assert [Path(r["file"]).name for r in rows] == ["a_rgb.png", "b_grey.png", "c_deep.png", "d_scan.tif"]
    assert list(rows[0]) == ["file", "score"]
    scores = {Path(r["file"]).name: float(r["score"]) for r in rows}
    assert scores["b_grey.png"] == scores["d_scan.tif"]  # same pixels, png or tif
    assert scores["a_rgb.png"] != scores["b_grey.png"]
    # the det head's raw score: the same for an image alone as among others (one-image path included)
    alone = _run_predict(setup, tmp_path / "one", inputs / "c_deep.png", "--prompt_name", "Brain")
    assert [Path(r["file"]).name for r in alone] == ["c_deep.png"]
    assert float(alone[0]["score"]) == pytest.approx(scores["c_deep.png"], rel=1e-6)
    # calibrated on the inputs themselves: same scores, abnormal above their 50% quantile
    rows = _run_predict(
        setup, tmp_path / "cal", inputs, "--obj", "Brain", "--calibrate", str(inputs), "--fpr", "0.5"
    )
    assert {Path(r["file"]).name: float(r["score"]) for r in rows} == pytest.approx(scores, rel=1e-6)
    threshold = np.quantile(list(scores.values()), 0.5)
    assert [r["decision"] for r in rows] == [
        "abnormal" if s > threshold else "normal" for s in scores.values()
    ]


def test_predict_maps_at_the_input_size(setup, inputs, tmp_path):
    """--save_npy: each map over its input's own pixels. Run 1: a wide 16-bit input and one at the model's
    size. Run 2: the same model inputs, the wide one given as the float image of the model's size that it
    becomes. Run 1's wide map is the bilinear resize (corners aligned) of run 2's map of it; the maps at the
    model's size and all the scores are run 2's."""
    grey = np.asarray(Image.open(inputs / "b_grey.png"))  # [64, 64]
    one, two = tmp_path / "in1", tmp_path / "in2"
    one.mkdir(), two.mkdir()
    Image.fromarray(grey.astype(np.uint16) * 257).resize((90, 40)).save(one / "a_wide16.png")
    for folder in (one, two):
        Image.fromarray(grey).resize((SIZE, SIZE)).save(folder / "b_model_size.png")
    # the wide image as the model sees it: grey levels / 65535, bicubic to the model's size, clipped to [0, 1]
    levels = np.asarray(Image.open(one / "a_wide16.png")).astype(np.float64) / 65535
    plane = Image.fromarray(levels.astype(np.float32)).resize((SIZE, SIZE), Image.Resampling.BICUBIC)
    Image.fromarray(np.clip(np.asarray(plane), 0, 1)).save(two / "a_wide_at_model_size.tif")
    rows1 = _run_predict(setup, tmp_path / "1", one, "--obj", "Brain", "--save_npy")
    rows2 = _run_predict(setup, tmp_path / "2", two, "--obj", "Brain", "--save_npy")
    assert [r["score"] for r in rows1] == [r["score"] for r in rows2]
    wide = np.load(tmp_path / "1/pred/00000_a_wide16.npy")
    square = np.load(tmp_path / "1/pred/00001_b_model_size.npy")
    model_wide = np.load(tmp_path / "2/pred/00000_a_wide_at_model_size.npy")
    model_square = np.load(tmp_path / "2/pred/00001_b_model_size.npy")
    assert wide.shape == (40, 90) and square.shape == model_wide.shape == (SIZE, SIZE)
    assert wide.dtype == square.dtype == np.float32
    np.testing.assert_array_equal(square, model_square)
    np.testing.assert_allclose(wide, _resize_aligned(model_wide, 40, 90), rtol=0, atol=1e-6)
    # normalised over the pool of two: the two maps together span [0, 1]
    assert min(model_wide.min(), model_square.min()) == 0 and max(model_wide.max(), model_square.max()) == 1


def test_predict_equals_the_test_scripts_on_their_test_set(setup, tmp_path):
    """predict on a folder of a test set's images, in its order (its pool is then the test set). Zero-shot:
    its maps are test_zero.py's (--save_scores) and its absolute scores, min-max normalised over the set, are
    test_zero.py's. With --support the normal images of test_few.py's support draw: its scores and maps are
    test_few.py's. Images at the model's size: the maps written at the input's size are the model's."""
    _, ckpt = setup
    synth = make_synthetic_bmad(
        str(tmp_path / "synth"), n_per_split=3, seed=1, img_size=SIZE, objs=("Brain",), shots=(2,)
    )
    common = [*TINY, "--obj", "Brain", "--ckpt", str(ckpt)]
    scripts = [*common, "--data_path", synth.data, "--out_dir", str(tmp_path / "rec")]
    test_zero.main([*scripts, "--save_scores", str(tmp_path / "zero.npz")])
    few_args = ["--seed_dir", synth.seed_root, "--shot", "2", "--save_scores", str(tmp_path / "few.npz")]
    test_few.main([*scripts, *few_args])
    zero, few = np.load(tmp_path / "zero.npz"), np.load(tmp_path / "few.npz")
    files = [Path(f) for f in zero["files"]]
    assert files == [Path(f) for f in few["files"]] and zero["labels"].tolist() == TEST_LABELS
    inputs, support = tmp_path / "inputs", tmp_path / "support"
    inputs.mkdir(), support.mkdir()
    for i, f in enumerate(files):  # names that sort in test-set order
        (inputs / f"{i}_{f.name}").symlink_to(f)
    listed = (Path(synth.seed_root) / "Brain" / "2-shot.txt").read_text().splitlines()
    normal = next(line for line in listed if line.startswith("n-0:")).split()[1:3]  # draw 0's normal images
    for i, name in enumerate(normal):
        (support / f"{i}_{name}").symlink_to(Path(synth.data) / "Brain_AD" / "valid" / "good" / "img" / name)
    for extra, expected in (([], zero), (["--support", str(support)], few)):
        out = tmp_path / ("few" if extra else "zero")
        rows = predict.main([*common, "--input", str(inputs), "--out", str(out), "--save_npy", *extra])
        assert [Path(r["file"]).name for r in rows] == [f"{i}_{f.name}" for i, f in enumerate(files)]
        scores = np.array([float(r["score"]) for r in rows], dtype=np.float32)
        if not extra:  # zero-shot: the det head's raw score; the test script min-maxes it over the test set
            scores = (scores - scores.min()) / (scores.max() - scores.min())
        np.testing.assert_array_equal(scores, expected["image_scores"])
        maps = np.stack([np.load(out / f"{i:05d}_{i}_{f.stem}.npy") for i, f in enumerate(files)])
        np.testing.assert_array_equal(maps, expected["maps"])


def test_predict_few_shot_with_calibration(setup, inputs, tmp_path):
    synth, _ = setup
    support = Path(synth.data) / "Brain_AD/valid/good/img"
    rows = _run_predict(
        setup,
        tmp_path,
        inputs,
        "--obj",
        "Brain",
        "--support",
        str(support),
        "--calibrate",
        str(inputs),
        "--fpr",
        "0.3",
    )
    assert list(rows[0]) == ["file", "score", "decision"]
    scores = np.array([float(r["score"]) for r in rows])
    assert ((scores >= 0) & (scores <= 1)).all()  # max of maps min-max normalised over the pool
    # the calibration images are the inputs themselves: the threshold is the 70% quantile of these very scores
    threshold = np.quantile(scores, 0.7)
    assert [r["decision"] for r in rows] == ["abnormal" if s > threshold else "normal" for s in scores]
    assert {r["decision"] for r in rows} == {"normal", "abnormal"}


def test_predict_few_shot_single_image_uses_raw_maps(setup, inputs, tmp_path):
    """One input, no pool to normalise over: the score is the max of the raw fused map, 0.5 x the zero-shot
    map (sum over the layers of the abnormal pixel probability) + 0.5 x the few-shot map (sum over the layers
    of the distances to the memory bank of the 11 views of each support image), recomputed here from the
    tokens of the det head (Chest is image-only)."""
    synth, ckpt = setup
    support_dir = Path(synth.data) / "Chest_AD/valid/good/img"
    rows = _run_predict(
        setup, tmp_path, inputs / "a_rgb.png", "--obj", "Chest", "--support", str(support_dir)
    )
    assert len(rows) == 1
    cpu = torch.device("cpu")
    flags = vars(predict.parser().parse_args([*TINY, "--input", "x", "--ckpt", str(ckpt), "--obj", "Chest"]))
    precision = Precision.of(flags["precision"], cpu)
    model = pick(ModelConfig, flags).build(cpu, precision)
    model.load_adapters(ckpt)
    text = prompt.text_features_for(model.clipmodel, ["Chest"], cpu, precision)["Chest"]
    support = torch.stack([load_image(str(p), SIZE) for p in sorted(support_dir.iterdir())])
    bank_rows = []  # per view, per layer [1 + HW, D]; views by dataset.augment (test_goldens.py checks it)
    with torch.no_grad():
        for view in augment(support)[0]:
            bank_rows.append([t[0] for t in model(view[None])[2]])
        bank = [spec_unit(torch.cat(layer)) for layer in zip(*bank_rows)]  # per layer [11k (1 + HW), D]
        _, _, det = model(load_image(str(inputs / "a_rgb.png"), SIZE)[None])
        fused = 0.5 * spec_zero_map(det, text, SIZE) + 0.5 * spec_few_map(bank, det, SIZE)  # [1, S, S]
    assert float(rows[0]["score"]) == pytest.approx(float(fused.max()), rel=1e-6)


def test_sixteen_bit_and_float_images_are_scaled_not_clipped(tmp_path):
    values = np.array([[0, 30000], [60000, 65535]], dtype=np.uint16)
    for name in ("v.png", "v.tif"):
        Image.fromarray(values).save(tmp_path / name)
        a = predict.read_image(tmp_path / name)
        assert a.shape == (2, 2, 3) and a.dtype == np.float32
        np.testing.assert_array_equal(a[..., 1], (values / 65535).astype(np.float32))
        np.testing.assert_array_equal(predict.load_input(tmp_path / name, 2)[0].numpy(), a[..., 0])
    Image.fromarray(np.full((30, 20), 60000, np.uint16)).save(tmp_path / "flat.png")
    x = predict.load_input(tmp_path / "flat.png", 56)
    assert x.shape == (3, 56, 56) and torch.allclose(x, torch.tensor(60000 / 65535), atol=1e-6)
    # what an 8-bit conversion would give: clipped
    assert load_image(str(tmp_path / "flat.png"), 56).min() == 1.0
    # 8-bit files load exactly as the test datasets load them
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(tmp_path / "e.png")
    assert torch.equal(predict.load_input(tmp_path / "e.png", 56), load_image(str(tmp_path / "e.png"), 56))
    Image.fromarray(np.array([[0.0, 0.25], [0.5, 1.0]], np.float32)).save(tmp_path / "f.tif")
    np.testing.assert_array_equal(predict.read_image(tmp_path / "f.tif")[..., 2], [[0, 0.25], [0.5, 1]])
    Image.fromarray(np.array([[0.0, 2.0]], np.float32)).save(tmp_path / "hu.tif")
    with pytest.raises(ValueError, match=r"hu\.tif: float values in \[0, 2\], \[0, 1\] expected"):
        predict.read_image(tmp_path / "hu.tif")


def test_predict_bad_inputs(setup, tmp_path, capsys):
    _, ckpt = setup
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    base = TINY + ["--ckpt", str(ckpt), "--obj", "Brain", "--out", str(tmp_path / "o")]
    cases = [
        (["--input", str(tmp_path / "missing")], "--input " + str(tmp_path / "missing") + ": no such file"),
        (["--input", str(tmp_path / "empty")], "no image files"),
        (["--input", str(tmp_path / "notes.txt")], "not an image file name"),
        (["--input", str(tmp_path / "broken.png")], "cannot read image " + str(tmp_path / "broken.png")),
        (
            ["--input", str(tmp_path / "broken.png"), "--fpr", "1.5"],
            "--fpr must lie strictly between 0 and 1",
        ),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as info:
            predict.main(base + argv)
        assert info.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: --obj and --prompt_name are exclusive
        predict.main(base + ["--input", str(tmp_path), "--prompt_name", "knee"])
