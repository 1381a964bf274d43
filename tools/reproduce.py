"""Reproduce the paper by training: the whole grid of zero-shot and few-shot runs, resumable, on one GPU,
several GPUs, or a SLURM cluster (submitit); then one table per setting with mean ± std over support draws.

    python -m tools.reproduce --dry_run                   # the paper's grid: its jobs and their cost
    python -m tools.reproduce --gpus 0 1 2 3 --out runs/  # local: one job per GPU at a time
    python -m tools.reproduce --executor slurm --partition gpu --time 1440 --out runs/ --draws 3 \\
        --protocols test val
    python -m tools.reproduce --status --out runs/        # done / running / failed (last error line)
    python -m tools.reproduce --tables --out runs/        # runs/tables.md, runs/table_{setting}.csv
    python -m tools.reproduce --settings normal-4 --normal_ckpt ckpt/zero-shot --draws 5  # released adapters

The grid holds the normal-only protocol too (settings normal-{k}: test_few.py --support normal, no training),
testing the zero-shot adapters its zero-shot jobs train (they run after the trainings), or with --normal_ckpt
DIR those of a folder (the released ones: ckpt/zero-shot).

Flags it does not know go to every training and test command (e.g. --data_path, --clip_ckpt, --precision
bf16). Rerunning the same command runs only the jobs without a result; trainings resume from their state, and
a job that fails never stops the others.
"""

import sys
from pathlib import Path

from dataset import CLASS_NAMES
from mvfa.flags import SELECTIONS, new_parser
from tools import jobs

# seconds per training step and per evaluated image seen before, the frozen prefix reused: the fp32 defaults
# scaled by what reuse saved within one run of `train_few.py --obj Brain --shot 4 --epoch 2` on the same CPU
# (docs/speed.md, "Reuse"): a step 0.93 of one without reuse, an evaluated image 0.23 s less
STEP_REUSED = 2.32
IMAGE_REUSED = 0.95


def parser():
    p = new_parser(__doc__)
    p.allow_abbrev = False  # unknown flags go to the scripts: --seed must not be taken for --seed_dir
    p.add_argument(
        "--out", default="./runs/", help="folder of the jobs (jobs/{key}/: checkpoints, records, log)"
    )
    p.add_argument("--objs", nargs="+", default=list(CLASS_NAMES), help="datasets")
    p.add_argument(
        "--settings",
        nargs="+",
        default=["zero", *map(str, jobs.SHOTS), *(f"{jobs.NORMAL}{k}" for k in jobs.NORMAL_SHOTS)],
        help="'zero', shot counts (MVFA's few-shot) and/or 'normal-{k}' (the normal-only protocol)",
    )
    p.add_argument(
        "--draws",
        type=int,
        default=1,
        help="support draws per few-shot setting: the listed one "
        "(--iterate 0), then --iterate -1 with seeds 1, 2, ...",
    )
    p.add_argument(
        "--protocols", nargs="+", default=["test"], choices=SELECTIONS, help="--select of the trainings"
    )
    p.add_argument("--epoch", type=int, default=50, help="training epochs of every job (the paper's: 50)")
    p.add_argument("--seed_dir", default=None, help="few-shot support lists (default: dataset/fewshot_seed)")
    p.add_argument(
        "--normal_ckpt",
        default=None,
        metavar="DIR",
        help="normal-only jobs: a folder of zero-shot checkpoints {obj}.pth to test (e.g. the released "
        "ckpt/zero-shot; their column is headed 'released'); default: those the grid's zero-shot jobs "
        "train, one normal-only job per --protocols value",
    )
    p.add_argument(
        "--dry_run", action="store_true", help="list the jobs and their estimated cost, run nothing"
    )
    p.add_argument(
        "--status", action="store_true", help="each job: done / running / failed (its last error line)"
    )
    p.add_argument("--tables", action="store_true", help="write the tables of the finished jobs, run nothing")
    p.add_argument(
        "--executor",
        default="local",
        choices=["local", "submitit-local", "slurm"],
        help="local: a pool of subprocesses; submitit-local: submitit without SLURM; slurm: sbatch arrays",
    )
    p.add_argument("--gpus", nargs="*", default=[], help="local: the GPU ids to use, one job each at a time")
    p.add_argument("--workers", type=int, default=1, help="local without --gpus: jobs at a time on the CPU")
    p.add_argument("--partition", default=None, help="slurm: partition")
    p.add_argument(
        "--time", type=int, default=24 * 60, help="slurm: time limit per job in minutes (jobs requeue)"
    )
    p.add_argument("--gpus_per_job", type=int, default=1, help="slurm: GPUs per job")
    p.add_argument("--cpus_per_job", type=int, default=8, help="slurm: CPUs per job")
    p.add_argument("--parallel", type=int, default=32, help="slurm: jobs of the array running at a time")
    p.add_argument("--sbatch", nargs="*", default=[], metavar="KEY=VALUE", help="slurm: extra sbatch options")
    p.add_argument(
        "--sec_per_step",
        type=float,
        default=2.49,
        help="cost estimate: seconds per training step (default: ViT-L, fp32, measured on 2 CPU cores)",
    )
    p.add_argument(
        "--sec_per_image",
        type=float,
        default=1.18,
        help="cost estimate: seconds per evaluated image (default: the same CPU; bf16 there: 1.34 and 0.61)",
    )
    p.add_argument(
        "--sec_per_step_reused",
        type=float,
        default=STEP_REUSED,
        help="cost estimate: seconds per training step on images seen before (the frozen prefix reused)",
    )
    p.add_argument(
        "--sec_per_image_reused",
        type=float,
        default=IMAGE_REUSED,
        help="cost estimate: seconds per evaluated image seen before (the frozen prefix reused)",
    )
    return p


def executor(args, out: Path):
    """The submitit executor of --executor (submitit-local or slurm)."""
    import submitit

    folder = out / "submitit" / "%j"
    if args.executor == "submitit-local":
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(timeout_min=args.time)
        return ex
    ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=20)
    ex.update_parameters(
        **jobs.slurm_parameters(
            args.partition,
            args.time,
            args.gpus_per_job,
            args.cpus_per_job,
            args.parallel,
            dict(item.split("=", 1) for item in args.sbatch),
        )
    )
    return ex


def dry_run(job_list: list, args, extra: list[str]) -> None:
    data = extra[extra.index("--data_path") + 1] if "--data_path" in extra else "./data/"
    total = total_plain = 0.0
    for job in job_list:
        c = jobs.cost(job, data)
        plain = c.steps * args.sec_per_step + c.images * args.sec_per_image
        saved = c.reused_steps * (args.sec_per_step - args.sec_per_step_reused) + c.reused_images * (
            args.sec_per_image - args.sec_per_image_reused
        )
        hours = (plain - saved) / 3600
        total, total_plain = total + hours, total_plain + plain / 3600
        draw = "listed" if job.draw == 0 else f"drawn, seed {job.draw}"
        setting = (
            "zero-shot"
            if job.setting == "zero"
            else f"normal-only {job.shot}-shot"
            if job.normal
            else f"{job.setting}-shot"
        )
        # normal-only: no training; the zero-shot adapters of a folder or of the grid's zero-shot job
        adapters = (
            ""
            if not job.normal
            else f" adapters {job.zero_ckpt}"
            if job.zero_ckpt
            else f" adapters of {job.zero_shot_job().key}"
        )
        print(
            f"{job.key}: {job.obj} {setting} draw {job.draw} ({draw}) --select {job.select}{adapters}: "
            f"{c.steps} steps, {c.images} images ({c.reused_steps} and {c.reused_images} with the prefix "
            f"reused), ~{hours:.1f} h"
        )
    print(
        f"{len(job_list)} jobs, ~{total:.0f} h estimated at {args.sec_per_step} s/step and "
        f"{args.sec_per_image} s/image, {args.sec_per_step_reused} and {args.sec_per_image_reused} with the "
        f"prefix reused (~{total_plain:.0f} h without reuse; an estimate, not a measurement)"
    )


def run(args, extra: list[str]) -> int:
    out = Path(args.out).resolve()  # the jobs' own paths, whatever folder a job function later runs in
    job_list = jobs.expand(
        args.objs,
        args.settings,
        args.draws,
        args.protocols,
        args.epoch,
        extra,
        args.seed_dir,
        args.normal_ckpt,
    )
    if args.dry_run:
        dry_run(job_list, args, extra)
        return 0
    if args.status:
        table = jobs.status(job_list, str(out))
        print(table.to_string(index=False))
        print(table.state.value_counts().to_string())
        return 0
    failures = []
    if not args.tables:
        todo = [job for job in job_list if not jobs.is_done(job, str(out))]
        print(f"{len(job_list) - len(todo)} of {len(job_list)} jobs done already; running {len(todo)}")
        # normal-only tests after the trainings whose checkpoints they read
        for phase in filter(None, jobs.after_trainings(todo)):
            failures += (
                jobs.run_local(phase, str(out), args.gpus, args.workers)
                if args.executor == "local"
                else jobs.submit(phase, str(out), executor(args, out))
            )
        for message in failures:
            print(f"failed: {message}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    print(jobs.write_tables(jobs.results(job_list, str(out)), str(out)))
    return 1 if failures else 0


def main(argv=None) -> int:
    return run(*parser().parse_known_args(argv))


if __name__ == "__main__":
    sys.exit(main())
