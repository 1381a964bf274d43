"""tools/download.py against a local HTTP server (127.0.0.1) serving stand-ins of the published files.

The server speaks HTTP Range, can cut a response half way and logs every request; the stand-ins have the
authors' shapes (zips of {obj}.pth, tar.gz of one dataset folder), and the stand-in CLIP file's SHA-256 sits
in its URL as in OpenAI's. No test reaches the network (tests/conftest.py refuses other machines).
"""

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import pytest

from dataset import CLASS_NAMES, DATASETS
from tools import download

REPO = Path(__file__).resolve().parents[1]
CLIP_BODY = bytes(range(256)) * 1600 + b"stand-in CLIP"  # 409,613 bytes: several download chunks
CLIP_SHA = hashlib.sha256(CLIP_BODY).hexdigest()
# the top folder of each stand-in dataset archive: the authors' archives are named Liver.tar.gz,
# Histopathology_AD.tar.gz, ...; Chest's here has none (valid/ and test/ at its top)
TOPS = {
    "Brain": "Brain/",
    "Liver": "Liver/",
    "Retina_RESC": "Retina_RESC_AD/",
    "Retina_OCT2017": "Retina_OCT2017_AD/",
    "Chest": "",
    "Histopathology": "Histopathology_AD/",
}
N = 2  # images per split and state


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def route_of(url: str) -> str:
    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


# ---------------------------------------------------------------- the server
class Handler(BaseHTTPRequestHandler):
    """GET with `Range: bytes=N-`; a path in `server.cut` sends half of what it announces once, and closes."""

    def do_GET(self):
        server = self.server
        server.log.append((self.path, self.headers.get("Range")))
        if self.path not in server.routes:
            return self.send_error(404)
        body, content_type, status = server.routes[self.path]
        start = int(self.headers["Range"][6:-1]) if self.headers.get("Range") and status == 200 else 0
        if start >= len(body) > 0:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(body)}")
            self.end_headers()
            return
        self.send_response(206 if start else status)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        payload = body[start:]
        if self.path in server.cut:
            server.cut.discard(self.path)
            payload = payload[: len(payload) // 2]
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.routes, httpd.log, httpd.cut = {}, [], set()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture(autouse=True)
def quick_and_local(monkeypatch):
    """No wait between retries, no proxy, and the stand-in CLIP file's hash in its URL, as OpenAI's has."""
    monkeypatch.setattr(download, "RETRY_WAIT", 0.0)
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    url = f"https://openaipublic.azureedge.net/clip/models/{CLIP_SHA}/ViT-L-14-336px.pt"
    monkeypatch.setitem(download.SOURCES, "clip", download.Source("ViT-L-14-336px.pt", url, CLIP_SHA, url))


# ---------------------------------------------------------------- stand-in files
def zip_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


def tar_bytes(files: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            t.addfile(info)
    return buf.getvalue()


def dataset_files(obj: str, top: str) -> dict[str, bytes]:
    """A dataset in BMAD's layout under `top` ('' or 'name/'): N images per split and state, and masks."""
    files = {}
    for split in ("valid", "test"):
        for state in ("good", "Ungood"):
            for i in range(N):
                files[f"{top}{split}/{state}/img/{i:03d}.png"] = f"{obj} {split} {state} {i}".encode()
                if state == "Ungood" and DATASETS[obj].has_masks:
                    files[f"{top}{split}/{state}/anomaly_mask/{i:03d}.png"] = (
                        f"mask {obj} {split} {i}".encode()
                    )
    return files


def checkpoint(kind: str, obj: str) -> bytes:
    return f"{kind} adapters of {obj}".encode() * 50


def support_list(obj: str, k: int) -> bytes:
    ext = ".jpeg" if obj == "Retina_OCT2017" else ".png"
    return (
        f"n-0: {' '.join(f'n{i}{ext}' for i in range(k))}\na-0: {' '.join(f'a{i}{ext}' for i in range(k))}"
    ).encode()


def stand_ins() -> dict[str, bytes]:
    """item -> archive: few-shot.zip with a top folder, zero-shot.zip without; datasets with several tops."""
    archives = {
        "few-shot": zip_bytes({f"few-shot/{o}.pth": checkpoint("few-shot", o) for o in CLASS_NAMES}),
        "zero-shot": zip_bytes({f"{o}.pth": checkpoint("zero-shot", o) for o in CLASS_NAMES}),
    }
    for obj in CLASS_NAMES:
        files = dataset_files(obj, TOPS[obj])
        if obj == "Brain":  # packing litter, left out
            files.update({"__MACOSX/Brain/._000.png": b"x", "Brain/.DS_Store": b"x"})
        archives[obj] = tar_bytes(files)
    return archives


def serve(server, item: str, body: bytes, content_type: str = "application/octet-stream", status: int = 200):
    server.routes[route_of(download.SOURCES[item].url)] = (body, content_type, status)


def serve_everything(server) -> dict[str, bytes]:
    archives = stand_ins()
    serve(server, "clip", CLIP_BODY)
    for item, body in archives.items():
        serve(server, item, body, "application/x-gzip")
    for obj in CLASS_NAMES:
        for k in download.SHOTS:
            path = route_of(download.LISTS_URL.format(obj, k))
            server.routes[path] = (support_list(obj, k), "text/plain; charset=utf-8", 200)
    return archives


def run(capsys, *args: str) -> SimpleNamespace:
    code = download.main(list(args))
    out, err = capsys.readouterr()
    return SimpleNamespace(
        code=code, out=out, err=err, lines=[" ".join(line.split()) for line in out.splitlines()]
    )


def clip_route() -> str:
    return route_of(download.SOURCES["clip"].url)


# ---------------------------------------------------------------- fetching
def test_all_fetches_into_the_scripts_layout(server, tmp_path, capsys):
    archives = serve_everything(server)
    r = run(capsys, "all", "--root", str(tmp_path), "--base_url", server.url)
    assert r.code == 0, r.err
    assert r.err == ""
    assert (tmp_path / "CLIP/ckpt/ViT-L-14-336px.pt").read_bytes() == CLIP_BODY
    for kind in download.KINDS:
        for obj in CLASS_NAMES:
            assert (tmp_path / "ckpt" / kind / f"{obj}.pth").read_bytes() == checkpoint(kind, obj)
    for obj in CLASS_NAMES:
        root = tmp_path / "data" / DATASETS[obj].folder
        assert (root / "test/Ungood/img/001.png").read_bytes() == f"{obj} test Ungood 1".encode()
        masks = (
            sorted(p.name for p in (root / "valid/Ungood/anomaly_mask").glob("*"))
            if DATASETS[obj].has_masks
            else []
        )
        assert masks == (["000.png", "001.png"] if DATASETS[obj].has_masks else [])
        for k in download.SHOTS:
            assert (tmp_path / f"dataset/fewshot_seed/{obj}/{k}-shot.txt").read_bytes() == support_list(
                obj, k
            )
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == sorted(
        d.folder for d in DATASETS.values()
    )
    assert not (tmp_path / "data/Brain_AD/.DS_Store").exists() and not list(tmp_path.rglob("._*"))
    assert list((tmp_path / "downloads").iterdir()) == []  # archives removed once unpacked, no .part left
    assert sorted(path for path, _ in server.log) == sorted(server.routes)  # each file fetched once

    manifest = json.loads((tmp_path / "downloads.json").read_text())
    assert manifest["CLIP/ckpt/ViT-L-14-336px.pt"]["sha256"] == CLIP_SHA
    assert manifest["CLIP/ckpt/ViT-L-14-336px.pt"]["source"] == server.url + clip_route()
    liver = manifest["data/Liver_AD"]
    assert (liver["archive"], liver["archive_sha256"]) == ("Liver.tar.gz", sha(archives["Liver"]))
    assert (liver["files"], liver["bytes"]) == (12, sum(map(len, dataset_files("Liver", "").values())))
    brain = manifest["ckpt/few-shot/Brain.pth"]
    assert (brain["sha256"], brain["size"]) == (
        sha(checkpoint("few-shot", "Brain")),
        len(checkpoint("few-shot", "Brain")),
    )
    assert brain["archive_sha256"] == sha(archives["few-shot"]) and brain["date"].endswith("+00:00")
    assert len(manifest) == 1 + 12 + 6 + 24
    assert "CLIP/ckpt/ViT-L-14-336px.pt: installed, SHA-256 matches OpenAI's" in r.lines
    assert "data/Histopathology_AD: installed from Histopathology_AD.tar.gz" in r.lines


def test_interrupted_download_resumes_where_it_stopped(server, tmp_path, capsys):
    serve(server, "clip", CLIP_BODY)
    server.cut.add(clip_route())
    r = run(capsys, "clip", "--root", str(tmp_path), "--base_url", server.url)
    assert r.code == 0, r.err
    (_, first), (_, second) = server.log
    start = int(second[len("bytes=") : -1])  # what arrived whole: the chunk being read when it broke is lost
    assert first is None and 0 < start <= len(CLIP_BODY) // 2
    assert sha((tmp_path / "CLIP/ckpt/ViT-L-14-336px.pt").read_bytes()) == CLIP_SHA
    lost = f"ViT-L-14-336px.pt: connection lost (ChunkedEncodingError); resuming at {start / 1e3:.1f} kB"
    assert lost in r.lines
    assert not (tmp_path / "CLIP/ckpt/ViT-L-14-336px.pt.part").exists()


def test_partial_file_of_an_earlier_run_is_resumed(server, tmp_path, capsys):
    serve(server, "clip", CLIP_BODY)
    part = tmp_path / "CLIP/ckpt/ViT-L-14-336px.pt.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(CLIP_BODY[:1000])
    assert run(capsys, "clip", "--root", str(tmp_path), "--base_url", server.url).code == 0
    assert server.log == [(clip_route(), "bytes=1000-")]
    assert (tmp_path / "CLIP/ckpt/ViT-L-14-336px.pt").read_bytes() == CLIP_BODY


def test_wrong_hash_is_refused_and_kept_aside(server, tmp_path, capsys):
    other = CLIP_BODY[::-1]
    serve(server, "clip", other)
    r = run(capsys, "clip", "--root", str(tmp_path), "--base_url", server.url)
    bad = tmp_path / "CLIP/ckpt/ViT-L-14-336px.pt.bad"
    assert r.code == 1
    assert r.err == (
        f"error: ViT-L-14-336px.pt: SHA-256 {sha(other)} is not the published {CLIP_SHA}: not installed, "
        f"kept aside as {bad}; run the same command again to download it anew\n"
    )
    assert bad.read_bytes() == other
    assert (
        not (tmp_path / "CLIP/ckpt/ViT-L-14-336px.pt").exists() and not (tmp_path / "downloads.json").exists()
    )


def test_present_files_are_not_fetched_again(server, tmp_path, capsys):
    serve_everything(server)
    clip = tmp_path / "CLIP/ckpt/ViT-L-14-336px.pt"
    clip.parent.mkdir(parents=True)
    clip.write_bytes(b"mine")
    (tmp_path / "data/Liver_AD").mkdir(parents=True)
    r = run(capsys, "clip", "--root", str(tmp_path), "--base_url", server.url)
    assert r.code == 0 and server.log == [] and clip.read_bytes() == b"mine"
    assert r.lines == ["CLIP/ckpt/ViT-L-14-336px.pt: present, kept (--force to fetch again)"]
    assert run(capsys, "data", "Liver", "--root", str(tmp_path), "--base_url", server.url).code == 0
    assert server.log == [] and list((tmp_path / "data/Liver_AD").iterdir()) == []


def test_force_fetches_again(server, tmp_path, capsys):
    archives = serve_everything(server)
    clip, old = tmp_path / "CLIP/ckpt/ViT-L-14-336px.pt", tmp_path / "data/Liver_AD/old.png"
    clip.parent.mkdir(parents=True)
    clip.write_bytes(b"mine")
    old.parent.mkdir(parents=True)
    old.write_bytes(b"old")
    r = run(capsys, "clip", "--force", "--root", str(tmp_path), "--base_url", server.url)
    assert r.code == 0 and clip.read_bytes() == CLIP_BODY and len(server.log) == 1
    assert (
        run(capsys, "data", "Liver", "--force", "--root", str(tmp_path), "--base_url", server.url).code == 0
    )
    assert not old.exists() and (tmp_path / "data/Liver_AD/test/good/img/000.png").is_file()
    entry = json.loads((tmp_path / "downloads.json").read_text())["data/Liver_AD"]
    assert entry["archive_sha256"] == sha(archives["Liver"]) and entry["files"] == 12


def test_from_a_file_fetched_by_hand(tmp_path, capsys):
    archive = tmp_path / "hand" / "Liver.tar.gz"
    archive.parent.mkdir()
    archive.write_bytes(tar_bytes(dataset_files("Liver", "Liver_AD/")))
    root = tmp_path / "root"
    r = run(capsys, "data", "Liver", "--from", str(archive), "--root", str(root))  # no --base_url, no server
    assert r.code == 0, r.err
    assert (root / "data/Liver_AD/valid/Ungood/anomaly_mask/001.png").read_bytes() == b"mask Liver valid 1"
    assert archive.is_file()  # the user's file is left where it was
    entry = json.loads((root / "downloads.json").read_text())["data/Liver_AD"]
    assert entry["source"] == f"{archive} (by hand; published at {download.SOURCES['Liver'].page})"
    assert entry["archive_sha256"] == sha(archive.read_bytes())

    clip = tmp_path / "hand" / "ViT-L-14-336px.pt"
    clip.write_bytes(CLIP_BODY[:-1])
    r = run(capsys, "clip", "--from", str(clip), "--root", str(root))
    assert r.code == 1 and r.err.startswith(f"error: {clip} is not OpenAI's ViT-L-14-336px.pt: SHA-256 ")
    clip.write_bytes(CLIP_BODY)
    assert run(capsys, "clip", "--from", str(clip), "--root", str(root)).code == 0
    assert (root / "CLIP/ckpt/ViT-L-14-336px.pt").read_bytes() == CLIP_BODY and clip.is_file()


QUOTA = (
    "<html><head><title>Google Drive - Quota exceeded</title></head><body><p class='uc-error-caption'>"
    "Sorry, you can't view or download this file at this time.</p><p class='uc-error-subcaption'>Too many "
    "users have viewed or downloaded this file recently. Please try accessing the file again later.</p>"
    "</body></html>"
)
SIGN_IN = "<html><head><title>Google Drive: Sign-in</title></head><body>Sign in to continue</body></html>"


@pytest.mark.parametrize(
    "page, status, reason",
    [
        (
            QUOTA,
            200,
            (
                "Too many users have viewed or downloaded this file recently. Please try accessing the file "
                "again later."
            ),
        ),
        (SIGN_IN, 403, "Google Drive: Sign-in"),
    ],
    ids=["quota", "sign-in"],
)
def test_drive_refusal_is_one_clear_line(page, status, reason, server, tmp_path, capsys):
    serve(server, "Liver", page.encode(), "text/html; charset=utf-8", status)
    r = run(capsys, "data", "Liver", "--root", str(tmp_path), "--base_url", server.url)
    assert r.code == 1
    file_id = "1xriF0uiwrgoPh01N6GlzE5zPi_OIJG1I"
    assert r.err == (
        f"error: Google Drive refused Liver.tar.gz ({reason}): open "
        f"https://drive.google.com/file/d/{file_id}/view in a browser, save the file as "
        f"{tmp_path / 'downloads' / 'Liver.tar.gz'} and run `python -m tools.download data Liver --root "
        f"{tmp_path}` again (or pass --from FILE)\n"
    )
    assert not (tmp_path / "data/Liver_AD").exists() and not (tmp_path / "downloads/Liver.tar.gz").exists()


def test_drive_virus_scan_confirmation_is_answered(server, tmp_path, capsys):
    file_id = "15DhnBAk-h6TGLTUbNLxP8jCCDtwOHAjb"
    warning = (
        "<html><head><title>Google Drive - Virus scan warning</title></head><body>"
        "<form id='download-form' action='https://drive.usercontent.google.com/download' method='get'>"
        "<input type='submit' id='uc-download-link' value='Download anyway'>"
        f"<input type='hidden' name='id' value='{file_id}'>"
        "<input type='hidden' name='export' value='download'>"
        "<input type='hidden' name='confirm' value='t'><input type='hidden' name='uuid' value='0a1b-2c3d'>"
        "</form></body></html>"
    )
    serve(server, "Chest", warning.encode(), "text/html; charset=utf-8")
    confirmed = f"/download?id={file_id}&export=download&confirm=t&uuid=0a1b-2c3d"
    server.routes[confirmed] = (tar_bytes(dataset_files("Chest", "Chest/")), "application/x-gzip", 200)
    r = run(capsys, "data", "Chest", "--root", str(tmp_path), "--base_url", server.url)
    assert r.code == 0, r.err
    assert [path for path, _ in server.log] == [route_of(download.SOURCES["Chest"].url), confirmed]
    assert (tmp_path / "data/Chest_AD/test/good/img/000.png").read_bytes() == b"Chest test good 0"


@pytest.mark.parametrize(
    "member, message",
    [
        ("../evil.txt", "member '../evil.txt' would land outside the target folder"),
        ("Liver_AD/../../evil.txt", "member 'Liver_AD/../../evil.txt' would land outside the target folder"),
        ("/tmp/evil.txt", "member '/tmp/evil.txt' would land outside the target folder"),
        ("link", "member 'link' is a link or a device, not a file"),
    ],
)
def test_members_outside_the_target_are_refused(member, message, server, tmp_path, capsys):
    files, links = dataset_files("Liver", "Liver_AD/"), {}
    if member == "link":
        links[member] = "/etc/passwd"
    else:
        files[member] = b"evil"
    serve(server, "Liver", tar_bytes(files, links))
    root = tmp_path / "root"
    r = run(capsys, "data", "Liver", "--root", str(root), "--base_url", server.url)
    assert r.code == 1
    assert r.err == f"error: refusing Liver.tar.gz: {message} (set aside as downloads/Liver.tar.gz.bad)\n"
    assert not (root / "data").exists() and not list(tmp_path.rglob("evil.txt"))
    assert (root / "downloads/Liver.tar.gz.bad").is_file()  # the next run fetches it anew


def test_archive_without_the_expected_folder_is_refused(server, tmp_path, capsys):
    serve(server, "Liver", tar_bytes(dataset_files("Brain", "Brain_AD/")))  # another dataset's archive
    serve(server, "few-shot", zip_bytes({"few-shot/Brain.pth": b"x"}))
    r = run(capsys, "data", "Liver", "--root", str(tmp_path), "--base_url", server.url)
    assert r.code == 1 and r.err == (
        "error: Liver.tar.gz does not hold what `data Liver` needs: expected one folder (e.g. Liver_AD/) "
        "holding valid/ and test/, found Brain_AD at its top; nothing unpacked (set aside as "
        "downloads/Liver.tar.gz.bad)\n"
    )
    r = run(capsys, "checkpoints", "few-shot", "--root", str(tmp_path), "--base_url", server.url)
    assert r.code == 1 and "few-shot.zip does not hold what `checkpoints few-shot` needs" in r.err
    assert not (tmp_path / "data/Liver_AD").exists() and not (tmp_path / "ckpt/few-shot").exists()


def test_not_enough_disk_space(server, tmp_path, capsys, monkeypatch):
    serve(server, "clip", CLIP_BODY)
    monkeypatch.setattr(download.shutil, "disk_usage", lambda path: SimpleNamespace(free=1000))
    r = run(capsys, "clip", "--root", str(tmp_path), "--base_url", server.url)
    assert r.code == 1
    assert r.err == (
        f"error: ViT-L-14-336px.pt needs 409.6 kB in {tmp_path / 'CLIP/ckpt'}, whose disk has 1.0 kB free: "
        "make room, or pass --root DIR on a larger disk\n"
    )
    assert not (tmp_path / "CLIP/ckpt/ViT-L-14-336px.pt.part").exists()


def test_no_server_is_one_line_after_the_retries(tmp_path, capsys):
    closed = "http://127.0.0.1:9"  # the discard port, not served here
    r = run(capsys, "clip", "--root", str(tmp_path), "--base_url", closed)
    refused = r"ConnectionError: \[Errno \d+\] Connection refused"
    assert r.code == 1
    assert re.fullmatch(
        f"error: ViT-L-14-336px.pt: download from {closed}{re.escape(clip_route())} failed after 4 tries "
        f"\\({refused}\\); run the same command again\n",
        r.err,
    )
    assert len(r.lines) == 4 and all(
        re.fullmatch(f"ViT-L-14-336px.pt: {refused}; trying again", x) for x in r.lines[:3]
    )


def test_keep_archives(server, tmp_path, capsys):
    archives = serve_everything(server)
    r = run(
        capsys,
        "checkpoints",
        "zero-shot",
        "--keep_archives",
        "--root",
        str(tmp_path),
        "--base_url",
        server.url,
    )
    assert r.code == 0
    assert (tmp_path / "downloads/zero-shot.zip").read_bytes() == archives["zero-shot"]
    assert (tmp_path / "ckpt/zero-shot/Liver.pth").read_bytes() == checkpoint("zero-shot", "Liver")


# ---------------------------------------------------------------- --check
def test_check_complete_partial_and_damaged_trees(server, tmp_path, capsys):
    serve_everything(server)
    assert run(capsys, "all", "--root", str(tmp_path), "--base_url", server.url).code == 0
    r = run(capsys, "--check", "--root", str(tmp_path))
    assert r.code == 0
    assert r.lines[0] == "present CLIP/ckpt/ViT-L-14-336px.pt SHA-256 matches OpenAI's"
    assert r.lines[1] == "present ckpt/few-shot/Brain.pth as recorded in downloads.json"
    counts = "valid/good img 2 | valid/Ungood img 2 anomaly_mask 2 | test/good img 2 | test/Ungood img 2"
    assert r.lines[13:15] == [
        "present data/Brain_AD as recorded in downloads.json",
        f"{counts} anomaly_mask 2",
    ]
    assert r.lines[19:21] == [
        "present data/Retina_OCT2017_AD as recorded in downloads.json",
        "valid/good img 2 | valid/Ungood img 2 | test/good img 2 | test/Ungood img 2",
    ]
    assert (
        r.lines[25]
        == "present dataset/fewshot_seed/Brain 2, 4, 8, 16-shot lists, as recorded in downloads.json"
    )
    assert r.lines[-1] == f"25 present, 0 missing, 0 damaged (under {tmp_path})"

    (tmp_path / "ckpt/zero-shot/Chest.pth").unlink()  # partial
    (tmp_path / "dataset/fewshot_seed/Liver/16-shot.txt").unlink()
    brain = tmp_path / "ckpt/few-shot/Brain.pth"  # damaged: same size, other bytes
    brain.write_bytes(brain.read_bytes()[:-1] + b"!")
    (tmp_path / "data/Liver_AD/test/Ungood/anomaly_mask/001.png").unlink()
    clip = tmp_path / "CLIP/ckpt/ViT-L-14-336px.pt"
    clip.write_bytes(clip.read_bytes()[:-10])
    r = run(capsys, "--check", "--root", str(tmp_path))
    again = f"--root {tmp_path} --force"
    assert r.code == 1
    assert r.lines[0] == (
        "damaged CLIP/ckpt/ViT-L-14-336px.pt SHA-256 differs from OpenAI's and from downloads.json; "
        f"fetch again: python -m tools.download clip {again}"
    )
    assert r.lines[1] == (
        "damaged ckpt/few-shot/Brain.pth differs from downloads.json (changed or damaged); fetch again: "
        f"python -m tools.download checkpoints few-shot {again}"
    )
    assert r.lines[11] == (
        "missing ckpt/zero-shot/Chest.pth fetch: python -m tools.download checkpoints zero-shot "
        f"--root {tmp_path}"
    )
    total = sum(map(len, dataset_files("Liver", "").values()))
    assert r.lines[15] == (
        "damaged data/Liver_AD test/Ungood: 1 masks for 2 images; 11 files, "
        f"{total - len(b'mask Liver test 1')} bytes where downloads.json recorded 12, {total}; "
        f"fetch again: python -m tools.download data Liver {again}"
    )
    assert r.lines[26] == (
        "missing dataset/fewshot_seed/Liver 16-shot.txt; fetch: python -m tools.download support_lists "
        f"Liver --root {tmp_path}"
    )
    assert r.lines[-1] == f"20 present, 2 missing, 3 damaged (under {tmp_path})"

    r = run(capsys, "--check", "data", "Chest", "--root", str(tmp_path))  # only what is asked for
    assert r.code == 0 and r.lines[0] == "present data/Chest_AD as recorded in downloads.json"
    assert r.lines[-1] == f"1 present, 0 missing, 0 damaged (under {tmp_path})"


def test_check_of_a_tree_put_in_place_by_hand(tmp_path, capsys):
    """No downloads.json: present, not verified; a complete CLIP archive that is not OpenAI's is no damage."""
    clip = tmp_path / "CLIP/ckpt/ViT-L-14-336px.pt"
    clip.parent.mkdir(parents=True)
    clip.write_bytes(zip_bytes({"archive/data.pkl": b"weights"}))
    for kind in download.KINDS:
        for obj in CLASS_NAMES:
            path = tmp_path / "ckpt" / kind / f"{obj}.pth"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(zip_bytes({"archive/data.pkl": b"adapters"}))
    for obj in CLASS_NAMES:
        for name, data in dataset_files(obj, f"data/{DATASETS[obj].folder}/").items():
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_bytes(data)
        for k in download.SHOTS:
            path = tmp_path / f"dataset/fewshot_seed/{obj}/{k}-shot.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(support_list(obj, min(k, 4)))  # a small dataset's lists: at most 4 names
    r = run(capsys, "--check", "--root", str(tmp_path))
    assert r.code == 0
    assert r.lines[0] == (
        "present CLIP/ckpt/ViT-L-14-336px.pt not verified: a complete archive, but not OpenAI's file "
        "(SHA-256 differs)"
    )
    assert r.lines[12] == "present ckpt/zero-shot/Histopathology.pth not verified: no entry in downloads.json"
    assert r.lines[-2] == (
        "present dataset/fewshot_seed/Histopathology 2, 4, 8, 16-shot lists, not verified: no entry in "
        "downloads.json (fewer names than k: 8-shot 4, 16-shot 4)"
    )
    assert r.lines[-1] == f"25 present, 0 missing, 0 damaged (under {tmp_path})"

    clip.write_bytes(clip.read_bytes()[:-30])  # cut: the zip's directory is gone
    (tmp_path / "data/Chest_AD/test/good/img/000.png").unlink()
    (tmp_path / "data/Chest_AD/test/good/img/001.png").unlink()
    r = run(capsys, "--check", "--root", str(tmp_path))
    assert r.code == 1
    assert r.lines[0].startswith(
        "damaged CLIP/ckpt/ViT-L-14-336px.pt not a complete archive (an interrupted "
    )
    assert r.lines[21].startswith("damaged data/Chest_AD test/good/img missing or empty; fetch again: ")
    assert r.lines[22] == "valid/good img 2 | valid/Ungood img 2 | test/good img 0 | test/Ungood img 2"


# ---------------------------------------------------------------- command line
def test_help_lists_targets_and_flags(capsys):
    with pytest.raises(SystemExit) as stop:
        download.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert stop.value.code == 0
    assert "clip | checkpoints [few-shot zero-shot] | data [OBJ ...] | support_lists [OBJ ...] | all" in out
    for flag in ("--root ROOT", "--check", "--force", "--from FILE", "--base_url URL", "--keep_archives"):
        assert f" {flag} " in out
    assert "(for tests and mirrors)" in out and "python -m tools.download --check" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["model"], "unknown target 'model': choose one of clip, checkpoints, data, support_lists, all"),
        (
            ["data", "Lung"],
            (
                "unknown name 'Lung' for `data`: choose among Brain, Liver, Retina_RESC, "
                "Retina_OCT2017, Chest, Histopathology"
            ),
        ),
        (
            ["checkpoints", "one-shot"],
            "unknown name 'one-shot' for `checkpoints`: choose among few-shot, zero-shot",
        ),
        (["clip", "Brain"], "`clip` takes no names (got Brain): drop them"),
        ([], "name a target (clip, checkpoints, data, support_lists, all) or pass --check"),
        (
            ["data", "--from", "x.tar.gz"],
            (
                "--from installs one file as one item: name it as `clip`, "
                "`checkpoints few-shot|zero-shot` or `data OBJ`"
            ),
        ),
        (["clip", "--bogus"], "unrecognized arguments: --bogus (see --help)"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(args, message, tmp_path, capsys):
    r = run(capsys, *args, "--root", str(tmp_path))
    assert (r.code, r.err, r.out) == (2, f"error: {message}\n", "")


def test_unwritable_root(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    root = tmp_path / "file" / "root"
    r = run(capsys, "clip", "--root", str(root))
    assert (r.code, r.err) == (
        2,
        f"error: --root {root}: cannot write there (Not a directory); pass a folder you can write to\n",
    )


# ---------------------------------------------------------------- nothing else touches the network
SITECUSTOMIZE = """
import os, socket
def refuse(sock, address):
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        with open(os.environ["NET_ATTEMPTS"], "a") as f:
            f.write(f"{address}\\n")
        raise ConnectionRefusedError(f"no network in this test: {address}")
    return connect(sock, address)
connect, socket.socket.connect = socket.socket.connect, refuse
"""


def test_the_check_and_a_script_run_without_network(tmp_path):
    """In subprocesses whose every INET connect raises (sitecustomize): `--check` and a test_zero.py run."""
    import torch
    from conftest import SIZE, TINY, TINY_MODEL

    from dataset.synthetic import make_synthetic_bmad
    from mvfa.precision import Precision

    (tmp_path / "site").mkdir()
    (tmp_path / "site/sitecustomize.py").write_text(SITECUSTOMIZE)
    attempts = tmp_path / "attempts.txt"
    env = {
        **os.environ,
        "PYTHONPATH": str(tmp_path / "site"),
        "NET_ATTEMPTS": str(attempts),
        "OMP_NUM_THREADS": "1",
    }
    probe = "import socket; socket.create_connection(('127.0.0.1', 9))"
    assert (
        subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, check=False).returncode
        == 1
    )
    assert attempts.read_text() == "('127.0.0.1', 9)\n"  # the hook is in force
    attempts.unlink()

    out = subprocess.run(
        [sys.executable, "-m", "tools.download", "--check", "--root", str(tmp_path / "empty")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 1 and out.stderr == ""
    assert out.stdout.splitlines()[-1] == f"0 present, 25 missing, 0 damaged (under {tmp_path / 'empty'})"

    synth = make_synthetic_bmad(
        str(tmp_path / "synth"), n_per_split=2, seed=0, img_size=SIZE, objs=("Chest",)
    )
    cpu = torch.device("cpu")
    torch.save(TINY_MODEL.build(cpu, Precision.of("fp32", cpu)).adapter_state(), tmp_path / "Chest.pth")
    args = [
        *TINY,
        "--obj",
        "Chest",
        "--data_path",
        synth.data,
        "--ckpt",
        str(tmp_path / "Chest.pth"),
        "--out_dir",
        str(tmp_path / "results"),
        "--batch_size",
        "4",
    ]
    out = subprocess.run(
        [sys.executable, "test_zero.py", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines()[-1].startswith("Chest AUC : ")
    assert not attempts.exists()


def test_other_tests_cannot_reach_the_network():
    """tests/conftest.py's guard, in force in every test: only this machine answers."""
    import socket

    with pytest.raises(
        ConnectionRefusedError, match=r"no network in tests: connection to \('192.0.2.1', 80\)"
    ):
        socket.create_connection(("192.0.2.1", 80), timeout=1)  # TEST-NET-1: never routed anyway
