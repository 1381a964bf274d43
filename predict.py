"""Anomaly scores and maps for one's own images with an MVFA adapter checkpoint: zero-shot, or few-shot with a folder
of normal support images (memory bank of their augmentations, as test_few.py).

    python predict.py --input scans/ --ckpt ckpt/zero-shot/Brain.pth --obj Brain --out pred/
    python predict.py --input case7.tif --ckpt ckpt/few-shot/Liver.pth --obj Liver --support normals/ --out pred/
    python predict.py --input xrays/ --ckpt ckpt/zero-shot/Chest.pth --prompt_name "Chest X-ray film" \\
        --calibrate normal_xrays/ --fpr 0.05 --out pred/

Writes OUT/scores.csv (file, score, and decision with --calibrate) and OUT/{index:05d}_{stem}.png per input: the
image at its own size beside the heat map resized onto it (--save_npy: that map as .npy too).
Score, zero-shot: the det head's image score before the reference's test-set min-max (absolute, comparable across
runs). Score, few-shot: the max of the 0.5/0.5 fusion of the zero-shot and memory-bank maps. The reference min-max
normalises each map over the test set, which has no meaning for one image: here the pool of the run (the inputs plus
the --calibrate images) stands in for the test set, so few-shot scores are relative to that pool. A single image
without --calibrate: the raw maps are fused (score = their max) and the map is scaled to [0, 1] by its own range, for
display only. --calibrate scores normal images in the same pool and puts the threshold at the (1 - fpr) quantile of
their scores. Images may be 8-bit, 16-bit (divided by 65535) or float in [0, 1], grey or colour, of any size.
"""
import argparse
import csv
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dataset import CLIP_MEAN, CLIP_STD, DATASETS, IMAGE_EXTENSIONS, check_obj, list_images, load_image
from evaluate import Collected, PixelMaps, build_memory, collect, raw_maps
from prompt import text_features_for
from utils import add_common_args, augment, build_model, resolve_device, run_main
from visualize import overlay, save_maps

MODEL_FLAGS = ("model_name", "pretrain", "clip_ckpt", "img_size", "features_list", "device", "precision",
               "batch_size", "fast", "quick_gelu", "clip_normalize")
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # PIL opens 16-bit grey PNG/TIFF as I;16* (older: I)


# ---- reading images of any depth ----

def _open(path: Path) -> tuple[np.ndarray, bool]:
    """(pixels [H, W, C] float32 in [0, 1], C = 1 or 3; True if the file is 8-bit) with errors naming the file."""
    try:
        with Image.open(path) as img:
            if img.mode in SIXTEEN_BIT:
                a = np.asarray(img).astype(np.float64)  # I;16B arrives big-endian: astype takes care of it
                if a.min() < 0 or a.max() > 65535:
                    raise ValueError(f"image {path}: 32-bit integer values outside 0..65535; save it as 8- or 16-bit")
                return (a / 65535).astype(np.float32)[..., None], False
            if img.mode == "F":
                a = np.asarray(img, dtype=np.float32)
                if a.min() < 0 or a.max() > 1:
                    raise ValueError(f"image {path}: float values in [{a.min():g}, {a.max():g}], [0, 1] expected; "
                                     f"rescale it or save it as 8- or 16-bit")
                return a[..., None], False
            return np.asarray(img.convert("RGB"), dtype=np.float32) / 255, True  # L, P, RGBA, 1, CMYK, ...
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except (OSError, SyntaxError) as err:
        raise ValueError(f"cannot read image {path}: {err} (corrupt or not an image; replace or remove it)") from None


def read_image(path: str | Path) -> np.ndarray:
    """[H, W, 3] float32 in [0, 1] at the file's own size: 8-bit / 255, 16-bit grey levels / 65535, float as is."""
    a, _ = _open(Path(path))
    return np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a


def load_input(path: str | Path, img_size: int) -> torch.Tensor:
    """[3, img_size, img_size] float32 in [0, 1]: 8-bit files exactly as the test datasets load them, deeper ones
    resized in floating point (bicubic, clipped to [0, 1] as the 8-bit path clips)."""
    a, eight_bit = _open(Path(path))
    if eight_bit:
        return load_image(str(path), img_size)
    planes = [np.asarray(Image.fromarray(np.ascontiguousarray(a[..., c])).resize(  # mode 'F' per channel
        (img_size, img_size), Image.Resampling.BICUBIC)) for c in range(a.shape[2])]
    x = torch.from_numpy(np.clip(np.stack(planes), 0, 1))  # [C, S, S]
    return x.expand(3, -1, -1).contiguous() if x.shape[0] == 1 else x


def clip_normalize(x: torch.Tensor) -> torch.Tensor:
    """--clip_normalize: CLIP's mean/std on [3, H, W] (as dataset.load_image(normalize=True))."""
    return (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


def list_inputs(path: str | Path, flag: str) -> list[Path]:
    """An image file, or the image files of a folder (sorted), checked to exist."""
    p = Path(path)
    if p.is_dir():
        files = [Path(f) for f in list_images(str(p))]
        if not files:
            raise ValueError(f"{flag} {p}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
        return files
    if not p.exists():
        raise FileNotFoundError(f"{flag} {p}: no such file or folder")
    if not p.name.lower().endswith(IMAGE_EXTENSIONS):
        raise ValueError(f"{flag} {p}: not an image file name (expected {', '.join(IMAGE_EXTENSIONS)})")
    return [p]


class ImageFiles(Dataset):
    """Image files as a test dataset: `.items` (path, label 0, no mask); item = (model input [3, S, S], 0, zeros)."""

    def __init__(self, paths: list[Path], img_size: int, normalize: bool = False):
        self.items = [(str(p), 0, None) for p in paths]
        self.img_size, self.normalize, self.has_masks = img_size, normalize, False

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        x = load_input(self.items[i][0], self.img_size)
        return (clip_normalize(x) if self.normalize else x), 0, torch.zeros(1, self.img_size, self.img_size)


# ---- maps ----

class DetHead(nn.Module):
    """The model seen through its det head: det tokens in both slots, so that evaluate.collect, which builds pixel
    maps from the seg slot, builds det-head maps (and still takes the image score from the det head)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor):
        pooled, _, det = self.model(images)
        return pooled, det, det


def pick_head(obj: str | None, head: str = "auto") -> str:
    """'auto': the det head for image-only datasets (their few-shot checkpoints never train the seg adapters),
    else the seg head."""
    if head != "auto":
        return head
    return "det" if obj is not None and not DATASETS[obj][1] else "seg"


def collect_maps(model, dataset: Dataset, text: torch.Tensor, device: torch.device, head: str = "seg",
                 memory: tuple | None = None, precision: str = "auto", batch_size: int = 1,
                 num_workers: int = 0) -> Collected:
    """evaluate.collect over `dataset` keeping the pixel-map material of `head` ('seg' or 'det'); memory = the
    (seg bank, det bank) of build_memory for few-shot maps, None for zero-shot."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    if head == "det":
        model, memory = DetHead(model), None if memory is None else (memory[1], memory[1])
    return collect(model, loader, text, device, True, memory, precision, dataset.img_size, desc="maps")


def pool_scores(c: Collected, fewshot: bool, device: torch.device,
                precision: str = "auto") -> tuple[np.ndarray, Callable[[int, int], torch.Tensor]]:
    """Image scores [n] and maps_fn(start, stop) -> maps [k, H, W] in [0, 1] of a pool (see the module docstring)."""
    # deviation: the reference normalises over a test set; a run's inputs (+ calibration images) stand in for it.
    # Few-shot scores are the fused map's max for every dataset (the reference averages maps of image-only ones).
    if len(c.labels) > 1:
        maps = PixelMaps(c, device, precision, fewshot)
        return (maps.image_max() if fewshot else np.array(c.zero_image, dtype=np.float32)), maps.chunk
    zero, few = raw_maps(c, 0, 1, device, precision, fewshot)  # a one-image pool: the raw maps, fused
    fused = (zero if few is None else 0.5 * zero + 0.5 * few).cpu()
    score = float(fused.max()) if fewshot else c.zero_image[0]
    display = (fused - fused.min()) / (fused.max() - fused.min()).clamp_min(1e-12)  # display only
    return np.array([score], dtype=np.float32), lambda start, stop: display[start:stop]


def save_test_maps(out_dir: str | Path, dataset, collected: Collected, scores, model, text: torch.Tensor,
                   device: torch.device, args, memory: tuple | None = None) -> list[Path]:
    """--save_maps of test_few.py / test_zero.py: per test image the normalised map the pixel metrics used.

    Image-only datasets have no pixel map in the reference; for them one more pass builds the det head's maps (the
    spatial breakdown of their image scores), fused and min-max normalised over the test set in the same way.
    """
    fewshot = memory is not None
    what = ("0.5/0.5 zero-/few-shot" if fewshot else "zero-shot") + ("" if collected.has_masks else " det-head")
    if not collected.has_masks:
        collected = collect_maps(model, dataset, text, device, "det", memory, args.precision, args.batch_size,
                                 args.num_workers)
    maps = PixelMaps(collected, device, args.precision, fewshot)
    return save_maps(out_dir, dataset, maps.chunk, scores, args.grid_n, f"{what} map, min-max over the test set")


# ---- command line ----

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="an image file or a folder of images (png, jpg, jpeg, bmp, tif)")
    p.add_argument("--ckpt", required=True, help="adapter checkpoint (.pth of train_few.py / train_zero.py)")
    name = p.add_mutually_exclusive_group(required=True)
    name.add_argument("--obj", help="dataset the images resemble: Brain, Liver, Retina_RESC, Retina_OCT2017, Chest, "
                                    "Histopathology (its prompt name is used)")
    name.add_argument("--prompt_name", help="free-text object name for the prompts, e.g. 'knee MRI'")
    p.add_argument("--head", default="auto", choices=["auto", "seg", "det"],
                   help="adapters the maps come from; auto: det for image-only datasets, else seg")
    p.add_argument("--support", default=None, metavar="DIR", help="folder of normal images: few-shot scoring")
    p.add_argument("--calibrate", default=None, metavar="DIR",
                   help="folder of normal images: threshold at the (1 - fpr) quantile of their scores, and a "
                        "normal/abnormal decision per input (use at least 1/fpr images)")
    p.add_argument("--fpr", type=float, default=0.05, help="false-positive rate for --calibrate")
    p.add_argument("--out", default="./predictions/", help="folder for scores.csv and the heat-map PNGs")
    p.add_argument("--save_npy", action="store_true",
                   help="also write each heat map at the input's own size as float32 .npy, values as drawn")
    common = argparse.ArgumentParser(add_help=False)
    add_common_args(common, obj="Brain")
    for action in common._actions:  # argparse has no public way to take a subset of another parser's flags
        if action.dest in MODEL_FLAGS:
            p._add_action(action)
    return p


def support_memory(model, paths: list[Path], args, device: torch.device) -> tuple:
    """Memory banks of the augmented support images (11 views each), as test_few.py builds them."""
    images = torch.stack([ImageFiles(paths, args.img_size, args.clip_normalize)[i][0] for i in range(len(paths))])
    return build_memory(model, augment(images)[0], device, args.precision, args.batch_size)


def map_at_input_size(heat: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[S, S] map of the model's square input -> [height, width] over the original image (bilinear, corners kept)."""
    return F.interpolate(heat[None, None].float(), size=(height, width), mode="bilinear", align_corners=True)[0, 0]


def write_outputs(out: Path, inputs: list[Path], offset: int, scores: np.ndarray, maps_fn, threshold: float | None,
                  caption: str, save_npy: bool = False) -> list[dict]:
    """scores.csv and one overlay per input, drawn at the input's own size; pool entries offset.. are the inputs."""
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
        heat = map_at_input_size(maps_fn(offset + j, offset + j + 1)[0], *image.shape[:2])  # [H, W]
        overlay(image.transpose(2, 0, 1), heat, None, score, title, out / f"{j:05d}_{path.stem}.png", caption)
        if save_npy:
            np.save(out / f"{j:05d}_{path.stem}.npy", heat.numpy())
        rows.append(row)
    with open(out / "scores.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return rows


def run(args) -> list[dict]:
    if not 0 < args.fpr < 1:
        raise ValueError(f"--fpr must lie strictly between 0 and 1, got {args.fpr}")
    obj = check_obj(args.obj) if args.obj else None
    inputs = list_inputs(args.input, "--input")
    normals = list_inputs(args.calibrate, "--calibrate") if args.calibrate else []
    support = list_inputs(args.support, "--support") if args.support else []
    device = resolve_device(args.device)
    model = build_model(args, device)
    model.load_adapters(args.ckpt)
    name = obj or args.prompt_name
    text = text_features_for(model.clipmodel, [name], device, args.precision)[name]
    memory = support_memory(model, support, args, device) if support else None
    pool = ImageFiles(normals + inputs, args.img_size, args.clip_normalize)
    c = collect_maps(model, pool, text, device, pick_head(obj, args.head), memory, args.precision, args.batch_size)
    scores, maps_fn = pool_scores(c, memory is not None, device, args.precision)
    threshold = float(np.quantile(scores[:len(normals)], 1 - args.fpr)) if normals else None
    if normals and len(normals) < 1 / args.fpr:
        print(f"note: {len(normals)} calibration images are too few for --fpr {args.fpr}: the threshold is close to "
              f"their highest score")
    caption = ("raw map scaled to this image's range" if len(pool) == 1 else
               f"{'fused ' if memory else ''}map, min-max over the {len(pool)} images of this run")
    rows = write_outputs(Path(args.out), inputs, len(normals), scores, maps_fn, threshold, caption, args.save_npy)
    for row in rows:
        print(f"{row['score']:.4f} {row.get('decision', '')} {row['file']}")
    if threshold is not None:
        print(f"threshold {threshold:.4f} at the {1 - args.fpr:.0%} quantile of {len(normals)} normal images")
    print(f"scores and maps written to {args.out}")
    return rows


def main(argv=None) -> int:
    return run_main(run, parser(), argv)


if __name__ == "__main__":
    main()
