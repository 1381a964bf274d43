"""The test of trained adapters that test_few.py, test_zero.py and tools/paper_tables.py run: one scored
pass per test set (per support draw, few-shot) with --save_scores and --save_maps, the printed lines, the
mean ± std over several draws, and the run record."""

from pathlib import Path

import numpy as np
import torch

from dataset.augment import augment
from dataset.medical_few import ImageItems, MedTestDataset
from utils import InputError

from .config import RunConfig
from .evaluation import evaluate_set, result_lines, save_scores
from .maps import save_test_maps
from .precision import Precision
from .protocol import normal_references
from .records import write_record


def per_draw(path: str | None, i: int, draws: int, suffix: str = "") -> str | None:
    """An output path of draw i: as given for a single draw, else with `_iterate_{i}` (a folder:
    `/iterate_{i}`)."""
    if not path or draws == 1:
        return path
    return f"{path}/iterate_{i}" if not suffix else f"{path.removesuffix(suffix)}_iterate_{i}{suffix}"


def summary(results: list[dict]) -> dict[str, dict[str, float]]:
    """The mean and (population) standard deviation of every metric over several draws' results."""
    values = {k: [r[k] for r in results] for k, v in results[0].items() if isinstance(v, float)}
    return {k: {"mean": float(np.mean(v)), "std": float(np.std(v))} for k, v in values.items()}


def test_adapters(
    model,
    run: RunConfig,
    precision: Precision,
    text: torch.Tensor,
    datasets: list[MedTestDataset],
    clip_file: Path | None,
    calibration: ImageItems | None = None,
) -> dict:
    """The adapters of run.checkpoint, loaded into `model`, scored against `text` on each of `datasets` (the
    test set with one support draw each, few-shot; the test set, zero-shot); prints each pass's lines (and,
    for several draws, the mean ± std) and writes the run record (with run.arguments). Returns the
    metrics (several draws: each draw's and their summary). --normalize support: scores normalised with
    extremes fitted on each draw's normal support and the `calibration` images."""
    device = next(model.parameters()).device
    try:
        model.load_adapters(run.checkpoint)
    except InputError as e:  # the command line names the flag that gave the file
        e.flag = e.flag or ("ckpt" if run.ckpt else "save_path")
        raise
    iterates = run.iterate if isinstance(run.iterate, tuple) else (run.iterate,)
    results = []
    for i, dataset in enumerate(datasets):
        memory_images = augment(dataset.support.normal)[0] if run.fewshot else None  # [11k, 3, H, W]
        normals = normal_references(run, dataset, calibration)
        result, collected = evaluate_set(model, dataset, text, run, precision, memory_images, normals=normals)
        if scores_file := per_draw(run.save_scores, i, len(datasets), ".npz"):
            files = [path for path, _, _ in dataset.items]
            save_scores(scores_file, collected, result, files, device, precision)
        if maps_dir := per_draw(run.save_maps, i, len(datasets)):
            save_test_maps(
                maps_dir, dataset, collected, result["image_scores"], device, precision, run.grid_n
            )
        if len(datasets) > 1:
            names = " ".join(dataset.support.normal_files)
            print(f"support draw {i} (--iterate {iterates[i]}): {names}")
        print("\n".join(result_lines(run.obj, result, fewshot=run.fewshot)))
        results.append(result)
    record = results[0]
    if len(results) > 1:
        record = {
            "draws": [{"iterate": it, **r} for it, r in zip(iterates, results)],
            "summary": summary(results),
        }
        for key, value in record["summary"].items():
            print(f"{run.obj} {key} : {value['mean']:.4f} ± {value['std']:.4f} over {len(results)} draws")
    files = {"clip": clip_file, "adapters": run.checkpoint}
    write_record(run.out_dir, f"test_{run.protocol}", run.name, run.arguments, record, files, device)
    return record
