"""Peak memory and time of the pixel metrics on N synthetic 240x240 test images.

    python bench/eval_memory.py                      # metrics.pixel_metrics on streamed maps: N = 500 (+ sklearn), 4000
    python bench/eval_memory.py --through evaluate   # the scripts' whole path: evaluate.evaluate on collected scores
    python bench/eval_memory.py --n 500 1000 --chunk 32
`--through evaluate` starts from what `evaluate.collect` keeps per image (17x17 logits and distances of 4 layers,
packed masks), recomputes the 240x240 maps chunk by chunk and computes every metric, as the test scripts do.
Each N runs in a fresh subprocess so that peaks do not mix; prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cli import new_parser  # noqa: E402
from metrics import pixel_metrics  # noqa: E402

SIZE = 240


def synthetic_chunk(seed: int, index: int, n: int, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Chunk `index`: float32 scores [n, size, size] (noise + a random boost on blobs) and bool blob masks."""
    rng = np.random.default_rng([seed, index])
    masks = np.zeros((n, size, size), bool)
    scores = rng.standard_normal((n, size, size), dtype=np.float32)
    for i in range(n):
        for _ in range(0 if rng.random() < 0.2 else int(rng.integers(1, 4))):  # 20 % normal images
            cy, cx = rng.uniform(0, size, 2)
            ry, rx = rng.uniform(4, 30, 2)
            y0, y1, x0, x1 = int(max(cy - ry, 0)), int(min(cy + ry + 1, size)), int(max(cx - rx, 0)), int(
                min(cx + rx + 1, size))
            yy, xx = np.ogrid[y0:y1, x0:x1]
            blob = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1  # [y1-y0, x1-x0]
            masks[i, y0:y1, x0:x1] |= blob
            scores[i, y0:y1, x0:x1][blob] += rng.uniform(0.0, 3.0)
    return scores, masks


def _status(key: str) -> int:
    """A /proc/self/status entry in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status (this benchmark needs Linux)")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def worker(n: int, seed: int, chunk: int, check: bool) -> dict:
    """Run pixel_metrics on N synthetic images in this process; time, peak RSS increase, optional sklearn check."""
    counts = {"passes": 0}

    def chunks():
        counts["passes"] += 1
        return (synthetic_chunk(seed, i, min(chunk, n - i * chunk)) for i in range(math.ceil(n / chunk)))

    t0 = time.perf_counter()
    positives = sum(int(m.sum()) for _, m in chunks())
    gen_s = time.perf_counter() - t0
    counts["passes"] = 0
    reset = _reset_peak()
    base = _status("VmRSS")
    t0 = time.perf_counter()
    res = pixel_metrics(chunks)
    wall = time.perf_counter() - t0
    out = {"n": n, "pixels": n * SIZE * SIZE, "positives": positives, "passes": counts["passes"], "wall_s": wall,
           "gen_s": gen_s, "peak_increase": _status("VmHWM") - base, "peak_reset": reset, **res}
    if check:
        from sklearn.metrics import average_precision_score, roc_auc_score
        parts = list(chunks())
        y = np.concatenate([m.reshape(-1) for _, m in parts])
        s = np.concatenate([a.reshape(-1) for a, _ in parts])
        out["sklearn_auroc"], out["sklearn_ap"] = float(roc_auc_score(y, s)), float(average_precision_score(y, s))
    return out


def worker_evaluate(n: int, seed: int) -> dict:
    """evaluate.evaluate (few-shot, masks) on N images of random low-resolution scores, memory counted from zero."""
    import torch
    from evaluate import Collected, evaluate
    reset = _reset_peak()
    base = _status("VmRSS")
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    c = Collected(True, SIZE)
    positives = 0
    for i in range(n):
        label = int(i % 5 != 0)  # 20 % normal images
        _, mask = synthetic_chunk(seed, i, 1) if label else (None, np.zeros((1, SIZE, SIZE), bool))
        positives += int(mask.sum())
        c.labels.append(label)
        c.masks.append(np.packbits(mask.reshape(-1)))
        c.zero_image.append(float(torch.rand(1, generator=g)))
        c.zero_logits.append(torch.randn(4, 289, 2, generator=g))  # [layers, HW, 2]
        c.few_distances.append(torch.rand(4, 289, generator=g))  # [layers, HW]
    gen_s = time.perf_counter() - t0
    res = evaluate(c, fewshot=True, device=torch.device("cpu"))
    return {"n": n, "pixels": n * SIZE * SIZE, "positives": positives, "passes": "-", "gen_s": gen_s,
            "wall_s": time.perf_counter() - t0 - gen_s, "peak_increase": _status("VmHWM") - base,
            "peak_reset": reset, "auroc": res["pixel_auroc"], "aupro": res["pixel_aupro"]}


def _row(r: dict) -> str:
    f16 = r["pixels"] * 2
    check = "-" if "sklearn_auroc" not in r else (
        f"{'equal' if abs(r['auroc'] - r['sklearn_auroc']) <= 1e-12 else 'DIFFERENT'} "
        f"(d={r['auroc'] - r['sklearn_auroc']:.1e}; AP d={r['ap'] - r['sklearn_ap']:.1e})")
    return (f"| {r['n']} | {r['pixels'] / 1e6:.1f} M | {100 * r['positives'] / r['pixels']:.2f} % | {r['passes']} | "
            f"{r['wall_s']:.1f} s (+{r['gen_s']:.1f} s generating) | {r['peak_increase'] / 2**20:.1f} MiB | "
            f"{f16 / 2**20:.1f} MiB | {r['peak_increase'] / f16:.3f} | {r['auroc']:.6f} | {r['aupro']:.4f} | "
            f"{check} |")


def main(argv=None) -> None:
    p = new_parser(__doc__)
    p.add_argument("--n", type=int, nargs="+", default=[500, 4000], help="numbers of 240x240 images, one run each")
    p.add_argument("--chunk", type=int, default=16, help="images per streamed chunk")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic maps")
    p.add_argument("--check-max", type=int, default=500,
                   help="compare with sklearn (all pixels in memory) for N up to this")
    p.add_argument("--through", default="metrics", choices=["metrics", "evaluate"],
                   help="'metrics': pixel_metrics on streamed maps; 'evaluate': the scripts' whole evaluation path")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if any(n < 1 for n in args.n) or args.chunk < 1:
        raise SystemExit("eval_memory: --n and --chunk must be positive integers")
    if args.worker is not None:
        if args.through == "evaluate":
            print(json.dumps(worker_evaluate(args.worker, args.seed)))
        else:
            print(json.dumps(worker(args.worker, args.seed, args.chunk, args.worker <= args.check_max)))
        return
    print("| N images | pixels | positive | passes | wall time | peak RSS increase | float16 maps | ratio | "
          "pixel AUROC | AUPRO | sklearn AUROC check |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n in args.n:
        cmd = [sys.executable, __file__, "--worker", str(n), "--chunk", str(args.chunk), "--seed", str(args.seed),
               "--check-max", str(args.check_max), "--through", args.through]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"eval_memory: the run for N={n} failed:\n{done.stderr}")
        print(_row(json.loads(done.stdout.strip().splitlines()[-1])), flush=True)


if __name__ == "__main__":
    main()
