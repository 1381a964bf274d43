"""Image and mask loading as the reference (PIL resize, bicubic / nearest, ToTensor semantics, no
normalisation), and reading one's own images of any depth (8-bit, 16-bit, float) for predict.py."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from utils import BadValue, MissingFile

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # PIL opens 16-bit grey PNG/TIFF as I;16* (older: I)


def _open(path: str, mode: str | None) -> Image.Image | tuple[np.ndarray, bool]:
    """The image of `path` converted to `mode`; mode None: (pixels [H, W, C] float32 in [0, 1], C = 1 or 3;
    True if 8-bit) at any depth. Unreadable files raise an error naming the file."""
    try:
        with Image.open(path) as img:
            if mode is not None:
                return img.convert(mode)
            if img.mode not in (*SIXTEEN_BIT, "F"):  # L, P, RGB, RGBA, 1, CMYK, ...
                return np.asarray(img.convert("RGB"), dtype=np.float32) / 255, True
            # I;16B: astype byte-swaps
            sixteen, a = img.mode in SIXTEEN_BIT, np.asarray(img).astype(np.float64)
    except FileNotFoundError:
        raise MissingFile(f"image file not found: {path}") from None
    # UnidentifiedImageError is an OSError; truncated data too
    except (OSError, SyntaxError, ValueError) as err:
        raise BadValue(
            f"cannot read image {path}: {err} (corrupt or not an image; replace or remove it)"
        ) from None
    if not np.isfinite(a).all():  # only float images can hold them; refused here, where the file is known
        bad = int(np.count_nonzero(~np.isfinite(a)))
        raise BadValue(
            f"image {path}: {bad} NaN or infinite pixel value(s); replace them with finite values in [0, 1] "
            f"or remove the image"
        )
    if sixteen and (a.min() < 0 or a.max() > 65535):
        raise BadValue(f"image {path}: 32-bit integer values outside 0..65535; save it as 8- or 16-bit")
    if not sixteen and (a.min() < 0 or a.max() > 1):
        raise BadValue(
            f"image {path}: float values in [{a.min():g}, {a.max():g}], [0, 1] expected; "
            f"rescale it or save it as 8- or 16-bit"
        )
    return (a / 65535 if sixteen else a).astype(np.float32)[..., None], False


def _to_tensor(img: Image.Image) -> torch.Tensor:
    """torchvision ToTensor for 8-bit modes: uint8 HWC -> float32 CHW, divided by 255."""
    arr = np.atleast_3d(np.array(img, dtype=np.uint8, copy=True))  # [H, W] -> [H, W, 1]; [H, W, C] as is
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous().to(torch.float32).div(255)  # [C, H, W]


def clip_normalize(x: torch.Tensor) -> torch.Tensor:
    """CLIP's mean/std on [3, H, W], only with --clip_normalize: the reference sets CLIP's mean/std but feeds
    [0, 1] images, which the default keeps for its numbers."""
    return (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


def load_image(path: str, img_size: int = 240, normalize: bool = False) -> torch.Tensor:
    """[3, img_size, img_size] float32 in [0, 1]; with `normalize`, CLIP's mean/std are applied."""
    x = _to_tensor(_open(path, "RGB").resize((img_size, img_size), Image.Resampling.BICUBIC))
    return clip_normalize(x) if normalize else x


def load_mask(path: str, img_size: int = 240) -> torch.Tensor:
    """[1, img_size, img_size] float32 with values k/255 (grey level k), nearest-neighbour resized."""
    return _to_tensor(_open(path, "L").resize((img_size, img_size), Image.Resampling.NEAREST))


def read_image(path: str | Path) -> np.ndarray:
    """[H, W, 3] float32 in [0, 1] at the file's own size: 8-bit / 255, 16-bit grey levels / 65535, float
    as is."""
    a, _ = _open(str(path), None)
    return np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a


def load_input(path: str | Path, img_size: int, normalize: bool = False) -> torch.Tensor:
    """[3, img_size, img_size] float32 in [0, 1] from a file of any depth: 8-bit exactly as `load_image`,
    deeper ones resized in floating point (bicubic, clipped to [0, 1] as the 8-bit path clips); `normalize`
    as `load_image`."""
    a, eight_bit = _open(str(path), None)  # deeper than 8 bits: grey levels [H, W, 1]
    if eight_bit:
        return load_image(str(path), img_size, normalize)
    plane = Image.fromarray(a[..., 0]).resize((img_size, img_size), Image.Resampling.BICUBIC)  # mode 'F'
    x = torch.from_numpy(np.clip(np.asarray(plane), 0, 1)).expand(3, -1, -1).contiguous()  # [3, S, S]
    return clip_normalize(x) if normalize else x
