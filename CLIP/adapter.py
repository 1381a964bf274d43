"""The MVFA adapter model: residual bottleneck adapters after chosen ViT blocks."""

import zipfile
from pathlib import Path

import torch
from torch import nn

from utils import BadValue, MissingFile

from .loading import check_keys
from .model import CLIP


class ClipAdapter(nn.Module):
    """Bias-free bottleneck c_in -> bottleneck -> c_in with a LeakyReLU(0.01) after both layers."""

    def __init__(self, c_in: int, bottleneck: int = 768):
        super().__init__()
        self.fc1 = nn.Sequential(nn.Linear(c_in, bottleneck, bias=False), nn.LeakyReLU())
        self.fc2 = nn.Sequential(nn.Linear(bottleneck, c_in, bias=False), nn.LeakyReLU())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        med = self.fc1(x)
        return med, self.fc2(med)


class CLIP_Inplanted(nn.Module):
    """A frozen CLIP image tower with a seg and a det adapter after each block in `features` (1-based
    numbers).

    Attribute names are the released checkpoints' format: `seg_adapters.{k}.fc1.0.weight`, ... .
    """

    def __init__(self, clip_model: CLIP, features=(6, 12, 18, 24), bottleneck: int | None = None):
        super().__init__()
        self.clipmodel = clip_model
        self.image_encoder = clip_model.visual
        depth = len(self.image_encoder.transformer.resblocks)
        if not features or any(not 1 <= f <= depth for f in features) or len(set(features)) < len(features):
            raise BadValue(
                f"feature blocks {list(features)}: distinct block numbers in 1..{depth} expected",
                flag="features_list",
            )
        self.features = list(features)
        width = self.image_encoder.conv1.out_channels
        # tokens are compared with text features, so the bottleneck is CLIP's embedding width
        # (768 for ViT-L/14)
        bottleneck = bottleneck or clip_model.text_projection.shape[1]
        self.seg_adapters = nn.ModuleList([ClipAdapter(width, bottleneck) for _ in self.features])
        self.det_adapters = nn.ModuleList([ClipAdapter(width, bottleneck) for _ in self.features])
        self.prefix_cache = None  # a mvfa.prefix_cache.PrefixCache while one serves the forwards

    def frozen_prefix(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> the tokens after the first adapted block, before its adapters: [B, 1+HW, C].
        Only frozen weights take part, so the same images always give the same tokens."""
        v = self.image_encoder
        x = v.embed(images)  # [B, 1+HW, C]
        for block in v.transformer.resblocks[: min(self.features)]:
            x = block(x)
        return x

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """images [B, 3, H, W] -> pooled [B, E], seg and det tokens: one [B, 1+HW, bottleneck] per
        adapted block.

        Token 0 is the CLS token; both adapters see it, as in the reference. With a `prefix_cache` (see
        mvfa/prefix_cache.py) the frozen prefix's tokens come from it.
        """
        v = self.image_encoder
        first = min(self.features)
        if self.prefix_cache is None:
            x = self.frozen_prefix(images)
        else:
            x = self.prefix_cache.tokens(images, self.frozen_prefix)
        seg_tokens, det_tokens = [], []
        for number, block in enumerate(v.transformer.resblocks, start=1):
            if number > first:
                x = block(x)
            if number in self.features:
                k = self.features.index(number)
                seg_med, seg_out = self.seg_adapters[k](x)
                det_med, det_out = self.det_adapters[k](x)
                x = 0.8 * x + 0.1 * seg_out + 0.1 * det_out
                seg_tokens.append(seg_med)
                det_tokens.append(det_med)
        return v.pool(x), seg_tokens, det_tokens

    def adapter_state(self) -> dict:
        """The released checkpoint layout."""
        return {
            "seg_adapters": self.seg_adapters.state_dict(),
            "det_adapters": self.det_adapters.state_dict(),
        }

    def load_adapters(self, path: str | Path) -> dict:
        """Load `{'seg_adapters': ..., 'det_adapters': ...}` strictly (extra top-level keys are ignored).

        Returns the whole checkpoint dict so callers can read the extras (arguments, versions).
        """
        path = Path(path)
        if not path.is_file():
            raise MissingFile(
                f"adapter checkpoint not found: {path} (download the released MVFA checkpoints "
                f"with `python -m tools.download checkpoints`, or train one with train_few.py / "
                f"train_zero.py)"
            )
        if is_training_state(path):
            checkpoint = path.with_name(path.name.removesuffix(".state"))
            raise BadValue(
                f"{path} is a training state (what a stopped training resumes from), not an adapter "
                f"checkpoint: pass the checkpoint its run saves beside it, such as {checkpoint}"
            )
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            # some errors (EOFError of an empty file) have no text
            first_line = (str(e).splitlines() or [""])[0][:200]
            raise BadValue(
                f"cannot read adapter checkpoint {path}: {type(e).__name__}: {first_line}"
            ) from None
        for name in ("seg_adapters", "det_adapters"):
            if not isinstance(ckpt, dict) or name not in ckpt:
                raise BadValue(f"{path} is not an MVFA adapter checkpoint: no '{name}' entry")
            modules = getattr(self, name)
            check_keys(
                {f"{name}.{k}": v for k, v in modules.state_dict().items()},
                {f"{name}.{k}": v for k, v in ckpt[name].items()},
                str(path),
                "was it trained with another features_list?",
            )
            modules.load_state_dict(ckpt[name], strict=True)
        return ckpt


def is_training_state(path: Path) -> bool:
    """Whether `path` is a training state that train_*.py writes beside its checkpoint, told without
    unpickling it: its pickle, inside torch.save's zip archive, opens with the state's tag."""
    try:
        with zipfile.ZipFile(path) as archive:
            pickled = next((n for n in archive.namelist() if n.endswith("/data.pkl")), None)
            if pickled is None:
                return False
            with archive.open(pickled) as f:
                return b"mvfa_training_state" in f.read(200)
    except (zipfile.BadZipFile, OSError):
        return False
