"""Instructions per weight in the main loop of the quantized GEMM, compiled offline for a GPU
architecture (no GPU needed): the measured cause behind kernel_perf's W4A16 misses.

Triton compiles `_qlinear_kernel` for the given format and tile config down to SASS (with the
ptxas and nvdisasm that ship in Triton's wheel); the longest backward branch is the K loop.
Pointers and strides are marked 16-byte aligned, as at run time, so loads vectorise.

    python bench/kernel_sass.py --format w4a16-g128 --tile 64,16,256,4,3
    python bench/kernel_sass.py --format w4a8 --prequant --tile 64,16,256,4,3
    python bench/kernel_sass.py --fragment 128,128,8,4 --group 128   # w4_fragment.py's kernel
    python bench/kernel_sass.py --act-quant silu_mul,int8,14336      # act_quant.py's row kernel

Results depend on the Triton version (the GPU image runs 3.6: `pip install triton==3.6.0
--target DIR` and put DIR first on PYTHONPATH to match it).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from specquant.kernels.triton_ops import qlinear as Q
from specquant.quant.spec import get_format

ALIGNED = ("x_ptr", "xs_ptr", "w_ptr", "s_ptr", "z_ptr", "cs_ptr", "b_ptr", "out_ptr", "ws_ptr",
           "lock_ptr", "N", "K", "K_SPLIT", "stride_xm", "stride_wn", "stride_om")  # fmt: skip


def compile_sass(fmt: str, tile: Q.TileConfig, split_k: int, arch: int) -> tuple[str, str, str]:
    """(SASS, TTGIR, resource usage) of the kernel for format `fmt`, activations in bf16 or
    pre-quantized."""
    spec = get_format(fmt)
    act = {"none": 0, "int8": 1, "fp8": 2}[spec.activations]
    w4 = spec.weight_bits == 4 and spec.weight_type == "int"
    x_type = {0: "*bf16", 1: "*i8", 2: "*fp8e4nv"}[act]
    w_type = "*u8" if w4 else ("*i8" if spec.weight_type == "int" else "*fp8e4nv")
    sig = {"x_ptr": x_type, "xs_ptr": "*fp32", "w_ptr": w_type, "s_ptr": "*fp32",
           "z_ptr": "*u8", "cs_ptr": "*fp32", "b_ptr": "*bf16", "out_ptr": "*bf16",
           "ws_ptr": "*fp32", "lock_ptr": "*i32"}  # fmt: skip
    sig.update({n: "i32" for n in ("M", "N", "K", "G", "K_SPLIT", "stride_xm", "stride_wn",
                                   "stride_om")})  # fmt: skip
    group = 0 if spec.group_size == -1 else spec.group_size
    block_k = Q.block_k_for(tile, group)
    consts = dict(W4=w4, ACT=act, GROUP=group, ASYM=not spec.symmetric,
                  TWO_LEVEL=spec.two_level, HAS_BIAS=False, FAST_UNPACK=True, DOT_F32=False,
                  SPLIT_K=split_k, EVEN_K=True, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
                  BLOCK_K=block_k)  # fmt: skip
    sig.update({name: "constexpr" for name in consts})
    fn = Q._qlinear_kernel
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in ALIGNED}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    opts = dict(num_warps=tile.num_warps, num_stages=tile.num_stages)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=opts)
    return _disassemble(kernel.asm["cubin"]), kernel.asm["ttgir"], _resources(kernel.asm["cubin"])


def compile_fragment_sass(
    bn: int, bk: int, bm: int, warps: int, group: int, arch: int, warps_m: int = 1,
    stages: int = 1, split_k: int = 1, pdl: bool = False, group_major: bool = True,
    prefetch: int = 0,
) -> tuple[str, str]:  # fmt: skip
    """(SASS, resource usage) of the fragment-order W4A16 kernel (w4_fragment.py); with
    `pdl`, also where it waits for the kernel before (programmatic dependent launch); scales
    in group-major memory as the layers keep them, or row-major unless `group_major`."""
    from specquant.kernels.triton_ops import w4_fragment as F

    lay = F.layouts(bn, bk, bm, warps, warps_m)
    consts = dict(GROUP=group, HAS_BIAS=False, SPLIT_K=split_k, BN=bn, BK=bk, BM=bm,
                  WARPS=warps, WARPS_M=warps_m, STAGES=stages, WORDS=lay.words,
                  WORDS_MMA=lay.words_mma, XL=lay.x, PDL=pdl, PREFETCH=prefetch,
                  WORDS32=lay.words32)  # fmt: skip
    return _compile_w4_gluon(F._w4_fragment_kernel, consts, warps * warps_m, arch, pdl=pdl,
                             group_major=group_major)  # fmt: skip


def compile_wgmma_sass(
    bn: int, bk: int, bm: int, warps: int, group: int, arch: int, stages: int = 3,
    w_ring: bool = False, overlap: bool = False, x_perm: bool = False, maxnreg: int = 0,
    split_k: int = 1, group_major: bool = True,
) -> tuple[str, str]:  # fmt: skip
    """(SASS, resource usage) of the wgmma W4A16 kernel (w4_wgmma.py); scales as in
    compile_fragment_sass."""
    from specquant.kernels.triton_ops import w4_fragment as F
    from specquant.kernels.triton_ops import w4_wgmma as W

    lay = F.layouts(bn, bk, bm, warps)
    consts = dict(GROUP=group, HAS_BIAS=False, SPLIT_K=split_k, BN=bn, BK=bk, BM=bm,
                  WARPS=warps, STAGES=stages, W_RING=w_ring, OVERLAP=overlap, X_PERM=x_perm,
                  WORDS=lay.words, WORDS_MMA=lay.words_mma)  # fmt: skip
    return _compile_w4_gluon(W._w4_wgmma_kernel, consts, warps, arch, maxnreg,
                             group_major=group_major)  # fmt: skip


def compile_ws_sass(
    bn: int, bk: int, bm: int, warps: int, group: int, arch: int, stages: int = 4,
    maxnreg: int = 0, split_k: int = 1, w4a8: bool = False, async_mma: bool = False,
) -> tuple[str, str]:  # fmt: skip
    """(SASS, resource usage) of the warp-specialized wgmma W4A16 kernel (w4_wgmma_ws.py):
    its TMA descriptors as the launcher builds them, group-major scales; with `w4a8`, its
    W4A8 twin (w4a8_wgmma_ws.py; `group` > 0: two-level scales)."""
    from specquant.kernels.triton_ops import w4_fragment as F
    from specquant.kernels.triton_ops import w4_wgmma_ws as WS

    if w4a8:
        from specquant.kernels.triton_ops import w4a8_wgmma as Q
        from specquant.kernels.triton_ops import w4a8_wgmma_ws as QW

        lay8 = Q.layouts(bn, bk, warps)
        pointers = {"x_desc": f"tensordesc<i8[{bm}, {bk}],{QW.X_LAYOUT!r}>",
                    "w_desc": f"tensordesc<i8[{bn // 16}, {bk // 32}, 256],{QW.W_LAYOUT!r}>",
                    "xs_ptr": "*fp32", "s_ptr": "*i8" if group else "*fp32", "cs_ptr": "*fp32",
                    "b_ptr": "*bf16", "out_ptr": "*bf16", "ws_ptr": "*fp32",
                    "lock_ptr": "*i32"}  # fmt: skip
        consts = dict(GROUP=group, HAS_BIAS=False, SPLIT_K=split_k, BN=bn, BK=bk, BM=bm,
                      WARPS=warps, STAGES=stages, BYTES=lay8.bytes,
                      BYTES_MMA=lay8.bytes_mma)  # fmt: skip
        return _compile_w4_gluon(QW._w4a8_wgmma_ws_kernel, consts, warps, arch, maxnreg,
                                 pointers=pointers)  # fmt: skip

    lay = F.layouts(bn, bk, bm, warps)
    descs = {"x_desc": f"tensordesc<bf16[{bm}, {bk}],{WS.X_LAYOUT!r}>",
             "w_desc": f"tensordesc<i16[{bn // 16}, {bk // 64}, 256],{WS.W_LAYOUT!r}>"}  # fmt: skip
    pointers = {**descs, "s_ptr": "*fp32", "b_ptr": "*bf16", "out_ptr": "*bf16",
                "ws_ptr": "*fp32", "lock_ptr": "*i32"}  # fmt: skip
    consts = dict(GROUP=group, HAS_BIAS=False, SPLIT_K=split_k, BN=bn, BK=bk, BM=bm,
                  WARPS=warps, STAGES=stages, WORDS=lay.words,
                  WORDS_MMA=lay.words_mma, ASYNC=async_mma)  # fmt: skip
    return _compile_w4_gluon(WS._w4_wgmma_ws_kernel, consts, warps, arch, maxnreg,
                             pointers=pointers, group_major=True)  # fmt: skip


def compile_w4a8_wgmma_sass(
    bn: int,
    bk: int,
    bm: int,
    warps: int,
    stages: int,
    arch: int,
    split_k: int = 1,
    group: int = 0,
) -> tuple[str, str]:
    """(SASS, resource usage) of the W4A8 wgmma kernel (w4a8_wgmma.py); `group` > 0: its
    two-level scales."""
    from specquant.kernels.triton_ops import w4a8_wgmma as Q

    lay = Q.layouts(bn, bk, warps)
    pointers = {"x_ptr": "*i8", "xs_ptr": "*fp32", "w_ptr": "*i8",
                "s_ptr": "*i8" if group else "*fp32", "cs_ptr": "*fp32", "b_ptr": "*bf16",
                "out_ptr": "*bf16", "ws_ptr": "*fp32", "lock_ptr": "*i32"}  # fmt: skip
    consts = dict(GROUP=group, HAS_BIAS=False, SPLIT_K=split_k, BN=bn, BK=bk, BM=bm,
                  WARPS=warps, STAGES=stages, BYTES=lay.bytes,
                  BYTES_MMA=lay.bytes_mma)  # fmt: skip
    return _compile_w4_gluon(Q._w4a8_wgmma_kernel, consts, warps, arch, pointers=pointers)


# the pointer arguments of the W4A16 Gluon kernels (fragment and wgmma), bf16 activations
W4A16_POINTERS = {"x_ptr": "*bf16", "w_ptr": "*i16", "s_ptr": "*fp32", "b_ptr": "*bf16",
                  "out_ptr": "*bf16", "ws_ptr": "*fp32", "lock_ptr": "*i32"}  # fmt: skip


def _compile_w4_gluon(
    fn: Any, consts: dict[str, Any], warps: int, arch: int, maxnreg: int = 0, pdl: bool = False,
    pointers: dict[str, str] | None = None, group_major: bool = False,
) -> tuple[str, str]:  # fmt: skip
    """(SASS, resource usage) of a fragment-order Gluon kernel: its `pointers` (default the
    W4A16 kernels'), then the integer arguments all of them share; pointers and K-side sizes
    16-aligned."""
    from triton.experimental.gluon._runtime import GluonASTSource

    sig = dict(pointers or W4A16_POINTERS)
    # W4A16 kernels take the scales' strides: row-major [N, G] has (G, 1), group-major
    # memory (1, N), and Triton specializes the 1 to a constant as at run time; W4A8 takes
    # its group count
    w4a16 = "stride_sn" in fn.arg_names
    scales = ("stride_sg",) if group_major else ("stride_sn",)
    if w4a16:
        consts = {**consts, ("stride_sn" if group_major else "stride_sg"): 1}
    else:
        scales = ("G",)
    ints = [a for a in ("M", "N", "K", *scales, "K_SPLIT", "stride_xm", "stride_om")
            if a in fn.arg_names]  # fmt: skip
    sig.update({a: "i32" for a in ints})
    sig.update({a: "constexpr" for a in consts})
    aligned = [a for a in sig if a.endswith("_ptr")] + [
        a for a in ("N", "K", "K_SPLIT", "stride_xm", "stride_om") if a in sig
    ]
    aligned += ["stride_sg"] if group_major and w4a16 else []  # N, a multiple of 16
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    src = GluonASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    options = {"num_warps": warps, **({"maxnreg": maxnreg} if maxnreg else {})}
    if pdl:
        options["launch_pdl"] = True
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    res = f"{_resources(kernel.asm['cubin'])} dynamic shared {kernel.metadata.shared} bytes"
    if pdl:
        res += "\n" + _gdc_order(kernel.asm["ptx"])
    return _disassemble(kernel.asm["cubin"]), res


ROW_PRE = {"none": 0, "norm": 1, "silu_mul": 2}


def compile_row_sass(
    pre: str, kind: str, k: int, arch: int, pdl: bool = False
) -> tuple[str, str, int]:
    """(SASS, resource usage, values per thread) of act_quant's row kernel for contiguous
    rows of k values, launched as `_launch` would (row_config's block and warps), with the
    integer arguments specialized as Triton does at run time: 1 becomes a constant, a
    multiple of 16 is noted as such. With `pdl`, the kernel lets the one after it launch
    (launch_dependents), and the resource line says where."""
    from specquant.kernels.triton_ops import act_quant as A

    block, warps = A.row_config(k)
    code = {"int8": "*i8", "fp8": "*fp8e4nv", "none": "*bf16"}[kind]
    sig = {"x_ptr": "*bf16", "w_ptr": "*bf16", "codes_ptr": code, "scales_ptr": "*fp32",
           "eps": "fp32"}  # fmt: skip
    consts: dict[str, Any] = dict(PRE=ROW_PRE[pre], QUANT=kind != "none", FP8=kind == "fp8",
                                  MMA_ORDER=False, BLOCK=block, RINT=True, FAST_DIV=True,
                                  LAUNCH_DEPENDENTS=pdl)  # fmt: skip
    aligned = ["x_ptr", "w_ptr", "codes_ptr", "scales_ptr"]
    ints = {"K": k, "stride_xm": 2 * k if pre == "silu_mul" else k, "stride_cm": k}
    for name, value in ints.items():
        if value == 1:
            consts[name] = 1
        else:
            sig[name] = "i32"
            aligned += [name] if value % 16 == 0 else []
    sig.update({name: "constexpr" for name in consts})
    fn = A._row_kernel
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
    cubin = kernel.asm["cubin"]
    res = _resources(cubin)
    if pdl:
        head, _, _ = kernel.asm["ptx"].partition("griddepcontrol.launch_dependents")
        loads = len(re.findall(r"\bld\.global", head))
        res += (f"\ngriddepcontrol: {kernel.asm['ptx'].count('griddepcontrol.launch_dependents')}"
                f" launch_dependents, {loads} global loads before it")  # fmt: skip
    return _disassemble(cubin), res, block // (32 * warps) or 1


def _print_row(pre: str, kind: str, k: int, arch: int, pdl: bool = False) -> None:
    sass, res, per_thread = compile_row_sass(pre, kind, k, arch, pdl)
    ops = opcodes(sass.splitlines(), modifiers=True)
    total = sum(ops.values())
    print(f"triton {triton.__version__}, sm_{arch}, row kernel {pre} -> {kind}, K={k}: "
          f"{total} instructions per thread, {per_thread} values per thread, "
          f"{total / per_thread:.1f} instructions per value")  # fmt: skip
    loads = {op: n for op, n in ops.items() if op.startswith(("LDG", "STG"))}
    print("loads and stores:", ", ".join(f"{op} {n}" for op, n in sorted(loads.items())))
    rounds = {op: n for op, n in ops.items() if op.startswith("FRND")}
    print("roundings:", ", ".join(f"{op} {n}" for op, n in sorted(rounds.items())) or "none")
    print(", ".join(f"{op} {n}" for op, n in ops.most_common(12)))
    print(res)


def _gdc_order(ptx: str) -> str:
    """Where the kernel waits for the one before (PTX): the grid-dependency instructions and
    the shared-memory copies issued ahead of the wait."""
    head, _, _ = ptx.partition("griddepcontrol.wait")
    other = len(re.findall(r"\b(?:ld\.global|st\.global|atom\.|red\.)", head))
    return (f"griddepcontrol: {ptx.count('griddepcontrol.wait')} wait, "
            f"{ptx.count('griddepcontrol.launch_dependents')} launch_dependents, "
            f"{head.count('cp.async.cg') + head.count('cp.async.ca')} cp.async before the wait, "
            f"{other} other global loads, stores or atomics before it")  # fmt: skip


def _resources(cubin: bytes) -> str:
    """cuobjdump's register / stack / local-memory line (spills show as STACK or LOCAL)."""
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([str(cuobjdump), "-res-usage", str(path)], capture_output=True,
                             text=True)  # fmt: skip
    return next((ln.strip() for ln in out.stdout.splitlines() if "REG:" in ln), out.stdout)


def _disassemble(cubin: bytes) -> str:
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([str(nvdisasm), "-c", str(path)], capture_output=True, text=True)
    return out.stdout


def _loops(sass: str) -> list[list[str]]:
    """Every loop's SASS lines: a label through the backward branch to it."""
    lines = sass.splitlines()
    labels = {
        m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", line))
    }
    spans = []
    for i, line in enumerate(lines):
        m = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if m and labels.get(m.group(1), i) < i:
            spans.append(lines[labels[m.group(1)] : i + 1])
    return spans


def loop_histogram(sass: str) -> collections.Counter[str]:
    """Opcode counts of the longest loop (label ... backward branch to it)."""
    spans = _loops(sass)
    if not spans:
        raise RuntimeError("no loop found in the SASS")
    return opcodes(max(spans, key=len))


def loop_with(sass: str, opcode: str) -> list[str]:
    """The innermost loop (label ... backward branch to it) holding `opcode`: in a
    warp-specialized kernel the longest loop is the partitions' dispatch, not a K loop."""
    spans = [s for s in _loops(sass) if any(re.search(rf"\b{opcode}\b", x) for x in s)]
    if not spans:
        raise RuntimeError(f"no loop holding {opcode} in the SASS")
    return min(spans, key=len)


def opcodes(lines: list[str], modifiers: bool = False) -> collections.Counter[str]:
    """How often each opcode occurs in these SASS lines (predicates dropped); with
    `modifiers`, as written (LDG.E.128, not LDG)."""
    op = r"[A-Z][\w.]+" if modifiers else r"[A-Z][A-Z0-9_]*"
    found = (re.search(rf"\*/\s+(?:@!?U?P\w+\s+)?({op})", line) for line in lines)
    return collections.Counter(m.group(1) for m in found if m)


def fix_up(sass: str) -> tuple[str, collections.Counter[str] | None]:
    """The split-K fix-up's SASS (between the arrival's atomic add and the counter's reset;
    "" without one) and its loop's opcode counts (None where it is unrolled into no loop)."""
    start, end = sass.find("ATOMG.E.ADD"), sass.find("ATOMG.E.EXCH")
    if start < 0 or end < 0:
        return "", None
    region = sass[start:end]
    try:
        return region, loop_histogram(region)
    except RuntimeError:  # unrolled
        return region, None


def fix_up_loads(sass: str) -> tuple[int, int]:
    """(loads of partial sums per trip of the split-K fix-up's loop, trips' loop count): each
    trip of its loop waits for one L2 round trip, so more loads per trip means fewer round
    trips. (0, 0) without a split-K fix-up; (all its loads, 0) where it is unrolled."""
    region, body = fix_up(sass)
    if body is None:
        return len(re.findall(r"\bLDG\.E\S*\.STRONG\.GPU\b", region)), 0
    return body["LDG"], 1


def loop_spills(sass: str) -> tuple[int, int]:
    """Local-memory accesses (STL / LDL) in the K loop and in the split-K fix-up's loop:
    where a spill costs every trip. Values kept on the stack across the loops (stored
    before, reloaded after) show in the resource line's STACK but not here."""
    ops = loop_histogram(sass)
    region, body = fix_up(sass)
    if body is None:  # unrolled: every access runs once per split
        in_fix = len(re.findall(r"\b(?:STL|LDL)\b", region))
    else:
        in_fix = body["STL"] + body["LDL"]
    return ops["STL"] + ops["LDL"], in_fix


def _print_per_weight(ops: collections.Counter[str], what: str, weights: int, threads: int,
                      arch: int) -> None:  # fmt: skip
    """A K loop's instruction count per weight, and its opcodes."""
    total, per_thread = sum(ops.values()), weights / threads
    print(f"triton {triton.__version__}, sm_{arch}, {what}: {total} instructions per K step, "
          f"{per_thread:.0f} weights per thread, {total / per_thread:.2f} instructions per "
          "weight")  # fmt: skip
    print(", ".join(f"{op} {n}" for op, n in ops.most_common()))


def _print_w4(sass: str, res: str, what: str, weights: int, threads: int, arch: int) -> None:
    """The K loop's instruction count per weight, its opcodes, the split-K fix-up's loads
    per L2 round trip, local-memory accesses in the loops, and the resource line."""
    _print_per_weight(loop_histogram(sass), what, weights, threads, arch)
    per_trip, looped = fix_up_loads(sass)
    if per_trip:
        how = "per trip of its loop" if looped else "unrolled, all at once"
        print(f"split-K fix-up: {per_trip} loads of partial sums {how}")
    in_k, in_fix = loop_spills(sass)
    print(f"local memory: {in_k} accesses in the K loop, {in_fix} in the split-K fix-up loop")
    print(res)


def _print_ws(sass: str, res: str, what: str, weights: int, threads: int, arch: int) -> None:
    """The consumer's K loop (the loop holding the wgmmas: HGMMA for W4A16, IGMMA for W4A8)
    per weight, its waits, barriers and local-memory accesses, and the producer's TMA copies
    per K tile."""
    loop = loop_with(sass, "HGMMA" if "HGMMA" in sass else "IGMMA")
    ops = opcodes(loop)
    _print_per_weight(ops, what, weights, threads, arch)
    named = sum(1 for x in loop if re.search(r"BAR\.SYNC\S* 0x0, 0x", x))
    waits = sum(1 for x in loop if "WARPGROUP.DEPBAR" in x)
    # LE 0x1: the wait lets the newest wgmma run on (async_mma)
    running = sum(1 for x in loop if "WARPGROUP.DEPBAR.LE gsb0, 0x1" in x)
    print(f"consumer loop: wgmma {ops['HGMMA'] + ops['IGMMA']}, WARPGROUP.DEPBAR {waits} "
          f"({running} leaving one running), CTA-wide BAR.SYNC {ops['BAR'] - named}, local "
          f"memory {ops['LDL'] + ops['STL']} accesses")  # fmt: skip
    producer = opcodes(loop_with(sass, "UTMALDG"))
    print(f"producer loop: UTMALDG {producer['UTMALDG']}")
    print(res)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--format", default="w4a16-g128")
    ap.add_argument("--tile", default="64,16,256,4,3", help="BLOCK_N,BLOCK_M,BLOCK_K,warps,stages")
    ap.add_argument("--split-k", type=int, default=None, help="K splits (default 2 for the "
                    "canonical kernel, 1 for --fragment / --wgmma, whose split-K epilogue is "
                    "compiled only when > 1)")  # fmt: skip
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (Hopper)")
    ap.add_argument("--ttgir", type=Path, default=None, help="also write the TTGIR here")
    ap.add_argument("--fragment", default=None, help="BLOCK_N,BLOCK_K,BLOCK_M,warps[,warps_m"
                    "[,stages[,prefetch 0/1]]]: count the fragment-order W4A16 kernel "
                    "instead")  # fmt: skip
    ap.add_argument("--wgmma", default=None, help="BLOCK_N,BLOCK_K,BLOCK_M,warps[,stages"
                    "[,w_ring 0/1[,overlap 0/1[,x_perm 0/1[,maxnreg]]]]]: count the wgmma W4A16 "
                    "kernel instead")  # fmt: skip
    ap.add_argument("--ring-read", default=None, help="BLOCK_N,BLOCK_K,BLOCK_M,warps,stages: "
                    "count bench/ring_read.py's kernel (the fragment kernel's copies and ring "
                    "without its math) instead")  # fmt: skip
    ap.add_argument("--ws", default=None, help="BLOCK_N,BLOCK_K,BLOCK_M,warps[,stages"
                    "[,maxnreg[,async 0/1]]]: count the warp-specialized wgmma W4A16 kernel's "
                    "consumer loop instead (group-major scales)")  # fmt: skip
    ap.add_argument(
        "--a8",
        action="store_true",
        help="with --ws: the W4A8 twin "
        "(w4a8_wgmma_ws.py; --group 128: two-level scales, default per channel)",
    )
    ap.add_argument("--w4a8-wgmma", default=None, help="BLOCK_N,BLOCK_K,BLOCK_M,warps,stages: "
                    "count the W4A8 wgmma kernel instead")  # fmt: skip
    ap.add_argument("--act-quant", default=None, help="PRE,KIND,K: count act_quant's row "
                    "kernel instead (PRE none/norm/silu_mul, KIND int8/fp8/none)")  # fmt: skip
    ap.add_argument("--pdl", action="store_true", help="with --fragment: programmatic "
                    "dependent launch (where the kernel waits for the one before); with "
                    "--act-quant: where it lets the one after it launch")  # fmt: skip
    ap.add_argument("--row-major", action="store_true", help="with --fragment / --wgmma: "
                    "scales in row-major [N, G] memory (strides (G, 1)), as a caller of "
                    "fragment_linear / wgmma_linear may pass them; by default group-major "
                    "(strides (1, N)), as the layers keep them")  # fmt: skip
    ap.add_argument("--group", type=int, default=None, help="with --fragment / --wgmma (default "
                    "128) or --w4a8-wgmma (default 0): 0 = per channel")  # fmt: skip
    args = ap.parse_args()
    if args.act_quant:
        pre, kind, k = args.act_quant.split(",")
        _print_row(pre, kind, int(k), args.arch, args.pdl)
        return
    if args.split_k is None:
        args.split_k = 1 if args.fragment or args.wgmma or args.w4a8_wgmma or args.ws else 2
    if args.group is None:
        args.group = 0 if args.w4a8_wgmma or args.a8 else 128
    if args.w4a8_wgmma:
        bn, bk, bm, warps, stages = [int(v) for v in args.w4a8_wgmma.split(",")]
        sass, res = compile_w4a8_wgmma_sass(bn, bk, bm, warps, stages, args.arch, args.split_k,
                                            args.group)  # fmt: skip
        _print_w4(sass, res, f"W4A8 wgmma group {args.group}, tile {args.w4a8_wgmma}",
                  bn * bk, 32 * warps, args.arch)  # fmt: skip
        ops = loop_histogram(sass)
        print(f"IGMMA {ops['IGMMA']}")
        return
    if args.ws:
        given = [int(v) for v in args.ws.split(",")]
        bn, bk, bm, warps, stages, maxnreg, async_mma = (given + [4, 0, 0][len(given) - 4 :])[:7]
        sass, res = compile_ws_sass(bn, bk, bm, warps, args.group, args.arch, stages, maxnreg,
                                    args.split_k, args.a8, bool(async_mma))  # fmt: skip
        what = "W4A8" if args.a8 else "W4A16"
        # async_mma's loop takes two K tiles a turn
        _print_ws(sass, res, f"warp-specialized wgmma {what} group {args.group}, tile {args.ws}",
                  bn * bk * (2 if async_mma else 1), 32 * warps, args.arch)  # fmt: skip
        return
    if args.wgmma:
        given = [int(v) for v in args.wgmma.split(",")]
        fields = given + [3, 0, 0, 0, 0][len(given) - 4 :]
        bn, bk, bm, warps, stages, ring, overlap, x_perm, maxnreg = fields
        sass, res = compile_wgmma_sass(bn, bk, bm, warps, args.group, args.arch, stages,
                                       bool(ring), bool(overlap), bool(x_perm),
                                       maxnreg, args.split_k, not args.row_major)  # fmt: skip
        tiles = 2 if overlap else 1  # the overlapping loop is unrolled by two K tiles
        gm = ", row-major scales" if args.row_major else ""
        _print_w4(sass, res, f"wgmma W4A16 group {args.group}{gm}, tile {args.wgmma}",
                  bn * bk * tiles, 32 * warps, args.arch)  # fmt: skip
        ops = loop_histogram(sass)
        ahead = len(re.findall(r"WARPGROUP\.DEPBAR\.LE gsb0, 0x1\b", sass))  # one left running
        print(f"HGMMA {ops['HGMMA']}, WARPGROUP.DEPBAR {sass.count('WARPGROUP.DEPBAR')} in all, "
              f"{ahead} leaving one wgmma group in flight")  # fmt: skip
        return
    if args.ring_read:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from ring_read import _ring_read_kernel
        from specquant.kernels.triton_ops import w4_fragment as F

        bn, bk, bm, warps, stages = (int(v) for v in args.ring_read.split(","))
        lay = F.layouts(bn, bk, bm, warps)
        consts = dict(BN=bn, BK=bk, BM=bm, STAGES=stages, WORDS=lay.words, XL=lay.x)
        pointers = {"x_ptr": "*bf16", "w_ptr": "*i16", "out_ptr": "*i32"}
        sass, res = _compile_w4_gluon(_ring_read_kernel, consts, warps, args.arch,
                                      pointers=pointers)  # fmt: skip
        _print_w4(sass, res, f"ring read, tile {args.ring_read}", bn * bk, 32 * warps, args.arch)
        return
    if args.fragment:
        given = [int(v) for v in args.fragment.split(",")]
        bn, bk, bm, warps, warps_m, stages, prefetch = given + [0, 0, 0, 0, 1, 1, 0][len(given) :]
        sass, res = compile_fragment_sass(bn, bk, bm, warps, args.group, args.arch, warps_m,
                                          stages, args.split_k, args.pdl, not args.row_major,
                                          prefetch)  # fmt: skip
        gm = ", row-major scales" if args.row_major else ""
        _print_w4(sass, res, f"fragment W4A16 group {args.group}{gm}, tile {args.fragment}",
                  bn * bk, 32 * warps, args.arch)  # fmt: skip
        return
    tile = Q.TileConfig(*(int(v) for v in args.tile.split(",")))
    sass, ttgir, res = compile_sass(args.format, tile, args.split_k, args.arch)
    if args.ttgir:
        args.ttgir.write_text(ttgir)
    ops = loop_histogram(sass)
    spec = get_format(args.format)
    block_k = Q.block_k_for(tile, 0 if spec.group_size == -1 else spec.group_size)
    per_thread = tile.block_n * block_k / (32 * tile.num_warps)
    total = sum(ops.values())
    print(f"triton {triton.__version__}, sm_{args.arch}, {args.format}, tile {args.tile}: "
          f"{total} instructions per K step, {per_thread:.0f} weights per thread, "
          f"{total / per_thread:.2f} instructions per weight")  # fmt: skip
    print(", ".join(f"{op} {n}" for op, n in ops.most_common()))
    print(res)


if __name__ == "__main__":
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    main()
