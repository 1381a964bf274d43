"""Anomaly maps: drawing (matplotlib, no pyplot state, no display) one overlay per image and the paper's
grid, the maps of a test set from its collected scores, and the test scripts' `--save_maps` loop that writes
both."""

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from dataset import load_input, load_mask

from .evaluation import Collected, PixelMaps
from .metrics import to_numpy
from .precision import Precision

CMAP, ALPHA, OUTLINE = "jet", 0.5, "magenta"  # magenta: absent from jet and from grey-level scans
LABELS = {0: "normal", 1: "abnormal"}


class Row(NamedTuple):
    """One image of a grid: image [3, H, W], mask [H, W] or None (image-only), heat [H, W] in [0, 1] or
    None."""

    image: np.ndarray | torch.Tensor
    mask: np.ndarray | torch.Tensor | None
    heat: np.ndarray | torch.Tensor | None
    score: float
    title: str


def _arrays(image, heat, mask) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """image [3, H, W] (or [1, H, W]) float in [0, 1] or uint8 -> [H, W, 3] float in [0, 1] for imshow;
    heat and mask ([1, H, W] too) -> float [H, W] or None. Maps are drawn pixel on pixel: their size must be
    the image's."""
    a = to_numpy(image)
    a = a.astype(np.float32) / 255 if a.dtype == np.uint8 else a.astype(np.float32)
    if a.ndim != 3 or a.shape[0] not in (1, 3):
        raise ValueError(f"image of shape {a.shape}: [3, H, W] or [1, H, W] expected")
    img = np.clip(np.repeat(a, 3, 0) if a.shape[0] == 1 else a, 0, 1).transpose(1, 2, 0)  # [H, W, 3]
    maps = [None if m is None else to_numpy(m) for m in (heat, mask)]
    # [1, H, W] masks too
    maps = [None if m is None else m.reshape(m.shape[-2:]).astype(np.float32) for m in maps]
    for m in maps:
        if m is not None and m.shape != img.shape[:2]:
            raise ValueError(
                f"map or mask of size {m.shape} over an image of size {img.shape[:2]}: resize one of them"
            )
    return img, *maps


def _outline(ax, mask: np.ndarray | None) -> None:
    """The ground-truth region's contour (nothing for an empty or absent mask)."""
    if mask is not None and mask.max() > 0.5:
        ax.contour(mask > 0.5, levels=[0.5], colors=OUTLINE, linewidths=1.2)


def _heat(ax, image: np.ndarray, heat: np.ndarray, mask: np.ndarray | None) -> None:
    """The image in grey levels under the heat map, on the fixed scale 0..1, and the ground-truth outline."""
    ax.imshow(image.mean(axis=2), cmap="gray", vmin=0, vmax=1)
    ax.imshow(np.clip(heat, 0, 1), cmap=CMAP, vmin=0, vmax=1, alpha=ALPHA)
    _outline(ax, mask)


def _colorbar(fig: Figure, ax, caption: str, length: float = 1.0) -> None:
    """The colour scale at full opacity (a translucent layer's would look washed out); `length` in axes
    heights."""
    bar = fig.colorbar(
        ScalarMappable(Normalize(0, 1), CMAP), ax=ax, fraction=0.046, pad=0.03, aspect=20 * length
    )
    bar.set_label(caption, fontsize=9)


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig).print_png(str(path))
    return path


def overlay(
    image, heat, mask, score: float, title: str, path: str | Path, caption: str = "anomaly map (0-1)"
) -> Path:
    """PNG at `path`: the image ([3, H, W] float in [0, 1] or uint8) with the outline of `mask` ([H, W] or
    None) | `heat` ([H, W] in [0, 1]; None: no such panel) over it, with a colour bar captioned `caption`;
    score in title."""
    img, heat, mask = _arrays(image, heat, mask)
    panels = 1 if heat is None else 2
    fig = Figure(figsize=(4.2 * panels + 0.6 * (panels - 1), 4.6), dpi=100, layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    axes[0].imshow(img)
    axes[0].set_title("image" + ("" if mask is None else " + ground truth"), fontsize=10)
    _outline(axes[0], mask)
    if heat is not None:
        _heat(axes[1], img, heat, mask)
        axes[1].set_title("anomaly map", fontsize=10)
        _colorbar(fig, axes[1], caption)
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(f"{title}\nimage score {score:.4f}", fontsize=11)
    return _save(fig, path)


def grid_figure(rows: Sequence[Row], path: str | Path, caption: str = "anomaly map (0-1)") -> Path:
    """PNG at `path` as the paper's figure: columns image | ground truth | anomaly map, one row per Row."""
    if not rows:
        raise ValueError("grid_figure: no rows to draw")
    fig = Figure(figsize=(8.4, 2.7 * len(rows) + 0.4), dpi=100, layout="constrained")
    axes = fig.subplots(len(rows), 3, squeeze=False)
    for r, row in enumerate(rows):
        img, heat, mask = _arrays(row.image, row.heat, row.mask)
        axes[r, 0].imshow(img)
        axes[r, 0].set_ylabel(f"{row.title}\nscore {row.score:.4f}", fontsize=8)
        if mask is None:
            axes[r, 1].text(0.5, 0.5, "no mask\n(image-only dataset)", ha="center", va="center", fontsize=9)
            axes[r, 1].set_frame_on(False)
        else:
            axes[r, 1].imshow(mask > 0.5, cmap="gray", vmin=0, vmax=1)
        if heat is None:
            axes[r, 2].text(0.5, 0.5, "no map", ha="center", va="center", fontsize=9)
        else:
            _heat(axes[r, 2], img, heat, mask)
        for ax in axes[r]:
            ax.set(xticks=[], yticks=[])
    for ax, name in zip(axes[0], ("image", "ground truth", "anomaly map")):
        ax.set_title(name, fontsize=10)
    if any(row.heat is not None for row in rows):
        _colorbar(fig, axes[:, 2], caption, min(len(rows), 2.5))
    return _save(fig, path)


def grid_selection(labels: Sequence[int], scores: Sequence[float], n: int) -> list[int]:
    """Indices for the grid: the ceil(n/2) top-scoring abnormal images (best detections), then the top-scoring
    normal ones (worst false alarms) up to n; when one class runs short the other fills in."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    abnormal = [i for i in order if labels[i] == 1]
    normal = [i for i in order if labels[i] != 1]
    take_a = min(len(abnormal), max(n - len(normal), (n + 1) // 2))
    return abnormal[:take_a] + normal[: n - take_a]


def save_maps(
    out_dir: str | Path,
    dataset,
    maps_fn: Callable[[int, int], torch.Tensor | None],
    scores: Sequence[float],
    grid_n: int = 8,
    caption: str = "anomaly map (0-1)",
    chunk: int = 16,
) -> list[Path]:
    """Per test image one overlay PNG, plus grid.png; returns the paths written (grid last). dataset: has
    `.items` (path, label, mask path or None), `.img_size`, `.has_masks`; maps_fn(start, stop) -> the maps
    [n, H, W] in [0, 1] of images start..stop-1 (None: score only). Images are re-read without
    normalisation."""
    items, size = dataset.items, dataset.img_size
    if len(scores) != len(items):
        raise ValueError(f"save_maps: {len(scores)} scores for {len(items)} test images")
    if grid_n < 1:
        raise ValueError(f"grid_n must be at least 1, got {grid_n}")
    out_dir = Path(out_dir)
    chosen = grid_selection([label for _, label, _ in items], scores, grid_n)
    rows, written = {}, []
    for start in range(0, len(items), chunk):
        maps = maps_fn(start, min(start + chunk, len(items)))
        for k, (path, label, mask_path) in enumerate(items[start : start + chunk]):
            i = start + k
            image = load_input(path, size)
            mask = (
                load_mask(mask_path, size)[0]
                if mask_path
                else (np.zeros((size, size)) if dataset.has_masks else None)
            )
            heat = None if maps is None else maps[k]
            word = LABELS.get(label, str(label))
            title = f"#{i} {Path(path).name} ({word})"
            name = f"{i:05d}_{word}_{Path(path).stem}.png"
            written.append(overlay(image, heat, mask, scores[i], title, out_dir / name, caption))
            if i in chosen:
                rows[i] = Row(image, mask, heat, scores[i], title)
    written.append(grid_figure([rows[i] for i in chosen], out_dir / "grid.png", caption))
    return written


def save_test_maps(
    out_dir: str | Path,
    dataset,
    c: Collected,
    scores,
    device: torch.device,
    precision: Precision,
    grid_n: int = 8,
) -> list[Path]:
    """--save_maps of the test scripts: per test image the normalised map of the collected material (the
    pixel metrics' map where there are masks; the det head's map of image-only datasets, the spatial breakdown
    of their image scores), and the grid."""
    what = ("0.5/0.5 zero-/few-shot" if c.fewshot else "zero-shot") + ("" if c.head == "seg" else " det-head")
    maps = PixelMaps(c, device, precision)
    scale = "min-max over the test set" if c.fitted is None else "min-max fitted on normal images"
    return save_maps(out_dir, dataset, maps.chunk, scores, grid_n, f"{what} map, {scale}")
