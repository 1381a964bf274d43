"""Adapter checkpoints (the released layout, written atomically, never replacing a file unasked) and the JSON
record of every run (metrics, arguments, checksums, library versions)."""

import hashlib
import json
import os
import platform
import tempfile
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from utils import BadValue, FileInTheWay


def check_writable(path: Path, overwrite: bool) -> None:
    """Refuse, before any work, to replace a checkpoint that exists already (a downloaded one, say)."""
    if path.exists() and not overwrite:
        raise FileInTheWay(
            f"{path} exists already: pass --overwrite to replace it, or choose another folder",
            flag="save_path",
        )


def check_folder(folder: Path, flag: str) -> None:
    """Refuse, before any work, a folder the run could not write into: a file in its place (or in place of a
    folder above it), or no permission. Creates nothing that stays: a test file is made and removed in the
    folder, or in the nearest folder above that exists. `flag`: the setting that gave the folder
    ('save_path'), which the command line names."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file" if existing == folder else f"cannot be made: {existing} is a file"
        raise BadValue(f"{folder} {what}, not a folder; choose another folder", flag=flag)
    # trying is what counts: os.access asks for the real user, not the effective one, and network file systems
    # may decide otherwise
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise BadValue(
            f"{folder} cannot be written ({e.strerror} in {existing}); choose another folder or make it "
            f"writable",
            flag=flag,
        ) from None


def zip_flaw(path: Path, *, members: bool = False) -> str | None:
    """What makes `path` no zip archive as torch.save writes, told by its size and zip structure alone
    (unpickling random bytes may ask for any amount of memory); with `members`, every member's CRC is checked
    too (the whole file is read). None if it could be one."""
    if path.stat().st_size == 0:
        return "it is empty"
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"
        return (
            "it is cut off: a zip archive without its end"
            if zipped
            else "it is no zip archive as torch.save writes"
        )
    if not members:
        return None
    try:
        with zipfile.ZipFile(path) as z:
            damaged = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
        return f"its members cannot be read ({type(e).__name__})"
    return None if damaged is None else f"its member {damaged} is damaged"


def check_readable(path: Path, what: str) -> None:
    """Refuse, before the model is built, a weights file that cannot serve: unreadable, empty, or a zip
    archive (torch.save, TorchScript) whose end is missing, as a download or copy stopped early leaves it."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise BadValue(f"cannot read {what} {path}: {e.strerror}") from None
    if not head:
        raise BadValue(f"{what} {path} is empty: download or copy it again")
    if head == b"PK\x03\x04" and zip_flaw(path):
        raise BadValue(
            f"{what} {path} is cut off (a zip archive without its end): an incomplete download "
            f"or copy; download or copy it again"
        )


def save_atomic(state: dict, path: Path) -> None:
    """torch.save through a temporary file and a rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def save_checkpoint(model, path: Path, extras: dict) -> None:
    """The released layout plus extra keys, written atomically."""
    state = {name: {k: v.cpu() for k, v in sd.items()} for name, sd in model.adapter_state().items()}
    save_atomic({**state, **extras}, path)


def sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def adapters_sha256(adapter_state: dict) -> str:
    """One digest of adapter weights in the released layout ({'seg_adapters': ..., 'det_adapters': ...}): per
    tensor, in state_dict order, its name ('seg_adapters.0.fc1.0.weight') then its float32 bytes. Two runs
    whose final adapters have the same digest ended with the same bits."""
    digest = hashlib.sha256()
    for branch in ("seg_adapters", "det_adapters"):
        for key, tensor in adapter_state[branch].items():
            digest.update(f"{branch}.{key}".encode())
            digest.update(tensor.detach().float().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def versions(device: torch.device | None = None) -> dict:
    """Library versions; on a CUDA `device` (the run's) also what its fp16 autocast does to upsampling."""
    import PIL
    import sklearn

    return {
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "numpy": np.__version__,
        "scikit-learn": sklearn.__version__,
        "Pillow": PIL.__version__,
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        # the vector instructions torch's CPU kernels use: they decide the last bits of a CPU run (README)
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda_autocast_upsample": autocast_upsample_dtype(device)
        if device and device.type == "cuda"
        else None,
    }


def autocast_upsample_dtype(device: torch.device) -> str:
    """The dtype of fp16 bilinear upsampling under the device's fp16 autocast (the reference's maps follow
    it): on CUDA 'torch.float16' in torch of the paper's time (its few-shot maps then float16),
    'torch.float32' in recent torch."""
    x = torch.zeros(1, 1, 2, 2, device=device, dtype=torch.float16)
    with torch.autocast(device.type, dtype=torch.float16):
        return str(F.interpolate(x, size=4, mode="bilinear", align_corners=True).dtype)


def write_record(
    out_dir: str,
    script: str,
    name: str,
    flags: dict,
    result: dict,
    files: dict,
    device: torch.device | None = None,
    training: dict | None = None,
) -> Path:
    """A JSON per run, `{script}_{name}_{time}_{pid}.json`: full-precision metrics, the command line's flags,
    checksums of the weights used, `versions(device)`, and for a training run `training` (its mean loss per
    epoch)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    stem = f"{script}_{name}_{stamp}_{os.getpid()}"
    path, n = out / f"{stem}.json", 1
    while path.exists():  # a second run of the same script and dataset within the second, in one process
        n += 1
        path = out / f"{stem}-{n}.json"
    record = {
        "script": script,
        "time": stamp,
        "args": flags,
        "metrics": result,
        "files": {key: {"path": str(p), "sha256": sha256(p)} for key, p in files.items() if p},
        "versions": versions(device),
        **({"training": training} if training else {}),
    }
    path.write_text(json.dumps(record, indent=1, default=str))
    return path
