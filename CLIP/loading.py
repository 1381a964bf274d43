"""Reading CLIP weights into our model: one short pipeline of named steps, and `create_model`.

Accepted files: OpenAI's TorchScript archives, plain OpenAI state dicts, OpenCLIP checkpoints (`state_dict`
wrapper, `module.` prefix) and the Hugging Face `transformers` layout (`.bin` or `.safetensors`). Nothing is
ever downloaded.
"""

import json
import re
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from utils import BadValue, MissingFile

from .init_draws import advance, reference_init_draws
from .model import CLIP, init_parameters

CLIP_DIR = Path(__file__).resolve().parent
CKPT_DIR = CLIP_DIR / "ckpt"
OPENAI_URLS = {
    "ViT-L-14-336": "https://openaipublic.azureedge.net/clip/models/"
    "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt",
}
OPENAI_FILES = {"ViT-L-14-336": "ViT-L-14-336px.pt"}
METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")


def default_checkpoint(model_name: str) -> Path:
    return CKPT_DIR / OPENAI_FILES.get(model_name, f"{model_name}.pt")


def read_state_dict(path: str | Path, model_name: str = "ViT-L-14-336") -> dict:
    """Whatever the file holds, as a plain dict of tensors (still in its own key layout)."""
    path = Path(path)
    if not path.is_file():
        url = OPENAI_URLS.get(model_name, "the OpenAI CLIP release")
        raise MissingFile(
            f"CLIP weights not found at {path}: download {url} and put it there, or run "
            f"`python -m tools.download clip`, or give the path of a copy you have",
            flag="clip_ckpt",
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        try:  # OpenAI's release is a TorchScript archive
            # only torch.jit's own deprecation notice, which users cannot act on
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r".*torch\.jit", category=FutureWarning)
                return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
        except RuntimeError:
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same clear message
        # some errors (EOFError of an empty file) have no text
        first_line = (str(e).splitlines() or [""])[0][:200]
        raise BadValue(
            f"cannot read CLIP weights {path}: {type(e).__name__}: {first_line} "
            f"(is it a complete, uncorrupted download?)"
        ) from None


def unwrap(sd: dict) -> dict:
    """OpenCLIP/training checkpoints: `{'state_dict': {...}}` and a `module.` prefix from DataParallel."""
    if isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


_HF_RENAMES = [
    (r"^text_model\.embeddings\.token_embedding\.", "token_embedding."),
    (r"^text_model\.embeddings\.position_embedding\.weight$", "positional_embedding"),
    (r"^text_model\.encoder\.layers\.", "transformer.resblocks."),
    (r"^text_model\.final_layer_norm\.", "ln_final."),
    (r"^vision_model\.embeddings\.class_embedding$", "visual.class_embedding"),
    (r"^vision_model\.embeddings\.patch_embedding\.", "visual.conv1."),
    (r"^vision_model\.embeddings\.position_embedding\.weight$", "visual.positional_embedding"),
    (r"^vision_model\.pre_layrnorm\.", "visual.ln_pre."),
    (r"^vision_model\.encoder\.layers\.", "visual.transformer.resblocks."),
    (r"^vision_model\.post_layernorm\.", "visual.ln_post."),
    (r"\.self_attn\.out_proj\.", ".attn.out_proj."),
    (r"\.layer_norm1\.", ".ln_1."),
    (r"\.layer_norm2\.", ".ln_2."),
    (r"\.mlp\.fc1\.", ".mlp.c_fc."),
    (r"\.mlp\.fc2\.", ".mlp.c_proj."),
]


def from_huggingface(sd: dict) -> dict:
    """The `transformers` CLIPModel layout (separate q/k/v, Linear projections) -> OpenAI's names."""
    if not any(k.startswith(("vision_model.", "text_model.")) for k in sd):
        return sd
    out = {}
    for key, value in sd.items():
        if key.endswith("position_ids"):
            continue
        if key in ("visual_projection.weight", "text_projection.weight"):  # Linear [E, W] -> matrix [W, E]
            out["visual.proj" if key.startswith("visual") else "text_projection"] = value.t()
            continue
        m = re.search(r"\.self_attn\.([qkv])_proj\.(weight|bias)$", key)
        if m:
            if m.group(1) != "q":
                continue  # packed together with q below
            stem, kind = key[: m.start()], m.group(2)
            packed = torch.cat([sd[f"{stem}.self_attn.{n}_proj.{kind}"] for n in "qkv"])
            key, value = f"{stem}.attn.in_proj_{kind}", packed
        for pattern, repl in _HF_RENAMES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def drop_metadata(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if k not in METADATA_KEYS}


def to_float32(sd: dict) -> dict:
    """OpenAI stores fp16; the reference runs the exact fp32 up-cast."""
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def resize_pos_embed(sd: dict, grid: int, device: str | torch.device = "cpu") -> dict:
    """Bicubic (antialiased, align_corners False) resize of the patch rows of `visual.positional_embedding`.

    The CLS row is kept; unchanged when the size already matches. Run on `device` as the reference does, since
    CPU and CUDA kernels can differ in the last bit.
    """
    pos = sd["visual.positional_embedding"]  # [1+g*g, C]
    if pos.shape[0] == grid * grid + 1:
        return sd
    old = round((pos.shape[0] - 1) ** 0.5)
    patches = pos[1:].reshape(1, old, old, -1).permute(0, 3, 1, 2).to(device)  # [1, C, old, old]
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(grid * grid, -1).cpu()  # [g*g, C], row-major
    return {**sd, "visual.positional_embedding": torch.cat([pos[:1], patches])}


def config_from_state_dict(sd: dict) -> dict:
    """The architecture, read off the tensor shapes (as openai/CLIP does)."""
    width = sd["visual.conv1.weight"].shape[0]
    patch = sd["visual.conv1.weight"].shape[-1]
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    text_width = sd["ln_final.weight"].shape[0]
    if width % 64 or text_width % 64:
        raise BadValue(
            f"widths {width}/{text_width} are not multiples of 64: the head count cannot be read off the "
            f"shapes; add a CLIP/model_configs/<model_name>.json"
        )

    def count(prefix: str) -> int:  # the number of distinct block indices under `prefix`
        return len({k[len(prefix) :].split(".")[0] for k in sd if k.startswith(prefix)})

    return {
        "embed_dim": sd["text_projection"].shape[1],
        "vision_cfg": {
            "image_size": grid * patch,
            "layers": count("visual.transformer.resblocks."),
            "width": width,
            "patch_size": patch,
        },
        "text_cfg": {
            "context_length": sd["positional_embedding"].shape[0],
            "vocab_size": sd["token_embedding.weight"].shape[0],
            "width": text_width,
            "heads": text_width // 64,
            "layers": count("transformer.resblocks."),
        },
    }


def load_config(model_name: str) -> dict | None:
    path = CLIP_DIR / "model_configs" / f"{model_name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def check_keys(expected: dict, sd: dict, source: str, hint: str, flag: str | None = None) -> None:
    """Raise a one-line BadValue naming the first key that is missing, unexpected or of another shape; `flag`:
    the setting the hint points to, which the command line names."""
    for key, value in expected.items():
        if key not in sd:
            raise BadValue(f"{source}: missing key '{key}' ({hint})", flag=flag)
        if sd[key].shape != value.shape:
            raise BadValue(
                f"{source}: '{key}' has shape {tuple(sd[key].shape)}, the model expects "
                f"{tuple(value.shape)} ({hint})",
                flag=flag,
            )
    extra = [k for k in sd if k not in expected]
    if extra:
        raise BadValue(f"{source}: unexpected key '{extra[0]}' ({hint})", flag=flag)


def load_strict(model: torch.nn.Module, sd: dict, source: str) -> None:
    check_keys(
        model.state_dict(),
        sd,
        source,
        "not weights of this architecture: check the model name",
        flag="model_name",
    )
    model.load_state_dict(sd, strict=True)


def create_model(
    model_name: str = "ViT-L-14-336",
    img_size: int = 240,
    pretrained: str = "openai",
    device: str | torch.device = "cpu",
    checkpoint: str | Path | None = None,
    quick_gelu: bool = False,
    fused: bool = False,
) -> CLIP:
    """The reference's call: the CLIP of `model_name` at `img_size`, with OpenAI's weights, in eval mode.

    `pretrained='openai'` reads `checkpoint` (default `CLIP/ckpt/<OpenAI file name>`); `pretrained='none'`
    builds random weights (tests, demo). The architecture comes from `CLIP/model_configs/<model_name>.json`
    when it exists, else from the checkpoint's shapes. Exact GELU by default, as the reference runs it;
    `quick_gelu=True` uses the activation the weights were trained with. `fused=True`: fused attention (see
    `CLIP.set_fused`).
    """
    if pretrained not in ("openai", "none"):
        raise BadValue(
            f"pretrained weights {pretrained!r} are not supported: use 'openai' (OpenAI's weights file) or "
            f"'none' (random weights)",
            flag="pretrain",
        )
    sd = None
    if pretrained == "openai":
        path = Path(checkpoint) if checkpoint else default_checkpoint(model_name)
        sd = to_float32(drop_metadata(from_huggingface(unwrap(read_state_dict(path, model_name)))))
    config = load_config(model_name)
    if config is None and sd is not None:
        try:
            config = config_from_state_dict(sd)
        except KeyError as e:
            raise BadValue(f"{path}: no {e} tensor - not CLIP weights") from None
    if config is None:
        raise BadValue(
            f"unknown model {model_name!r}: no CLIP/model_configs/{model_name}.json and no weights",
            flag="model_name",
        )
    # The reference builds a throw-away CLIP at the checkpoint's resolution, then its own at img_size, both
    # with torch's default initialisation, before it builds the adapters: draw what they draw, so that the
    # adapters built next start from the reference's values; our model is built on the meta device and draws
    # nothing.
    patch = config["vision_cfg"]["patch_size"]
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5) if sd else None
    throwaway = (
        {**config, "vision_cfg": {**config["vision_cfg"], "image_size": grid * patch}} if grid else config
    )
    config = {**config, "vision_cfg": {**config["vision_cfg"], "image_size": img_size}}
    advance(reference_init_draws(throwaway) + reference_init_draws(config))
    with torch.device("meta"):
        model = CLIP(**config, quick_gelu=quick_gelu)
    model.to_empty(device=device)
    if sd is None:
        init_parameters(model, torch.Generator().manual_seed(0))
    else:
        load_strict(model, resize_pos_embed(sd, img_size // patch, device), str(path))
    return model.set_fused(fused).eval()
