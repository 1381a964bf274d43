"""The project's own generator of the reference inputs (random CLIP weights, adapters, synthetic BMAD data).

The fixtures under tests/fixtures/reference/ were recorded by the reference implementation on inputs made by
two scripts kept outside this repository. This module rebuilds those inputs, byte for byte, with nothing but
torch, numpy, Pillow and the standard library, so that a clone on its own can regenerate (and check) them:

    ROOT/CLIP/ckpt/ViT-L-14-336px.pt
        TorchScript archive laid out like OpenAI's (fp16, OpenAI key names)
    ROOT/ckpt/{few-shot,zero-shot}/{obj}.pth
        adapter checkpoints {'seg_adapters': {...}, 'det_adapters': {...}}
    ROOT/data/{obj}_AD/{valid,test}/{good,Ungood}/img/*.png
        (+ Ungood/anomaly_mask/*.png for segmentation sets)
    ROOT/dataset/fewshot_seed/{obj}/{k}-shot.txt
        support lists, iterations 0-2

Byte identity rests on replaying the same random draws in the same order, the same float arithmetic (numpy
dtype promotion included), the same file names (a torch archive's inner folder is named after its file) and
the same TorchScript class names (the archive's root class is `__torch__.Holder`).

Usage: python tests/reference_inputs.py DIR [--seed 0] [--n-per-split 6] [--digests]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

SEG_OBJECTS: tuple[str, ...] = ("Brain", "Liver", "Retina_RESC")  # datasets with pixel masks
DET_OBJECTS: tuple[str, ...] = ("Retina_OCT2017", "Chest", "Histopathology")  # image labels only
OBJECTS: tuple[str, ...] = SEG_OBJECTS + DET_OBJECTS
SETTINGS: tuple[str, ...] = ("few-shot", "zero-shot")
SHOTS: tuple[int, ...] = (2, 4, 8, 16)
SUPPORT_ITERATIONS = 3
IMAGE_SIZE = 240

# ViT-L/14 at 336 px, as in OpenAI's archive
VISION_WIDTH, VISION_LAYERS, PATCH, GRID = 1024, 24, 14, 24
TEXT_WIDTH, TEXT_LAYERS, CONTEXT, VOCAB = 768, 12, 77, 49408
EMBED_DIM = 768
ARCHIVE_SCALARS: dict[str, int] = {"input_resolution": 336, "context_length": CONTEXT, "vocab_size": VOCAB}
ADAPTER_LAYERS = 4  # adapters per branch (seg, det), one per tapped ViT stage
ADAPTER_BOTTLENECK = 768


# ------------------------------------------------------------------------------------------------------------
# weights: one torch.Generator feeds the CLIP archive first, then the twelve adapter checkpoints
# ------------------------------------------------------------------------------------------------------------
class NormalDraws:
    """Scaled standard-normal tensors from one seeded CPU generator, in call order."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, *shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator) * std  # fp32


def _residual_block(draw: NormalDraws, prefix: str, width: int, weights: dict[str, torch.Tensor]) -> None:
    """One transformer block's twelve tensors. The projection std counts 24 layers for both towers."""
    attn_std = width**-0.5
    proj_std = (width**-0.5) * ((2 * VISION_LAYERS) ** -0.5)
    fc_std = (2 * width) ** -0.5
    hidden = 4 * width
    weights[f"{prefix}.ln_1.weight"] = 1 + draw(width, std=0.02)
    weights[f"{prefix}.ln_1.bias"] = draw(width, std=0.02)
    # (3W, W): q, k, v stacked
    weights[f"{prefix}.attn.in_proj_weight"] = draw(3 * width, width, std=attn_std)
    weights[f"{prefix}.attn.in_proj_bias"] = draw(3 * width, std=0.02)
    weights[f"{prefix}.attn.out_proj.weight"] = draw(width, width, std=proj_std)
    weights[f"{prefix}.attn.out_proj.bias"] = draw(width, std=0.02)
    weights[f"{prefix}.ln_2.weight"] = 1 + draw(width, std=0.02)
    weights[f"{prefix}.ln_2.bias"] = draw(width, std=0.02)
    weights[f"{prefix}.mlp.c_fc.weight"] = draw(hidden, width, std=fc_std)  # (4W, W)
    weights[f"{prefix}.mlp.c_fc.bias"] = draw(hidden, std=0.02)
    weights[f"{prefix}.mlp.c_proj.weight"] = draw(width, hidden, std=proj_std)  # (W, 4W)
    weights[f"{prefix}.mlp.c_proj.bias"] = draw(width, std=0.02)


class _HalfDict(dict):
    """A dict that stores every tensor as fp16 on insertion (halves peak memory; same values as converting
    last)."""

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        super().__setitem__(key, value.half())


def clip_weights(draw: NormalDraws) -> dict[str, torch.Tensor]:
    """OpenAI ViT-L/14@336 state dict (key order matters: it fixes the archive's layout), fp16, random
    values."""
    w: dict[str, torch.Tensor] = _HalfDict()
    vw, tw = VISION_WIDTH, TEXT_WIDTH
    w["visual.class_embedding"] = draw(vw, std=vw**-0.5)  # (1024,)
    w["visual.positional_embedding"] = draw(GRID * GRID + 1, vw, std=vw**-0.5)  # (577, 1024)
    w["visual.conv1.weight"] = draw(vw, 3, PATCH, PATCH, std=0.02)  # (1024, 3, 14, 14)
    w["visual.ln_pre.weight"] = 1 + draw(vw, std=0.02)
    w["visual.ln_pre.bias"] = draw(vw, std=0.02)
    for i in range(VISION_LAYERS):
        _residual_block(draw, f"visual.transformer.resblocks.{i}", vw, w)
    w["visual.ln_post.weight"] = 1 + draw(vw, std=0.02)
    w["visual.ln_post.bias"] = draw(vw, std=0.02)
    w["visual.proj"] = draw(vw, EMBED_DIM, std=vw**-0.5)  # (1024, 768)
    w["token_embedding.weight"] = draw(VOCAB, tw, std=0.02)  # (49408, 768)
    w["positional_embedding"] = draw(CONTEXT, tw, std=0.01)  # (77, 768)
    for i in range(TEXT_LAYERS):
        _residual_block(draw, f"transformer.resblocks.{i}", tw, w)
    w["ln_final.weight"] = 1 + draw(tw, std=0.02)
    w["ln_final.bias"] = draw(tw, std=0.02)
    w["text_projection"] = draw(tw, EMBED_DIM, std=tw**-0.5)  # (768, 768)
    w["logit_scale"] = torch.tensor(math.log(1 / 0.07))  # scalar, not a draw
    return dict(w)


def adapter_weights(draw: NormalDraws) -> dict[str, torch.Tensor]:
    """One branch's bottleneck adapters in the released key layout, fp32."""
    c, b = VISION_WIDTH, ADAPTER_BOTTLENECK
    out: dict[str, torch.Tensor] = {}
    for i in range(ADAPTER_LAYERS):
        out[f"{i}.fc1.0.weight"] = draw(b, c, std=c**-0.5)  # (768, 1024)
        out[f"{i}.fc2.0.weight"] = draw(c, b, std=b**-0.5)  # (1024, 768)
    return out


class Holder(nn.Module):
    """Carries tensors under dotted names so that a scripted copy saves like OpenAI's TorchScript file.

    The class name and the `__main__` module are part of the archive bytes (`__torch__.Holder`), whoever
    imports this file; the submodules are plain `nn.Module`s for the same reason.
    """

    __module__ = "__main__"

    def __init__(self, weights: dict[str, torch.Tensor], scalars: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for key, value in weights.items():
            *parents, leaf = key.split(".")
            owner: nn.Module = self
            for name in parents:
                if not hasattr(owner, name):
                    owner.add_module(name, nn.Module())
                owner = getattr(owner, name)
            owner.register_parameter(leaf, nn.Parameter(value, requires_grad=False))
        for key, value in scalars.items():
            self.register_buffer(key, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


@contextlib.contextmanager
def _fresh_torchscript_namespace() -> Iterator[None]:
    """Script into an empty compilation unit and type cache, so that earlier scripting in this process (or a
    second call) cannot rename the archive's classes (`__torch__.Holder` ->
    `__torch__.___torch_mangle_9.Holder`)."""
    state, recursive = torch.jit._state, torch.jit._recursive
    saved = state._python_cu, recursive.concrete_type_store
    state._python_cu = torch._C.CompilationUnit()
    recursive.concrete_type_store = recursive.ConcreteTypeStore()
    try:
        yield
    finally:
        state._python_cu, recursive.concrete_type_store = saved


def write_weights(root: Path, seed: int) -> None:
    """The CLIP archive, then few-shot and zero-shot adapters for each dataset (seg branch before det)."""
    draw = NormalDraws(seed)
    archive = root / "CLIP" / "ckpt" / "ViT-L-14-336px.pt"
    archive.parent.mkdir(parents=True, exist_ok=True)
    scalars = {k: torch.tensor(v) for k, v in ARCHIVE_SCALARS.items()}  # int64 scalars
    holder = Holder(clip_weights(draw), scalars)
    with _fresh_torchscript_namespace():
        torch.jit.save(torch.jit.script(holder), str(archive))
    del holder
    for setting in SETTINGS:
        folder = root / "ckpt" / setting
        folder.mkdir(parents=True, exist_ok=True)
        for obj in OBJECTS:
            # torch.save names the zip's inner folder after the file: keep the name "{obj}.pth"
            checkpoint = {"seg_adapters": adapter_weights(draw), "det_adapters": adapter_weights(draw)}
            torch.save(checkpoint, str(folder / f"{obj}.pth"))


# ------------------------------------------------------------------------------------------------------------
# synthetic BMAD-style data: one numpy Generator, datasets in OBJECTS order
# ------------------------------------------------------------------------------------------------------------
def _smooth_noise(rng: np.random.Generator, size: int, cell: int) -> np.ndarray:
    """Uniform noise on a coarse grid, bicubically upsampled: (size, size) float32 in [0, 1]."""
    coarse = rng.random((size // cell + 2, size // cell + 2))  # float64
    upsampled = Image.fromarray((coarse * 255).astype(np.uint8)).resize(
        (size, size), Image.Resampling.BICUBIC
    )
    return np.asarray(upsampled, dtype=np.float32) / 255.0


def _organ_shading(size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row and column index grids (int64, (size, size)) and the shading 0.4 outside / 1.0 inside a centred
    ellipse (float64, (size, size))."""
    yy, xx = np.mgrid[0:size, 0:size]
    inside = ((yy - size / 2) ** 2 / (0.38 * size) ** 2 + (xx - size / 2) ** 2 / (0.33 * size) ** 2) < 1
    return yy, xx, 0.4 + 0.6 * inside


def synth_image(rng: np.random.Generator, size: int, anomalous: bool) -> tuple[Image.Image, Image.Image]:
    """One RGB image (size, size, 3) and its L mask (255 on the anomaly). An anomaly is a brightened
    ellipse."""
    texture = 0.35 * _smooth_noise(rng, size, 16) + 0.15 * _smooth_noise(rng, size, 4) + 0.2  # float32
    yy, xx, shading = _organ_shading(size)
    img = texture * shading  # float64
    mask = np.zeros((size, size), np.uint8)
    if anomalous:
        cy, cx = rng.uniform(0.3, 0.7, 2) * size
        ry, rx = rng.uniform(0.05, 0.14, 2) * size
        blob = ((yy - cy) ** 2 / ry**2 + (xx - cx) ** 2 / rx**2) < 1
        brighter = np.clip(img + rng.uniform(0.3, 0.5), 0, 1)
        img = np.where(blob, brighter, img)
        mask[blob] = 255
    rgb = np.stack([img, img * 0.95, img * 0.9], -1)  # (size, size, 3), slightly warm tint
    pixels = (np.clip(rgb, 0, 1) * 255).astype(np.uint8)
    return Image.fromarray(pixels), Image.fromarray(mask)


def _support_line(tag: str, names: np.ndarray) -> str:
    return f"{tag}: " + " ".join(str(n) for n in names) + "\n"


def write_dataset(root: Path, obj: str, rng: np.random.Generator, n_per_split: int) -> None:
    """data/{obj}_AD with n_per_split images per split and state, then its support lists."""
    base = root / "data" / f"{obj}_AD"
    has_masks = obj in SEG_OBJECTS
    names: dict[tuple[str, str], list[str]] = {}
    for split in ("valid", "test"):
        for state in ("good", "Ungood"):
            img_dir = base / split / state / "img"
            mask_dir = base / split / state / "anomaly_mask"
            img_dir.mkdir(parents=True, exist_ok=True)
            abnormal = state == "Ungood"
            if abnormal and has_masks:
                mask_dir.mkdir(parents=True, exist_ok=True)
            listed: list[str] = []
            for i in range(n_per_split):
                name = f"{i:05d}_{rng.integers(10, 99)}.png"  # the draw precedes the image's draws
                img, mask = synth_image(rng, IMAGE_SIZE, abnormal)
                img.save(img_dir / name)
                if abnormal and has_masks:
                    mask.save(mask_dir / name)
                listed.append(name)
            names[(split, state)] = listed

    support_dir = root / "dataset" / "fewshot_seed" / obj
    support_dir.mkdir(parents=True, exist_ok=True)
    for k in SHOTS:
        lines: list[str] = []
        for it in range(SUPPORT_ITERATIONS):
            kk = min(k, n_per_split)
            abnormal = rng.choice(names[("valid", "Ungood")], kk, replace=False)
            normal = rng.choice(names[("valid", "good")], kk, replace=False)
            lines += [_support_line(f"a-{it}", abnormal), _support_line(f"n-{it}", normal)]
        with open(support_dir / f"{k}-shot.txt", "w", newline="\n") as f:
            f.write("".join(lines))


def write_data(root: Path, n_per_split: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for obj in OBJECTS:
        write_dataset(root, obj, rng, n_per_split)


# ------------------------------------------------------------------------------------------------------------
def make_reference_inputs(root: str | os.PathLike, seed: int = 0, n_per_split: int = 6) -> Path:
    """Write all reference inputs for `seed` under `root` (~1.4 GB); returns `root` as a Path."""
    out = Path(root)
    write_weights(out, seed)
    write_data(out, n_per_split, seed)
    return out


def file_digests(root: str | os.PathLike) -> dict[str, str]:
    """{posix path relative to root: sha256 hex} for every regular file under root."""
    base = Path(root)
    digests: dict[str, str] = {}
    for path in sorted(p for p in base.rglob("*") if p.is_file()):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        digests[path.relative_to(base).as_posix()] = h.hexdigest()
    return digests


def format_digests(digests: dict[str, str]) -> str:
    """sha256sum's format (`HEX  path`), sorted by path."""
    return "".join(f"{digests[p]}  {p}\n" for p in sorted(digests))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="output folder (laid out as a user's checkout)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-per-split", type=int, default=6, help="images per split and state")
    parser.add_argument("--digests", action="store_true", help="print every file's sha256, sorted, when done")
    args = parser.parse_args(argv)
    root = make_reference_inputs(args.root, seed=args.seed, n_per_split=args.n_per_split)
    if args.digests:
        print(format_digests(file_digests(root)), end="")
    else:
        print("written", root)


if __name__ == "__main__":
    main()
