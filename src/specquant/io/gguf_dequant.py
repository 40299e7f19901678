"""Dequantize GGUF tensor payloads into float32 PyTorch tensors.

Native, vectorized implementations follow ggml's block layouts exactly. All multi-byte fields
are little-endian; every block type below holds QK = 32 elements.

* ``F32`` / ``F16`` / ``BF16``: plain arrays of the element type.
* ``Q8_0`` (34 bytes): ``d: fp16 | qs: int8[32]``; ``x[i] = qs[i] * d``.
* ``Q4_0`` (18 bytes): ``d: fp16 | qs: uint8[16]``; the low nibble of ``qs[j]`` is element
  ``j`` and the high nibble is element ``j + 16``; ``x = (q - 8) * d``.
* ``Q4_1`` (20 bytes): ``d: fp16 | m: fp16 | qs: uint8[16]``; nibbles as in ``Q4_0``;
  ``x = q * d + m``.
* ``Q5_0`` (22 bytes): ``d: fp16 | qh: uint32 | qs: uint8[16]``; bit ``i`` of ``qh`` is bit 4
  of element ``i``, the low four bits come from the nibbles as in ``Q4_0``;
  ``x = (q - 16) * d``.
* ``Q5_1`` (24 bytes): ``d: fp16 | m: fp16 | qh: uint32 | qs: uint8[16]``; 5-bit ``q`` as in
  ``Q5_0``; ``x = q * d + m``.

Every other type that ``gguf.quants.dequantize`` understands (K-quants, IQ-quants, ...) is
delegated to it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import gguf
import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

__all__ = ["NATIVE_TYPES", "dequantize"]

_QK = 32
_HALF_QK = _QK // 2

# Shift amounts that unpack one byte of the Q5 ``qh`` field into its eight bits, LSB first.
_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)

_BlockDequantizer = Callable[[torch.Tensor], torch.Tensor]
_FloatDequantizer = Callable[[np.ndarray], np.ndarray]


def _fp16_field(blocks: torch.Tensor, offset: int) -> torch.Tensor:
    """Read the fp16 scalar at byte ``offset`` of every block as a float32 ``(n_blocks, 1)``."""
    # The two-byte column slice is strided; it must be contiguous to be reinterpreted as fp16.
    return blocks[:, offset : offset + 2].contiguous().view(torch.float16).to(torch.float32)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """Unpack ``(n_blocks, 16)`` packed bytes into ``(n_blocks, 32)`` 4-bit values."""
    # ggml stores element j in the low nibble and element j + 16 in the high nibble of byte j,
    # so the low nibbles form the first half of the block rather than interleaving.
    return torch.cat((qs & 0x0F, qs >> 4), dim=1)


def _high_bits(qh: torch.Tensor) -> torch.Tensor:
    """Unpack the ``(n_blocks, 4)`` ``qh`` bytes into ``(n_blocks, 32)`` values of 0 or 16."""
    # qh is a little-endian uint32 whose bit i belongs to element i, so byte b holds the bits of
    # elements 8b..8b+7 (LSB first); working per byte avoids needing uint32 shifts in torch.
    bits = (qh.unsqueeze(-1) >> _BIT_SHIFTS) & 1
    return bits.reshape(-1, _QK) << 4


def _dequant_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _fp16_field(blocks, 0)
    q = blocks[:, 2:].view(torch.int8).to(torch.float32)
    return q.mul_(d)


def _dequant_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _fp16_field(blocks, 0)
    q = _nibbles(blocks[:, 2:]).to(torch.float32)
    # (q - 8) is exact in float32, so subtracting after the conversion rounds identically to ggml.
    return q.sub_(8).mul_(d)


def _dequant_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    d = _fp16_field(blocks, 0)
    m = _fp16_field(blocks, 2)
    q = _nibbles(blocks[:, 4:]).to(torch.float32)
    # Separate multiply and add (not addcmul, which may fuse into an FMA) keep the two roundings
    # of ggml's reference `q * d + m`.
    return q.mul_(d).add_(m)


def _dequant_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _fp16_field(blocks, 0)
    q = (_nibbles(blocks[:, 6:]) | _high_bits(blocks[:, 2:6])).to(torch.float32)
    return q.sub_(16).mul_(d)


def _dequant_q5_1(blocks: torch.Tensor) -> torch.Tensor:
    d = _fp16_field(blocks, 0)
    m = _fp16_field(blocks, 2)
    q = (_nibbles(blocks[:, 8:]) | _high_bits(blocks[:, 4:8])).to(torch.float32)
    return q.mul_(d).add_(m)


def _dequant_f32(raw: np.ndarray) -> np.ndarray:
    # Copy so the returned tensor never aliases the caller's (often memory-mapped) buffer.
    return raw.view(np.float32).copy()


def _dequant_f16(raw: np.ndarray) -> np.ndarray:
    return raw.view(np.float16).astype(np.float32)


def _dequant_bf16(raw: np.ndarray) -> np.ndarray:
    # bf16 is the upper half of an fp32 bit pattern, so widening is a pure bit shift.
    return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


_FLOAT_DEQUANTIZERS: dict[GGMLQuantizationType, _FloatDequantizer] = {
    GGMLQuantizationType.F32: _dequant_f32,
    GGMLQuantizationType.F16: _dequant_f16,
    GGMLQuantizationType.BF16: _dequant_bf16,
}

_BLOCK_DEQUANTIZERS: dict[GGMLQuantizationType, _BlockDequantizer] = {
    GGMLQuantizationType.Q8_0: _dequant_q8_0,
    GGMLQuantizationType.Q4_0: _dequant_q4_0,
    GGMLQuantizationType.Q4_1: _dequant_q4_1,
    GGMLQuantizationType.Q5_0: _dequant_q5_0,
    GGMLQuantizationType.Q5_1: _dequant_q5_1,
}

NATIVE_TYPES: frozenset[GGMLQuantizationType] = frozenset(
    (*_FLOAT_DEQUANTIZERS, *_BLOCK_DEQUANTIZERS)
)
"""Types decoded by this module's own implementations rather than by ``gguf.quants``."""


def _native_names() -> str:
    return ", ".join(sorted(t.name for t in NATIVE_TYPES))


def _unsupported(type_name: str) -> ValueError:
    return ValueError(
        f"unsupported GGML type {type_name}: neither natively supported "
        f"({_native_names()}) nor handled by gguf.quants.dequantize"
    )


@functools.cache
def _fallback_supported(ggml_type: GGMLQuantizationType) -> bool:
    """Whether ``gguf.quants.dequantize`` implements ``ggml_type``, probed with one zero block."""
    # gguf exposes no public "is supported" query; probing up front lets an unsupported type be
    # reported as such even when the payload is also malformed.
    _, type_size = GGML_QUANT_SIZES[ggml_type]
    try:
        gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), ggml_type)
    except NotImplementedError:
        return False
    return True


def _resolve_type(ggml_type: GGMLQuantizationType | int) -> GGMLQuantizationType:
    try:
        resolved = GGMLQuantizationType(ggml_type)
    except ValueError:
        raise _unsupported(f"id {ggml_type!r}") from None
    if resolved not in GGML_QUANT_SIZES:
        raise _unsupported(resolved.name)
    if resolved not in NATIVE_TYPES and not _fallback_supported(resolved):
        raise _unsupported(resolved.name)
    return resolved


def _as_bytes(data: np.ndarray) -> np.ndarray:
    """Flatten ``data`` to a contiguous uint8 view (copying only when it must)."""
    flat = np.ascontiguousarray(data).reshape(-1)
    return flat.view(np.uint8)


def dequantize(
    data: np.ndarray, ggml_type: GGMLQuantizationType, shape: tuple[int, ...]
) -> torch.Tensor:
    """Decode a GGUF tensor payload into a new float32 tensor of ``shape``.

    Args:
        data: The payload as ``gguf.GGUFReader`` exposes it in ``ReaderTensor.data``: a typed
            array for F32/F16/BF16, a uint8 array (``[rows, bytes_per_row]`` or flat) for
            block-quantized types. Only its bytes are used; it is never modified.
        ggml_type: The tensor's GGML type.
        shape: The logical shape in PyTorch (row-major) order, i.e. the reverse of ggml's ``ne``;
            a ggml ``[576, 1536]`` weight is ``(1536, 576)``.

    Returns:
        A float32 CPU tensor of ``shape`` that does not share memory with ``data``.

    Raises:
        ValueError: If the type is supported neither natively nor by ``gguf.quants``, if the
            last dimension is not a whole number of blocks, or if the byte count of ``data``
            does not match ``shape``.
    """
    qtype = _resolve_type(ggml_type)
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"{qtype.name}: negative dimension in shape {shape}")

    block_size, type_size = GGML_QUANT_SIZES[qtype]
    row_len = shape[-1] if shape else 1
    # ggml quantizes each row independently, so a block never spans two rows.
    if row_len % block_size != 0:
        raise ValueError(
            f"{qtype.name}: last dimension {row_len} of shape {shape} is not a multiple of "
            f"the block size {block_size}"
        )
    n_elements = math.prod(shape)
    expected_bytes = n_elements // block_size * type_size
    raw = _as_bytes(data)
    if raw.nbytes != expected_bytes:
        raise ValueError(
            f"{qtype.name}: expected {expected_bytes} bytes for shape {shape}, got "
            f"{raw.nbytes} bytes (truncated or mismatched data)"
        )

    if n_elements == 0:
        return torch.empty(shape, dtype=torch.float32)

    float_fn = _FLOAT_DEQUANTIZERS.get(qtype)
    if float_fn is not None:
        return torch.from_numpy(float_fn(raw)).reshape(shape)

    block_fn = _BLOCK_DEQUANTIZERS.get(qtype)
    if block_fn is not None:
        # torch.from_numpy warns on read-only arrays (GGUFReader memory-maps the file read-only);
        # the copy costs far less than the float32 output that is produced from it.
        if not raw.flags.writeable:
            raw = raw.copy()
        blocks = torch.from_numpy(raw).view(-1, type_size)
        return block_fn(blocks).reshape(shape)

    # gguf dequantizes row by row, so hand it rows of whole blocks.
    rows = raw.reshape(n_elements // row_len, row_len // block_size * type_size)
    result = gguf.quants.dequantize(rows, qtype)
    return torch.from_numpy(np.asarray(result, dtype=np.float32)).reshape(shape)
