"""Quantization formats as data: one `QuantSpec` describes any weight/activation format.

The one linear layer (`layers.linear.QLinear`) stores a format's tensors and calls the
kernel registry with its spec; there is no class per format.

| name              | weights                               | activations            |
|-------------------|---------------------------------------|------------------------|
| w8a8              | int8, per output channel, symmetric   | int8, per token        |
| w4a16             | int4, per output channel, symmetric   | bf16/fp16/fp32         |
| w4a16-g128        | int4, groups of 128 along K, sym      | bf16/fp16/fp32         |
| w4a16-g128-asym   | int4, groups of 128, zero points      | bf16/fp16/fp32         |
| w4a8              | int4, per channel (QQQ)               | int8, per token        |
| w4a8-g128         | int4, int8 group x fp32 channel scales | int8, per token        |
| fp8               | e4m3, per output channel              | e4m3, per token        |
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

SUPPORTED_WEIGHT_BITS = (4, 8)
SUPPORTED_ACTIVATIONS = ("none", "int8", "fp8")


@dataclass(frozen=True)
class QuantSpec:
    name: str
    weight_bits: int  # 4 or 8
    weight_type: str = "int"  # "int" or "fp8" (e4m3)
    group_size: int = -1  # -1: one scale per output channel
    symmetric: bool = True
    activations: str = "none"  # "none" (weight-only), "int8" or "fp8" per-token dynamic
    two_level: bool = False  # int8 group scales under fp32 channel scales (W4A8-g128)

    def __post_init__(self) -> None:
        if self.weight_bits not in SUPPORTED_WEIGHT_BITS:
            raise ValueError(
                f"unsupported weight bit width {self.weight_bits}; supported: "
                f"{', '.join(map(str, SUPPORTED_WEIGHT_BITS))}"
            )
        if self.activations not in SUPPORTED_ACTIVATIONS:
            raise ValueError(
                f"unsupported activation format {self.activations!r}; supported: "
                f"{', '.join(SUPPORTED_ACTIVATIONS)}"
            )
        if self.group_size != -1 and self.group_size < 1:
            raise ValueError(f"group size must be -1 (per channel) or >= 1, got {self.group_size}")
        if self.weight_type == "fp8" and (self.weight_bits != 8 or self.group_size != -1):
            raise ValueError("fp8 weights are 8-bit with one scale per output channel")
        if self.two_level and (self.group_size == -1 or not self.symmetric):
            raise ValueError("two-level scales need symmetric groups (e.g. w4a8-g128)")

    @property
    def qmax(self) -> int:
        """Largest magnitude of a symmetric integer code (7 for int4, 127 for int8)."""
        return 2 ** (self.weight_bits - 1) - 1

    def groups(self, in_features: int) -> int:
        """Scale groups along K; the group size must divide K."""
        if self.group_size == -1:
            return 1
        if in_features % self.group_size:
            raise ValueError(
                f"{self.name}: group size {self.group_size} does not divide the input "
                f"dimension K={in_features}"
            )
        return in_features // self.group_size

    def to_dict(self) -> dict[str, object]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, raw: dict[str, object]) -> QuantSpec:
        return cls(**raw)  # type: ignore[arg-type]


FORMATS: dict[str, QuantSpec] = {
    s.name: s
    for s in (
        QuantSpec("w8a8", 8, activations="int8"),
        QuantSpec("w4a16", 4),
        QuantSpec("w4a16-g128", 4, group_size=128),
        QuantSpec("w4a16-g128-asym", 4, group_size=128, symmetric=False),
        QuantSpec("w4a8", 4, activations="int8"),
        QuantSpec("w4a8-g128", 4, group_size=128, activations="int8", two_level=True),
        QuantSpec("fp8", 8, weight_type="fp8", activations="fp8"),
    )
}


def get_format(name: str) -> QuantSpec:
    """A format by name; grouped formats take any group size (`w4a16-g64`, `w4a8-g32`),
    for models whose dimensions 128 does not divide."""
    if name in FORMATS:
        return FORMATS[name]
    grouped = re.fullmatch(r"(w4a16|w4a8)-g(\d+)(-asym)?", name)
    base = FORMATS.get(f"{grouped[1]}-g128{grouped[3] or ''}") if grouped else None
    if grouped and base is not None:
        return replace(base, name=name, group_size=int(grouped[2]))
    raise ValueError(
        f"unknown quantization format {name!r}; supported: {', '.join(FORMATS)} "
        "(grouped formats with another group size too, e.g. w4a16-g64)"
    )
