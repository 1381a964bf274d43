"""The prompt ensemble and its text features."""

import torch

from CLIP import tokenize
from dataset import DATASETS

NORMAL_STATES = [
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
]
ABNORMAL_STATES = ["damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage"]
SENTENCES = [
    "a bad photo of a {}.",
    "a low resolution photo of the {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a bright photo of a {}.",
    "a dark photo of the {}.",
    "a photo of my {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a photo of one {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "a low resolution photo of a {}.",
    "a photo of a large {}.",
    "a blurry photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "a dark photo of a {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "this is the {} in the scene.",
    "this is one {} in the scene.",
]


def prompt_sentences(name: str) -> tuple[list[str], list[str]]:
    """The 245 normal and 175 abnormal sentences: states outer, sentence templates inner."""
    return tuple(
        [s.format(state.format(name)) for state in states for s in SENTENCES]
        for states in (NORMAL_STATES, ABNORMAL_STATES)
    )


def prompt_name(obj_or_name: str) -> str:
    """A dataset name maps to its prompt name; anything else is used as the object name itself."""
    return DATASETS[obj_or_name].prompt_name if obj_or_name in DATASETS else obj_or_name


@torch.no_grad()
def encode_text_with_prompt_ensemble(clip_model, name: str, device: str | torch.device) -> torch.Tensor:
    """Text features [E, 2]: column 0 normal, column 1 abnormal (mean of unit sentence features,
    renormalised).

    The in-place divisions are kept: under CUDA autocast they keep the feature dtypes the reference produces.
    """
    columns = []
    for sentences in prompt_sentences(prompt_name(name)):
        features = clip_model.encode_text(tokenize(sentences).to(device))  # [n, E]
        features /= features.norm(dim=-1, keepdim=True)
        feature = features.mean(dim=0)  # [E]
        feature /= feature.norm()
        columns.append(feature)
    return torch.stack(columns, dim=1).to(device)  # [E, 2]


def text_features_for(
    clip_model, objs, device: torch.device, precision, store=None
) -> dict[str, torch.Tensor]:
    """{obj: [E, 2]} for each dataset (or prompt name), each distinct prompt name encoded once, in the forward
    context of `precision` (a `mvfa.precision.Precision`). `store` (a `mvfa.text_cache.TextCache` or None)
    gives back features encoded before with the same weights and settings, and keeps new ones."""
    features = {}
    with precision.forward():
        for name in {prompt_name(o) for o in objs}:
            sentences = prompt_sentences(name)
            found = store.get(name, sentences) if store is not None else None
            if found is None:
                found = encode_text_with_prompt_ensemble(clip_model, name, device)
                if store is not None:
                    store.put(name, sentences, found)
            features[name] = found.to(device)
    return {o: features[prompt_name(o)] for o in objs}
