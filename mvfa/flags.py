"""The command-line flags the scripts share, one group per function (the reference's names and defaults), and
`one_line_errors`, which turns a failed check of the user's input into one line and exit code 2."""

import argparse
import contextlib
import sys

from utils import InputError

from .precision import PRECISIONS

SELECTIONS = ("test", "val", "last")
SUPPORTS = ("mvfa", "normal")
NORMALIZATIONS = ("test", "support")


def new_parser(description: str, obj: str | None = None) -> argparse.ArgumentParser:
    """A parser showing `description` (a script's docstring, with its example commands) as written; with
    `obj`, the flags every script takes (the reference's names and defaults), --obj defaulting to it."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    if obj:
        p.add_argument(
            "--obj",
            default=obj,
            help="dataset: Brain, Liver, Retina_RESC, Retina_OCT2017, Chest, "
            "Histopathology, or one's own in BMAD's layout (a folder path, or "
            "a folder name under --data_path; needs --prompt_name)",
        )
        p.add_argument(
            "--prompt_name",
            default=None,
            help="object name in the text prompts, e.g. 'knee MRI' (default: the BMAD dataset's)",
        )
        add_data_args(p)
        p.add_argument("--out_dir", default="./results/", help="where the run's JSON record is written")
        add_model_args(p)
        add_cache_args(p)
    return p


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """Where the data is and how it is read: --data_path, --seed, --num_workers."""
    parser.add_argument("--data_path", default="./data/", help="folder holding {obj}_AD/ in BMAD's layout")
    parser.add_argument("--seed", type=int, default=111, help="random seed")
    parser.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_model_args(parser) -> None:
    """The flags that build the model and set how it runs (also predict.py's)."""
    parser.add_argument(
        "--model_name", default="ViT-L-14-336", help="CLIP architecture (a CLIP/model_configs/*.json)"
    )
    parser.add_argument(
        "--pretrain",
        default="openai",
        choices=["openai", "none"],
        help="'openai': read --clip_ckpt; 'none': random weights (tests, demo)",
    )
    parser.add_argument(
        "--clip_ckpt",
        default=None,
        help="CLIP weights file (default CLIP/ckpt/ViT-L-14-336px.pt in this repository)",
    )
    parser.add_argument(
        "--batch_size",
        type=positive_int,
        default=1,
        help="images per forward of test and memory-bank passes (train_zero: also the size of its "
        "training groups); above 1 faster (8: ~1.3x on 2 CPU cores), not the reference's last "
        "bits",
    )
    parser.add_argument("--img_size", type=int, default=240, help="input resolution")
    parser.add_argument(
        "--features_list",
        type=int,
        nargs="+",
        default=[6, 12, 18, 24],
        help="1-based ViT block numbers followed by adapters",
    )
    parser.add_argument(
        "--device", default="auto", help="'auto' (cuda if available, else cpu), 'cpu', 'cuda:0', ..."
    )
    parser.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="'auto': fp16 autocast on CUDA as the reference, fp32 on the CPU; 'bf16' for GPUs and "
        "CPUs with bf16 instructions (AVX512-BF16/AMX; slower than fp32 on other CPUs)",
    )
    parser.add_argument(
        "--fast",
        action="store_true",
        help="fused attention, text prompts run over their own length: the same maths, faster, not "
        "the reference's last bits (printed 4-decimal results can move where scores nearly tie)",
    )
    parser.add_argument(
        "--quick_gelu",
        action="store_true",
        help="fix: use QuickGELU, the activation the CLIP weights were trained with (reference: GELU)",
    )
    parser.add_argument(
        "--clip_normalize",
        action="store_true",
        help="fix: normalise images with CLIP's mean/std (the reference feeds [0,1] pixels)",
    )


def add_cache_args(parser: argparse.ArgumentParser) -> None:
    """Where text features are kept between runs, and the switch that turns that off."""
    parser.add_argument(
        "--cache_dir",
        default=None,
        help="cache folder (default $XDG_CACHE_HOME/mvfa, else ~/.cache/mvfa): text features, reused bit for "
        "bit by runs with the same weights file, prompt, precision, attention path and device; a training "
        "run's prefix tokens beyond --prefix_cache_ram",
    )
    parser.add_argument(
        "--no_text_cache",
        action="store_true",
        help="encode the text prompts anew, neither reading nor writing the cache",
    )


def add_fewshot_args(parser, several: bool = False) -> None:
    parser.add_argument("--shot", type=int, default=4, help="number of normal and of abnormal support images")
    parser.add_argument(
        "--iterate",
        type=int,
        default=[0] if several else 0,
        nargs="+" if several else None,
        help="support list n-/a-{iterate} of dataset/fewshot_seed/{obj}/{shot}-shot.txt; -1 draws "
        "a support set with --seed" + ("; several values report mean ± std" if several else ""),
    )
    parser.add_argument(
        "--seed_dir",
        default=None,
        help="folder of the support lists {obj}/{shot}-shot.txt (default: dataset/fewshot_seed in "
        "this repository), or one list file in their format",
    )
    parser.add_argument(
        "--memory_no_cls",
        action="store_true",
        help="fix: leave the CLS token out of the memory bank (the reference keeps it)",
    )
    add_sort_listing_arg(parser, "the --iterate -1 draws of support images")


def add_support_arg(parser) -> None:
    parser.add_argument(
        "--support",
        default="mvfa",
        choices=SUPPORTS,
        help="mvfa: MVFA's few-shot test, the adapters trained on k normal + k abnormal images; normal: the "
        "k normal images alone (the n- line of the support list, or drawn from valid/good; nothing "
        "under valid/Ungood is read) with the target's zero-shot adapters, no training on the target",
    )


def add_normalize_args(parser, fewshot: bool) -> None:
    """--normalize, --calibration: scores min-max normalised over the test set (the reference's) or alone."""
    fitted_on = (
        "the k normal support images (each against the memory bank without its own views: leave one out) "
        "and the --calibration images"
        if fewshot
        else "the --calibration images"
    )
    parser.add_argument(
        "--normalize",
        default="test",
        choices=NORMALIZATIONS,
        help="test: min-max over the whole test set (the reference's: a score depends on the other test "
        f"images); support: min-max fitted on {fitted_on}, scores above that range kept, so that an "
        "image's score depends only on it, the weights and these normal images (one image per forward)",
    )
    parser.add_argument(
        "--calibration",
        default=None,
        metavar="DIR",
        help="a folder of normal images (or one image file) the --normalize support range is fitted on"
        + (" besides the support (needed with --shot 1)" if fewshot else " (needed there)"),
    )


def add_sort_listing_arg(parser, before: str) -> None:
    parser.add_argument(
        "--sort_listing",
        action="store_true",
        help=f"fix: sort folder listings before {before} (the reference uses os.listdir order, so "
        f"its draws depend on the file system, not only on --seed)",
    )


def add_training_args(p, lr: float, save_path: str) -> None:
    p.add_argument("--epoch", type=positive_int, default=50, help="training epochs")
    p.add_argument("--learning_rate", type=float, default=lr, help="Adam learning rate (betas 0.5, 0.999)")
    p.add_argument("--save_model", type=int, default=1, choices=[0, 1], help="1: save the selected adapters")
    p.add_argument(
        "--save_path", default=save_path, help="folder the adapter checkpoint {obj}.pth is saved in"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="allow replacing a checkpoint that existed before the run"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the training state beside the checkpoint ({obj}.pth.state), written after "
        "every epoch and on SIGTERM / SIGUSR1 / SIGUSR2; without one, start from the beginning",
    )
    p.add_argument(
        "--init_ckpt", default=None, help="start from these adapters (released layout) instead of random"
    )
    p.add_argument(
        "--select",
        default="test",
        choices=SELECTIONS,
        help="checkpoint selection: 'test' scores on the test set as the reference; 'val' on held-out "
        "valid images; 'last' keeps the final weights",
    )
    p.add_argument(
        "--deterministic",
        action="store_true",
        help="deterministic torch kernels where they exist (slower on CUDA; the reference's training is "
        "not bitwise reproducible on CUDA)",
    )
    p.add_argument(
        "--bce_on_probability",
        action="store_true",
        help="fix: image-level loss = BCE of the mean abnormal probability (the reference passes that "
        "probability to BCE-with-logits)",
    )
    p.add_argument(
        "--no_prefix_cache",
        action="store_true",
        help="recompute the frozen blocks before the first adapter at every pass instead of reusing their "
        "tokens (reuse is exact: the same computation on the same batch)",
    )
    p.add_argument(
        "--prefix_cache_ram",
        type=float,
        default=4.0,
        help="GiB of reused prefix tokens kept in memory (~1.2 MB per image at 240 px in fp32); more go to "
        "files under {cache_dir}/prefix/, removed when the run ends",
    )


def add_map_args(parser) -> None:
    parser.add_argument(
        "--save_maps",
        default=None,
        metavar="DIR",
        help="after evaluation write per test image DIR/{index:05d}_{label}_{stem}.png (normalised "
        "anomaly map, ground-truth outline, image score) and DIR/grid.png",
    )
    parser.add_argument(
        "--grid_n",
        type=positive_int,
        default=8,
        help="rows of DIR/grid.png: the top-scoring abnormal images, then the top-scoring normal ones",
    )
    parser.add_argument(
        "--save_scores",
        default=None,
        metavar="FILE",
        help="write what the metrics are computed from to FILE (.npz, test-set order): files, "
        "labels, image_scores and, for datasets with masks, the normalised anomaly maps and "
        "the masks at --img_size (several --iterate draws: FILE_iterate_{i}.npz)",
    )


@contextlib.contextmanager
def one_line_errors():
    """A check of the user's input that failed (utils.InputError) becomes a one-line message on stderr, with
    the flag that gave the value when the check names one, and exit code 2. Any other exception is a bug and
    keeps its traceback."""
    try:
        yield
    except InputError as e:
        # an error re-raised from a DataLoader worker carries the worker's traceback in its text ("Caught
        # BadValue in DataLoader worker process 0." + the traceback): the original message is its last line
        lines = str(e).strip().splitlines()
        worker = len(lines) > 1 and lines[0].startswith("Caught ") and "Traceback" in lines[1]
        message = lines[-1].split(": ", 1)[-1] if worker else str(e)
        flag = f"--{e.flag}: " if e.flag and f"--{e.flag}" not in message else ""
        print(f"error: {flag}{message}", file=sys.stderr)
        raise SystemExit(2) from None
