"""The reference's four recorded runs (../shared/reference/reference_outputs_seed0.txt), run as a user would.

A user's checkout is laid out in tmp: this repository's code, with the regenerated seed-0 inputs where a user puts
the downloads (CLIP/ckpt/, ckpt/few-shot/, ckpt/zero-shot/, data/, dataset/fewshot_seed/); then each recorded
command runs unchanged from that folder and must print exactly the recorded lines.
"""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REFERENCE, REPO, require_reference


def recorded_runs(transcript: str = "reference_outputs_seed0.txt") -> list[tuple[str, list[str]]]:
    """[(command, printed lines)] from one of the reference's transcripts."""
    path = REFERENCE / transcript
    if not path.is_file():
        return []
    runs = []
    for line in path.read_text().splitlines():
        if line.startswith("$ python "):
            runs.append((line[len("$ python "):], []))
        elif line.strip():
            runs[-1][1].append(line.strip())
    return runs


@pytest.fixture(scope="module")
def user_checkout(reference_assets, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("checkout")
    for src in [REPO / "CLIP", REPO / "dataset", *REPO.glob("*.py")]:
        name = src.name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__", "ckpt", "fewshot_seed"))
        else:
            shutil.copy(src, root / name)
    (root / "CLIP/ckpt").mkdir()
    os.symlink(reference_assets / "CLIP/ckpt/ViT-L-14-336px.pt", root / "CLIP/ckpt/ViT-L-14-336px.pt")
    for rel in ("ckpt", "data", "dataset/fewshot_seed"):
        os.symlink(reference_assets / rel, root / rel)
    return root


@pytest.mark.parametrize("command,expected", recorded_runs() or [pytest.param("", [], marks=pytest.mark.skip(
    reason=f"reference transcript not found in {REFERENCE}"))])
def test_recorded_run_prints_the_same_lines(user_checkout, command, expected):
    require_reference()
    out = subprocess.run([sys.executable, *command.split(), "--out_dir", str(user_checkout / "results")],
                         cwd=user_checkout, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    printed = [line for line in out.stdout.splitlines() if " AUC : " in line or " pAUC : " in line]
    assert printed == expected


def test_paper_tables_cell_equals_recorded_line(user_checkout):
    """paper_tables.py on the same inputs: its zero-shot HIS cell is the recorded `Histopathology AUC` line in %.

    Only that run is made (no few-shot checkpoints in the folder given): the few-shot row is '-' with a note.
    """
    require_reference()
    recorded = dict(recorded_runs())["test_zero.py --obj Histopathology"]
    auc = float(next(line for line in recorded if line.startswith("Histopathology AUC : ")).split(":")[1])
    out_dir = user_checkout / "results/paper_tables"
    out = subprocess.run([sys.executable, "paper_tables.py", "--objs", "Histopathology", "--few_dir", "no-such-dir",
                          "--out", str(out_dir)], cwd=user_checkout, capture_output=True, text=True, timeout=1200)
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


def result_lines(lines: list[str]) -> list[str]:
    """Every evaluation's printed metrics and the zero-shot selection messages, in order."""
    return [line for line in lines if " AUC : " in line or " pAUC : " in line or line.startswith("best epoch found")]


# The kind of CPU each recorded training ran on. Its vector instructions pick the paths of torch's CPU kernels and
# of MKL's products, and so the last bits of every step; Adam (beta1 0.5) turns those into visible differences within
# a few dozen steps. The goldens and the first two trainings match this code bit for bit on an AVX-512 CPU; the k = 4
# training was recorded on a CPU without AVX-512: on this one its every digit comes back with torch and MKL kept to
# their AVX2 paths (the environment below), and not otherwise.
RECORDED_ON = {"train_few.py --obj Brain --shot 4 --iterate 0 --epoch 1": "AVX2"}
AVX2_PATHS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def cpu_environment(recorded_on: str) -> dict:
    """The environment that runs torch's CPU kernels as on the recording's CPU; skips where this CPU cannot."""
    import torch

    here = torch.backends.cpu.get_cpu_capability()
    if recorded_on == here:
        return dict(os.environ)
    if recorded_on == "AVX2" and here == "AVX512":
        return {**os.environ, **AVX2_PATHS}
    pytest.skip(f"recorded on a CPU with {recorded_on} kernels; this one runs {here}")


@pytest.mark.parametrize("command,expected", recorded_runs("reference_training_seed0.txt") or [pytest.param(
    "", [], marks=pytest.mark.skip(reason=f"reference training transcript not found in {REFERENCE}"))])
def test_training_from_scratch_prints_the_recorded_lines(user_checkout, tmp_path, command, expected):
    """The same command, seed and inputs as the reference's one-epoch trainings: adapters initialised from the same
    generator state, the same shuffles, so the same evaluations (zero-shot: five in the epoch) and the same mean
    loss, every digit (the run record keeps it at full precision)."""
    require_reference()
    env = cpu_environment(RECORDED_ON.get(command, "AVX512"))
    out = subprocess.run([sys.executable, *command.split(), "--save_path", str(tmp_path / "ckpt"),
                          "--out_dir", str(tmp_path / "results"), "--device", "cpu"],
                         cwd=user_checkout, capture_output=True, text=True, timeout=3600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    printed = out.stdout.splitlines()
    assert result_lines(printed) == result_lines(expected)
    recorded_loss = float(next(line for line in expected if line.startswith("Loss:")).split()[-1])
    record = json.loads(next((tmp_path / "results").glob("*.json")).read_text())
    assert record["training"]["epoch_losses"] == [recorded_loss]
    assert record["versions"]["cpu_capability"] == RECORDED_ON.get(command, "AVX512")
