"""Small shared helpers: seeding, device and precision, the few-shot augmentation (spec 6.3, 8), and the scripts'
common flags, checkpoint writing and run records."""
import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def setup_seed(seed: int, deterministic: bool = False) -> None:
    """The reference's seeding; deterministic=True also asks torch for deterministic kernels (spec Q27: CUDA's
    bilinear-upsampling backward is not, so the reference's training is not bitwise reproducible)."""
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    np.random.seed(seed)
    random.seed(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for deterministic products
        torch.use_deterministic_algorithms(True, warn_only=True)  # a warning where no deterministic kernel exists


def draw_as_loader(shuffle: bool) -> None:
    """Draw from the global generator what iterating a DataLoader draws: its base seed and, when it shuffles, its
    sampler's seed. For the loaders the reference iterates where this code needs none (spec 8.2)."""
    for _ in range(2 if shuffle else 1):
        torch.empty((), dtype=torch.int64).random_()


def resolve_device(name: str | None) -> torch.device:
    """'auto' or None -> cuda when available, else cpu; anything else is checked."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return device


PRECISIONS = ("auto", "fp32", "fp16", "bf16", "amp")


def autocast(device: torch.device, precision: str = "auto"):
    """The context the reference runs its forwards in: fp16 autocast on CUDA ('auto' == 'amp' there), fp32 on the CPU.

    'bf16' autocasts to bfloat16 on either device; 'fp16' autocasts to float16; 'fp32' disables autocast.
    """
    if precision == "auto":
        precision = "amp" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _warp(x: torch.Tensor, matrix: list[list[torch.Tensor]]) -> torch.Tensor:
    """Affine warp of x [N, C, H, W] by one float32 2x3 matrix, bilinear, reflection padding, align_corners False."""
    theta = torch.tensor(matrix, dtype=torch.float32).expand(x.shape[0], 2, 3)  # [N, 2, 3]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def rotate(x: torch.Tensor, angle: float) -> torch.Tensor:
    t = torch.tensor(angle, dtype=torch.float32)  # the angle is rounded to float32 before cos/sin (spec Q34)
    c, s = float(torch.cos(t)), float(torch.sin(t))
    return _warp(x, [[c, -s, 0.0], [s, c, 0.0]])


def translate(x: torch.Tensor, dx: float, dy: float) -> torch.Tensor:
    return _warp(x, [[1.0, 0.0, dx], [0.0, 1.0, dy]])


def augment(images: torch.Tensor, masks: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """k images [k, C, H, W] -> 11k: originals, 4 rotations, 4 translations, h-flip, v-flip (blocks in this order).

    Masks get the same warps (so they become fractional; training binarises them at 0.5); without masks, zeros.
    """
    images = images.float()

    def views(x):
        return [x, *(rotate(x, a) for a in (-math.pi / 8, -math.pi / 16, math.pi / 16, math.pi / 8)),
                *(translate(x, dx, dy) for dx, dy in ((0.1, 0.1), (-0.1, 0.1), (-0.1, -0.1), (0.1, -0.1))),
                x.flip(-1), x.flip(-2)]

    out = torch.cat(views(images))  # [11k, C, H, W]
    if masks is None:
        return out, torch.zeros(out.shape[0], 1, *out.shape[2:])
    return out, torch.cat(views(masks.float()))


# ---- command lines, checkpoints and run records shared by the four scripts ----

def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_common_args(parser, obj: str) -> None:
    """The flags every script takes, with the reference's names and defaults (spec section 0)."""
    parser.add_argument("--model_name", default="ViT-L-14-336", help="CLIP architecture (a CLIP/model_configs/*.json)")
    parser.add_argument("--pretrain", default="openai", choices=["openai", "none"],
                        help="'openai': read --clip_ckpt; 'none': random weights (tests, demo)")
    parser.add_argument("--clip_ckpt", default=None,
                        help="CLIP weights file (default CLIP/ckpt/ViT-L-14-336px.pt in this repository)")
    parser.add_argument("--obj", default=obj, help="dataset: Brain, Liver, Retina_RESC, Retina_OCT2017, Chest, "
                                                   "Histopathology")
    parser.add_argument("--data_path", default="./data/", help="folder holding {obj}_AD/ in BMAD's layout")
    parser.add_argument("--batch_size", type=positive_int, default=1,
                        help="images per forward of test and memory-bank passes (train_zero: also the size of its "
                             "training groups); above 1 faster (8: ~1.3x on 2 CPU cores), not the reference's last "
                             "bits")
    parser.add_argument("--img_size", type=int, default=240, help="input resolution")
    parser.add_argument("--features_list", type=int, nargs="+", default=[6, 12, 18, 24],
                        help="1-based ViT block numbers followed by adapters")
    parser.add_argument("--seed", type=int, default=111, help="random seed")
    parser.add_argument("--device", default="auto", help="'auto' (cuda if available, else cpu), 'cpu', 'cuda:0', ...")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="'auto': fp16 autocast on CUDA as the reference, fp32 on the CPU; 'bf16' for GPUs and "
                             "CPUs with bf16 instructions (AVX512-BF16/AMX; slower than fp32 on other CPUs)")
    parser.add_argument("--fast", action="store_true",
                        help="fused attention, text prompts run over their own length: the same maths, faster, not "
                             "the reference's last bits (printed 4-decimal results can move where scores nearly tie)")
    parser.add_argument("--quick_gelu", action="store_true",
                        help="fix: use QuickGELU, the activation the CLIP weights were trained with (reference: GELU)")
    parser.add_argument("--clip_normalize", action="store_true",
                        help="fix: normalise images with CLIP's mean/std (the reference feeds [0,1] pixels)")
    parser.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--out_dir", default="./results/", help="where the run's JSON record is written")


def add_fewshot_args(parser, several: bool = False) -> None:
    parser.add_argument("--shot", type=int, default=4, help="number of normal and of abnormal support images")
    parser.add_argument("--iterate", type=int, default=[0] if several else 0, nargs="+" if several else None,
                        help="support list n-/a-{iterate} of dataset/fewshot_seed/{obj}/{shot}-shot.txt; -1 draws "
                             "a support set with --seed" + ("; several values report mean ± std" if several else ""))
    parser.add_argument("--seed_dir", default=None,
                        help="folder of the support lists (default: dataset/fewshot_seed in this repository)")
    parser.add_argument("--memory_no_cls", action="store_true",
                        help="fix: leave the CLS token out of the memory bank (the reference keeps it)")
    add_sort_listing_arg(parser, "the --iterate -1 draws of support images")


def add_sort_listing_arg(parser, before: str) -> None:
    parser.add_argument("--sort_listing", action="store_true",
                        help=f"fix: sort folder listings before {before} (the reference uses os.listdir order, so "
                             f"its draws depend on the file system, not only on --seed)")


def checkpoint_path(save_path: str, obj: str, shot: int | None = None) -> Path:
    """`{save_path}/{obj}.pth` as the reference, or `{obj}_{shot}shot.pth` when the shot goes in the name."""
    return Path(save_path) / (f"{obj}.pth" if shot is None else f"{obj}_{shot}shot.pth")


def check_writable(path: Path, overwrite: bool) -> None:
    """Refuse, before any work, to replace a checkpoint that exists already (a downloaded one, say)."""
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists already: pass --overwrite to replace it, or choose another "
                              f"--save_path")


def save_checkpoint(model, path: Path, extras: dict) -> None:
    """The released layout plus extra keys, written atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    state = {name: {k: v.cpu() for k, v in sd.items()} for name, sd in model.adapter_state().items()}
    torch.save({**state, **extras}, tmp)
    os.replace(tmp, path)


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def versions(device: torch.device | None = None) -> dict:
    """Library versions; on a CUDA `device` (the run's) also what its fp16 autocast does to upsampling."""
    import PIL
    import sklearn
    return {"python": platform.python_version(), "torch": str(torch.__version__), "numpy": np.__version__,
            "scikit-learn": sklearn.__version__, "Pillow": PIL.__version__,
            "cuda": torch.version.cuda if torch.cuda.is_available() else None,
            "cuda_autocast_upsample": autocast_upsample_dtype(device) if device and device.type == "cuda" else None}


def autocast_upsample_dtype(device: torch.device) -> str:
    """What fp16 bilinear upsampling gives under the device's fp16 autocast, the reference's (spec Q7): on CUDA
    'torch.float16' in the torch releases of the paper's time (then its few-shot maps are float16), 'torch.float32'
    in recent ones."""
    x = torch.zeros(1, 1, 2, 2, device=device, dtype=torch.float16)
    with torch.autocast(device.type, dtype=torch.float16):
        return str(F.interpolate(x, size=4, mode="bilinear", align_corners=True).dtype)


def write_record(out_dir: str, script: str, args, result: dict, files: dict,
                 device: torch.device | None = None) -> Path:
    """A JSON per run: full-precision metrics, arguments, checksums of the weights used, library versions (and, on
    a CUDA `device`, what its autocast does to upsampling)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = out / f"{script}_{args.obj}_{stamp}_{os.getpid()}.json"
    n = 1
    while path.exists():  # a second run of the same script and dataset within the second, in one process
        n += 1
        path = out / f"{script}_{args.obj}_{stamp}_{os.getpid()}-{n}.json"
    record = {"script": script, "time": stamp, "args": vars(args), "metrics": result,
              "files": {name: {"path": str(p), "sha256": sha256(p)} for name, p in files.items() if p},
              "versions": versions(device)}
    path.write_text(json.dumps(record, indent=1, default=str))
    return path


def run_main(run, parser, argv) -> int:
    """Parse, run, and turn expected errors (bad files, flags, data) into a one-line message and exit code 2."""
    args = parser.parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        raise SystemExit(2) from None
    return 0


def one_line(e: Exception) -> str:
    """The message of `e`; for an error re-raised from a DataLoader worker ("Caught ValueError in DataLoader worker
    process 0." + the worker's traceback), the original error's message, which is the traceback's last line."""
    lines = str(e).strip().splitlines()
    if len(lines) > 1 and lines[0].startswith("Caught ") and "Traceback" in lines[1]:
        return lines[-1].split(": ", 1)[-1]
    return str(e)


def build_model(args, device: torch.device):
    """CLIP (frozen, eval mode) with fresh adapters after `--features_list`, on `device`."""
    from CLIP import CLIP_Inplanted, create_model
    clip = create_model(args.model_name, args.img_size, args.pretrain, device, checkpoint=args.clip_ckpt,
                        quick_gelu=args.quick_gelu, fused=args.fast)
    clip.requires_grad_(False)  # deviation: the reference asks gradients for the frozen backbone too (spec Q10)
    return CLIP_Inplanted(clip, args.features_list).to(device)


def clip_file(args) -> Path | None:
    from CLIP.loading import default_checkpoint
    return None if args.pretrain == "none" else Path(args.clip_ckpt or default_checkpoint(args.model_name))
