"""A local web app for one's own scans (gradio: `pip install -r requirements-app.txt`): upload images, choose
the dataset or prompt name, the protocol (zero-shot; few-shot or normal-only with uploaded normal support
images) and a threshold; see each overlay, score and decision. Every request runs `python -m tools.predict` on
the uploads: its numbers.

    python -m tools.app                                   # http://127.0.0.1:7860, checkpoints under ./ckpt/
    python -m tools.app --ckpt_dir my_ckpts/ --port 8000 --precision bf16
    python -m tools.app --host 0.0.0.0                    # open to every machine that can reach this one

The page and the API bind 127.0.0.1 (this machine only) unless --host says otherwise; to share it, forward the
port (ssh -L 7860:127.0.0.1:7860 host) rather than exposing it. The API endpoint `/predict` takes the same
inputs as the page and returns the rows of tools.predict ({file, score, decision}); its call from Python is
shown by the page's "Use via API" link. Model flags (--model_name, --img_size, --precision, --device,
--cache_dir, ...) are passed on to tools.predict (a wrong one is its error on the page). Each request starts
tools.predict, which builds the model and reads its weights anew.
"""

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import gradio as gr
from PIL import Image

from dataset import DATASETS
from mvfa.flags import new_parser

PROTOCOLS = ("zero-shot", "few-shot", "normal-only")
# normal-only (README, "Normal-only few-shot"): the zero-shot adapters with a memory bank of the uploaded
# normal images, scores that stand alone (fitted on those images, each left out in turn: 2 or more)
CKPT_FOLDER = {"zero-shot": "zero-shot", "few-shot": "few-shot", "normal-only": "zero-shot"}
REPO = Path(__file__).resolve().parents[1]  # where `python -m tools.predict` is found


def stage(files: list[str], folder: Path) -> dict[str, str]:
    """The uploads copied into `folder` under their own names (a repeated name prefixed with its upload
    index); returns staged name -> uploaded name."""
    folder.mkdir(parents=True)
    names = {}
    for i, f in enumerate(files):
        name = Path(f).name
        staged = name if name not in names else f"{i:03d}_{name}"
        shutil.copy(f, folder / staged)
        names[staged] = name
    return names


def checkpoint(ckpt_dir: str, protocol: str, name: str, given: str) -> str:
    """The checkpoint field, else the released layout {ckpt_dir}/{few-shot or zero-shot}/{name}.pth."""
    released = Path(ckpt_dir) / CKPT_FOLDER[protocol] / f"{name}.pth"
    path = Path(given) if given and given.strip() else released
    if not path.is_file():
        raise gr.Error(f"checkpoint {path}: no such file; type the path of an adapter checkpoint")
    return str(path)


def run_predict(argv: list[str], out: Path) -> list[dict]:
    """`python -m tools.predict ARGV --out OUT` as a subprocess (a command line never imports another): the
    rows of its scores.csv ({file, score}, the floats it wrote); its one-line error shown on the page."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-m", "tools.predict", *argv, "--out", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": path},
    )
    if done.returncode:
        lines = done.stderr.strip().splitlines()
        raise gr.Error(lines[-1] if lines else f"tools.predict stopped with exit code {done.returncode}")
    with open(out / "scores.csv", newline="", encoding="utf-8") as f:
        return [{"file": row["file"], "score": float(row["score"])} for row in csv.DictReader(f)]


def make_handler(ckpt_dir: str, model_flags: list[str]):
    """The request handler: uploads, name, protocol, support uploads, threshold, checkpoint path ->
    (overlays [(png, caption)], rows [{file, score, decision}])."""

    def handle(images, name, protocol, support, threshold, ckpt):
        if not images or threshold is None:
            raise gr.Error("upload one or more images and give a threshold")
        if protocol == "few-shot" and not support:
            raise gr.Error("few-shot: upload normal support images, or choose zero-shot")
        if protocol == "normal-only" and len(support or []) < 2:
            raise gr.Error("normal-only: upload 2 or more normal support images (each is left out in turn)")
        name = (name or "").strip()
        if not name:
            raise gr.Error("choose a dataset or type the object's name, e.g. 'knee MRI'")
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            names = stage(images, tmp / "input")
            argv = [*model_flags, "--input", str(tmp / "input")]
            argv += ["--ckpt", checkpoint(ckpt_dir, protocol, name, ckpt)]
            argv += ["--obj", name] if name in DATASETS else ["--prompt_name", name]
            if protocol != "zero-shot":
                stage(support, tmp / "support")
                argv += ["--support", str(tmp / "support")]
            if protocol == "normal-only":
                argv += ["--normalize", "support"]
            rows = run_predict(argv, tmp / "out")
            gallery = []
            for j, row in enumerate(rows):
                path = Path(row["file"])
                with Image.open(tmp / "out" / f"{j:05d}_{path.stem}.png") as picture:
                    shown = picture.copy()  # read before the folder goes; gradio serves its own copy
                row["file"] = names[path.name]
                row["decision"] = "abnormal" if row["score"] > threshold else "normal"
                gallery.append((shown, f"{row['file']}: {row['score']:.4f} {row['decision']}"))
        return gallery, rows

    return handle


def build(ckpt_dir: str, model_flags: list[str]) -> gr.Blocks:
    with gr.Blocks(title="MVFA", analytics_enabled=False) as demo:
        gr.Markdown("## MVFA: anomaly maps for one's own scans")
        with gr.Row():
            with gr.Column():
                images = gr.File(
                    label="images", file_count="multiple", file_types=["image"], elem_id="images"
                )
                name = gr.Dropdown(
                    choices=sorted(DATASETS),
                    value="Brain",
                    allow_custom_value=True,
                    label="dataset, or the object's name for the prompts (e.g. knee MRI)",
                )
                protocol = gr.Radio(list(PROTOCOLS), value="zero-shot", label="protocol")
                support = gr.File(
                    label="normal support images (few-shot, normal-only)", file_count="multiple"
                )
                threshold = gr.Number(value=0.5, label="threshold (abnormal above it)")
                ckpt = gr.Textbox(
                    label=f"checkpoint (default: {ckpt_dir}/few-shot or zero-shot/<dataset>.pth)",
                    elem_id="ckpt",
                )
                button = gr.Button("Score", variant="primary")
            with gr.Column():
                gallery = gr.Gallery(
                    label="overlays", columns=1, object_fit="contain", format="png", elem_id="overlays"
                )
                table = gr.JSON(label="scores")
        inputs = [images, name, protocol, support, threshold, ckpt]
        button.click(make_handler(ckpt_dir, model_flags), inputs, [gallery, table], api_name="predict")
    return demo


def parser() -> argparse.ArgumentParser:
    p = new_parser(__doc__)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860, help="port to serve on")
    p.add_argument(
        "--ckpt_dir", default="./ckpt/", help="checkpoints as released: {dir}/{protocol}/{obj}.pth"
    )
    return p


def main(argv=None) -> None:
    args, rest = parser().parse_known_args(argv)
    demo = build(args.ckpt_dir, rest)
    demo.launch(server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
