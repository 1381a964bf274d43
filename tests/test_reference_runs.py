"""The reference's recorded runs, run as a user would, on any CPU.

Each recorded command runs unchanged in a user's checkout of the inputs it was recorded on (conftest
`checkout_for`). What is compared depends on the CPU (tests/kernel_fingerprint.py):

- on the recording's kernel family (the fingerprint matches, natively or on this CPU's AVX2 paths): every
  printed line, every training step's loss and the final adapters' SHA-256, every image score and map pixel,
  exactly;
- on another family: what does not depend on the last bits beyond a measured drift: a training's first
  STEPS_CHECKED losses within STEP_RTOL, every image score within IMAGE_TOL and map pixel within MAP_TOL. The
  whole-run comparison is skipped, naming both fingerprints.

recordings.json holds the recordings of this kind (tests/fixtures/reference/README.md); the four test runs of
reference_outputs_seed0.txt keep their own files.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from first_steps import first_steps
from kernel_fingerprint import SETTINGS, describe, matching_setting, thread_environment
from recordings import RECORDINGS, legacy_test_runs

# Absolute tolerances on min-max normalised float32 scores in [0, 1] across kernel families. Measured: the
# seed-0 test runs on AVX-512 kernels against their AVX2 recording differ by up to 1.3e-5 in the maps and
# 1.5e-4 in the image scores (the min-max over 12 images magnifies last-bit differences of the raw scores);
# these allow about 3x that. A wrong fusion weight, a dropped min-max or a shifted map moves them by 1e-2 and
# more. (ViT-L runs of 1 to 20 minutes each: the slow tier.)
MAP_TOL = 5e-5
IMAGE_TOL = 5e-4

# A training's first steps across kernel families, measured (tests/fixtures/reference/README.md, "Drift"):
# train_few k = 2 on the seed-0 inputs, one thread, AVX2 kernels against the SSE4.1 ones on one machine. The
# first 5 losses were equal, the relative difference stayed at most 7.6e-7 over the first 10 steps and
# 1.6e-6 over the first 27, then Adam's normalised steps took it to 2.3e-5 at step 28 and 6.9e-5 at 29. So
# 10 steps are checked, leaving room for a family where that jump comes earlier, within 1e-5: 13x the
# measured drift, far below what a changed loss, input or initial draw moves (1e-3 and more).
STEPS_CHECKED = 10
STEP_RTOL = 1e-5


def kernel_setting(fingerprint: str, threads: int) -> tuple[dict, str | None]:
    """The environment a replay runs in: the recording's thread count, and the setting under which this
    machine computes as the recording's did; that setting's name, None for another kernel family."""
    setting = matching_setting(fingerprint, threads)
    return {**os.environ, **thread_environment(threads), **SETTINGS[setting or "native"]}, setting


def another_family(fingerprint: str, threads: int) -> str:
    machine = RECORDINGS["machine"]["cpu"]
    return (
        f"another kernel family: recorded with fingerprint {fingerprint} ({machine}, {threads} thread(s)); "
        f"this CPU gives {describe(threads)}"
    )


def result_lines(lines: list[str]) -> list[str]:
    """Every evaluation's printed metrics and the zero-shot selection messages, in order."""
    return [
        line.strip()
        for line in lines
        if " AUC : " in line or " pAUC : " in line or line.startswith("best epoch found")
    ]


def run(command: str, checkout: Path, env: dict, *extra: str) -> list[str]:
    """A recorded command in `checkout`, on the CPU; its stdout lines."""
    words = [sys.executable, *command.split(), "--device", "cpu", *extra]
    out = subprocess.run(words, cwd=checkout, capture_output=True, text=True, timeout=5400, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.splitlines()


# ------------------------------------------------------------------------------------------------------------
# trainings from scratch
# ------------------------------------------------------------------------------------------------------------
TRAININGS = RECORDINGS["trainings"]


def recording_id(recording: dict) -> str:
    inputs = recording["inputs"]
    return f"{recording['command']} (seed {inputs['seed']}, {inputs['n_per_split']} per split)"


def group(test_id: str) -> pytest.MarkDecorator:
    """The tests of one recording share its run: under pytest-xdist (--dist loadgroup) one worker runs them
    (a group name of letters, digits and dashes: xdist finds it after the last ']' of the test's id)."""
    return pytest.mark.xdist_group(re.sub(r"[^A-Za-z0-9]+", "-", test_id).strip("-"))


@pytest.fixture(scope="session")
def replayed(checkout_for, tmp_path_factory):
    """replay(recording) -> (printed lines, outputs) of our run of a recorded command, made once per session:
    a training's run record, a test run's --save_scores arrays."""
    done = {}

    def replay(recording: dict) -> tuple[list[str], dict]:
        key = recording_id(recording)
        if key not in done:
            env, _ = kernel_setting(recording["fingerprint"], recording["threads"])
            out = tmp_path_factory.mktemp("replay")
            checkout = checkout_for(**recording["inputs"])
            if recording["command"].startswith("train"):
                flags = ("--save_path", str(out / "ckpt"), "--out_dir", str(out / "results"))
                printed = run(recording["command"], checkout, env, *flags)
                done[key] = printed, json.loads(next((out / "results").glob("*.json")).read_text())
            else:
                flags = ("--out_dir", str(out / "results"), "--save_scores", str(out / "scores.npz"))
                printed = run(recording["command"], checkout, env, *flags)
                done[key] = printed, dict(np.load(out / "scores.npz"))
        return done[key]

    return replay


# The recorded runs that CI's slow tier leaves out for time (`-m "slow and not extra"`, ~25 minutes less on 2
# cores), each with the run that takes its path there; `-m slow` replays them all.
EXTRA = {
    # its first steps run in the quick tier; k = 8 runs whole
    "train_few.py --obj Brain --shot 2 --iterate 0 --epoch 1 (seed 0, 6 per split)",
    # k = 8 runs whole on the seed-7 inputs: the same path, twice the steps
    "train_few.py --obj Brain --shot 4 --iterate 0 --epoch 1 (seed 0, 6 per split)",
    "train_few.py --obj Brain --shot 4 --iterate 0 --epoch 1 (seed 7, 8 per split)",
    # train_zero.py trains on the five other datasets, Liver among them, with Chest as the target
    "train_zero.py --obj Liver --epoch 1 (seed 0, 6 per split)",
    # the same command on the seed-3 inputs: 80 test images, five blocks of maps
    "test_few.py --obj Brain --shot 4 --iterate 0 (seed 0, 6 per split)",
}


def marks_of(recording: dict, *marks: pytest.MarkDecorator) -> list:
    """Its xdist group, the marks given, and `extra` for a run CI's slow tier leaves out."""
    test_id = recording_id(recording)
    return [group(test_id), *marks] + ([pytest.mark.extra] if test_id in EXTRA else [])


def each_training() -> list:
    """The recorded trainings as parameters; the tests of one training share its run, so under pytest-xdist
    (--dist loadgroup) they run in one worker."""
    return [pytest.param(r, id=recording_id(r), marks=marks_of(r)) for r in TRAININGS]


def assert_within_drift(ours: list[float], recording: dict) -> None:
    """Our first STEPS_CHECKED losses within STEP_RTOL of the recording's (relative)."""
    recorded = np.array(recording["step_losses"][:STEPS_CHECKED])
    assert len(ours) == STEPS_CHECKED
    relative = np.abs(np.array(ours) - recorded) / np.abs(recorded)
    assert relative.max() <= STEP_RTOL, f"step losses differ by up to {relative.max():.3g} (relative)"


@pytest.mark.slow
@pytest.mark.parametrize("recording", each_training())
def test_training_first_steps_on_any_cpu(recording, replayed):
    """The first steps' losses, within the drift between kernel families."""
    _, record = replayed(recording)
    assert_within_drift(record["training"]["step_losses"][0][:STEPS_CHECKED], recording)


@pytest.mark.slow
@pytest.mark.parametrize("recording", each_training())
def test_training_exact_on_its_kernel_family(recording, replayed):
    """Every printed result line, every step's loss, the epoch's mean loss and the final adapters' digest,
    exactly."""
    if matching_setting(recording["fingerprint"], recording["threads"]) is None:
        pytest.skip(another_family(recording["fingerprint"], recording["threads"]))
    printed, record = replayed(recording)
    assert result_lines(printed) == result_lines(recording["printed"])
    training = record["training"]
    assert training["step_losses"] == [recording["step_losses"]]
    recorded_mean = [float(line.split()[-1]) for line in recording["printed"] if line.startswith("Loss:")]
    assert training["epoch_losses"] == recorded_mean
    assert training["final_adapters_sha256"] == recording["adapters_sha256"]


def test_first_steps_of_a_recorded_training(checkout_for, tmp_path):
    """The quick tier's training check: the first steps of the seed-0 k = 2 few-shot training (the script's
    own main, stopped after STEPS_CHECKED steps), within the drift on any CPU, exactly on its family."""
    recording = next(r for r in TRAININGS if r["command"].startswith("train_few.py --obj Brain --shot 2"))
    env, setting = kernel_setting(recording["fingerprint"], recording["threads"])
    words = [*recording["command"].split(), "--device", "cpu", "--save_path", str(tmp_path / "ckpt")]
    words += ["--out_dir", str(tmp_path / "results")]
    ours = first_steps(STEPS_CHECKED, words, env, cwd=checkout_for(**recording["inputs"]))
    assert_within_drift(ours, recording)
    if setting is not None:
        assert ours == recording["step_losses"][:STEPS_CHECKED]


# ------------------------------------------------------------------------------------------------------------
# test runs: printed lines, and per image and per pixel the scores behind them (--save_scores)
# ------------------------------------------------------------------------------------------------------------
TEST_RUNS = RECORDINGS["test_runs"] + legacy_test_runs()


def each_test_run() -> list:
    """The recorded test runs as parameters, in the slow tier (the quick tier's recorded run is a training's
    first steps: test_first_steps_of_a_recorded_training)."""
    return [pytest.param(r, id=recording_id(r), marks=marks_of(r, pytest.mark.slow)) for r in TEST_RUNS]


def recorded_arrays(recording: dict) -> dict:
    if isinstance(recording["labels"], np.ndarray):
        return recording  # a legacy run: its arrays whole
    return {"labels": np.array(recording["labels"]), "image_scores": np.array(recording["image_scores"])}


@pytest.mark.parametrize("recording", each_test_run())
def test_run_scores_on_any_cpu(recording, replayed):
    """Every image score within IMAGE_TOL and map pixel within MAP_TOL of the reference's, the labels and
    masks equal."""
    _, ours = replayed(recording)
    recorded = recorded_arrays(recording)
    assert np.array_equal(ours["labels"], recorded["labels"])
    difference = np.abs(ours["image_scores"].astype(np.float64) - recorded["image_scores"]).max()
    assert difference <= IMAGE_TOL, f"image scores differ by up to {difference:.3g}"
    if "maps_probe" not in recording and "maps" not in recorded:
        assert "maps" not in ours  # image-level datasets have no maps
        return
    maps = ours["maps"].reshape(len(ours["labels"]), -1)  # [N, H*W]
    if "maps" in recorded:  # a legacy run: the maps whole
        assert np.array_equal(ours["masks"].reshape(maps.shape), recorded["masks"])
        difference = np.abs(maps.astype(np.float64) - recorded["maps"]).max()
    else:
        masks = ours["masks"].reshape(maps.shape)
        assert [sha256(m) for m in masks] == recording["masks_sha256"]
        probe = recording["maps_probe"]
        difference = np.abs(maps.reshape(-1)[probe["index"]].astype(np.float64) - probe["values"]).max()
        # all pixels: the norms of two maps within MAP_TOL pixel by pixel differ by at most sqrt(n) * MAP_TOL
        # (triangle inequality); their sums by n * MAP_TOL at worst, but independent last-bit differences add
        # up like a random walk, whose standard deviation is at most sqrt(n) * MAP_TOL: 6 of those
        wide = maps.astype(np.float64)
        assert abs(np.linalg.norm(wide) - probe["norm"]) <= np.sqrt(maps.size) * MAP_TOL
        assert abs(wide.sum() - probe["sum"]) <= 6 * np.sqrt(maps.size) * MAP_TOL
    assert difference <= MAP_TOL, f"anomaly maps differ by up to {difference:.3g}"


@pytest.mark.parametrize("recording", each_test_run())
def test_run_exact_on_its_kernel_family(recording, replayed):
    """The printed lines, every image score and every map pixel, exactly."""
    if matching_setting(recording["fingerprint"], recording["threads"]) is None:
        pytest.skip(another_family(recording["fingerprint"], recording["threads"]))
    printed, ours = replayed(recording)
    assert result_lines(printed) == recording["printed"]
    recorded = recorded_arrays(recording)
    assert np.array_equal(ours["image_scores"], recorded["image_scores"].astype(np.float32))
    if "maps" in recorded:
        assert np.array_equal(ours["maps"].reshape(recorded["maps"].shape), recorded["maps"])
    elif "maps_sha256" in recording:
        maps = ours["maps"].reshape(len(ours["labels"]), -1)
        assert [sha256(m) for m in maps] == recording["maps_sha256"]


def sha256(array: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


@pytest.mark.slow
def test_paper_tables_cell_equals_recorded_line(checkout_for):
    """tools/paper_tables.py on the seed-0 inputs: its zero-shot HIS cell is the recorded
    `Histopathology AUC` line in %.

    Only that run is made (no few-shot checkpoints in the folder given): the few-shot row is '-' with a note.
    """
    import csv

    checkout = checkout_for(0, 6)
    recorded = next(r for r in legacy_test_runs() if r["command"] == "test_zero.py --obj Histopathology")
    auc = float(
        next(line for line in recorded["printed"] if line.startswith("Histopathology AUC")).split(":")[1]
    )
    out_dir = checkout / "results/paper_tables"
    words = ["--objs", "Histopathology", "--few_dir", "no-such-dir", "--out", str(out_dir)]
    out = subprocess.run(
        [sys.executable, "-m", "tools.paper_tables", *words],
        cwd=checkout,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {}
    for setting in ("zero_shot", "few_shot"):
        with open(out_dir / f"{setting}.csv", newline="") as f:
            rows[setting] = {row["dataset"]: row for row in csv.DictReader(f)}
    assert float(rows["zero_shot"]["HIS"]["image_auroc_ours"]) == round(100 * auc, 2)
    assert rows["zero_shot"]["HIS"]["image_auroc_paper"] == "77.90"
    assert rows["few_shot"]["HIS"]["image_auroc_ours"] == "-"
    assert "Histopathology few-shot: not run, adapter checkpoint not found" in out.stdout
    assert "## Zero-shot (AUROC, %)" in (out_dir / "tables.md").read_text()


def test_extra_names_recorded_runs():
    """Every run CI's slow tier leaves out is a recorded one (a misspelt name would leave it in), and every
    kind of run stays in: a few-shot and a zero-shot training, a few-shot and a zero-shot test run."""
    every = {recording_id(r): r["command"].split()[0] for r in TRAININGS + TEST_RUNS}
    assert EXTRA.issubset(every)
    kept = {script for test_id, script in every.items() if test_id not in EXTRA}
    assert kept == {"train_few.py", "train_zero.py", "test_few.py", "test_zero.py"}
