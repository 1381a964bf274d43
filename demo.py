"""Runs MVFA's few-shot training and test end to end on anything: no download, a few minutes on 2 CPU cores.

    python demo.py
    python demo.py --obj Liver --epoch 3

Without the OpenAI weights (CLIP/ckpt/ViT-L-14-336px.pt) it uses a small random-weight CLIP; without BMAD data
(./data/{obj}_AD) it generates a small synthetic benchmark in BMAD's layout. Then the numbers mean nothing:
the demo shows that the pipeline runs and what it writes. It prints and runs the two commands a user would
type.
"""

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from CLIP.loading import default_checkpoint
from dataset import CLASS_NAMES
from dataset.synthetic import make_synthetic_bmad

REPO = Path(__file__).resolve().parent


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--obj", default="Brain", choices=CLASS_NAMES, help="dataset to train and test on")
    p.add_argument("--shot", type=int, default=2, help="support images per class")
    p.add_argument("--epoch", type=int, default=2, help="training epochs")
    p.add_argument("--data_path", default="./data/", help="BMAD data, used when {obj}_AD is there")
    p.add_argument("--out", default="./demo/", help="folder for synthetic data, checkpoint and results")
    p.add_argument("--precision", default="auto", help="as in the scripts: auto, fp32, bf16, ...")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    out, data, seed_list, notes = Path(args.out), Path(args.data_path), [], []
    if not (data / f"{args.obj}_AD").is_dir():
        made = make_synthetic_bmad(str(out), n_per_split=6, seed=0, objs=(args.obj,), shots=(args.shot,))
        data, seed_list = Path(made.data), ["--seed_dir", made.seed_root]
        notes.append(
            f"BMAD data not found at {args.data_path}{args.obj}_AD: using synthetic images in {data}"
        )
    clip_weights = default_checkpoint("ViT-L-14-336")
    if clip_weights.is_file():
        model = ["--model_name", "ViT-L-14-336", "--features_list", "6", "12", "18", "24"]
    else:
        model = ["--model_name", "demo-tiny", "--pretrain", "none", "--features_list", "3", "6", "9", "12"]
        notes.append(f"CLIP weights not found at {clip_weights}: using a small random-weight CLIP")
    if notes:
        print("DEMO - the numbers below are meaningless:\n  " + "\n  ".join(notes))
    common = ["--obj", args.obj, "--shot", str(args.shot), "--data_path", str(data)]
    common += [
        "--save_path",
        str(out / "ckpt"),
        "--out_dir",
        str(out / "results"),
        "--precision",
        args.precision,
    ]
    common += [*model, *seed_list, "--shot_in_name"]
    commands = [
        ["train_few.py", *common, "--epoch", str(args.epoch), "--overwrite"],
        ["test_few.py", *common],
    ]
    for script, *flags in commands:
        print(f"$ python {script} {shlex.join(flags)}", flush=True)
        done = subprocess.run([sys.executable, str(REPO / script), *flags])
        if done.returncode:
            return done.returncode
    print(f"checkpoint: {out / 'ckpt'}, run records: {out / 'results'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
