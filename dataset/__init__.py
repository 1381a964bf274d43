"""The six BMAD datasets (name -> folder, has_masks, prompt name), one's own datasets in BMAD's layout, and
the helpers every dataset module shares. The datasets themselves are in `dataset.medical_few` and
`dataset.medical_zero`.
"""

import os
from typing import NamedTuple

from utils import BadValue, MissingFile

from .files import IMAGE_EXTENSIONS, list_images, pair_masks
from .images import CLIP_MEAN, CLIP_STD, load_image, load_input, load_mask


class Dataset(NamedTuple):
    """One BMAD dataset: its folder under data_path, whether it has pixel masks, the object name of its
    prompts."""

    folder: str
    has_masks: bool
    prompt_name: str


# replaces the reference's sign-encoded CLASS_INDEX. Retina_RESC and Retina_OCT2017 share a prompt name, hence
# the same text features: the reference names both "retinal OCT", kept for its numbers
DATASETS: dict[str, Dataset] = {
    "Brain": Dataset("Brain_AD", has_masks=True, prompt_name="Brain"),
    "Liver": Dataset("Liver_AD", has_masks=True, prompt_name="Liver"),
    "Retina_RESC": Dataset("Retina_RESC_AD", has_masks=True, prompt_name="retinal OCT"),
    "Retina_OCT2017": Dataset("Retina_OCT2017_AD", has_masks=False, prompt_name="retinal OCT"),
    "Chest": Dataset("Chest_AD", has_masks=False, prompt_name="Chest X-ray film"),
    "Histopathology": Dataset("Histopathology_AD", has_masks=False, prompt_name="histopathological image"),
}
CLASS_NAMES: tuple[str, ...] = ("Brain", "Liver", "Retina_RESC", "Retina_OCT2017", "Chest", "Histopathology")

__all__ = [
    "DATASETS",
    "CLASS_NAMES",
    "IMAGE_EXTENSIONS",
    "CLIP_MEAN",
    "CLIP_STD",
    "check_obj",
    "dataset_root",
    "check_target",
    "dataset_name",
    "has_masks",
    "prompt_of",
    "list_images",
    "pair_masks",
    "load_image",
    "load_input",
    "load_mask",
]


def check_obj(name: str) -> str:
    """Return `name` if it is one of CLASS_NAMES, else raise a ValueError listing the valid names."""
    if name not in DATASETS:
        raise BadValue(f"unknown dataset {name!r}: choose one of {', '.join(CLASS_NAMES)}", flag="obj")
    return name


def dataset_root(data_path: str, obj: str) -> str:
    """A BMAD dataset's `{data_path}/{obj}_AD`; one's own dataset: `obj` itself if it is a folder, else
    `{data_path}/{obj}`. Checked to exist (FileNotFoundError saying where the data must go)."""
    if obj not in DATASETS:
        for root in (obj, os.path.join(data_path, obj)):
            if os.path.isdir(os.path.join(root, "test")):
                return root
        if os.sep not in obj and "/" not in obj:
            check_obj(obj)  # a bare name that is no folder: most likely a misspelt BMAD name
        raise MissingFile(
            f"{obj}: no dataset in BMAD's layout there (no {os.path.join(obj, 'test')} "
            f"folder); see README 'Your own data'",
            flag="obj",
        )
    folder = DATASETS[obj].folder
    root = os.path.join(data_path, folder)
    if not os.path.isdir(root):
        raise MissingFile(
            f"dataset folder not found: {root}; the BMAD data must be placed as data/{folder}/{{valid,test}}/"
            f"{{good,Ungood}}/img/ (masks in Ungood/anomaly_mask/): "
            f"run `python -m tools.download data {obj}`, or point the data path at the folder holding it",
            flag="data_path",
        )
    return root


def dataset_name(obj: str) -> str:
    """The name in file names and printed lines: a BMAD name, or the folder name of one's own dataset."""
    return obj if obj in DATASETS else os.path.basename(os.path.normpath(obj))


def has_masks(data_path: str, obj: str) -> bool:
    """BMAD: from the table; one's own dataset: whether its test split has an `Ungood/anomaly_mask` folder."""
    if obj in DATASETS:
        return DATASETS[obj].has_masks
    return os.path.isdir(os.path.join(dataset_root(data_path, obj), "test", "Ungood", "anomaly_mask"))


def check_target(data_path: str, obj: str, prompt_name: str | None = None) -> str:
    """The prompt name of --obj, checked before any work: a BMAD name, or one's own dataset with
    --prompt_name."""
    if obj not in DATASETS:
        dataset_root(data_path, obj)
    return prompt_of(obj, prompt_name)


def prompt_of(obj: str, prompt_name: str | None = None) -> str:
    """The object name put into the prompts: --prompt_name if given, else the BMAD dataset's, word for word
    the reference's (the text features depend on it)."""
    if prompt_name:
        return prompt_name
    if obj not in DATASETS:
        raise BadValue(
            f"a prompt name is needed for {obj}, which is not one of BMAD's six datasets: the object "
            f"named in the text prompts, e.g. 'knee MRI'",
            flag="prompt_name",
        )
    return DATASETS[obj].prompt_name
