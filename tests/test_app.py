"""tools/app.py: started on 127.0.0.1 in this process with the tiny CLIP; its /predict API (gradio_client)
returns tools.predict's numbers for the same images, zero-shot and few-shot, and a browser uploads an image
and sees its overlay."""

import shutil
import socket
from pathlib import Path

import pytest
import torch
from browser import browser_page, chromium, screenshot_path
from conftest import TINY, TINY_MODEL
from PIL import Image

from mvfa.precision import Precision
from tools import predict
from tools.synth import make_synthetic_bmad

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
    flags = app.model_flags([*TINY, "--cache_dir", str(root / "cache")])
    demo = app.build(str(root / "ckpt"), flags)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/", flags, root / "tiny.pth", Path(synth.data) / "Brain_AD"
    demo.close()
    torch.set_num_threads(threads)


def test_binds_localhost_by_default():
    from tools import app

    args, rest = app.parser().parse_known_args(["--img_size", "56"])
    assert args.host == "127.0.0.1" and rest == ["--img_size", "56"]
    with pytest.raises(SystemExit):
        app.model_flags(["--no_such_flag"])  # refused at launch, by tools.predict's parser


@pytest.mark.parametrize("protocol", ["zero-shot", "few-shot"])
def test_api_returns_predicts_numbers(served, tmp_path, protocol):
    url, flags, ckpt, brain = served
    images = [brain / "test/Ungood/img/00000.png", brain / "test/good/img/00001.png"]
    support = sorted((brain / "valid/good/img").glob("*.png"))
    client = gradio_client.Client(url, verbose=False)
    files = [gradio_client.handle_file(str(p)) for p in images]
    few = [gradio_client.handle_file(str(p)) for p in support] if protocol == "few-shot" else None
    gallery, rows = client.predict(files, "Brain", protocol, few, 0.5, str(ckpt), api_name="/predict")
    # tools.predict on a folder of the same two images (and the same support images)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for p in images:
        shutil.copy(p, inputs / p.name)
    argv = [
        *flags,
        "--input",
        str(inputs),
        "--ckpt",
        str(ckpt),
        "--obj",
        "Brain",
        "--out",
        str(tmp_path / "o"),
    ]
    if protocol == "few-shot":
        argv += ["--support", str(brain / "valid/good/img")]
    expected = {Path(r["file"]).name: r["score"] for r in predict.main(argv)}
    assert {r["file"]: r["score"] for r in rows} == expected  # exactly: the same floats
    assert [r["decision"] for r in rows] == ["abnormal" if r["score"] > 0.5 else "normal" for r in rows]
    assert len(gallery) == 2
    for item, row in zip(gallery, rows):
        with Image.open(item["image"]) as picture:
            assert picture.size == OVERLAY_PX
        assert item["caption"].startswith(f"{row['file']}: {row['score']:.4f}")


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
