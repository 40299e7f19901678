"""Tests for specquant.io.gguf_dequant against gguf-py's reference dequantizers."""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from specquant.io.gguf_dequant import NATIVE_TYPES, dequantize

BLOCK_TYPES = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1]
FLOAT_TYPES = [T.F32, T.F16, T.BF16]

# (7, 96): odd row count, three blocks per row; (3, 5, 64): a 3-D tensor; (1, 32): one block.
SHAPES = [(7, 96), (3, 5, 64), (1, 32)]


def _random_floats(shape: tuple[int, ...], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Give every row a different scale and offset so per-block d and m vary widely.
    scale = rng.uniform(0.01, 3.0, size=(*shape[:-1], 1))
    offset = rng.uniform(-1.0, 1.0, size=(*shape[:-1], 1))
    return (rng.standard_normal(shape) * scale + offset).astype(np.float32)


def _reference(data: np.ndarray, qtype: T, shape: tuple[int, ...]) -> torch.Tensor:
    ref = gguf.quants.dequantize(data, qtype).astype(np.float32).reshape(shape)
    return torch.from_numpy(np.ascontiguousarray(ref))


def _assert_exact(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == torch.float32
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_native_types_constant() -> None:
    assert isinstance(NATIVE_TYPES, frozenset)
    assert set(BLOCK_TYPES + FLOAT_TYPES) == NATIVE_TYPES


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_block_types_match_gguf_reference(qtype: T, shape: tuple[int, ...]) -> None:
    floats = _random_floats(shape, seed=int(qtype) * 100 + len(shape))
    quantized = gguf.quants.quantize(floats.reshape(-1, shape[-1]), qtype)
    assert quantized.dtype == np.uint8

    ours = dequantize(quantized, qtype, shape)

    _assert_exact(ours, _reference(quantized, qtype, shape))
    # Guards against both implementations agreeing on garbage: the worst case (Q4_0 clipping the
    # value opposite the block's absmax) is off by absmax / 8, so a per-row absmax / 7 bound holds
    # for every type while still catching mis-ordered or mis-scaled elements.
    error = np.abs(ours.numpy() - floats)
    bound = np.abs(floats).max(axis=-1, keepdims=True) / 7
    assert (error <= bound).all()


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_block_types_accept_flat_and_read_only_data(qtype: T) -> None:
    shape = (5, 64)
    quantized = gguf.quants.quantize(_random_floats(shape, seed=7), qtype)
    flat = quantized.reshape(-1).copy()
    flat.flags.writeable = False  # GGUFReader hands out read-only memory maps

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = dequantize(flat, qtype, shape)

    _assert_exact(ours, _reference(quantized, qtype, shape))


@pytest.mark.parametrize("shape", [(7, 96), (3, 5, 2), (11,)])
@pytest.mark.parametrize("qtype", FLOAT_TYPES, ids=lambda t: t.name)
def test_float_types_match_gguf_reference(qtype: T, shape: tuple[int, ...]) -> None:
    floats = _random_floats(shape, seed=int(qtype))
    if qtype == T.BF16:
        data = gguf.quants.quantize(floats, qtype)  # uint8 bytes, two per element
    else:
        data = floats.astype(np.float16 if qtype == T.F16 else np.float32)

    ours = dequantize(data, qtype, shape)

    _assert_exact(ours, _reference(data, qtype, shape))
    # bf16 keeps 8 mantissa bits, fp16 11; both are far tighter than this tolerance.
    np.testing.assert_allclose(ours.numpy(), floats, rtol=1e-2, atol=1e-6)


def test_f32_result_does_not_alias_input() -> None:
    data = np.arange(64, dtype=np.float32)
    out = dequantize(data, T.F32, (2, 32))
    data[0] = 123.0
    assert out[0, 0].item() == 0.0
    _assert_exact(out.reshape(-1)[1:], torch.arange(1, 64, dtype=torch.float32))


def _fp16_bytes(value: float) -> list[int]:
    return list(np.array([value], dtype=np.float16).view(np.uint8))


def test_q4_0_hand_built_block_nibble_order() -> None:
    # Byte j holds element j in its low nibble and element j + 16 in its high nibble.
    low = np.arange(16, dtype=np.uint8)
    high = 15 - low
    block = np.array(_fp16_bytes(0.5) + list(low | (high << 4)), dtype=np.uint8)

    out = dequantize(block, T.Q4_0, (32,))

    expected = (np.concatenate([low, high]).astype(np.float32) - 8) * 0.5
    _assert_exact(out, torch.from_numpy(expected))


def test_q4_1_hand_built_block() -> None:
    low = np.arange(16, dtype=np.uint8)
    high = np.full(16, 3, dtype=np.uint8)
    block = np.array(_fp16_bytes(2.0) + _fp16_bytes(-1.5) + list(low | (high << 4)), dtype=np.uint8)

    out = dequantize(block, T.Q4_1, (1, 32))

    expected = np.concatenate([low, high]).astype(np.float32) * 2.0 - 1.5
    _assert_exact(out, torch.from_numpy(expected.reshape(1, 32)))


def test_q5_0_hand_built_block_high_bits() -> None:
    # Bit i of the little-endian uint32 qh is bit 4 of element i.
    qh = np.uint32(0b1000_0000_0000_0001_0000_0000_1000_0011)
    qs = np.full(16, 0x21, dtype=np.uint8)  # low nibble 1 (elements 0..15), high 2 (16..31)
    block = np.array(
        _fp16_bytes(0.25) + list(np.array([qh], dtype="<u4").view(np.uint8)) + list(qs),
        dtype=np.uint8,
    )

    out = dequantize(block, T.Q5_0, (32,))

    q = np.array([1] * 16 + [2] * 16, dtype=np.float32)
    q[[0, 1, 7, 16, 31]] += 16
    _assert_exact(out, torch.from_numpy((q - 16) * 0.25))


def test_q8_0_hand_built_block() -> None:
    qs = np.arange(-16, 16, dtype=np.int8)
    block = np.array(_fp16_bytes(-0.125) + list(qs.view(np.uint8)), dtype=np.uint8)

    out = dequantize(block, T.Q8_0, (32,))

    _assert_exact(out, torch.from_numpy(qs.astype(np.float32) * -0.125))


def _random_k_quant_blocks(qtype: T, n_blocks: int, seed: int) -> np.ndarray:
    """Random K-quant blocks whose fp16 scale fields hold finite, moderate values."""
    # gguf-py cannot quantize to K-quants, so build payloads directly; random bytes would put
    # NaN/inf into the scale fields and make the equality comparison meaningless.
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.1, size=(n_blocks, 2)).astype(np.float16).view(np.uint8)
    if qtype == T.Q4_K:
        blocks[:, 0:4] = scales  # d, dmin lead the block
    else:
        blocks[:, -2:] = scales[:, :2]  # Q6_K keeps d at the end
    return blocks


@pytest.mark.parametrize("shape", [(3, 512), (2, 3, 256)])
@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_fallback_types_match_gguf_reference(qtype: T, shape: tuple[int, ...]) -> None:
    assert qtype not in NATIVE_TYPES
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = math.prod(shape) // block_size
    blocks = _random_k_quant_blocks(qtype, n_blocks, seed=len(shape))
    rows = blocks.reshape(math.prod(shape[:-1]), shape[-1] // block_size * type_size)

    ours = dequantize(rows, qtype, shape)

    _assert_exact(ours, _reference(rows, qtype, shape))
    assert torch.isfinite(ours).all()
    assert ours.abs().max().item() > 0


def test_gguf_file_round_trip_uses_reversed_ggml_shape(tmp_path: Path) -> None:
    # A PyTorch (rows=96, cols=64) weight is stored by ggml with ne = [64, 96].
    shape = (96, 64)
    floats = _random_floats(shape, seed=11)
    q41 = gguf.quants.quantize(floats, T.Q4_1)
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(path, arch="llama")
    writer.add_tensor("w.q4_1", q41, raw_dtype=T.Q4_1)
    writer.add_tensor("w.f32", floats)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    reader = gguf.GGUFReader(path)
    by_name = {t.name: t for t in reader.tensors}
    for name, expected in (
        ("w.q4_1", _reference(q41, T.Q4_1, shape)),
        ("w.f32", torch.from_numpy(floats)),
    ):
        tensor = by_name[name]
        torch_shape = tuple(int(n) for n in reversed(tensor.shape))
        assert torch_shape == shape
        _assert_exact(dequantize(tensor.data, tensor.tensor_type, torch_shape), expected)


@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q8_0, T.F16, T.Q6_K], ids=lambda t: t.name)
def test_truncated_data_raises_with_byte_counts(qtype: T) -> None:
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    shape = (3, 256)
    expected = math.prod(shape) // block_size * type_size
    data = np.zeros(expected - 1, dtype=np.uint8)

    with pytest.raises(ValueError) as excinfo:
        dequantize(data, qtype, shape)

    message = str(excinfo.value)
    assert qtype.name in message
    assert re.search(rf"\b{expected}\b", message)
    assert re.search(rf"\b{expected - 1}\b", message)


def test_extra_data_raises() -> None:
    with pytest.raises(ValueError, match=r"Q8_0.*\b68\b.*\b102\b"):
        dequantize(np.zeros(102, dtype=np.uint8), T.Q8_0, (2, 32))


def test_row_not_whole_blocks_raises() -> None:
    with pytest.raises(ValueError, match=r"Q4_0.*block size 32"):
        dequantize(np.zeros(36, dtype=np.uint8), T.Q4_0, (4, 16))


@pytest.mark.parametrize("qtype", [T.I32, T.Q8_1], ids=lambda t: t.name)
def test_unsupported_type_raises_with_names(qtype: T) -> None:
    with pytest.raises(ValueError) as excinfo:
        dequantize(np.zeros(64, dtype=np.uint8), qtype, (16,))

    message = str(excinfo.value)
    assert qtype.name in message
    for native in NATIVE_TYPES:
        assert native.name in message


def test_unknown_type_id_raises_value_error() -> None:
    with pytest.raises(ValueError, match=r"9999.*Q8_0"):
        dequantize(np.zeros(4, dtype=np.uint8), 9999, (1,))  # type: ignore[arg-type]
