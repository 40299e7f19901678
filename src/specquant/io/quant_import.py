"""Quantized checkpoints from other toolkits, converted at load time into specquant's canonical
tensors (quant/pack.py). Detected from `quantization_config` in config.json.

Per linear (N = out_features, K = in_features, G = groups along K, b = bits, P = 32 / b):

| quant_method                      | tensors                                                    |
|-----------------------------------|------------------------------------------------------------|
| gptq (AutoGPTQ, GPTQModel)        | qweight int32 [K/P, N] packed along K; qzeros int32        |
|                                   | [G, N/P]; scales fp16 [G, N]; g_idx int32 [K] (group of    |
|                                   | each input column)                                         |
| awq (AutoAWQ GEMM)                | qweight int32 [K, N/8] packed along N in AWQ's interleaved |
|                                   | order; qzeros int32 [G, N/8]; scales fp16 [G, N]           |
| compressed-tensors pack-quantized | weight_packed int32 [N, K/P]; weight_scale [N, G];         |
|                                   | weight_zero_point int32 [N/P, G] (asym); weight_shape [2]  |
| compressed-tensors int-quantized  | weight int8 [N, K]; weight_scale [N, G] (W8A8: per-token   |
|   (float-quantized: fp8 weights)  | dynamic int8 activations)                                  |

Inside an int32 word, code j sits in bits [j*b, (j+1)*b). Every layout decodes to unsigned codes
u [N, K] and zero points z [N, G] with w = s * (u - z); symmetric formats have z = 2^(b-1).
GPTQ v1 checkpoints (AutoGPTQ, `checkpoint_format: gptq`) store z - 1; GPTQModel's v2 stores z.
compressed-tensors stores signed values shifted by 2^(b-1), i.e. the same unsigned codes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from specquant.io.checkpoint import CheckpointError
from specquant.quant.pack import QTensors, pack_int4
from specquant.quant.spec import FORMATS, QuantSpec

Get = Callable[[str], torch.Tensor]
Has = Callable[[str], bool]
FLOATS = (torch.float16, torch.bfloat16, torch.float32)
INTS = (torch.int8, torch.int16, torch.int32, torch.int64)


class QuantLayout(Protocol):
    """How one checkpoint format stores a quantized linear layer."""

    spec: QuantSpec
    description: str
    rotated: bool

    def shapes(self, n: int, k: int) -> dict[str, tuple[int, ...]]:
        """Required tensor leaves of an [N, K] linear and their shapes."""
        ...

    def optional_shapes(self, n: int, k: int) -> dict[str, tuple[int, ...]]:
        """Leaves that may be present (e.g. g_idx)."""
        ...

    def read(self, get: Get, has: Has, prefix: str, n: int, k: int) -> QTensors:
        """The canonical tensors of linear `prefix` (plus `perm` when its groups are permuted)."""
        ...


# ------------------------------------------------------------------------ shared decoding
def make_spec(
    bits: int,
    group_size: int,
    symmetric: bool,
    activations: str = "none",
    weight_type: str = "int",
) -> QuantSpec:
    """The named format with these fields (FORMATS) or a new QuantSpec named the same way."""
    suffix = "8" if activations != "none" else "16"
    name = f"w{bits}a{suffix}" if weight_type == "int" else "fp8"
    name += f"-g{group_size}" if group_size != -1 else ""
    name += "" if symmetric else "-asym"
    spec = QuantSpec(name, bits, weight_type, group_size, symmetric, activations)
    for known in FORMATS.values():
        if dataclasses.replace(known, name=name) == spec:
            return known
    return spec


def tensor(get: Get, name: str, dtypes: tuple[torch.dtype, ...], fmt: str) -> torch.Tensor:
    """Read `name` and check its dtype against what format `fmt` stores there."""
    t = get(name)
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        found = str(t.dtype).removeprefix("torch.")
        raise CheckpointError(f"tensor '{name}' is {found}; {fmt} stores {allowed} there")
    return t


def unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words -> unsigned codes (int32), 32/bits of them per word along `dim` (0 or 1)."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    # >> on int32 is arithmetic; the mask keeps exactly the code's bits
    codes = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [R, C, P]
    if dim == 1:
        return codes.flatten(1)  # [R, C*P]
    return codes.permute(0, 2, 1).reshape(-1, packed.shape[1])  # [R*P, C]


def to_canonical(
    codes: torch.Tensor,  # [N, K] unsigned codes
    scales: torch.Tensor,  # [N, G]
    zeros: torch.Tensor | None,  # [N, G] unsigned zero points; None = 2^(b-1)
    g_idx: torch.Tensor | None,  # [K] group of each input column; None = contiguous
    spec: QuantSpec,
    where: str,
) -> QTensors:
    """Decoded codes -> canonical tensors; non-contiguous groups become sorted columns plus
    `perm` (the input permutation QLinear applies first)."""
    bits, mid = spec.weight_bits, 1 << (spec.weight_bits - 1)
    k = codes.shape[1]
    groups = scales.shape[1]
    if spec.symmetric and zeros is not None:
        if not bool((zeros == mid).all()):
            found = sorted({int(z) for z in zeros.unique()[:8]})
            raise CheckpointError(
                f"{where}: the quantization config declares symmetric weights (zero point "
                f"{mid}), but the stored zero points include {found}"
            )
        zeros = None
    out: QTensors = {}
    if g_idx is not None:
        g_idx = g_idx.long()
        gsize = k // groups
        if not torch.equal(g_idx, torch.arange(k) // gsize):
            counts = torch.bincount(g_idx.clamp(0, groups), minlength=groups + 1)
            if g_idx.min() < 0 or g_idx.max() >= groups or bool((counts[:groups] != gsize).any()):
                raise CheckpointError(
                    f"{where}: g_idx must assign exactly {gsize} columns to each of the "
                    f"{groups} groups, got group sizes {counts[:groups].tolist()[:8]}..."
                )
            perm = torch.argsort(g_idx, stable=True)  # columns of group 0 first, then 1, ...
            codes = codes[:, perm]
            out["perm"] = perm
    if bits == 4:
        out["qweight"] = pack_int4(codes)
    else:
        out["qweight"] = (codes.to(torch.int16) - mid).to(torch.int8)
    out["scales"] = scales.float().contiguous()
    if zeros is not None:
        out["zeros"] = zeros.to(torch.uint8).contiguous()
    return out


def _bits(raw: dict[str, Any], key: str, allowed: tuple[int, ...], method: str) -> int:
    bits = raw.get(key)
    if bits not in allowed:
        raise CheckpointError(
            f"{method}: unsupported bit width {bits!r} ({key}); supported: "
            f"{', '.join(map(str, allowed))}"
        )
    return int(bits)


def _group_size(raw: dict[str, Any], key: str, method: str) -> int:
    gs = raw.get(key, -1)
    if not isinstance(gs, int) or (gs != -1 and gs < 1):
        raise CheckpointError(f"{method}: {key} must be -1 (per channel) or >= 1, got {gs!r}")
    return gs


def _groups(spec: QuantSpec, k: int) -> int:
    return spec.groups(k)  # raises ValueError when the group size does not divide K


def _need_multiple(value: int, of: int, what: str) -> None:
    if value % of:
        raise ValueError(f"{what}={value} is not a multiple of {of} (codes per int32 word)")


# ------------------------------------------------------------------------ GPTQ
@dataclass(frozen=True)
class GPTQLayout:
    spec: QuantSpec
    zeros_minus_one: bool  # AutoGPTQ v1 stores z - 1
    description: str
    rotated: bool = False

    @property
    def per_word(self) -> int:
        return 32 // self.spec.weight_bits

    def shapes(self, n: int, k: int) -> dict[str, tuple[int, ...]]:
        g, p = _groups(self.spec, k), self.per_word
        _need_multiple(k, p, "K")
        _need_multiple(n, p, "N")
        return {"qweight": (k // p, n), "qzeros": (g, n // p), "scales": (g, n)}

    def optional_shapes(self, n: int, k: int) -> dict[str, tuple[int, ...]]:
        return {"g_idx": (k,)}

    def read(self, get: Get, has: Has, prefix: str, n: int, k: int) -> QTensors:
        bits, fmt = self.spec.weight_bits, "GPTQ"
        codes = unpack_int32(tensor(get, f"{prefix}.qweight", (torch.int32,), fmt), bits, 0)
        zeros = unpack_int32(tensor(get, f"{prefix}.qzeros", (torch.int32,), fmt), bits, 1)
        if self.zeros_minus_one:
            zeros = zeros + 1
        scales = tensor(get, f"{prefix}.scales", FLOATS, fmt)
        g_idx = tensor(get, f"{prefix}.g_idx", INTS, fmt) if has(f"{prefix}.g_idx") else None
        return to_canonical(codes.T, scales.T, zeros.T, g_idx, self.spec, prefix)


def parse_gptq(raw: dict[str, Any]) -> GPTQLayout:
    bits = _bits(raw, "bits", (4, 8), "gptq")
    gs = _group_size(raw, "group_size", "gptq")
    sym = bool(raw.get("sym", True))
    fmt = raw.get("checkpoint_format") or raw.get("format") or "gptq"
    if fmt not in ("gptq", "gptq_v2") or raw.get("is_marlin_format"):
        raise CheckpointError(
            f"gptq: unsupported checkpoint_format {fmt!r}; supported: gptq (AutoGPTQ v1 zeros), "
            "gptq_v2 (GPTQModel)"
        )
    if bits == 8 and not sym:
        raise CheckpointError("gptq: 8-bit asymmetric weights are not supported; use sym=true")
    if raw.get("lm_head"):
        raise CheckpointError("gptq: a quantized lm_head is not supported (lm_head stays dense)")
    spec = make_spec(bits, gs, sym)
    v1 = fmt == "gptq"
    order = "desc_act" if raw.get("desc_act") else "in order"
    desc = f"gptq {spec.name} ({'v1' if v1 else 'v2'} zeros, {order})"
    return GPTQLayout(spec, v1, desc)


# ------------------------------------------------------------------------ AutoAWQ GEMM
# AWQ packs 8 output columns per word in this order: nibble i holds column AWQ_ORDER[i].
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_UNDO = tuple(AWQ_ORDER.index(j) for j in range(8))  # nibble that holds column j


@dataclass(frozen=True)
class AWQLayout:
    spec: QuantSpec
    description: str
    rotated: bool = False

    def shapes(self, n: int, k: int) -> dict[str, tuple[int, ...]]:
        g = _groups(self.spec, k)
        _need_multiple(n, 8, "N")
        return {"qweight": (k, n // 8), "qzeros": (g, n // 8), "scales": (g, n)}

    def optional_shapes(self, n: int, k: int) -> dict[str, tuple[int, ...]]:
        return {}

    def read(self, get: Get, has: Has, prefix: str, n: int, k: int) -> QTensors:
        def columns(name: str) -> torch.Tensor:  # [R, N/8] words -> [R, N] codes, in order
            codes = unpack_int32(tensor(get, f"{prefix}.{name}", (torch.int32,), "AWQ"), 4, 1)
            return codes.view(codes.shape[0], -1, 8)[:, :, list(AWQ_UNDO)].flatten(1)

        scales = tensor(get, f"{prefix}.scales", FLOATS, "AWQ")
        return to_canonical(
            columns("qweight").T, scales.T, columns("qzeros").T, None, self.spec, prefix
        )


def parse_awq(raw: dict[str, Any]) -> AWQLayout:
    bits = _bits(raw, "bits" if "bits" in raw else "w_bit", (4,), "awq")
    gs = _group_size(raw, "group_size" if "group_size" in raw else "q_group_size", "awq")
    version = str(raw.get("version", "gemm")).lower()
    if version != "gemm":
        raise CheckpointError(f"awq: unsupported version {version!r}; supported: gemm")
    if not raw.get("zero_point", True):
        raise CheckpointError("awq: zero_point=false is not supported; AutoAWQ GEMM is asymmetric")
    spec = make_spec(bits, gs, symmetric=False)
    return AWQLayout(spec, f"awq {spec.name} (GEMM)")


# ------------------------------------------------------------------------ compressed-tensors
CT_FORMATS = ("pack-quantized", "int-quantized", "naive-quantized", "float-quantized")


@dataclass(frozen=True)
class CompressedTensorsLayout:
    spec: QuantSpec
    packed: bool  # pack-quantized (int32 words) vs one int8/fp8 value per weight
    has_g_idx: bool  # actorder "group": weight_g_idx gives each column's group
    description: str
    rotated: bool = False

    def shapes(self, n: int, k: int) -> dict[str, tuple[int, ...]]:
        g = _groups(self.spec, k)
        if not self.packed:
            out: dict[str, tuple[int, ...]] = {"weight": (n, k), "weight_scale": (n, g)}
        else:
            p = 32 // self.spec.weight_bits
            out = {"weight_packed": (n, math.ceil(k / p)), "weight_scale": (n, g)}
            out["weight_shape"] = (2,)
            if not self.spec.symmetric:
                out["weight_zero_point"] = (math.ceil(n / p), g)
        if self.has_g_idx:
            out["weight_g_idx"] = (k,)
        return out

    def optional_shapes(self, n: int, k: int) -> dict[str, tuple[int, ...]]:
        # older writers kept all-zero zero points of symmetric schemes
        return {"weight_zero_point": (n, _groups(self.spec, k))} if self.spec.symmetric else {}

    def read(self, get: Get, has: Has, prefix: str, n: int, k: int) -> QTensors:
        spec, fmt = self.spec, "compressed-tensors"
        bits, mid = spec.weight_bits, 1 << (spec.weight_bits - 1)
        scales = tensor(get, f"{prefix}.weight_scale", FLOATS, fmt).float()
        if spec.weight_type == "fp8":
            weight = tensor(get, f"{prefix}.weight", (torch.float8_e4m3fn,), fmt)
            return {"qweight": weight, "scales": scales.contiguous()}
        if self.packed:
            shape = get(f"{prefix}.weight_shape").tolist()
            if shape != [n, k]:
                raise CheckpointError(f"{prefix}.weight_shape is {shape}, the model needs {[n, k]}")
            packed = tensor(get, f"{prefix}.weight_packed", (torch.int32,), fmt)
            codes = unpack_int32(packed, bits, 1)[:, :k]
        else:
            q = tensor(get, f"{prefix}.weight", (torch.int8,), fmt).to(torch.int32)
            if bits == 4 and (q.min() < -mid or q.max() >= mid):
                raise CheckpointError(f"{prefix}.weight holds values outside the 4-bit range")
            codes = q + mid
        zeros = None
        zp_name = f"{prefix}.weight_zero_point"
        if has(zp_name) and self.packed and not spec.symmetric:
            zeros = unpack_int32(tensor(get, zp_name, (torch.int32,), fmt), bits, 0)[:n]
        elif has(zp_name):  # signed zero points, one per group (all 0 when symmetric)
            zeros = tensor(get, zp_name, INTS, fmt).to(torch.int32) + mid
        g_idx = tensor(get, f"{prefix}.weight_g_idx", INTS, fmt) if self.has_g_idx else None
        return to_canonical(codes, scales, zeros, g_idx, spec, prefix)


def _ct_scheme(raw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None, str]:
    """The one (weights, input_activations, format) scheme every config group shares."""
    groups = raw.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise CheckpointError("compressed-tensors: quantization_config has no config_groups")
    schemes = []
    for name, group in groups.items():
        if not isinstance(group, dict) or not isinstance(group.get("weights"), dict):
            raise CheckpointError(f"compressed-tensors: config group {name!r} has no weights")
        if group.get("output_activations"):
            raise CheckpointError("compressed-tensors: output activation quantization")
        fmt = group.get("format") or raw.get("format")
        schemes.append((group["weights"], group.get("input_activations"), fmt))
    if any(s != schemes[0] for s in schemes):
        raise CheckpointError(
            "compressed-tensors: config groups with different schemes are not supported "
            "(every quantized linear must share one format)"
        )
    return schemes[0]


def parse_compressed_tensors(raw: dict[str, Any]) -> CompressedTensorsLayout:
    method = "compressed-tensors"
    if raw.get("quantization_status", "compressed") != "compressed":
        raise CheckpointError(
            f"{method}: quantization_status {raw.get('quantization_status')!r}: only compressed "
            "checkpoints are supported"
        )
    for key in ("kv_cache_scheme", "sparsity_config", "transform_config"):
        if raw.get(key):
            raise CheckpointError(f"{method}: {key} is not supported")
    weights, acts, fmt = _ct_scheme(raw)
    if fmt not in CT_FORMATS:
        raise CheckpointError(
            f"{method}: unsupported format {fmt!r}; supported: {', '.join(CT_FORMATS)}"
        )
    wtype = weights.get("type", "int")
    bits = _bits(weights, "num_bits", (8,) if wtype == "float" else (4, 8), method)
    if (wtype == "float") != (fmt == "float-quantized") or wtype not in ("int", "float"):
        raise CheckpointError(f"{method}: weights of type {wtype!r} do not fit format {fmt!r}")
    strategy = weights.get("strategy")
    if strategy == "group":
        gs = _group_size(weights, "group_size", method)
    elif strategy == "channel":
        gs = -1
    else:
        raise CheckpointError(
            f"{method}: unsupported weight strategy {strategy!r}; supported: group, channel"
        )
    sym = bool(weights.get("symmetric", True))
    if weights.get("dynamic"):
        raise CheckpointError(f"{method}: dynamic weight quantization is not supported")
    if not sym and (fmt != "pack-quantized" or bits != 4):
        raise CheckpointError(
            f"{method}: asymmetric weights are supported for 4-bit pack-quantized"
        )
    activations = "none"
    if acts:
        kind = {("int", 8): "int8", ("float", 8): "fp8"}.get(
            (acts.get("type"), acts.get("num_bits"))
        )
        if (
            kind is None
            or not acts.get("dynamic")
            or acts.get("strategy") != "token"
            or not acts.get("symmetric", True)
        ):
            raise CheckpointError(
                f"{method}: unsupported input activations {acts}; supported: symmetric per-token "
                "dynamic int8 or fp8"
            )
        activations = kind
    if wtype == "float" and (gs != -1 or activations != "fp8"):
        raise CheckpointError(f"{method}: fp8 weights need per-channel scales and fp8 activations")
    spec = make_spec(bits, gs, sym, activations, "fp8" if wtype == "float" else "int")
    has_g_idx = weights.get("actorder") == "group"
    return CompressedTensorsLayout(
        spec, fmt == "pack-quantized", has_g_idx, f"compressed-tensors {fmt} {spec.name}"
    )
