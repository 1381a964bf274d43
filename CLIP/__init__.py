"""A compact CLIP (ViT image tower + text transformer) with OpenAI's names, its tokenizer and weight loading."""
from .adapter import CLIP_Inplanted, ClipAdapter, build_model, fused_attention
from .loading import create_model
from .model import CLIP
from .tokenizer import tokenize

__all__ = ["CLIP", "CLIP_Inplanted", "ClipAdapter", "build_model", "create_model", "fused_attention", "tokenize"]
