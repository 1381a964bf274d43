"""The one evaluation path of training and testing, few-shot and zero-shot (spec 6.5, 6.6, 7.5).

`collect` runs the model once over the test set and keeps per image only what the maps are made of (17x17 logits
and distances, image scores, the packed mask): ~21 KB per image at 240 px. `evaluate` turns that into the reference's metrics and more;
full-size maps are recomputed chunk by chunk whenever they are needed, so memory does not grow with the maps.
"""
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

import metrics
from dataset import dataset_name
from scoring import few_shot_distances, few_shot_map, minmax, patches, unit_rows, zero_shot_image_score, \
    zero_shot_logits, zero_shot_map
from utils import autocast, scoring_autocast, scoring_inputs

CHUNK = 16  # images per recomputed block of full-size maps


@torch.no_grad()
def build_memory(model, images: torch.Tensor, device: torch.device, precision: str = "auto", batch_size: int = 1,
                 keep_cls: bool = True) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Support images [n, 3, H, W] -> seg and det memory banks: per layer unit rows [n * (1+HW), D].

    As the reference, the bank runs without autocast (fp32) by default and keeps the CLS rows (spec Q6;
    keep_cls=False drops them). An explicit fp16 / bf16 precision applies here too.
    """
    seg_rows, det_rows = [], []
    with autocast(device, "fp32" if precision in ("auto", "amp") else precision):
        for batch in tqdm(images.split(batch_size), desc="memory bank", leave=False):
            _, seg, det = model(batch.to(device))
            seg, det = (seg, det) if keep_cls else (patches(seg), patches(det))
            seg_rows.append([t.flatten(0, 1) for t in seg])  # per layer [b * (1+HW), D] ([b * HW, D] without CLS)
            det_rows.append([t.flatten(0, 1) for t in det])
    return ([unit_rows(torch.cat(layer).float()) for layer in zip(*seg_rows)],
            [unit_rows(torch.cat(layer).float()) for layer in zip(*det_rows)])


@dataclass
class Collected:
    """Per test image: label, packed binary mask, and the low-resolution material of its scores."""
    has_masks: bool
    img_size: int
    labels: list = field(default_factory=list)
    masks: list = field(default_factory=list)  # np.packbits of the [H, W] binary mask
    zero_image: list = field(default_factory=list)  # det-head zero-shot score (float)
    few_image: list = field(default_factory=list)  # few-shot image score of image-only datasets (float)
    zero_logits: list = field(default_factory=list)  # seg-head logits [layers, HW, 2]
    few_distances: list = field(default_factory=list)  # seg-head distances to the memory [layers, HW]


@torch.no_grad()
def collect(model, loader: DataLoader, text_features: torch.Tensor, device: torch.device, *, has_masks: bool,
            memory: tuple | None = None, precision: str = "auto", img_size: int = 240, head: str = "seg",
            desc: str = "test") -> Collected:
    """One pass over the test set; memory = (seg bank, det bank) for few-shot scoring, None for zero-shot.

    head='det': the pixel-map material comes from the det head's tokens and bank (maps of image-only datasets).
    """
    out = Collected(has_masks, img_size)
    if head == "det" and memory is not None:
        memory = (memory[1], memory[1])
    text_features = scoring_inputs([text_features], precision)[0]
    for images, labels, masks in tqdm(loader, desc=desc, leave=False):
        with autocast(device, precision):
            _, seg, det = model(images.to(device))
            with scoring_autocast(device, precision):
                score_batch(out, scoring_inputs(det if head == "det" else seg, precision),
                            scoring_inputs(det, precision), text_features, memory)
        out.labels += [int(y) for y in labels]
        out.masks += [np.packbits(m.reshape(-1).numpy() > 0.5) for m in masks]
    return out


def score_batch(out: Collected, seg: list[torch.Tensor], det: list[torch.Tensor], text_features: torch.Tensor,
                memory: tuple | None) -> None:
    """Append one batch's score material to `out` (tokens per layer [B, 1+HW, D]; memory as in `collect`)."""
    if memory is not None:  # before the in-place normalisations of the zero-shot scoring (spec 6.6)
        distances = few_shot_distances(memory[0] if out.has_masks else memory[1], seg if out.has_masks else det)
    out.zero_image += zero_shot_image_score(zero_shot_logits(det, text_features)).float().cpu().tolist()
    if out.has_masks:
        out.zero_logits += list(torch.stack(zero_shot_logits(seg, text_features), 1).cpu())  # B x [L, HW, 2]
        if memory is not None:
            out.few_distances += list(torch.stack(distances, 1).cpu())  # B x [L, HW]
    elif memory is not None:
        # the mean of the upsampled 240x240 map, in numpy as the reference (spec Q33)
        out.few_image += [float(m.mean()) for m in few_shot_map(distances, out.img_size).float().cpu().numpy()]


def raw_maps(c: Collected, start: int, stop: int, device: torch.device, precision: str = "auto",
             fewshot: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Unnormalised full-size zero-shot and few-shot maps [n, H, W] of images start..stop-1 (few: None if absent)."""
    with torch.no_grad(), autocast(device, precision), scoring_autocast(device, precision):
        logits = torch.stack(c.zero_logits[start:stop]).to(device)  # [n, L, HW, 2]
        zero = zero_shot_map(list(logits.unbind(1)), c.img_size).float()  # [n, H, W]
        few = None
        if fewshot and c.few_distances:
            dist = torch.stack(c.few_distances[start:stop]).to(device)  # [n, L, HW]
            few = few_shot_map(list(dist.unbind(1)), c.img_size).float()
    return zero, few


class PixelMaps:
    """The test set's full-size pixel maps, recomputed in chunks: zero-shot, few-shot and their 0.5/0.5 fusion.

    Min-max normalisation is global over the test set (spec Q32); the extremes come from one first pass.
    """

    def __init__(self, c: Collected, device: torch.device, precision: str = "auto", fewshot: bool = True):
        self.c, self.device, self.precision = c, device, precision
        self.fewshot = fewshot
        self.extremes = self._extremes()

    def _raw(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return raw_maps(self.c, start, stop, self.device, self.precision, self.fewshot)

    def _extremes(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        lo_hi = None
        for start in range(0, len(self.c.labels), CHUNK):
            maps = [m for m in self._raw(start, start + CHUNK) if m is not None]
            now = [(m.min(), m.max()) for m in maps]
            lo_hi = now if lo_hi is None else [(torch.minimum(a, c), torch.maximum(b, d))
                                               for (a, b), (c, d) in zip(lo_hi, now)]
        return lo_hi

    def chunk(self, start: int, stop: int) -> torch.Tensor:
        """Normalised scores of images start..stop-1: [n, H, W] float32 on the CPU."""
        maps = [minmax(m, lo, hi) for m, (lo, hi) in zip(self._raw(start, stop), self.extremes) if m is not None]
        fused = maps[0] if len(maps) == 1 else 0.5 * maps[0] + 0.5 * maps[1]
        return fused.cpu()

    def masks(self, start: int, stop: int) -> np.ndarray:
        size = self.c.img_size
        return np.stack([np.unpackbits(m, count=size * size).reshape(size, size) for m in self.c.masks[start:stop]])

    def chunks(self):
        for start in range(0, len(self.c.labels), CHUNK):
            yield self.chunk(start, start + CHUNK).numpy(), self.masks(start, start + CHUNK)

    def image_max(self) -> np.ndarray:
        return np.concatenate([self.chunk(s, s + CHUNK).amax(dim=(1, 2)).numpy()
                               for s in range(0, len(self.c.labels), CHUNK)])


def evaluate(c: Collected, *, fewshot: bool, device: torch.device, precision: str = "auto",
             pixel_extras: bool = True) -> dict:
    """The reference's metrics (`auroc`, and `pixel_auroc` for datasets with masks) plus AP, F1-max and AUPRO.

    few-shot, masks: image score = max of the fused map (spec 6.6); few-shot, image-only: 0.5/0.5 of the normalised
    zero-shot and few-shot image scores; zero-shot: the det head's score, also for datasets with masks (spec Q25).
    """
    zero = torch.tensor(c.zero_image, dtype=torch.float32)
    maps = PixelMaps(c, device, precision, fewshot) if c.has_masks else None
    if fewshot and c.has_masks:
        image_scores = maps.image_max()
    elif fewshot:
        few = torch.tensor(c.few_image, dtype=torch.float32)
        image_scores = (0.5 * minmax(zero, zero.min(), zero.max()) + 0.5 * minmax(few, few.min(), few.max())).numpy()
    else:
        image_scores = minmax(zero, zero.min(), zero.max()).numpy()
    result = {f"image_{k}": v for k, v in metrics.image_metrics(c.labels, image_scores).items()}
    result["image_scores"] = image_scores.tolist()
    if c.has_masks:
        which = metrics.PIXEL_METRICS if pixel_extras else ("auroc",)
        result.update({f"pixel_{k}": v for k, v in metrics.pixel_metrics(maps.chunks, which).items()})
    return result


def save_scores(path: str | Path, c: Collected, result: dict, files: list[str], *, fewshot: bool,
                device: torch.device, precision: str = "auto") -> Path:
    """What the metrics were computed from, in test-set order, as an .npz: `files` (image paths), `labels` [N] and
    `image_scores` [N] float32; for datasets with masks also `maps` [N, H, W] float32 (the normalised anomaly maps
    the pixel metrics use) and `masks` [N, H, W] uint8."""
    arrays = {"files": np.array(files), "labels": np.array(c.labels, dtype=np.int64),
              "image_scores": np.asarray(result["image_scores"], dtype=np.float32)}
    if c.has_masks:
        chunks = list(PixelMaps(c, device, precision, fewshot).chunks())  # [(maps [n, H, W], masks [n, H, W])]
        arrays["maps"] = np.concatenate([maps for maps, _ in chunks])
        arrays["masks"] = np.concatenate([masks for _, masks in chunks]).astype(np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def result_lines(obj: str, result: dict, fewshot: bool) -> list[str]:
    """The reference's printed lines, in its order (few-shot: pAUC first; zero-shot: AUC first)."""
    obj = dataset_name(obj)
    auc = f"{obj} AUC : {round(result['image_auroc'], 4)}"
    if "pixel_auroc" not in result:
        return [auc]
    pauc = f"{obj} pAUC : {round(result['pixel_auroc'], 4)}"
    return [pauc, auc] if fewshot else [auc, pauc]


def selection_score(result: dict) -> float:
    """What the reference's checkpoint selection maximises: pixel + image AUROC (masks), else image AUROC."""
    return result["image_auroc"] + result.get("pixel_auroc", 0.0)
