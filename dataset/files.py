"""Listing the image files of a BMAD folder and pairing abnormal images with their masks by file name."""

import os

from PIL import Image

from utils import BadValue, MissingFile

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpeg", ".jpg", ".bmp", ".tif", ".tiff")


def list_images(folder: str, sort: bool = True) -> list[str]:
    """Full paths of the image files in `folder`, sorted by name, or in `os.listdir` order if `sort` is
    False."""
    if not os.path.isdir(folder):
        raise MissingFile(
            f"image folder not found: {folder}; the BMAD data must be placed as data/<obj>_AD/{{valid,test}}/"
            f"{{good,Ungood}}/img/ (masks in Ungood/anomaly_mask/); "
            f"`python -m tools.download --check` says what is missing"
        )
    # deviation: the reference takes every directory entry, so a stray non-image file crashes its loading or
    # shifts its image/mask pairing; hidden files (.DS_Store, ._x.png) and files without an image extension
    # are skipped here. The relative listdir order of the rest is kept.
    names = [n for n in os.listdir(folder) if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS)]
    if sort:
        names.sort()  # same order as the reference's sorted() of full paths: one folder, one prefix
    return [os.path.join(folder, n) for n in names]


def pair_masks(img_paths: list[str], mask_dir: str, require_all: bool = True) -> list[str]:
    """Mask path for each image: the file of the same name in `mask_dir`. A missing mask is a ValueError; so
    is, with `require_all`, a mask whose image is not in `img_paths`."""
    # deviation: the reference replaces every 'img' in the path (few-shot), which breaks when 'img' is in a
    # folder or file name, or pairs two sorted listings by position (zero-shot test), which breaks when names
    # or counts differ; pairing by name gives the same pairs on valid data and an error otherwise.
    masks = {os.path.basename(p): p for p in list_images(mask_dir)}
    paired = []
    for path in img_paths:
        name = os.path.basename(path)
        if name not in masks:
            raise BadValue(f"no mask for image {path}: expected {os.path.join(mask_dir, name)}")
        check_same_size(path, masks[name])
        paired.append(masks[name])
    if require_all:
        extra = sorted(set(masks) - {os.path.basename(p) for p in img_paths})
        if extra:
            raise BadValue(
                f"mask {masks[extra[0]]} has no image of the same name "
                f"({len(extra)} unpaired mask(s); masks are paired with images by file name)"
            )
    return paired


def check_same_size(image: str, mask: str) -> None:
    """A mask must have its image's size (read from the file headers only)."""
    try:
        with Image.open(image) as a, Image.open(mask) as b:
            sizes = a.size, b.size
    except OSError:
        return  # unreadable files get their own error when they are loaded
    if sizes[0] != sizes[1]:
        raise BadValue(
            f"mask {mask} is {sizes[1][0]}x{sizes[1][1]} but its image {image} is "
            f"{sizes[0][0]}x{sizes[0][1]}: a mask must have its image's size"
        )
