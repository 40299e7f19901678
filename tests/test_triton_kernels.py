"""Triton kernels against the references in kernels/reference.py.

On a GPU (`cuda` mark) every kernel runs compiled, over a spread of M = 1..128 and shapes
whose N and K are not multiples of the tiles. On the CPU the same kernels run in Triton's
interpreter. TRITON_INTERPRET is read when a kernel module is imported, so those cases run in
a fresh Python process (`python tests/test_triton_kernels.py --interpret OUT.json`) and each
case's result is checked by its own test here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import astuple
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from specquant.kernels import registry
from specquant.kernels.reference import (
    ACTIVATION_KINDS,
    QuantizedActivations,
    qlinear_reference,
    quantize_per_token,
    rmsnorm_quant_reference,
    rmsnorm_reference,
    silu_mul_quant_reference,
    silu_mul_reference,
    to_mma_order,
)
from specquant.kernels.registry import (
    KernelContext,
    KernelImpl,
    KernelSelectionError,
    explain,
    select,
)
from specquant.quant.rtn import quantize_rtn
from specquant.quant.spec import FORMATS, QuantSpec, get_format

ROOT = Path(__file__).resolve().parents[1]
# formats beyond the named ones that the kernels also compute
EXTRA_SPECS = {
    "w4a16-asym": QuantSpec("w4a16-asym", 4, symmetric=False),
    "w4a16-g64": QuantSpec("w4a16-g64", 4, group_size=64),
    "w8a8-g128": QuantSpec("w8a8-g128", 8, group_size=128, activations="int8"),
    "w4a8-g128-asym": QuantSpec(
        "w4a8-g128-asym", 4, group_size=128, symmetric=False, activations="int8"
    ),
}
SPECS = {**FORMATS, **EXTRA_SPECS}
ULP = {torch.bfloat16: 2**-7, torch.float16: 2**-10}


# ------------------------------------------------------------------------------ helpers
def make_case(
    name: str, m: int, n: int, k: int, dtype: torch.dtype, bias: bool, seed: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor | None, QuantSpec]:
    """Random activations [m, k] and the format's tensors for a random [n, k] weight."""
    spec = SPECS[name]
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    w[:, : max(1, k // 16)] *= 4  # uneven columns, so group scales differ
    x = (torch.randn(m, k, generator=gen) * (1 + torch.rand(m, 1, generator=gen))).to(dtype)
    b = (torch.randn(n, generator=gen) * 0.1).to(dtype) if bias else None
    return x, quantize_rtn(w, spec), b, spec


def assert_matches(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Two roundings of (nearly) one fp32 value to the output dtype differ by <= 1 ulp;
    the absolute floor covers outputs that cancel to near zero."""
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, want.shape)
    g, w = got.float().cpu(), want.float().cpu()
    assert torch.isfinite(g).all(), f"{what}: non-finite outputs"
    torch.testing.assert_close(
        g, w, rtol=ULP[want.dtype], atol=1e-3 * float(w.abs().max()), msg=lambda m: f"{what}: {m}"
    )


def assert_codes_match(
    got: QuantizedActivations, want: QuantizedActivations, what: str, flips: float = 0.0
) -> None:
    """Codes equal, except at most a fraction `flips` of them one step apart (a value that
    moved across a rounding boundary, e.g. through a different rsqrt)."""
    assert got.codes.dtype == want.codes.dtype and got.dtype == want.dtype, what
    rtol = 1e-6 if flips == 0 else 1e-2
    torch.testing.assert_close(got.scales.cpu(), want.scales, rtol=rtol, atol=0, msg=what)
    g, w = got.codes.cpu().float(), want.codes.float()
    # one step: 1 for int8 codes; for e4m3, 2^-3 of the value (2^-9 below the normal range)
    step = torch.ones_like(w) if want.kind == "int8" else w.abs().clamp(min=2**-6) * 2**-3
    diff = (g - w).abs()
    assert bool((diff <= step).all()), f"{what}: codes differ by more than one step"
    # fp8 codes in the interpreter may also differ on ties (see _patch_interpreter)
    allowed = flips * w.numel() + (0 if want.kind == "int8" else 0.002 * w.numel())
    assert int((diff > 0).sum()) <= allowed, f"{what}: {int((diff > 0).sum())} codes differ"


def run_qlinear_case(
    name: str,
    m: int,
    n: int,
    k: int,
    dtype: torch.dtype,
    bias: bool,
    split: int | None,
    prequant: bool,
    device: str,
    seed: int = 0,
    tile: tuple[int, ...] | None = None,
) -> None:
    """The Triton GEMM (on `device`) against qlinear_reference (on the CPU); `tile` forces a
    TileConfig (else the tables pick one)."""
    from specquant.kernels.triton_ops.qlinear import TileConfig, qlinear

    x, t, b, spec = make_case(name, m, n, k, dtype, bias, seed)
    xin: torch.Tensor | QuantizedActivations = x
    if prequant and spec.activations != "none":
        xin = quantize_per_token(x, spec.activations)
    want = qlinear_reference(xin, t, b, spec)
    dev = torch.device(device)
    if isinstance(xin, QuantizedActivations):
        xin = QuantizedActivations(xin.codes.to(dev), xin.scales.to(dev), xin.dtype)
    else:
        xin = xin.to(dev)
    got = qlinear(
        xin,
        {key: v.to(dev) for key, v in t.items()},
        None if b is None else b.to(dev),
        spec,
        config=TileConfig(*tile) if tile else None,
        split_k=split,
    )
    assert_matches(got, want, f"{name} M={m} N={n} K={k} {dtype} split={split} tile={tile}")


def run_quant_case(
    kind: str | None, pre: str, m: int, k: int, dtype: torch.dtype, device: str
) -> None:
    """Per-token quantization after `pre` ("none", "norm" = RMSNorm, "silu" = the MLP's
    silu(gate) * up of a [gate; up] row of 2k values; `kind` None: silu without quantizing)."""
    from specquant.kernels.triton_ops import act_quant

    gen = torch.Generator().manual_seed(m + k)
    x = (torch.randn(m, 2 * k if pre == "silu" else k, generator=gen) * 3).to(dtype)
    x[0, 0] = 0.5 * float(x[0].abs().max())  # a value that lands on a rounding tie for int8
    weight = (torch.rand(k, generator=gen) + 0.5).to(dtype)
    dev = torch.device(device)
    what = f"{pre}+{kind} M={m} K={k} {dtype}"
    if kind in (None, "mma"):  # the op alone, its output in the activation dtype
        mma = kind == "mma"  # written in the W4A16 wgmma kernel's K order
        if pre == "silu":
            got_values = act_quant.silu_mul(x.to(dev), mma_order=mma)
            want_values = silu_mul_reference(x)
        else:
            got_values = act_quant.rmsnorm(x.to(dev), weight.to(dev), 1e-5, mma_order=mma)
            want_values = rmsnorm_reference(x, weight, 1e-5)
        if mma:
            want_values = to_mma_order(want_values)
        assert got_values.dtype == want_values.dtype, what
        # exp and the norm's sum differ from torch's in the last fp32 bits: the op and the
        # product may each round one step apart
        torch.testing.assert_close(
            got_values.cpu().float(), want_values.float(), rtol=2 * ULP[dtype], atol=1e-6, msg=what
        )
        return
    assert kind is not None
    if pre == "norm":
        got = act_quant.rmsnorm_quant(x.to(dev), weight.to(dev), 1e-5, kind)
        want = rmsnorm_quant_reference(x, weight, 1e-5, kind)
    elif pre == "silu":
        got = act_quant.silu_mul_quant(x.to(dev), kind)
        want = silu_mul_quant_reference(x, kind)
    else:
        got = act_quant.quantize_per_token(x.to(dev), kind)
        want = quantize_per_token(x, kind)
    # the norm's statistics are summed in another order than torch's, and exp is not torch's
    assert_codes_match(got, want, what, flips=0.0 if pre == "none" else 0.002)


# ------------------------------------------------------------------------------ case lists
# (format, M, N, K, dtype, bias, split, prequantized); the interpreter's are small.
INTERPRET_QLINEAR = [
    (name, m, n, k, torch.bfloat16, m == 19, split, True)
    for name in SPECS
    for (m, n, k, split) in [(1, 40, 256, None), (19, 70, 384, 3), (77, 33, 128, None)]
] + [
    ("w4a16", 5, 37, 200, torch.float16, True, None, True),  # K not a multiple of the tile
    ("w8a8", 5, 37, 200, torch.bfloat16, False, 2, True),
    ("fp8", 3, 29, 72, torch.float16, True, None, True),
    ("w4a8", 128, 50, 200, torch.bfloat16, False, None, True),
    ("w4a16-g128", 128, 65, 256, torch.float16, False, None, True),
    ("w8a8", 4, 48, 256, torch.bfloat16, True, None, False),  # quantizes internally
]
# Several M tiles and split-K in one launch (the tables give M <= 128 a single M tile):
# (case..., forced tile) with BLOCK_M = 16 over M = 40.
INTERPRET_TILED = [
    (name, 40, 70, 512, torch.bfloat16, True, 2, True, (32, 16, 64, 4, 2))
    for name in ("w4a16-g128", "w8a8", "w4a8-g128", "w4a16-asym")
]
# kind None: the op's output unquantized; "mma": that output in the W4A16 mma K order
INTERPRET_QUANT = [
    (kind, pre, m, k, dtype)
    for kind in ("int8", "fp8", None, "mma")
    for pre in ("none", "norm", "silu")
    for (m, k, dtype) in [(3, 300, torch.bfloat16), (2, 256, torch.float16)]
    if (kind not in (None, "mma") or pre != "none") and (kind != "mma" or k % 128 == 0)
]


def _case_id(case: tuple[Any, ...]) -> str:
    return "-".join(str(c).replace("torch.", "") for c in case)


# ------------------------------------------------------------------- CPU: the interpreter
def _patch_interpreter() -> None:
    """Make Triton 3.6's interpreter behave as the GPU does where this file needs it:
    int() of its 1-element scalar arrays (NumPy >= 2.4 refuses), and fp32 -> bf16 / e4m3
    conversions that round to nearest even (it truncates, or rounds ties up)."""
    import numpy as np
    import triton.language as tl
    import triton.runtime.interpreter as interp

    patch_tensor = interp._patch_lang_tensor

    def patched_tensor(tensor: Any, scope: Any) -> None:
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    convert = interp._convert_float
    targets = {
        tl.bfloat16: (torch.bfloat16, np.uint16),
        tl.float8e4nv: (torch.float8_e4m3fn, np.uint8),
    }

    def patched_convert(data: Any, src: Any, dst: Any, rounding: Any) -> Any:
        if src == tl.float32 and dst in targets:
            torch_dtype, bits = targets[dst]
            values = torch.from_numpy(np.ascontiguousarray(data).view(np.float32).copy())
            return values.to(torch_dtype).view(torch.uint8).numpy().view(bits)
        return convert(data, src, dst, rounding)

    interp._patch_lang_tensor = patched_tensor
    interp._convert_float = patched_convert


def _interpret_all(out: Path) -> None:
    _patch_interpreter()
    results = {}
    for case in INTERPRET_QLINEAR:
        results[_case_id(case)] = _try(run_qlinear_case, *case, device="cpu")
    for case in INTERPRET_TILED:
        results[_case_id(case)] = _try(run_qlinear_case, *case[:8], device="cpu", tile=case[8])
    for case in INTERPRET_QUANT:
        results[_case_id(case)] = _try(run_quant_case, *case, device="cpu")
    out.write_text(json.dumps(results, indent=1))


def _try(fn: Any, *args: Any, **kwargs: Any) -> str:
    try:
        fn(*args, **kwargs)
    except Exception as e:  # reported per case by the test that reads the file
        return f"{type(e).__name__}: {e}"
    return "ok"


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("interp") / "results.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])
    proc = subprocess.run(
        [sys.executable, __file__, "--interpret", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", INTERPRET_QLINEAR, ids=_case_id)
def test_qlinear_interpreted(interpreted: dict[str, str], case: tuple[Any, ...]) -> None:
    assert interpreted[_case_id(case)] == "ok", interpreted[_case_id(case)]


@pytest.mark.parametrize("case", INTERPRET_TILED, ids=_case_id)
def test_qlinear_interpreted_several_m_tiles(
    interpreted: dict[str, str], case: tuple[Any, ...]
) -> None:
    assert interpreted[_case_id(case)] == "ok", interpreted[_case_id(case)]


@pytest.mark.parametrize("case", INTERPRET_QUANT, ids=_case_id)
def test_act_quant_interpreted(interpreted: dict[str, str], case: tuple[Any, ...]) -> None:
    assert interpreted[_case_id(case)] == "ok", interpreted[_case_id(case)]


# -------------------------------------------------------------------------- CPU: registry
def _ctx(name: str, device: str = "cpu", dtype: torch.dtype = torch.bfloat16) -> KernelContext:
    spec = get_format(name)
    return KernelContext(torch.device(device), dtype, extra=(("spec", spec), ("shape", (64, 256))))


def test_registry_prefers_triton_but_rejects_the_cpu() -> None:
    rows = explain("qlinear", _ctx("w4a16-g128"))
    names = [r[0] for r in rows]
    assert names.index("triton-w4a16") < names.index("reference")
    reasons = dict((r[0], r[2]) for r in rows)
    assert "needs a CUDA device, not cpu" in reasons["triton-w4a16"]
    assert "computes fp8 formats only, not w4a16-g128" in reasons["triton-fp8"]
    assert select("qlinear", _ctx("w4a16-g128")).name == "cpu-prepared"


def test_registry_rejections_name_the_cause(monkeypatch: pytest.MonkeyPatch) -> None:
    import specquant.kernels.triton_ops as ops

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "A100")
    monkeypatch.setattr(ops.importlib.util, "find_spec", lambda name: object())
    ok, why = ops._qlinear_check("fp8")(_ctx("fp8", "cuda"))
    assert not ok and "compute capability >= 8.9" in why and "8.0" in why
    # asking for the fp8 kernel by name on such a GPU is an error that says why
    with pytest.raises(KernelSelectionError, match=r"triton-fp8: fp8 e4m3 needs compute"):
        select("qlinear", _ctx("fp8", "cuda"), override="triton-fp8")
    with pytest.raises(KernelSelectionError, match="computes w4a16 formats only, not w8a8"):
        select("qlinear", _ctx("w8a8", "cuda"), override="triton-w4a16")
    assert select("qlinear", _ctx("w4a8-g128", "cuda")).name == "triton-w4a8"
    ok, why = ops._qlinear_check("w4a16")(_ctx("w4a16", "cuda", torch.float32))
    assert not ok and "bfloat16 or float16, not torch.float32" in why
    odd = QuantSpec("w4a16-g48", 4, group_size=48)
    ctx = KernelContext(torch.device("cuda"), torch.bfloat16, extra=(("spec", odd),))
    assert "group size must be a multiple of 32" in ops._qlinear_check("w4a16")(ctx)[1]
    monkeypatch.setattr(ops.importlib.util, "find_spec", lambda name: None)
    assert "triton is not importable" in ops._qlinear_check("w8a8")(_ctx("w8a8", "cuda"))[1]


def test_cpu_linear_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's matmul by default; OpenBLAS only with passive OpenMP, and then only for one
    row (several rows fall back to torch), equal to F.linear either way."""
    import specquant
    from specquant.kernels.builtin import linear_openblas

    ctx = KernelContext(torch.device("cpu"), torch.float32)
    monkeypatch.setattr(specquant, "OMP_SPINNING", True)
    assert select("linear", ctx).name == "torch"
    reasons = {r[0]: r[2] for r in explain("linear", ctx)}
    assert "OMP_WAIT_POLICY=PASSIVE" in reasons["cpu-openblas"]
    monkeypatch.setattr(specquant, "OMP_SPINNING", False)
    assert select("linear", ctx).name == "cpu-openblas"
    gen = torch.Generator().manual_seed(0)
    w, b = torch.randn(24, 40, generator=gen), torch.randn(24, generator=gen)
    for rows in ((1, 40), (1, 1, 40), (5, 40)):
        x = torch.randn(*rows, generator=gen)
        assert torch.allclose(linear_openblas(x, w, b), F.linear(x, w, b), atol=1e-5)


def test_tile_rules_pick_by_m_and_weight_size(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    from specquant.kernels.triton_ops import qlinear as Q

    for family, table in Q.CONFIGS.items():  # each bucket of the built-in tables has a
        for bucket in {max_m for max_m, _, _ in table}:  # rule for every size
            assert max(w for m, w, _ in table if m == bucket) == Q.ANY, (family, bucket)
    small, large = Q.TileConfig(32, 16, 128, 2, 4), Q.TileConfig(128, 16, 128, 4, 4)
    wide = Q.TileConfig(64, 64, 128, 4, 3)
    rules = [(16, 1 << 20, small), (16, Q.ANY, large), (64, Q.ANY, wide)]
    monkeypatch.setitem(Q.CONFIGS, "w4a16", rules)
    assert Q.config_for("w4a16", 1, 4096 * 64) is small
    assert Q.config_for("w4a16", 16, 4096 * 4096) is large
    assert Q.config_for("w4a16", 17, 1) is wide
    assert Q.config_for("w4a16", 5000, 1) is wide  # beyond the last bucket: its rules
    assert Q.tile_key(get_format("w4a16-g128")) == "w4a16-g"
    assert Q.tile_key(get_format("w4a16-g128-asym")) == "w4a16-asym"
    assert Q.tile_key(get_format("w4a8-g128")) == "w4a8-g"
    monkeypatch.delitem(Q.CONFIGS, "w4a16-asym", raising=False)  # no table: the family's
    assert Q.config_for("w4a16-asym", 1, 4096 * 64) is small
    capped = [(16, 1 << 20, small), (64, Q.ANY, wide)]  # a bucket without a rule for all sizes
    monkeypatch.setitem(Q.CONFIGS, "w4a16", capped)
    assert Q.config_for("w4a16", 1, 1 << 30) is small  # its largest rule, not another bucket's


def test_tiles_shrink_to_the_shared_memory_of_the_device() -> None:
    """Tuned on Hopper (227 KB per program), every table tile fits there unchanged; on Ada
    (99 KB, FP8 included) the largest FP8 tile drops a stage, then halves its K tile."""
    pytest.importorskip("triton")
    from specquant.kernels.triton_ops import qlinear as Q

    hopper, ada = 232448, 101376
    for name in FORMATS:
        spec = get_format(name)
        if Q.family_of(spec) is None:
            continue
        x_bytes = 1 if spec.activations != "none" else 2
        w_bytes = Q.dot_bytes(spec, x_bytes)  # as the launcher counts it
        for _, _, cfg in Q.CONFIGS[Q.tile_key(spec)]:
            assert Q.fit_shared(cfg, w_bytes, x_bytes, hopper) is cfg, (name, cfg)
    big = Q.TileConfig(128, 128, 256, 8, 3)
    assert Q.ring_bytes(big, 1, 1) == 3 * 256 * 256
    assert Q.fit_shared(big, 1, 1, ada) == Q.TileConfig(128, 128, 128, 8, 2)
    tiny = Q.TileConfig(32, 16, 32, 2, 2)
    assert Q.fit_shared(tiny, 2, 2, 1024) is tiny  # nothing left to shrink: left to Triton


def test_unknown_override_lists_the_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECQUANT_KERNEL_QLINEAR", "marlin")
    with pytest.raises(KernelSelectionError, match=r"'marlin'.*available: triton-w4a16"):
        select("qlinear", _ctx("w4a16"))


def test_silu_mul_module_keeps_autograd_and_picks_per_kind() -> None:
    """SiluMul: the reference under autograd (the fused kernels have no backward), and one
    kernel choice per (device, dtype, kind), quantizing when asked."""
    from specquant.layers.activation import SiluMul

    def no_backward(h: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return silu_mul_reference(h).detach()

    calls: list[int] = []
    fake = KernelImpl("fake", 10**6, no_backward, lambda ctx: (True, "test"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(registry._REGISTRY, "silu_mul", [fake, *registry.implementations("silu_mul")])
        act = SiluMul()
        h = torch.randn(3, 16, requires_grad=True)
        out = act(h)
        assert isinstance(out, torch.Tensor) and not calls  # autograd: the reference
        out.sum().backward()
        assert h.grad is not None and torch.isfinite(h.grad).all()
        with torch.no_grad():
            act(h)
        assert calls == [1]  # no autograd: the selected (fused) kernel
    act = SiluMul()
    with torch.no_grad():
        torch.testing.assert_close(act(h), silu_mul_reference(h), rtol=0, atol=0)
        q = act(h, "int8")
        want = silu_mul_quant_reference(h, "int8")
        assert isinstance(q, QuantizedActivations) and torch.equal(q.codes, want.codes)
    assert len(act._kernels) == 2  # one choice per (device, dtype, kind)


def test_rmsnorm_module_keeps_autograd_and_picks_one_kernel_per_dtype() -> None:
    """RMSNorm: the reference under autograd (the fused kernel has no backward), otherwise
    the "rmsnorm" kernel the registry picks, once per (device, dtype)."""
    from specquant.layers.norm import RMSNorm

    def no_backward(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        calls.append(x.dtype)
        return rmsnorm_reference(x, w, eps).detach()

    calls: list[torch.dtype] = []
    fake = KernelImpl("fake", 10**6, no_backward, lambda ctx: (True, "test"))
    norm = RMSNorm(16, 1e-6)
    x = torch.randn(3, 16)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(registry._REGISTRY, "rmsnorm", [fake, *registry.implementations("rmsnorm")])
        out = norm(x)  # the weight is a trainable parameter: autograd, the reference
        assert out.requires_grad and not calls
        out.sum().backward()
        assert norm.weight.grad is not None
        with torch.no_grad():
            norm(x)
            norm(x.double())
            norm(x)
        assert calls == [torch.float32, torch.float64, torch.float32]
        assert len(norm._kernels) == 2
    with torch.no_grad():  # on the CPU the registry's pick is the reference itself
        got = RMSNorm(16, 1e-6)(x)
    assert select("rmsnorm", KernelContext(x.device, x.dtype)).name == "reference"
    torch.testing.assert_close(got, rmsnorm_reference(x, torch.ones(16), 1e-6), rtol=0, atol=0)


# ------------------------------------------------- CPU: fused norm + quantization in the model
@pytest.mark.parametrize("name", ["w8a8", "w4a8-g128", "fp8", "w4a16-g128"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_norm_quant_equals_unfused_model(
    name: str, dtype: torch.dtype, tmp_path: Path
) -> None:
    """Decoder layers hand QuantizedActivations from the norms to qkv/gate_up and from the
    MLP's activation to down_proj; the logits are bit-identical to letting each QLinear
    quantize its own input."""
    from conftest import make_hf_model, run_logits
    from specquant.io.loader import load_checkpoint
    from specquant.layers.linear import QLinear
    from specquant.quant.model import quantize_model

    make_hf_model("llama", seed=5, hidden_size=128, intermediate_size=256).save_pretrained(tmp_path)
    model = load_checkpoint(tmp_path, torch.device("cpu"), dtype, with_tokenizer=False).model
    quantize_model(model, get_format(name))
    tokens = torch.tensor([3, 14, 15, 92, 65, 35, 89, 79])
    seen: list[str] = []
    for layer in model.layers:
        for linear in (layer.self_attn.qkv_proj, layer.mlp.down_proj):
            linear.register_forward_pre_hook(lambda mod, args: seen.append(type(args[0]).__name__))
    with torch.no_grad():
        fused = run_logits(model, tokens)
        want_type = "Tensor" if name == "w4a16-g128" else "QuantizedActivations"
        assert len(seen) == 2 * len(model.layers) and set(seen) == {want_type}
        for sub in model.modules():
            if isinstance(sub, QLinear):
                sub.act_quant = None  # every linear quantizes its own input
        unfused = run_logits(model, tokens)
    assert torch.equal(fused, unfused)


def test_mma_order_handover_equals_plain_model(tmp_path: Path) -> None:
    """A W4A16 layer whose kernel reads x in mma K order at some token counts (on a GPU the
    wgmma configs with x_perm) gets MmaOrderActivations from the norms, from attention's
    head merge (heads of 128 features) and from silu(gate) * up at exactly those counts;
    other counts get plain tensors, and the logits equal the plain model's bit for bit."""
    from conftest import make_hf_model, run_logits
    from specquant.io.loader import load_checkpoint
    from specquant.kernels.reference import MmaOrderActivations
    from specquant.layers.attention import merge_heads_for
    from specquant.layers.linear import QLinear
    from specquant.quant.model import quantize_model

    class ReadsMmaOrder:  # stands in for triton_ops/w4_fragment.py's FragForward
        def __init__(self, inner: Any, name: str, owner: Any = None):
            self.inner, self.name, self.owner = inner, name, owner

        def takes_mma_order(self, tokens: int) -> bool:
            return tokens >= 4

        def __call__(self, x: Any, t: Any, bias: Any, spec: Any) -> torch.Tensor:
            ordered = isinstance(x, MmaOrderActivations)
            seen.append((self.name, ordered))
            if self.owner is not None:  # ordered exactly when its layer says so for its rows
                assert ordered == self.owner.takes_mma_order(x.shape.numel() // x.shape[-1])
            return self.inner(x.natural() if ordered else x, t, bias, spec)

    def batch_logits(tokens: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, T, V]
        from specquant.layers.attention import AttnMetadata
        from specquant.layers.rope import RopeTable

        b, t = tokens.shape
        rope = RopeTable(model.config, t + 8, tokens.device, torch.bfloat16)
        meta = AttnMetadata.plan(rope, 0, t, sliding_window=model.config.sliding_window)
        return model(tokens, model.new_cache(t + 8, batch=b), meta).logits

    make_hf_model("llama", seed=6, hidden_size=256, intermediate_size=256, num_attention_heads=2,
                  num_key_value_heads=1).save_pretrained(tmp_path)  # fmt: skip
    model = load_checkpoint(tmp_path, torch.device("cpu"), torch.bfloat16,
                            with_tokenizer=False).model  # fmt: skip
    quantize_model(model, get_format("w4a16-g128"))
    tokens = torch.tensor([3, 14, 15, 92, 65, 35, 89, 79])
    with torch.no_grad():
        plain = [run_logits(model, tokens), run_logits(model, tokens[:2])]
        pair = tokens[:4].view(2, 2)
        pair_plain = batch_logits(pair)
        seen: list[tuple[str, bool]] = []
        for name, sub in model.named_modules():
            if isinstance(sub, QLinear) and sub.spec is not None:
                sub.qkernel = ReadsMmaOrder(sub.qkernel, name.rsplit(".", 1)[-1], sub)
                sub._mma_kernel = True
        assert torch.equal(run_logits(model, tokens), plain[0])
        layers = len(model.layers)
        assert sorted(set(seen)) == [("down_proj", True), ("gate_up_proj", True),
                                     ("o_proj", True), ("qkv_proj", True)]  # fmt: skip
        assert len(seen) == 4 * layers
        seen.clear()
        assert torch.equal(run_logits(model, tokens[:2]), plain[1])  # 2 tokens: not asked
        assert {ordered for _, ordered in seen} == {False}
        seen.clear()  # two sequences of 2: 4 rows, asked (tokens counted over the batch)
        assert torch.equal(batch_logits(pair), pair_plain)
        assert {ordered for _, ordered in seen} == {True}
        seen.clear()
        model.layers[0].mlp.down_proj._mma_kernel = False  # a kernel that cannot take it
        assert torch.equal(run_logits(model, tokens), plain[0])
        assert ("down_proj", False) in seen
        dense = QLinear(128, 64)  # handed mma order unasked: it restores feature order
        torch.nn.init.normal_(dense.weight)
        x = torch.randn(3, 128)
        assert torch.equal(dense(MmaOrderActivations(to_mma_order(x))), dense(x))
    o = torch.randn(2, 4, 3, 64)  # heads of 64 features: not whole blocks, merged plainly
    asks = ReadsMmaOrder(None, "o_proj")
    assert torch.equal(merge_heads_for(o, asks), o.transpose(1, 2).reshape(2, 3, 256))
    o = torch.randn(2, 2, 3, 128)
    merged = merge_heads_for(o, asks)
    assert isinstance(merged, MmaOrderActivations)
    assert torch.equal(merged.natural(), o.transpose(1, 2).reshape(2, 3, 256))


# ------------------------------------------------------------------------------------- GPU
GPU_MS = [1, 3, 16, 17, 33, 64, 100, 128]


def gpu_shapes(name: str) -> list[tuple[int, int]]:
    """(N, K): tile multiples; then odd N with K not a multiple of the K tile (and rows not
    16-byte aligned) where the format allows it, else odd N with K a multiple of the group."""
    return [(768, 1024), (333, 328 if SPECS[name].group_size == -1 else 384)]


def gpu_qlinear_cases(name: str) -> list[tuple[Any, ...]]:
    cases: list[tuple[Any, ...]] = []
    for n, k in gpu_shapes(name):
        for i, m in enumerate(GPU_MS):
            cases.append((name, m, n, k, torch.bfloat16, i % 2 == 0, None, i % 3 != 0, "cuda", i))
    return cases


SPLIT_FORMATS = ["w4a16-g128", "w4a16", "w4a16-g128-asym", "w8a8", "w4a8-g128"]
SPLIT_CASES = [
    (name, m, 520, 1152, torch.float16, True, split, True, "cuda", m)
    for name in SPLIT_FORMATS
    for m, split in [(1, 1), (5, 3), (40, 2), (128, 4)]
]
TILED_CASES = [  # a prefill-sized M over several M tiles with split-K
    (name, 300, 520, 1152, torch.bfloat16, True, 2, True, "cuda", 3, (64, 64, 128, 4, 3))
    for name in ("w4a16-g128", "w8a8", "w4a8")
]


# every fp8 tile the table holds (K tiles of 256, several M tiles), on K not a multiple of
# 256 and N not of the tile, at the 64 and 128 buckets and a prefill count past them
def _fp8_table_cases() -> list[tuple[Any, ...]]:
    try:
        from specquant.kernels.triton_ops.qlinear import CONFIGS
    except ImportError:  # no triton: the GPU tests skip anyway
        return []
    return [
        ("fp8", m, 333, 1152, torch.bfloat16, True, None, True, "cuda", i, astuple(cfg))
        for i, cfg in enumerate(dict.fromkeys(c for _, _, c in CONFIGS["fp8"]))
        for m in (64, 128, 300)
    ]


FP8_TABLE_CASES = _fp8_table_cases()
QUANT_CASES = [
    (kind, pre, m, k, dtype, "cuda")
    for kind in ("int8", "fp8", None, "mma")
    for pre in ("none", "norm", "silu")
    for dtype in (torch.bfloat16, torch.float16)
    for m, k in [(1, 4096), (7, 14336), (128, 1000)]
    if (kind not in (None, "mma") or pre != "none") and (kind != "mma" or k % 128 == 0)
]


def _skip_without_fp8(spec_or_kind: QuantSpec | str) -> None:
    kind = spec_or_kind if isinstance(spec_or_kind, str) else spec_or_kind.activations
    if kind == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability >= 8.9")


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(SPECS))
def test_qlinear_gpu(name: str) -> None:
    _skip_without_fp8(SPECS[name])
    for case in gpu_qlinear_cases(name):
        run_qlinear_case(*case)


@pytest.mark.cuda
@pytest.mark.parametrize("name", SPLIT_FORMATS)
def test_qlinear_gpu_fp16_and_forced_split(name: str) -> None:
    for case in SPLIT_CASES:
        if case[0] == name:
            run_qlinear_case(*case)


@pytest.mark.cuda
@pytest.mark.parametrize("case", TILED_CASES, ids=_case_id)
def test_qlinear_gpu_several_m_tiles(case: tuple[Any, ...]) -> None:
    run_qlinear_case(*case[:10], tile=case[10])


@pytest.mark.cuda
@pytest.mark.parametrize("case", FP8_TABLE_CASES, ids=_case_id)
def test_qlinear_gpu_every_fp8_table_tile(case: tuple[Any, ...]) -> None:
    _skip_without_fp8("fp8")
    run_qlinear_case(*case[:10], tile=case[10])


@pytest.mark.cuda
@pytest.mark.parametrize(
    ("kind", "pre"), sorted({c[:2] for c in QUANT_CASES}, key=str), ids=lambda v: str(v)
)
def test_act_quant_gpu(kind: str | None, pre: str) -> None:
    if kind is not None:
        _skip_without_fp8(kind)
    for case in QUANT_CASES:
        if case[:2] == (kind, pre):
            run_quant_case(*case)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ACTIVATION_KINDS)
def test_reference_quantizer_gives_the_same_codes_on_cuda_as_on_the_cpu(kind: str) -> None:
    """The reference divides by a tensor: torch's CUDA division by a Python number goes
    through the reciprocal and put a scale one step off (and a code with it) on an H200."""
    _skip_without_fp8(kind)
    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(512, 4096, generator=gen) * 3).to(torch.bfloat16)
    cpu, gpu = quantize_per_token(x, kind), quantize_per_token(x.cuda(), kind)
    assert torch.equal(gpu.scales.cpu(), cpu.scales)
    assert torch.equal(gpu.codes.cpu().view(torch.int8), cpu.codes.view(torch.int8))


@pytest.mark.cuda
@pytest.mark.parametrize("name", list(FORMATS))
def test_qlinear_layer_selects_triton_on_gpu(name: str) -> None:
    from specquant.layers.linear import QLinear

    spec = get_format(name)
    _skip_without_fp8(spec)
    w = torch.randn(96, 256) * 0.05
    layer = QLinear(256, 96)
    layer.load_quantized_(
        spec, {k: v.cuda() for k, v in quantize_rtn(w, spec).items()}, torch.bfloat16
    )
    assert layer.kernel_name.startswith("triton-"), layer.kernel_name
    x = torch.randn(2, 5, 256, dtype=torch.bfloat16)
    want = qlinear_reference(x, quantize_rtn(w, spec), None, spec)
    assert_matches(layer(x.cuda()), want, name)


def _warm_gpu() -> None:
    """Run every GPU case once in parallel processes (results ignored), so that the pytest
    run finds the compiled kernels in Triton's cache instead of compiling them one by one."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    jobs = [(run_qlinear_case, c) for name in SPECS for c in gpu_qlinear_cases(name)]
    jobs += [(run_qlinear_case, c) for c in SPLIT_CASES]
    jobs += [(_run_tiled, c) for c in TILED_CASES + FP8_TABLE_CASES]
    jobs += [(run_quant_case, c) for c in QUANT_CASES]
    with ProcessPoolExecutor(16, mp_context=mp.get_context("spawn")) as pool:
        results = list(pool.map(_try_job, jobs))
    print(f"warmed {len(jobs)} GPU cases; {sum(r != 'ok' for r in results)} failed")


def _run_tiled(*case: Any) -> None:
    run_qlinear_case(*case[:10], tile=case[10])


def _try_job(job: tuple[Any, tuple[Any, ...]]) -> str:
    return _try(job[0], *job[1])


@pytest.mark.parametrize(("fmt", "tile"), [("w8a8", "128,64,128,4,3"), ("w4a8", "128,128,128,8,3")])
def test_split_k_fix_up_does_not_spill(fmt, tile) -> None:
    """Compiled offline for sm_90 (no GPU): with four splits of a 128 x 64 or 128 x 128 tile
    the last program to arrive used to load all three other splits' sums at once and spill
    (34-38 stores to the stack); 8B's down_proj runs such tiles at 64 and 128 tokens."""
    from conftest import compiled_loop

    out = compiled_loop(["--format", fmt, "--tile", tile, "--split-k", "4"], 3.0)
    assert "STACK:0 " in out, out


def _row_sass(root: Path, spec: str, *more: str) -> Any:
    """bench/kernel_sass.py --act-quant `spec` (and `more` arguments), compiled offline for
    sm_90; skips where Triton ships no ptxas."""
    out = subprocess.run(
        [sys.executable, str(root / "bench" / "kernel_sass.py"), "--act-quant", spec, *more],
        capture_output=True, text=True,
    )  # fmt: skip
    if out.returncode and "ptxas" in out.stderr and "not found" in out.stderr:
        pytest.skip("Triton's ptxas is not available")
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.mark.parametrize("spec", ["norm,none,4096", "silu_mul,none,14336"])
def test_row_kernel_lets_the_next_kernel_launch_before_it_reads_anything(spec) -> None:
    """Offline PTX: with launch_dependents the norm / silu * up kernel signals once, before
    its first global load, so that a W4A16 fragment kernel launched after it with
    programmatic dependent launch copies its weights meanwhile; without, it never does."""
    from conftest import REPO_ROOT

    out = _row_sass(REPO_ROOT, spec, "--pdl").stdout
    assert "griddepcontrol: 1 launch_dependents, 0 global loads before it" in out, out
    assert "griddepcontrol" not in _row_sass(REPO_ROOT, spec).stdout


def test_launch_dependents_and_pdl_layers_need_hopper() -> None:
    """Asking for programmatic dependent launch where there is none is an error that says
    what it needs, for the row kernels and the W4A16 layer alike."""
    from specquant.kernels.triton_ops.act_quant import rmsnorm, silu_mul
    from specquant.kernels.triton_ops.w4_fragment import FragForward

    x = torch.randn(2, 256, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"compute capability >= 9.0 \(Hopper\)"):
        rmsnorm(x, torch.ones(256, dtype=torch.bfloat16), 1e-5, launch_dependents=True)
    with pytest.raises(ValueError, match=r"compute capability >= 9.0 \(Hopper\)"):
        silu_mul(x, launch_dependents=True)
    frag = torch.zeros(256 // 16, 256 // 128, 512, dtype=torch.int16)
    with pytest.raises(ValueError, match=r"pdl needs .* >= 9.0 \(Hopper\), not a cpu device"):
        FragForward(frag, get_format("w4a16-g128"), wgmma=False, pdl=True)


@pytest.mark.parametrize("pre", ["none", "norm", "silu_mul"])
def test_row_kernel_compiles_for_rows_of_one_value(pre) -> None:
    """Triton turns K == 1 into a constant; the norm's mean must not treat it as a tensor."""
    from conftest import REPO_ROOT

    for kind in ("int8", "none"):
        assert "row kernel" in _row_sass(REPO_ROOT, f"{pre},{kind},1").stdout


@pytest.mark.parametrize(("pre", "kind"), [("none", "int8"), ("norm", "int8"), ("silu_mul", "fp8"),
                                           ("norm", "none")])  # fmt: skip
def test_row_kernel_moves_16_bytes_per_access_and_rounds_in_one_instruction(pre, kind) -> None:
    """Compiled offline for sm_90 (no GPU), rows of 14336 (8B's down_proj input): K is
    specialized, so Triton sees K % 16 == 0 and the masked loads and stores vectorize. With K
    left unspecialized each thread issued 32 scalar 2-byte loads and 1-byte stores, and the
    floor-built rounding took ~10 instructions a value: 1640 instructions per thread against
    936, in the one program that quantizes a token's row."""
    from conftest import REPO_ROOT
    from specquant.kernels.triton_ops import act_quant as A

    k_param = A._row_kernel.params[A._row_kernel.arg_names.index("K")]
    assert not k_param.do_not_specialize
    out = _row_sass(REPO_ROOT, f"{pre},{kind},14336")
    loads = re.search(r"loads and stores: (.*)", out.stdout).group(1)
    sizes = dict(re.findall(r"([LS]TG[\w.]*) (\d+)", loads))
    # 16-byte row loads; 16-byte stores of codes or 8-byte of bf16 (and the one scale)
    assert set(sizes) <= {"LDG.E.128", "STG.E.128", "STG.E.64", "STG.E"}, loads
    assert int(sizes.get("STG.E", "0")) <= (kind != "none"), loads
    per_thread = int(re.search(r"(\d+) values per thread", out.stdout).group(1))
    rounds = re.search(r"roundings: (.*)", out.stdout).group(1)
    assert rounds == (f"FRND {per_thread}" if kind == "int8" else "none"), rounds
    assert "LOCAL:0" in out.stdout, out.stdout


if __name__ == "__main__" and sys.argv[1:2] == ["--interpret"]:
    _interpret_all(Path(sys.argv[2]))
elif __name__ == "__main__" and sys.argv[1:2] == ["--warm-gpu"]:
    _warm_gpu()
