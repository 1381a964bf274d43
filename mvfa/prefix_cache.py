"""The frozen prefix of the image tower computed once per input: the patch embedding and the blocks up to the
first adapted one have fixed weights, so the same batch of images always gives the same tokens there.

An entry is keyed by the batch's bytes, shape, dtype and device and by the autocast setting it ran under: a
hit is the tensor that computation gave, bit for bit, because it was that computation, on the same batch.
Entries stay in host memory up to a limit and beyond it go to files in a folder of their own (removed when the
run ends), always in the dtype they were computed in.
"""

import hashlib
import shutil
import tempfile
import weakref
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch

GIB = 1 << 30


class PrefixCache:
    """`tokens(images, compute)`: compute(images)'s output, computed once per distinct input.

    `ram_gib`: what entries may take in memory; `folder`: where the entries beyond it are written (a
    subfolder of its own is made there and removed with the cache)."""

    def __init__(self, ram_gib: float, folder: str | Path):
        self.ram_limit = int(ram_gib * GIB)
        self.folder = Path(folder)
        self.in_ram: dict[str, torch.Tensor] = {}
        self.on_disk: dict[str, Path] = {}
        self.ram_used = 0
        self.hits = self.misses = 0
        self._spill_dir: Path | None = None

    def key(self, images: torch.Tensor) -> str:
        device = images.device.type
        autocast = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        data = images.detach().contiguous().cpu()
        digest = hashlib.blake2b(data.view(torch.uint8).numpy(), digest_size=20)  # the bytes in place
        digest.update(f"{tuple(data.shape)} {data.dtype} {images.device} {autocast}".encode())
        return digest.hexdigest()

    def tokens(self, images: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        key = self.key(images)
        if key in self.in_ram:
            self.hits += 1
            # a copy: the kept tensor stays as computed whatever the caller does with it
            return self.in_ram[key].to(images.device, copy=True)
        if key in self.on_disk:
            self.hits += 1
            return torch.load(self.on_disk[key], map_location=images.device, weights_only=True)
        self.misses += 1
        with torch.no_grad():  # frozen weights, fixed input: nothing here has a gradient
            tokens = compute(images)
        self.keep(key, tokens)
        return tokens

    def keep(self, key: str, tokens: torch.Tensor) -> None:
        size = tokens.numel() * tokens.element_size()
        if self.ram_used + size <= self.ram_limit:
            self.in_ram[key] = tokens.cpu()  # host memory, whatever the device
            self.ram_used += size
            return
        path = self.spill_dir() / f"{key}.pt"
        torch.save(tokens.cpu(), path)
        self.on_disk[key] = path

    def spill_dir(self) -> Path:
        if self._spill_dir is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._spill_dir = Path(tempfile.mkdtemp(prefix="prefix-", dir=self.folder))
            weakref.finalize(self, shutil.rmtree, self._spill_dir, ignore_errors=True)
        return self._spill_dir


@contextmanager
def serving(model, cache: PrefixCache | None):
    """Inside the block the model's forwards take their prefix tokens from `cache` (None: computed as
    usual)."""
    before = model.prefix_cache
    model.prefix_cache = cache
    try:
        yield cache
    finally:
        model.prefix_cache = before


def prefix_cache(ram_gib: float, folder: Path | None) -> PrefixCache | None:
    """The cache of a training run; None (every prefix recomputed) when folder is None (--no_prefix_cache)."""
    return None if folder is None else PrefixCache(ram_gib, folder / "prefix")
