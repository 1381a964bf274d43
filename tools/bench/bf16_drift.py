"""Where bf16 drift in MVFA's scores comes from, and what `--precision bf16` gives. CPU only.

    python -m tools.bench.bf16_drift few --obj Brain --shot 4 --iterate 0 \
        --clip_ckpt CLIP/ckpt/ViT-L-14-336px.pt
    python -m tools.bench.bf16_drift zero --obj Liver --clip_ckpt CLIP/ckpt/ViT-L-14-336px.pt
    python -m tools.bench.bf16_drift trained --out /tmp/drift --n_per_split 60 --shot 8 --epoch 5 \
        --model_name demo-tiny --pretrain none --features_list 3 6 9 12

`few` and `zero` take the flags of test_few.py and test_zero.py. The scores are recomposed from the
functions of mvfa/scoring.py with one stage at a time in bf16, the others in fp32: the forward (backbone and
adapters, test and memory-bank images), the text features, the text logits (token normalisation and product),
the softmax, the memory-bank similarities, the upsampling, and the layer sums with the min-max normalisation
and fusion; bf16 forwards take the fused attention, as the model config gives bf16 runs.
'library' rows run the scripts' own evaluation (build_memory, collect, evaluate).
Each row: Spearman correlation of the image scores with fp32's, the largest difference of the normalised maps,
the image and pixel AUROC minus fp32's. `trained` first writes a synthetic set with lesions (n_per_split
normal and abnormal images per split) and trains few-shot adapters on its support set (train_few.py --select
last, run as a subprocess), then measures them.
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from torch.utils.data import DataLoader

from dataset.augment import augment
from dataset.synthetic import make_synthetic_bmad
from mvfa import metrics
from mvfa.config import ModelConfig, RunConfig, pick
from mvfa.evaluation import PixelMaps, build_memory, collect, evaluate
from mvfa.flags import add_fewshot_args, add_map_args, new_parser
from mvfa.precision import Precision
from mvfa.protocol import prompt, test_set
from mvfa.scoring import minmax, patches, text_logits, unit_rows, upsample
from prompt import text_features_for

STAGES = ("forward", "text", "logits", "softmax", "memory", "upsample", "minmax")
CPU = torch.device("cpu")
REPO = Path(__file__).resolve().parents[2]


def cast(x: torch.Tensor, stage: str, low: set) -> torch.Tensor:
    """x in bfloat16 when `stage` is one of the `low` stages, else in float32."""
    return x.to(torch.bfloat16 if stage in low else torch.float32)


@torch.no_grad()
def forward_tokens(model, images: torch.Tensor, precision: str, batch_size: int) -> tuple[list, list]:
    """Seg and det tokens per layer [N, 1+HW, D], float32, of forwards under `precision` (fp32 or bf16)."""
    seg, det = [], []
    policy = Precision.of(precision, CPU)
    model.clipmodel.set_fused(policy.fused_attention)  # the attention the model config gives each precision
    for batch in images.split(batch_size):
        with policy.forward():
            _, s, d = model(batch)
        seg.append([t.float() for t in s])
        det.append([t.float() for t in d])
    return [torch.cat(layer) for layer in zip(*seg)], [torch.cat(layer) for layer in zip(*det)]


def bank(tokens: list[torch.Tensor]) -> list[torch.Tensor]:
    """Memory bank as build_memory's: per layer unit rows [N * (1+HW), D], CLS rows kept."""
    return [unit_rows(t.flatten(0, 1)) for t in tokens]


def logits(tokens: list[torch.Tensor], text: torch.Tensor, low: set) -> list[torch.Tensor]:
    """Per layer unit patch tokens x text features -> [N, HW, 2], in the 'logits' stage's dtype."""
    out = []
    for t in patches(tokens):
        t = cast(t, "logits", low)
        out.append(text_logits(t / t.norm(dim=-1, keepdim=True), cast(text, "logits", low)))
    return out


def distances(tokens: list[torch.Tensor], memory: list[torch.Tensor], low: set) -> list[torch.Tensor]:
    """Per layer 1 - max cosine similarity to the memory bank -> [N, HW], in the 'memory' stage's dtype."""
    out = []
    for mem, t in zip(memory, patches(tokens)):
        mem, q = cast(mem, "memory", low), unit_rows(cast(t, "memory", low))  # [M, D], [N, HW, D]
        out.append(1 - torch.stack([torch.mm(mem, qi.t()).amax(dim=0) for qi in q]))
    return out


def layer_sum(values: list[torch.Tensor], low: set, size: int, probability: bool) -> torch.Tensor:
    """Sum over layers of upsampled [N, HW, C] values (the softmax's abnormal channel if `probability`):
    [N, H, W]."""
    total = 0
    for v in values:
        up = upsample(cast(v if probability else v.unsqueeze(-1), "upsample", low), size)  # [N, C, H, W]
        m = cast(up, "softmax", low).softmax(dim=1)[:, 1] if probability else up[:, 0]
        total = cast(total + cast(m, "minmax", low), "minmax", low)
    return total


def normalised(a: torch.Tensor, low: set) -> torch.Tensor:
    a = cast(a, "minmax", low)
    return minmax(a, a.min(), a.max())


def recompose(inputs: dict, low: set) -> tuple[np.ndarray, np.ndarray | None]:
    """Image scores [N] and normalised pixel maps [N, H, W] (None without masks), the `low` stages in bf16."""
    tokens = inputs["tokens"]["bf16" if "forward" in low else "fp32"]
    text = inputs["text"]["bf16" if "text" in low else "fp32"]
    memory = inputs["memory"]["bf16" if "forward" in low else "fp32"]
    seg, det = tokens
    size, few = inputs["img_size"], memory is not None
    det_score = sum(
        cast(z, "softmax", low).softmax(-1)[..., 1].mean(-1).float() for z in logits(det, text, low)
    )
    if not inputs["has_masks"]:
        if not few:
            return normalised(det_score, low).float().numpy(), None
        few_image = (
            layer_sum(distances(det, memory[1], low), low, size, probability=False).float().mean(dim=(1, 2))
        )
        image = 0.5 * normalised(det_score, low) + 0.5 * normalised(few_image, low)
        return image.float().numpy(), None
    maps = [normalised(layer_sum(logits(seg, text, low), low, size, probability=True), low)]
    if few:
        maps.append(normalised(layer_sum(distances(seg, memory[0], low), low, size, probability=False), low))
    fused = (maps[0] if len(maps) == 1 else 0.5 * maps[0] + 0.5 * maps[1]).float()
    image = fused.amax(dim=(1, 2)) if few else normalised(det_score, low).float()
    return image.numpy(), fused.numpy()


def scores_of(labels, masks, image: np.ndarray, maps: np.ndarray | None) -> dict:
    """AUROCs of the scores; NaN where min-max met all-equal values (bf16 rounded every score alike)."""
    nan = float("nan")
    out = {
        "image": image,
        "maps": maps,
        "image_auroc": nan if np.isnan(image).any() else metrics.image_metrics(labels, image)["auroc"],
    }
    if maps is not None:
        out["pixel_auroc"] = (
            nan
            if np.isnan(maps).any()
            else metrics.pixel_metrics(lambda: [(maps, masks)], ("auroc",))["auroc"]
        )
    return out


def drift(row: dict, ref: dict) -> dict:
    """Spearman of the image scores, max |map difference|, AUROC differences of `row` against `ref`."""
    out = {
        "spearman": float(spearmanr(ref["image"], row["image"]).statistic),
        "d_image_auroc": row["image_auroc"] - ref["image_auroc"],
    }
    if row["maps"] is not None:
        out["max_map_diff"] = float(np.abs(row["maps"] - ref["maps"]).max())
        out["d_pixel_auroc"] = row["pixel_auroc"] - ref["pixel_auroc"]
    return out


def library(
    run: RunConfig, model, dataset, support: torch.Tensor | None, precision: str
) -> tuple[np.ndarray, np.ndarray]:
    """The scripts' evaluation under `precision`: image scores [N] and normalised maps [N, H, W] (None)."""
    policy, key = Precision.of(precision, CPU), prompt(run)
    text = text_features_for(model.clipmodel.set_fused(policy.fused_attention), [key], CPU, policy)[key]
    memory = None if support is None else build_memory(model, support, policy, run.batch_size)
    loader = DataLoader(dataset, batch_size=run.batch_size, shuffle=False)
    c = collect(model, loader, text, policy, has_masks=dataset.has_masks, memory=memory)
    result = evaluate(c, CPU, policy, pixel_extras=False)
    maps = PixelMaps(c, CPU, policy).chunk(0, len(c.labels)).numpy() if c.has_masks else None
    return np.array(result["image_scores"]), maps


def test_flags(protocol: str, argv: list[str]) -> dict:
    """argv parsed as test_few.py (few) or test_zero.py (zero) parses it: the same flag groups of mvfa.flags,
    the same defaults (a driver imports no script)."""
    few = protocol == "few"
    p = new_parser(__doc__, obj="Liver" if few else "Retina_RESC")
    if few:
        add_fewshot_args(p, several=True)
    p.add_argument(
        "--save_path",
        default="./ckpt/few-shot/" if few else "./ckpt/zero-shot/",
        help="folder of the adapter checkpoints {obj}.pth",
    )
    p.add_argument("--ckpt", default=None, help="adapter checkpoint file (overrides --save_path/{obj}.pth)")
    if few:
        p.add_argument(
            "--shot_in_name", action="store_true", help="read {obj}_{shot}shot.pth instead of {obj}.pth"
        )
    add_map_args(p)
    return vars(p.parse_args(argv))


def measure(protocol: str, argv: list[str]) -> list[tuple[str, dict]]:
    """Rows (name, figures) of one protocol's test run (its test script's flags in argv)."""
    flags = test_flags(protocol, argv)
    model_cfg, run = pick(ModelConfig, flags), pick(RunConfig, {**flags, "protocol": protocol})
    torch.manual_seed(run.seed)
    model = model_cfg.build(CPU, Precision.of(flags["precision"], CPU))
    model.load_adapters(run.checkpoint)
    dataset = test_set(run, run.iterate[0] if run.fewshot else None)
    items = [dataset[i] for i in range(len(dataset))]
    images = torch.stack([x for x, _, _ in items])  # [N, 3, H, W]
    labels, masks = (
        [y for _, y, _ in items],
        torch.stack([m[0] for _, _, m in items]).numpy() > 0.5,
    )  # [N, H, W]
    support = augment(dataset.support.normal)[0] if run.fewshot else None  # [11k, 3, H, W]
    key = prompt(run)
    inputs = {
        "img_size": run.img_size,
        "has_masks": dataset.has_masks,
        "tokens": {},
        "text": {},
        "memory": {},
    }
    for p in ("fp32", "bf16"):
        inputs["tokens"][p] = forward_tokens(model, images, p, run.batch_size)
        text = text_features_for(model.clipmodel, [key], CPU, Precision.of(p, CPU))[key]  # fused as above
        inputs["text"][p] = text.float()
        inputs["memory"][p] = (
            None
            if support is None
            else tuple(bank(t) for t in forward_tokens(model, support, p, run.batch_size))
        )
    ref = scores_of(labels, masks, *recompose(inputs, set()))
    rows = [("fp32 (values)", {k: v for k, v in ref.items() if k.endswith("auroc")})]
    stages = [s for s in STAGES if s != "memory" or support is not None]
    for name, low in [
        *((s, {s}) for s in stages),
        ("forward, text", {"forward", "text"}),
        ("all stages (former bf16 mode)", set(stages)),
    ]:
        rows.append((name, drift(scores_of(labels, masks, *recompose(inputs, low)), ref)))
    lib_ref = scores_of(labels, masks, *library(run, model, dataset, support, "fp32"))
    rows.append(("library fp32 vs recomposed fp32", drift(lib_ref, ref)))
    lib_bf16 = scores_of(labels, masks, *library(run, model, dataset, support, "bf16"))
    rows.append(("library --precision bf16", drift(lib_bf16, lib_ref)))
    return rows


def table(title: str, rows: list[tuple[str, dict]]) -> str:
    """A Markdown table of the rows."""
    cols = ("spearman", "max_map_diff", "d_image_auroc", "d_pixel_auroc")
    lines = [
        f"### {title}",
        "",
        "| in bf16 | image-score Spearman | max map diff | Δ image AUROC | Δ pixel AUROC |",
        "|---|---|---|---|---|",
    ]
    values = rows[0][1]
    lines.append(
        f"| fp32 values | | | {values['image_auroc']:.4f} | {values.get('pixel_auroc', float('nan')):.4f} |"
    )
    for name, r in rows[1:]:
        lines.append(
            f"| {name} | "
            + " | ".join(
                f"{r[c]:+.4f}" if c.startswith("d_") else f"{r[c]:.4f}" if c in r else "-" for c in cols
            )
            + " |"
        )
    return "\n".join(lines)


def trained(argv: list[str]) -> list[tuple[str, dict]]:
    """Synthetic set with lesions, few-shot adapters trained on its support set, then the few-shot rows."""
    p = new_parser(__doc__)
    p.add_argument("--out", required=True, help="folder for the synthetic set, checkpoint and run records")
    p.add_argument("--obj", default="Brain", help="synthetic dataset style")
    p.add_argument("--shot", type=int, default=4, help="support images per class")
    p.add_argument("--n_per_split", type=int, default=60, help="normal and abnormal images per split")
    p.add_argument("--synth_seed", type=int, default=1, help="seed of the synthetic set")
    p.add_argument("--epoch", type=int, default=5, help="training epochs")
    args, model_flags = p.parse_known_args(argv)
    made = make_synthetic_bmad(
        args.out, n_per_split=args.n_per_split, seed=args.synth_seed, objs=(args.obj,), shots=(args.shot,)
    )
    common = [
        "--obj",
        args.obj,
        "--shot",
        str(args.shot),
        "--data_path",
        made.data,
        "--seed_dir",
        made.seed_root,
        "--out_dir",
        f"{args.out}/results",
        *model_flags,
    ]
    ckpt = Path(args.out) / "ckpt" / f"{args.obj}.pth"
    if not ckpt.is_file():  # trained once; a second call measures the same adapters
        train = [
            sys.executable,
            str(REPO / "train_few.py"),
            *common,
            "--epoch",
            str(args.epoch),
            "--select",
            "last",
            "--save_path",
            str(ckpt.parent),
        ]
        trained_run = subprocess.run(train)  # its output goes to this one's stdout and stderr
        if trained_run.returncode:
            raise SystemExit(trained_run.returncode)
    return measure("few", common + ["--iterate", "0", "--ckpt", str(ckpt)])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in ("few", "zero", "trained"):
        print(__doc__)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    protocol, rest = argv[0], argv[1:]
    rows = trained(rest) if protocol == "trained" else measure(protocol, rest)
    print(table(f"{protocol}: {' '.join(rest)}", rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
