"""CLIP modules with OpenAI's parameter names: a ViT image tower and a causal text transformer.

Modules only, no file I/O (see CLIP/loading.py). Tokens are batch-first everywhere: `[B, L, C]`.
"""

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm(nn.LayerNorm):
    """LayerNorm returning its input's dtype (under autocast it computes in fp32, then casts back)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """The activation OpenAI's CLIP weights were trained with: x * sigmoid(1.702 x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention on OpenAI's packed `in_proj` weights.

    By default torch's own multi-head attention with its explicit product path, as the reference calls it
    (need_weights=True; the weights are dropped): its trajectory in training amplifies last-bit differences,
    so only the same operations reproduce it. `fused=True` (--fast) takes the fused SDPA kernel, which is
    allowed since the weights are never used: the same outputs within float rounding, faster, not the same
    last bits.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, self.fused = heads, False
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool = False, sequence_first: bool = False) -> torch.Tensor:
        """x [B, L, C] ([L, B, C] with sequence_first, the reference's layout) -> the same shape."""
        if not self.fused:
            y = x if sequence_first else x.transpose(0, 1)  # [L, B, C]
            n = y.shape[0]
            mask = torch.full((n, n), float("-inf"), device=x.device).triu_(1).to(x.dtype) if causal else None
            out = F.multi_head_attention_forward(
                y,
                y,
                y,
                y.shape[-1],
                self.heads,
                self.in_proj_weight,
                self.in_proj_bias,
                None,
                None,
                False,
                0.0,
                self.out_proj.weight,
                self.out_proj.bias,
                need_weights=True,
                attn_mask=mask,
            )[0]
            return out if sequence_first else out.transpose(0, 1)
        B, L, C = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # [B, L, 3C]
        q, k, v = qkv.view(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # 3 x [B, H, L, C/H]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # [B, H, L, C/H]
        return self.out_proj(out.transpose(1, 2).reshape(B, L, C))  # [B, L, C]


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, quick_gelu: bool = False, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = LayerNorm(width)
        # The reference builds its CLIP with exact GELU although the weights were trained with QuickGELU:
        # kept by default for its numbers; quick_gelu=True (--quick_gelu) uses the trained activation.
        act = QuickGELU() if quick_gelu else nn.GELU()
        self.mlp = nn.Sequential(
            OrderedDict(c_fc=nn.Linear(width, hidden), gelu=act, c_proj=nn.Linear(hidden, width))
        )

    def forward(self, x: torch.Tensor, causal: bool = False, sequence_first: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal, sequence_first)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, quick_gelu: bool = False):
        super().__init__()
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, quick_gelu) for _ in range(layers)]
        )

    def forward(self, x: torch.Tensor, causal: bool = False, sequence_first: bool = False) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, causal, sequence_first)
        return x


class VisionTransformer(nn.Module):
    """ViT in three stages, `embed` -> `transformer` -> `pool`, so the adapter model can reuse them."""

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        width: int,
        layers: int,
        heads: int,
        output_dim: int,
        quick_gelu: bool = False,
    ):
        super().__init__()
        self.image_size, self.patch_size = image_size, patch_size
        # 240 // 14 = 17: the last 2 pixel rows/columns are never seen, as in the reference (the score maps
        # are still upsampled to the whole image)
        grid = image_size // patch_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty(grid * grid + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, quick_gelu)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(torch.empty(width, output_dim))

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv1(images)  # [B, C, g, g]
        x = x.flatten(2).transpose(1, 2)  # [B, g*g, C], patches row-major
        # the class token of every image: [B, 1, C]
        cls = self.class_embedding.to(x.dtype) + torch.zeros(
            x.shape[0], 1, x.shape[-1], dtype=x.dtype, device=x.device
        )
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # [B, 1+g*g, C]
        return self.ln_pre(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_post(x[:, 0]) @ self.proj  # CLS token -> [B, output_dim]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.pool(self.transformer(self.embed(images)))


class CLIP(nn.Module):
    def __init__(self, embed_dim: int, vision_cfg: dict, text_cfg: dict, quick_gelu: bool = False):
        super().__init__()
        v = vision_cfg
        self.visual = VisionTransformer(
            v["image_size"],
            v["patch_size"],
            v["width"],
            v["layers"],
            v.get("heads", v["width"] // v.get("head_width", 64)),
            embed_dim,
            quick_gelu,
        )
        t = text_cfg
        self.context_length = t["context_length"]
        self.transformer = Transformer(t["width"], t["layers"], t["heads"], quick_gelu)
        self.token_embedding = nn.Embedding(t["vocab_size"], t["width"])
        self.positional_embedding = nn.Parameter(torch.empty(t["context_length"], t["width"]))
        self.ln_final = LayerNorm(t["width"])
        self.text_projection = nn.Parameter(torch.empty(t["width"], embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]))  # loaded for completeness; MVFA uses a literal 100

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images)

    def set_fused(self, fused: bool) -> "CLIP":
        """fused=True (--fast): fused attention, and text rows of equal length run over their own positions
        only."""
        for module in self.modules():
            if isinstance(module, Attention):
                module.fused = fused
        return self

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [N, context] -> projected EOT features [N, E].

        As the reference: all rows in one batch over all positions, sequence-first (the layout decides the
        last bits of its products). Fused: rows grouped by EOT position, each group run up to it; under the
        causal mask the other positions cannot change the EOT token, so the result is the same within float
        rounding.
        """
        eot = ids.argmax(dim=-1)  # the EOT id is the largest in the vocabulary
        if not self.transformer.resblocks[0].attn.fused:
            x = (self.token_embedding(ids) + self.positional_embedding).permute(1, 0, 2)  # [context, N, W]
            # back to [N, ctx, W]
            x = self.ln_final(self.transformer(x, causal=True, sequence_first=True).permute(1, 0, 2))
            return x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection  # [N, E]
        out = None
        for length in eot.unique():
            rows = (eot == length).nonzero().squeeze(1)
            # [n, len, W]: these rows up to their EOT position
            x = self.token_embedding(ids[rows, : length + 1]) + self.positional_embedding[: length + 1]
            features = self.ln_final(self.transformer(x, causal=True))[:, -1] @ self.text_projection  # [n, E]
            out = features.new_empty(ids.shape[0], features.shape[1]) if out is None else out
            out[rows] = features
        return out


def init_parameters(model: CLIP, generator: torch.Generator | None = None) -> CLIP:
    """Random weights of OpenAI's scales, for tests and the demo (real runs load a checkpoint)."""

    def normal_(p, std):
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=generator) * std)

    for name, p in model.named_parameters():
        if name.endswith(
            ("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight", "ln_final.weight")
        ):
            nn.init.ones_(p)
        elif name.endswith("bias"):
            nn.init.zeros_(p)
        elif name == "logit_scale":
            nn.init.constant_(p, 4.6052)  # log(100)
        else:
            fan_in = p.shape[-1] if p.dim() > 1 else p.shape[0]
            if name.endswith("conv1.weight"):
                fan_in = p[0].numel()
            normal_(p, 0.02 if "embedding" in name else fan_in**-0.5)
    return model
