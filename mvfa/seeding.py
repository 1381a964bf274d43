"""The random generators a run draws from: the reference's seeding, draws that keep the global generator in
step with the reference's loaders, and the generators' states that a training state keeps for --resume."""

import os
import random

import numpy as np
import torch


def setup_seed(seed: int, deterministic: bool = False) -> None:
    """The reference's seeding; deterministic=True also asks torch for deterministic kernels (the
    reference's cudnn flags do not make CUDA's bilinear-upsampling backward deterministic, so its training is
    not bitwise reproducible)."""
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    np.random.seed(seed)
    random.seed(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    if deterministic:
        # cuBLAS needs it for deterministic products
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # a warning where no deterministic kernel exists
        torch.use_deterministic_algorithms(True, warn_only=True)


def draw_as_loader(shuffle: bool) -> None:
    """Draw from the global generator what iterating a DataLoader draws: its base seed and, when it
    shuffles, its sampler's seed. For the loaders the reference iterates where this code needs none, so that
    the generator, and so the reference's training draws, stay in step."""
    for _ in range(2 if shuffle else 1):
        torch.empty((), dtype=torch.int64).random_()


def rng_states() -> dict:
    """Every generator a training run draws from."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {
        "torch": torch.get_rng_state(),
        "gpus": cuda,
        "numpy": np.random.get_state(),
        "random": random.getstate(),
    }


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states["gpus"]:
        torch.cuda.set_rng_state_all(states["gpus"])
    np.random.set_state(states["numpy"])
    random.setstate(states["random"])
