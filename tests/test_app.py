"""tools/app.py: started on 127.0.0.1 in this process with the tiny CLIP; its /predict API (gradio_client)
returns `python -m tools.predict`'s numbers for the same images, and a browser uploads an image and sees its
overlay."""

import csv
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from browser import browser_page, chromium, screenshot_path
from conftest import REPO, TINY, TINY_MODEL
from PIL import Image

from dataset.synthetic import make_synthetic_bmad
from mvfa.precision import Precision

gr = pytest.importorskip("gradio", reason="gradio absent: pip install -r requirements-app.txt")
gradio_client = pytest.importorskip(
    "gradio_client", reason="gradio_client absent: pip install -r tests/requirements.txt"
)

OVERLAY_PX = (900, 460)  # maps.overlay's image | map picture


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The app on a free port of 127.0.0.1: (url, model flags, checkpoint, synthetic Brain test folder)."""
    from tools import app

    root = tmp_path_factory.mktemp("app")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model on a shared 2-core machine
    synth = make_synthetic_bmad(str(root / "synth"), n_per_split=2, seed=0, img_size=64, objs=("Brain",))
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    torch.save(TINY_MODEL.build(cpu, Precision.of("fp32", cpu)).adapter_state(), root / "tiny.pth")
    flags = [*TINY, "--cache_dir", str(root / "cache")]
    demo = app.build(str(root / "ckpt"), flags)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/", flags, root / "tiny.pth", Path(synth.data) / "Brain_AD"
    demo.close()
    torch.set_num_threads(threads)


def test_binds_localhost_by_default():
    from tools import app

    args, rest = app.parser().parse_known_args(["--img_size", "56"])
    assert args.host == "127.0.0.1" and rest == ["--img_size", "56"]  # model flags go on to tools.predict


def predict_command(flags: list[str], inputs: Path, out: Path, *extra: str) -> dict[str, float]:
    """`python -m tools.predict` as the README runs it: file name -> the score in its scores.csv."""
    argv = [sys.executable, "-m", "tools.predict", *flags, "--input", str(inputs), "--out", str(out), *extra]
    subprocess.run(argv, cwd=REPO, check=True, capture_output=True)
    with open(out / "scores.csv", newline="") as f:
        return {Path(row["file"]).name: float(row["score"]) for row in csv.DictReader(f)}


def test_api_returns_predicts_numbers(served, tmp_path):
    """Few-shot (support images, a pool min-max): the API's scores are the command's, to the last bit."""
    url, flags, ckpt, brain = served
    images = [brain / "test/Ungood/img/00000.png", brain / "test/good/img/00001.png"]
    support = sorted((brain / "valid/good/img").glob("*.png"))
    client = gradio_client.Client(url, verbose=False)
    files = [gradio_client.handle_file(str(p)) for p in images]
    few = [gradio_client.handle_file(str(p)) for p in support]
    gallery, rows = client.predict(files, "Brain", "few-shot", few, 0.5, str(ckpt), api_name="/predict")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for p in images:
        shutil.copy(p, inputs / p.name)
    extra = ["--ckpt", str(ckpt), "--obj", "Brain", "--support", str(brain / "valid/good/img")]
    expected = predict_command(flags, inputs, tmp_path / "out", *extra)
    assert {r["file"]: r["score"] for r in rows} == expected and len(expected) == 2
    assert [r["decision"] for r in rows] == ["abnormal" if r["score"] > 0.5 else "normal" for r in rows]
    assert len(gallery) == 2
    for item, row in zip(gallery, rows):
        with Image.open(item["image"]) as picture:
            assert picture.size == OVERLAY_PX
        assert item["caption"] == f"{row['file']}: {row['score']:.4f} {row['decision']}"
    # tools.predict's one-line error comes back as the API's error
    with pytest.raises(Exception, match=r"--ckpt .*: not|checkpoint .*: no such file"):
        client.predict(
            files, "Brain", "zero-shot", None, 0.5, str(tmp_path / "none.pth"), api_name="/predict"
        )


def test_api_normal_only_returns_predicts_standalone_scores(served, tmp_path):
    """Normal-only (the zero-shot adapters, a bank of the uploaded normals, --normalize support): the API's
    scores are the command's, to the last bit; one normal image is refused before any work."""
    url, flags, ckpt, brain = served
    image = brain / "test/Ungood/img/00000.png"
    support = sorted((brain / "valid/good/img").glob("*.png"))
    client = gradio_client.Client(url, verbose=False)
    few = [gradio_client.handle_file(str(p)) for p in support]
    args = ([gradio_client.handle_file(str(image))], "Brain", "normal-only")
    _, rows = client.predict(*args, few, 0.5, str(ckpt), api_name="/predict")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    shutil.copy(image, inputs / image.name)
    extra = ["--ckpt", str(ckpt), "--obj", "Brain", "--support", str(brain / "valid/good/img")]
    expected = predict_command(flags, inputs, tmp_path / "out", *extra, "--normalize", "support")
    assert {r["file"]: r["score"] for r in rows} == expected and len(expected) == 1
    with pytest.raises(Exception, match="normal-only: upload 2 or more"):
        client.predict(*args, few[:1], 0.5, str(ckpt), api_name="/predict")


def test_upload_in_a_browser_shows_an_overlay(served):
    chromium()  # skips with its reason when chromium or playwright is absent
    url, _, ckpt, brain = served
    image = brain / "test/Ungood/img/00001.png"
    with browser_page() as page:
        page.goto(url)
        page.locator("#images input[type=file]").set_input_files(str(image))
        page.locator("#ckpt textarea, #ckpt input").first.fill(str(ckpt))
        page.get_by_role("button", name="Score").click()
        shown = page.locator("#overlays img").first
        shown.wait_for(timeout=60_000)
        page.wait_for_function("i => i.complete && i.naturalWidth > 0", arg=shown.element_handle())
        width = shown.evaluate("i => i.naturalWidth")
        assert width == OVERLAY_PX[0]
        assert "00001.png" in page.locator("#overlays").inner_text()
        page.screenshot(path=screenshot_path("app.png"))
