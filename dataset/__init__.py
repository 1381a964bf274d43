"""The six BMAD datasets (name -> folder, has_masks, prompt name) and the helpers every dataset module shares.

Import the datasets themselves from `dataset.medical_few`, `dataset.medical_zero`; `dataset.synth` writes a small
synthetic benchmark in the same layout.
"""
import os
from typing import NamedTuple

from .files import IMAGE_EXTENSIONS, list_images, pair_masks
from .transforms import CLIP_MEAN, CLIP_STD, load_image, load_input, load_mask



class Dataset(NamedTuple):
    """One BMAD dataset: its folder under data_path, whether it has pixel masks, the object name of its prompts."""
    folder: str
    has_masks: bool
    prompt_name: str


# replaces the reference's sign-encoded CLASS_INDEX; Retina_RESC and Retina_OCT2017 share a prompt name (spec Q26)
DATASETS: dict[str, Dataset] = {
    'Brain': Dataset('Brain_AD', True, 'Brain'),
    'Liver': Dataset('Liver_AD', True, 'Liver'),
    'Retina_RESC': Dataset('Retina_RESC_AD', True, 'retinal OCT'),
    'Retina_OCT2017': Dataset('Retina_OCT2017_AD', False, 'retinal OCT'),
    'Chest': Dataset('Chest_AD', False, 'Chest X-ray film'),
    'Histopathology': Dataset('Histopathology_AD', False, 'histopathological image'),
}
CLASS_NAMES: tuple[str, ...] = ('Brain', 'Liver', 'Retina_RESC', 'Retina_OCT2017', 'Chest', 'Histopathology')

__all__ = ['DATASETS', 'CLASS_NAMES', 'IMAGE_EXTENSIONS', 'CLIP_MEAN', 'CLIP_STD', 'check_obj', 'dataset_root',
           'list_images', 'pair_masks', 'load_image', 'load_input', 'load_mask']


def check_obj(name: str) -> str:
    """Return `name` if it is one of CLASS_NAMES, else raise a ValueError listing the valid names."""
    if name not in DATASETS:
        raise ValueError(f"unknown --obj {name!r}: choose one of {', '.join(CLASS_NAMES)}")
    return name


def dataset_root(data_path: str, obj: str) -> str:
    """`{data_path}/{obj}_AD`, checked to exist (FileNotFoundError saying where the BMAD data must go)."""
    folder = DATASETS[check_obj(obj)].folder
    root = os.path.join(data_path, folder)
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"dataset folder not found: {root}; the BMAD data must be placed as data/{folder}/{{valid,test}}/"
            f"{{good,Ungood}}/img/ (masks in Ungood/anomaly_mask/), or pass --data_path to the folder holding it")
    return root
