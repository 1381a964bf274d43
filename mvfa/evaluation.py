"""The one evaluation path of training and testing, few-shot and zero-shot.

`collect` runs the model once over the test set and keeps per image only what the maps are made of (17x17
logits and distances, image scores, the packed mask): ~21 KB per image at 240 px. `evaluate` turns that into
the reference's metrics and more; full-size maps are recomputed chunk by chunk whenever they are needed, so
memory does not grow with the maps.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dataset import dataset_name
from dataset.augment import VIEWS
from utils import BadValue

from . import metrics
from .config import RunConfig
from .precision import Precision
from .scoring import (
    few_shot_distances,
    few_shot_map,
    minmax,
    patches,
    unit_rows,
    zero_shot_image_score,
    zero_shot_logits,
    zero_shot_map,
)
from .seeding import draw_as_loader

CHUNK = 16  # images per recomputed block of full-size maps


@torch.no_grad()
def build_memory(
    model, images: torch.Tensor, precision: Precision, batch_size: int = 1, keep_cls: bool = True
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Support images [n, 3, H, W] -> seg and det memory banks: per layer unit rows [n * (1+HW), D].

    As the reference, the bank runs without autocast by default (`Precision.memory_bank`) and keeps the CLS
    rows, which patches are then compared with too; keep_cls=False (--memory_no_cls) drops them.
    """
    device = next(model.parameters()).device
    seg_rows, det_rows = [], []
    with precision.memory_bank().forward():
        for batch in tqdm(images.split(batch_size), desc="memory bank", leave=False):
            _, seg, det = model(batch.to(device))
            seg, det = (seg, det) if keep_cls else (patches(seg), patches(det))
            # per layer [b * (1+HW), D] ([b * HW, D] without CLS)
            seg_rows.append([t.flatten(0, 1) for t in seg])
            det_rows.append([t.flatten(0, 1) for t in det])
    seg_bank = [unit_rows(torch.cat(layer).float()) for layer in zip(*seg_rows)]
    det_bank = [unit_rows(torch.cat(layer).float()) for layer in zip(*det_rows)]
    return seg_bank, det_bank


def map_head(has_masks: bool) -> str:
    """Which adapters the anomaly maps come from: seg where masks trained them, else det (image-only datasets
    train only the det adapters; their maps show where the image score comes from)."""
    return "seg" if has_masks else "det"


class Extremes(NamedTuple):
    """(lo, hi) of each quantity that is min-max normalised, fitted on normal images (--normalize support;
    `fit_extremes`): 0-d float32 tensors, None where the protocol has no such quantity. The maps' live on the
    device of the maps, the image scores' on the CPU."""

    zero_map: tuple[torch.Tensor, torch.Tensor] | None
    few_map: tuple[torch.Tensor, torch.Tensor] | None
    zero_image: tuple[torch.Tensor, torch.Tensor] | None
    few_image: tuple[torch.Tensor, torch.Tensor] | None

    def as_record(self) -> dict[str, list[float] | None]:
        """The fitted ranges as a run record keeps them: name -> [lo, hi] (float32 values as floats)."""
        return {k: None if v is None else [float(v[0]), float(v[1])] for k, v in self._asdict().items()}


@dataclass
class Collected:
    """Per test image: label, packed mask, the det head's zero-shot score, and the low-resolution material of
    the maps of one head (`head`): its text logits and, few-shot, its distances to the memory bank. `fitted`:
    the extremes the scores are normalised with, fitted on normal images; None: the test set's own (the
    reference's)."""

    has_masks: bool
    img_size: int
    head: str
    labels: list = field(default_factory=list)
    masks: list = field(default_factory=list)  # np.packbits of the [H, W] binary mask
    zero_image: list = field(default_factory=list)  # det-head zero-shot score (float)
    logits: list = field(default_factory=list)  # [layers, HW, 2]
    distances: list = field(default_factory=list)  # [layers, HW]; empty without a memory bank
    fitted: Extremes | None = None

    @property
    def fewshot(self) -> bool:
        return bool(self.distances)

    def chunk(self, size: int) -> int:
        """Images per block of full-size maps: `size`, but one with fitted extremes, so that no neighbour in
        a block can change the bits of an image's scores (they must stand alone)."""
        return 1 if self.fitted is not None else size


@torch.no_grad()
def collect(
    model,
    loader: DataLoader,
    text_features: torch.Tensor,
    precision: Precision,
    *,
    has_masks: bool,
    memory: tuple | None = None,
    head: str | None = None,
    desc: str = "test",
) -> Collected:
    """One pass over a test set; memory = (seg bank, det bank) of build_memory for few-shot, None for
    zero-shot. `head`: whose maps are kept (default `map_head(has_masks)`)."""
    device = next(model.parameters()).device
    head = head or map_head(has_masks)
    out = Collected(has_masks, loader.dataset.img_size, head)
    bank = None if memory is None else memory[0 if head == "seg" else 1]
    text_features = precision.scored([text_features])[0]
    for images, labels, masks in tqdm(loader, desc=desc, leave=False):
        with precision.forward():
            _, seg, det = model(images.to(device))
            with precision.scoring():
                seg, det = precision.scored(seg), precision.scored(det)
                tokens = seg if head == "seg" else det
                # before the in-place normalisations of the zero-shot scoring, as the reference
                if bank is not None:
                    distances = few_shot_distances(bank, tokens)
                det_logits = zero_shot_logits(det, text_features)
                zero = zero_shot_image_score(det_logits)
                logits = det_logits if head == "det" else zero_shot_logits(seg, text_features)
        out.zero_image += zero.float().cpu().tolist()
        out.logits += list(torch.stack(logits, 1).cpu())  # B x [L, HW, 2]
        if bank is not None:
            out.distances += list(torch.stack(distances, 1).cpu())  # B x [L, HW]
        out.labels += [int(y) for y in labels]
        out.masks += [np.packbits(m.reshape(-1).numpy() > 0.5) for m in masks]
    return out


def few_shot_maps(
    c: Collected, start: int, stop: int, device: torch.device, precision: Precision
) -> torch.Tensor:
    """Unnormalised full-size few-shot maps [n, H, W] of images start..stop-1."""
    with torch.no_grad(), precision.maps():
        distances = torch.stack(c.distances[start:stop]).to(device)  # [n, L, HW]
        return few_shot_map(list(distances.unbind(1)), c.img_size).float()  # [n, H, W]


def raw_maps(
    c: Collected, start: int, stop: int, device: torch.device, precision: Precision
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Unnormalised full-size zero-shot and few-shot maps [n, H, W] of images start..stop-1 (few: None if
    absent)."""
    with torch.no_grad(), precision.maps():
        logits = torch.stack(c.logits[start:stop]).to(device)  # [n, L, HW, 2]
        zero = zero_shot_map(list(logits.unbind(1)), c.img_size).float()  # [n, H, W]
    few = few_shot_maps(c, start, stop, device, precision) if c.fewshot else None
    return zero, few


class PixelMaps:
    """The test set's full-size maps, recomputed in chunks: zero-shot, few-shot and their 0.5/0.5 fusion.

    Min-max normalisation is global over the test set, as the reference's; the extremes come from one first
    pass. With `c.fitted`, the extremes fitted on normal images instead, each image's maps on their own.
    """

    def __init__(self, c: Collected, device: torch.device, precision: Precision, chunk: int = CHUNK):
        self.c, self.device, self.precision, self.size = c, device, precision, c.chunk(chunk)
        fitted = c.fitted
        self.extremes = (
            self._extremes()
            if fitted is None
            else [e for e in (fitted.zero_map, fitted.few_map) if e is not None]
        )

    def _raw(self, start: int, stop: int) -> list[torch.Tensor]:
        return [m for m in raw_maps(self.c, start, stop, self.device, self.precision) if m is not None]

    def _extremes(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        lo_hi = None
        for start in range(0, len(self.c.labels), self.size):
            now = [(m.min(), m.max()) for m in self._raw(start, start + self.size)]
            if lo_hi is None:
                lo_hi = now
            else:
                lo_hi = [(torch.minimum(a, c), torch.maximum(b, d)) for (a, b), (c, d) in zip(lo_hi, now)]
        return lo_hi

    def chunk(self, start: int, stop: int) -> torch.Tensor:
        """Normalised scores of images start..stop-1: [n, H, W] float32 on the CPU."""
        maps = [minmax(m, lo, hi) for m, (lo, hi) in zip(self._raw(start, stop), self.extremes)]
        fused = maps[0] if len(maps) == 1 else 0.5 * maps[0] + 0.5 * maps[1]
        return fused.cpu()

    def masks(self, start: int, stop: int) -> np.ndarray:
        size = self.c.img_size
        return np.stack(
            [np.unpackbits(m, count=size * size).reshape(size, size) for m in self.c.masks[start:stop]]
        )

    def chunks(self):
        for start in range(0, len(self.c.labels), self.size):
            yield self.chunk(start, start + self.size).numpy(), self.masks(start, start + self.size)

    def image_max(self) -> np.ndarray:
        """Each image's highest normalised score [N]."""
        starts = range(0, len(self.c.labels), self.size)
        return np.concatenate([self.chunk(s, s + self.size).amax(dim=(1, 2)).numpy() for s in starts])


def few_shot_image_means(
    c: Collected, device: torch.device, precision: Precision, chunk: int = CHUNK
) -> np.ndarray:
    """Each image's mean few-shot map [N] (before normalisation), in numpy float32 as the reference takes
    it."""
    means, chunk = [], c.chunk(chunk)
    for start in range(0, len(c.labels), chunk):
        few = few_shot_maps(c, start, start + chunk, device, precision).cpu().numpy()  # [n, H, W]
        means += [float(m.mean()) for m in few]
    return np.array(means)


def normalized(a: torch.Tensor, fitted: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """Min-max of `a` [N] with the fitted (lo, hi), else over `a` itself (the reference's)."""
    lo, hi = fitted if fitted is not None else (a.min(), a.max())
    return minmax(a, lo, hi)


def image_scores_of(
    c: Collected,
    device: torch.device,
    precision: Precision,
    maps: PixelMaps | None = None,
    chunk: int = CHUNK,
) -> np.ndarray:
    """Image scores [N] by MVFA's rule for the head: few-shot with masks (seg head), the max of the fused map
    (`maps`, made if not given); few-shot, image-only (det head), 0.5/0.5 of the normalised zero-shot and
    few-shot image scores; zero-shot, the normalised det-head score."""
    fitted = c.fitted or Extremes(None, None, None, None)
    if c.fewshot and c.has_masks:
        return (maps or PixelMaps(c, device, precision, chunk)).image_max()
    zero = torch.tensor(c.zero_image, dtype=torch.float32)
    if c.fewshot:
        few = torch.tensor(few_shot_image_means(c, device, precision, chunk), dtype=torch.float32)
        return (0.5 * normalized(zero, fitted.zero_image) + 0.5 * normalized(few, fitted.few_image)).numpy()
    return normalized(zero, fitted.zero_image).numpy()


def evaluate(
    c: Collected, device: torch.device, precision: Precision, pixel_extras: bool = True, chunk: int = CHUNK
) -> dict:
    """The reference's metrics (`image_auroc`, and `pixel_auroc` for datasets with masks) plus AP, F1-max and
    AUPRO (`pixel_extras`), and the image scores.

    Few-shot with masks: image score = max of the fused map; few-shot, image-only: 0.5/0.5 of the normalised
    zero-shot and few-shot image scores; zero-shot: the det head's score, for datasets with masks too (as the
    reference, whose seg-head image score goes unused). `chunk`: images per block of full-size maps (memory
    only: the results do not depend on it).
    """
    maps = PixelMaps(c, device, precision, chunk) if c.has_masks else None
    image_scores = image_scores_of(c, device, precision, maps, chunk)
    result = {f"image_{k}": v for k, v in metrics.image_metrics(c.labels, image_scores).items()}
    result["image_scores"] = image_scores.tolist()
    if c.has_masks:
        which = metrics.PIXEL_METRICS if pixel_extras else ("auroc",)
        result.update({f"pixel_{k}": v for k, v in metrics.pixel_metrics(maps.chunks, which).items()})
    return result


def save_scores(
    path: str | Path,
    c: Collected,
    result: dict,
    files: list[str],
    device: torch.device,
    precision: Precision,
    chunk: int = CHUNK,
) -> Path:
    """What the metrics were computed from, in test-set order, as an .npz: `files` (image paths), `labels`
    [N] and `image_scores` [N] float32; for datasets with masks also `maps` [N, H, W] float32 (the normalised
    anomaly maps the pixel metrics use) and `masks` [N, H, W] uint8."""
    arrays = {
        "files": np.array(files),
        "labels": np.array(c.labels, dtype=np.int64),
        "image_scores": np.asarray(result["image_scores"], dtype=np.float32),
    }
    if c.has_masks:
        chunks = list(PixelMaps(c, device, precision, chunk).chunks())  # [(maps [n, H, W], masks [n, H, W])]
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


class Normals(NamedTuple):
    """The normal images a standalone normalisation is fitted on: the k normal support images [k, 3, H, W]
    (few-shot, k >= 2; each scored against the memory bank without its own views) and a dataset of other
    normal images (scored against the whole bank), either may be None."""

    support: torch.Tensor | None
    calibration: Dataset | None


class LoadedImages(Dataset):
    """Images [n, 3, S, S] already loaded, as normal test items (image [3, S, S], 0, zeros [1, S, S])."""

    def __init__(self, images: torch.Tensor):
        self.images, self.img_size = images, images.shape[-1]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        return self.images[i], 0, torch.zeros(1, self.img_size, self.img_size)


def without_image(memory: tuple, image: int, shot: int) -> tuple[list, list]:
    """The seg and det memory banks of `shot` support images without image `image`'s views: build_memory's
    rows are the tokens of the VIEWS * shot augmented images in turn, and `augment` puts the views of image
    i at i, k + i, ..."""

    def others(bank: torch.Tensor) -> torch.Tensor:
        views = bank.view(VIEWS * shot, -1, bank.shape[-1])  # [VIEWS * k, T, D]: T rows per augmented image
        keep = (torch.arange(VIEWS * shot) % shot != image).to(bank.device)
        return views[keep].flatten(0, 1)  # [VIEWS * (k-1) * T, D]

    return [others(b) for b in memory[0]], [others(b) for b in memory[1]]


def merged(parts: list[Collected]) -> Collected:
    """The collected material of several passes, in turn, as one."""
    out = Collected(parts[0].has_masks, parts[0].img_size, parts[0].head)
    for part in parts:
        for name in ("labels", "masks", "zero_image", "logits", "distances"):
            getattr(out, name).extend(getattr(part, name))
    return out


def extremes_of(c: Collected, device: torch.device, precision: Precision) -> Extremes:
    """The (lo, hi) of each quantity over the images of `c`, each image's maps on their own; an empty range
    (all images giving one value) is an error."""
    maps = PixelMaps(c, device, precision, chunk=1).extremes  # [zero] or [zero, few]
    zero = torch.tensor(c.zero_image, dtype=torch.float32)
    images = [(zero.min(), zero.max())]
    if c.fewshot:
        few = torch.tensor(few_shot_image_means(c, device, precision, chunk=1), dtype=torch.float32)
        images.append((few.min(), few.max()))
    fitted = Extremes(maps[0], maps[1] if c.fewshot else None, images[0], images[1] if c.fewshot else None)
    for name, value in fitted._asdict().items():
        if value is not None and not value[1] > value[0]:
            raise BadValue(
                f"standalone scores: the {len(c.labels)} normal images give one value of {name} "
                f"({float(value[0])}), no range to normalise with; give more or other normal images",
                flag="normalize",
            )
    return fitted


def fit_extremes(
    model,
    text: torch.Tensor,
    precision: Precision,
    normals: Normals,
    has_masks: bool,
    memory: tuple | None = None,
    head: str | None = None,
) -> Extremes:
    """The extremes of scores that stand alone, fitted on normal images only: each normal support image
    (`normals.support`, k >= 2) against the memory bank without its own VIEWS views (leave one out), and
    the images of `normals.calibration` against the whole bank; one image per forward. `memory`:
    build_memory's banks of the augmented support images (None: zero-shot)."""
    parts = []
    # a support image against a bank holding its own views would find itself: it leaves them out
    if normals.support is not None and memory is not None and len(normals.support) >= 2:
        k = len(normals.support)
        for i in range(k):
            loader = DataLoader(LoadedImages(normals.support[i : i + 1]), batch_size=1)
            bank = without_image(memory, i, k)
            parts.append(collect(model, loader, text, precision, has_masks=has_masks, memory=bank, head=head))
    if normals.calibration is not None:
        loader = DataLoader(normals.calibration, batch_size=1, shuffle=False)
        parts.append(collect(model, loader, text, precision, has_masks=has_masks, memory=memory, head=head))
    if not parts:
        raise BadValue(
            "standalone scores: no normal images to fit on (leave-one-out needs 2 or more normal support "
            "images); give 2 or more support images, or other normal images to fit on",
            flag="normalize",
        )
    return extremes_of(merged(parts), next(model.parameters()).device, precision)


def collect_standalone(
    model,
    dataset,
    text: torch.Tensor,
    precision: Precision,
    normals: Normals,
    has_masks: bool,
    memory: tuple | None = None,
    num_workers: int = 0,
    head: str | None = None,
) -> Collected:
    """`collect` for scores that stand alone: the extremes fitted on `normals` (`fit_extremes`) as
    `fitted`, and one image per forward, so that no batch neighbour can change an image's bits."""
    fitted = fit_extremes(model, text, precision, normals, has_masks, memory, head)
    loader = DataLoader(dataset, batch_size=1, shuffle=False, num_workers=num_workers)
    c = collect(model, loader, text, precision, has_masks=has_masks, memory=memory, head=head)
    c.fitted = fitted
    return c


def evaluate_set(
    model,
    dataset,
    text: torch.Tensor,
    run: RunConfig,
    precision: Precision,
    memory_images: torch.Tensor | None = None,
    pixel_extras: bool = True,
    normals: Normals | None = None,
) -> tuple[dict, Collected]:
    """One scored pass over `dataset`: zero-shot, or few-shot with the memory bank of `memory_images` (the
    augmented normal support images [11k, 3, H, W]). With `normals`, scores that stand alone: normalised with
    the extremes fitted on them (recorded as `fitted_extremes`), one test image per forward. Returns the
    metrics and what they were computed from."""
    memory = None
    if memory_images is not None:
        draw_as_loader(shuffle=True)  # the reference reads the support images through a shuffling loader
        keep_cls = not run.memory_no_cls
        memory = build_memory(model, memory_images, precision, run.batch_size, keep_cls)
    if normals is None:
        loader = DataLoader(dataset, batch_size=run.batch_size, shuffle=False, num_workers=run.num_workers)
        collected = collect(model, loader, text, precision, has_masks=dataset.has_masks, memory=memory)
    else:
        collected = collect_standalone(
            model, dataset, text, precision, normals, dataset.has_masks, memory, run.num_workers
        )
    device = next(model.parameters()).device
    result = evaluate(collected, device, precision, pixel_extras)
    if collected.fitted is not None:
        result["fitted_extremes"] = collected.fitted.as_record()
    return result, collected
