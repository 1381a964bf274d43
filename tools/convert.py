"""One's own images into BMAD's layout: a folder of normal images, a folder of abnormal ones and, optionally,
a folder of masks matched by file name, split at random (seeded) into valid and test.

    python -m tools.convert --normal scans/normal --abnormal scans/lesion --masks scans/masks --out data/knee
    python -m tools.convert --normal xr/ok --abnormal xr/bad --out data/wrist --valid 0.2 --seed 1

Writes OUT/{valid,test}/{good,Ungood}/img/ (and Ungood/anomaly_mask/ with masks); refuses an OUT that exists,
masks that match no abnormal image and abnormal images without a mask (--allow_unmatched leaves those out).
"""

import argparse
import os
import random
import shutil
import sys
from pathlib import Path

from dataset.files import check_same_size, list_images
from utils import BadValue, FileInTheWay, InputError


def split(paths: list[str], valid: float, rng: random.Random) -> tuple[list[str], list[str]]:
    """(valid, test): a seeded shuffle of the sorted paths, the first `valid` fraction (at least one) to
    valid."""
    paths = sorted(paths)
    rng.shuffle(paths)
    n = max(1, round(valid * len(paths)))
    if n >= len(paths):
        raise BadValue(
            f"--valid {valid}: {len(paths)} images leave none for the test split; give more images or "
            f"a smaller --valid"
        )
    return paths[:n], paths[n:]


def match_masks(images: list[str], mask_dir: str, allow_unmatched: bool = False) -> dict[str, str]:
    """image -> its mask (same file name, same size). Masks that match no image and images without a mask are
    a ValueError naming every one of them, unless `allow_unmatched`: then they are left out, and said so."""
    masks = {os.path.basename(p): p for p in list_images(mask_dir)}
    names = {os.path.basename(p) for p in images}
    bare, orphans = sorted(names - set(masks)), sorted(set(masks) - names)
    problems = []
    if bare:
        problems.append(f"no mask for image{'s' if len(bare) > 1 else ''} {', '.join(bare)} of --abnormal")
    if orphans:
        problems.append(
            f"{len(orphans)} mask(s) of --masks {mask_dir} match no image of --abnormal: {', '.join(orphans)}"
        )
    if problems and not allow_unmatched:
        raise BadValue(
            f"{'; '.join(problems)} (masks pair with images by file name); rename them, or pass "
            f"--allow_unmatched to leave these images and masks out"
        )
    if problems:
        print(f"--allow_unmatched: left out: {'; '.join(problems)}", file=sys.stderr)
    paired = {p: masks[os.path.basename(p)] for p in images if os.path.basename(p) in masks}
    for image, mask in paired.items():
        check_same_size(image, mask)
    return paired


def convert(
    normal: str,
    abnormal: str,
    out: str,
    masks: str | None = None,
    valid: float = 0.2,
    seed: int = 0,
    allow_unmatched: bool = False,
) -> Path:
    """Copy the images (and masks) into `out` in BMAD's layout; returns `out`."""
    out_dir = Path(out)
    if out_dir.exists():
        raise FileInTheWay(f"--out {out_dir} exists already: choose a new folder (nothing is overwritten)")
    if not 0 < valid < 1:
        raise BadValue(f"--valid must lie strictly between 0 and 1, got {valid}")
    good, bad = list_images(normal), list_images(abnormal)
    for flag, paths, folder in (("--normal", good, normal), ("--abnormal", bad, abnormal)):
        if not paths:
            raise BadValue(f"{flag} {folder}: no image files in this folder")
    mask_of = match_masks(bad, masks, allow_unmatched) if masks else {}
    if masks:  # an abnormal image without its mask would leave the dataset's masks incomplete
        bad = [path for path in bad if path in mask_of]
        if not bad:
            raise BadValue(f"--masks {masks}: no abnormal image of --abnormal {abnormal} has a mask there")
    rng = random.Random(seed)
    plan = [
        (state, part, path)
        for state, paths in (("good", good), ("Ungood", bad))  # all checks before a copy
        for part, chosen in zip(("valid", "test"), split(paths, valid, rng))
        for path in chosen
    ]
    for state, part, path in plan:
        target = out_dir / part / state / "img" / os.path.basename(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
        if path in mask_of:  # paired by name and checked for size above
            (target.parent.parent / "anomaly_mask").mkdir(exist_ok=True)
            shutil.copy2(mask_of[path], target.parent.parent / "anomaly_mask" / target.name)
    return out_dir


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--normal", required=True, help="folder of normal images")
    p.add_argument("--abnormal", required=True, help="folder of abnormal images")
    p.add_argument(
        "--masks", default=None, help="folder of masks of the abnormal images, named as their images"
    )
    p.add_argument("--out", required=True, help="the new dataset folder, e.g. data/knee (must not exist)")
    p.add_argument("--valid", type=float, default=0.2, help="fraction of each class put in the valid split")
    p.add_argument("--seed", type=int, default=0, help="seed of the split")
    p.add_argument(
        "--allow_unmatched",
        action="store_true",
        help="go on when masks match no abnormal image or abnormal images have no mask, leaving "
        "those out (by default they are listed and nothing is written)",
    )
    args = p.parse_args(argv)
    try:
        out = convert(
            args.normal, args.abnormal, args.out, args.masks, args.valid, args.seed, args.allow_unmatched
        )
    except InputError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"written {out}: use --obj {out} (or --data_path {out.parent} --obj {out.name}) with --prompt_name")
    return 0


if __name__ == "__main__":
    sys.exit(main())
