"""A compact CLIP (ViT image tower + text transformer) with OpenAI's names, its tokenizer and weight
loading."""

from .adapter import CLIP_Inplanted, ClipAdapter
from .loading import create_model
from .model import CLIP
from .tokenizer import tokenize

__all__ = ["CLIP", "CLIP_Inplanted", "ClipAdapter", "create_model", "tokenize"]
