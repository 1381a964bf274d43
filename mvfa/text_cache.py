"""Text features kept on disk between runs: they depend only on the weights, the model's text path, the prompt
sentences, the precision and the device type, and a hit gives the very tensor an encoding would."""

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from CLIP import CLIP_Inplanted
from prompt import text_features_for

from .config import ModelConfig
from .precision import Precision
from .records import sha256

VERSION = 1  # raised whenever the encoding changes, so that older entries are never used


def file_digest(path: Path, folder: Path) -> str:
    """The sha256 of a weights file, computed once and remembered by path, size and modification time."""
    path = path.resolve()
    stat = path.stat()
    memo_file = folder / "weights.json"
    memo = json.loads(memo_file.read_text()) if memo_file.is_file() else {}
    seen = memo.get(str(path))
    if seen and seen["size"] == stat.st_size and seen["mtime_ns"] == stat.st_mtime_ns:
        return seen["sha256"]
    digest = sha256(path)
    memo[str(path)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    folder.mkdir(parents=True, exist_ok=True)
    tmp = memo_file.with_name(f"{memo_file.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(memo, indent=1))
    os.replace(tmp, memo_file)
    return digest


def tensor_digest(tensor: torch.Tensor) -> str:
    data = tensor.detach().cpu().contiguous()
    digest = hashlib.sha256(data.view(torch.uint8).numpy())  # the bytes in place, no copy
    digest.update(str(data.dtype).encode())
    return digest.hexdigest()


class TextCache:
    """Entries `{folder}/text/{digest of what the features depend on}.pt`; an entry whose recorded key or
    content checksum does not match is encoded again and replaced, never used."""

    def __init__(self, folder: Path, identity: dict):
        self.folder, self.identity = Path(folder), identity

    def key(self, name: str, sentences) -> dict:
        return {
            **self.identity,
            "version": VERSION,
            "prompt_name": name,
            "sentences": [list(s) for s in sentences],
        }

    def path(self, key: dict) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
        return self.folder / "text" / f"{digest}.pt"

    def get(self, name: str, sentences) -> torch.Tensor | None:
        key = self.key(name, sentences)
        path = self.path(key)
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            features = entry["features"]
            if entry["key"] == json.dumps(key, sort_keys=True) and entry["sha256"] == tensor_digest(features):
                return features
        except Exception:  # noqa: BLE001 - absent, damaged or foreign: encode again
            pass
        return None

    def put(self, name: str, sentences, features: torch.Tensor) -> None:
        key = self.key(name, sentences)
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        cpu = features.detach().cpu().clone()
        entry = {"key": json.dumps(key, sort_keys=True), "features": cpu, "sha256": tensor_digest(cpu)}
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        torch.save(entry, tmp)
        os.replace(tmp, path)


def text_cache(
    model: ModelConfig, precision: Precision, device: torch.device, folder: str | Path | None
) -> TextCache | None:
    """The cache of runs with this model, precision and device (None: no cache). Random weights
    (`pretrain none`) are keyed by their configuration: they are drawn from a fixed seed."""
    if folder is None:
        return None
    folder = Path(folder)
    weights = "random-init" if model.clip_file is None else file_digest(model.clip_file, folder)
    identity = {
        "weights_sha256": weights,
        "model_name": model.model_name,
        "img_size": model.img_size,  # random weights: the vision tower's draws come before the text tower's
        "quick_gelu": model.quick_gelu,
        "text_path": "fused" if model.fast or precision.fused_attention else "explicit",
        "autocast": str(precision.autocast_dtype),  # 'auto' on the CPU is fp32: the same entries
        "device_type": device.type,
        # the kernels decide the last bits: the GPU model; the CPU's vector instructions and thread count
        "device_kind": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
    }
    return TextCache(folder, identity)


def text_features(
    model: CLIP_Inplanted,
    model_config: ModelConfig,
    precision: Precision,
    prompts: Iterable[str],
    cache_dir: Path | None,
) -> dict[str, torch.Tensor]:
    """{prompt name: [E, 2]} for the CLIP in `model` (which `model_config` built): read from the text cache
    in `cache_dir` where kept there with the same weights and settings, else encoded and kept (None: no
    cache)."""
    device = next(model.parameters()).device
    store = text_cache(model_config, precision, device, cache_dir)
    return text_features_for(model.clipmodel, list(prompts), device, precision, store)


def adapted_model(
    model_config: ModelConfig,
    precision: Precision,
    device: torch.device,
    prompts: Iterable[str],
    cache_dir: Path | None,
) -> tuple[CLIP_Inplanted, dict[str, torch.Tensor]]:
    """The adapted CLIP that `model_config` describes, on `device` with fresh adapters, and the text features
    of `prompts` for it (text_features())."""
    model = model_config.build(device, precision)
    return model, text_features(model, model_config, precision, prompts, cache_dir)
