"""tools/reproduce.py over tools/jobs.py: the grid's jobs, both executors (a local pool of processes and
submitit's local executor, the same code path as SLURM without sbatch), rerunning after a kill, the tables
against the records, SLURM parameters."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import submitit
from conftest import SIZE, TINY
from submitit.slurm.slurm import _make_sbatch_string

from dataset.synthetic import make_synthetic_bmad
from tools import jobs, reproduce

REPO = Path(__file__).resolve().parents[1]
GRID = ["--objs", "Brain", "Chest", "--settings", "1", "zero", "--epoch", "1", "--batch_size", "6"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """All six synthetic datasets, 3 images per folder, and support lists for k = 1 and 2, 3 draws each."""
    return make_synthetic_bmad(
        str(tmp_path_factory.mktemp("synth")), n_per_split=3, seed=0, img_size=SIZE, shots=(1, 2)
    )


def test_jobs_run_the_scripts_at_the_repository_root():
    assert jobs.REPO == REPO
    train, test = jobs.Job("Brain", "4", 0, "test").commands(Path("f"))
    assert all((jobs.REPO / command[0]).is_file() for command in (train, test))
    assert (train[0], test[0]) == ("train_few.py", "test_few.py")


def grid_args(synth, out: Path, *more: str) -> list[str]:
    return [*GRID, "--out", str(out), "--data_path", synth.data, "--seed_dir", synth.seed_root, *TINY, *more]


def records(out: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in (out / "jobs").glob("*/done.json")}


def test_dry_run_lists_the_paper_grid_without_data(tmp_path, capsys):
    assert reproduce.main(["--dry_run", "--data_path", str(tmp_path / "none")]) == 0
    lines = capsys.readouterr().out.splitlines()
    jobs = lines[:-1]
    # zero-shot, 4 few-shot settings and 5 normal-only ones (tests/test_normal_only.py) per dataset
    assert len(jobs) == 6 * 10 and lines[-1].startswith("60 jobs, ~")
    assert sum(" zero-shot draw 0 " in line for line in jobs) == 6
    assert sum(" 16-shot draw 0 (listed) --select test: " in line for line in jobs) == 6
    assert any(line.startswith("4-Liver-draw0-test-") for line in jobs)


@pytest.fixture(scope="module")
def two_draws(synth, tmp_path_factory):
    """Brain's 1-shot setting with two support draws through submitit's local executor (the SLURM path):
    its output folder."""
    out = tmp_path_factory.mktemp("two_draws")
    args = grid_args(synth, out, "--executor", "submitit-local", "--workers", "2")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)  # submitit's workers import the job function from here
        assert reproduce.main([*args, "--settings", "1", "--objs", "Brain", "--draws", "2"]) == 0
    return out


def assert_records_and_tables(out: Path, settings: list[str], n_jobs: int) -> dict[str, dict]:
    """Each job's record names its script, dataset and commands; the tables are written. The records."""
    done = records(out)
    assert len(done) == n_jobs
    for record in done.values():
        job = jobs.Job(**{**record["job"], "extra": tuple(record["job"]["extra"])})
        assert record["test"]["script"] == ("test_zero" if job.setting == "zero" else "test_few")
        assert record["test"]["args"]["obj"] == job.obj
        assert record["commands"] == job.commands(out / "jobs" / job.key)
    assert (out / "tables.md").is_file()
    assert all((out / f"table_{setting}.csv").is_file() for setting in settings)
    return done


def test_local_pool_runs_jobs_records_and_tables(synth, tmp_path):
    """A few-shot and a zero-shot job in a local pool of processes (Chest's run in the other grid tests); one
    job against its commands run alone."""
    args = grid_args(synth, tmp_path, "--executor", "local", "--workers", "2", "--settings", "1", "zero")
    assert reproduce.main([*args, "--objs", "Brain"]) == 0
    done = assert_records_and_tables(tmp_path, ["1", "zero"], 2)
    assert_job_equals_its_commands_run_alone(done, tmp_path)  # one job: ~20 s on 2 idle cores


@pytest.mark.xdist_group("two_draws")  # one worker makes the module's two_draws run
def test_submitit_runs_jobs_records_and_tables(two_draws):
    assert_records_and_tables(two_draws, ["1"], 2)


def assert_job_equals_its_commands_run_alone(done: dict[str, dict], out: Path) -> None:
    """The few-shot Brain job's test metrics (every one, the image scores included) are those of its train
    and test commands (Job.commands) run one after the other in a new folder, outside the grid."""
    key, record = next((k, r) for k, r in done.items() if k.startswith("1-Brain-"))
    job = jobs.Job(**{**record["job"], "extra": tuple(record["job"]["extra"])})
    alone = out / "alone"
    alone.mkdir()
    for command in job.commands(alone):
        ran = subprocess.run(
            [sys.executable, str(REPO / command[0]), *command[1:]],
            cwd=alone,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert ran.returncode == 0, ran.stderr[-2000:]
    (tested,) = (alone / "records").glob("test_few_*.json")
    metrics = json.loads(tested.read_text())["metrics"]
    assert {"image_auroc", "pixel_auroc", "image_scores"} <= set(metrics)
    assert record["test"]["metrics"] == metrics, key


@pytest.mark.xdist_group("two_draws")
def test_tables_are_mean_and_std_of_the_records(two_draws):
    """Two support draws of a few-shot setting: each cell is the mean ± std (ddof 0) of the two records."""
    done = records(two_draws)
    values = {
        m: [100 * r["test"]["metrics"][m] for r in done.values()] for m in ("image_auroc", "pixel_auroc")
    }
    assert all(len(v) == 2 for v in values.values())
    runs = [jobs.Job(**{**r["job"], "extra": tuple(r["job"]["extra"])}) for r in done.values()]
    table = jobs.setting_table(jobs.results(runs, str(two_draws)), "1")
    for metric, name in (("image_auroc", "AUC"), ("pixel_auroc", "pAUC")):
        assert (
            table.loc["BrainMRI", f"{name} test"]
            == f"{np.mean(values[metric]):.2f} ± {np.std(values[metric]):.2f}"
        )
    csv = (two_draws / "table_1.csv").read_text()
    assert f"{np.mean(values['image_auroc']):.2f} ± {np.std(values['image_auroc']):.2f}" in csv


def test_killed_run_reruns_only_what_is_missing(synth, tmp_path):
    """Killed after its first job of two: the rerun runs only the other."""
    args = grid_args(synth, tmp_path, "--workers", "1", "--settings", "1", "--draws", "2", "--objs", "Brain")
    command = [sys.executable, "-m", "tools.reproduce", *args]
    proc = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    while proc.poll() is None and not records(tmp_path):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and the job it was in the middle of
    proc.wait()
    first = {key: (tmp_path / "jobs" / key / "done.json").stat().st_mtime_ns for key in records(tmp_path)}
    assert len(first) == 1
    out = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "1 of 2 jobs done already; running 1" in out.stdout
    assert len(records(tmp_path)) == 2
    assert all((tmp_path / "jobs" / key / "done.json").stat().st_mtime_ns == t for key, t in first.items())


def test_a_failing_job_never_stops_the_others_and_status_names_it(synth, tmp_path, capsys, monkeypatch):
    """Also: relative --out and --data_path mean what they mean where the grid is started."""
    data = tmp_path / "data"
    shutil.copytree(synth.data, data)
    shutil.rmtree(data / "Chest_AD" / "test" / "good")  # Chest's jobs cannot read their test set
    monkeypatch.chdir(tmp_path)
    # few-shot only: zero-shot Brain would train on Chest's test set too
    args = [
        *GRID,
        "--out",
        "out",
        "--data_path",
        "data",
        "--seed_dir",
        synth.seed_root,
        *TINY,
        "--settings",
        "1",
    ]
    assert reproduce.main([*args, "--draws", "1"]) == 1
    assert len(records(tmp_path / "out")) == 1  # Brain's job
    capsys.readouterr()
    assert reproduce.main(["--status", *args, "--draws", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count(" done ") == 1 and out.count(" failed ") == 1
    assert f"image folder not found: {Path('data') / 'Chest_AD' / 'test' / 'good' / 'img'}" in out


def test_slurm_submission_parameters(tmp_path, monkeypatch):
    """Without a cluster: the parameters submitit gets, and the sbatch script they make."""
    params = jobs.slurm_parameters("gpu", 720, 1, 8, 16, {"qos": "high"})
    script = _make_sbatch_string(command="python -m x", folder=str(tmp_path), map_count=30, **params)
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --time=720",
        "#SBATCH --gpus-per-node=1",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --array=0-29%16",
        "#SBATCH --signal=USR2@90",
        "#SBATCH --qos=high",
    ):
        assert line in script
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", staticmethod(lambda: 1))  # pretend srun exists
    args, _ = reproduce.parser().parse_known_args(
        [
            "--executor",
            "slurm",
            "--partition",
            "gpu",
            "--time",
            "720",
            "--parallel",
            "16",
            "--sbatch",
            "qos=high",
        ]
    )
    executor = reproduce.executor(args, tmp_path)
    assert executor.parameters["partition"] == "gpu" and executor.parameters["time"] == 720
    assert executor.parameters["additional_parameters"] == {"qos": "high"}
    assert executor.max_num_timeout == 20  # requeued after timeouts, resuming from the training state
    job = jobs.Job("Brain", "4", 0, "test")
    requeued = jobs.Runner(str(tmp_path)).checkpoint(job)
    assert isinstance(requeued, submitit.helpers.DelayedSubmission) and requeued.args == (job,)


def test_cost_counts_the_passes_and_the_reused_work(tmp_path):
    """Known answers on BMAD's test-set sizes (no data folder): few-shot k = 4, Brain (3,715 test images),
    50 epochs: 88 steps and one pass of 44 bank images + the test set per epoch, everything after the first
    epoch reused; zero-shot Liver, the other five test sets (11,520 images) in groups of 16: 720 steps and 5
    evaluations per epoch (6 where the groups do not divide by 5), all but the very first reused."""
    none = str(tmp_path / "none")
    assert jobs.cost(jobs.Job("Brain", "4", 0, "test"), none) == (4400, 50 * 3759, 49 * 88, 49 * 3759)
    assert jobs.cost(jobs.Job("Brain", "4", 0, "val"), none) == (4400, 51 * 3759, 49 * 88, 49 * 3759)
    groups = -(-(3715 + 1805 + 1000 + 3000 + 2000) // 16)
    assert groups == 720
    zero = jobs.cost(jobs.Job("Liver", "zero", 0, "test"), none, batch_size=16)
    assert zero == (50 * 720, 50 * 5 * 1493, 0, (50 * 5 - 1) * 1493)
