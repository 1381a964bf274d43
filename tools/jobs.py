"""The paper's grid as jobs: expansion (datasets x settings x support draws x protocols), one job's run
(train with --resume, then test the chosen weights, each a subprocess of this repository's scripts), their
status, and the tables over their records (pandas). Executors are existing engines: a thread pool of
subprocesses, or submitit."""

import hashlib
import json
import os
import queue
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from dataset import CLASS_NAMES
from dataset.augment import VIEWS
from tools.published import PUBLISHED, ROWS

REPO = Path(__file__).resolve().parents[1]  # the repository root, where the four scripts are
SHOTS = (2, 4, 8, 16)  # the authors' support lists
# the normal-only protocol (test_few.py --support normal): settings 'normal-{k}', tests only
NORMAL = "normal-"
NORMAL_SHOTS = (1, 2, 4, 8, 16)
RELEASED = "released"  # the select of normal-only jobs on a folder of given zero-shot checkpoints
# test images of BMAD's splits (normal + abnormal), for cost estimates where the data is not at hand
TEST_IMAGES = {
    "Brain": 3715,
    "Liver": 1493,
    "Retina_RESC": 1805,
    "Retina_OCT2017": 1000,
    "Chest": 3000,
    "Histopathology": 2000,
}


@dataclass(frozen=True)
class Job:
    """One training and its test: setting 'zero' or the shot count, draw 0 = the listed support (--iterate 0),
    draw d > 0 = drawn with --iterate -1 --seed d; select = the checkpoint-selection protocol. Setting
    'normal-{k}': a test only, the normal-only protocol with the zero-shot adapters that the grid's zero-shot
    job of the same select trains, or (select 'released') those in the folder `zero_ckpt`."""

    obj: str
    setting: str
    draw: int
    select: str
    epoch: int = 50
    extra: tuple[str, ...] = ()  # flags given to every script (data, weights, epochs, precision, ...)
    seed_dir: str | None = None  # the few-shot support lists, where not in dataset/fewshot_seed
    zero_ckpt: str | None = None  # normal-only: a folder of zero-shot checkpoints {obj}.pth

    @property
    def key(self) -> str:
        identity = asdict(self)
        if self.zero_ckpt is None:
            del identity["zero_ckpt"]  # the keys of the jobs made before this field stay theirs
        digest = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:8]  # other flags: another job
        return f"{self.setting}-{self.obj}-draw{self.draw}-{self.select}-{digest}"

    @property
    def normal(self) -> bool:
        return self.setting.startswith(NORMAL)

    @property
    def shot(self) -> str:
        return self.setting.removeprefix(NORMAL)

    def zero_shot_job(self) -> "Job":
        """The grid's zero-shot job whose checkpoint a normal-only job tests."""
        return Job(self.obj, "zero", 0, self.select, self.epoch, self.extra, self.seed_dir)

    def adapters(self, folder: Path) -> Path:
        """The zero-shot checkpoint a normal-only job in `folder` (out/jobs/{key}) tests."""
        if self.zero_ckpt:
            return Path(self.zero_ckpt) / f"{self.obj}.pth"
        return folder.parent / self.zero_shot_job().key / "ckpt" / f"{self.obj}.pth"

    def commands(self, folder: Path) -> list[list[str]]:
        """The train command (always --resume) and the test command, as argument lists; normal-only: the test
        command alone."""
        few = self.setting != "zero"
        support = (
            (
                ["--shot", self.shot]
                + (["--iterate", "0"] if self.draw == 0 else ["--iterate", "-1", "--seed", str(self.draw)])
                + (["--seed_dir", self.seed_dir] if self.seed_dir else [])
            )
            if few
            else []
        )
        where = ["--obj", self.obj, "--save_path", str(folder / "ckpt"), "--out_dir", str(folder / "records")]
        if self.normal:
            normal = ["--support", "normal", "--ckpt", str(self.adapters(folder))]
            return [["test_few.py", *where, *support, *normal, *self.extra]]
        train, test = ("train_few.py", "test_few.py") if few else ("train_zero.py", "test_zero.py")
        training = ["--select", self.select, "--epoch", str(self.epoch), "--resume"]
        return [[train, *where, *support, *training, *self.extra], [test, *where, *support, *self.extra]]


def draws_of(setting: str, draws: int) -> range:
    """The draw numbers of a setting: none for zero-shot (one job); 0 (the listed support) then 1, 2, ...
    (seeds), but seeds 1..draws where no support list is published (normal-only k = 1)."""
    if setting == "zero":
        return range(1)
    listed = int(setting.removeprefix(NORMAL)) in SHOTS or not setting.startswith(NORMAL)
    return range(draws) if listed else range(1, draws + 1)


def expand(
    objs,
    settings,
    draws: int,
    protocols,
    epoch: int = 50,
    extra=(),
    seed_dir: str | None = None,
    zero_ckpt: str | None = None,
) -> list[Job]:
    """Datasets x settings ('zero', shot counts, 'normal-{k}') x draws (zero-shot has none) x protocols, in
    that nesting. Normal-only jobs with `zero_ckpt` (a folder of zero-shot checkpoints) have one protocol,
    'released'; without, one per protocol, testing the checkpoint of that protocol's zero-shot job."""

    def selects(setting: str) -> list[str]:
        return [RELEASED] if setting.startswith(NORMAL) and zero_ckpt else list(protocols)

    return [
        Job(obj, str(setting), draw, select, epoch, tuple(extra), seed_dir, *normal_ckpt(setting, zero_ckpt))
        for obj in objs
        for setting in settings
        for draw in draws_of(str(setting), draws)
        for select in selects(str(setting))
    ]


def normal_ckpt(setting: str, zero_ckpt: str | None) -> tuple[str, ...]:
    """The zero_ckpt field of a job of `setting`: the folder, absolute (as the grid's --out: a cluster job
    may start elsewhere), for normal-only jobs given one; nothing otherwise."""
    return (str(Path(zero_ckpt).resolve()),) if zero_ckpt and setting.startswith(NORMAL) else ()


def after_trainings(job_list: list[Job]) -> list[list[Job]]:
    """The jobs in the order they can run: the trainings first, then the normal-only tests that read the
    zero-shot checkpoints trained by the first."""
    return [[job for job in job_list if not job.normal], [job for job in job_list if job.normal]]


def run_job(job: Job, out: str, env: dict | None = None) -> dict:
    """Train, then test, each as a subprocess (environment `env`) logging to the job's folder; done.json marks
    success, failed.txt holds the last error line. Raises RuntimeError naming the job and that line. The
    commands run in this process's working directory (where the grid was started: relative paths among the
    flags, and the scripts' defaults such as ./data/, mean there what they mean to the user)."""
    folder = Path(out) / "jobs" / job.key
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "failed.txt").unlink(missing_ok=True)
    (folder / "running").write_text(f"{os.uname().nodename} {os.getpid()}\n")
    try:
        for command in job.commands(folder):
            with open(folder / "log.txt", "a") as log:
                log.write(f"$ python {' '.join(command)}\n")
                log.flush()
                done = subprocess.run(
                    [sys.executable, str(REPO / command[0]), *command[1:]],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            if done.returncode:
                text = (folder / "log.txt").read_text(errors="replace").replace("\r", "\n")
                last = ([line for line in text.splitlines() if line.strip()] or ["(no output)"])[-1]
                (folder / "failed.txt").write_text(last + "\n")
                raise RuntimeError(f"{job.key}: {command[0]} exited with {done.returncode}: {last}")
        test = max((folder / "records").glob("test_*.json"), key=lambda p: p.stat().st_mtime)  # the latest
        record = {"job": asdict(job), "commands": job.commands(folder), "test": json.loads(test.read_text())}
        (folder / "done.json").write_text(json.dumps(record, indent=1))
        return record
    finally:
        (folder / "running").unlink(missing_ok=True)


def is_done(job: Job, out: str) -> bool:
    return (Path(out) / "jobs" / job.key / "done.json").is_file()


@dataclass
class Runner:
    """submitit's job function: run_job, requeued with the same job on preemption or timeout (training
    resumes)."""

    out: str

    def __call__(self, job: Job) -> dict:
        return run_job(job, self.out)

    def checkpoint(self, job: Job):
        import submitit

        return submitit.helpers.DelayedSubmission(self, job)


def run_local(jobs: list[Job], out: str, gpus: list[str], workers: int) -> list[str]:
    """Jobs in a thread pool, each a subprocess that sees one GPU of `gpus` (or, without GPUs, none: `workers`
    at a time on the CPU); returns the failures' messages. One failure never stops the others."""
    slots = queue.Queue()
    for slot in gpus or [""] * workers:
        slots.put(slot)

    def one(job: Job) -> None:
        slot = slots.get()
        try:
            run_job(job, out, {**os.environ, "CUDA_VISIBLE_DEVICES": slot})
        finally:
            slots.put(slot)

    with ThreadPoolExecutor(max_workers=len(gpus) or workers) as pool:
        futures = [pool.submit(one, job) for job in jobs]
    return [str(future.exception()) for future in futures if future.exception()]


def slurm_parameters(
    partition: str | None, minutes: int, gpus: int, cpus: int, parallel: int, sbatch: dict
) -> dict:
    """SlurmExecutor parameters of one job: a node's share, a time limit, an array of at most `parallel` at a
    time, and SIGUSR2 90 s before the limit (submitit then requeues the job, which resumes)."""
    return {
        "partition": partition,
        "time": minutes,
        "gpus_per_node": gpus,
        "cpus_per_task": cpus,
        "nodes": 1,
        "ntasks_per_node": 1,
        "array_parallelism": parallel,
        "signal_delay_s": 90,
        "job_name": "mvfa",
        "additional_parameters": sbatch,
    }


def submit(jobs: list[Job], out: str, executor) -> list[str]:
    """Jobs as one submitit array; waits for them; returns the failures' messages."""
    futures = executor.map_array(Runner(out), jobs)
    failures = []
    for job, future in zip(jobs, futures):
        try:
            future.result()
        except Exception as e:  # noqa: BLE001 - one failure never stops the others
            failures.append(f"{job.key}: {str(e).strip().splitlines()[-1]}")
    return failures


def status(jobs: list[Job], out: str) -> pd.DataFrame:
    """done / failed (with its last error line) / running / pending per job."""
    rows = []
    for job in jobs:
        folder = Path(out) / "jobs" / job.key
        state = (
            "done"
            if (folder / "done.json").is_file()
            else "failed"
            if (folder / "failed.txt").is_file()
            else "running"
            if (folder / "running").is_file()
            else "pending"
        )
        error = (folder / "failed.txt").read_text().strip() if state == "failed" else ""
        rows.append({"job": job.key, "state": state, "error": error})
    return pd.DataFrame(rows)


def results(jobs: list[Job], out: str) -> pd.DataFrame:
    """One row per finished job: its grid coordinates and the test record's AUROCs in %."""
    rows = []
    for job in jobs:
        path = Path(out) / "jobs" / job.key / "done.json"
        if path.is_file():
            metrics = json.loads(path.read_text())["test"]["metrics"]
            metrics = metrics.get("draws", [metrics])[0]  # test_few with one draw records it directly
            rows.append(
                {
                    "setting": job.setting,
                    "obj": job.obj,
                    "draw": job.draw,
                    "select": job.select,
                    **{m: 100 * metrics[m] for m in ("image_auroc", "pixel_auroc") if m in metrics},
                }
            )
    return pd.DataFrame(rows, columns=["setting", "obj", "draw", "select", "image_auroc", "pixel_auroc"])


def setting_table(frame: pd.DataFrame, setting: str) -> pd.DataFrame:
    """Datasets (the paper's rows) x metric and protocol: mean and std (ddof 0) over the draws, with the
    paper's and the authors' implementation's numbers where published (zero-shot and k = 4). Normal-only:
    its own columns, then MVFA's few-shot columns of the same k and the zero-shot columns beside them."""
    part = frame[frame["setting"] == setting]
    stats = part.groupby(["obj", "select"])[["image_auroc", "pixel_auroc"]].agg(["mean", lambda x: np.std(x)])
    stats = stats if len(part) else None  # a setting not run (beside a normal-only one): published only
    table = pd.DataFrame(index=[label for _, label in ROWS])
    published = (
        PUBLISHED["zero-shot"] if setting == "zero" else PUBLISHED["few-shot"] if setting == "4" else {}
    )
    sources = () if setting.startswith(NORMAL) else ("paper", "impl.")
    for metric, name in (("image_auroc", "AUC"), ("pixel_auroc", "pAUC")):
        cells = {
            key: f"{mean:.2f} ± {std:.2f}"
            for key, (mean, std) in (() if stats is None else stats[metric].iterrows())
            if not np.isnan(mean)
        }
        for select in sorted(part["select"].unique()):
            table[f"{name} {select}"] = [cells.get((obj, select), "-") for obj, _ in ROWS]
        for i, source in enumerate(sources):
            values = [published.get(obj, {}).get(metric, (None, None))[i] for obj, _ in ROWS]
            table[f"{name} {source}"] = ["-" if value is None else f"{value:.2f}" for value in values]
    if setting.startswith(NORMAL):
        shot = setting.removeprefix(NORMAL)
        table.columns = [f"normal-only {column}" for column in table.columns]
        for other, label in ((shot, f"MVFA {shot}-shot"), ("zero", "zero-shot")):
            beside = setting_table(frame, other)
            for column in beside.columns:
                table[f"{label} {column}"] = beside[column]
    return table


def setting_order(setting: str) -> tuple[int, int]:
    """Zero-shot first, then MVFA's few-shot settings by k, then the normal-only ones by k."""
    if setting == "zero":
        return 0, 0
    return (2, int(setting.removeprefix(NORMAL))) if setting.startswith(NORMAL) else (1, int(setting))


def title_of(setting: str) -> str:
    if setting == "zero":
        return "Zero-shot"
    if setting.startswith(NORMAL):
        return (
            f"Normal-only few-shot, k = {setting.removeprefix(NORMAL)}: zero-shot adapters and a memory bank "
            f"of k normal images, no training on the target (beside MVFA's few-shot and zero-shot)"
        )
    return f"Few-shot, k = {setting}"


def write_tables(frame: pd.DataFrame, out: str) -> str:
    """tables.md and one CSV per setting in `out`; returns the Markdown."""
    sections = ["# MVFA reproduced by training: mean ± std over support draws (AUROC, %)"]
    # zero-shot first
    for setting in sorted(set(frame["setting"]), key=setting_order):
        table = setting_table(frame, setting)
        table.to_csv(Path(out) / f"table_{setting}.csv", index_label="dataset")
        title = title_of(setting)
        header = "| Dataset | " + " | ".join(table.columns) + " |\n|:---|" + "---:|" * len(table.columns)
        body = "\n".join(
            "| " + " | ".join([name, *row]) + " |" for name, row in zip(table.index, table.values)
        )
        sections.append(f"## {title}\n\n{header}\n{body}")
    text = "\n\n".join(sections) + "\n"
    (Path(out) / "tables.md").write_text(text, encoding="utf-8")
    return text


class Cost(NamedTuple):
    """A job's work: training steps and evaluated images, and how many of each see a batch again, whose frozen
    prefix the run reuses (mvfa/prefix_cache.py)."""

    steps: int
    images: int
    reused_steps: int
    reused_images: int


def cost(job: Job, data_path: str, batch_size: int = 1) -> Cost:
    """The work of a job: few-shot 22k steps and one pass (11k bank images + the test set) per epoch;
    zero-shot the other five test sets in groups, 5-6 test passes per epoch; --select val / last one more
    pass at the end (--select test reports its chosen pass). Few-shot reuses the prefixes of every epoch after
    the first; zero-shot those of every evaluation after the first (its groups change each epoch). Test-set
    sizes are counted where the data is, else BMAD's."""

    def size(obj: str) -> int:
        root = Path(data_path) / f"{obj}_AD" / "test"
        found = sum(1 for _ in root.glob("*/img/*")) if root.is_dir() else 0
        return found or TEST_IMAGES[obj]

    test, epochs = size(job.obj), job.epoch
    if job.normal:  # one test: the bank of 11k views, then the test set
        return Cost(0, VIEWS * int(job.shot) + test, 0, 0)
    final = 0 if job.select == "test" else 1
    if job.setting == "zero":
        groups = -(-sum(size(o) for o in CLASS_NAMES if o != job.obj) // batch_size)
        passes = epochs * (5 + (groups % 5 != 0))
        return Cost(epochs * groups, (passes + final) * test, 0, (passes - 1) * test)
    k = int(job.setting)
    per_pass = VIEWS * k + test
    steps = 2 * VIEWS * k  # the augmented normal and abnormal support images, batch 1
    return Cost(epochs * steps, (epochs + final) * per_pass, (epochs - 1) * steps, (epochs - 1) * per_pass)
