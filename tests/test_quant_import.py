"""Importing AutoGPTQ/GPTQModel, AutoAWQ and compressed-tensors checkpoints.

Each test draws known integer codes, scales and zero points for every decoder linear of a tiny
Llama, packs them into the toolkit's layout with packing code written here (independent of the
importer), and compares the loaded model's linears and logits against transformers running
the dequantized weights w = s * (u - z) computed here.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import make_hf_model, run_logits
from specquant.io.checkpoint import CheckpointError
from specquant.io.loader import load_checkpoint

CPU = torch.device("cpu")
T = torch.Tensor
Packer = Callable[[T, T, T, T, int], dict[str, T]]  # (u [N,K], s [N,G], z [N,G], g_idx, bits)


# ------------------------------------------------------------------ independent packers
def pack_words(codes: T, bits: int, dim: int) -> T:
    """32/bits unsigned codes per int32 word along `dim`; code j in bits [j*bits, (j+1)*bits)."""
    c = codes.numpy().astype(np.uint64)
    if dim == 0:
        c = c.T
    per = 32 // bits
    c = c.reshape(c.shape[0], -1, per)
    words = sum(c[:, :, j] << np.uint64(bits * j) for j in range(per)).astype(np.uint32)
    out = torch.from_numpy(words.view(np.int32).copy())
    return out.T.contiguous() if dim == 0 else out


def pack_awq(codes: T) -> T:
    """AutoAWQ GEMM: 8 columns per word along the last dim, word nibble i = column ORDER[i]."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    c = codes.numpy().astype(np.uint64).reshape(codes.shape[0], -1, 8)
    words = sum(c[:, :, order[i]] << np.uint64(4 * i) for i in range(8)).astype(np.uint32)
    return torch.from_numpy(words.view(np.int32).copy())


def gptq(v1: bool) -> Packer:
    def pack(u: T, s: T, z: T, g_idx: T, bits: int) -> dict[str, T]:
        stored = z - 1 if v1 else z  # AutoGPTQ v1 writes zero - 1
        return {
            "qweight": pack_words(u.T, bits, 0),  # [K/P, N]
            "qzeros": pack_words(stored.T, bits, 1),  # [G, N/P]
            "scales": s.T.half().contiguous(),
            "g_idx": g_idx.int(),
        }

    return pack


def awq(u: T, s: T, z: T, g_idx: T, bits: int) -> dict[str, T]:
    return {"qweight": pack_awq(u.T), "qzeros": pack_awq(z.T), "scales": s.T.half().contiguous()}


def ct_packed(sym: bool) -> Packer:
    def pack(u: T, s: T, z: T, g_idx: T, bits: int) -> dict[str, T]:
        signed = u - 8  # compressed-tensors quantizes to signed ints and stores them + 8
        out = {
            "weight_packed": pack_words(signed + 8, bits, 1),
            "weight_scale": s.half(),
            "weight_shape": torch.tensor(list(u.shape)),
        }
        if not sym:
            out["weight_zero_point"] = pack_words(z, bits, 0)  # packed along N: [N/8, G]
        return out

    return pack


def ct_int8(u: T, s: T, z: T, g_idx: T, bits: int) -> dict[str, T]:
    return {"weight": (u - 128).to(torch.int8), "weight_scale": s.half()}


def ct_config(fmt: str, bits: int, group: int, sym: bool, acts: Any = None) -> dict[str, Any]:
    weights = {
        "num_bits": bits,
        "type": "int",
        "symmetric": sym,
        "strategy": "group" if group != -1 else "channel",
        "group_size": group if group != -1 else None,
        "dynamic": False,
        "actorder": None,
    }
    scheme = {"targets": ["Linear"], "weights": weights, "input_activations": acts}
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "config_groups": {"group_0": scheme},
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
    }


# ------------------------------------------------------------------ tiny checkpoints
FUSED = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gu", "up_proj": "gu"}


def build(
    path: Path,
    qcfg: dict[str, Any] | None,
    pack: Packer,
    *,
    bits: int = 4,
    group: int = 32,
    sym: bool = True,
    zeros: tuple[int, int] = (0, 16),
    act_order: bool = False,
    seed: int = 0,
    config_file: str = "config.json",
) -> tuple[Path, Any, dict[str, T]]:
    """A quantized tiny Llama at `path`; returns (path, transformers model holding the
    dequantized weights, name -> dequantized weight)."""
    hf = make_hf_model("llama", seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    tensors, weights, perms = {}, {}, {}
    mid = 1 << (bits - 1)
    for name, p in hf.state_dict().items():
        proj = name.split(".")[-2]
        if ".layers." not in name or not proj.endswith("_proj"):
            tensors[name] = p.clone()
            continue
        n, k = p.shape
        groups = 1 if group == -1 else k // group
        gsize = k // groups
        u = torch.randint(0, 1 << bits, (n, k), generator=gen)
        s = (torch.rand(n, groups, generator=gen) * 0.02 + 0.01).half().float()
        z = torch.randint(*zeros, (n, groups), generator=gen)
        if sym:
            z = torch.full((n, groups), mid)
        g_idx = torch.arange(k) // gsize
        if act_order:  # q/k/v (and gate/up) share one column order, as GPTQ's Hessian gives
            key = (name.split(".")[2], FUSED.get(proj, proj))
            perm = perms.setdefault(key, torch.randperm(k, generator=gen))
            g_idx = torch.empty(k, dtype=torch.long)
            g_idx[perm] = torch.arange(k) // gsize
        w = s[:, g_idx] * (u - z[:, g_idx]).float()
        with torch.no_grad():
            p.copy_(w)
        weights[name] = w
        tensors |= {f"{name[:-7]}.{leaf}": t for leaf, t in pack(u, s, z, g_idx, bits).items()}
    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    config = json.loads(hf.config.to_json_string())
    if qcfg is not None and config_file == "config.json":
        config["quantization_config"] = qcfg
    elif qcfg is not None:
        (path / config_file).write_text(json.dumps(qcfg))
    (path / "config.json").write_text(json.dumps(config))
    return path, hf, weights


def check_against_reference(path: Path, hf: Any, weights: dict[str, T], tol: float = 1e-4) -> Any:
    loaded = load_checkpoint(path, CPU, torch.float32, with_tokenizer=False)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(9))
    p = "model.layers.1."
    qkv = torch.cat([weights[f"{p}self_attn.{n}_proj.weight"] for n in "qkv"])
    got = loaded.model.layers[1].self_attn.qkv_proj(x)
    torch.testing.assert_close(got, x @ qkv.T, rtol=tol, atol=tol)
    gate_up = torch.cat([weights[f"{p}mlp.{n}_proj.weight"] for n in ("gate", "up")])
    torch.testing.assert_close(loaded.model.layers[1].mlp.gate_up_proj(x), x @ gate_up.T)
    tokens = torch.randint(0, 160, (24,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = hf(tokens[None]).logits[0]
        got = run_logits(loaded.model, tokens)
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    return loaded


# ------------------------------------------------------------------ GPTQ
@pytest.mark.parametrize(
    ("fmt", "sym", "zeros"),
    [("gptq", True, (0, 16)), ("gptq", False, (1, 16)), ("gptq_v2", False, (0, 16))],
)
def test_gptq_matches_dequantized_reference(
    tmp_path: Path, fmt: str, sym: bool, zeros: tuple[int, int]
) -> None:
    qcfg = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": sym}
    qcfg["checkpoint_format"] = fmt
    path, hf, w = build(tmp_path / "m", qcfg, gptq(fmt == "gptq"), sym=sym, zeros=zeros)
    loaded = check_against_reference(path, hf, w)
    want = "w4a16-g32" if sym else "w4a16-g32-asym"
    assert loaded.model.layers[0].mlp.down_proj.spec.name == want
    assert loaded.quantization.startswith("gptq")


def test_gptq_8bit_per_channel(tmp_path: Path) -> None:
    qcfg = {"quant_method": "gptq", "bits": 8, "group_size": -1, "desc_act": False, "sym": True}
    path, hf, w = build(tmp_path / "m", qcfg, gptq(True), bits=8, group=-1)
    loaded = check_against_reference(path, hf, w)
    assert loaded.model.layers[0].self_attn.o_proj.qweight.dtype == torch.int8


def test_gptq_act_order_groups_become_a_shared_permutation(tmp_path: Path) -> None:
    qcfg = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True, "sym": False}
    path, hf, w = build(tmp_path / "m", qcfg, gptq(True), sym=False, zeros=(1, 16), act_order=True)
    loaded = check_against_reference(path, hf, w)
    layer = loaded.model.layers[0]
    assert layer.self_attn.qkv_proj.perm.shape == (64,)
    assert layer.mlp.down_proj.perm.shape == (96,)


def test_gptq_fused_parts_with_different_permutations_are_refused(tmp_path: Path) -> None:
    qcfg = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True, "sym": True}
    path, _, _ = build(tmp_path / "m", qcfg, gptq(True), act_order=True)
    from safetensors.torch import load_file

    tensors = load_file(path / "model.safetensors")
    name = "model.layers.0.self_attn.k_proj.g_idx"
    tensors[name] = torch.arange(64, dtype=torch.int32) // 32  # k now contiguous, q/v permuted
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="must share one input permutation"):
        load_checkpoint(path, CPU, torch.float32, with_tokenizer=False)


def test_old_autogptq_quantize_config_file(tmp_path: Path) -> None:
    qcfg = {"bits": 4, "group_size": 32, "desc_act": False, "sym": True}
    path, hf, w = build(tmp_path / "m", qcfg, gptq(True), config_file="quantize_config.json")
    check_against_reference(path, hf, w)


# ------------------------------------------------------------------ AWQ and compressed-tensors
def test_awq_gemm_matches_dequantized_reference(tmp_path: Path) -> None:
    qcfg = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True}
    qcfg["version"] = "gemm"
    path, hf, w = build(tmp_path / "m", qcfg, awq, sym=False)
    loaded = check_against_reference(path, hf, w)
    assert loaded.model.layers[0].mlp.down_proj.spec.name == "w4a16-g32-asym"


@pytest.mark.parametrize("sym", [True, False])
def test_compressed_tensors_w4a16(tmp_path: Path, sym: bool) -> None:
    qcfg = ct_config("pack-quantized", 4, 32, sym)
    path, hf, w = build(tmp_path / "m", qcfg, ct_packed(sym), sym=sym)
    check_against_reference(path, hf, w)


def test_compressed_tensors_w8a8_int(tmp_path: Path) -> None:
    acts = {"num_bits": 8, "type": "int", "symmetric": True, "dynamic": True, "strategy": "token"}
    qcfg = ct_config("int-quantized", 8, -1, True, acts)
    path, hf, w = build(tmp_path / "m", qcfg, ct_int8, bits=8, group=-1)
    loaded = load_checkpoint(path, CPU, torch.float32, with_tokenizer=False)
    linear = loaded.model.layers[0].mlp.down_proj
    assert linear.spec.name == "w8a8"
    x = torch.randn(4, 96, generator=torch.Generator().manual_seed(0))
    want = fake_quant_int8(x) @ w["model.layers.0.mlp.down_proj.weight"].T  # per-token int8
    torch.testing.assert_close(linear(x), want, rtol=1e-4, atol=1e-4)
    # transformers with the same per-token int8 fake quantization in front of every linear
    for name, module in hf.named_modules():
        if ".layers." in name and name.endswith("_proj"):
            module.register_forward_pre_hook(lambda _m, args: fake_quant_int8(args[0]))
    tokens = torch.randint(0, 160, (16,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref, got = hf(tokens[None]).logits[0], run_logits(loaded.model, tokens)
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)


def fake_quant_int8(x: T) -> T:
    s = x.abs().amax(-1, keepdim=True) / 127
    return (x / s).round().clamp(-127, 127) * s


# ------------------------------------------------------------------ bad input
def gptq_cfg(**kw: Any) -> dict[str, Any]:
    return {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True} | kw


@pytest.mark.parametrize(
    ("qcfg", "message"),
    [
        ({"quant_method": "bitsandbytes"}, "unknown quant_method 'bitsandbytes'; supported: "),
        (gptq_cfg(bits=3), r"unsupported bit width 3 \(bits\); supported: 4, 8"),
        (gptq_cfg(bits=2), r"unsupported bit width 2 \(bits\); supported: 4, 8"),
        (gptq_cfg(group_size=48), "group size 48 does not divide the input dimension K=64"),
        (gptq_cfg(bits=8), r"qweight' has shape \[8, 64\], expected \[16, 64\]"),
        (gptq_cfg(checkpoint_format="marlin"), "unsupported checkpoint_format 'marlin'"),
        (gptq_cfg(lm_head=True), "quantized lm_head is not supported"),
        ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "unsupported version 'gemv'"),
        (ct_config("pack-quantized", 2, 32, True), r"unsupported bit width 2 \(num_bits\)"),
        (ct_config("marlin-24", 4, 32, True), "unsupported format 'marlin-24'"),
    ],
)
def test_bad_quantization_metadata_is_named(
    tmp_path: Path, qcfg: dict[str, Any], message: str
) -> None:
    path, _, _ = build(tmp_path / "m", qcfg, gptq(True))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path, CPU, torch.float32, with_tokenizer=False)


def _edit(path: Path, name: str, value: T | None) -> None:
    from safetensors.torch import load_file

    tensors = load_file(path / "model.safetensors")
    if value is None:
        del tensors[name]
    else:
        tensors[name] = value
    save_file(tensors, str(path / "model.safetensors"))


def test_tensors_contradicting_the_metadata_are_named(tmp_path: Path) -> None:
    def broken(edit: str, value: T | None, qcfg: dict[str, Any] | None = None) -> Path:
        path, _, _ = build(tmp_path / edit.replace(".", "_"), qcfg or gptq_cfg(), gptq(True))
        _edit(path, f"model.layers.0.self_attn.{edit}", value)
        return path

    def load(path: Path) -> None:
        load_checkpoint(path, CPU, torch.float32, with_tokenizer=False)

    with pytest.raises(CheckpointError, match=r"q_proj.qweight' is float16; GPTQ stores int32"):
        load(broken("q_proj.qweight", torch.zeros(8, 64, dtype=torch.float16)))
    with pytest.raises(CheckpointError, match=r"missing tensor '.*o_proj.qzeros'"):
        load(broken("o_proj.qzeros", None))
    with pytest.raises(CheckpointError, match=r"declares symmetric weights .* include \[5\]"):
        load(broken("v_proj.qzeros", pack_words(torch.full((2, 32), 4), 4, 1)))  # v1: 4 + 1
    with pytest.raises(CheckpointError, match="is non-zero, but the config declares no bias"):
        load(broken("o_proj.bias", torch.ones(64)))
    load(broken("k_proj.bias", torch.zeros(32)))  # an all-zero bias some exporters write is fine
    ct = ct_config("pack-quantized", 4, 32, True)
    path, _, _ = build(tmp_path / "ct", ct, ct_packed(True))
    _edit(path, "model.layers.1.mlp.up_proj.weight_shape", torch.tensor([96, 32]))
    with pytest.raises(CheckpointError, match=r"weight_shape is \[96, 32\], the model needs"):
        load(path)


def test_compressed_tensors_actorder_group_indices(tmp_path: Path) -> None:
    qcfg = ct_config("pack-quantized", 4, 32, False)
    qcfg["config_groups"]["group_0"]["weights"]["actorder"] = "group"

    def pack(u: T, s: T, z: T, g_idx: T, bits: int) -> dict[str, T]:
        return ct_packed(False)(u, s, z, g_idx, bits) | {"weight_g_idx": g_idx.int()}

    path, hf, w = build(tmp_path / "m", qcfg, pack, sym=False, act_order=True)
    loaded = check_against_reference(path, hf, w)
    assert loaded.model.layers[1].mlp.gate_up_proj.perm.shape == (64,)


def test_compressed_tensors_fp8(tmp_path: Path) -> None:
    acts = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": True, "strategy": "token"}
    qcfg = ct_config("float-quantized", 8, -1, True, acts)
    qcfg["config_groups"]["group_0"]["weights"]["type"] = "float"

    def pack(u: T, s: T, z: T, g_idx: T, bits: int) -> dict[str, T]:
        # codes -8..7 are exact in e4m3, so w = s * q holds exactly
        return {"weight": (u - 8).float().to(torch.float8_e4m3fn), "weight_scale": s.half()}

    path, hf, _ = build(tmp_path / "m", qcfg, pack, bits=4, group=-1)
    loaded = load_checkpoint(path, CPU, torch.float32, with_tokenizer=False)
    assert loaded.model.layers[0].self_attn.o_proj.spec.name == "fp8"

    def fake_quant_fp8(x: T) -> T:
        s = x.abs().amax(-1, keepdim=True) / 448
        return (x / s).to(torch.float8_e4m3fn).float() * s

    for name, module in hf.named_modules():
        if ".layers." in name and name.endswith("_proj"):
            module.register_forward_pre_hook(lambda _m, args: fake_quant_fp8(args[0]))
    tokens = torch.randint(0, 160, (16,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref, got = hf(tokens[None]).logits[0], run_logits(loaded.model, tokens)
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)
