"""Smoke tests of the four scripts and the demo: `main([...])` in-process on a tiny random CLIP and synthetic
BMAD data; what they print, the run records and checkpoints they write, round trips train -> test,
and bad input.

The helpers and fixtures at the top are shared with tests/test_protocols.py.
"""

import ast
import contextlib
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SIZE, TINY
from PIL import Image

import demo
import mvfa.evaluation
import test_few
import test_zero
import train_few
import train_zero
from CLIP import CLIP_Inplanted
from dataset import CLASS_NAMES, DATASETS
from mvfa import records
from mvfa.evaluation import collect, evaluate, selection_score
from mvfa.precision import Precision
from mvfa.records import adapters_sha256
from utils import InputError

REPO = Path(__file__).resolve().parents[1]
# images per synthetic folder: 3 normal + 3 abnormal test images, a held-out pair in valid with --shot 2
N = 3
ADAPTER_KEYS = {f"{i}.fc{j}.0.weight" for i in range(4) for j in (1, 2)}


pytestmark = pytest.mark.usefixtures("one_thread")


def script_args(data, tmp: Path, obj: str, *extra: str, seed_dir: str | None = None) -> list[str]:
    """The tiny model, `obj`, and outputs in `tmp` (results/, ckpt/); --seed_dir for the few-shot scripts."""
    args = [
        *TINY,
        "--obj",
        obj,
        "--data_path",
        str(data),
        "--out_dir",
        str(tmp / "results"),
        "--save_path",
        str(tmp / "ckpt"),
    ]
    return args + (["--seed_dir", str(seed_dir)] if seed_dir else []) + list(extra)


def run(module, args: list[str]):
    """module.main(args) with stdout captured (also inside module-scoped fixtures):
    (stdout, what main returned). An expected error would raise SystemExit(2), anything else its exception:
    returning is the run's success."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result = module.main(args)
    return out.getvalue(), result


def call(module, args: list[str]) -> str:
    """run(module, args)'s stdout."""
    return run(module, args)[0]


def expect_error(module, args: list[str], capsys) -> str:
    """module.main(args) must exit with code 2 and one `error: ...` line on stderr (no traceback);
    returns it."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        module.main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip()]  # progress bars use \r
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert err.rstrip("\n").endswith(errors[0])  # the message is the last thing written
    return errors[0]


def result_lines(out: str, obj: str) -> list[str]:
    """The printed metric lines of `obj` (`{obj} AUC : x`, `{obj} pAUC : x`, possibly `[valid] `-prefixed)."""
    return [line for line in out.splitlines() if re.fullmatch(rf"(\[valid\] )?{obj} p?AUC : \S+", line)]


def expected_lines(obj: str, metrics: dict, fewshot: bool) -> list[str]:
    """What the reference prints for these full-precision metrics: round(x, 4),
    pAUC first only in few-shot."""
    auc = f"{obj} AUC : {round(metrics['image_auroc'], 4)}"
    if not DATASETS[obj].has_masks:
        return [auc]
    pauc = f"{obj} pAUC : {round(metrics['pixel_auroc'], 4)}"
    return [pauc, auc] if fewshot else [auc, pauc]


def only_record(out_dir: Path) -> dict:
    files = list(Path(out_dir).glob("*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def adapter_state(model) -> dict:
    """A copy of the adapter weights, keyed as in model.state_dict()."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "_adapters." in k}


def ckpt_state(ckpt: dict) -> dict:
    return {f"{name}.{k}": v for name in ("seg_adapters", "det_adapters") for k, v in ckpt[name].items()}


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def copy_data(synth, tmp: Path, objs=CLASS_NAMES) -> Path:
    """A private copy of the synthetic data (of `objs`) that a test may damage."""
    data = tmp / "data"
    for obj in objs:
        shutil.copytree(Path(synth.data) / DATASETS[obj].folder, data / DATASETS[obj].folder)
    return data


def empty_test_split(data: Path, obj: str, states=("good", "Ungood")) -> None:
    for state in states:
        for sub in ("img", "anomaly_mask"):
            folder = data / DATASETS[obj].folder / "test" / state / sub
            for f in folder.glob("*") if folder.is_dir() else []:
                f.unlink()


def split_of(path: str) -> tuple[str, str]:
    """(dataset folder, split) of `.../{obj}_AD/{split}/{state}/{img|anomaly_mask}/{name}`."""
    parts = Path(path).parts
    return parts[-5], parts[-4]


def split_files(data, obj: str) -> list[str]:
    """Every image and mask file of obj's test split."""
    root = Path(data) / DATASETS[obj].folder / "test"
    return sorted(os.path.normpath(p) for p in root.glob("*/*/*"))


# --------------------------------------------------------------- train_few -> test_few, a dataset with masks


@pytest.fixture(scope="module")
def few_brain(synth, tmp_path_factory):
    """One train_few run on Brain (--select test, the reference's protocol): its folder, stdout and result."""
    tmp = tmp_path_factory.mktemp("few_brain")
    out, result = run(
        train_few,
        script_args(synth.data, tmp, "Brain", "--shot", "2", "--epoch", "1", seed_dir=synth.seed_root),
    )
    return tmp, out, result


def test_train_few_prints_records_and_saves_released_layout(few_brain):
    tmp, out, result = few_brain
    lines = result_lines(out, "Brain")
    assert re.fullmatch(r"epoch 0 loss \d+\.\d{4}", out.splitlines()[0])
    assert [line.split(" : ")[0] for line in lines] == ["Brain pAUC", "Brain AUC"]  # few-shot: pAUC first
    record = only_record(tmp / "results")
    assert lines == expected_lines("Brain", record["metrics"], fewshot=True)
    assert record["script"] == "train_few" and result == record["metrics"]  # main returns the final result
    assert {k: record["args"][k] for k in ("obj", "shot", "epoch", "select", "img_size")} == {
        "obj": "Brain",
        "shot": 2,
        "epoch": 1,
        "select": "test",
        "img_size": SIZE,
    }
    ckpt_file = tmp / "ckpt" / "Brain.pth"  # the reference's name, {save_path}/{obj}.pth
    assert record["files"]["adapters"] == {
        "path": str(ckpt_file),
        "sha256": hashlib.sha256(ckpt_file.read_bytes()).hexdigest(),
    }
    assert "clip" not in record["files"]  # --pretrain none: no weights file was read
    assert record["versions"]["torch"] == torch.__version__ and record["versions"]["numpy"] == np.__version__
    assert record["versions"]["cuda_autocast_upsample"] is None  # probed only when the run's device is CUDA
    assert len(record["metrics"]["image_scores"]) == 2 * N
    ckpt = load_ckpt(ckpt_file)
    assert {"seg_adapters", "det_adapters", "args", "versions", "epoch"} <= set(ckpt)
    assert set(ckpt["seg_adapters"]) == set(ckpt["det_adapters"]) == ADAPTER_KEYS
    # every step's loss, whose mean is the epoch's, and the final adapters' digest: one epoch evaluated once,
    # so the saved adapters are the final ones
    steps = record["training"]["step_losses"]
    assert len(steps) == 1 and len(steps[0]) > 1
    assert record["training"]["epoch_losses"] == [float(np.mean(steps[0]))]
    assert record["training"]["final_adapters_sha256"] == adapters_sha256(ckpt)
    assert ckpt["seg_adapters"]["0.fc1.0.weight"].shape == (256, 256)  # width -> CLIP's embedding width
    assert (
        ckpt["epoch"] == 0
        and ckpt["args"]["obj"] == "Brain"
        and ckpt["versions"]["torch"] == torch.__version__
    )


def test_select_test_reports_the_chosen_pass_with_its_extras(synth, tmp_path, monkeypatch):
    """--select test: the final report is the chosen evaluation itself, its AP, F1-max and AUPRO computed from
    what that pass collected; no second pass over the test set."""
    passes = []

    def counted_collect(*args, **kwargs):
        passes.append(collect(*args, **kwargs))
        return passes[-1]

    monkeypatch.setattr(mvfa.evaluation, "collect", counted_collect)
    args = script_args(synth.data, tmp_path, "Brain", "--shot", "1", "--epoch", "2", seed_dir=synth.seed_root)
    _, result = run(train_few, args)
    assert len(passes) == 2  # one selection pass per epoch, none after
    cpu = torch.device("cpu")
    full = [evaluate(c, cpu, Precision.of("fp32", cpu)) for c in passes]
    best = max(full, key=selection_score)  # the first of the highest: few-shot keeps a higher score only
    assert result == best and only_record(tmp_path / "results")["metrics"] == best
    assert {"image_ap", "image_f1_max", "pixel_ap", "pixel_f1_max", "pixel_aupro"} <= set(result)


def test_test_few_reproduces_the_training_run(few_brain, tmp_path, synth, capsys):
    """Same weights (found through --save_path/{obj}.pth), same support list, same data
    -> the same printed lines."""
    tmp, out, _ = few_brain
    args = script_args(synth.data, tmp_path, "Brain", "--shot", "2", seed_dir=synth.seed_root)
    args[args.index("--save_path") + 1] = str(tmp / "ckpt")
    returned = test_few.main(args)
    printed = capsys.readouterr().out
    assert result_lines(printed, "Brain") == result_lines(out, "Brain")
    record = only_record(tmp_path / "results")
    assert returned == record["metrics"]  # main returns the record's metrics
    assert result_lines(printed, "Brain") == expected_lines("Brain", record["metrics"], fewshot=True)
    ckpt_file = tmp / "ckpt" / "Brain.pth"
    assert record["files"]["adapters"]["sha256"] == hashlib.sha256(ckpt_file.read_bytes()).hexdigest()
    # test: extras too
    assert {"pixel_ap", "pixel_f1_max", "pixel_aupro", "image_ap"} <= set(record["metrics"])


def test_save_scores_holds_what_the_metrics_were_computed_from(few_brain, tmp_path, synth, capsys):
    """--save_scores: labels, image scores and normalised maps in test-set order; the record's metrics follow
    from them with scikit-learn, and every image score is its map's maximum (few-shot, masks)."""
    from sklearn.metrics import roc_auc_score

    tmp, _, _ = few_brain
    args = script_args(
        synth.data,
        tmp_path,
        "Brain",
        "--shot",
        "2",
        "--save_scores",
        str(tmp_path / "s.npz"),
        seed_dir=synth.seed_root,
    )
    args[args.index("--save_path") + 1] = str(tmp / "ckpt")
    returned = test_few.main(args)
    metrics = only_record(tmp_path / "results")["metrics"]
    assert returned == metrics
    scores = np.load(tmp_path / "s.npz")
    assert [os.path.basename(f) for f in scores["files"]] == [f"{i:05d}.png" for i in range(N)] * 2
    assert scores["labels"].tolist() == [0] * N + [1] * N
    assert scores["maps"].shape == scores["masks"].shape == (2 * N, SIZE, SIZE)
    assert scores["image_scores"].tolist() == metrics["image_scores"]
    assert np.array_equal(scores["image_scores"], scores["maps"].reshape(2 * N, -1).max(axis=1))
    assert roc_auc_score(scores["labels"], scores["image_scores"]) == pytest.approx(
        metrics["image_auroc"], abs=1e-12
    )
    pixel_auroc = roc_auc_score(scores["masks"].reshape(-1), scores["maps"].reshape(-1))
    assert pixel_auroc == pytest.approx(metrics["pixel_auroc"], abs=1e-9)


def test_test_few_several_support_draws(few_brain, tmp_path, synth, capsys):
    tmp, out, _ = few_brain
    # the training's n-0, a-0
    lists = (Path(synth.seed_root) / "Brain" / "2-shot.txt").read_text().splitlines()[:2]
    # three different memories
    normals = [lists[0].split(": ")[1], "00002.png 00000.png", "00001.png 00002.png"]
    seeds = tmp_path / "seeds"
    (seeds / "Brain").mkdir(parents=True)
    (seeds / "Brain" / "2-shot.txt").write_text(
        "\n".join(lists + [f"{t}-{i}: {normals[i]}" for i in (1, 2) for t in "na"])
    )
    args = script_args(
        synth.data,
        tmp_path,
        "Brain",
        "--shot",
        "2",
        "--iterate",
        "0",
        "1",
        "2",
        "--ckpt",
        str(tmp / "ckpt" / "Brain.pth"),
        seed_dir=seeds,
    )
    returned = test_few.main(args)
    printed = capsys.readouterr().out.splitlines()
    record = only_record(tmp_path / "results")["metrics"]
    assert returned == record  # the draws and their summary, as recorded
    assert [d["iterate"] for d in record["draws"]] == [0, 1, 2]
    for i, draw in enumerate(record["draws"]):
        head = printed.index(f"support draw {i} (--iterate {i}): {normals[i]}")
        assert printed[head + 1 : head + 3] == expected_lines("Brain", draw, fewshot=True)
    # draw 0 = the training's
    assert result_lines("\n".join(printed[:3]), "Brain") == result_lines(out, "Brain")
    summary = record["summary"]
    assert set(summary) >= {"image_auroc", "pixel_auroc", "pixel_aupro"}
    for key, value in summary.items():
        values = [d[key] for d in record["draws"]]
        assert value == {"mean": pytest.approx(np.mean(values)), "std": pytest.approx(np.std(values))}
        assert f"Brain {key} : {value['mean']:.4f} ± {value['std']:.4f} over 3 draws" in printed
    assert len({d["pixel_auroc"] for d in record["draws"]}) > 1  # the draws really differ


# --------------------------------------------------------------- train_few -> test_few, an image-only dataset


@pytest.fixture(scope="module")
def few_chest(synth, tmp_path_factory):
    """train_few on Chest with --overwrite over a file that was at the save path before the run."""
    tmp = tmp_path_factory.mktemp("few_chest")
    (tmp / "ckpt").mkdir()
    (tmp / "ckpt" / "Chest.pth").write_bytes(b"an older checkpoint")
    return tmp, *run(
        train_few,
        script_args(
            synth.data, tmp, "Chest", "--shot", "2", "--epoch", "1", "--overwrite", seed_dir=synth.seed_root
        ),
    )


def test_image_only_dataset_prints_auc_only_and_round_trips(few_chest, tmp_path, synth, capsys):
    tmp, out, result = few_chest
    lines = result_lines(out, "Chest")
    assert len(lines) == 1 and lines[0].startswith("Chest AUC : ")
    record = only_record(tmp / "results")
    assert lines == expected_lines("Chest", record["metrics"], fewshot=True) and result == record["metrics"]
    assert not any(k.startswith("pixel_") for k in record["metrics"])
    ckpt_file = tmp / "ckpt" / "Chest.pth"
    ckpt = load_ckpt(ckpt_file)  # --overwrite replaced the older file
    assert set(ckpt["det_adapters"]) == ADAPTER_KEYS and ckpt["args"]["overwrite"] is True
    returned = test_few.main(
        script_args(
            synth.data, tmp_path, "Chest", "--shot", "2", "--ckpt", str(ckpt_file), seed_dir=synth.seed_root
        )
    )
    assert result_lines(capsys.readouterr().out, "Chest") == lines
    assert returned == only_record(tmp_path / "results")["metrics"]


# --------------------------------------------------------------- train_zero -> test_zero


@pytest.fixture(scope="module")
def zero_brain(synth, tmp_path_factory):
    """train_zero on Brain, --select test: groups of 6 (one per other dataset)
    -> 5 evaluations in the epoch."""
    tmp = tmp_path_factory.mktemp("zero_brain")
    return tmp, *run(train_zero, script_args(synth.data, tmp, "Brain", "--epoch", "1", "--batch_size", "6"))


def test_train_zero_prints_records_and_saves(zero_brain):
    tmp, out, result = zero_brain
    lines = out.splitlines()
    assert [line.split(" : ")[0] for line in result_lines(out, "Brain")] == ["Brain AUC", "Brain pAUC"] * 5
    bests = [i for i, line in enumerate(lines) if line.startswith("best epoch found: ")]
    # evaluated before the first step, score >= 0
    assert lines[bests[0]] == "best epoch found: epoch 0 batch 0"
    last = lines[bests[-1]]
    record = only_record(tmp / "results")
    assert lines[bests[-1] - 2 : bests[-1]] == expected_lines("Brain", record["metrics"], fewshot=False)
    ckpt_file = tmp / "ckpt" / "Brain.pth"
    assert record["files"]["adapters"]["sha256"] == hashlib.sha256(ckpt_file.read_bytes()).hexdigest()
    assert record["script"] == "train_zero" and record["args"]["batch_size"] == 6
    assert result == record["metrics"]  # main returns the selected evaluation
    ckpt = load_ckpt(ckpt_file)
    assert set(ckpt["seg_adapters"]) == set(ckpt["det_adapters"]) == ADAPTER_KEYS
    assert last == f"best epoch found: epoch {ckpt['epoch']} batch {ckpt['batch']}"
    assert ckpt["args"]["obj"] == "Brain" and "torch" in ckpt["versions"]


def test_test_zero_reproduces_the_saved_evaluation(zero_brain, tmp_path, synth, capsys):
    tmp, out, _ = zero_brain
    lines = out.splitlines()
    best = max(i for i, line in enumerate(lines) if line.startswith("best epoch found: "))
    args = script_args(
        synth.data, tmp_path, "Brain", "--batch_size", "6", "--ckpt", str(tmp / "ckpt" / "Brain.pth")
    )
    returned = test_zero.main(args)
    assert result_lines(capsys.readouterr().out, "Brain") == lines[best - 2 : best]  # AUC first, then pAUC
    record = only_record(tmp_path / "results")
    assert record["script"] == "test_zero" and record["args"]["ckpt"] == str(tmp / "ckpt" / "Brain.pth")
    assert returned == record["metrics"]


@pytest.mark.parametrize("obj", CLASS_NAMES)
def test_train_zero_leave_one_out_on_every_dataset(obj, synth, tmp_path, reads):
    out = call(train_zero, script_args(synth.data, tmp_path, obj, "--epoch", "1", "--batch_size", "6"))
    # before each of the 5 steps
    assert len(result_lines(out, obj)) == 5 * (2 if DATASETS[obj].has_masks else 1)
    assert "epoch 0 loss" in out and (tmp_path / "ckpt" / f"{obj}.pth").is_file()
    record = only_record(tmp_path / "results")
    assert set(record["metrics"]) >= (
        {"image_auroc", "pixel_auroc"} if DATASETS[obj].has_masks else {"image_auroc"}
    )
    trained = sorted(path for module, path in reads if module == "dataset.medical_zero")
    assert trained == sorted(
        p for other in CLASS_NAMES if other != obj for p in split_files(synth.data, other)
    )
    # the evaluations: the target's test split
    assert {split_of(path) for module, path in reads if module != "dataset.medical_zero"} == {
        (DATASETS[obj].folder, "test")
    }


# --------------------------------------------------------------- the demo


def test_demo_runs_end_to_end_in_a_fresh_folder(tmp_path, monkeypatch, capfd):
    """The demo as shipped, in an empty working directory, without CLIP weights; the scripts it runs (as
    subprocesses, the commands it prints) run at SIZE px instead of 240 and on one thread
    (the changes, for speed)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(demo, "default_checkpoint", lambda name: tmp_path / "no-weights" / f"{name}.pt")
    commands = []

    def run_faster(command, *args, **kwargs):
        commands.append(list(command))
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        return subprocess.run([*command, "--img_size", str(SIZE)], *args, env=env, **kwargs)

    monkeypatch.setattr(demo, "subprocess", types.SimpleNamespace(run=run_faster))
    assert demo.main(["--shot", "1", "--epoch", "1"]) == 0
    out = capfd.readouterr().out.splitlines()  # the scripts write to the file descriptor: capfd, not capsys
    assert out[:3] == [
        "DEMO - the numbers below are meaningless:",
        f"  BMAD data not found at ./data/Brain_AD: using synthetic images in {Path('demo') / 'data'}",
        f"  CLIP weights not found at {tmp_path / 'no-weights' / 'ViT-L-14-336.pt'}: using a small "
        f"random-weight CLIP",
    ]
    printed = [line for line in out if line.startswith("$ python ")]  # what a user would type, and what ran
    assert [line.split()[2] for line in printed] == ["train_few.py", "test_few.py"]
    assert [
        [sys.executable, str(REPO / line.split()[2]), *shlex.split(line)[3:]] for line in printed
    ] == commands
    lines = result_lines("\n".join(out), "Brain")
    # training's selection pass, then test_few: same numbers
    assert len(lines) == 4 and lines[:2] == lines[2:]
    assert out[-1] == f"checkpoint: {Path('demo') / 'ckpt'}, run records: {Path('demo') / 'results'}"
    assert load_ckpt(tmp_path / "demo" / "ckpt" / "Brain_1shot.pth")["args"]["shot"] == 1
    assert sorted(p.name.split("_")[0] for p in (tmp_path / "demo" / "results").glob("*.json")) == [
        "test",
        "train",
    ]
    assert (tmp_path / "demo" / "data" / "Brain_AD" / "test" / "Ungood" / "anomaly_mask").is_dir()


# --------------------------------------------------------------- bad input: one line on stderr, exit code 2

SCRIPTS = {"train_few": train_few, "test_few": test_few, "train_zero": train_zero, "test_zero": test_zero}


def any_args(name: str, synth, tmp: Path, obj: str, *extra: str, data=None) -> list[str]:
    """Arguments for script `name` (few-shot ones get --shot 2 and the synthetic support lists)."""
    few = name.endswith("few")
    return script_args(
        data or synth.data,
        tmp,
        obj,
        *(["--shot", "2"] if few else []),
        *extra,
        seed_dir=synth.seed_root if few else None,
    )


@pytest.mark.parametrize("name", SCRIPTS)
def test_missing_data_folder_names_the_expected_path(name, synth, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    error = expect_error(SCRIPTS[name], any_args(name, synth, tmp_path, "Liver", data=missing), capsys)
    first = "Brain_AD" if name == "train_zero" else "Liver_AD"  # train_zero reads the other datasets first
    assert error.startswith(f"error: --data_path: dataset folder not found: {missing / first};")
    assert error.count("--data_path") == 1


@pytest.mark.parametrize("name", SCRIPTS)
def test_unknown_obj(name, synth, tmp_path, capsys):
    error = expect_error(SCRIPTS[name], any_args(name, synth, tmp_path, "Lung"), capsys)
    assert error == (
        "error: --obj: unknown dataset 'Lung': choose one of Brain, Liver, Retina_RESC, Retina_OCT2017, "
        "Chest, Histopathology"
    )


@pytest.mark.parametrize(
    "name, extra, expected",
    [
        (
            "test_zero",
            ["--model_name", "ViT-none"],
            "--model_name: unknown model 'ViT-none': no CLIP/model_configs/ViT-none.json and no weights",
        ),
        (
            "train_few",
            ["--init_ckpt", "{tmp}/none.pth"],
            "--init_ckpt: adapter checkpoint {tmp}/none.pth: no such file",
        ),
        (
            "train_few",
            ["--select", "val", "--shot", "3", "--iterate", "-1"],
            "--select: 'val': the valid split of Brain has no normal or no abnormal image left besides the "
            "support set; select on 'test' or 'last' instead",
        ),
        (
            "test_zero",
            ["--device", "cuda"],
            "--device: cuda: CUDA is not available on this machine (use cpu)",
        ),
    ],
)
def test_library_checks_are_printed_with_their_flag(name, extra, expected, synth, tmp_path, capsys):
    """A library check names the value and the fix in its own terms; the command line adds the flag's name."""
    if "cuda" in extra and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    extra = [word.format(tmp=tmp_path) for word in extra]
    error = expect_error(SCRIPTS[name], any_args(name, synth, tmp_path, "Brain", *extra), capsys)
    assert error == "error: " + expected.format(tmp=tmp_path)


@pytest.mark.parametrize("split", ["test", "valid"])
def test_missing_mask_of_an_abnormal_image(split, synth, tmp_path, capsys):
    data = copy_data(synth, tmp_path, ["Liver"])
    lists = (Path(synth.seed_root) / "Liver" / "2-shot.txt").read_text().splitlines()
    name = lists[1].split()[1] if split == "valid" else "00001.png"  # valid: an abnormal support image (a-0:)
    (data / "Liver_AD" / split / "Ungood" / "anomaly_mask" / name).unlink()
    error = expect_error(train_few, any_args("train_few", synth, tmp_path, "Liver", data=data), capsys)
    folder = data / "Liver_AD" / split / "Ungood"
    assert (
        error
        == f"error: no mask for image {folder / 'img' / name}: expected {folder / 'anomaly_mask' / name}"
    )


def test_missing_support_list(synth, tmp_path, capsys):
    # only k = 1, 2 exist
    args = script_args(synth.data, tmp_path, "Brain", "--shot", "3", seed_dir=synth.seed_root)
    error = expect_error(test_few, args, capsys)
    assert error.startswith(
        f"error: --seed_dir: support list not found: {Path(synth.seed_root) / 'Brain' / '3-shot.txt'}; "
    )
    assert "draw a support set at random instead (iterate -1, with a seed)" in error


@pytest.mark.parametrize(
    "content, iterate, flag, message",
    [
        (
            "n-0: 00000.png\na-0: 00000.png 00001.png",
            "0",
            "--shot",
            "has 1 image names after 'n-0:', fewer than a 2-shot support set needs",
        ),
        ("n-0: 00000.png 00001.png\na-0: 00000.png 00001.png", "1", "--iterate", "has no line 'n-1:'"),
    ],
)
def test_short_support_list(content, iterate, flag, message, synth, tmp_path, capsys):
    seeds = tmp_path / "seeds"
    (seeds / "Brain").mkdir(parents=True)
    (seeds / "Brain" / "2-shot.txt").write_text(content)
    args = script_args(synth.data, tmp_path, "Brain", "--shot", "2", "--iterate", iterate, seed_dir=seeds)
    error = expect_error(train_few, args, capsys)
    assert error.startswith(f"error: {flag}: support list {seeds / 'Brain' / '2-shot.txt'} {message}; ")


@pytest.mark.parametrize("name, workers", [("test_zero", "0"), ("test_zero", "1"), ("train_zero", "0")])
def test_corrupt_image_read_during_a_pass(name, workers, zero_brain, synth, tmp_path, capsys):
    """Images are read lazily, inside the evaluation (test_zero) or the training loop (train_zero, another
    dataset); the error still ends the run with one line, also from a DataLoader worker process."""
    data = copy_data(synth, tmp_path)
    bad = data / ("Chest_AD" if name == "test_zero" else "Liver_AD") / "test" / "good" / "img" / "00001.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n but then nothing")
    args = script_args(data, tmp_path, "Chest", "--num_workers", workers, "--batch_size", "6")
    if name == "test_zero":
        # any adapters of the tiny model will do
        args += ["--ckpt", str(zero_brain[0] / "ckpt" / "Brain.pth")]
    else:
        args += ["--epoch", "1", "--select", "last"]  # no test pass before the training steps
    error = expect_error(SCRIPTS[name], args, capsys)
    assert error.startswith(f"error: cannot read image {bad}: ") and error.endswith("replace or remove it)")


def test_image_with_nan_pixels_is_refused_when_read(synth, tmp_path, capsys):
    """A float image holding NaN is refused where it is read, naming it (it used to surface after the whole
    pass as NaN scores, no file named)."""
    data = copy_data(synth, tmp_path)
    folder = data / "Liver_AD" / "test" / "good" / "img"  # train_zero on Chest trains on Liver's test split
    (folder / "00001.png").unlink()
    pixels = np.full((SIZE, SIZE), 0.5, np.float32)
    pixels[3, 4] = np.nan
    Image.fromarray(pixels, mode="F").save(folder / "00001.tiff")
    args = script_args(data, tmp_path, "Chest", "--epoch", "1", "--select", "last", "--batch_size", "6")
    error = expect_error(train_zero, args, capsys)
    assert error == (
        f"error: image {folder / '00001.tiff'}: 1 NaN or infinite pixel value(s); replace them with finite "
        f"values in [0, 1] or remove the image"
    )


@pytest.mark.parametrize("name, flag", [("test_zero", "ckpt"), ("train_few", "init_ckpt")])
def test_training_state_given_as_ckpt_is_named(name, flag, synth, tmp_path, capsys):
    """load_adapters names the file; the script that read it adds the flag that gave it."""
    state = tmp_path / "states" / "Brain.pth.state"
    state.parent.mkdir()
    torch.save({"mvfa_training_state": 3, "args": {}, "epoch": 1}, state)
    error = expect_error(
        SCRIPTS[name], any_args(name, synth, tmp_path, "Brain", f"--{flag}", str(state)), capsys
    )
    assert error == (
        f"error: --{flag}: {state} is a training state (what a stopped training resumes from), not an "
        f"adapter checkpoint: pass the checkpoint its run saves beside it, such as "
        f"{tmp_path / 'states' / 'Brain.pth'}"
    )


def test_a_bug_in_the_forward_keeps_its_traceback(synth, tmp_path, monkeypatch, capsys):
    """A ValueError that is no check of the user's input (here raised inside the model's forward) leaves
    main() as itself, so that Python prints its traceback: no one-line `error:`, no exit code 2."""

    def broken(self, x):
        raise ValueError("a bug inside the forward")

    monkeypatch.setattr(CLIP_Inplanted, "forward", broken)
    args = script_args(synth.data, tmp_path, "Liver", "--epoch", "1", "--select", "last", "--batch_size", "6")
    capsys.readouterr()
    with pytest.raises(ValueError, match="a bug inside the forward") as raised:
        train_zero.main(args)
    assert not isinstance(raised.value, InputError)
    assert raised.traceback[-1].name == "broken"  # the traceback reaches the line that raised
    assert "error: " not in capsys.readouterr().err


@pytest.mark.parametrize("name", ["train_few", "train_zero"])
def test_existing_checkpoint_is_not_replaced_without_overwrite(name, synth, tmp_path, capsys):
    target = tmp_path / "ckpt" / "Brain.pth"
    target.parent.mkdir()
    target.write_bytes(b"someone's downloaded checkpoint")
    error = expect_error(SCRIPTS[name], any_args(name, synth, tmp_path, "Brain"), capsys)
    assert (
        error
        == f"error: --save_path: {target} exists already: pass --overwrite to replace it, or choose another "
        f"folder"
    )
    assert target.read_bytes() == b"someone's downloaded checkpoint"
    assert not list(tmp_path.glob("results/*"))  # refused before any work


def test_zero_shot_with_fewer_than_five_training_groups(synth, tmp_path, capsys):
    """3 groups (reference: len // 5 == 0 -> ZeroDivisionError): evaluated before every step,
    in every epoch."""
    data = copy_data(synth, tmp_path)
    for other in ("Brain", "Retina_RESC", "Retina_OCT2017", "Histopathology"):
        empty_test_split(data, other)  # left: Chest's 6 test images, in groups of 2
    returned = train_zero.main(script_args(data, tmp_path, "Liver", "--epoch", "2", "--batch_size", "2"))
    out = capsys.readouterr().out
    assert returned == only_record(tmp_path / "results")["metrics"]
    first, second = out.split("epoch 0 loss")
    assert len(result_lines(first, "Liver")) == len(result_lines(second, "Liver")) == 3 * 2
    assert "best epoch found: epoch 0 batch 0" in first and "epoch 1 loss" in second


def test_zero_shot_without_training_images(synth, tmp_path, capsys):
    data = copy_data(synth, tmp_path)
    for other in CLASS_NAMES[1:]:
        empty_test_split(data, other)
    error = expect_error(train_zero, script_args(data, tmp_path, "Brain", "--epoch", "1"), capsys)
    assert error.startswith("error: --data_path: no zero-shot training images: ") and str(data) in error


@pytest.mark.parametrize("name", ["test_few", "test_zero"])
def test_test_set_with_one_class(name, zero_brain, synth, tmp_path, capsys):
    data = copy_data(synth, tmp_path, ["Brain"])
    empty_test_split(data, "Brain", states=("Ungood",))
    args = any_args(
        name, synth, tmp_path, "Brain", "--ckpt", str(zero_brain[0] / "ckpt" / "Brain.pth"), data=data
    )
    error = expect_error(SCRIPTS[name], args, capsys)
    assert error == (
        "error: AUROC is undefined: the test set has only normal (or only abnormal) images (0 abnormal, "
        f"{N} normal); evaluate on a test set that has both"
    )


def test_missing_clip_weights_names_the_path(synth, tmp_path, capsys):
    missing = tmp_path / "weights" / "ViT-L-14-336px.pt"
    args = script_args(synth.data, tmp_path, "Brain", "--clip_ckpt", str(missing))
    args[args.index("--pretrain") + 1] = "openai"
    error = expect_error(test_zero, args, capsys)
    assert error.startswith(f"error: --clip_ckpt: CLIP weights not found at {missing}: download ")


def test_missing_adapter_checkpoint_names_the_path(synth, tmp_path, capsys):
    error = expect_error(test_zero, script_args(synth.data, tmp_path, "Brain"), capsys)
    assert error.startswith(
        f"error: --save_path: adapter checkpoint not found: {tmp_path / 'ckpt' / 'Brain.pth'} "
    )


# --------------------------------------------------------------- records and checkpoint loading


def test_run_records_of_one_second_do_not_replace_each_other(tmp_path):
    flags = vars(test_zero.parser().parse_args(["--obj", "Chest"]))
    paths = [
        records.write_record(str(tmp_path), "test_zero", "Chest", flags, {"image_auroc": v}, {})
        for v in (0.25, 0.5)
    ]
    assert paths[0] != paths[1]
    assert [json.loads(p.read_text())["metrics"]["image_auroc"] for p in paths] == [0.25, 0.5]


def test_every_torch_load_passes_map_location():
    """Checkpoints saved on a GPU must load on CPU-only machines (the reference's torch.load calls without
    map_location fail there): no torch.load without map_location."""
    calls = []
    for path in sorted(REPO.rglob("*.py")):
        if "tests" in path.relative_to(REPO).parts or any(
            p.startswith(".") for p in path.relative_to(REPO).parts
        ):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("torch.load", "torch.jit.load"):
                ok = len(node.args) >= 2 or any(k.arg == "map_location" for k in node.keywords)
                calls.append((f"{path.relative_to(REPO)}:{node.lineno}", ok))
    assert calls, "no torch.load call found: the scan is broken"
    assert [where for where, ok in calls if not ok] == []
