"""Independent oracles for our CLIP: open_clip's CLIP and Hugging Face's CLIPModel, given the same random
weights (open_clip directly; transformers through its own files, read by our create_model)."""

import json
from pathlib import Path

import pytest
import torch

from CLIP import create_model, tokenize
from CLIP.model import CLIP, init_parameters

TOL = 1e-4
# OpenAI ships TorchScript archives; torch 2.14 flags torch.jit as deprecated on every save/load.
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:FutureWarning")
TEXTS = ["a photo of a brain.", "a bad photo of a damaged chest x-ray film.", "x", "histopathological image"]
TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 56, "layers": 4, "width": 64, "patch_size": 14, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}
FULL_CONFIG = Path(__file__).resolve().parents[1] / "CLIP" / "model_configs" / "ViT-L-14-336.json"


def images(n: int, size: int = 56) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def perturb_(model: torch.nn.Module, seed: int) -> None:
    """Add noise to every parameter so that no LayerNorm or bias keeps its trivial initial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def shapes(model: torch.nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# -------------------------------------------------------------------------------------------------- open_clip


def open_clip_model(cfg: dict, quick_gelu: bool):
    model = pytest.importorskip("open_clip").model
    vision = model.CLIPVisionCfg(**cfg["vision_cfg"])
    return model.CLIP(cfg["embed_dim"], vision, model.CLIPTextCfg(**cfg["text_cfg"]), quick_gelu=quick_gelu)


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_open_clip_same_outputs_from_our_weights(quick_gelu):
    ours = init_parameters(CLIP(**TINY, quick_gelu=quick_gelu), torch.Generator().manual_seed(0))
    perturb_(ours, 1)
    theirs = open_clip_model(TINY, quick_gelu)
    # OpenAI's key names in both; their causal mask is a non-persistent buffer
    assert shapes(theirs) == shapes(ours)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    ours.eval(), theirs.eval()
    ids = tokenize(TEXTS)
    with torch.no_grad():
        image_ours, image_theirs = ours.encode_image(images(3)), theirs.encode_image(images(3))
        text_ours, text_theirs = ours.encode_text(ids), theirs.encode_text(ids.long())
    assert image_ours.shape == (3, 32) and text_ours.shape == (4, 32)
    torch.testing.assert_close(image_ours, image_theirs, atol=TOL, rtol=0)
    torch.testing.assert_close(text_ours, text_theirs, atol=TOL, rtol=0)


@pytest.mark.parametrize("img_size", [336, 240])
def test_open_clip_full_size_architecture(img_size):
    """ViT-L-14-336 from our JSON and from open_clip's own config: same keys and shapes
    (meta device, no memory)."""
    open_clip = pytest.importorskip("open_clip")
    ours_cfg, their_cfg = json.loads(FULL_CONFIG.read_text()), open_clip.get_model_config("ViT-L-14-336")
    ours_cfg["vision_cfg"]["image_size"] = their_cfg["vision_cfg"]["image_size"] = img_size
    with torch.device("meta"):
        ours, theirs = CLIP(**ours_cfg), open_clip.model.CLIP(**their_cfg)
    assert shapes(ours) == shapes(theirs)
    # vision, text: the tensors of OpenAI's ViT-L/14 checkpoint (12 per block)
    assert len(shapes(ours)) == (8 + 24 * 12) + (6 + 12 * 12)
    grid = img_size // 14
    assert shapes(ours)["visual.positional_embedding"] == (grid * grid + 1, 1024)
    assert (
        ours.visual.transformer.resblocks[0].attn.heads == 16
        and ours.transformer.resblocks[0].attn.heads == 12
    )


# ----------------------------------------------------------------------------------------------- transformers


@pytest.fixture(scope="module")
def hf_model():
    transformers = pytest.importorskip("transformers")
    # head width 64, MLP ratio 4: what our create_model infers from the files' shapes (as openai/CLIP does)
    config = transformers.CLIPConfig(
        text_config={
            "vocab_size": 49408,
            "hidden_size": 128,
            "intermediate_size": 512,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "hidden_act": "quick_gelu",
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "pad_token_id": 0,
        },
        vision_config={
            "hidden_size": 128,
            "intermediate_size": 512,
            "num_hidden_layers": 3,
            "num_attention_heads": 2,
            "image_size": 56,
            "patch_size": 14,
            "hidden_act": "quick_gelu",
        },
        projection_dim=32,
    )
    torch.manual_seed(0)  # transformers initialises from the global generator
    model = transformers.CLIPModel(config)
    perturb_(model, 2)
    return model.eval()


def features(output) -> torch.Tensor:
    """get_*_features returns a tensor in transformers 4 and a model output (pooler_output) in 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_transformers_files_read_by_create_model(hf_model, tmp_path, kind):
    if kind == "safetensors":
        hf_model.save_pretrained(tmp_path)
        path = tmp_path / "model.safetensors"
    else:
        path = tmp_path / "pytorch_model.bin"
        torch.save(hf_model.state_dict(), path)
    ours = create_model(
        model_name="tiny-hf", img_size=56, pretrained="openai", checkpoint=path, quick_gelu=True
    )
    assert len(ours.visual.transformer.resblocks) == 3 and len(ours.transformer.resblocks) == 2
    ids = tokenize(TEXTS)  # SOT ... EOT then zeros
    mask = (torch.arange(77) <= ids.argmax(dim=-1, keepdim=True)).long()  # ones up to the EOT
    x = images(3)
    with torch.no_grad():
        image_theirs = features(hf_model.get_image_features(pixel_values=x))
        text_theirs = features(hf_model.get_text_features(input_ids=ids.long(), attention_mask=mask))
        image_ours, text_ours = ours.encode_image(x), ours.encode_text(ids)
    assert image_theirs.shape == (3, 32) and text_theirs.shape == (4, 32)
    torch.testing.assert_close(image_ours, image_theirs, atol=TOL, rtol=0)
    torch.testing.assert_close(text_ours, text_theirs, atol=TOL, rtol=0)
    assert ours.logit_scale.item() == hf_model.logit_scale.item()
