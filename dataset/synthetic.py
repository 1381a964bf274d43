"""A small synthetic benchmark in BMAD's layout, for demos and tests when the real data is absent. Normal
images are smooth organ-like scenes (head MRI, abdominal CT, retinal OCT, chest X-ray, colour tissue);
abnormal ones add one or two random-shaped bright or dark lesions whose union is the mask. Deterministic
given the seed."""

import os
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np
from PIL import Image

from . import CLASS_NAMES, DATASETS, check_obj

STYLE = {
    "Brain": "head",
    "Liver": "abdomen",
    "Retina_RESC": "retina",
    "Retina_OCT2017": "retina",
    "Chest": "chest",
    "Histopathology": "tissue",
}
FOLDERS = (("valid", "good"), ("valid", "Ungood"), ("test", "good"), ("test", "Ungood"))


class SynthPaths(NamedTuple):
    data: str  # the --data_path holding {obj}_AD folders
    seed_root: str  # the folder holding {obj}/{k}-shot.txt support lists


def _smooth(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """[size, size] smooth noise, about [0, 1]: a cells x cells uniform grid upsampled bicubically."""
    grid = Image.fromarray(rng.random((cells, cells), dtype=np.float32))  # mode 'F'
    return np.asarray(grid.resize((size, size), Image.Resampling.BICUBIC))


def _blob(
    rng: np.random.Generator, size: int, cx: float, cy: float, rx: float, ry: float, wobble: float = 0.1
) -> np.ndarray:
    """[size, size] bool: a star-shaped region around (cx, cy) whose radius varies smoothly with the angle."""
    amps, phases = rng.uniform(-wobble, wobble, 3), rng.uniform(0, 2 * np.pi, 3)
    reach = 1 + np.abs(amps).sum()  # the largest relative radius: work inside its bounding box only
    y0, y1 = max(0, int(cy - reach * ry)), min(size, int(cy + reach * ry) + 2)
    x0, x1 = max(0, int(cx - reach * rx)), min(size, int(cx + reach * rx) + 2)
    out = np.zeros((size, size), bool)
    if y0 < y1 and x0 < x1:
        dy = (np.arange(y0, y1, dtype=np.float32)[:, None] - cy) / ry  # [h, 1]
        dx = (np.arange(x0, x1, dtype=np.float32)[None, :] - cx) / rx  # [1, w]
        theta = np.arctan2(dy, dx)  # [h, w]
        radius = 1 + sum(a * np.cos(k * theta + p) for a, p, k in zip(amps, phases, (2, 3, 5)))
        out[y0:y1, x0:x1] = np.hypot(dx, dy) < radius
    return out


def _scene(style: str, rng: np.random.Generator, s: int) -> tuple[np.ndarray, np.ndarray]:
    """(image [s,s] or [s,s,3] in about [0,1], bool region [s,s] where lesions may appear) of one normal
    scene."""
    tex, c = _smooth(rng, s, 12), s / 2 + rng.uniform(-0.03, 0.03) * s
    if style == "head":
        head, brain = (
            _blob(rng, s, c, c, 0.40 * s, 0.46 * s, 0.04),
            _blob(rng, s, c, c, 0.35 * s, 0.41 * s, 0.04),
        )
        img = 0.03 + 0.75 * (head & ~brain) + brain * (0.3 + 0.2 * tex + 0.1 * _smooth(rng, s, 24))
        return img, _blob(rng, s, c, c, 0.26 * s, 0.32 * s, 0.04)
    if style == "abdomen":
        body, liver = (
            _blob(rng, s, c, c, 0.46 * s, 0.36 * s, 0.03),
            _blob(rng, s, 0.37 * s, 0.45 * s, 0.2 * s, 0.15 * s),
        )
        spine = _blob(rng, s, c, 0.72 * s, 0.06 * s, 0.06 * s, 0.02)
        img = 0.02 + body * (0.3 + 0.08 * tex) + liver * (0.22 + 0.1 * _smooth(rng, s, 20)) + 0.5 * spine
        return img, liver
    if style == "retina":
        yy = np.mgrid[0:s, 0:s][0].astype(np.float32)
        depth = yy - s * (0.35 + 0.15 * _smooth(rng, s, 5)[:1])  # [s, s]: distance below the retinal surface
        img = (
            0.05
            + 0.7 * np.exp(-(((depth - 0.02 * s) / (0.015 * s)) ** 2))
            + 0.35 * np.exp(-(((depth - 0.14 * s) / (0.03 * s)) ** 2))
            + 0.2 * ((depth > 0) & (depth < 0.2 * s))
        )
        return img + 0.12 * rng.random((s, s)), (depth > 0.03 * s) & (depth < 0.18 * s)
    if style == "chest":
        lungs = _blob(rng, s, 0.32 * s, 0.48 * s, 0.14 * s, 0.3 * s) | _blob(
            rng, s, 0.68 * s, 0.48 * s, 0.14 * s, 0.3 * s
        )
        body, heart = (
            _blob(rng, s, c, 0.55 * s, 0.46 * s, 0.44 * s, 0.03),
            _blob(rng, s, 0.56 * s, 0.62 * s, 0.12 * s, 0.1 * s),
        )
        ribs = 0.08 * (np.sin(np.mgrid[0:s, 0:s][0] * 2 * np.pi / (0.07 * s)) > 0.5)
        img = 0.05 + body * (0.6 + 0.1 * tex) - lungs * (0.4 - ribs) + 0.15 * (heart & ~lungs)
        return img, lungs
    # 'tissue': pink stroma with purple nuclei, lesions anywhere away from the border
    nuclei = _smooth(rng, s, max(4, s // 8)) > 0.78
    img = np.array([0.93, 0.72, 0.82]) * (0.85 + 0.15 * tex)[..., None]
    img[nuclei] = np.array([0.45, 0.25, 0.6])
    region = np.zeros((s, s), bool)
    region[s // 8 : -s // 8, s // 8 : -s // 8] = True
    return img, region


def _lesions(rng: np.random.Generator, img: np.ndarray, region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Add one or two bright or dark random-shaped lesions centred in `region`; (image, bool mask)."""
    s, mask, img = region.shape[0], np.zeros(region.shape, bool), img.copy()
    for _ in range(rng.integers(1, 3)):
        cy, cx = np.argwhere(region)[rng.integers(region.sum())] if region.any() else (s / 2, s / 2)
        blob = _blob(rng, s, cx, cy, rng.uniform(0.04, 0.1) * s, rng.uniform(0.04, 0.1) * s, 0.15)
        shade = rng.choice([-1.0, 1.0]) * (0.3 + 0.15 * _smooth(rng, s, 8))  # [s, s]
        if img.ndim == 3:  # colour: towards dark purple or pale pink
            img[blob] = img[blob] * 0.6 + 0.3 + 0.6 * shade[blob][:, None]
        else:
            img[blob] = img[blob] + shade[blob]
        mask |= blob
    return img, mask


def _save(img: np.ndarray, path: str) -> None:
    """Save a float image in [0, 1] as 8-bit L or RGB (JPEG if the path says so)."""
    Image.fromarray(np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)).save(
        path, quality=95, compress_level=1
    )


def make_synthetic_bmad(
    root: str,
    n_per_split: int = 6,
    seed: int = 0,
    img_size: int = 240,
    objs: Iterable[str] = CLASS_NAMES,
    shots: Iterable[int] = (2, 4, 8, 16),
) -> SynthPaths:
    """Write `root`/data/{obj}_AD/{valid,test}/{good,Ungood}/img (+ anomaly_mask for mask datasets) and
    `root`/dataset/fewshot_seed/{obj}/{k}-shot.txt lists with tags n-i:/a-i: for i < 3, for every k in
    `shots` not above `n_per_split`."""
    data, seed_root = os.path.join(root, "data"), os.path.join(root, "dataset", "fewshot_seed")
    for obj in objs:
        folder, has_masks, _ = DATASETS[check_obj(obj)]
        ext, oi = (".jpeg" if obj == "Retina_OCT2017" else ".png"), CLASS_NAMES.index(obj)
        for fi, (split, state) in enumerate(FOLDERS):
            base = os.path.join(data, folder, split, state)
            os.makedirs(os.path.join(base, "img"), exist_ok=True)
            if has_masks and state == "Ungood":
                os.makedirs(os.path.join(base, "anomaly_mask"), exist_ok=True)
            for i in range(n_per_split):
                # per file: any subset of objs gives the same files
                rng = np.random.default_rng([seed, oi, fi, i])
                img, region = _scene(STYLE[obj], rng, img_size)
                name = f"{i:05d}{ext}"
                if state == "Ungood":
                    img, mask = _lesions(rng, img, region)
                    if has_masks:
                        _save(mask.astype(np.float32), os.path.join(base, "anomaly_mask", name))
                _save(img, os.path.join(base, "img", name))
        _write_lists(
            os.path.join(seed_root, obj),
            [f"{i:05d}{ext}" for i in range(n_per_split)],
            np.random.default_rng([seed, oi, len(FOLDERS)]),
            shots,
        )
    return SynthPaths(data=data, seed_root=seed_root)


def _write_lists(folder: str, names: list[str], rng: np.random.Generator, shots: Iterable[int]) -> None:
    """{k}-shot.txt files as the paper's lists: lines 'n-i: ...' and 'a-i: ...' for i < 3, no final
    newline."""
    os.makedirs(folder, exist_ok=True)
    for k in shots:
        if k > len(names):
            continue
        lines = [
            f"{tag}-{it}: " + " ".join(rng.permutation(names)[:k]) for it in range(3) for tag in ("n", "a")
        ]
        with open(os.path.join(folder, f"{k}-shot.txt"), "w", encoding="utf-8", newline="\n") as f:
            f.write("\n".join(lines))
