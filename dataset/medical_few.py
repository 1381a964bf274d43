"""Few-shot data of one BMAD dataset: the test list (sorted normal, then sorted abnormal) and the k-shot
support set, read from `fewshot_seed/{obj}/{k}-shot.txt` (iterate >= 0) or drawn at random (iterate < 0)."""

import os
import random
from types import ModuleType
from typing import NamedTuple

import torch
from torch.utils.data import Dataset

from utils import BadValue, MissingFile

from . import dataset_name, dataset_root, has_masks, list_images, load_input, load_mask, pair_masks

# deviation: the reference opens ./dataset/fewshot_seed relative to the working directory, so it fails when
# started elsewhere; this is the folder next to this package, whatever the working directory.
DEFAULT_SEED_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fewshot_seed")
SUPPORT_EXTENSIONS = (".png", ".jpeg")  # the reference's filter on listed names (case-sensitive)
LISTS_HINT = (
    "the paper's lists are published in the authors' repository (MediaBrain-SJTU/MVFA-AD, folder "
    "dataset/fewshot_seed/): run `python -m tools.download support_lists`, or draw a support set at random "
    "instead (iterate -1, with a seed)"
)


def list_test_items(
    data_path: str, obj: str, split: str = "test", sort: bool = True
) -> list[tuple[str, int, str | None]]:
    """(image path, label, mask path or None) of a split: normal (0), then abnormal (1), each sorted by name
    or, with sort=False, in os.listdir order, as the reference lists folders where it draws or shuffles (its
    results then depend on the file system's order)."""
    root = dataset_root(data_path, obj)
    normal = list_images(os.path.join(root, split, "good", "img"), sort)
    abnormal = list_images(os.path.join(root, split, "Ungood", "img"), sort)
    masks = (
        pair_masks(abnormal, os.path.join(root, split, "Ungood", "anomaly_mask"))
        if has_masks(data_path, obj)
        else [None] * len(abnormal)
    )
    return [(p, 0, None) for p in normal] + [(p, 1, m) for p, m in zip(abnormal, masks)]


class ImageItems(Dataset):
    """Items (image path, label, mask path or None); item i = (image [3,H,W], label int, mask [1,H,W]; zeros
    if none). Images of any depth (8-bit as the reference loads them, 16-bit, float)."""

    def __init__(
        self,
        items: list[tuple[str, int, str | None]],
        img_size: int = 240,
        normalize: bool = False,
        has_masks: bool = False,
    ):
        self.items, self.img_size, self.normalize, self.has_masks = items, img_size, normalize, has_masks

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        path, label, mask = self.items[i]
        size = self.img_size
        img = load_input(path, size, self.normalize)
        return img, label, torch.zeros(1, size, size) if mask is None else load_mask(mask, size)


class MedTestDataset(ImageItems):
    """A split of `obj` (the test split by default): sorted normal images, then sorted abnormal ones."""

    def __init__(
        self, data_path: str, obj: str, img_size: int = 240, normalize: bool = False, split: str = "test"
    ):
        self.obj = obj
        super().__init__(
            list_test_items(data_path, obj, split), img_size, normalize, has_masks(data_path, obj)
        )


class Support(NamedTuple):
    """The k-shot support set; file names in tensor order."""

    normal: torch.Tensor  # [k, 3, H, W]
    abnormal: torch.Tensor  # [k, 3, H, W]; [0, 3, H, W] for a normal-only support
    abnormal_masks: torch.Tensor | None  # [k, 1, H, W]; None for image-only datasets and normal-only
    normal_files: list[str]
    abnormal_files: list[str]


def _tagged_names(lines: list[str], tag: str, shot: int, path: str) -> list[str]:
    """First `shot` .png/.jpeg names of the first line starting with `tag` (e.g. 'n-0:')."""
    tokens = next((t for t in map(str.split, lines) if t[:1] == [tag]), None)
    if tokens is None:
        raise BadValue(f"support list {path} has no line {tag!r}; {LISTS_HINT}", flag="iterate")
    names = [t for t in tokens[1:] if t.endswith(SUPPORT_EXTENSIONS)]
    if len(names) < shot:
        raise BadValue(
            f"support list {path} has {len(names)} image names after {tag!r}, fewer than a {shot}-shot "
            f"support set needs; {LISTS_HINT}",
            flag="shot",
        )
    return names[:shot]


def read_support_list(
    obj: str, shot: int, iterate: int, seed_root: str | None = None, normal_only: bool = False
) -> tuple[list[str], list[str]]:
    """(normal names, abnormal names) of iteration `iterate` in `{seed_root}/{obj}/{shot}-shot.txt`, or in
    the file `seed_root` itself (a list of one's own); normal_only: the `n-` line only (abnormal: [])."""
    path = (
        seed_root
        if seed_root and os.path.isfile(seed_root)
        else os.path.join(seed_root or DEFAULT_SEED_ROOT, dataset_name(obj), f"{shot}-shot.txt")
    )
    if not os.path.isfile(path):
        raise MissingFile(f"support list not found: {path}; {LISTS_HINT}", flag="seed_dir")
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    normal = _tagged_names(lines, f"n-{iterate}:", shot, path)
    return normal, [] if normal_only else _tagged_names(lines, f"a-{iterate}:", shot, path)


def draw_names(
    pool_dir: str, shot: int, rng: random.Random | ModuleType, sort_listing: bool = False
) -> list[str]:
    """`rng.sample` (a Random or the `random` module) of `shot` names of `pool_dir`, in os.listdir order:
    the reference samples from the unsorted listing, so its draw depends on the file system, not only on the
    seed."""
    # opt-in --sort_listing: sorted first, independent of the file system
    paths = list_images(pool_dir, sort=sort_listing)
    if len(paths) < shot:
        raise BadValue(
            f"{pool_dir} holds {len(paths)} images, fewer than a {shot}-shot support set needs", flag="shot"
        )
    return [os.path.basename(p) for p in rng.sample(paths, shot)]


def load_support(
    data_path: str,
    obj: str,
    img_size: int = 240,
    shot: int = 4,
    iterate: int = 0,
    seed: int | None = None,
    seed_root: str | None = None,
    sort_listing: bool = False,
    normalize: bool = False,
    normal_only: bool = False,
) -> Support:
    """Support set from the valid split: listed (iterate >= 0) or drawn (iterate < 0; Random(seed), else
    global). normal_only: the k normal images alone, nothing under valid/Ungood listed or opened (abnormal:
    [0, 3, H, W]); a draw takes the normal names the full draw of the same seed takes."""
    if shot < 1:
        raise BadValue(f"shot must be at least 1, got {shot}", flag="shot")
    root = dataset_root(data_path, obj)
    good, bad = os.path.join(root, "valid", "good", "img"), os.path.join(root, "valid", "Ungood", "img")
    if iterate >= 0:
        normal, abnormal = read_support_list(obj, shot, iterate, seed_root, normal_only)
    else:
        rng = random.Random(seed) if seed is not None else random  # global `random` as the reference
        # normal first, then abnormal: the reference's order
        normal = draw_names(good, shot, rng, sort_listing)
        abnormal = [] if normal_only else draw_names(bad, shot, rng, sort_listing)
    normal_paths = [os.path.join(good, n) for n in normal]
    abnormal_paths = [os.path.join(bad, n) for n in abnormal]
    masks = None
    if has_masks(data_path, obj) and not normal_only:
        mask_paths = pair_masks(
            abnormal_paths, os.path.join(root, "valid", "Ungood", "anomaly_mask"), require_all=False
        )
        masks = torch.stack([load_mask(p, img_size) for p in mask_paths])  # [k, 1, H, W]
    images = torch.stack([load_input(p, img_size, normalize) for p in normal_paths])  # [k, 3, H, W]
    return Support(
        normal=images,
        # [k, 3, H, W]; normal_only: [0, 3, H, W]
        abnormal=torch.stack([load_input(p, img_size, normalize) for p in abnormal_paths])
        if abnormal_paths
        else images[:0],
        abnormal_masks=masks,
        normal_files=normal,
        abnormal_files=abnormal,
    )


class MedDataset(MedTestDataset):
    """The reference's few-shot dataset: the test split of `obj` plus `self.support` (see `load_support`;
    normal_only: the normal support images alone)."""

    def __init__(
        self,
        data_path: str,
        obj: str,
        img_size: int = 240,
        shot: int = 4,
        iterate: int = 0,
        seed: int | None = None,
        seed_root: str | None = None,
        sort_listing: bool = False,
        normalize: bool = False,
        normal_only: bool = False,
    ):
        super().__init__(data_path, obj, img_size, normalize)
        self.support = load_support(
            data_path, obj, img_size, shot, iterate, seed, seed_root, sort_listing, normalize, normal_only
        )
