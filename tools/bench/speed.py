"""Per-stage speed of MVFA's pipeline: time, images/s, achieved GFLOP/s against the machine's matrix-product
rate;
the evaluation's time and peak memory for 500 and 4,000 test images (stage metrics, 'batch' = images).

    python -m tools.bench.speed                    # CPU: fp32 and bf16, ViT-L/14 at 240 with random weights
    python -m tools.bench.speed --device cuda --precisions fp16 bf16 --batch_sizes 1 32
    python -m tools.bench.speed --clip_ckpt CLIP/ckpt/ViT-L-14-336px.pt   # also times loading the real file

Each stage runs in a fresh subprocess so that its peak memory (ru_maxrss, or torch's CUDA peak) is its own.
Public tools only: time.perf_counter, torch.utils.benchmark, resource.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils import benchmark

from CLIP import CLIP_Inplanted, create_model
from dataset.augment import augment
from mvfa.config import ModelConfig
from mvfa.flags import new_parser
from mvfa.precision import Precision
from mvfa.prefix_cache import PrefixCache
from prompt import encode_text_with_prompt_ensemble

STAGES = (
    "init_draws",
    "load",
    "text",
    "forward",
    "forward_reused",
    "memory_bank",
    "train_step",
    "train_step_reused",
    "train_step_unfrozen",
    "metrics",
)


def vision_gflops(model: CLIP_Inplanted, img_size: int) -> float:
    """Multiply-adds x 2 of one adapted ViT forward: patch conv, blocks (projections, attention, MLP) and
    adapters."""
    v = model.image_encoder
    width, patch = v.conv1.out_channels, v.patch_size
    n = (img_size // patch) ** 2 + 1  # tokens incl. CLS
    block = (
        n * (4 * width * width + 2 * width * 4 * width) + 2 * n * n * width
    )  # projections + MLP + QK^T, AV
    adapters = len(model.features) * 2 * n * 2 * width * model.seg_adapters[0].fc1[0].out_features
    conv = (n - 1) * width * 3 * patch * patch
    return 2 * (len(v.transformer.resblocks) * block + adapters + conv) / 1e9


def matmul_gflops(device: torch.device, dtype: torch.dtype) -> float:
    """The n x n matrix-product rate: n = 2048 on the CPU, 8192 on a GPU (near its peak)."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    timer = benchmark.Timer("a @ b", globals={"a": a, "b": b}, num_threads=torch.get_num_threads())
    t = timer.blocked_autorange(min_run_time=2).median
    return 2 * n**3 / t / 1e9


def timed(fn, repeat: int = 1, device: torch.device | None = None, warmup: bool = True) -> float:
    """Median seconds of `fn()` over `repeat` runs, after one warm-up run."""
    if warmup:
        fn()
    times = []
    for _ in range(repeat):
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_bytes(key: str) -> int:
    """A /proc/self/status entry (VmRSS, VmHWM) in bytes; Linux only."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key + ":"))
    return int(line.split()[1]) * 1024


def evaluation_figures(n: int, size: int) -> dict:
    """Time and peak-memory increase of the evaluation of n images from what collect keeps (17x17 material of
    4 layers, packed masks with 0-3 elliptic lesions on 4 images of 5), and the full-size maps they stand
    for."""
    # imported before the peak is reset: its libraries are not counted
    from mvfa.evaluation import Collected, evaluate

    Path("/proc/self/clear_refs").write_text("5")  # peak RSS (VmHWM) := current RSS
    base = rss_bytes("VmRSS")
    g, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
    c, yy, xx = Collected(has_masks=True, img_size=size, head="seg"), *np.ogrid[:size, :size]
    for i in range(n):
        mask = np.zeros((size, size), bool)
        for _ in range(int(rng.integers(1, 4)) if i % 5 else 0):
            (cy, cx), (ry, rx) = rng.uniform(0, size, 2), rng.uniform(4, 30, 2)
            mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1  # [H, W]
        c.labels.append(int(mask.any()))
        c.masks.append(np.packbits(mask.reshape(-1)))
        c.zero_image.append(float(torch.rand(1, generator=g)))
        c.logits.append(torch.randn(4, 289, 2, generator=g))  # [layers, HW, 2]
        c.distances.append(torch.rand(4, 289, generator=g))  # [layers, HW]
    cpu = torch.device("cpu")
    start = time.perf_counter()
    result = evaluate(c, cpu, Precision.of("auto", cpu))
    return {
        "seconds": time.perf_counter() - start,
        "peak_increase_mb": (rss_bytes("VmHWM") - base) / 2**20,
        "maps_fp16_mb": n * size * size * 2 / 2**20,
        "pixel_auroc": result["pixel_auroc"],
    }


def run_stage(args) -> dict:
    """One stage, in this process; returns its figures."""
    device, stage, prec = torch.device(args.device), args.stage, args.precision
    precision = Precision.of(prec, device)
    # init_draws: what create_model draws for the reference's two CLIP constructions (a throw-away one at the
    # checkpoint's resolution, then the one it runs), which advance the generator its adapters are drawn from
    if stage == "init_draws":
        from CLIP.init_draws import advance, reference_init_draws
        from CLIP.loading import load_config

        config = load_config(args.model_name)
        used = {**config, "vision_cfg": {**config["vision_cfg"], "image_size": args.img_size}}
        before, start = peak_mb(device), time.perf_counter()
        advance(reference_init_draws(config) + reference_init_draws(used))
        return {"seconds": time.perf_counter() - start, "peak_increase_mb": peak_mb(device) - before}
    if stage == "load":
        start = time.perf_counter()
        create_model(
            args.model_name,
            args.img_size,
            "openai" if args.clip_ckpt else "none",
            device,
            checkpoint=args.clip_ckpt,
        )
        return {"seconds": time.perf_counter() - start}
    if stage == "metrics":  # evaluate (few-shot, masks) on N = --batch_size test images of random scores
        return evaluation_figures(args.batch_size, args.img_size)
    model_cfg = ModelConfig(
        model_name=args.model_name, pretrain="none", img_size=args.img_size, fast=args.fast
    )
    model = model_cfg.build(device, precision)  # frozen CLIP (fused attention with --fast or bf16), adapters
    if stage.endswith("_reused"):  # the same batch again: the frozen prefix's tokens from the cache
        model.prefix_cache = PrefixCache(64.0, Path(tempfile.mkdtemp()))
        stage = stage.removesuffix("_reused")
    clip = model.clipmodel
    images = torch.rand(args.batch_size, 3, args.img_size, args.img_size, device=device)
    flops = vision_gflops(model, args.img_size)
    if (
        stage == "text"
    ):  # the reference's pass (all rows over 77 positions) against --fast (rows over their length)
        with torch.no_grad(), precision.forward():
            clip.set_fused(fused=False)
            exact = timed(lambda: encode_text_with_prompt_ensemble(clip, "Brain", device), 1, device)
            clip.set_fused(fused=True)
            fast = timed(lambda: encode_text_with_prompt_ensemble(clip, "Brain", device), 3, device)
        return {"seconds": exact, "fast_seconds": fast, "ratio": fast / exact}
    if stage in ("forward", "memory_bank"):
        if stage == "memory_bank":  # 4-shot: 44 augmented normal images
            from mvfa.evaluation import build_memory

            support, _ = augment(torch.rand(4, 3, args.img_size, args.img_size))
            sec = timed(
                lambda: build_memory(model, support, precision, args.batch_size), 1, device, warmup=False
            )
            return {"seconds": sec, "images_per_s": len(support) / sec, "gflops": flops * len(support) / sec}
        with torch.inference_mode(), precision.forward():
            sec = timed(lambda: model(images), args.repeat, device)
        return {
            "seconds": sec,
            "images_per_s": args.batch_size / sec,
            "gflops": flops * args.batch_size / sec,
        }
    if stage.startswith(
        "train_step"
    ):  # training.train_step: forward, seg + det losses, backward, both Adam steps
        from mvfa.training import optimizers, train_step

        if stage == "train_step_unfrozen":  # as the reference: gradients for all 428 M backbone parameters
            clip.requires_grad_(True)
        seg_opt, det_opt = optimizers(model, 1e-3)
        text = torch.nn.functional.normalize(
            torch.randn(clip.text_projection.shape[1], 2, device=device), dim=0
        )
        masks = (torch.rand(args.batch_size, 1, args.img_size, args.img_size) > 0.9).float()
        labels = torch.ones(args.batch_size)
        sec = timed(
            lambda: train_step(
                model,
                images,
                labels,
                masks,
                text,
                has_masks=True,
                optimizers=(seg_opt, det_opt),
                precision=precision,
                img_size=args.img_size,
            ),
            args.repeat,
            device,
        )
        return {"seconds": sec, "images_per_s": args.batch_size / sec}
    raise ValueError(f"unknown --stage {stage}")


def driver(args) -> None:
    device = torch.device(args.device)
    rates = {
        p: matmul_gflops(
            device, torch.bfloat16 if p == "bf16" else torch.float16 if p == "fp16" else torch.float32
        )
        for p in args.precisions
    }
    rows = []
    for prec in args.precisions:
        for stage in args.stages:
            sizes = (
                args.batch_sizes
                if stage in ("forward", "forward_reused", "memory_bank", "train_step", "train_step_reused")
                else args.metric_images
                if stage == "metrics"
                else [1]
            )
            if stage in ("init_draws", "metrics") and prec != args.precisions[0]:
                continue  # no precision of their own
            for bs in sizes:
                cmd = [
                    sys.executable,
                    "-m",
                    "tools.bench.speed",
                    "--stage",
                    stage,
                    "--precision",
                    prec,
                    "--device",
                    args.device,
                    "--batch_size",
                    str(bs),
                    "--repeat",
                    str(args.repeat),
                    "--img_size",
                    str(args.img_size),
                    "--model_name",
                    args.model_name,
                    *(["--fast"] if args.fast else []),
                ]
                if args.clip_ckpt:
                    cmd += ["--clip_ckpt", args.clip_ckpt]
                out = subprocess.run(
                    cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}
                )
                if out.returncode:
                    print(out.stderr[-2000:], file=sys.stderr)
                    continue
                r = json.loads(out.stdout.strip().splitlines()[-1])
                r.update(stage=stage, precision=prec, batch=bs, matmul_gflops=rates[prec])
                rows.append(r)
                print(format_row(r), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"device": describe(device), "rows": rows}, indent=1))


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return (
        f"{os.cpu_count()} CPU threads, torch {torch.__version__}, {torch.get_num_threads()} intra-op threads"
    )


def format_row(r: dict) -> str:
    g = r.get("gflops")
    frac = f"{g / r['matmul_gflops']:.0%}" if g else ""
    extra = f"--fast: {r['fast_seconds']:.3f} s ({r['ratio']:.3f} of it)" if "ratio" in r else ""
    if "peak_increase_mb" in r:
        extra = f"peak increase {r['peak_increase_mb']:.1f} MB"
    if "maps_fp16_mb" in r:
        extra += f" (the maps in float16: {r['maps_fp16_mb']:.1f} MB)"
    return (
        f"| {r['stage']} | {r['precision']} | {r['batch']} | {r['seconds']:.3f} | "
        f"{r.get('images_per_s', 0):.2f} | {g or 0:.0f} | {r['matmul_gflops']:.0f} | {frac} | "
        f"{r['peak_mb']:.0f} | {extra} |"
    )


def main(argv=None) -> int:
    p = new_parser(__doc__)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], help="fp32, bf16, fp16, amp")
    p.add_argument(
        "--batch_sizes",
        type=int,
        nargs="+",
        default=[1],
        help="batch sizes of the forward, memory-bank and training-step stages",
    )
    p.add_argument(
        "--metric_images",
        type=int,
        nargs="+",
        default=[500, 4000],
        help="test-set sizes of the metrics stage (time and peak memory of the whole evaluation)",
    )
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES, help="stages to run")
    p.add_argument("--repeat", type=int, default=3, help="timed repetitions (median reported)")
    p.add_argument("--img_size", type=int, default=240, help="input resolution")
    p.add_argument("--model_name", default="ViT-L-14-336", help="architecture")
    p.add_argument(
        "--fast", action="store_true", help="fused attention, as the scripts' --fast (bf16 always takes it)"
    )
    p.add_argument("--clip_ckpt", default=None, help="a CLIP weights file, to time the load stage on it")
    p.add_argument("--out", default="results/bench_speed.json", help="JSON of all rows")
    p.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--batch_size", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.stage:  # child process: one stage
        torch.manual_seed(0)
        r = run_stage(args)
        r["peak_mb"] = peak_mb(torch.device(args.device))
        print(json.dumps(r))
        return 0
    print(f"device: {describe(torch.device(args.device))}")
    print(
        "| stage | precision | batch | seconds | images/s | GFLOP/s | matmul GFLOP/s | fraction | peak MB | |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    driver(args)
    return 0


if __name__ == "__main__":
    main()
