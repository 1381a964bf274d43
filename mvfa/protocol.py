"""The data of each protocol: the test set (with the support set in few-shot), the set checkpoints are
selected on, and the training set, as the training loop takes it."""

import os
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, TensorDataset

from dataset import (
    CLASS_NAMES,
    DATASETS,
    IMAGE_EXTENSIONS,
    check_target,
    dataset_root,
    list_images,
    prompt_of,
)
from dataset.augment import augment
from dataset.medical_few import ImageItems, MedDataset, MedTestDataset
from dataset.medical_zero import MedTrainDataset
from utils import BadValue, MissingFile

from .config import RunConfig
from .evaluation import Normals


def test_set(run: RunConfig, iterate: int | None = None) -> MedTestDataset:
    """The test split of --obj; few-shot: with the support set of draw `iterate` (`dataset.support`;
    --support normal: its normal images alone, nothing under valid/Ungood read)."""
    check_target(run.data_path, run.obj, run.prompt_name)
    check_scoring(run)
    if not run.fewshot:
        return MedTestDataset(run.data_path, run.obj, run.img_size, normalize=run.clip_normalize)
    # iterate < 0 draws with the global `random` seeded by setup_seed(--seed), as the reference; successive
    # draws of one run therefore differ
    return MedDataset(
        run.data_path,
        run.obj,
        run.img_size,
        run.shot,
        iterate,
        seed=None,
        seed_root=run.seed_dir,
        sort_listing=run.sort_listing,
        normalize=run.clip_normalize,
        normal_only=run.support == "normal",
    )


def check_scoring(run: RunConfig) -> None:
    """The flags of the protocol and the normalisation, checked together before any work."""
    if run.support == "normal" and run.shot_in_name:
        raise BadValue(
            "names few-shot checkpoints, while the normal-only protocol (support 'normal') reads the "
            "zero-shot adapters {obj}.pth: leave it out, or name the checkpoint file itself (ckpt)",
            flag="shot_in_name",
        )
    if run.calibration and run.normalize != "support":
        raise BadValue(
            f"calibration images {run.calibration}: they fit the standalone scores' normalisation "
            f"(normalize 'support') only; ask for it, or leave them out",
            flag="calibration",
        )
    if run.normalize == "support" and not run.calibration and not (run.fewshot and run.shot >= 2):
        why = (
            "zero-shot has no support images"
            if not run.fewshot
            else f"a {run.shot}-shot support leaves none out"
        )
        raise BadValue(
            f"'support' needs normal images to fit on ({why}): give a folder of normal images as calibration "
            f"images" + ("" if not run.fewshot else ", or 2 or more support images (shot)"),
            flag="normalize",
        )


def calibration_set(run: RunConfig) -> ImageItems | None:
    """The normal images of --calibration (a folder, sorted, or one image file) as test items, or None."""
    if not run.calibration:
        return None
    check_scoring(run)
    path = run.calibration
    if os.path.isdir(path):
        files = list_images(path)
    elif os.path.isfile(path) and path.lower().endswith(IMAGE_EXTENSIONS):
        files = [path]
    else:
        raise MissingFile(
            f"calibration images {path}: no folder or image file ({', '.join(IMAGE_EXTENSIONS)}) there; give "
            f"a folder of normal images, e.g. {{data}}/{{obj}}_AD/valid/good/img",
            flag="calibration",
        )
    if not files:
        raise BadValue(
            f"calibration images {path}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder",
            flag="calibration",
        )
    return ImageItems([(p, 0, None) for p in files], run.img_size, run.clip_normalize)


def normal_references(run: RunConfig, test: MedTestDataset, calibration: ImageItems | None) -> Normals | None:
    """--normalize support: the normal images the scores' normalisation is fitted on, the draw's normal
    support images (few-shot) and the --calibration images but those; None: the test set's min-max."""
    if run.normalize != "support":
        return None
    if not run.fewshot:
        return Normals(None, calibration)
    if calibration is not None:
        # a support image against the whole bank would find its own views: left out, by path
        good = os.path.join(dataset_root(run.data_path, run.obj), "valid", "good", "img")
        used = {os.path.abspath(os.path.join(good, name)) for name in test.support.normal_files}
        items = [item for item in calibration.items if os.path.abspath(item[0]) not in used]
        calibration = ImageItems(items, run.img_size, run.clip_normalize) if items else None
    return Normals(test.support.normal, calibration)


def prompt(run: RunConfig) -> str:
    """The object name in the text prompts."""
    return prompt_of(run.obj, run.prompt_name)


def selection_set(run: RunConfig, test: MedTestDataset) -> MedTestDataset:
    """What checkpoints are chosen on: the test set (the reference), or with --select val the valid split
    (few-shot: without the support images)."""
    if run.select != "val":
        return test
    held_out = MedTestDataset(run.data_path, run.obj, run.img_size, run.clip_normalize, "valid")
    if not run.fewshot:
        return held_out
    valid = os.path.join(dataset_root(run.data_path, run.obj), "valid")
    support = test.support
    # by path, not by name: a normal and an abnormal image may have the same file name
    used = {os.path.join(valid, "good", "img", name) for name in support.normal_files}
    used |= {os.path.join(valid, "Ungood", "img", name) for name in support.abnormal_files}
    held_out.items = [item for item in held_out.items if item[0] not in used]
    if len({label for _, label, _ in held_out.items}) < 2:
        raise BadValue(
            f"'val': the valid split of {run.obj} has no normal or no abnormal image left besides the "
            f"support set; select on 'test' or 'last' instead",
            flag="select",
        )
    return held_out


class Batch(NamedTuple):
    """One training step's input: images [B, 3, H, W], labels [B], masks [B, 1, H, W] (image-only datasets:
    [1, H, W] zeros), the text features' key and whether the images have masks."""

    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor
    text: str
    has_masks: bool


class TrainingSet(NamedTuple):
    """What the training loop iterates: `epoch(e)` gives epoch e's batches; selection runs after each epoch
    (every=None) or before steps 0, every, 2 every, ... of each epoch."""

    epoch: Callable[[int], Iterable[Batch]]
    every: int | None
    texts: tuple[str, ...]  # the keys of the text features the steps use


def fewshot_training_set(run: RunConfig, test: MedDataset, memory_images: torch.Tensor) -> TrainingSet:
    """The augmented support set: abnormal images (label 1, their masks), then the augmented normal images
    `memory_images` (label 0, empty masks), reshuffled every epoch."""
    support = test.support
    # [11k, 3, H, W], [11k, 1, H, W]
    abnormal, abnormal_masks = augment(support.abnormal, support.abnormal_masks)
    normal_masks = torch.zeros(len(memory_images), 1, *memory_images.shape[2:])
    labels = torch.tensor([1.0] * len(abnormal) + [0.0] * len(memory_images))  # [22k]
    items = TensorDataset(
        torch.cat([abnormal, memory_images]), torch.cat([abnormal_masks, normal_masks]), labels
    )
    loader = DataLoader(items, batch_size=1, shuffle=True)

    def epoch(number: int) -> Iterable[Batch]:
        key = prompt(run)
        return (Batch(x, y, m, key, test.has_masks) for x, m, y in loader)

    return TrainingSet(epoch, None, (prompt(run),))


def zeroshot_training_set(run: RunConfig) -> TrainingSet:
    """Groups of --batch_size test images of each other BMAD dataset, regrouped after every epoch as the
    reference does (fresh listing, fresh shuffles)."""
    check_target(run.data_path, run.obj, run.prompt_name)
    data = MedTrainDataset(
        run.data_path, run.obj, run.img_size, run.batch_size, run.sort_listing, run.clip_normalize
    )
    if len(data) == 0:
        raise BadValue(
            f"no zero-shot training images: the test splits of the other datasets under {run.data_path} are "
            f"empty (training uses the BMAD datasets other than {run.obj})",
            flag="data_path",
        )

    def epoch(number: int) -> Iterable[Batch]:
        if number > 0:
            data.shuffle_dataset()
        loader = DataLoader(data, batch_size=1, shuffle=True, num_workers=run.num_workers)
        # each loader item is one pre-grouped batch: [1, B, ...]
        return (Batch(x[0], y[0], m[0], name[0], DATASETS[name[0]].has_masks) for x, y, m, name in loader)

    # deviation: the reference divides by zero below 5 groups; at least one step between selections here
    every = max(1, len(data) // 5)
    return TrainingSet(epoch, every, tuple(n for n in CLASS_NAMES if n != run.obj))
