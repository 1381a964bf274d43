"""Image and mask loading as the reference: PIL resize (bicubic / nearest), ToTensor semantics, no normalisation."""
import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _open(path: str, mode: str) -> Image.Image:
    """PIL image of `path` converted to `mode`; unreadable files raise an error naming the file."""
    try:
        with Image.open(path) as img:
            return img.convert(mode)
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {path}") from None
    except (OSError, SyntaxError, ValueError) as err:  # UnidentifiedImageError is an OSError; truncated data too
        raise ValueError(f"cannot read image {path}: {err} (corrupt or not an image; replace or remove it)") from None


def _to_tensor(img: Image.Image) -> torch.Tensor:
    """torchvision ToTensor for 8-bit modes: uint8 HWC -> float32 CHW, divided by 255."""
    arr = np.array(img, dtype=np.uint8, copy=True)  # [H, W] or [H, W, C]
    if arr.ndim == 2:
        arr = arr[:, :, None]  # [H, W, 1]
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous().to(torch.float32).div(255)  # [C, H, W]


def load_image(path: str, img_size: int = 240, normalize: bool = False) -> torch.Tensor:
    """[3, img_size, img_size] float32 in [0, 1]; with `normalize`, CLIP's mean/std are applied."""
    img = _open(path, 'RGB').resize((img_size, img_size), Image.Resampling.BICUBIC)
    x = _to_tensor(img)
    if normalize:  # FIX option --clip_normalize; the reference feeds [0, 1] images (Q2)
        x = (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    return x


def load_mask(path: str, img_size: int = 240) -> torch.Tensor:
    """[1, img_size, img_size] float32 with values k/255 (grey level k), nearest-neighbour resized."""
    return _to_tensor(_open(path, 'L').resize((img_size, img_size), Image.Resampling.NEAREST))
