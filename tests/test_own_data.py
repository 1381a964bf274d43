"""One's own data: datasets in BMAD's layout under names that are not BMAD's, made with the converter from
synthetic images (one with masks, one without), through the four scripts and tools/predict.py; and the errors
of one's own data."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_scripts import (  # noqa: F401
    SIZE,
    TINY,
    cached_text,
    call,
    expect_error,
    one_thread,
    only_record,
    result_lines,
    run,
    synth,
)

import test_few
import test_zero
import train_few
import train_zero
from dataset import has_masks
from dataset.medical_few import MedTestDataset
from tools import predict
from tools.convert import convert
from tools.convert import main as convert_main


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
    assert len(result_lines(trained, "knee")) == 2  # pAUC and AUC: the seg path
    record = only_record(tmp_path / "results")
    assert (tmp_path / "ckpt" / "knee.pth").is_file() and record["args"]["prompt_name"] == "knee MRI"
    tested = call(test_few, args + ["--out_dir", str(tmp_path / "tested")])
    metrics = only_record(tmp_path / "tested")["metrics"]
    assert result_lines(tested, "knee") == expected_lines_for("knee", metrics, True)
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
        ],
    )
    assert only_record(tmp_path / "listed")["args"]["seed_dir"] == str(tmp_path / "mine.txt")
    assert len(result_lines(listed, "knee")) == 2


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
    assert "best epoch found: epoch 0 batch 0" in trained and len(result_lines(trained, "wrist")) >= 5
    tested = call(test_zero, args + ["--out_dir", str(tmp_path / "tested")])
    metrics = only_record(tmp_path / "tested")["metrics"]
    assert result_lines(tested, "wrist") == expected_lines_for("wrist", metrics, False)
    assert "pixel_auroc" not in metrics  # no masks: image level only


def expected_lines_for(name: str, metrics: dict, fewshot: bool) -> list[str]:
    """expected_lines for a dataset that is not in the BMAD table."""
    auc = f"{name} AUC : {round(metrics['image_auroc'], 4)}"
    if "pixel_auroc" not in metrics:
        return [auc]
    pauc = f"{name} pAUC : {round(metrics['pixel_auroc'], 4)}"
    return [pauc, auc] if fewshot else [auc, pauc]


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
    inputs = own / "data" / "knee" / "test" / "Ungood" / "img"
    out, rows = run(
        predict,
        [
            *TINY,
            "--input",
            str(inputs),
            "--ckpt",
            str(ckpt),
            "--prompt_name",
            "knee MRI",
            "--out",
            str(tmp_path / "pred"),
        ],
    )
    assert len([line for line in out.splitlines() if line.endswith(".png")]) == 2
    assert (tmp_path / "pred" / "scores.csv").read_text().count("\n") == 3  # header + 2 images
    # main returns the rows
    assert [row["file"] for row in rows] == [str(p) for p in sorted(inputs.iterdir())]


# ---------------------------------------------------------------- errors


def test_missing_prompt_name(own, tmp_path, capsys):
    err = expect_error(test_zero, [*TINY, "--obj", "knee", "--data_path", str(own / "data")], capsys)
    assert "--prompt_name is needed for --obj knee" in err


def test_unknown_dataset_folder(own, capsys):
    ankle = own / "data" / "ankle"
    err = expect_error(test_zero, [*TINY, "--obj", str(ankle), "--prompt_name", "x"], capsys)
    assert err == (
        f"error: --obj {ankle}: no dataset in BMAD's layout there (no {ankle / 'test'} folder); "
        f"see README 'Your own data'"
    )
    err = expect_error(test_zero, [*TINY, "--obj", "ankle", "--data_path", str(own / "data")], capsys)
    # a bare name: a BMAD typo?
    assert err.startswith("error: unknown --obj 'ankle': choose one of Brain, Liver,")


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
    assert "holds 2 images, fewer than --shot 3" in err


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
