"""The random numbers the reference draws while it builds its CLIP models, drawn again without building them.

The reference constructs two CLIPs with torch's default initialisation before loading the real weights
(a throw-away one at the checkpoint's resolution inside its OpenAI loader, then the one it runs), so its
adapters are initialised from a generator advanced by all of those draws. Training from scratch reproduces
the reference only if the global generator is advanced the same way; here that costs a few seconds and no
model.
"""

import torch

CHUNK = 1 << 22  # values per block of the scratch buffer (16 MB of float32), a multiple of 16


def _block_draws(width: int, mlp: int = 4) -> list[tuple[str, int]]:
    """One residual block: nn.MultiheadAttention (out_proj Linear, then xavier on in_proj), c_fc, c_proj
    Linears."""
    return [
        ("uniform", width * width + width + 3 * width * width),
        ("uniform", mlp * width * width + mlp * width),
        ("uniform", width * mlp * width + width),
    ]


def reference_init_draws(config: dict) -> list[tuple[str, int]]:
    """What building one reference CLIP of `config` draws, in order: ('uniform' | 'normal', number of
    float32 values).

    Vision tower: conv1 (kaiming), class and positional embeddings (randn), the blocks, proj (randn).
    Text tower: nn.Embedding (normal), the blocks, then its init_parameters (normal on embeddings, block
    weights, projection).
    """
    v, t, embed = config["vision_cfg"], config["text_cfg"], config["embed_dim"]
    width, patch, grid = v["width"], v["patch_size"], v["image_size"] // v["patch_size"]
    draws = [("uniform", width * 3 * patch * patch), ("normal", width), ("normal", (grid * grid + 1) * width)]
    draws += [d for _ in range(v["layers"]) for d in _block_draws(width)]
    draws += [("normal", width * embed)]
    text_width, vocab = t["width"], t["vocab_size"]
    draws += [("normal", vocab * text_width)]
    draws += [d for _ in range(t["layers"]) for d in _block_draws(text_width)]
    draws += [("normal", vocab * text_width), ("normal", t["context_length"] * text_width)]
    for _ in range(t["layers"]):
        draws += [
            ("normal", 3 * text_width * text_width),
            ("normal", text_width * text_width),
            ("normal", 4 * text_width * text_width),
            ("normal", text_width * 4 * text_width),
        ]
    return draws + [("normal", text_width * embed)]


def advance(draws: list[tuple[str, int]]) -> None:
    """Advance torch's global CPU generator exactly as the listed uniform_ / normal_ calls on float32
    tensors would.

    Both take one 32-bit number per value (normal_ on n >= 16 values takes 16 more when n is not a multiple
    of 16: it redraws its last 16). So every draw is replayed as normal_ on blocks of a multiple of 16
    values, several times faster than uniform_'s element-wise kernel, plus uniform_ on the last few values.
    """
    scratch = torch.empty(CHUNK)
    for kind, n in draws:
        if kind == "normal" and n < 16:  # another kernel, with its own consumption: make the very call
            torch.empty(n).normal_()
            continue
        count = n + (16 if kind == "normal" and n % 16 else 0)
        blocks, rest = divmod(count, 16)
        for start in range(0, 16 * blocks, CHUNK):
            scratch[: min(CHUNK, 16 * blocks - start)].normal_()
        if rest:
            scratch[:rest].uniform_()
