"""One's own data: datasets in BMAD's layout under names that are not BMAD's, made with the converter from
synthetic images (one with masks, one without), through the four scripts and tools/predict.py; and the errors
of one's own data."""

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score
from test_scripts import SIZE, TINY, call, expect_error, only_record, result_lines, run

import test_few
import test_zero
import train_few
import train_zero
from dataset import has_masks
from dataset.medical_few import MedTestDataset
from tools import predict
from tools.convert import convert
from tools.convert import main as convert_main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def own(synth, tmp_path_factory) -> Path:  # noqa: F811
    """`knee` (with masks, from the synthetic Brain images) and `wrist` (image-only, from Chest) in a folder
    of their own, made by the converter: 4 normal and 4 abnormal images each, half in valid."""
    root = tmp_path_factory.mktemp("own")
    for name, source in (("knee", "Brain_AD"), ("wrist", "Chest_AD")):
        flat = root / "flat" / name
        for state, folder in (("good", "normal"), ("Ungood", "abnormal")):
            (flat / folder).mkdir(parents=True)
            for split in ("valid", "test"):
                for i, src in enumerate(
                    sorted((Path(synth.data) / source / split / state / "img").iterdir())[:2]
                ):
                    shutil.copy(src, flat / folder / f"{split}{i}{src.suffix}")
                    mask = src.parent.parent / "anomaly_mask" / src.name
                    if mask.is_file():
                        (flat / "masks").mkdir(exist_ok=True)
                        shutil.copy(mask, flat / "masks" / f"{split}{i}{src.suffix}")
        masks = flat / "masks" if (flat / "masks").is_dir() else None
        convert(
            str(flat / "normal"),
            str(flat / "abnormal"),
            str(root / "data" / name),
            masks and str(masks),
            0.5,
            3,
        )
    return root


def test_converter_output_loads_with_masks_detected(own):
    data = own / "data"
    for name, masks in (("knee", True), ("wrist", False)):
        assert has_masks(str(data), name) is masks
        for split in ("valid", "test"):
            items = MedTestDataset(str(data), name, SIZE, split=split).items
            assert [label for _, label, _ in items] == [0, 0, 1, 1]
            assert all((mask is not None) == (masks and label == 1) for _, label, mask in items)
    image, label, mask = MedTestDataset(str(data), "knee", SIZE)[3]
    assert image.shape == (3, SIZE, SIZE) and label == 1 and mask.max() > 0


def test_fewshot_train_then_test_on_a_dataset_with_masks(own, tmp_path):
    common = [
        *TINY,
        "--obj",
        "knee",
        "--data_path",
        str(own / "data"),
        "--prompt_name",
        "knee MRI",
        "--shot",
        "1",
        "--save_path",
        str(tmp_path / "ckpt"),
    ]
    args = [*common, "--iterate", "-1", "--seed", "3", "--out_dir", str(tmp_path / "results")]
    trained = call(train_few, args + ["--epoch", "1"])
    record = only_record(tmp_path / "results")
    # one epoch, one evaluation: pAUC and AUC (the seg path), those of the record (the selected weights)
    assert result_lines(trained, "knee") == expected_lines_for("knee", record["metrics"], fewshot=True)
    assert (tmp_path / "ckpt" / "knee.pth").is_file() and record["args"]["prompt_name"] == "knee MRI"
    scores = tmp_path / "tested.npz"
    tested = call(test_few, args + ["--out_dir", str(tmp_path / "tested"), "--save_scores", str(scores)])
    metrics = only_record(tmp_path / "tested")["metrics"]
    assert result_lines(tested, "knee") == sklearn_lines("knee", scores, metrics, fewshot=True)
    valid = own / "data" / "knee" / "valid"
    names = {
        state: sorted(p.name for p in (valid / state / "img").iterdir())[-1] for state in ("good", "Ungood")
    }
    # a support list of one's own
    (tmp_path / "mine.txt").write_text(f"n-0: {names['good']}\na-0: {names['Ungood']}")
    listed = call(
        test_few,
        [
            *common,
            "--iterate",
            "0",
            "--seed_dir",
            str(tmp_path / "mine.txt"),
            "--out_dir",
            str(tmp_path / "listed"),
            "--save_scores",
            str(tmp_path / "listed.npz"),
        ],
    )
    record = only_record(tmp_path / "listed")
    assert record["args"]["seed_dir"] == str(tmp_path / "mine.txt")
    assert result_lines(listed, "knee") == sklearn_lines(
        "knee", tmp_path / "listed.npz", record["metrics"], fewshot=True
    )


def test_zeroshot_train_then_test_on_an_image_only_dataset_given_by_path(own, synth, tmp_path):  # noqa: F811
    """The target is none of the six: train_zero trains on all six BMAD datasets under --data_path."""
    wrist = str(own / "data" / "wrist")
    args = [
        *TINY,
        "--obj",
        wrist,
        "--data_path",
        synth.data,
        "--prompt_name",
        "wrist X-ray",
        "--save_path",
        str(tmp_path / "ckpt"),
        "--out_dir",
        str(tmp_path / "results"),
    ]
    trained = call(train_zero, args + ["--epoch", "1", "--batch_size", "6"])
    assert "best epoch found: epoch 0 batch 0" in trained
    printed = result_lines(trained, "wrist")
    assert len(printed) >= 5  # 5-6 evaluations in the epoch
    # the record holds the selected weights' result: the highest AUC printed (image AUROC alone selects)
    selected = only_record(tmp_path / "results")["metrics"]
    assert round(selected["image_auroc"], 4) == max(float(line.split(" : ")[1]) for line in printed)
    scores = tmp_path / "tested.npz"
    tested = call(test_zero, args + ["--out_dir", str(tmp_path / "tested"), "--save_scores", str(scores)])
    metrics = only_record(tmp_path / "tested")["metrics"]
    assert result_lines(tested, "wrist") == sklearn_lines("wrist", scores, metrics, fewshot=False)
    assert "pixel_auroc" not in metrics and "maps" not in np.load(scores).files  # no masks: image level only


def expected_lines_for(name: str, metrics: dict, fewshot: bool) -> list[str]:
    """expected_lines for a dataset that is not in the BMAD table."""
    auc = f"{name} AUC : {round(metrics['image_auroc'], 4)}"
    if "pixel_auroc" not in metrics:
        return [auc]
    pauc = f"{name} pAUC : {round(metrics['pixel_auroc'], 4)}"
    return [pauc, auc] if fewshot else [auc, pauc]


def sklearn_lines(name: str, scores_file: Path, metrics: dict, fewshot: bool) -> list[str]:
    """The lines a test run must print, from its own --save_scores file: image AUROC (and with masks pixel
    AUROC) recomputed by sklearn, which the run's record holds too."""
    saved = np.load(scores_file)
    image = roc_auc_score(saved["labels"], saved["image_scores"])
    assert metrics["image_auroc"] == pytest.approx(image, abs=1e-12)
    recomputed = {"image_auroc": image}
    if "maps" in saved.files:
        pixel = roc_auc_score(saved["masks"].reshape(-1), saved["maps"].reshape(-1))
        assert metrics["pixel_auroc"] == pytest.approx(pixel, abs=1e-12)
        recomputed["pixel_auroc"] = pixel
    return expected_lines_for(name, recomputed, fewshot)


def test_predict_on_own_images(own, tmp_path):
    torch.manual_seed(0)
    ckpt = tmp_path / "tiny.pth"
    call(
        train_few,
        [
            *TINY,
            "--obj",
            "knee",
            "--data_path",
            str(own / "data"),
            "--prompt_name",
            "knee MRI",
            "--shot",
            "1",
            "--iterate",
            "-1",
            "--epoch",
            "1",
            "--select",
            "last",
            "--save_path",
            str(tmp_path),
            "--out_dir",
            str(tmp_path / "results"),
        ],
    )
    shutil.move(tmp_path / "knee.pth", ckpt)
    # test_zero.py with this checkpoint, then predict on the same test images in the same order
    knee = [*TINY, "--ckpt", str(ckpt), "--prompt_name", "knee MRI"]
    call(
        test_zero,
        [
            *knee,
            "--obj",
            "knee",
            "--data_path",
            str(own / "data"),
            "--out_dir",
            str(tmp_path / "tested"),
            "--save_scores",
            str(tmp_path / "zero.npz"),
        ],
    )
    zero = np.load(tmp_path / "zero.npz")
    files = [Path(f) for f in zero["files"]]
    assert zero["labels"].tolist() == [0, 0, 1, 1]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for i, f in enumerate(files):  # names that sort in test-set order
        (inputs / f"{i}_{f.name}").symlink_to(f)
    out, rows = run(predict, [*knee, "--input", str(inputs), "--out", str(tmp_path / "pred"), "--save_npy"])
    paths = [inputs / f"{i}_{f.name}" for i, f in enumerate(files)]
    assert [row["file"] for row in rows] == [str(p) for p in paths]  # main returns the rows
    with open(tmp_path / "pred" / "scores.csv", newline="") as f:
        assert [(r["file"], float(r["score"])) for r in csv.DictReader(f)] == [
            (r["file"], r["score"]) for r in rows
        ]
    assert [line for line in out.splitlines() if line.endswith(".png")] == [
        f"{r['score']:.4f}  {r['file']}" for r in rows
    ]
    # zero-shot: the det head's absolute scores, which test_zero.py min-maxes over the test set; the seg
    # head's maps (knee has masks), min-max normalised over the same images: test_zero.py's
    scores = np.array([r["score"] for r in rows], dtype=np.float32)
    np.testing.assert_array_equal(
        (scores - scores.min()) / (scores.max() - scores.min()), zero["image_scores"]
    )
    maps = np.stack([np.load(tmp_path / "pred" / f"{i:05d}_{p.stem}.npy") for i, p in enumerate(paths)])
    np.testing.assert_array_equal(maps, zero["maps"])


# ---------------------------------------------------------------- errors


def test_missing_prompt_name(own, tmp_path, capsys):
    err = expect_error(test_zero, [*TINY, "--obj", "knee", "--data_path", str(own / "data")], capsys)
    assert err.startswith("error: --prompt_name: a prompt name is needed for knee, which is not one of")


def test_unknown_dataset_folder(own, capsys):
    ankle = own / "data" / "ankle"
    err = expect_error(test_zero, [*TINY, "--obj", str(ankle), "--prompt_name", "x"], capsys)
    assert err == (
        f"error: --obj: {ankle}: no dataset in BMAD's layout there (no {ankle / 'test'} folder); "
        f"see README 'Your own data'"
    )
    err = expect_error(test_zero, [*TINY, "--obj", "ankle", "--data_path", str(own / "data")], capsys)
    # a bare name: a BMAD typo?
    assert err.startswith("error: --obj: unknown dataset 'ankle': choose one of Brain, Liver,")


def test_missing_split_or_class_folder(own, tmp_path, capsys):
    broken = tmp_path / "knee"
    shutil.copytree(own / "data" / "knee", broken)
    shutil.rmtree(broken / "test" / "good")
    err = expect_error(test_zero, [*TINY, "--obj", str(broken), "--prompt_name", "knee MRI"], capsys)
    assert f"image folder not found: {broken / 'test' / 'good' / 'img'}" in err


def test_masks_for_some_abnormal_images_only(own, tmp_path, capsys):
    broken = tmp_path / "knee"
    shutil.copytree(own / "data" / "knee", broken)
    first = sorted((broken / "test" / "Ungood" / "anomaly_mask").iterdir())[0]
    first.unlink()
    err = expect_error(test_zero, [*TINY, "--obj", str(broken), "--prompt_name", "knee MRI"], capsys)
    assert f"no mask for image {broken / 'test' / 'Ungood' / 'img' / first.name}" in err


def test_image_and_mask_of_different_sizes(own, tmp_path, capsys):
    broken = tmp_path / "knee"
    shutil.copytree(own / "data" / "knee", broken)
    mask = sorted((broken / "test" / "Ungood" / "anomaly_mask").iterdir())[0]
    Image.fromarray(np.zeros((SIZE + 4, SIZE), np.uint8)).save(mask)
    err = expect_error(test_zero, [*TINY, "--obj", str(broken), "--prompt_name", "knee MRI"], capsys)
    assert f"mask {mask} is {SIZE}x{SIZE + 4} but its image" in err and "must have its image's size" in err


def test_fewer_valid_images_than_shot(own, capsys):
    err = expect_error(
        test_few,
        [
            *TINY,
            "--obj",
            "knee",
            "--data_path",
            str(own / "data"),
            "--prompt_name",
            "knee",
            "--shot",
            "3",
            "--iterate",
            "-1",
        ],
        capsys,
    )
    assert (
        err.startswith("error: --shot: ") and "holds 2 images, fewer than a 3-shot support set needs" in err
    )


def test_converter_errors(own, tmp_path, capsys):
    flat = own / "flat" / "knee"
    with pytest.raises(SystemExit, match=r"error: --out .* exists already"):
        convert_main(
            [
                "--normal",
                str(flat / "normal"),
                "--abnormal",
                str(flat / "abnormal"),
                "--out",
                str(own / "data" / "knee"),
            ]
        )
    partial = tmp_path / "masks"
    shutil.copytree(flat / "masks", partial)
    sorted(partial.iterdir())[0].unlink()
    with pytest.raises(SystemExit, match=r"error: no mask for image .*abnormal"):
        convert_main(
            [
                "--normal",
                str(flat / "normal"),
                "--abnormal",
                str(flat / "abnormal"),
                "--masks",
                str(partial),
                "--out",
                str(tmp_path / "new"),
            ]
        )
    assert not (tmp_path / "new").exists()  # nothing written before every check passed
