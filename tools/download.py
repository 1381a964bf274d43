"""Fetches what the scripts read (CLIP weights, adapter checkpoints, BMAD data, support lists) into place.

python -m tools.download all                  # everything, into this checkout
python -m tools.download data Brain Liver     # two datasets; likewise clip, checkpoints, support_lists
python -m tools.download --check              # present / missing / damaged; exit 1 unless complete
"""

import argparse
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
import zipfile
import zlib
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path, PurePosixPath
from typing import NamedTuple
from urllib.parse import urlencode, urljoin, urlsplit

import requests
from tqdm import tqdm

from CLIP.loading import OPENAI_FILES, OPENAI_URLS
from dataset import CLASS_NAMES, DATASETS, list_images
from dataset.medical_few import SUPPORT_EXTENSIONS
from mvfa.records import sha256, zip_flaw

REPO = Path(__file__).resolve().parents[1]
CLIP_MODEL = "ViT-L-14-336"
SHOTS = (2, 4, 8, 16)
KINDS = ("few-shot", "zero-shot")
TARGETS = ("clip", "checkpoints", "data", "support_lists", "all")
MANIFEST = "downloads.json"
DRIVE_URL = "https://drive.google.com/uc?export=download&id={}"
DRIVE_PAGE = "https://drive.google.com/file/d/{}/view"
LISTS_URL = (
    "https://raw.githubusercontent.com/MediaBrain-SJTU/MVFA-AD/HEAD/dataset/fewshot_seed/{}/{}-shot.txt"
)
LISTS_PAGE = "https://github.com/MediaBrain-SJTU/MVFA-AD/tree/HEAD/dataset/fewshot_seed"
TIMEOUT = (30, 120)  # seconds to connect, and between two reads
ATTEMPTS = 4  # requests per download; each one resumes where the previous one stopped
RETRY_WAIT = 2.0  # seconds before the n-th retry: n * RETRY_WAIT
CHUNK = 1 << 16  # a lost connection loses the chunk being read: resumes restart from a whole chunk


class Source(NamedTuple):
    """A published file: its name, URL, published SHA-256 (None: recorded in downloads.json) and web page."""

    name: str
    url: str
    sha256: str | None
    page: str


def drive(name: str, file_id: str) -> Source:
    return Source(name, DRIVE_URL.format(file_id), None, DRIVE_PAGE.format(file_id))


CLIP_URL = OPENAI_URLS[CLIP_MODEL]
# OpenAI publishes a file's SHA-256 as the folder of its URL. The Drive ids are those of the authors' README
# (MediaBrain-SJTU/MVFA-AD, "Pretrained model", "Medical Anomaly Detection Benchmark"), which gives no hashes.
SOURCES: dict[str, Source] = {
    "clip": Source(OPENAI_FILES[CLIP_MODEL], CLIP_URL, CLIP_URL.split("/")[-2], CLIP_URL),
    "few-shot": drive("few-shot.zip", "1bV1yzPxJarTRfd8liMIwyHcGywTTEL2k"),
    "zero-shot": drive("zero-shot.zip", "1nGhcK32CrkgTR5Rav6rNfptUHaASfRnU"),
    "Brain": drive("Brain.tar.gz", "1YxcjcQqsPdkDO0rqIVHR5IJbqS9EIyoK"),
    "Liver": drive("Liver.tar.gz", "1xriF0uiwrgoPh01N6GlzE5zPi_OIJG1I"),
    "Retina_RESC": drive("Retina_RESC.tar.gz", "1BqDbK-7OP5fUha5zvS2XIQl-_t8jhTpX"),
    "Retina_OCT2017": drive("Retina_OCT2017.tar.gz", "1GqT0V3_3ivXPAuTn4WbMM6B9i0JQcSnM"),
    "Chest": drive("Chest.tar.gz", "15DhnBAk-h6TGLTUbNLxP8jCCDtwOHAjb"),
    "Histopathology": drive("Histopathology_AD.tar.gz", "1hueVJZCFIZFHBLHFlv1OhqF8SFjUVHk6"),
    "support_lists": Source("{}/{}-shot.txt", LISTS_URL, None, LISTS_PAGE),  # a template: dataset, k
}


class UsageError(Exception):
    """Bad input (target, name, flag, root): one line, exit code 2."""


class FetchError(Exception):
    """A download, verification or unpacking that failed: one line, exit code 1."""


class DriveRefused(Exception):
    """Google Drive answered with a web page (quota exceeded, no permission) instead of the file."""


class Item(NamedTuple):
    """One thing to fetch or check: clip, checkpoints of a kind, data or support_lists of a dataset."""

    target: str
    name: str = ""


class Options(NamedTuple):
    """How to fetch: under `root`, replacing what is there (`force`), from a file by hand, from a mirror."""

    root: Path
    force: bool = False
    from_file: Path | None = None
    base_url: str | None = None
    keep_archives: bool = False


class Report(NamedTuple):
    """What --check found for one item: present, missing or damaged, why, and a dataset's counts."""

    state: str
    path: str
    detail: str
    counts: str = ""


# ---------------------------------------------------------------- items and where they go
def items_of(target: str, names: list[str]) -> list[Item]:
    """The items a target and its names stand for; UsageError for an unknown target or name."""
    if target not in TARGETS:
        raise UsageError(f"unknown target {target!r}: choose one of {', '.join(TARGETS)}")
    if target in ("clip", "all"):
        if names:
            raise UsageError(f"`{target}` takes no names (got {' '.join(names)}): drop them")
        others = ("checkpoints", "data", "support_lists") if target == "all" else ()
        return [Item("clip"), *(item for t in others for item in items_of(t, []))]
    choices = KINDS if target == "checkpoints" else CLASS_NAMES
    for name in names:
        if name not in choices:
            raise UsageError(f"unknown name {name!r} for `{target}`: choose among {', '.join(choices)}")
    return [Item(target, name) for name in dict.fromkeys(names or choices)]


def dest_of(item: Item, root: Path) -> Path:
    """Where the scripts read an item: a file (clip) or a folder."""
    if item.target == "clip":
        return root / "CLIP" / "ckpt" / SOURCES["clip"].name
    if item.target == "checkpoints":
        return root / "ckpt" / item.name
    if item.target == "data":
        return root / "data" / DATASETS[item.name].folder
    return root / "dataset" / "fewshot_seed" / item.name


def command_for(item: Item, root: Path) -> str:
    """The command that fetches `item` into `root`."""
    where = "" if root.resolve() == REPO else f" --root {root}"
    return f"python -m tools.download {item.target}{' ' + item.name if item.name else ''}{where}"


def rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def say(text: str) -> None:
    print(text, flush=True)


def size_text(n: int | None) -> str:
    if n is None:
        return "unknown size"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def need_space(folder: Path, size: int, what: str) -> None:
    """FetchError unless `folder`'s disk has `size` bytes free."""
    free = shutil.disk_usage(folder).free
    if size > free:
        raise FetchError(
            f"{what} needs {size_text(size)} in {folder}, whose disk has {size_text(free)} free: "
            f"make room, or pass --root DIR on a larger disk"
        )


# ---------------------------------------------------------------- downloads.json
def read_manifest(root: Path) -> dict:
    """The manifest's entries, keyed by path under `root`; {} when there is none or it is unreadable."""
    try:
        return json.loads((root / MANIFEST).read_text())
    except FileNotFoundError:
        return {}
    except (ValueError, OSError) as e:
        print(f"warning: {root / MANIFEST} unreadable ({e}): its entries are ignored", file=sys.stderr)
        return {}


def record(root: Path, entries: dict[Path, dict]) -> None:
    """Add source, size, SHA-256 and date of installed files to the manifest (written atomically)."""
    manifest, date = read_manifest(root), datetime.now(UTC).isoformat(timespec="seconds")
    manifest.update({rel(path, root): {**entry, "date": date} for path, entry in entries.items()})
    tmp = root / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, root / MANIFEST)


def file_entry(path: Path, source: str, **extra) -> dict:
    return {"source": source, "size": path.stat().st_size, "sha256": sha256(path), **extra}


def tree_stats(folder: Path) -> dict:
    """Number of files and bytes under `folder` (what --check compares for a dataset)."""
    sizes = [p.stat().st_size for p in folder.rglob("*") if p.is_file()]
    return {"files": len(sizes), "bytes": sum(sizes)}


# ---------------------------------------------------------------- HTTP: requests, Drive, resumable downloads
def rehost(url: str, base_url: str | None) -> str:
    """`url` with its scheme and host replaced by `base_url` (tests and mirrors); its path and query kept."""
    if not base_url:
        return url
    parts = urlsplit(url)
    return base_url.rstrip("/") + parts.path + (f"?{parts.query}" if parts.query else "")


def get(session: requests.Session, url: str, offset: int) -> requests.Response:
    headers = {"Accept-Encoding": "identity"}  # bytes as stored, so that offsets and sizes are the file's
    headers.update({"Range": f"bytes={offset}-"} if offset else {})
    return session.get(url, headers=headers, stream=True, timeout=TIMEOUT)


def is_html(response: requests.Response) -> bool:
    return response.headers.get("Content-Type", "").startswith("text/html")


class DrivePage(HTMLParser):
    """A Drive web page: the confirmation form of a file too large to scan for viruses, or why it refuses."""

    def __init__(self, text: str):
        super().__init__()
        self.action: str | None = None
        self.fields: dict[str, str] = {}
        self.title = self.error = self._tag = ""
        self._in_form = self._in_error = False
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = {k: v or "" for k, v in attrs}
        self._tag = tag
        if tag == "form" and "download" in a.get("action", ""):
            self.action, self._in_form = a["action"], True
        elif tag == "input" and self._in_form and a.get("type") == "hidden" and a.get("name"):
            self.fields[a["name"]] = a.get("value", "")
        elif tag == "a" and self.action is None and "confirm=" in a.get("href", ""):  # the older page's link
            self.action = a["href"]
        self._in_error = self._in_error or "uc-error-subcaption" in a.get("class", "")

    def handle_endtag(self, tag: str) -> None:
        self._in_form = self._in_form and tag != "form"
        self._in_error = self._in_error and tag not in ("p", "div")
        self._tag = ""

    def handle_data(self, data: str) -> None:
        self.title += data if self._tag == "title" else ""
        self.error += data if self._in_error else ""

    def confirm_url(self, page_url: str) -> str | None:
        """The request that confirms the download, or None when the page holds no such form or link."""
        if self.action is None:
            return None
        url = urljoin(page_url, self.action)
        return f"{url}{'&' if '?' in url else '?'}{urlencode(self.fields)}" if self.fields else url

    def reason(self) -> str:
        return " ".join((self.error or self.title or "a web page instead of the file").split())


def open_file(
    session: requests.Session, src: Source, url: str, offset: int, base_url: str | None
) -> requests.Response:
    """The response that carries the file from byte `offset`, past Drive's virus-scan confirmation page."""
    response = get(session, url, offset)
    if not (src.page.startswith("https://drive.google.com/") and is_html(response)):
        return response
    page = DrivePage(response.text)
    response.close()
    confirm = page.confirm_url(url)
    if confirm is None:
        raise DriveRefused(page.reason())
    response = get(session, rehost(confirm, base_url), offset)
    if is_html(response):
        reason = DrivePage(response.text).reason()
        response.close()
        raise DriveRefused(reason)
    return response


def content_range(response: requests.Response) -> tuple[int | None, int | None]:
    """(first byte, total size) of the Content-Range header; None where it does not say."""
    m = re.fullmatch(r"bytes (?:(\d+)-\d+|\*)/(\d+|\*)", response.headers.get("Content-Range", "").strip())
    if not m:
        return None, None
    return (int(m[1]) if m[1] else None), (int(m[2]) if m[2] != "*" else None)


def part_size(part: Path) -> int:
    return part.stat().st_size if part.exists() else 0


def fetch_once(session: requests.Session, src: Source, url: str, part: Path, base_url: str | None) -> bool:
    """One request for what `part` lacks, appended to it; True when `part` is then whole."""
    offset = part_size(part)
    with open_file(session, src, url, offset, base_url) as response:
        if response.status_code == 416 and offset:  # nothing after `offset`: whole if that is the file's size
            whole = content_range(response)[1] == offset
            if not whole:
                part.unlink()
            return whole
        if response.status_code not in (200, 206):
            raise FetchError(f"{src.name}: {url} answered HTTP {response.status_code} {response.reason}")
        length = response.headers.get("Content-Length")
        if response.status_code == 206:
            start, total = content_range(response)
            if start != offset:
                raise FetchError(
                    f"{src.name}: asked {url} for bytes from {offset}, it sent them from {start}"
                )
            if total is None and length:
                total = offset + int(length)
        else:  # the whole file: the server does not resume, or nothing was there
            offset, total = 0, int(length) if length else None
        if total is not None:
            need_space(part.parent, total - offset, src.name)
        resuming = f"resuming at {size_text(offset)} of " if offset else ""
        say(f"{src.name}: {resuming}{size_text(total)} from {url}")
        bar = tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, desc=src.name, disable=None, leave=False
        )
        with open(part, "ab" if offset else "wb") as f, bar:
            for chunk in response.iter_content(CHUNK):
                f.write(chunk)
                bar.update(len(chunk))
    return total is None or part_size(part) == total


def download(session: requests.Session, src: Source, url: str, part: Path, base_url: str | None) -> None:
    """Fetch `url` into `part`, resuming from what `part` holds (HTTP Range) after a lost connection."""
    part.parent.mkdir(parents=True, exist_ok=True)
    error = ""
    for attempt in range(ATTEMPTS):
        got = part_size(part)
        if attempt:
            again = (
                f"connection lost ({error}); resuming at {size_text(got)}"
                if got
                else f"{error}; trying again"
            )
            say(f"{src.name}: {again}")
            time.sleep(attempt * RETRY_WAIT)
        try:
            if fetch_once(session, src, url, part, base_url):
                return
            error = "the server sent less than it announced"
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
            cause = re.search(r"\[Errno -?\d+\] [^'\")]+", str(e))  # e.g. [Errno 111] Connection refused
            error = f"{type(e).__name__}: {cause[0]}" if cause else type(e).__name__
    got = part_size(part)
    raise FetchError(
        f"{src.name}: download from {url} {f'stopped at {size_text(got)}' if got else 'failed'} after "
        f"{ATTEMPTS} tries ({error}); run the same command again{' to resume' if got else ''}"
    )


# ---------------------------------------------------------------- archives
class Member(NamedTuple):
    parts: tuple[str, ...]  # the path inside the archive, checked to stay inside
    size: int
    is_dir: bool
    info: zipfile.ZipInfo | tarfile.TarInfo


class Layout(NamedTuple):
    members: list[Member]  # what is unpacked (packing litter such as __MACOSX/ left out)
    top: tuple[str, ...]  # the folder holding the content, whatever its name: () or (name,)
    size: int  # bytes once unpacked


def is_litter(parts: tuple[str, ...]) -> bool:
    return parts[0] == "__MACOSX" or parts[-1] == ".DS_Store" or parts[-1].startswith("._")


def list_members(archive: Path) -> list[Member]:
    """The members of a zip or tar(.gz); FetchError for one that would land outside its folder, or a link."""
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                raw = [(i.filename, i.file_size, i.is_dir(), True, i) for i in z.infolist()]
        else:
            with tarfile.open(archive) as t:
                raw = [(m.name, m.size, m.isdir(), m.isfile() or m.isdir(), m) for m in t.getmembers()]
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise FetchError(
            f"{archive} is not a readable zip or tar archive ({type(e).__name__}: {e}): "
            f"damaged, or a web page saved in its place"
        ) from None
    members = []
    for name, size, is_dir, regular, info in raw:
        path = PurePosixPath(name.replace("\\", "/"))
        if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
            raise FetchError(f"refusing {archive.name}: member {name!r} would land outside the target folder")
        if not regular:
            raise FetchError(f"refusing {archive.name}: member {name!r} is a link or a device, not a file")
        if path.parts and not is_litter(path.parts):
            members.append(Member(path.parts, size, is_dir, info))
    return members


def layout_of(archive: Path, item: Item) -> Layout:
    """The archive's layout, checked to hold what `item` needs before anything is unpacked."""
    members = list_members(archive)
    tops = sorted({m.parts[0] for m in members})
    top = (tops[0],) if len(tops) == 1 and any(len(m.parts) > 1 for m in members) else ()
    inside = {m.parts[len(top) :] for m in members} - {()}
    if item.target == "data":
        others = {n for obj, d in DATASETS.items() if obj != item.name for n in (obj, d.folder)}
        ok = {"valid", "test"} <= {p[0] for p in inside if len(p) > 1} and not others & set(top)
        expected = f"one folder (e.g. {DATASETS[item.name].folder}/) holding valid/ and test/"
    else:
        ok = all((f"{obj}.pth",) in inside for obj in CLASS_NAMES)
        expected = f"the six {{obj}}.pth checkpoints ({', '.join(CLASS_NAMES)}), at its top or in one folder"
    if not ok:
        found = ", ".join(tops[:6]) or "nothing"
        raise FetchError(
            f"{archive.name} does not hold what `{item.target} {item.name}` needs: expected {expected}, "
            f"found {found} at its top; nothing unpacked"
        )
    return Layout(members, top, sum(m.size for m in members))


def unpack(archive: Path, layout: Layout, tmp: Path) -> None:
    """Write the members under `tmp`, the top folder's content at `tmp` itself; FetchError if that fails."""
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    is_zip = zipfile.is_zipfile(archive)
    bar = tqdm(total=layout.size, unit="B", unit_scale=True, desc=f"unpacking {archive.name}", disable=None)
    try:
        with zipfile.ZipFile(archive) if is_zip else tarfile.open(archive) as arc, bar:
            for m in layout.members:
                target = tmp.joinpath(*m.parts[len(layout.top) :])  # checked parts: inside tmp
                if m.is_dir:
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with arc.open(m.info) if is_zip else arc.extractfile(m.info) as f, open(target, "wb") as out:
                    shutil.copyfileobj(f, out, CHUNK)
                bar.update(m.size)
    except (
        tarfile.TarError,
        zipfile.BadZipFile,
        EOFError,
        zlib.error,
        OSError,
    ) as e:  # bad data, a full disk
        shutil.rmtree(tmp, ignore_errors=True)
        raise FetchError(f"cannot unpack {archive} ({type(e).__name__}: {e}); nothing installed") from None


def install_folder(tmp: Path, dest: Path) -> None:
    """Put `tmp` in `dest`'s place by renames; a folder there before (--force) is removed only afterwards."""
    old = dest.with_name(f".{dest.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)


def install_files(tmp: Path, dest: Path, force: bool) -> list[Path]:
    """Move the files of `tmp` into `dest`, keeping files already there unless `force`; the files moved."""
    moved = []
    for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
        target = dest / path.relative_to(tmp)
        if target.exists() and not force:
            say(f"{target}: present, kept (--force to replace)")
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
        moved.append(target)
    shutil.rmtree(tmp)
    return moved


# ---------------------------------------------------------------- fetching each kind of item
def by_hand(path: Path, src: Source) -> str:
    return f"{path.resolve()} (by hand; published at {src.page})"


def fetch_clip(opts: Options, session: requests.Session) -> None:
    """OpenAI's file, verified against the SHA-256 in its URL before it takes its name."""
    item, src = Item("clip"), SOURCES["clip"]
    dest = dest_of(item, opts.root)
    if dest.exists() and not opts.force:
        return say(f"{rel(dest, opts.root)}: present, kept (--force to fetch again)")
    part, bad = dest.with_name(f"{dest.name}.part"), dest.with_name(f"{dest.name}.bad")
    if opts.force:
        part.unlink(missing_ok=True)
    if opts.from_file:
        dest.parent.mkdir(parents=True, exist_ok=True)
        need_space(dest.parent, opts.from_file.stat().st_size, src.name)
        shutil.copyfile(opts.from_file, part)
        source = by_hand(opts.from_file, src)
    else:
        source = rehost(src.url, opts.base_url)
        download(session, src, source, part, opts.base_url)
    digest = sha256(part)
    if digest != src.sha256:
        if opts.from_file:
            part.unlink()
            raise FetchError(
                f"{opts.from_file} is not OpenAI's {src.name}: SHA-256 {digest}, not {src.sha256}"
            )
        os.replace(part, bad)
        raise FetchError(
            f"{src.name}: SHA-256 {digest} is not the published {src.sha256}: not installed, kept aside as "
            f"{bad}; run the same command again to download it anew"
        )
    os.replace(part, dest)
    record(opts.root, {dest: {"source": source, "size": dest.stat().st_size, "sha256": digest}})
    say(f"{rel(dest, opts.root)}: installed, SHA-256 matches OpenAI's")


def fetch_lists(item: Item, opts: Options, session: requests.Session) -> None:
    """The four support lists of a dataset, each checked to parse before it takes its name."""
    template, folder, fetched = SOURCES["support_lists"], dest_of(item, opts.root), []
    for k in SHOTS:
        dest = folder / f"{k}-shot.txt"
        if dest.exists() and not opts.force:
            say(f"{rel(dest, opts.root)}: present, kept (--force to fetch again)")
            continue
        src = Source(
            template.name.format(item.name, k), template.url.format(item.name, k), None, template.page
        )
        part, url = dest.with_name(f"{dest.name}.part"), rehost(src.url, opts.base_url)
        part.unlink(missing_ok=True)  # a few hundred bytes: fetched whole
        download(session, src, url, part, opts.base_url)
        names = list_names(part)
        if names < k:
            os.replace(part, dest.with_name(f"{dest.name}.bad"))
            raise FetchError(f"{url} is not a {k}-shot support list ({names} names on its n-0:/a-0: lines)")
        os.replace(part, dest)
        record(opts.root, {dest: file_entry(dest, url)})
        fetched.append(str(k))
    if fetched:
        say(f"{rel(folder, opts.root)}: installed the {', '.join(fetched)}-shot lists")


def installed(item: Item, root: Path) -> bool:
    dest = dest_of(item, root)
    if item.target == "checkpoints":
        return all((dest / f"{obj}.pth").is_file() for obj in CLASS_NAMES)
    return dest.is_dir()


def obtain(item: Item, opts: Options, session: requests.Session) -> tuple[Path, str, bool]:
    """The archive to unpack, its source for the manifest, and whether to delete it afterwards."""
    src = SOURCES[item.name]
    if opts.from_file:
        return opts.from_file, by_hand(opts.from_file, src), False
    final = opts.root / "downloads" / src.name
    part = final.with_name(f"{src.name}.part")
    if opts.force:
        final.unlink(missing_ok=True)
        part.unlink(missing_ok=True)
    if final.is_file():
        say(f"{rel(final, opts.root)}: there before this run, unpacking it")
        return (
            final,
            f"{rel(final, opts.root)} (there before; published at {src.page})",
            not opts.keep_archives,
        )
    url = rehost(src.url, opts.base_url)
    try:
        download(session, src, url, part, opts.base_url)
    except DriveRefused as e:
        raise FetchError(
            f"Google Drive refused {src.name} ({e}): open {src.page} in a browser, save the file as {final} "
            f"and run `{command_for(item, opts.root)}` again (or pass --from FILE)"
        ) from None
    os.replace(part, final)
    return final, url, not opts.keep_archives


def fetch_archive(item: Item, opts: Options, session: requests.Session) -> None:
    """A checkpoint zip or a dataset tar.gz: fetched, recorded, checked, then unpacked in place by renames."""
    dest = dest_of(item, opts.root)
    if installed(item, opts.root) and not opts.force:
        return say(f"{rel(dest, opts.root)}: present, kept (--force to fetch again)")
    archive, source, delete = obtain(item, opts, session)
    try:
        layout = layout_of(archive, item)
    except FetchError as e:
        if not delete:  # --from FILE: the user's file stays where it is
            raise
        bad = archive.with_name(f"{archive.name}.bad")
        os.replace(archive, bad)  # so that the next run fetches it anew
        raise FetchError(f"{e} (set aside as {rel(bad, opts.root)})") from None
    dest.parent.mkdir(parents=True, exist_ok=True)
    need_space(dest.parent, layout.size, f"unpacking {archive.name}")
    tmp = dest.with_name(f".{dest.name}.unpacking")
    unpack(archive, layout, tmp)
    origin = {
        "archive": archive.name,
        "archive_size": archive.stat().st_size,
        "archive_sha256": sha256(archive),
    }
    if item.target == "data":
        install_folder(tmp, dest)
        record(opts.root, {dest: {"source": source, **origin, **tree_stats(dest)}})
    else:
        moved = install_files(tmp, dest, opts.force)
        record(opts.root, {path: file_entry(path, source, **origin) for path in moved})
    if delete:
        archive.unlink()
    say(f"{rel(dest, opts.root)}: installed from {archive.name}")


def fetch(item: Item, opts: Options, session: requests.Session) -> None:
    """Download, verify and install one item; nothing when it is in place already, unless --force."""
    if item.target == "clip":
        fetch_clip(opts, session)
    elif item.target == "support_lists":
        fetch_lists(item, opts, session)
    else:
        fetch_archive(item, opts, session)


# ---------------------------------------------------------------- --check
def check_clip(root: Path, manifest: dict) -> list[Report]:
    item, src = Item("clip"), SOURCES["clip"]
    path = dest_of(item, root)
    key, again = rel(path, root), f"fetch again: {command_for(item, root)} --force"
    if not path.is_file():
        return [Report("missing", key, f"fetch: {command_for(item, root)}")]
    if sha256(path) == src.sha256:
        return [Report("present", key, "SHA-256 matches OpenAI's")]
    if key in manifest:
        return [Report("damaged", key, f"SHA-256 differs from OpenAI's and from downloads.json; {again}")]
    if zip_flaw(path, members=True):
        return [Report("damaged", key, f"not a complete archive (an interrupted download?); {again}")]
    # a whole, readable file that is not OpenAI's (a stand-in, another release): the scripts load it as it is
    return [
        Report("present", key, "not verified: a complete archive, but not OpenAI's file (SHA-256 differs)")
    ]


def check_checkpoints(kind: str, root: Path, manifest: dict) -> list[Report]:
    item, reports = Item("checkpoints", kind), []
    for obj in CLASS_NAMES:
        path = dest_of(item, root) / f"{obj}.pth"
        key, entry = rel(path, root), manifest.get(rel(path, root))
        if not path.is_file():
            reports.append(Report("missing", key, f"fetch: {command_for(item, root)}"))
        elif entry and (path.stat().st_size, sha256(path)) != (entry["size"], entry["sha256"]):
            again = f"fetch again: {command_for(item, root)} --force"
            reports.append(
                Report("damaged", key, f"differs from downloads.json (changed or damaged); {again}")
            )
        elif entry:
            reports.append(Report("present", key, "as recorded in downloads.json"))
        elif not zip_flaw(path, members=True):
            reports.append(Report("present", key, "not verified: no entry in downloads.json"))
        else:
            detail = f"not a complete torch checkpoint file; fetch again: {command_for(item, root)} --force"
            reports.append(Report("damaged", key, detail))
    return reports


def count_images(folder: Path) -> int:
    return len(list_images(str(folder))) if folder.is_dir() else 0


def check_data(obj: str, root: Path, manifest: dict) -> Report:
    """Counts of images and masks per split and state; damaged when a folder the scripts read is empty."""
    item = Item("data", obj)
    path = dest_of(item, root)
    key, entry = rel(path, root), manifest.get(rel(path, root))
    if not path.is_dir():
        return Report("missing", key, f"fetch: {command_for(item, root)}")
    counts, problems = [], []
    for split in ("valid", "test"):
        for state in ("good", "Ungood"):
            images = count_images(path / split / state / "img")
            text = f"{split}/{state} img {images}"
            problems += [f"{split}/{state}/img missing or empty"] if not images else []
            if DATASETS[obj].has_masks and state == "Ungood":
                masks = count_images(path / split / state / "anomaly_mask")
                text += f" anomaly_mask {masks}"
                if (split == "test" and masks != images) or not masks:  # the test split pairs every image
                    problems.append(f"{split}/{state}: {masks} masks for {images} images")
            counts.append(text)
    stats = tree_stats(path) if entry else None
    if stats and (stats["files"], stats["bytes"]) != (entry["files"], entry["bytes"]):
        problems.append(
            f"{stats['files']} files, {stats['bytes']} bytes where downloads.json recorded "
            f"{entry['files']}, {entry['bytes']}"
        )
    if problems:
        detail = "; ".join(problems) + f"; fetch again: {command_for(item, root)} --force"
        return Report("damaged", key, detail, " | ".join(counts))
    detail = "as recorded in downloads.json" if entry else "not verified: no entry in downloads.json"
    return Report("present", key, detail, " | ".join(counts))


def list_names(path: Path) -> int:
    """The fewer of the image names on the `n-0:` and `a-0:` lines of a support list (0: not a list)."""
    try:
        lines = [line.split() for line in path.read_text(encoding="utf-8").splitlines()]
    except (UnicodeDecodeError, OSError):
        return 0
    counts = {t[0]: sum(n.endswith(SUPPORT_EXTENSIONS) for n in t[1:]) for t in lines if t}
    return min(counts.get("n-0:", 0), counts.get("a-0:", 0))


def check_lists(obj: str, root: Path, manifest: dict) -> Report:
    """The four lists of a dataset: parsed, and compared with downloads.json where it has them."""
    item = Item("support_lists", obj)
    folder = dest_of(item, root)
    missing, damaged, short, recorded = [], [], [], 0
    for k in SHOTS:
        path = folder / f"{k}-shot.txt"
        entry = manifest.get(rel(path, root))
        names = list_names(path) if path.is_file() else None
        if names is None:
            missing.append(path.name)
        elif not names:
            damaged.append(f"{path.name}: no n-0:/a-0: lines of image names")
        elif entry and sha256(path) != entry["sha256"]:
            damaged.append(f"{path.name} differs from downloads.json")
        short += [f"{k}-shot {names}"] if names and names < k else []
        recorded += bool(entry)
    key = rel(folder, root)
    if damaged:
        return Report(
            "damaged", key, "; ".join(damaged) + f"; fetch again: {command_for(item, root)} --force"
        )
    if missing:
        return Report("missing", key, f"{', '.join(missing)}; fetch: {command_for(item, root)}")
    verified = {0: "not verified: no entry in downloads.json", len(SHOTS): "as recorded in downloads.json"}
    detail = f"{', '.join(map(str, SHOTS))}-shot lists, {verified.get(recorded, 'partly in downloads.json')}"
    # a small dataset's lists hold all its images when k is larger: the scripts read them, --shot k stops
    return Report("present", key, detail + (f" (fewer names than k: {', '.join(short)})" if short else ""))


def check(items: list[Item], root: Path) -> int:
    """Print present / missing / damaged per item and a summary; 1 if something the scripts need is not."""
    manifest = read_manifest(root)
    reports = []
    for item in items:
        if item.target == "clip":
            reports += check_clip(root, manifest)
        elif item.target == "checkpoints":
            reports += check_checkpoints(item.name, root, manifest)
        elif item.target == "data":
            reports.append(check_data(item.name, root, manifest))
        else:
            reports.append(check_lists(item.name, root, manifest))
    width = max(len(r.path) for r in reports)
    for r in reports:
        say(f"{r.state:<8} {r.path:<{width}}  {r.detail}")
        if r.counts:
            say(f"{'':<8} {'':<{width}}  {r.counts}")
    states = [r.state for r in reports]
    summary = ", ".join(f"{states.count(s)} {s}" for s in ("present", "missing", "damaged"))
    say(f"{summary} (under {root})")
    return 1 if set(states) - {"present"} else 0


# ---------------------------------------------------------------- command line
class Parser(argparse.ArgumentParser):
    """argparse whose errors are a UsageError: one line, exit code 2."""

    def error(self, message: str):
        raise UsageError(f"{message} (see --help)")


def parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="python -m tools.download",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "target",
        nargs="?",
        help="clip | checkpoints [few-shot zero-shot] | data [OBJ ...] | support_lists [OBJ ...] | all; "
        f"OBJ: {', '.join(CLASS_NAMES)} (default: all six). With --check: what to check (default: all)",
    )
    p.add_argument("names", nargs="*", metavar="NAME", help="checkpoint kinds or datasets of the target")
    p.add_argument(
        "--root", default=str(REPO), help="folder the layout is written under (default: this checkout)"
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="print present / missing / damaged per item, with image and mask counts per dataset; "
        "exit 1 if something the scripts need is missing or damaged",
    )
    p.add_argument("--force", action="store_true", help="fetch and replace files that are already there")
    p.add_argument(
        "--from",
        dest="from_file",
        metavar="FILE",
        help="install this file, fetched by hand (e.g. from Drive in a browser), as one item: "
        "`clip`, `checkpoints few-shot|zero-shot` or `data OBJ`; verified and unpacked as a download is",
    )
    p.add_argument(
        "--base_url",
        metavar="URL",
        help="fetch every file from this scheme://host[/prefix] instead of its own host, path kept "
        "(for tests and mirrors)",
    )
    p.add_argument(
        "--keep_archives",
        action="store_true",
        help="keep the downloaded archives in ROOT/downloads/ after unpacking",
    )
    return p


def options(args: argparse.Namespace, items: list[Item], root: Path) -> Options:
    """The run's options, with --from and --root checked (UsageError)."""
    from_file = Path(args.from_file).expanduser() if args.from_file else None
    if from_file:
        if len(items) != 1 or items[0].target == "support_lists":
            raise UsageError(
                "--from installs one file as one item: name it as `clip`, `checkpoints few-shot|zero-shot` "
                "or `data OBJ`"
            )
        if not from_file.is_file():
            raise UsageError(f"--from {from_file}: no such file")
    try:
        root.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=root).close()
    except OSError as e:
        raise UsageError(
            f"--root {root}: cannot write there ({e.strerror or e}); pass a folder you can write to"
        ) from None
    return Options(root, args.force, from_file, args.base_url, args.keep_archives)


def main(argv: list[str] | None = None) -> int:
    """Fetch or check; 0 when done or complete, 1 when a download or check failed, 2 for bad input."""
    try:
        args = parser().parse_args(argv)
        if not args.target and not args.check:
            raise UsageError(f"name a target ({', '.join(TARGETS)}) or pass --check")
        items = items_of(args.target or "all", args.names)
        root = Path(args.root).expanduser()
        if args.check:
            return check(items, root)
        opts = options(args, items, root)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    failed = 0
    with requests.Session() as session:
        session.headers["User-Agent"] = "MVFA-download (python-requests)"
        for item in items:
            try:
                fetch(item, opts, session)
            except FetchError as e:
                print(f"error: {e}", file=sys.stderr)
                failed += 1
            except (requests.RequestException, OSError) as e:  # a bad --base_url, a full disk, ...
                print(f"error: {item.target} {item.name}: {type(e).__name__}: {e}", file=sys.stderr)
                failed += 1
            except KeyboardInterrupt:
                print("interrupted: run the same command again to resume", file=sys.stderr)
                return 130
    if failed:
        say(f"{failed} of {len(items)} items failed; run the same command again to resume")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
