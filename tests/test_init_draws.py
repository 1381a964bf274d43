"""The reference's random draws before and during training, replayed without the objects that draw them.

The oracle builds what the reference builds, with torch's own modules in the reference's construction order (a
throw-away CLIP, then the one it runs); the replay must leave the global generator in the same state.
"""

from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from CLIP import create_model
from CLIP.init_draws import advance, reference_init_draws
from CLIP.loading import load_config
from mvfa.seeding import draw_as_loader


class Block(nn.Module):
    """open_clip's residual block as the reference constructs it: ln_1, nn.MultiheadAttention, ln_2, mlp."""

    def __init__(self, width: int):
        super().__init__()
        self.ln_1, self.attn, self.ln_2 = (
            nn.LayerNorm(width),
            nn.MultiheadAttention(width, width // 64),
            nn.LayerNorm(width),
        )
        self.mlp = nn.Sequential(
            OrderedDict(c_fc=nn.Linear(width, 4 * width), gelu=nn.GELU(), c_proj=nn.Linear(4 * width, width))
        )


def build_like_reference(config: dict) -> None:
    """Vision tower (conv1, class and positional embeddings, blocks, proj),
    then the text tower and its init."""
    v, t, embed = config["vision_cfg"], config["text_cfg"], config["embed_dim"]
    width, grid = v["width"], v["image_size"] // v["patch_size"]
    nn.Conv2d(3, width, v["patch_size"], v["patch_size"], bias=False)
    scale = width**-0.5
    scale * torch.randn(width), scale * torch.randn(grid * grid + 1, width)
    [Block(width) for _ in range(v["layers"])]
    scale * torch.randn(width, embed)
    text_width = t["width"]
    token_embedding = nn.Embedding(t["vocab_size"], text_width)
    blocks = [Block(text_width) for _ in range(t["layers"])]
    positional, projection = torch.empty(t["context_length"], text_width), torch.empty(text_width, embed)
    nn.init.normal_(token_embedding.weight, std=0.02)
    nn.init.normal_(positional, std=0.01)
    for block in blocks:
        for weight in (
            block.attn.in_proj_weight,
            block.attn.out_proj.weight,
            block.mlp.c_fc.weight,
            block.mlp.c_proj.weight,
        ):
            nn.init.normal_(weight, std=0.02)
    nn.init.normal_(projection, std=text_width**-0.5)


@pytest.mark.parametrize("image_size", [240, 336])
def test_replayed_draws_equal_building_the_modules(image_size):
    config = load_config("demo-tiny")
    config["vision_cfg"]["image_size"] = image_size
    torch.manual_seed(111)
    build_like_reference(config)
    expected = torch.get_rng_state()
    torch.manual_seed(111)
    advance(reference_init_draws(config))
    assert torch.equal(torch.get_rng_state(), expected)


def test_create_model_draws_the_reference_two_constructions():
    """create_model('demo-tiny', 224): the throw-away model at the config's 240, then the model at 224."""
    config = load_config("demo-tiny")
    torch.manual_seed(111)
    build_like_reference(config)
    build_like_reference({**config, "vision_cfg": {**config["vision_cfg"], "image_size": 224}})
    expected = torch.get_rng_state()
    torch.manual_seed(111)
    create_model("demo-tiny", 224, "none")
    assert torch.equal(torch.get_rng_state(), expected)


@pytest.mark.parametrize("shuffle", [False, True])
def test_loader_draws(shuffle):
    """What the first batch of a (shuffling) DataLoader draws from the global generator."""
    torch.manual_seed(5)
    next(iter(DataLoader(TensorDataset(torch.zeros(4)), batch_size=1, shuffle=shuffle)))
    expected = torch.get_rng_state()
    torch.manual_seed(5)
    draw_as_loader(shuffle)
    assert torch.equal(torch.get_rng_state(), expected)


def test_fused_path_matches_the_reference_path():
    """--fast: fused attention and text over each row's own length, the same outputs within float rounding."""
    torch.manual_seed(0)
    model = create_model("demo-tiny", 56, "none")
    images, ids = (
        torch.rand(2, 3, 56, 56),
        torch.tensor([[49406, 320, 1125, 49407] + [0] * 73, [49406, 320, 49407] + [0] * 74]),
    )
    with torch.no_grad():
        exact = model.encode_image(images), model.encode_text(ids)
        fused = model.set_fused(fused=True).encode_image(images), model.encode_text(ids)
    for a, b in zip(exact, fused):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
