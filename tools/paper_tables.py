"""The paper's two tables: zero-shot and 4-shot AUROC (%) on the six datasets, ours next to the paper's and
the authors' implementation numbers, written as Markdown (tables.md) and CSV (zero_shot.csv, few_shot.csv);
and a third, the normal-only protocol (the 4 normal images of the n-0 line with the zero-shot adapters, no
training on the target) beside MVFA's few-shot and zero-shot columns (normal_only.csv).

    python -m tools.paper_tables
    python -m tools.paper_tables --zero_dir my/zero-shot --few_dir my/few-shot --precision bf16 --batch_size 8
    python -m tools.paper_tables --objs Brain Liver --data_path /data/bmad --out results/brain_liver
"""

import argparse
import csv
from dataclasses import asdict, replace
from pathlib import Path

from dataset import dataset_root
from mvfa.config import ModelConfig, RunConfig, pick, resolve_device
from mvfa.flags import add_cache_args, add_data_args, add_model_args, new_parser, one_line_errors
from mvfa.precision import Precision
from mvfa.protocol import prompt, test_set
from mvfa.seeding import setup_seed
from mvfa.testing import test_adapters
from mvfa.text_cache import text_features
from tools.published import PUBLISHED, ROWS
from utils import InputError, MissingFile

SETTINGS = {"zero-shot": "zero", "few-shot": "few", "normal-only": "few"}
METRICS = (("image_auroc", "AUC"), ("pixel_auroc", "pAUC"))
PARTS = (
    ("ours", "ours"),
    ("paper", "paper"),
    ("impl", "impl."),
    ("ours-paper", "ours-paper"),
    ("ours-impl", "ours-impl."),
)
COLUMNS = [f"{m}_{part}" for m, _ in METRICS for part, _ in PARTS]
TITLES = {
    "zero-shot": "Zero-shot",
    "few-shot": "Few-shot, k = 4, support draw --iterate 0 (lines n-0/a-0 of 4-shot.txt)",
    "normal-only": "Normal-only few-shot, k = 4 (line n-0 of 4-shot.txt, the zero-shot adapters), beside "
    "MVFA's few-shot and zero-shot",
}
# the normal-only table's columns: (setting, part) per metric
BESIDE = (
    ("normal-only", "ours"),
    ("few-shot", "ours"),
    ("few-shot", "paper"),
    ("zero-shot", "ours"),
    ("zero-shot", "paper"),
)
NORMAL_COLUMNS = [f"{m}_{setting}_{part}" for m, _ in METRICS for setting, part in BESIDE]
FOOTNOTES = {
    "few-shot": "LiverCT AUC paper/impl. 81.18 equals the zero-shot implementation AUC of Liver: probably "
    "a copy error in the authors' README (kept as published), not a target."
}
# the scripts' flags handed to every run
PASS_ON = (
    "data_path",
    "seed",
    "num_workers",
    "model_name",
    "pretrain",
    "clip_ckpt",
    "batch_size",
    "img_size",
    "features_list",
    "device",
    "precision",
    "fast",
    "quick_gelu",
    "clip_normalize",
)


def passed_on(args) -> dict:
    """The values of the PASS_ON flags."""
    return {name: getattr(args, name) for name in PASS_ON}


def parser() -> argparse.ArgumentParser:
    p = new_parser(__doc__)
    p.add_argument(
        "--objs",
        nargs="+",
        default=[obj for obj, _ in ROWS],
        choices=[obj for obj, _ in ROWS],
        help="datasets to run (default all six; the others get rows of '-')",
    )
    p.add_argument(
        "--zero_dir",
        default=None,
        help="zero-shot adapter checkpoints {obj}.pth (default: test_zero.py's "
        "--save_path, ./ckpt/zero-shot/)",
    )
    p.add_argument(
        "--few_dir",
        default=None,
        help="4-shot adapter checkpoints {obj}.pth (default: test_few.py's --save_path, ./ckpt/few-shot/)",
    )
    p.add_argument("--seed_dir", default=None, help="few-shot support lists (default: dataset/fewshot_seed)")
    p.add_argument("--memory_no_cls", action="store_true", help="passed to test_few.py (the few-shot runs)")
    p.add_argument(
        "--out",
        default="./results/paper_tables/",
        help="folder for tables.md, zero_shot.csv, few_shot.csv, normal_only.csv and the runs' records "
        "(runs/)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="stop at a missing or unreadable dataset or checkpoint instead of a note and a row of '-'",
    )
    add_data_args(p)  # the scripts' own flags, defaults and checks
    add_model_args(p)
    add_cache_args(p)
    return p


def run_configs(args) -> dict[tuple[str, str], RunConfig]:
    """(setting, obj) -> the run test_zero.py / test_few.py would make of these flags."""
    runs = Path(args.out) / "runs"
    common = {**passed_on(args), "out_dir": str(runs)}
    support = {"shot": 4, "iterate": 0, "seed_dir": args.seed_dir, "memory_no_cls": args.memory_no_cls}
    extra = {
        "zero-shot": {"save_path": args.zero_dir or "./ckpt/zero-shot/"},
        "few-shot": {**support, "save_path": args.few_dir or "./ckpt/few-shot/"},
        # test_few.py --support normal: the zero-shot adapters; records apart from MVFA's few-shot ones
        "normal-only": {
            **support,
            "support": "normal",
            "save_path": args.zero_dir or "./ckpt/zero-shot/",
            "out_dir": str(runs / "normal-only"),
        },
    }
    return {
        (setting, obj): pick(RunConfig, {**common, **extra[setting], "protocol": protocol, "obj": obj})
        for setting, protocol in SETTINGS.items()
        for obj, _ in ROWS
        if obj in args.objs
    }


def missing_input(run: RunConfig) -> str | None:
    """Why a run cannot start (its dataset folder or adapter checkpoint is absent), checked before any model
    work."""
    try:
        dataset_root(run.data_path, run.obj)
    except FileNotFoundError as e:
        return str(e)
    return None if run.checkpoint.is_file() else f"adapter checkpoint not found: {run.checkpoint}"


def test_run(model, model_cfg: ModelConfig, run: RunConfig, precision: Precision) -> dict:
    """One table cell's run, as test_zero.py / test_few.py (first support list) run it, on a shared model."""
    setup_seed(run.seed)
    dataset = test_set(run, run.iterate if run.fewshot else None)
    text = text_features(model, model_cfg, precision, [prompt(run)], run.text_cache_dir)[prompt(run)]
    device = next(model.parameters()).device
    # the record keeps what the scripts' records keep: every value the run was made with
    config = {k: v for k, v in asdict(run).items() if k != "arguments"}
    arguments = {**asdict(model_cfg), **config, "device": device.type, "precision": precision.name}
    run = replace(run, arguments=arguments)
    return test_adapters(model, run, precision, text, [dataset], model_cfg.clip_file)


def run_all(args) -> tuple[dict[str, dict], list[str]]:
    """Run every (setting, dataset) on one CLIP model; returns setting -> dataset -> result, and one-line
    notes."""
    runs, notes = run_configs(args), []
    for (setting, obj), run in list(runs.items()):
        if why := missing_input(run):
            if args.strict:
                raise MissingFile(f"{obj} {setting}: {why}")
            notes.append(f"{obj} {setting}: not run, {why}")
            del runs[setting, obj]
    skipped = [obj for obj, _ in ROWS if obj not in args.objs]
    notes += [f"not selected (--objs): {', '.join(skipped)}"] if skipped else []
    results, model = {setting: {} for setting in SETTINGS}, None
    # all runs share the model flags: one model serves them all, only the adapters change
    device = resolve_device(getattr(args, "device", "auto"))
    precision = Precision.of(getattr(args, "precision", "auto"), device)
    model_cfg = pick(ModelConfig, passed_on(args))
    for (setting, obj), run in runs.items():
        print(f"--- {obj} {setting}")
        model = model or model_cfg.build(device, precision)
        try:
            results[setting][obj] = test_run(model, model_cfg, run, precision)
        except InputError as e:
            if args.strict:
                raise
            notes.append(f"{obj} {setting}: failed, {e}")
    return results, notes


def _cells(metric: str, ours: float | None, paper: float | None, impl: float | None) -> dict:
    def diff(a, b):
        return None if a is None or b is None else round(a - b, 2)

    return {
        f"{metric}_ours": ours,
        f"{metric}_paper": paper,
        f"{metric}_impl": impl,
        f"{metric}_ours-paper": diff(ours, paper),
        f"{metric}_ours-impl": diff(ours, impl),
    }


def _mean(values: list) -> float | None:
    return round(sum(values) / len(values), 2) if values and None not in values else None


def table(setting: str, ours: dict[str, dict]) -> list[dict]:
    """Rows in the paper's order plus 'Average': {'dataset': label, COLUMNS...: % with two decimals or None}.
    `ours`: dataset -> a result of test_zero.py / test_few.py (AUROC as fractions); absent datasets get None.
    Differences are taken on the rounded values, so they equal the printed ones. The average runs over the
    datasets we have, and the paper's and implementation's over the same ones (all of them: the published
    averages)."""
    rows = []
    for obj, label in ROWS:
        row, result = {"dataset": label}, ours.get(obj) or {}
        for metric, _ in METRICS:
            paper, impl = PUBLISHED[setting][obj].get(metric, (None, None))
            value = round(100 * result[metric], 2) if metric in result and paper is not None else None
            row.update(_cells(metric, value, paper, impl))
        rows.append(row)
    average = {"dataset": "Average"}
    for metric, _ in METRICS:
        basis = [r for r in rows if r[f"{metric}_ours"] is not None] or [
            r for r in rows if r[f"{metric}_paper"] is not None
        ]
        average.update(
            _cells(
                metric, *(_mean([r[f"{metric}_{part}"] for r in basis]) for part in ("ours", "paper", "impl"))
            )
        )
    return rows + [average]


def normal_table(results: dict[str, dict]) -> list[dict]:
    """The normal-only rows in the paper's order plus 'Average': {'dataset': label, NORMAL_COLUMNS...}: ours
    beside MVFA's few-shot (ours, paper) and zero-shot (ours, paper), % with two decimals or None. The average
    runs over the datasets with a normal-only result, each column's over the same ones (None if one lacks
    it)."""
    beside = {setting: table(setting, results.get(setting, {})) for setting in ("few-shot", "zero-shot")}
    normal = results.get("normal-only", {})
    rows = []
    for i, (obj, label) in enumerate(ROWS):
        row = {"dataset": label}
        for metric, _ in METRICS:
            # pixel AUROC where the dataset has masks: where the paper publishes it
            has = beside["zero-shot"][i][f"{metric}_paper"] is not None and metric in normal.get(obj, {})
            row[f"{metric}_normal-only_ours"] = round(100 * normal[obj][metric], 2) if has else None
            for setting, part in BESIDE[1:]:
                row[f"{metric}_{setting}_{part}"] = beside[setting][i][f"{metric}_{part}"]
        rows.append(row)
    average = {"dataset": "Average"}
    for metric, _ in METRICS:
        basis = [r for r in rows if r[f"{metric}_normal-only_ours"] is not None]
        for setting, part in BESIDE:
            column = f"{metric}_{setting}_{part}"
            average[column] = _mean([r[column] for r in basis])
    return rows + [average]


def average_notes(rows: list[dict]) -> list[str]:
    """A line per metric whose average covers only some of the datasets that have published numbers."""
    out = []
    for metric, name in METRICS:
        have = sum(r[f"{metric}_ours"] is not None for r in rows[:-1])
        published = sum(r[f"{metric}_paper"] is not None for r in rows[:-1])
        if 0 < have < published:
            out.append(
                f"Average {name}: over the {have} of {published} datasets with our results (paper and "
                f"implementation averaged over the same ones)."
            )
    return out


def cell(value: float | None, part: str) -> str:
    if value is None:
        return "-"
    return f"{value + 0.0:+.2f}" if part.startswith("ours-") else f"{value:.2f}"  # + 0.0: no '-0.00'


def printed(rows: list[dict], columns: list[str] = COLUMNS) -> list[list[str]]:
    """Each row as the strings the Markdown and the CSV show: dataset label, then `columns`."""
    return [[r["dataset"], *(cell(r[c], c.rsplit("_", 1)[1]) for c in columns)] for r in rows]


def markdown(setting: str, rows: list[dict]) -> str:
    if setting == "normal-only":
        headers = [f"{name} {s} {part}" for _, name in METRICS for s, part in BESIDE]
        columns, notes = NORMAL_COLUMNS, []
    else:
        headers = [f"{name} {label}" for _, name in METRICS for _, label in PARTS]
        columns, notes = COLUMNS, average_notes(rows) + ([FOOTNOTES[setting]] if setting in FOOTNOTES else [])
    lines = [
        f"## {TITLES[setting]} (AUROC, %)",
        "",
        "| Dataset | " + " | ".join(headers) + " |",
        "|:---|" + "---:|" * len(headers),
    ]
    lines += ["| " + " | ".join(cells) + " |" for cells in printed(rows, columns)]
    return "\n".join(lines + ([""] + [f"- {n}" for n in notes] if notes else []))


def write_tables(results: dict[str, dict], notes: list[str], out: Path) -> str:
    """Write tables.md and one CSV per setting into `out`; return the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    sections = ["# MVFA: ours vs the paper (CVPR 2024) and the authors' implementation (README)"]
    for setting in SETTINGS:
        normal = setting == "normal-only"
        rows = normal_table(results) if normal else table(setting, results.get(setting, {}))
        columns = NORMAL_COLUMNS if normal else COLUMNS
        with open(out / f"{setting.replace('-', '_')}.csv", "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([["dataset", *columns], *printed(rows, columns)])
        sections.append(markdown(setting, rows))
    if notes:
        sections.append("## Notes\n\n" + "\n".join(f"- {n}" for n in notes))
    text = "\n\n".join(sections) + "\n"
    (out / "tables.md").write_text(text, encoding="utf-8")
    return text


def setting_notes(args) -> list[str]:
    """A note naming the flags given that change the numbers away from the reference's settings."""
    flags = ("--fast", "--quick_gelu", "--clip_normalize", "--memory_no_cls")
    given = [f for f in flags if getattr(args, f[2:], False)]
    given += [f"--precision {args.precision}"] if getattr(args, "precision", "auto") != "auto" else []
    return [f"run with {' '.join(given)}: not the reference's settings"] if given else []


def main(argv=None) -> str:
    args = parser().parse_args(argv)
    with one_line_errors():
        results, notes = run_all(args)
        notes += setting_notes(args)
        text = write_tables(results, notes, Path(args.out))
    print(text + f"\nwritten: {Path(args.out) / 'tables.md'}, zero_shot.csv, few_shot.csv, normal_only.csv")
    return text


if __name__ == "__main__":
    main()
