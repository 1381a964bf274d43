"""The normal-only few-shot protocol (test_few.py --support normal) and scores that stand alone (--normalize
support): what is read, the support draws, the memory bank and the zero-shot part against the existing
tests', scores that depend on nothing but their image, the weights and the normal images, tools/predict.py's
scores against the protocol's, the grid's normal-only jobs and tables. Tiny random CLIP, synthetic data."""

import contextlib
import csv
import hashlib
import io
import json
import os
import random
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL
from test_scripts import SIZE, TINY, expect_error, run, script_args

import mvfa.evaluation
import test_few
import test_zero
from CLIP import CLIP_Inplanted, create_model
from dataset import CLASS_NAMES, DATASETS
from dataset.augment import augment
from dataset.medical_few import ImageItems
from mvfa import protocol
from mvfa.config import RunConfig
from mvfa.evaluation import Normals, PixelMaps, build_memory, collect_standalone, image_scores_of
from mvfa.precision import Precision
from mvfa.seeding import setup_seed
from mvfa.text_cache import adapted_model
from tools import jobs, predict, reproduce

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")
UNGOOD = os.path.join("valid", "Ungood")

# ---------------------------------------------------------------- recording what a run reads and builds

_log: list | None = None  # the paths opened or listed while a run is recorded, else None


def _audit(event: str, args: tuple) -> None:
    path = args[0] if args else None
    if (
        _log is not None
        and event in ("open", "os.listdir", "os.scandir")
        and isinstance(path, (str, bytes, os.PathLike))
    ):
        _log.append(os.path.normpath(os.fsdecode(path)))


sys.addaudithook(_audit)  # audit hooks cannot be removed: this one records only inside `recorded`


class Recorded(NamedTuple):
    out: str
    result: dict
    opened: list  # every path opened or listed (builtins.open, PIL, os.listdir, os.scandir)
    banks: list  # (the images, seg banks, det banks) of every build_memory call
    collected: list  # what every mvfa.evaluation.collect call returned


def recorded(module, args: list[str]) -> Recorded:
    """module.main(args), recording the files it opens, the memory banks it builds and what it collects."""
    global _log
    banks, collected = [], []
    build, gather = mvfa.evaluation.build_memory, mvfa.evaluation.collect

    def spy_build(model, images, *rest, **kwargs):
        bank = build(model, images, *rest, **kwargs)
        banks.append((images.clone(), *bank))
        return bank

    def spy_collect(*a, **k):
        collected.append(gather(*a, **k))
        return collected[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mvfa.evaluation, "build_memory", spy_build)
        patch.setattr(mvfa.evaluation, "collect", spy_collect)
        _log = []
        try:
            out, result = run(module, args)
            opened = _log
        finally:
            _log = None
    return Recorded(out, result, opened, banks, collected)


@pytest.fixture(scope="module")
def zero_dir(tmp_path_factory) -> Path:
    """Tiny zero-shot adapter checkpoints {obj}.pth for the six datasets."""
    folder = tmp_path_factory.mktemp("zero_ckpt")
    clip = create_model("demo-tiny", SIZE, "none")
    for i, obj in enumerate(CLASS_NAMES):
        torch.manual_seed(100 + i)
        torch.save(CLIP_Inplanted(clip, (3, 6, 9, 12)).adapter_state(), folder / f"{obj}.pth")
    return folder


@pytest.fixture(scope="module")
def brain(one_thread, synth, zero_dir, tmp_path_factory) -> dict[str, Recorded]:
    """Brain with its zero-shot adapters: test_few.py's MVFA protocol and --support normal on the listed
    support (n-0 / a-0 of 2-shot.txt), --support normal on a draw, and test_zero.py; each recorded."""
    tmp = tmp_path_factory.mktemp("brain")
    adapters = ["--ckpt", str(zero_dir / "Brain.pth")]
    few = [*script_args(synth.data, tmp, "Brain", seed_dir=synth.seed_root), *adapters, "--shot", "2"]
    commands = {
        "mvfa": (test_few, [*few, "--iterate", "0"]),
        "normal": (test_few, [*few, "--iterate", "0", "--support", "normal"]),
        "drawn": (test_few, [*few, "--iterate", "-1", "--seed", "3", "--support", "normal"]),
        "zero": (test_zero, [*script_args(synth.data, tmp, "Brain"), *adapters]),
    }
    return {name: recorded(module, args) for name, (module, args) in commands.items()}


def support_list(synth, obj: str, shot: int, line: int) -> list[str]:
    """The names of one line of the synthetic support list (0: n-0, 1: a-0)."""
    text = (Path(synth.seed_root) / obj / f"{shot}-shot.txt").read_text().splitlines()
    return text[line].split()[1:]


def test_normal_only_never_opens_nor_lists_valid_ungood(brain, synth):
    valid = Path(synth.data) / "Brain_AD" / "valid"
    for name in ("normal", "drawn"):
        assert [p for p in brain[name].opened if UNGOOD in p] == [], name
    # the recording sees what is read: the listed normal support, and MVFA's protocol reading valid/Ungood
    listed = [str(valid / "good" / "img" / n) for n in support_list(synth, "Brain", 2, 0)]
    assert set(listed) <= set(brain["normal"].opened)
    abnormal = [str(valid / "Ungood" / "img" / n) for n in support_list(synth, "Brain", 2, 1)]
    assert set(abnormal) <= set(brain["mvfa"].opened)
    # both read the whole test split, its abnormal images included
    test = Path(synth.data) / "Brain_AD" / "test" / "Ungood" / "img"
    assert {str(p) for p in test.iterdir()} <= set(brain["normal"].opened) & set(brain["mvfa"].opened)


def test_the_same_seed_draws_the_same_normals(synth):
    run = RunConfig(
        protocol="few", obj="Brain", data_path=synth.data, img_size=SIZE, shot=2, iterate=-1, support="normal"
    )

    def draw(seed: int, config: RunConfig = run):
        setup_seed(seed)
        return protocol.test_set(config, -1).support

    first, again, full = draw(5), draw(5), draw(5, replace(run, support="mvfa"))
    assert first.normal_files == again.normal_files and torch.equal(first.normal, again.normal)
    assert first.abnormal_files == [] and first.abnormal.shape == (0, 3, SIZE, SIZE)
    # the normal images MVFA's protocol draws with that seed (it draws the normal ones first)
    assert first.normal_files == full.normal_files and torch.equal(first.normal, full.normal)
    assert len(full.abnormal_files) == 2
    assert len({tuple(draw(seed).normal_files) for seed in range(8)}) > 1  # the seed decides


def test_the_memory_bank_is_the_few_shot_tests(brain, synth):
    """The same normal images (the listed n-0 line), the same adapters: the bank of --support normal is the
    one MVFA's few-shot test builds, tensor for tensor; and only the normal images go into either."""
    ((images, seg, det),) = brain["normal"].banks
    ((mvfa_images, mvfa_seg, mvfa_det),) = brain["mvfa"].banks
    assert torch.equal(images, mvfa_images) and images.shape == (11 * 2, 3, SIZE, SIZE)
    assert len(seg) == len(det) == 4
    assert all(torch.equal(a, b) for a, b in zip(seg + det, mvfa_seg + mvfa_det))


def test_the_zero_shot_part_is_test_zeros(brain):
    """The text logits and det-head scores of --support normal are test_zero.py's, image for image."""
    (normal,), (zero,) = brain["normal"].collected, brain["zero"].collected
    assert normal.labels == zero.labels and normal.zero_image == zero.zero_image
    assert len(normal.logits) == len(zero.logits) == 6
    assert all(torch.equal(a, b) for a, b in zip(normal.logits, zero.logits))
    assert normal.fewshot and not zero.fewshot  # plus the memory bank's distances


def test_normal_only_prints_and_records_the_few_shot_lines(brain):
    out, result = brain["normal"].out, brain["normal"].result
    lines = [line for line in out.splitlines() if " AUC : " in line or " pAUC : " in line]
    assert lines == [
        f"Brain pAUC : {round(result['pixel_auroc'], 4)}",
        f"Brain AUC : {round(result['image_auroc'], 4)}",
    ]
    assert "fitted_extremes" not in result  # the reference's normalisation by default


# ---------------------------------------------------------------- scores that stand alone


@pytest.fixture(scope="module")
def standalone(one_thread, synth, zero_dir, tmp_path_factory) -> dict[str, tuple[Path, dict]]:
    """--normalize support: test_few.py --support normal on Brain (seg head) and Chest (det head), and
    test_zero.py on Brain fitted on valid/good; each with --save_scores. name -> (scores file, result)."""
    tmp = tmp_path_factory.mktemp("standalone")
    made = {}
    for name, obj in (("Brain", "Brain"), ("Chest", "Chest"), ("zero", "Brain")):
        scores = tmp / f"{name}.npz"
        common = [*script_args(synth.data, tmp, obj), "--ckpt", str(zero_dir / f"{obj}.pth")]
        common += ["--normalize", "support", "--save_scores", str(scores)]
        if name == "zero":
            calibration = Path(synth.data) / DATASETS[obj].folder / "valid" / "good" / "img"
            _, result = run(test_zero, [*common, "--calibration", str(calibration)])
        else:
            few = ["--support", "normal", "--shot", "2", "--iterate", "0", "--seed_dir", synth.seed_root]
            _, result = run(test_few, [*common, *few])
        made[name] = scores, result
    return made


def protocol_parts(synth, zero_dir, name: str):
    """What the protocol of `standalone`[name] scores with: the model with its adapters, the text features,
    the test items, the normal images and the memory bank."""
    obj = "Chest" if name == "Chest" else "Brain"
    good = Path(synth.data) / DATASETS[obj].folder / "valid" / "good" / "img"
    precision = Precision.of("auto", CPU)
    run_cfg = RunConfig(
        protocol="zero" if name == "zero" else "few",
        obj=obj,
        data_path=synth.data,
        img_size=SIZE,
        shot=2,
        iterate=0,
        seed_dir=synth.seed_root,
        support="normal",
        normalize="support",
        calibration=str(good) if name == "zero" else None,
    )
    model, texts = adapted_model(TINY_MODEL, precision, CPU, [protocol.prompt(run_cfg)], None)
    model.load_adapters(zero_dir / f"{obj}.pth")
    dataset = protocol.test_set(run_cfg, 0 if run_cfg.fewshot else None)
    if name == "zero":
        calibration = ImageItems([(str(p), 0, None) for p in sorted(good.iterdir())], SIZE)
        return model, texts[protocol.prompt(run_cfg)], precision, dataset, Normals(None, calibration), None
    views = augment(dataset.support.normal)[0]  # [22, 3, S, S]
    memory = build_memory(model, views, precision)
    return (
        model,
        texts[protocol.prompt(run_cfg)],
        precision,
        dataset,
        Normals(dataset.support.normal, None),
        memory,
    )


def scored(parts, items: list) -> dict[str, tuple[float, torch.Tensor]]:
    """file -> (image score, normalised map [S, S]) of `items` scored together, standing alone."""
    model, text, precision, dataset, normals, memory = parts
    pool = ImageItems(items, SIZE, False, dataset.has_masks)
    c = collect_standalone(model, pool, text, precision, normals, dataset.has_masks, memory)
    maps = PixelMaps(c, CPU, precision)
    scores = image_scores_of(c, CPU, precision, maps)
    return {path: (float(scores[i]), maps.chunk(i, i + 1)[0]) for i, (path, _, _) in enumerate(items)}


@pytest.mark.parametrize("name", ["Brain", "Chest", "zero"])
def test_a_score_is_the_same_alone_with_the_test_set_or_shuffled(name, standalone, synth, zero_dir):
    parts = protocol_parts(synth, zero_dir, name)
    items = list(parts[3].items)
    whole = scored(parts, items)
    shuffled = items[:]
    random.Random(0).shuffle(shuffled)
    assert shuffled != items
    others = scored(parts, shuffled)
    alone = {path: value for item in items for path, value in scored(parts, [item]).items()}
    for path, (score, heat) in whole.items():
        for other in (others, alone):
            assert other[path][0] == score and torch.equal(other[path][1], heat), path
    # the protocol's scores (its --save_scores) are these
    saved = np.load(standalone[name][0])
    assert saved["files"].tolist() == [path for path, _, _ in items]
    assert saved["image_scores"].tolist() == [np.float32(whole[p][0]) for p, _, _ in items]
    if "maps" in saved:
        assert np.array_equal(saved["maps"], np.stack([whole[p][1].numpy() for p, _, _ in items]))


@pytest.mark.parametrize("name", ["Brain", "Chest", "zero"])
def test_standalone_scores_record_their_fitted_range(name, standalone):
    _, result = standalone[name]
    fitted = result["fitted_extremes"]
    expect = {
        "Brain": {"zero_map", "few_map", "zero_image", "few_image"},
        "Chest": {"zero_map", "few_map", "zero_image", "few_image"},
        "zero": {"zero_map", "zero_image"},
    }[name]
    assert {k for k, v in fitted.items() if v is not None} == expect
    assert all(lo < hi for lo, hi in (v for v in fitted.values() if v is not None))
    scores = np.asarray(result["image_scores"])
    # the range is the normal images', not the test set's: the scores need not span [0, 1]
    assert not (scores.min() == 0.0 and scores.max() == 1.0)


def test_mvfas_own_protocol_scores_stand_alone_too(standalone, synth, zero_dir, tmp_path):
    """--normalize support with MVFA's few-shot protocol (--support mvfa): given the same checkpoint and the
    listed n-0 normal images, its memory bank and fitted range are --support normal's, and so are its
    scores (its a-0 abnormal images are read, never scored nor fitted on)."""
    args = [*script_args(synth.data, tmp_path, "Brain", seed_dir=synth.seed_root)]
    args += ["--ckpt", str(zero_dir / "Brain.pth"), "--shot", "2", "--iterate", "0", "--normalize", "support"]
    _, result = run(test_few, args)
    _, normal = standalone["Brain"]
    assert result["fitted_extremes"] == normal["fitted_extremes"]
    assert result["image_scores"] == normal["image_scores"]
    assert result["image_auroc"] == normal["image_auroc"] and result["pixel_auroc"] == normal["pixel_auroc"]


def test_leave_one_out_fits_each_support_image_against_the_others(synth, zero_dir):
    """The few-shot part of the fitted range: each normal support image against the bank without its own
    11 views, which is the bank built from the other support images alone (batch 1: the same rows)."""
    model, text, precision, dataset, normals, memory = protocol_parts(synth, zero_dir, "Brain")
    without = mvfa.evaluation.without_image(memory, 0, 2)
    alone = build_memory(model, augment(dataset.support.normal[1:])[0], precision)
    assert all(torch.equal(a, b) for a, b in zip(without[0] + without[1], alone[0] + alone[1]))
    assert without[0][0].shape[0] == memory[0][0].shape[0] // 2


# ---------------------------------------------------------------- tools/predict.py


@pytest.mark.parametrize("name", ["Brain", "Chest", "zero"])
def test_predicts_score_is_the_protocols(name, standalone, synth, zero_dir, tmp_path):
    """tools.predict --normalize support on one test image gives the protocol's score for it: with the
    listed normal images as --support (few-shot), or the calibration folder as --calibrate (zero-shot)."""
    saved = np.load(standalone[name][0])
    index = int(np.flatnonzero(saved["labels"] == 1)[0])  # an abnormal test image
    obj = "Chest" if name == "Chest" else "Brain"
    good = Path(synth.data) / DATASETS[obj].folder / "valid" / "good" / "img"
    args = [*TINY, "--ckpt", str(zero_dir / f"{obj}.pth"), "--obj", obj, "--normalize", "support"]
    args += ["--input", str(saved["files"][index]), "--out", str(tmp_path / "pred")]
    if name == "zero":
        args += ["--calibrate", str(good)]
    else:
        support = tmp_path / "support"
        support.mkdir()
        for i, file in enumerate(support_list(synth, obj, 2, 0)):  # names that sort in the list's order
            shutil.copy(good / file, support / f"{i}_{file}")
        args += ["--support", str(support)]
    out, rows = run(predict, args)
    assert [row["file"] for row in rows] == [str(saved["files"][index])]
    assert rows[0]["score"] == float(saved["image_scores"][index])
    with open(tmp_path / "pred" / "scores.csv", newline="") as f:
        assert float(next(csv.DictReader(f))["score"]) == rows[0]["score"]
    if name == "zero":  # the threshold of the calibration images' standalone scores
        assert rows[0]["decision"] in ("normal", "abnormal") and "threshold " in out


# ---------------------------------------------------------------- errors


def test_flags_that_do_not_go_together(synth, zero_dir, tmp_path, capsys):
    common = [*script_args(synth.data, tmp_path, "Brain"), "--ckpt", str(zero_dir / "Brain.pth")]
    err = expect_error(test_zero, [*common, "--normalize", "support"], capsys)
    assert "error: --normalize: " in err and "zero-shot has no support images" in err and "calibration" in err
    err = expect_error(test_few, [*common, "--seed_dir", synth.seed_root, "--calibration", "x"], capsys)
    assert "error: --calibration: calibration images x:" in err and "normalize 'support'" in err
    one = [*common, "--seed_dir", synth.seed_root, "--support", "normal", "--shot", "1", "--iterate", "0"]
    err = expect_error(test_few, [*one, "--normalize", "support"], capsys)
    assert "a 1-shot support leaves none out" in err and "calibration images" in err
    err = expect_error(test_few, [*one, "--shot_in_name"], capsys)
    assert "--shot_in_name" in err and "zero-shot adapters" in err
    missing = str(tmp_path / "none")
    err = expect_error(test_few, [*one, "--normalize", "support", "--calibration", missing], capsys)
    assert f"error: --calibration: calibration images {missing}: no folder or image file" in err
    image = next((Path(synth.data) / "Brain_AD" / "test" / "good" / "img").iterdir())
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(image, single / image.name)
    pred = [*TINY, "--ckpt", str(zero_dir / "Brain.pth"), "--obj", "Brain", "--input", str(image)]
    err = expect_error(predict, [*pred, "--normalize", "support", "--support", str(single)], capsys)
    assert "got 1 support and 0 calibration images" in err


def test_shot_one_fits_on_the_calibration_images(synth, zero_dir, tmp_path):
    """k = 1 leaves no support image out: the range comes from the --calibration images alone (those that
    are not the support image)."""
    good = Path(synth.data) / "Brain_AD" / "valid" / "good" / "img"
    args = [*script_args(synth.data, tmp_path, "Brain", seed_dir=synth.seed_root)]
    args += ["--ckpt", str(zero_dir / "Brain.pth"), "--support", "normal", "--shot", "1", "--iterate", "0"]
    recording = recorded(test_few, [*args, "--normalize", "support", "--calibration", str(good)])
    fits = recording.collected[:-1]  # then the test set
    support = support_list(synth, "Brain", 1, 0)
    assert len(fits) == 1 and len(fits[0].labels) == len(list(good.iterdir())) - 1 == 2
    assert len(recording.collected[-1].labels) == 6 and support[0] in " ".join(recording.opened)
    assert recording.result["fitted_extremes"]["few_map"] is not None


# ---------------------------------------------------------------- the grid


def test_dry_run_lists_the_normal_only_jobs_and_their_cost(tmp_path, capsys):
    assert reproduce.main(["--dry_run", "--data_path", str(tmp_path / "none")]) == 0
    lines = capsys.readouterr().out.splitlines()
    normal = [line for line in lines[:-1] if " normal-only " in line]
    assert len(lines) - 1 == 60 and lines[-1].startswith("60 jobs, ~") and len(normal) == 6 * 5
    assert all(": 0 steps, " in line for line in normal)  # no training
    for k in (2, 4, 8, 16):
        assert (
            sum(f" normal-only {k}-shot draw 0 (listed) --select test adapters of zero-" in x for x in normal)
            == 6
        )
    assert sum(" normal-only 1-shot draw 1 (drawn, seed 1) " in line for line in normal) == 6  # no k = 1 list
    brain = next(line for line in normal if line.startswith("normal-4-Brain-draw0-test-"))
    # the grid's zero-shot job, with the flags every job is given
    zero = jobs.Job("Brain", "zero", 0, "test", extra=("--data_path", str(tmp_path / "none"))).key
    assert zero in {line.split(":")[0] for line in lines[:-1]}
    assert f"adapters of {zero}: 0 steps, {11 * 4 + 3715} images " in brain  # the bank, then the test set


def test_normal_only_jobs_read_the_zero_shot_checkpoints(tmp_path):
    job = jobs.Job("Brain", "normal-4", 0, "val")
    folder = tmp_path / "jobs" / job.key
    zero = jobs.Job("Brain", "zero", 0, "val")
    (command,) = job.commands(folder)  # a test alone
    assert command[0] == "test_few.py" and command[command.index("--support") + 1] == "normal"
    assert command[command.index("--ckpt") + 1] == str(tmp_path / "jobs" / zero.key / "ckpt" / "Brain.pth")
    assert command[command.index("--shot") + 1] == "4" and command[command.index("--iterate") + 1] == "0"
    given = jobs.expand(["Brain"], ["normal-1", "zero"], 2, ["test", "val"], zero_ckpt="ckpt/zero-shot")
    assert [(j.setting, j.draw, j.select) for j in given] == [
        ("normal-1", 1, "released"),
        ("normal-1", 2, "released"),
        ("zero", 0, "test"),
        ("zero", 0, "val"),
    ]
    assert given[0].zero_ckpt == str(Path("ckpt/zero-shot").resolve())
    released = given[0].commands(tmp_path / "x")[0]
    assert released[released.index("--ckpt") + 1] == str(Path("ckpt/zero-shot").resolve() / "Brain.pth")
    assert jobs.after_trainings(given) == [given[2:], given[:2]]  # the trainings first
    # the jobs made before normal-only jobs keep their keys (and so their finished results)
    old = {
        "obj": "Brain",
        "setting": "4",
        "draw": 0,
        "select": "test",
        "epoch": 50,
        "extra": [],
        "seed_dir": None,
    }
    digest = hashlib.sha256(json.dumps(old).encode()).hexdigest()[:8]
    assert jobs.Job("Brain", "4", 0, "test").key == f"4-Brain-draw0-test-{digest}"


def test_the_grid_runs_normal_only_jobs_and_tables_them(synth, zero_dir, tmp_path):
    args = ["--objs", "Brain", "--settings", "normal-2", "--draws", "2", "--normal_ckpt", str(zero_dir)]
    args += ["--out", str(tmp_path), "--data_path", synth.data, "--seed_dir", synth.seed_root, *TINY]
    with contextlib.redirect_stdout(io.StringIO()):
        assert reproduce.main(args) == 0
    done = [json.loads(p.read_text()) for p in (tmp_path / "jobs").glob("*/done.json")]
    assert len(done) == 2
    auroc = []
    for record in done:
        arguments = record["test"]["args"]
        assert record["test"]["script"] == "test_few" and arguments["support"] == "normal"
        assert arguments["ckpt"] == str(zero_dir.resolve() / "Brain.pth")
        auroc.append(100 * record["test"]["metrics"]["image_auroc"])
    with open(tmp_path / "table_normal-2.csv", newline="", encoding="utf-8") as f:
        brain = next(row for row in csv.DictReader(f) if row["dataset"] == "BrainMRI")
    assert brain["normal-only AUC released"] == f"{np.mean(auroc):.2f} ± {np.std(auroc):.2f}"
    # beside: the settings not run show the published numbers only (none for k = 2)
    assert brain["zero-shot AUC paper"] == "78.63" and brain["MVFA 2-shot AUC paper"] == "-"
    assert "## Normal-only few-shot, k = 2: " in (tmp_path / "tables.md").read_text()
