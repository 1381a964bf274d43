"""CLIP's byte-level BPE tokenizer, id for id OpenAI's (the reference's text features depend on every id),
and `tokenize`, which pads ids to a (n, 77) int32 tensor.

The vocabulary is the shipped `bpe_simple_vocab_16e6.txt.gz`; the tokenizer is built on first use, not at
import (the reference builds it at import).
"""

from __future__ import annotations

import functools
import gzip
import html
from pathlib import Path

import ftfy
import regex
import torch

from utils import BadValue, MissingFile

BPE_PATH = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")
N_MERGES = 49152 - 256 - 2  # 48,894 merge lines follow the '#version' header
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
SOT_ID, EOT_ID = 49406, 49407
CONTEXT_LENGTH = 77
PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


def bytes_to_unicode() -> dict[int, str]:
    """Byte -> printable character; dict order (printable bytes first, then the rest) is the vocabulary
    order."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    # 68 bytes: controls, space, DEL, NBSP, soft hyphen, ...
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + i) for i, b in enumerate(others)})
    return table


def basic_clean(text: str) -> str:
    """Fix mojibake with ftfy, unescape HTML entities twice (so '&amp;lt;' becomes '<'), strip."""
    text = ftfy.fix_text(text)
    return html.unescape(html.unescape(text)).strip()


def whitespace_clean(text: str) -> str:
    """Collapse every run of whitespace into one space and strip."""
    return regex.sub(r"\s+", " ", text).strip()


class SimpleTokenizer:
    """Text <-> BPE ids of CLIP's 49,408-entry vocabulary (SOT = 49406, EOT = 49407)."""

    def __init__(self, bpe_path: str | Path = BPE_PATH):
        bpe_path = Path(bpe_path)
        if not bpe_path.is_file():
            raise MissingFile(
                f"BPE vocabulary {bpe_path} not found; restore CLIP/bpe_simple_vocab_16e6.txt.gz "
                "from the repository"
            )
        lines = gzip.decompress(bpe_path.read_bytes()).decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(pair) for pair in merges] + [SOT, EOT]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.decoder = {i: token for token, i in self.encoder.items()}
        self.ranks = {pair: i for i, pair in enumerate(merges)}
        # The special tokens are whole symbols: seeding the cache keeps BPE from splitting them.
        self.cache = {SOT: SOT, EOT: EOT}

    def bpe(self, piece: str) -> str:
        """Space-separated BPE symbols of one pre-token (already mapped through the byte table)."""
        if piece in self.cache:
            return self.cache[piece]
        word = [*piece[:-1], piece[-1] + "</w>"]
        while len(word) > 1:
            best = min(zip(word, word[1:]), key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):  # merge every non-overlapping occurrence, left to right
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        self.cache[piece] = " ".join(word)
        return self.cache[piece]

    def encode(self, text: str) -> list[int]:
        """Ids of `text` without SOT/EOT: clean, lower-case, pre-tokenize with PATTERN, BPE each piece."""
        text = whitespace_clean(basic_clean(text)).lower()
        ids = []
        for piece in PATTERN.findall(text):
            mapped = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[symbol] for symbol in self.bpe(mapped).split(" "))
        return ids

    def decode(self, ids: list[int]) -> str:
        """Text of `ids`; each end of word '</w>' becomes a space (so the result ends with one)."""
        chars = "".join(self.decoder[int(i)] for i in ids)
        raw = bytearray(self.byte_decoder[c] for c in chars)
        return raw.decode("utf-8", errors="replace").replace("</w>", " ")


@functools.cache
def get_tokenizer() -> SimpleTokenizer:
    """The shared tokenizer, built on first call (about a second: it reads the 1.3 MB vocabulary)."""
    return SimpleTokenizer()


def _as_list(texts: str | list[str]) -> list[str]:
    return [texts] if isinstance(texts, str) else list(texts)


def tokenize(
    texts: str | list[str], context_length: int = CONTEXT_LENGTH, truncate: bool = False
) -> torch.IntTensor:
    """[SOT] + ids + [EOT] of each text, zero-padded: int32 tensor of shape (n, context_length)."""
    if context_length < 2:
        raise ValueError(f"context_length={context_length} leaves no room for SOT and EOT; use at least 2")
    texts = _as_list(texts)
    tokenizer = get_tokenizer()
    out = torch.zeros(len(texts), context_length, dtype=torch.int32)  # [n, context_length]
    for row, text in enumerate(texts):
        ids = [SOT_ID, *tokenizer.encode(text), EOT_ID]
        if len(ids) > context_length:
            if not truncate:
                # deviation: the reference raises RuntimeError; a ValueError names the text and the fix.
                raise BadValue(
                    f"text {text[:40]!r}... is {len(ids)} tokens long (incl. SOT/EOT), more than "
                    f"context_length={context_length}; pass truncate=True to cut it"
                )
            ids = ids[:context_length]
            ids[-1] = EOT_ID
        out[row, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
    return out
