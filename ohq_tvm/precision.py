"""The numeric precisions a layer can run in. One type, used everywhere instead of bare strings."""

from __future__ import annotations

from enum import StrEnum

from .errors import OHQError


class Precision(StrEnum):
    """A layer precision.

    - ``fp32``: float32 weights and activations.
    - ``fp16``: float16 weights and activations (only where the target computes fp16 natively).
    - ``int8``: int8 weights per output channel, int8/uint8 activations per tensor, int32 accumulation.
    - ``int4w``: int4 weights packed two per byte, unpacked to int8 in the kernel; int8 activations.
    """

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    INT4W = "int4w"

    @property
    def weight_bits(self) -> int:
        return {"fp32": 32, "fp16": 16, "int8": 8, "int4w": 4}[self.value]

    @property
    def is_integer(self) -> bool:
        """Computed with integer weights and activations (int32 accumulation)."""
        return self in (Precision.INT8, Precision.INT4W)

    @property
    def activation_bits(self) -> int:
        return {"fp32": 32, "fp16": 16, "int8": 8, "int4w": 8}[self.value]

    @classmethod
    def parse(cls, text: str) -> Precision:
        """Return the precision named ``text``; raise :class:`OHQError` naming the known ones."""
        try:
            return cls(text.strip().lower())
        except ValueError:
            known = ", ".join(p.value for p in cls)
            raise OHQError(f"unknown precision {text!r}; known precisions: {known}") from None

    def __str__(self) -> str:
        return self.value
