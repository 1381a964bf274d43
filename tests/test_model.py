"""CLIP/model.py, CLIP/loading.py and CLIP/adapter.py on tiny random models: weight files in their real
formats, every bad input of weight loading, the positional-embedding resize, the adapted forward and
adapter checkpoints."""

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from CLIP import loading
from CLIP.adapter import CLIP_Inplanted
from CLIP.loading import create_model, read_state_dict, resize_pos_embed
from CLIP.model import CLIP, QuickGELU, init_parameters

SOT, EOT = 49406, 49407
# OpenAI ships TorchScript archives; torch 2.14 flags torch.jit as deprecated on every save/load.
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:FutureWarning")
# Files: an architecture read off a state dict's shapes assumes OpenAI's head width 64 (as openai/CLIP does).
# Different depths per tower so that a mix-up of the two block counts shows.
FILE_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 56, "layers": 3, "width": 128, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2},
}
# In-memory models: narrow heads, several per tower.
SMALL_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 56, "layers": 4, "width": 64, "patch_size": 14, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}


def build(cfg: dict, seed: int = 0, quick_gelu: bool = False) -> CLIP:
    """A tiny CLIP with OpenAI-scale random weights, then every tensor nudged
    so no LayerNorm or bias is trivial."""
    model = init_parameters(CLIP(**cfg, quick_gelu=quick_gelu), torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def token_ids(lengths: list[int], seed: int = 0) -> torch.Tensor:
    """int32 [N, 77] rows `SOT, words..., EOT, 0...` with `lengths` tokens incl. SOT and EOT,
    as tokenize() gives."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), 77, dtype=torch.int32)
    for row, n in enumerate(lengths):
        ids[row, 0], ids[row, n - 1] = SOT, EOT
        ids[row, 1 : n - 1] = torch.randint(1, SOT, (n - 2,), generator=g, dtype=torch.int32)
    return ids


def images(n: int, size: int = 56, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def save_archive(sd: dict, path: Path, resolution: int) -> None:
    """A TorchScript archive as OpenAI ships: fp16 tensors under OpenAI's names plus three integer buffers."""

    class Archive(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    root = Archive()
    for key, value in sd.items():
        *parents, leaf = key.split(".")
        node = root
        for name in parents:
            if name not in node._modules:
                node.add_module(name, nn.Module())
            node = node._modules[name]
        node.register_parameter(leaf, nn.Parameter(value.half(), requires_grad=False))
    for key, value in (("input_resolution", resolution), ("context_length", 77), ("vocab_size", 49408)):
        root.register_buffer(key, torch.tensor(value))
    torch.jit.save(torch.jit.script(root), str(path))


@pytest.fixture(scope="module")
def tiny() -> CLIP:
    return build(FILE_CFG)


@pytest.fixture(scope="module")
def tiny_file(tiny, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    torch.save(tiny.state_dict(), path)
    return path


# ------------------------------------------------------------------------------------------- file round trips


@pytest.mark.parametrize("kind", ["archive", "state_dict", "openclip"])
def test_strict_round_trip(kind, tiny, tmp_path):
    sd = tiny.state_dict()
    path = tmp_path / f"{kind}.pt"
    if kind == "archive":
        save_archive(sd, path, 56)
        raw = read_state_dict(path)
        assert set(raw) == set(sd) | set(loading.METADATA_KEYS)  # the file really is OpenAI-like
        assert {k for k in raw if raw[k].dtype == torch.float16} == set(sd)
        assert {k: int(raw[k]) for k in loading.METADATA_KEYS} == {
            "input_resolution": 56,
            "context_length": 77,
            "vocab_size": 49408,
        }
        expected = {k: v.half().float() for k, v in sd.items()}
    elif kind == "state_dict":
        torch.save(sd, path)
        expected = sd
    else:
        torch.save(
            {"epoch": 3, "name": "tiny", "state_dict": {"module." + k: v for k, v in sd.items()}}, path
        )
        expected = sd

    model = create_model("tiny-test", 56, "openai", "cpu", checkpoint=path)
    assert not model.training
    assert len(model.visual.transformer.resblocks) == 3 and len(model.transformer.resblocks) == 2
    got = model.state_dict()
    assert list(got) == list(sd)  # metadata entries dropped, nothing else added or lost
    for key, value in expected.items():
        assert got[key].dtype == torch.float32, key
        assert torch.equal(got[key], value), key

    reference = CLIP(**FILE_CFG).eval()
    reference.load_state_dict(expected, strict=True)
    ids = token_ids([5, 12, 77])
    with torch.no_grad():
        assert torch.equal(model.encode_image(images(2)), reference.encode_image(images(2)))
        assert torch.equal(model.encode_text(ids), reference.encode_text(ids))
    # fp16 rounding of the weights is visible in the outputs, so the comparison above is sharp
    if kind == "archive":
        with torch.no_grad():
            assert not torch.allclose(model.encode_image(images(2)), tiny.encode_image(images(2)), atol=1e-4)


def test_archive_loads_at_another_resolution(tiny, tmp_path):
    """The patch rows of the positional embedding are resized on load: 56 px (4x4) -> 84 px (6x6)."""
    save_archive(tiny.state_dict(), tmp_path / "a.pt", 56)
    model = create_model("tiny-test", 84, "openai", checkpoint=tmp_path / "a.pt")
    upcast = {"visual.positional_embedding": tiny.visual.positional_embedding.detach().half().float()}
    expected = resize_pos_embed(upcast, 6)["visual.positional_embedding"]
    assert model.visual.positional_embedding.shape == (37, 128)
    assert torch.equal(model.visual.positional_embedding.detach(), expected)
    with torch.no_grad():
        assert model.encode_image(images(2, 84)).shape == (2, 32)


# -------------------------------------------------------------------------------- positional-embedding resize


def test_resize_pos_embed_577_to_290():
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(577, 8, generator=g)
    other = torch.randn(3, generator=g)
    out = resize_pos_embed({"visual.positional_embedding": pos, "x": other}, 17)
    new = out["visual.positional_embedding"]
    assert new.shape == (290, 8)
    assert torch.equal(new[0], pos[0])  # CLS row unchanged
    assert out["x"] is other
    grid = pos[1:].reshape(24, 24, 8).permute(2, 0, 1)[None]  # [1, C, 24, 24], patch index r*24 + c
    mine = F.interpolate(grid, size=(17, 17), mode="bicubic", align_corners=False, antialias=True)
    assert torch.equal(new[1:], mine[0].permute(1, 2, 0).reshape(289, 8))  # back to row-major [289, C]
    plain = F.interpolate(grid, size=(17, 17), mode="bicubic", align_corners=False, antialias=False)
    assert not torch.allclose(new[1:], plain[0].permute(1, 2, 0).reshape(289, 8), atol=1e-3)


def test_resize_pos_embed_identity_at_equal_size():
    pos = torch.randn(290, 8)
    sd = {"visual.positional_embedding": pos}
    assert resize_pos_embed(sd, 17)["visual.positional_embedding"] is pos


# -------------------------------------------------------------------------------------------- adapted forward


@pytest.fixture(scope="module")
def small() -> CLIP:
    return build(SMALL_CFG)


def adapted(clip: CLIP, features=(1, 3, 4), bottleneck: int = 24, seed: int = 0) -> CLIP_Inplanted:
    torch.manual_seed(seed)  # nn.Linear's default init draws from the global generator
    return CLIP_Inplanted(clip, features, bottleneck).eval()


def test_batch_of_three_equals_single_images(small):
    model = adapted(small)
    x = images(3)
    with torch.no_grad():
        pooled, seg, det = model(x)
        singles = [model(x[i : i + 1]) for i in range(3)]
    assert pooled.shape == (3, 32)
    assert len(seg) == len(det) == 3
    for tokens in seg + det:
        assert tokens.shape == (3, 1 + 16, 24)  # [B, 1+HW, bottleneck], CLS included
    for i, (p, s, d) in enumerate(singles):
        torch.testing.assert_close(pooled[i : i + 1], p, atol=1e-5, rtol=0)
        for batched, single in zip(seg + det, s + d):
            torch.testing.assert_close(batched[i : i + 1], single, atol=1e-5, rtol=0)


def test_adapter_mixing_after_last_block(small):
    """features=[4] on a 4-block tower: tokens = LeakyReLU(x W1^T);
    pooled from 0.8 x + 0.1 seg_out + 0.1 det_out."""
    model = adapted(small, features=[4])
    x = images(2)
    v = small.visual
    with torch.no_grad():
        pooled, seg, det = model(x)
        hidden = v.transformer(v.embed(x))  # [B, 1+HW, C], no adapters before block 4
        w_seg1, w_seg2 = model.seg_adapters[0].fc1[0].weight, model.seg_adapters[0].fc2[0].weight
        w_det1, w_det2 = model.det_adapters[0].fc1[0].weight, model.det_adapters[0].fc2[0].weight
        seg_med, det_med = F.leaky_relu(hidden @ w_seg1.T), F.leaky_relu(hidden @ w_det1.T)
        mixed = 0.8 * hidden + 0.1 * F.leaky_relu(seg_med @ w_seg2.T) + 0.1 * F.leaky_relu(det_med @ w_det2.T)
        expected = F.layer_norm(mixed[:, 0], (64,), v.ln_post.weight, v.ln_post.bias) @ v.proj
    torch.testing.assert_close(seg[0], seg_med, atol=1e-6, rtol=0)
    torch.testing.assert_close(det[0], det_med, atol=1e-6, rtol=0)
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(pooled, small.encode_image(x), atol=1e-3)  # the adapters do change the output


@pytest.mark.parametrize("features", [[0, 6], [5], [], [2, 3, 4, 5]])
def test_features_list_validation(small, features):
    with pytest.raises(ValueError, match=r"feature blocks .*1\.\.4") as info:
        CLIP_Inplanted(small, features)
    assert info.value.flag == "features_list"


# ---------------------------------------------------------------------------------------- adapter checkpoints


def released_layout(model: CLIP_Inplanted, seed: int = 5) -> dict:
    """Random adapter weights keyed as the released checkpoints are:
    '{k}.fc1.0.weight', '{k}.fc2.0.weight'."""
    g = torch.Generator().manual_seed(seed)
    ckpt = {}
    for name in ("seg_adapters", "det_adapters"):
        ckpt[name] = {}
        for k in range(len(model.features)):
            for fc, shape in (("fc1", (24, 64)), ("fc2", (64, 24))):
                ckpt[name][f"{k}.{fc}.0.weight"] = torch.randn(shape, generator=g) * 0.1
    return ckpt


def test_load_adapters_released_layout_with_extras(small, tmp_path):
    model = adapted(small)
    ckpt = released_layout(model)
    assert sorted(ckpt["seg_adapters"]) == [
        "0.fc1.0.weight",
        "0.fc2.0.weight",
        "1.fc1.0.weight",
        "1.fc2.0.weight",
        "2.fc1.0.weight",
        "2.fc2.0.weight",
    ]
    torch.save({**ckpt, "args": {"shot": 4, "features_list": [1, 3, 4]}, "epoch": 50}, tmp_path / "a.pth")
    returned = model.load_adapters(tmp_path / "a.pth")
    assert returned["epoch"] == 50
    for name in ("seg_adapters", "det_adapters"):
        state = getattr(model, name).state_dict()
        assert state.keys() == ckpt[name].keys()
        for key, value in ckpt[name].items():
            assert torch.equal(state[key], value), f"{name}.{key}"
    # what adapter_state() writes is that same layout and reloads into a fresh model with identical outputs
    torch.save(model.adapter_state(), tmp_path / "b.pth")
    other = adapted(small, seed=1)
    other.load_adapters(tmp_path / "b.pth")
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(model(images(1))[1], other(images(1))[1]))


def test_load_adapters_maps_to_cpu(small, tmp_path, monkeypatch):
    """A file whose storages are tagged 'cuda:0' (as one saved on a GPU) only loads with
    map_location='cpu'."""
    model = adapted(small)
    ckpt = released_layout(model)
    with monkeypatch.context() as m:
        m.setattr(
            torch.serialization,
            "_package_registry",
            [(0, lambda obj: "cuda:0", lambda obj, location: None)] + torch.serialization._package_registry,
        )
        torch.save(ckpt, tmp_path / "gpu.pth")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(tmp_path / "gpu.pth", weights_only=True)
    model.load_adapters(tmp_path / "gpu.pth")
    assert torch.equal(model.det_adapters[2].fc2[0].weight, ckpt["det_adapters"]["2.fc2.0.weight"])
    assert model.det_adapters[2].fc2[0].weight.device.type == "cpu"


def _corrupt(ckpt: dict, how: str) -> dict:
    seg = dict(ckpt["seg_adapters"])
    if how == "renamed":
        seg["1.fc1.weight"] = seg.pop("1.fc1.0.weight")
    elif how == "extra":
        seg["3.fc1.0.weight"] = seg["0.fc1.0.weight"]
    elif how == "shape":
        seg["1.fc2.0.weight"] = seg["1.fc2.0.weight"][:, :20]
    elif how == "no_det":
        return {"seg_adapters": seg}
    return {**ckpt, "seg_adapters": seg}


@pytest.mark.parametrize(
    "how, message",
    [
        ("renamed", r"missing key 'seg_adapters\.1\.fc1\.0\.weight'"),
        ("extra", r"unexpected key 'seg_adapters\.3\.fc1\.0\.weight'"),
        ("shape", r"'seg_adapters\.1\.fc2\.0\.weight' has shape \(64, 20\), the model expects \(64, 24\)"),
        ("no_det", r"no 'det_adapters' entry"),
    ],
)
def test_load_adapters_rejects_bad_checkpoints(small, tmp_path, how, message):
    model = adapted(small)
    torch.save(_corrupt(released_layout(model), how), tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=message) as info:
        model.load_adapters(tmp_path / "bad.pth")
    assert str(tmp_path / "bad.pth") in str(info.value)


def test_load_adapters_of_other_features_list_and_missing_file(small, tmp_path):
    torch.save(released_layout(adapted(small, features=(2, 4))), tmp_path / "two.pth")
    with pytest.raises(
        ValueError, match=r"missing key 'seg_adapters\.2\.fc1\.0\.weight'.*another features_list"
    ):
        adapted(small).load_adapters(tmp_path / "two.pth")
    with pytest.raises(FileNotFoundError, match="none.pth"):
        adapted(small).load_adapters(tmp_path / "none.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(ValueError, match="cannot read adapter checkpoint .*empty\\.pth"):
        adapted(small).load_adapters(tmp_path / "empty.pth")


# --------------------------------------------------------------------------------- bad inputs to create_model


def test_missing_file_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nothere.pt"))):
        create_model("tiny-test", 56, "openai", checkpoint=tmp_path / "nothere.pt")


def test_missing_default_file_names_path_url_and_place(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "CKPT_DIR", tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError) as info:
        create_model("ViT-L-14-336", 240, "openai")
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / "ckpt" / "ViT-L-14-336px.pt") in message
    assert (
        "https://openaipublic.azureedge.net/clip/models/3035c92b350959924f9f00213499208652fc7ea050643e8b385c2da"
        "c08641f02/ViT-L-14-336px.pt"
    ) in message
    assert "put it there" in message


@pytest.mark.parametrize("name", ["junk.pt", "junk.safetensors", "empty.pt"])
def test_unreadable_file_names_it(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(
        b""
        if name == "empty.pt"
        else torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
        .numpy()
        .tobytes()
    )
    with pytest.raises(ValueError, match=re.escape(f"cannot read CLIP weights {path}: ")) as info:
        create_model("tiny-test", 56, "openai", checkpoint=path)
    assert "\n" not in str(info.value)


def test_truncated_archive_names_it(tiny, tmp_path):
    save_archive(tiny.state_dict(), tmp_path / "full.pt", 56)
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=re.escape(f"cannot read CLIP weights {tmp_path / 'cut.pt'}: ")):
        create_model("tiny-test", 56, "openai", checkpoint=tmp_path / "cut.pt")


def test_weights_of_another_architecture(tiny_file):
    """The tiny file read as ViT-L-14-336 (architecture from the JSON): the first key in the model's order
    (CLIP's own parameters come before its submodules') with another shape is named."""
    with pytest.raises(
        ValueError,
        match=r"'positional_embedding' has shape \(77, 64\), the model expects "
        r"\(77, 768\).*check the model name",
    ) as info:
        create_model("ViT-L-14-336", 240, "openai", checkpoint=tiny_file)
    assert str(tiny_file) in str(info.value) and info.value.flag == "model_name"


@pytest.mark.parametrize(
    "how, message",
    [
        (
            "shape",
            r"'visual\.transformer\.resblocks\.1\.mlp\.c_fc\.bias' has shape \(511,\), "
            r"the model expects \(512,\)",
        ),
        ("missing", r"missing key 'transformer\.resblocks\.1\.attn\.out_proj\.weight'"),
        ("extra", r"unexpected key 'visual\.attnpool\.weight'"),
    ],
)
def test_state_dict_that_does_not_fit(tiny, tmp_path, how, message):
    sd = dict(tiny.state_dict())
    if how == "shape":
        sd["visual.transformer.resblocks.1.mlp.c_fc.bias"] = sd[
            "visual.transformer.resblocks.1.mlp.c_fc.bias"
        ][:511]
    elif how == "missing":
        del sd["transformer.resblocks.1.attn.out_proj.weight"]
    else:
        sd["visual.attnpool.weight"] = torch.zeros(3)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=message) as info:
        create_model("tiny-test", 56, "openai", checkpoint=tmp_path / "bad.pt")
    assert str(tmp_path / "bad.pt") in str(info.value)


def test_unsupported_pretrained_and_unknown_name():
    with pytest.raises(ValueError, match="'laion'.*openai"):
        create_model("ViT-L-14-336", 240, "laion")
    with pytest.raises(ValueError, match="'tiny-test'"):
        create_model("tiny-test", 56, "none")


# ------------------------------------------------------------------------------------------------ activations


def test_gelu_default_and_quick_gelu_option(small):
    quick = CLIP(**SMALL_CFG, quick_gelu=True).eval()
    quick.load_state_dict(small.state_dict(), strict=True)
    blocks = list(small.visual.transformer.resblocks) + list(small.transformer.resblocks)
    quick_blocks = list(quick.visual.transformer.resblocks) + list(quick.transformer.resblocks)
    x = torch.linspace(-6, 6, 241)
    for block, quick_block in zip(blocks, quick_blocks):
        torch.testing.assert_close(
            block.mlp.gelu(x), 0.5 * x * (1 + torch.erf(x / math.sqrt(2))), atol=1e-6, rtol=0
        )
        torch.testing.assert_close(quick_block.mlp.gelu(x), x * torch.sigmoid(1.702 * x), atol=1e-6, rtol=0)
    ids = token_ids([6, 9])
    with torch.no_grad():
        assert (small.encode_image(images(2)) - quick.encode_image(images(2))).abs().max() > 1e-3
        assert (small.encode_text(ids) - quick.encode_text(ids)).abs().max() > 1e-3


def test_create_model_quick_gelu_flag(tiny_file):
    for flag, kind in ((False, nn.GELU), (True, QuickGELU)):
        model = create_model("tiny-test", 56, "openai", checkpoint=tiny_file, quick_gelu=flag)
        blocks = list(model.visual.transformer.resblocks) + list(model.transformer.resblocks)
        assert all(type(b.mlp.gelu) is kind for b in blocks)
        assert flag or all(b.mlp.gelu.approximate == "none" for b in blocks)


# ----------------------------------------------------------------------------------------------- text encoder


def full_text_pass(model: CLIP, ids: torch.Tensor) -> torch.Tensor:
    """The reference's text encoder: all 77 positions, an explicit -inf causal mask,
    the row at argmax(ids)."""
    x = model.token_embedding(ids.long()) + model.positional_embedding  # [N, 77, W]
    mask = torch.full((77, 77), float("-inf")).triu_(1)
    for block in model.transformer.resblocks:
        attn, heads = block.attn, block.attn.heads
        # [N, 77, W]
        q, k, v = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)

        def split(t, heads=heads):
            return t.unflatten(-1, (heads, -1)).transpose(1, 2)  # [N, H, 77, W/H]

        q, k, v = split(q), split(k), split(v)
        # [N, H, 77, 77]
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + mask, dim=-1)
        x = x + attn.out_proj((weights @ v).transpose(1, 2).flatten(2))  # [N, 77, W]
        x = x + block.mlp(block.ln_2(x))
    x = model.ln_final(x)
    return x[torch.arange(len(ids)), ids.argmax(dim=-1)] @ model.text_projection


def test_encode_text_equals_full_77_position_pass(small):
    for lengths in ([3, 16, 21], [2], [77, 5], [40, 40]):
        ids = token_ids(lengths, seed=len(lengths))
        with torch.no_grad():
            got, expected = small.encode_text(ids), full_text_pass(small, ids)
        assert got.shape == (len(lengths), 32)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0, msg=str(lengths))
