"""Resumable training: a run stopped between epochs, inside an epoch, or while its state is written,
then continued with --resume, ends with the uninterrupted run's checkpoint (torch.equal)
and prints the same lines."""

import contextlib
import io
import os
import signal
import subprocess
import sys
import threading

import pytest
import torch
from test_scripts import REPO, TINY, load_ckpt, result_lines

import train_few
import train_zero
from mvfa import records, training

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = {
    "few": (train_few, "Brain", ["--shot", "1", "--epoch", "2"]),  # 22 steps an epoch
    "zero": (train_zero, "Chest", ["--epoch", "2", "--batch_size", "6"]),  # 5 groups, 5 selections
}


def arguments(case: str, synth, folder) -> list[str]:  # noqa: F811
    module, obj, extra = CASES[case]
    seed = ["--seed_dir", synth.seed_root] if module is train_few else []
    return [
        *TINY,
        "--obj",
        obj,
        "--data_path",
        synth.data,
        "--save_path",
        str(folder / "ckpt"),
        "--out_dir",
        str(folder / "results"),
        *seed,
        *extra,
    ]


def run(case: str, args: list[str], capsys) -> tuple[int, list[str]]:
    """main(args): (exit status, printed lines); a completed run returns its result dict (status 0), a stop by
    signal exits through SystemExit with its message."""
    capsys.readouterr()
    try:
        result = CASES[case][0].main(args)
        assert isinstance(result, dict) and "image_auroc" in result
        status = 0
    except SystemExit as e:
        status = e.code
    return status, capsys.readouterr().out.splitlines()


def signal_at_step(monkeypatch, case: str, n: int) -> None:
    """The n-th training step (1-based) of the run sends SIGUSR1 to this process, as SLURM would
    (Training.step calls mvfa.training.train_step by its module global, in both protocols)."""
    real, calls = training.train_step, []

    def step(*a, **k):
        calls.append(1)
        if len(calls) == n:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real(*a, **k)

    monkeypatch.setattr(training, "train_step", step)


@pytest.fixture(scope="module")
def uninterrupted(synth, tmp_path_factory):  # noqa: F811
    """Each case run once without a stop: (final adapters, printed lines)."""
    out = {}
    for case, (module, obj, _) in CASES.items():
        folder, text = tmp_path_factory.mktemp(case), io.StringIO()
        with contextlib.redirect_stdout(text):
            result = module.main(arguments(case, synth, folder))
        assert isinstance(result, dict) and "image_auroc" in result
        out[case] = load_ckpt(folder / "ckpt" / f"{obj}.pth"), text.getvalue().splitlines()
    return out


def assert_same_run(case, folder, lines, uninterrupted):
    expected_ckpt, expected_lines = uninterrupted[case]
    ckpt = load_ckpt(folder / "ckpt" / f"{CASES[case][1]}.pth")
    for part in ("seg_adapters", "det_adapters"):
        assert ckpt[part].keys() == expected_ckpt[part].keys()
        assert all(torch.equal(ckpt[part][k], expected_ckpt[part][k]) for k in ckpt[part])
    assert lines == expected_lines
    assert result_lines("\n".join(lines), CASES[case][1])  # the lines hold results
    assert not training.state_file(folder / "ckpt" / f"{CASES[case][1]}.pth").exists()  # removed when done


@pytest.mark.parametrize("case", CASES)
def test_killed_between_epochs(case, synth, tmp_path, monkeypatch, capsys, uninterrupted):  # noqa: F811
    """The process dies (kill -9) right after the first epoch's state is written."""
    real = training.Training.save_state

    def save_then_die(self, *a):
        real(self, *a)
        raise KeyboardInterrupt  # stands in for the process being killed there

    monkeypatch.setattr(training.Training, "save_state", save_then_die)
    args = arguments(case, synth, tmp_path)
    with pytest.raises(KeyboardInterrupt):
        CASES[case][0].main(args)
    state = torch.load(training.state_file(tmp_path / "ckpt" / f"{CASES[case][1]}.pth"), weights_only=False)
    assert (state["epoch"], state["position"]) == (1, 0)
    monkeypatch.undo()
    status, lines = run(case, args + ["--resume"], capsys)
    assert status == 0
    assert_same_run(case, tmp_path, lines, uninterrupted)


@pytest.mark.parametrize("case", CASES)
def test_signal_inside_an_epoch(case, synth, tmp_path, monkeypatch, capsys, uninterrupted):  # noqa: F811
    """SIGUSR1 during the 4th step of the second epoch: the run stops after that step, saves,
    exits non-zero."""
    signal_at_step(monkeypatch, case, (22 if case == "few" else 5) + 4)
    args = arguments(case, synth, tmp_path)
    status, _ = run(case, args, capsys)
    assert status != 0 and "--resume" in str(status)
    state = torch.load(training.state_file(tmp_path / "ckpt" / f"{CASES[case][1]}.pth"), weights_only=False)
    assert (state["epoch"], state["position"]) == (1, 4)
    monkeypatch.undo()
    status, lines = run(case, args + ["--resume"], capsys)
    assert status == 0
    assert_same_run(case, tmp_path, lines, uninterrupted)


@pytest.mark.parametrize("case", CASES)
def test_death_while_the_state_is_written(case, synth, tmp_path, monkeypatch, capsys, uninterrupted):  # noqa: F811
    """The second state write dies before its rename (kill -9 there):
    the first state stays whole and serves."""
    real, writes = os.replace, []

    def dying_replace(src, dst):
        if str(dst).endswith(".state"):  # os is shared: checkpoints are renamed through it too
            writes.append(dst)
        if len(writes) == 2:
            raise KeyboardInterrupt  # stands in for the process being killed in the middle of the write
        real(src, dst)

    monkeypatch.setattr(records.os, "replace", dying_replace)  # save_atomic's rename
    args = arguments(case, synth, tmp_path)
    with pytest.raises(KeyboardInterrupt):
        CASES[case][0].main(args)
    path = training.state_file(tmp_path / "ckpt" / f"{CASES[case][1]}.pth")
    assert torch.load(path, weights_only=False)["epoch"] == 1  # the state of the first epoch's end
    monkeypatch.undo()
    capsys.readouterr()
    status, lines = run(case, args + ["--resume"], capsys)
    assert status == 0
    assert_same_run(case, tmp_path, lines, uninterrupted)


def test_resume_without_state_starts_from_the_beginning(synth, tmp_path, capsys, uninterrupted):  # noqa: F811
    status, lines = run("zero", arguments("zero", synth, tmp_path) + ["--resume"], capsys)
    assert status == 0 and lines == uninterrupted["zero"][1]


def test_real_sigterm_saves_state_and_says_how_to_resume(synth, tmp_path):  # noqa: F811
    """A separate process gets SIGTERM while it trains: it writes its state and exits non-zero,
    naming --resume."""
    args = arguments("few", synth, tmp_path)
    args[args.index("--epoch") + 1] = "200"
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "train_few.py"), *args],
        cwd=tmp_path,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    err = []

    def read():
        for chunk in iter(lambda: proc.stderr.read(64), ""):
            err.append(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    while proc.poll() is None and "epoch 1:" not in "".join(err):  # training, past the first epoch's state
        threading.Event().wait(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    reader.join()
    message = "".join(err).strip().splitlines()[-1]
    assert proc.returncode != 0
    assert message.startswith("interrupted by signal 15: training state saved to ") and "--resume" in message
    assert training.state_file(tmp_path / "ckpt" / "Brain.pth").is_file()
