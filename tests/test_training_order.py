"""What the few-shot training loop sees, against the reference's construction written out independently here.

The reference builds its training set as: the k listed (or drawn) abnormal support images with their masks and
the k normal ones, each set augmented in blocks (originals, rotations by -pi/8, -pi/16, pi/16, pi/8,
translations by (0.1, 0.1), (-0.1, 0.1), (-0.1, -0.1), (0.1, -0.1), horizontal flip, vertical flip), abnormal
before normal, labels 1 then 0, masks of normal images zero; then a shuffling DataLoader with batch 1 takes
them in the order of `randperm(22k)` drawn from a generator seeded by the global generator, after the loader's
own base-seed draw.
"""

import os
import random
import signal

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_scripts import TINY
from torch.utils.data import DataLoader

import train_few
from dataset.synthetic import make_synthetic_bmad
from mvfa import training

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 56


@pytest.fixture(scope="module", params=[0, 7], ids=["data0", "data7"])
def data(request, tmp_path_factory):
    """Eight images per folder and support lists for k = 1, 2, 4, 8,
    from two seeds of the synthetic generator."""
    root = tmp_path_factory.mktemp(f"order{request.param}")
    return make_synthetic_bmad(
        str(root),
        n_per_split=8,
        seed=request.param,
        img_size=SIZE,
        objs=("Brain", "Chest"),
        shots=(1, 2, 4, 8),
    )


def listed_names(seed_root: str, obj: str, shot: int, iterate: int) -> tuple[list[str], list[str]]:
    """(normal, abnormal) names of line n-/a-{iterate} of the k-shot list, as the reference parses it."""
    names = {}
    with open(os.path.join(seed_root, obj, f"{shot}-shot.txt"), encoding="utf-8") as f:
        for line in f:
            tokens = line.strip("\n").split()
            names.setdefault(tokens[0], tokens[1:])
    pick = [n for n in names[f"n-{iterate}:"] if n.endswith((".png", ".jpeg"))]
    return pick[:shot], [n for n in names[f"a-{iterate}:"] if n.endswith((".png", ".jpeg"))][:shot]


def load(path: str, mode: str) -> torch.Tensor:
    """PIL image -> [C, H, W] float in [0, 1] at SIZE (bicubic for images, nearest for masks)."""
    img = Image.open(path).convert(mode)
    img = img.resize((SIZE, SIZE), Image.BICUBIC if mode == "RGB" else Image.NEAREST)
    array = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(array.reshape(SIZE, SIZE, -1)).permute(2, 0, 1)


def warp(x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    grid = F.affine_grid(matrix[None].float().repeat(x.shape[0], 1, 1), list(x.size()), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def blocks(x: torch.Tensor) -> torch.Tensor:
    """[k, C, H, W] -> [11k, C, H, W]: the eleven views, each a block of all k images."""
    views = [x]
    for angle in (-np.pi / 8, -np.pi / 16, np.pi / 16, np.pi / 8):
        theta = torch.tensor(angle, dtype=torch.float32)
        views.append(
            warp(
                x,
                torch.stack(
                    [
                        torch.stack([theta.cos(), -theta.sin(), torch.tensor(0.0)]),
                        torch.stack([theta.sin(), theta.cos(), torch.tensor(0.0)]),
                    ]
                ),
            )
        )
    for dx, dy in ((0.1, 0.1), (-0.1, 0.1), (-0.1, -0.1), (0.1, -0.1)):
        views.append(warp(x, torch.tensor([[1.0, 0.0, dx], [0.0, 1.0, dy]])))
    return torch.cat(views + [x.flip(-1), x.flip(-2)])


def reference_items(
    data, obj: str, shot: int, iterate: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images [22k, 3, H, W], masks [22k, 1, H, W], labels [22k]) before shuffling."""
    root = os.path.join(data.data, f"{obj}_AD", "valid")
    if iterate >= 0:
        normal, abnormal = listed_names(data.seed_root, obj, shot, iterate)
    else:  # setup_seed(111) seeds `random`; the reference samples the unsorted listings, normal first
        rng = random.Random(111)
        normal = rng.sample(os.listdir(os.path.join(root, "good", "img")), shot)
        abnormal = rng.sample(os.listdir(os.path.join(root, "Ungood", "img")), shot)
    good = torch.stack([load(os.path.join(root, "good", "img", n), "RGB") for n in normal])
    bad = torch.stack([load(os.path.join(root, "Ungood", "img", n), "RGB") for n in abnormal])
    mask_dir = os.path.join(root, "Ungood", "anomaly_mask")
    bad_masks = (
        blocks(torch.stack([load(os.path.join(mask_dir, n), "L") for n in abnormal]))
        if os.path.isdir(mask_dir)
        else torch.zeros(11 * shot, 1, SIZE, SIZE)
    )
    images = torch.cat([blocks(bad), blocks(good)])
    masks = torch.cat([bad_masks, torch.zeros(11 * shot, 1, SIZE, SIZE)])
    return images, masks, torch.tensor([1.0] * 11 * shot + [0.0] * 11 * shot)


def shuffled_order(rng_state: torch.Tensor, n: int) -> list[int]:
    """The order a batch-1 shuffling DataLoader takes n items in,
    from the global generator's state at its iter()."""
    generator_state = torch.get_rng_state()
    torch.set_rng_state(rng_state)
    torch.empty((), dtype=torch.int64).random_()  # the iterator's base seed
    seed = int(torch.empty((), dtype=torch.int64).random_().item())  # the sampler's seed, at its first item
    torch.set_rng_state(generator_state)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def seen_by_training(monkeypatch, args: list[str]) -> tuple[list, list]:
    """Run train_few for one epoch;
    (every step's (image, mask, label)), (global RNG state at each loader iter())."""
    steps, states, real_iter = [], [], DataLoader.__iter__

    def step(model, images, labels, masks, *a, **k):
        steps.append((images.clone(), masks.clone(), labels.clone()))
        return 0.0

    def iterate(loader):
        states.append((len(loader.dataset), torch.get_rng_state()))
        return real_iter(loader)

    monkeypatch.setattr(training, "train_step", step)  # Training.step calls it by its module global
    monkeypatch.setattr(DataLoader, "__iter__", iterate)
    assert isinstance(train_few.main(args), dict)  # the final result
    return steps, states


@pytest.mark.parametrize("obj", ["Brain", "Chest"])
@pytest.mark.parametrize("shot,iterate", [(1, 0), (2, 1), (4, 0), (8, 2), (2, -1), (8, -1)])
def test_training_items_in_the_reference_order(data, tmp_path, monkeypatch, obj, shot, iterate):
    args = [
        *TINY,
        "--img_size",
        str(SIZE),
        "--obj",
        obj,
        "--data_path",
        data.data,
        "--seed_dir",
        data.seed_root,
        "--shot",
        str(shot),
        "--iterate",
        str(iterate),
        "--epoch",
        "1",
        "--save_model",
        "0",
        "--out_dir",
        str(tmp_path / "results"),
    ]
    steps, states = seen_by_training(monkeypatch, args)
    images, masks, labels = reference_items(data, obj, shot, iterate)
    n = len(labels)
    assert len(steps) == n == 22 * shot
    first = next(state for length, state in states if length == n)  # the training loader's iterator
    for (image, mask, label), i in zip(steps, shuffled_order(first, n)):
        assert torch.equal(image[0], images[i])
        assert torch.equal(mask[0], masks[i])
        assert torch.equal(label, labels[i : i + 1])


def test_losses_of_a_run_resumed_at_every_step(data, tmp_path, monkeypatch):
    """One epoch (k = 1: 22 steps) stopped by SIGUSR1 after every step and resumed each time: the same
    per-step losses, bit for bit, and the same checkpoint as the run that was never stopped."""
    losses, real_step = [], training.train_step

    def step(*a, **k):
        losses.append(real_step(*a, **k))
        if stop_after_each:
            os.kill(os.getpid(), signal.SIGUSR1)
        return losses[-1]

    monkeypatch.setattr(training, "train_step", step)  # Training.step calls it by its module global

    def run(folder, *extra) -> int:
        """0: the run finished (main returned its result dict); 1: it stopped on the signal (--resume)."""
        args = [
            *TINY,
            "--img_size",
            str(SIZE),
            "--obj",
            "Brain",
            "--data_path",
            data.data,
            "--seed_dir",
            data.seed_root,
            "--shot",
            "1",
            "--epoch",
            "1",
            "--save_path",
            str(folder / "ckpt"),
            "--out_dir",
            str(folder / "results"),
            *extra,
        ]
        try:
            result = train_few.main(args)
            assert isinstance(result, dict) and "image_auroc" in result
            return 0
        except SystemExit as stop:
            assert "--resume" in str(stop.code)
            return 1

    stop_after_each = False
    assert run(tmp_path / "whole") == 0
    uninterrupted, losses[:] = list(losses), []
    stop_after_each = True
    assert run(tmp_path / "parts") == 1
    for _ in range(21):
        assert run(tmp_path / "parts", "--resume") == 1
    stop_after_each = False
    assert run(tmp_path / "parts", "--resume") == 0
    assert losses == uninterrupted and len(losses) == 22
    whole = torch.load(tmp_path / "whole/ckpt/Brain.pth", weights_only=False)
    parts = torch.load(tmp_path / "parts/ckpt/Brain.pth", weights_only=False)
    for name in ("seg_adapters", "det_adapters"):
        assert all(torch.equal(whole[name][k], parts[name][k]) for k in whole[name])
