"""Whole-process timings of the scripts with and without reuse (the text-feature cache and the frozen prefix),
and of the authors' implementation on the same inputs, one after the other on the same machine; every variant
of a command must print the same result lines.

    python tests/reference_inputs.py /tmp/seed0        # the seed-0 inputs (~15 s, ~1.4 GB)
    python -m tools.bench.reuse --inputs /tmp/seed0 [--reference DIR --reference_python PY]

Variants: `reference` runs the command in DIR, a scratch checkout of the authors' code
(https://github.com/MediaBrain-SJTU/MVFA-AD) with the same inputs laid out in it (CLIP/ckpt/, ckpt/,
data/, dataset/fewshot_seed/; its training scripts overwrite ckpt/), with PY (an interpreter with its
requirements); on a CPU it needs the one change of MVFA_SPEC.md Q1 (the device of a discarded
tensor). `before` turns off every cache its script has (trainings: --no_text_cache --no_prefix_cache;
test scripts: --no_text_cache); `cold` reuses within the run and starts from an empty cache folder;
`warm` finds the text features of an earlier run in the cache folder.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mvfa.flags import new_parser

REPO = Path(__file__).resolve().parents[2]
COMMANDS = {
    "train_few": ["train_few.py", "--obj", "Brain", "--shot", "4", "--iterate", "0", "--epoch", "2"],
    "train_zero": ["train_zero.py", "--obj", "Liver", "--epoch", "1"],
    "test_few": ["test_few.py", "--obj", "Brain", "--shot", "4", "--iterate", "0"],
    "test_zero": ["test_zero.py", "--obj", "Liver"],
}
VARIANTS = ("reference", "before", "cold", "warm")
BASES = ("reference", "before")  # the ratio columns


def result_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if " AUC : " in line or " pAUC : " in line]


def script_words(name: str, epoch: int | None) -> list[str]:
    """The listed command, with --epoch `epoch` for a training when given."""
    words = list(COMMANDS[name])
    if epoch is not None and "--epoch" in words:
        words[words.index("--epoch") + 1] = str(epoch)
    return words


def before_flags(name: str) -> list[str]:
    """Every cache off: the test scripts have only the text cache (no image is seen twice there)."""
    return ["--no_text_cache", "--no_prefix_cache"] if name.startswith("train") else ["--no_text_cache"]


def command_line(name: str, script: list[str], inputs: Path, work: Path) -> list[str]:
    """The command `script` on the inputs in `inputs`; the outputs of training in `work`."""
    words = [sys.executable, *script]
    words += ["--clip_ckpt", str(inputs / "CLIP/ckpt/ViT-L-14-336px.pt"), "--data_path", str(inputs / "data")]
    words += ["--device", "cpu", "--out_dir", str(work / "results")]
    if "few" in name:
        words += ["--seed_dir", str(inputs / "dataset/fewshot_seed")]
    if name.startswith("train"):
        words += ["--save_path", str(work / "ckpt"), "--overwrite"]
    else:
        words += ["--save_path", str(inputs / "ckpt" / ("few-shot" if "few" in name else "zero-shot"))]
    return words


def timed_run(words: list[str], cwd: Path = REPO) -> tuple[float, list[str]]:
    start = time.perf_counter()
    out = subprocess.run(words, cwd=cwd, capture_output=True, text=True, env=dict(os.environ))
    seconds = time.perf_counter() - start
    if out.returncode:
        raise SystemExit(f"{' '.join(words)} failed:\n{out.stderr[-2000:]}")
    return seconds, result_lines(out.stdout)


def main(argv=None) -> int:
    p = new_parser(__doc__)
    p.add_argument("--inputs", required=True, help="the seed-0 inputs (python tests/reference_inputs.py DIR)")
    p.add_argument("--commands", nargs="+", default=list(COMMANDS), choices=COMMANDS, help="what to time")
    p.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS, help="what to time, in this order"
    )
    p.add_argument("--epoch", type=int, help="the trainings' --epoch instead of the listed one")
    p.add_argument("--reference", help="a scratch checkout of the authors' code with the inputs (see above)")
    p.add_argument("--reference_python", default=sys.executable, help="the interpreter for --reference")
    args = p.parse_args(argv)
    if "reference" in args.variants and not args.reference:
        args.variants.remove("reference")
    inputs = Path(args.inputs).resolve()
    if not (inputs / "CLIP/ckpt/ViT-L-14-336px.pt").is_file():
        raise SystemExit(
            f"--inputs {inputs}: no CLIP/ckpt/ViT-L-14-336px.pt; make the inputs first (see --help)"
        )
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"{os.cpu_count()} CPU threads, torch {torch.__version__}, kernels {capability}")
    print("| command | variant | seconds | of `reference` | of `before` |")
    print("|---|---|---|---|---|")
    for name in args.commands:
        work = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
        cache = work / "cache"
        script = script_words(name, args.epoch)
        words = command_line(name, script, inputs, work)
        times, printed = {}, {}
        for variant in args.variants:
            if variant == "reference":
                reference = Path(args.reference).resolve()
                run = [args.reference_python, *script]
                times[variant], printed[variant] = timed_run(run, reference)
            else:
                if variant == "cold":
                    shutil.rmtree(cache, ignore_errors=True)
                elif variant == "warm" and not (cache / "text").is_dir():
                    timed_run([*words, "--cache_dir", str(cache)])  # fills the text cache first
                flags = before_flags(name) if variant == "before" else []
                run = [*words, "--cache_dir", str(cache), *flags]
                times[variant], printed[variant] = timed_run(run)
            ratios = [f"{times[variant] / times[base]:.2f}" if base in times else "" for base in BASES]
            print(
                f"| `{' '.join(script)}` | {variant} | {times[variant]:.0f} | {' | '.join(ratios)} |",
                flush=True,
            )
        if len({tuple(lines) for lines in printed.values()}) != 1:
            raise SystemExit(f"{name}: the variants printed different result lines: {printed}")
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
