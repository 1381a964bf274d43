"""Zero-shot data: leave-one-dataset-out training groups over the other five test splits, and the test set
(`MedTestDataset`: the few-shot test set, same list, same items, re-exported here)."""

import random

import torch
from torch.utils.data import Dataset

from utils import BadValue

from . import CLASS_NAMES, DATASETS, dataset_root, load_input, load_mask
from .medical_few import MedTestDataset, list_test_items

__all__ = ["MedTrainDataset", "MedTestDataset"]

# paths, labels, masks, name
Group = tuple[tuple[str, ...], tuple[int, ...], tuple[str | None, ...] | None, str]


class MedTrainDataset(Dataset):
    """Groups of `batch_size` test images of one other dataset; item = (imgs [B,3,H,W], labels float32 [B],
    masks [B,1,H,W] (zeros for normal images) or zeros(1,H,W) for image-only datasets, dataset name). Built
    with the global Python `random`, as the reference (6 shuffles; again in `shuffle_dataset`)."""

    def __init__(
        self,
        data_path: str,
        obj: str,
        img_size: int = 240,
        batch_size: int = 1,
        sort_listing: bool = False,
        normalize: bool = False,
    ):
        if batch_size < 1:
            raise BadValue(f"batch size must be at least 1, got {batch_size}", flag="batch_size")
        self.obj = obj  # a BMAD name (left out of training) or one's own dataset (all six train)
        if obj not in DATASETS:
            # one's own dataset must exist; an unknown bare name is a misspelt one
            dataset_root(data_path, obj)
        self.data_path, self.img_size, self.batch_size = data_path, img_size, batch_size
        self.sort_listing, self.normalize = sort_listing, normalize
        self.shuffle_dataset()

    def shuffle_dataset(self) -> None:
        """Shuffle each other dataset's fresh listing, cut it into groups, shuffle the groups, in the
        reference's order of draws. Like the reference, it trains on the other datasets' test splits, never
        their valid ones, for its numbers; the reference calls it again after each epoch."""
        groups: list[Group] = []
        for name in [n for n in CLASS_NAMES if n != self.obj]:
            items = list_test_items(self.data_path, name, sort=self.sort_listing)
            random.shuffle(items)  # the groups draw nothing: the shuffles run in the reference's order
            for start in range(0, len(items), self.batch_size):
                paths, labels, masks = zip(*items[start : start + self.batch_size])
                groups.append((paths, labels, masks if DATASETS[name].has_masks else None, name))
        random.shuffle(groups)
        self.data = groups

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
        paths, labels, masks, name = self.data[i]
        size = self.img_size
        imgs = torch.stack([load_input(p, size, self.normalize) for p in paths])  # [B, 3, H, W]
        y = torch.tensor(labels, dtype=torch.float32)  # [B]
        if masks is None:
            return imgs, y, torch.zeros(1, size, size), name  # image-only dataset: the reference's (1, H, W)
        m = torch.stack([torch.zeros(1, size, size) if p is None else load_mask(p, size) for p in masks])
        return imgs, y, m, name  # m: [B, 1, H, W]
