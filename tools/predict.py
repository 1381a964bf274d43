"""Anomaly scores and maps for one's own images with an MVFA adapter checkpoint: zero-shot, or few-shot with a
folder of normal support images (memory bank of their augmentations, as test_few.py).

    python -m tools.predict --input scans/ --ckpt ckpt/zero-shot/Brain.pth --obj Brain --out pred/
    python -m tools.predict --input case7.tif --ckpt ckpt/few-shot/Liver.pth --obj Liver --support normals/ \\
        --out pred/
    python -m tools.predict --input xrays/ --ckpt ckpt/zero-shot/Chest.pth --prompt_name "Chest X-ray film" \\
        --calibrate normal_xrays/ --fpr 0.05 --out pred/

Writes OUT/scores.csv (file, score, and decision with --calibrate) and OUT/{index:05d}_{stem}.png per input:
the image at its own size beside the heat map resized onto it (--save_npy: that map as .npy too). Score,
zero-shot: the det head's image score before the reference's test-set min-max (absolute). Score, few-shot: the
max of the 0.5/0.5 fused zero-shot and memory-bank maps, min-max normalised over the run's pool (the inputs
and the --calibrate images) standing in for the test set: relative to that pool. One input without
--calibrate: its raw maps fused (few-shot score: their max), the map scaled by its own range for display only.
--calibrate: threshold at the (1 - fpr) quantile of the normal images' scores. Images: 8-bit, 16-bit (/ 65535)
or float in [0, 1], grey or colour, any size.

--normalize support: scores that stand alone, as test_few.py / test_zero.py --normalize support give them.
With --support (2 or more images; with the zero-shot adapters: the normal-only protocol), min-max fitted on
the support images, each against the memory bank without its own views; without, on the --calibrate images.
Score: MVFA's rule for the head (seg: the fused map's max; det: 0.5/0.5 of the normalised zero-shot and
memory-bank image scores); one image per forward. A score then depends only on its image, the weights and
those normal images, so a --calibrate threshold carries over to later runs:

    python -m tools.predict --input scans/ --ckpt ckpt/zero-shot/Brain.pth --obj Brain --support normals/ \
        --normalize support --calibrate more_normals/ --out pred/
"""

import argparse
import csv
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from dataset import DATASETS, IMAGE_EXTENSIONS, check_obj, list_images
from dataset.augment import augment
from dataset.images import load_input, read_image
from dataset.medical_few import ImageItems
from mvfa.config import configs
from mvfa.evaluation import (
    Collected,
    Normals,
    PixelMaps,
    build_memory,
    collect,
    collect_standalone,
    image_scores_of,
    raw_maps,
)
from mvfa.flags import add_cache_args, add_model_args, new_parser, one_line_errors
from mvfa.maps import overlay
from mvfa.precision import Precision
from mvfa.text_cache import adapted_model
from utils import BadValue, MissingFile


def list_inputs(path: str | Path, flag: str) -> list[Path]:
    """An image file, or the image files of a folder (sorted), checked to exist."""
    p = Path(path)
    if p.is_dir():
        files = [Path(f) for f in list_images(str(p))]
        if not files:
            raise BadValue(f"{flag} {p}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
        return files
    if not p.exists():
        raise MissingFile(f"{flag} {p}: no such file or folder")
    if not p.name.lower().endswith(IMAGE_EXTENSIONS):
        raise BadValue(f"{flag} {p}: not an image file name (expected {', '.join(IMAGE_EXTENSIONS)})")
    return [p]


def pool_scores(
    c: Collected, device: torch.device, precision: Precision
) -> tuple[np.ndarray, Callable[[int, int], torch.Tensor]]:
    """Image scores [n] and maps_fn(start, stop) -> maps [k, H, W] in [0, 1] of a pool (see the module
    docstring)."""
    # deviation: the reference normalises over a test set; a run's inputs (+ calibration images) stand in for
    # it. Few-shot scores are the fused map's max for every dataset (the reference averages maps of image-only
    # ones).
    if len(c.labels) > 1:
        maps = PixelMaps(c, device, precision)
        return (maps.image_max() if c.fewshot else np.array(c.zero_image, dtype=np.float32)), maps.chunk
    zero, few = raw_maps(c, 0, 1, device, precision)  # a one-image pool: the raw maps, fused
    fused = (zero if few is None else 0.5 * zero + 0.5 * few).cpu()
    score = float(fused.max()) if c.fewshot else c.zero_image[0]
    display = (fused - fused.min()) / (fused.max() - fused.min()).clamp_min(1e-12)  # display only

    def display_maps(start: int, stop: int) -> torch.Tensor:
        return display[start:stop]

    return np.array([score], dtype=np.float32), display_maps


def standalone_scores(
    model,
    pool: ImageItems,
    text: torch.Tensor,
    precision: Precision,
    normals: Normals,
    head: str,
    memory: tuple | None,
) -> tuple[np.ndarray, Callable[[int, int], torch.Tensor]]:
    """Image scores [n] and maps_fn of a pool, each standing alone: normalised with the extremes fitted on
    `normals`, the image score by MVFA's rule for the head, as the test scripts' --normalize support."""
    has_masks = head == "seg"  # the rule of the datasets whose maps come from the seg head
    c = collect_standalone(model, pool, text, precision, normals, has_masks, memory, head=head)
    device = next(model.parameters()).device
    maps = PixelMaps(c, device, precision)
    return image_scores_of(c, device, precision, maps), maps.chunk


# the flags predict.py reads itself; the others make its configs
OWN_FLAGS = ("input", "head", "support", "calibrate", "fpr", "out", "save_npy", "normalize")


def parser() -> argparse.ArgumentParser:
    p = new_parser(__doc__)
    p.add_argument(
        "--input", required=True, help="an image file or a folder of images (png, jpg, jpeg, bmp, tif)"
    )
    p.add_argument("--ckpt", required=True, help="adapter checkpoint (.pth of train_few.py / train_zero.py)")
    name = p.add_mutually_exclusive_group(required=True)
    name.add_argument(
        "--obj",
        help="dataset the images resemble: Brain, Liver, Retina_RESC, Retina_OCT2017, Chest, "
        "Histopathology (its prompt name is used)",
    )
    name.add_argument("--prompt_name", help="free-text object name for the prompts, e.g. 'knee MRI'")
    p.add_argument(
        "--head",
        default="auto",
        choices=["auto", "seg", "det"],
        help="adapters the maps come from; auto: det for image-only datasets, else seg",
    )
    p.add_argument("--support", default=None, metavar="DIR", help="folder of normal images: few-shot scoring")
    p.add_argument(
        "--calibrate",
        default=None,
        metavar="DIR",
        help="folder of normal images: threshold at the (1 - fpr) quantile of their scores, and a "
        "normal/abnormal decision per input (use at least 1/fpr images)",
    )
    p.add_argument("--fpr", type=float, default=0.05, help="false-positive rate for --calibrate")
    p.add_argument(
        "--normalize",
        default="pool",
        choices=["pool", "support"],
        help="pool: few-shot maps min-max over this run's images (scores relative to them); support: "
        "scores that stand alone, min-max fitted on the --support images (leave one out), else on the "
        "--calibrate images",
    )
    p.add_argument("--out", default="./predictions/", help="folder for scores.csv and the heat-map PNGs")
    p.add_argument(
        "--save_npy",
        action="store_true",
        help="also write each heat map at the input's own size as float32 .npy, values as drawn",
    )
    add_model_args(p)
    add_cache_args(p)
    return p


def write_outputs(
    out: Path,
    inputs: list[Path],
    offset: int,
    scores: np.ndarray,
    maps_fn,
    threshold: float | None,
    caption: str,
    save_npy: bool = False,
) -> list[dict]:
    """scores.csv and one overlay per input, drawn at the input's own size; pool entries offset.. are the
    inputs."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for j, path in enumerate(inputs):
        score = float(scores[offset + j])
        row = {"file": str(path), "score": score}
        title = path.name
        if threshold is not None:
            row["decision"] = "abnormal" if score > threshold else "normal"
            title += f": {row['decision']} (threshold {threshold:.4f})"
        image = read_image(path)  # [H, W, 3]
        heat = maps_fn(offset + j, offset + j + 1)[None].float()  # [1, 1, S, S]: the model's square input
        heat = F.interpolate(heat, size=image.shape[:2], mode="bilinear", align_corners=True)[0, 0]  # [H, W]
        overlay(image.transpose(2, 0, 1), heat, None, score, title, out / f"{j:05d}_{path.stem}.png", caption)
        if save_npy:
            np.save(out / f"{j:05d}_{path.stem}.npy", heat.numpy())
        rows.append(row)
    with open(out / "scores.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


def main(argv=None) -> list[dict]:
    args = parser().parse_args(argv)
    with one_line_errors():
        if not 0 < args.fpr < 1:
            raise BadValue(f"--fpr must lie strictly between 0 and 1, got {args.fpr}")
        obj = check_obj(args.obj) if args.obj else None
        inputs = list_inputs(args.input, "--input")
        normals = list_inputs(args.calibrate, "--calibrate") if args.calibrate else []
        support = list_inputs(args.support, "--support") if args.support else []
        model_cfg, run, precision, device = configs(vars(args), protocol="zero", beside=OWN_FLAGS)
        name = obj or run.prompt_name
        standalone = args.normalize == "support"
        if standalone and (len(support) == 1 or not (support or normals)):
            raise BadValue(
                "--normalize support fits its range on 2 or more --support images (leave one out), or "
                f"without --support on the --calibrate images: got {len(support)} support and "
                f"{len(normals)} calibration images"
            )
        model, texts = adapted_model(model_cfg, precision, device, [name], run.text_cache_dir)
        model.load_adapters(run.checkpoint)
        text = texts[name]
        memory = None
        # memory banks of the augmented support images (11 views each), as test_few.py builds them
        if support:
            images = torch.stack([load_input(p, run.img_size, run.clip_normalize) for p in support])
            views = augment(images)[0]  # [11k, 3, S, S]
            memory = build_memory(model, views, precision, run.batch_size)
        pool = ImageItems([(str(p), 0, None) for p in normals + inputs], run.img_size, run.clip_normalize)
        # auto: the det head for image-only datasets (their few-shot checkpoints never train the seg adapters)
        head = args.head
        if head == "auto":
            head = "det" if obj and not DATASETS[obj].has_masks else "seg"
        if standalone:
            # fitted on the support; zero-shot, on the calibration images
            calibration = ImageItems(pool.items[: len(normals)], run.img_size, run.clip_normalize)
            fit_on = Normals(images, None) if support else Normals(None, calibration)
            scores, maps_fn = standalone_scores(model, pool, text, precision, fit_on, head, memory)
        else:
            loader = DataLoader(pool, batch_size=run.batch_size, shuffle=False)
            c = collect(
                model, loader, text, precision, has_masks=False, memory=memory, head=head, desc="maps"
            )
            scores, maps_fn = pool_scores(c, device, precision)
        threshold = float(np.quantile(scores[: len(normals)], 1 - args.fpr)) if normals else None
        if normals and len(normals) < 1 / args.fpr:
            print(
                f"note: {len(normals)} calibration images are too few for --fpr {args.fpr}: "
                f"the threshold is close to their highest score"
            )
        if standalone:
            fitted_on = "the support images" if support else "the calibration images"
            caption = f"{'fused ' if memory else ''}map, min-max fitted on {fitted_on}"
        elif len(pool) == 1:
            caption = "raw map scaled to this image's range"
        else:
            caption = f"{'fused ' if memory else ''}map, min-max over the {len(pool)} images of this run"
        out = Path(args.out)
        rows = write_outputs(out, inputs, len(normals), scores, maps_fn, threshold, caption, args.save_npy)
        for row in rows:
            print(f"{row['score']:.4f} {row.get('decision', '')} {row['file']}")
        if threshold is not None:
            print(
                f"threshold {threshold:.4f} at the {1 - args.fpr:.0%} quantile "
                f"of {len(normals)} normal images"
            )
        print(f"scores and maps written to {args.out}")
    return rows


if __name__ == "__main__":
    main()
