"""One self-contained HTML page (no network request) from run records and their --save_scores arrays: the
metrics beside the published ones, ROC and precision-recall curves, and a per-image table with overlays.

    python test_few.py --obj Brain --shot 4 --save_scores runs/brain.npz --out_dir runs/
    python -m tools.report runs/test_few_Brain_*.json --out report/
    python -m tools.report few.json zero.json --threshold 0.5 --out report/   # side by side

Each record finds its arrays through its own `--save_scores` flag (relative paths: from the working directory,
then from the record's folder; several draws: FILE_iterate_{i}.npz) unless --scores names them. Records of one
dataset, protocol, shot and selection (draws, seeds) are one group: mean ± std. The threshold of each table is
--threshold, else the (1 - fpr) quantile of its normal images' scores with --fpr, else the F1-max one on the
test set (optimistic, as any choice made on the test set); it can be moved on the page. A row is abnormal when
its score is above the threshold, as in tools.predict.
"""

import argparse
import base64
import io
import json
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
from jinja2 import Environment, FileSystemLoader, select_autoescape
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from sklearn.metrics import precision_recall_curve, roc_curve

from dataset import load_input
from mvfa.flags import new_parser, one_line_errors
from mvfa.maps import LABELS, overlay
from tools.published import PUBLISHED
from utils import BadValue, MissingFile

TEMPLATES = Path(__file__).resolve().parent / "templates"
METRICS = (
    ("image_auroc", "image AUROC"),
    ("image_ap", "image AP"),
    ("image_f1_max", "image F1-max"),
    ("pixel_auroc", "pixel AUROC"),
    ("pixel_ap", "pixel AP"),
    ("pixel_f1_max", "pixel F1-max"),
    ("pixel_aupro", "pixel AUPRO"),
)
# the protocol a record's script ran (test_few.py --support normal: normal-only, see protocol_of)
PROTOCOLS = {
    "test_few": "few-shot",
    "train_few": "few-shot",
    "test_zero": "zero-shot",
    "train_zero": "zero-shot",
}
PIXEL_BINS = 1000  # pixel curves from histograms of the maps: exact at these 1000 thresholds
THUMB_WIDTH = 600  # overlays embedded at this width (the drawing is maps.overlay's, 900 px wide)


class Run(NamedTuple):
    """One scored pass over a test set: a record (or one draw of it) and its --save_scores arrays."""

    record_path: Path
    record: dict
    metrics: dict  # this pass's metrics (fractions)
    draw: int | None  # index into the record's draws, None for a single pass
    scores_path: Path
    arrays: dict  # files [N], labels [N], image_scores [N]; maps, masks [N, H, W] with masks

    @property
    def group(self) -> tuple:
        args = self.record.get("args", {})
        shot = args.get("shot") if protocol_of(self.record) in ("few-shot", "normal-only") else None
        return (args.get("obj", "?"), protocol_of(self.record), shot, args.get("select", "test"))

    @property
    def name(self) -> str:
        draw = "" if self.draw is None else f" draw {self.draw}"
        return f"{group_name(self.group)}{draw} ({self.record_path.name})"


def protocol_of(record: dict) -> str:
    """The protocol label of a record: its script's, where test_few.py with --support normal ran the
    normal-only protocol (docs/normal-only.md)."""
    script = record.get("script", "?")
    if script == "test_few" and record.get("args", {}).get("support") == "normal":
        return "normal-only"
    return PROTOCOLS.get(script, script)


def group_name(group: tuple) -> str:
    obj, protocol, shot, select = group
    shot = "" if shot is None else f" k={shot}"
    return f"{obj} {protocol}{shot}, --select {select}"


def read_record(path: Path) -> dict:
    if not path.is_file():
        raise MissingFile(f"record {path}: no such file; pass the JSON a test script wrote to --out_dir")
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadValue(f"record {path} is not JSON ({e}); pass the JSON a test script wrote") from None
    if not isinstance(record, dict) or "metrics" not in record:
        raise BadValue(f"record {path} has no metrics; pass the JSON a test script wrote to --out_dir")
    return record


def scores_paths(record_path: Path, record: dict, given: str | None) -> list[Path]:
    """The --save_scores file of each pass of a record, as test_few.py names them for several draws."""
    draws = record["metrics"].get("draws")
    flag = given or record.get("args", {}).get("save_scores")
    if not flag:
        raise BadValue(
            f"record {record_path} has no --save_scores arrays: rerun its test script with "
            f"--save_scores FILE.npz, or pass --scores FILE.npz"
        )
    if draws:  # test_few.py's naming of one file per draw
        names = [f"{flag.removesuffix('.npz')}_iterate_{i}.npz" for i in range(len(draws))]
    else:
        names = [flag]
    found = []
    for name in names:
        p = Path(name)
        candidates = [p] if p.is_absolute() else [p, record_path.parent / p]
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is None:
            raise MissingFile(
                f"scores {name} of record {record_path}: no such file; pass --scores FILE.npz "
                f"(one per record)"
            )
        found.append(hit)
    return found


def load_runs(record_path: Path, given: str | None) -> list[Run]:
    record = read_record(record_path)
    paths = scores_paths(record_path, record, given)
    draws = record["metrics"].get("draws")
    runs = []
    for i, path in enumerate(paths):
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
        metrics = draws[i] if draws else record["metrics"]
        n = len(arrays["labels"])
        if len(metrics.get("image_scores", [])) not in (0, n):
            raise BadValue(
                f"scores {path} hold {n} images, record {record_path} {len(metrics['image_scores'])}: "
                f"pass the --scores file of that run"
            )
        runs.append(Run(record_path, record, metrics, i if draws else None, path, arrays))
    return runs


def threshold_for(labels: np.ndarray, scores: np.ndarray, given: float | None, fpr: float | None) -> tuple:
    """(threshold, how it was chosen): given; the (1 - fpr) quantile of the normal images' scores; or the
    F1-max threshold on this test set for the decision `score > threshold`."""
    if given is not None:
        return float(given), "given (--threshold)"
    if fpr is not None:
        value = float(np.quantile(scores[labels == 0], 1 - fpr))
        return value, f"{1 - fpr:.0%} quantile of the normal scores"
    # candidates: every distinct score (decision: above it) and just below the lowest (all abnormal)
    candidates = np.concatenate([[np.nextafter(scores.min(), -np.inf)], np.unique(scores)])
    above = scores[None, :] > candidates[:, None]  # [T, N]
    tp = (above & (labels == 1)).sum(1)
    f1 = 2 * tp / np.maximum(above.sum(1) + (labels == 1).sum(), 1)
    return float(candidates[int(np.argmax(f1))]), "F1-max on the test set"


def pixel_histograms(maps: np.ndarray, masks: np.ndarray, chunk: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Counts of normal and anomalous pixels in PIXEL_BINS equal bins from 0 to 1, or over the maps' whole
    range where it is wider (standalone scores, --normalize support, go above 1), streamed over the images."""
    low, high = min(0.0, float(maps.min())), max(1.0, float(maps.max()))
    per_unit = PIXEL_BINS / (high - low)  # bins per unit of score: PIXEL_BINS on [0, 1]
    normal, anomalous = np.zeros(PIXEL_BINS, np.int64), np.zeros(PIXEL_BINS, np.int64)
    for start in range(0, len(maps), chunk):
        values = maps[start : start + chunk].reshape(-1)
        truth = masks[start : start + chunk].reshape(-1) > 0
        bins = np.clip(((values - low) * per_unit).astype(np.int64), 0, PIXEL_BINS - 1)
        normal += np.bincount(bins[~truth], minlength=PIXEL_BINS)
        anomalous += np.bincount(bins[truth], minlength=PIXEL_BINS)
    return normal, anomalous


def curves_from_histograms(normal: np.ndarray, anomalous: np.ndarray) -> dict:
    """ROC (fpr, tpr) and PR (recall, precision) of the decision `value >= bin edge`, from the top bin
    down."""
    tp = np.concatenate([[0], np.cumsum(anomalous[::-1])])
    fp = np.concatenate([[0], np.cumsum(normal[::-1])])
    precision = np.divide(tp, tp + fp, out=np.ones(len(tp)), where=tp + fp > 0)
    recall = tp / max(tp[-1], 1)
    return {"roc": (fp / max(fp[-1], 1), recall), "pr": (recall, precision)}


def run_curves(run: Run) -> dict:
    """{'image': {'roc': (x, y), 'pr': (x, y)}, 'pixel': ... where the run has masks}."""
    labels, scores = run.arrays["labels"], run.arrays["image_scores"]
    fpr, tpr, _ = roc_curve(labels, scores)
    precision, recall, _ = precision_recall_curve(labels, scores)
    out = {"image": {"roc": (fpr, tpr), "pr": (recall, precision)}}
    if "maps" in run.arrays:
        out["pixel"] = curves_from_histograms(*pixel_histograms(run.arrays["maps"], run.arrays["masks"]))
    return out


def png_uri(fig: Figure) -> str:
    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def curve_figures(runs: list[Run]) -> list[dict]:
    """One figure per level (image, pixel) and kind (ROC, PR), a line per run: [{'title', 'uri'}]."""
    curves = [run_curves(run) for run in runs]
    axes_labels = {"roc": ("false-positive rate", "true-positive rate"), "pr": ("recall", "precision")}
    out = []
    for level in ("image", "pixel"):
        for kind in ("roc", "pr"):
            lines = [(run.name, c[level][kind]) for run, c in zip(runs, curves) if level in c]
            if not lines:
                continue
            fig = Figure(figsize=(5.2, 4.2), dpi=90, layout="constrained")
            ax = fig.subplots()
            for name, (x, y) in lines:
                ax.plot(x, y, lw=1.4, label=name, drawstyle="steps-post" if kind == "pr" else "default")
            if kind == "roc":
                ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=0.8)
            ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel=axes_labels[kind][0], ylabel=axes_labels[kind][1])
            ax.legend(fontsize=6, loc="lower right" if kind == "roc" else "lower left")
            title = f"{level} {'ROC' if kind == 'roc' else 'precision-recall'}"
            ax.set_title(title, fontsize=10)
            out.append({"title": title, "uri": png_uri(fig)})
    return out


def metric_rows(runs: list[Run]) -> list[dict]:
    """Per group: mean ± std (in %) of each metric over its passes; then the paper's and the authors'
    implementation's AUROC where published (few-shot: k = 4 only)."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.group, []).append(run)
    rows = []
    for group, members in groups.items():
        cells = {}
        for key, _ in METRICS:
            values = [100 * r.metrics[key] for r in members if key in r.metrics]
            if values:
                std = f" ± {np.std(values):.2f}" if len(values) > 1 else ""
                cells[key] = f"{np.mean(values):.2f}{std}"
        n = len(members)
        rows.append({"name": f"{group_name(group)}: {n} pass{'es' if n > 1 else ''}", "cells": cells})
        obj, protocol, shot, _ = group
        published = PUBLISHED.get(protocol, {}).get(obj) if protocol != "few-shot" or shot == 4 else None
        for i, who in enumerate(("paper", "authors' implementation")):
            if published:
                cells = {k: f"{v[i]:.2f}" for k, v in published.items()}
                rows.append({"name": f"{obj} {protocol}: {who}", "cells": cells, "published": True})
    return rows


def overlay_selection(labels: np.ndarray, scores: np.ndarray, n: int) -> set[int]:
    """Up to n images, the hardest first: the highest-scoring normal and the lowest-scoring abnormal ones
    alternately (those any threshold gets wrong first)."""
    normal = [int(i) for i in np.argsort(-scores, kind="stable") if labels[i] == 0]
    abnormal = [int(i) for i in np.argsort(scores, kind="stable") if labels[i] == 1]
    order = [i for pair in zip(normal, abnormal) for i in pair]
    short = min(len(normal), len(abnormal))
    order += normal[short:] + abnormal[short:]
    return set(order[:n])


def overlay_uri(run: Run, i: int, size: int, folder: Path) -> str:
    """The test scripts' --save_maps picture of image i (maps.overlay), scaled to THUMB_WIDTH, as a data
    URI."""
    path = Path(str(run.arrays["files"][i]))
    if not path.is_file():
        raise MissingFile(
            f"image {path} of {run.scores_path}: no such file; run the report where the test data are, "
            f"or pass --overlays 0"
        )
    heat = run.arrays["maps"][i] if "maps" in run.arrays else None
    mask = run.arrays["masks"][i] if "masks" in run.arrays else None
    label = int(run.arrays["labels"][i])
    title = f"#{i} {path.name} ({LABELS.get(label, label)})"
    score = float(run.arrays["image_scores"][i])
    drawn = overlay(load_input(path, size), heat, mask, score, title, folder / "overlay.png")
    with Image.open(drawn) as img:
        img = img.convert("RGB")
        img = img.resize((THUMB_WIDTH, round(img.height * THUMB_WIDTH / img.width)), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def image_table(run: Run, threshold: tuple, n_overlays: int, folder: Path) -> dict:
    labels, scores = run.arrays["labels"], run.arrays["image_scores"].astype(np.float64)
    size = run.arrays["maps"].shape[-1] if "maps" in run.arrays else int(run.record["args"]["img_size"])
    drawn = overlay_selection(labels, scores, n_overlays)
    rows = []
    for i, (file, label, score) in enumerate(zip(run.arrays["files"], labels, scores)):
        uri = overlay_uri(run, i, size, folder) if i in drawn else None
        rows.append({"index": i, "file": str(file), "label": int(label), "score": float(score), "uri": uri})
    value, how = threshold
    return {"name": run.name, "rows": rows, "threshold": value, "how": how, "n_overlays": len(drawn)}


def record_details(record_path: Path, record: dict) -> dict:
    args = record.get("args", {})
    return {
        "path": str(record_path),
        "script": record.get("script", "?"),
        "protocol": protocol_of(record),
        "time": record.get("time", "?"),
        "args": {k: json.dumps(v) for k, v in args.items()},
        "files": record.get("files", {}),
        "versions": {k: json.dumps(v) for k, v in record.get("versions", {}).items()},
    }


def render(runs: list[Run], tables: list[dict], records: dict[Path, dict]) -> str:
    env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(["j2"]))
    return env.get_template("report.html.j2").render(
        title=", ".join(sorted({group_name(r.group) for r in runs})),
        metrics=METRICS,
        metric_rows=metric_rows(runs),
        curves=curve_figures(runs),
        tables=tables,
        records=[record_details(p, r) for p, r in records.items()],
        labels=LABELS,
    )


def parser() -> argparse.ArgumentParser:
    p = new_parser(__doc__)
    p.add_argument("records", nargs="+", help="JSON run records of test_few.py / test_zero.py")
    p.add_argument("--out", default="./report/", help="folder for report.html")
    p.add_argument(
        "--scores",
        nargs="+",
        default=None,
        metavar="FILE.npz",
        help="the --save_scores file of each record, in order, as given to the test script (default: the "
        "record's own --save_scores)",
    )
    p.add_argument("--threshold", type=float, default=None, help="decision threshold of every table")
    p.add_argument(
        "--fpr",
        type=float,
        default=None,
        help="threshold at the (1 - fpr) quantile of each test set's normal scores (default: F1-max)",
    )
    p.add_argument(
        "--overlays",
        type=int,
        default=200,
        help="overlay pictures per table, the hardest images first (each ~40 kB in the page)",
    )
    return p


def main(argv=None) -> Path:
    args = parser().parse_args(argv)
    with one_line_errors():
        if args.scores and len(args.scores) != len(args.records):
            raise BadValue(
                f"--scores: {len(args.scores)} files for {len(args.records)} records; give one per record"
            )
        if args.fpr is not None and not 0 < args.fpr < 1:
            raise BadValue(f"--fpr must lie strictly between 0 and 1, got {args.fpr}")
        given = args.scores or [None] * len(args.records)
        runs = [run for path, s in zip(args.records, given) for run in load_runs(Path(path), s)]
        tables = []
        with tempfile.TemporaryDirectory() as tmp:
            for run in runs:
                labels, scores = run.arrays["labels"], run.arrays["image_scores"]
                threshold = threshold_for(labels, scores, args.threshold, args.fpr)
                tables.append(image_table(run, threshold, args.overlays, Path(tmp)))
        records = {run.record_path: run.record for run in runs}
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        page = out / "report.html"
        page.write_text(render(runs, tables, records), encoding="utf-8")
        print(f"report written to {page} ({page.stat().st_size / 1e6:.1f} MB, {len(runs)} passes)")
    return page


if __name__ == "__main__":
    main()
