"""Faults that cannot cost a result: a training state that cannot be continued (damaged, foreign, of another
state version or of other arguments) is refused in one line before the model is built and left as it was; a
run without --resume moves it aside; an unwritable --save_path is refused in seconds; the converter refuses
unmatched masks."""

import os
import shutil
import time
import zipfile
from pathlib import Path

import pytest
import torch
from test_resume import arguments
from test_scripts import expect_error

import train_few
import train_zero
from mvfa import resume, training
from mvfa.config import ModelConfig
from tools.convert import main as convert_main

pytestmark = pytest.mark.usefixtures("one_thread")

SCRIPTS = {"few": train_few, "zero": train_zero}
AFRESH = "or run without --resume, which moves it aside and starts afresh"


@pytest.fixture(scope="module")
def synthetic(request):
    """The synthetic benchmark of test_scripts' session fixture `synth` (a parameter of that name would shadow
    the import that makes pytest see it)."""
    return request.getfixturevalue("synth")


@pytest.fixture(scope="module")
def stopped(synthetic, tmp_path_factory) -> Path:
    """A few-shot run (--shot 1, 2 epochs) killed right after its first epoch's state: its ckpt/ folder,
    holding Brain.pth and Brain.pth.state."""
    folder = tmp_path_factory.mktemp("stopped")
    real = training.Training.save_state

    def save_then_die(self, *a):
        real(self, *a)
        raise KeyboardInterrupt  # stands in for the process being killed there

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(training.Training, "save_state", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            train_few.main(arguments("few", synthetic, folder))
    return folder / "ckpt"


@pytest.fixture
def copy(stopped, tmp_path) -> Path:
    """The stopped run's ckpt/ folder in this test's tmp_path; returns its state file."""
    shutil.copytree(stopped, tmp_path / "ckpt")
    return training.state_file(tmp_path / "ckpt" / "Brain.pth")


@pytest.fixture
def no_model(monkeypatch):
    """Building the model fails the test: every refusal here must come before it (the scripts build it with
    ModelConfig.build after the checks)."""

    def build(*a, **k):
        raise AssertionError("the model was built")

    monkeypatch.setattr(ModelConfig, "build", build)


def refused(args: list[str], state: Path, capsys) -> str:
    """train_few.main(args) exits with code 2 and one line, leaving `state` as it was; returns the line."""
    before = state.read_bytes()
    error = expect_error(train_few, args, capsys)
    assert state.read_bytes() == before
    assert [p.name for p in state.parent.iterdir() if ".state" in p.name] == [state.name]  # none moved aside
    return error


# ---------------------------------------------------------------- states that cannot be continued


@pytest.mark.parametrize("damage", ["cut off", "empty", "random bytes"])
def test_damaged_state(damage, synthetic, tmp_path, copy, no_model, capsys):
    data = copy.read_bytes()
    damaged = {"cut off": data[: len(data) // 2], "empty": b"", "random bytes": os.urandom(4096)}[damage]
    copy.write_bytes(damaged)
    error = refused(arguments("few", synthetic, tmp_path) + ["--resume"], copy, capsys)
    flaw = {
        "cut off": "it is cut off: a zip archive without its end",
        "empty": "it is empty",
        "random bytes": "it is no zip archive as torch.save writes",
    }[damage]
    assert error == (
        f"error: training state {copy} cannot be read ({flaw}): delete it or move it away, {AFRESH}"
    )


def test_state_damaged_inside_its_archive(synthetic, tmp_path, copy, no_model, capsys):
    """A whole zip archive whose records are not torch's: the loader's own words."""
    with zipfile.ZipFile(copy, "w") as archive:
        archive.writestr("state/data.pkl", b"not a pickle")
    error = refused(arguments("few", synthetic, tmp_path) + ["--resume"], copy, capsys)
    assert error.startswith(f"error: training state {copy} cannot be read (RuntimeError: ")
    assert error.endswith(f"): delete it or move it away, {AFRESH}")


@pytest.mark.parametrize("other", ["plain dict", "adapter checkpoint"])
def test_state_of_another_program(other, synthetic, tmp_path, copy, no_model, capsys):
    if other == "plain dict":
        torch.save({"epoch": 1, "model": {}}, copy)
    else:
        shutil.copy(copy.parent / "Brain.pth", copy)
    error = refused(arguments("few", synthetic, tmp_path) + ["--resume"], copy, capsys)
    assert error == f"error: {copy} is not a training state of this code: move it away, {AFRESH}"


def test_state_of_another_version(synthetic, tmp_path, copy, no_model, capsys):
    state = torch.load(copy, weights_only=False)
    torch.save({**state, "mvfa_training_state": 1}, copy)
    error = refused(arguments("few", synthetic, tmp_path) + ["--resume"], copy, capsys)
    assert error == (
        f"error: training state {copy} is of state version 1, this code continues version "
        f"{resume.STATE_VERSION} only: continue it with the code that wrote it, or delete it "
        f"or move it away, {AFRESH}"
    )


@pytest.mark.parametrize(
    "flag, new, shown",
    [("--shot", "2", "--shot 1 -> 2"), ("--learning_rate", "0.01", "--learning_rate 0.001 -> 0.01")],
)
def test_state_of_other_arguments(flag, new, shown, synthetic, tmp_path, copy, no_model, capsys):
    args = arguments("few", synthetic, tmp_path)
    if flag in args:
        args[args.index(flag) + 1] = new
    else:
        args += [flag, new]
    error = refused(args + ["--resume"], copy, capsys)
    old = shown.split(" -> ")[0]
    assert error == (
        f"error: training state {copy} is of a run with other arguments: {shown}; to continue "
        f"that run, rerun its command ({old} --resume), or run without --resume, which moves "
        f"the state aside and replaces {copy.parent / 'Brain.pth'} with --overwrite and starts "
        f"afresh"
    )


def test_state_of_another_obj(synthetic, tmp_path, copy, no_model, capsys):
    """Another dataset whose checkpoint has the same name: --obj as a folder named Brain."""
    other = tmp_path / "own" / "Brain"
    other.parent.mkdir()
    other.symlink_to(Path(synthetic.data) / "Brain_AD")
    args = arguments("few", synthetic, tmp_path)
    args[args.index("--obj") + 1] = str(other)
    error = refused(args + ["--prompt_name", "Brain", "--resume"], copy, capsys)
    assert f"other arguments: --obj Brain -> {other}, --prompt_name unset -> Brain; " in error
    assert "rerun its command (--obj Brain without --prompt_name --resume)" in error


def test_result_neutral_flags_may_differ(synthetic, tmp_path, copy, capsys):
    """Other --out_dir, --num_workers and --overwrite: the run continues from epoch 1."""
    args = arguments("few", synthetic, tmp_path)
    args[args.index("--out_dir") + 1] = str(tmp_path / "elsewhere")
    capsys.readouterr()
    result = train_few.main(args + ["--num_workers", "1", "--overwrite", "--resume"])
    assert isinstance(result, dict) and {"image_auroc", "pixel_auroc"} <= result.keys()
    assert f"--resume: continuing from {copy} at epoch 1, step 0" in capsys.readouterr().err
    assert len(list((tmp_path / "elsewhere").glob("train_few_*.json"))) == 1 and not copy.exists()


def test_fresh_run_moves_the_state_aside(synthetic, tmp_path, copy, monkeypatch, capsys):
    """Without --resume (and with another --shot): the old state is kept aside; the new run writes its own."""
    before = copy.read_bytes()
    args = arguments("few", synthetic, tmp_path)
    args[args.index("--shot") + 1] = "2"
    error = expect_error(train_few, args, capsys)  # the stopped run's checkpoint is there
    assert error == (
        f"error: --save_path: {copy.parent / 'Brain.pth'} exists already, beside the training state {copy} "
        f"of an unfinished run: add --resume to continue that run, or --overwrite to start "
        f"afresh (the state is then moved aside)"
    )
    real = training.Training.save_state

    def save_then_die(self, *a):
        real(self, *a)
        raise KeyboardInterrupt  # the new run stops after its first state

    monkeypatch.setattr(training.Training, "save_state", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_few.main(args + ["--overwrite"])
    moved = list(copy.parent.glob("Brain.pth.state.old-*"))
    assert len(moved) == 1 and moved[0].read_bytes() == before
    err = capsys.readouterr().err
    assert f"the training state {copy} of an earlier run was moved aside to {moved[0]}" in err
    assert torch.load(copy, weights_only=False)["args"]["shot"] == 2  # the new run's own state


# ---------------------------------------------------------------- checks before the first forward pass


@pytest.mark.parametrize("case", ["few", "zero"])
@pytest.mark.parametrize("where", ["file", "below a file", "read-only", "out_dir a file"])
def test_unwritable_folder_is_refused_in_seconds(case, where, synthetic, tmp_path, no_model, capsys):
    if where == "read-only" and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders: the refusal cannot be seen")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the folder should be")
    folder = {
        "file": blocker,
        "below a file": blocker / "ckpt",
        "read-only": tmp_path / "locked",
        "out_dir a file": blocker,
    }[where]
    if where == "read-only":
        folder.mkdir(mode=0o555)
    flag = "--out_dir" if where == "out_dir a file" else "--save_path"
    args = arguments(case, synthetic, tmp_path)
    args[args.index(flag) + 1] = str(folder)
    args[args.index("--epoch") + 1] = "30"
    start = time.perf_counter()
    error = expect_error(SCRIPTS[case], args, capsys)
    assert time.perf_counter() - start < 20
    expected = {
        "file": "is a file, not a folder; choose another folder",
        "below a file": f"cannot be made: {blocker} is a file, not a folder; choose another folder",
        "read-only": f"cannot be written (Permission denied in {folder}); choose another folder or "
        f"make it writable",
        "out_dir a file": "is a file, not a folder; choose another folder",
    }[where]
    assert error == f"error: {flag}: {folder} {expected}"
    assert not list(tmp_path.rglob("*.state"))


def test_cut_off_clip_weights_are_refused_before_the_model(synthetic, tmp_path, no_model, capsys):
    weights = tmp_path / "ViT-L-14-336px.pt"
    torch.save({"w": torch.zeros(1000)}, weights)
    weights.write_bytes(weights.read_bytes()[:2000])
    args = arguments("zero", synthetic, tmp_path) + ["--clip_ckpt", str(weights)]
    args[args.index("--pretrain") + 1] = "openai"
    error = expect_error(train_zero, args, capsys)
    assert error == (
        f"error: CLIP weights {weights} is cut off (a zip archive without its end): an "
        f"incomplete download or copy; download or copy it again"
    )


# ---------------------------------------------------------------- the converter


@pytest.fixture
def flat(synthetic, tmp_path) -> Path:
    """Plain folders normal/, abnormal/, masks/ of 4 images each (synthetic Brain valid and test images)."""
    root = tmp_path / "flat"
    for state, folder in (("good", "normal"), ("Ungood", "abnormal")):
        (root / folder).mkdir(parents=True)
        for split in ("valid", "test"):
            images = Path(synthetic.data) / "Brain_AD" / split / state / "img"
            for i, src in enumerate(sorted(images.iterdir())[:2]):
                shutil.copy(src, root / folder / f"{split}{i}.png")
                if state == "Ungood":
                    (root / "masks").mkdir(exist_ok=True)
                    shutil.copy(images.parent / "anomaly_mask" / src.name, root / "masks" / f"{split}{i}.png")
    return root


def test_converter_refuses_unmatched_masks_and_images(flat, tmp_path):
    masks = flat / "masks"
    shutil.copy(masks / "test0.png", masks / "stray.png")
    shutil.copy(masks / "test1.png", masks / "other.png")
    (masks / "valid1.png").unlink()
    argv = [
        "--normal",
        str(flat / "normal"),
        "--abnormal",
        str(flat / "abnormal"),
        "--masks",
        str(masks),
        "--out",
        str(tmp_path / "knee"),
        "--valid",
        "0.34",
    ]
    with pytest.raises(SystemExit) as e:
        convert_main(argv)
    assert str(e.value.code) == (
        f"error: no mask for image valid1.png of --abnormal; 2 mask(s) of --masks "
        f"{masks} match no image of --abnormal: other.png, stray.png (masks pair "
        f"with images by file name); rename them, or pass --allow_unmatched to "
        f"leave these images and masks out"
    )
    assert not (tmp_path / "knee").exists()
    assert convert_main(argv + ["--allow_unmatched"]) == 0
    images = sorted(p.name for p in (tmp_path / "knee").rglob("Ungood/img/*"))
    paired = sorted(p.name for p in (tmp_path / "knee").rglob("Ungood/anomaly_mask/*"))
    assert images == paired == ["test0.png", "test1.png", "valid0.png"]
