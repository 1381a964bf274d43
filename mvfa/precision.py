"""One precision policy: how the forward, the scoring, the memory bank and the attention path run."""

import contextlib
from dataclasses import dataclass

import torch

from utils import BadValue

PRECISIONS = ("auto", "fp32", "fp16", "bf16", "amp")


@dataclass(frozen=True)
class Precision:
    """What `--precision` means on a device type.

    - auto: fp16 autocast on CUDA, as the reference runs; fp32 on the CPU.
    - amp: fp16 autocast on any device (on the CPU too, where it is slow and only useful to study fp16).
    - fp16 / bf16: autocast to that type on any device; fp32: no autocast.
    bf16 alone changes the scoring: its 8-bit significand ties the near-equal memory-bank similarities, so
    every step after the forward (normalisation, logits, similarities, upsampling, losses) runs in fp32.
    """

    name: str
    device_type: str

    def __post_init__(self):
        if self.name not in PRECISIONS:
            raise BadValue(
                f"unknown precision {self.name!r}: choose one of {', '.join(PRECISIONS)}", flag="precision"
            )

    @classmethod
    def of(cls, name: str, device: torch.device) -> "Precision":
        return cls(name, device.type)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The forward's autocast type; None: plain fp32."""
        if self.name == "fp32" or (self.name == "auto" and self.device_type != "cuda"):
            return None
        return torch.bfloat16 if self.name == "bf16" else torch.float16

    @property
    def fp32_scoring(self) -> bool:
        return self.name == "bf16"

    @property
    def fused_attention(self) -> bool:
        """bf16 always takes the fused attention: it is not the reference's arithmetic anyway, and the
        explicit path's strided bf16 products are ~35x slower on the CPU at batch >= 2 (docs/precision.md)."""
        return self.name == "bf16"

    def forward(self):
        """The context of a forward pass."""
        dtype = self.autocast_dtype
        return contextlib.nullcontext() if dtype is None else torch.autocast(self.device_type, dtype=dtype)

    def scoring(self):
        """Entered inside `forward()`: the context of the maths after the forward (fp32 under bf16, else the
        forward's own, as the reference)."""
        if self.fp32_scoring:
            return torch.autocast(self.device_type, enabled=False)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def maps(self):
        """The context of map maths on collected forward outputs, away from any forward: `forward()` with
        `scoring()` inside, as they would run after the forward."""
        with self.forward(), self.scoring():
            yield

    def scored(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """The forward's outputs as the scoring takes them: float32 under bf16, else as they are."""
        return [t.float() for t in tensors] if self.fp32_scoring else tensors

    def memory_bank(self) -> "Precision":
        """The memory bank's policy: fp32 under auto and amp (the reference builds it without autocast); an
        explicit fp16 or bf16 applies there too."""
        return Precision("fp32", self.device_type) if self.name in ("auto", "amp") else self
