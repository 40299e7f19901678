"""The W4A8 wgmma kernel (w4a8_wgmma.py) on one H100/H200: checked against the exact
integer reference, then timed on the Llama-3 8B/70B linears next to what runs today.

Per layer and token count: W4A8 per channel on the canonical Triton kernel given
pre-quantized activations (`w4a8:gemm`, as the fused RMSNorm hands them over), the W4A8
wgmma kernel with each candidate config on the same activations, and W4A16 per channel as
the model runs it (fragment / wgmma kernels, x in mma order). The kernel_perf goal "W4A8
faster than W4A16 at M >= 32" asks whether the wgmma rows beat the W4A16 ones.

    python bench/w4a8_probe.py --out bench/results     # STAGE=w4a8 bench/gpu_kernels.sh
    python bench/w4a8_probe.py --ws --formats w4a8,w4a8-g128 --ms 16,32,64,128

With --ws the candidates are the warp-specialized twin's (w4a8_wgmma_ws.py) next to the
synchronous configs that W4A8_CONFIGS picks, in the same run; both are checked first.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import astuple
from pathlib import Path
from typing import Any

import torch

from common import gpu_run_meta, gpu_run_text, write_report
from kernel_perf import SHAPES, ours, time_graph
from specquant.kernels.reference import qlinear_reference, quantize_per_token
from specquant.kernels.triton_ops import w4_wgmma_ws as WS
from specquant.kernels.triton_ops import w4a8_wgmma as Q
from specquant.quant.rtn import quantize_rtn
from specquant.quant.spec import get_format

_C = Q.W4A8WgmmaConfig
CANDIDATES = [_C(128, 128, 8, 3), _C(128, 128, 8, 4), _C(64, 128, 4, 4), _C(128, 128, 4, 3),
              _C(256, 128, 16, 3), _C(128, 256, 8, 3)]  # fmt: skip
# --ws: the twin's configs (WsConfig: BLOCK_N, BLOCK_K, consumer warps, stages, split waves,
# maxnreg; two 8-warp CTAs per SM at 128 registers, as W4A16's won), then the synchronous
# configs W4A8_CONFIGS holds, to compare in one run
_W = WS.WsConfig
WS_CANDIDATES = [_W(64, 128, 4, 4, 1, 128), _W(128, 128, 4, 4, 1, 128), _W(64, 256, 4, 3, 1, 128),
                 _W(128, 256, 4, 3, 1, 128), _W(64, 128, 4, 4, 2, 80), _C(64, 128, 4, 4),
                 _C(128, 128, 8, 4), _C(128, 128, 4, 3), _C(128, 256, 8, 3)]  # fmt: skip
MS = (1, 16, 32, 64, 128)


def check(candidates: list[Any] = CANDIDATES) -> list[dict[str, Any]]:
    """Relative error against qlinear_reference (exact integer sums) on odd token counts."""
    spec = get_format("w4a8")
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n, k in [(256, 512), (4096, 4096)]:
        t = {a: v.cuda() for a, v in quantize_rtn(torch.randn(n, k, generator=gen), spec).items()}
        frag = Q.prepare_fragments_i8(t["qweight"])
        for m in (1, 9, 20, 32, 33, 64, 100):
            qa = quantize_per_token(torch.randn(m, k, generator=gen).cuda().bfloat16(), "int8")
            want = qlinear_reference(qa, t, None, spec).float()
            for cfg in candidates:
                if n % cfg.block_n or k % cfg.block_k:
                    continue
                y = Q.w4a8_wgmma_linear(qa.codes, qa.scales, frag, t["scales"], None,
                                        torch.bfloat16, cfg).float()  # fmt: skip
                err = float((y - want).norm() / want.norm())
                rows.append(dict(n=n, k=k, m=m, config=list(astuple(cfg)), rel_err=err))
    return rows


# each W4A8 format and the W4A16 format it is compared with
TWIN = {"w4a8": "w4a16", "w4a8-g128": "w4a16-g128"}


def timings(
    deadline: float,
    formats: list[str],
    models: list[str],
    ms: tuple[int, ...] = MS,
    candidates: list[Any] = CANDIDATES,
) -> list[dict[str, Any]]:
    gen = torch.Generator(device="cuda").manual_seed(1)
    rows = []
    for fmt, model in ((f, mo) for f in formats for mo in models):
        spec = get_format(fmt)
        group = 0 if spec.group_size == -1 else spec.group_size
        for layer, (k, n) in SHAPES[model].items():
            canonical, copies, _ = ours(fmt, n, k, gen, gemm_only=True)
            w4a16, copies16, _ = ours(TWIN[fmt], n, k, gen)
            tensors = [quantize_rtn(torch.randn(n, k, device="cuda", generator=gen) * 0.02,
                                    spec) for _ in range(copies)]  # fmt: skip
            frags = [Q.prepare_fragments_i8(t["qweight"]) for t in tensors]
            for m in ms:
                if time.time() > deadline:
                    return rows
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                qa = quantize_per_token(x, "int8")
                base = dict(fmt=fmt, model=model, layer=layer, n=n, k=k, m=m)
                rows.append(dict(base, kernel="w4a8:gemm", us=time_graph(canonical(x), copies)))
                rows.append(dict(base, kernel="w4a16", us=time_graph(w4a16(x), copies16)))
                for cfg in candidates:

                    def run(i: int, cfg=cfg, qa=qa, fr=frags, ts=tensors, g=group) -> Any:
                        return Q.w4a8_wgmma_linear(qa.codes, qa.scales, fr[i], ts[i]["scales"],
                                                   None, torch.bfloat16, cfg, None, g,
                                                   ts[i].get("channel_scales"))  # fmt: skip

                    kind = "w4a8-wgmma" if isinstance(cfg, _C) else "w4a8-wgmma-ws"
                    row = dict(base, kernel=kind, config=list(astuple(cfg)))
                    try:
                        row["us"] = time_graph(run, copies)
                    except Exception as e:  # a config that does not fit (shared memory)
                        row["error"] = repr(e)[:300]
                    rows.append(row)
            print(f"timed {fmt} {model} {layer}", flush=True)
    return rows


def markdown(meta: dict[str, Any], checks: list[dict[str, Any]], rows: list[dict[str, Any]]):
    worst = max((r["rel_err"] for r in checks), default=float("nan"))
    failed = [r for r in checks if "error" in r or not r["rel_err"] < 4e-3]
    checked = (
        f"Checks against the integer reference: {len(checks)} cases, worst relative "
        f"error {worst:.1e}{f'; **{len(failed)} FAILED**' if failed else ''}."
        if checks
        else "Not checked here (--no-check): the cuda-marked tests cover it."
    )
    md = ["# W4A8 wgmma kernel: checks and timings", "", gpu_run_text(meta, "w4a8"), "",
          checked, "",
          "Microseconds summed over a decoder layer's four linears (median of CUDA-graph "
          "replays, weights rotated through HBM). W4A8 rows take pre-quantized activations; "
          "wgmma configs: [BLOCK_N, BLOCK_K, warps, stages, split waves]; `ws`: the "
          "warp-specialized twin's, [BLOCK_N, BLOCK_K, consumer warps, stages, split waves, "
          "maxnreg].", "",
          "| format | model | M | canonical (:gemm) | W4A16 twin | wgmma best per layer | "
          "best single config |",
          "|---|---|---|---|---|---|---|"]  # fmt: skip
    for fmt, model in dict.fromkeys((r.get("fmt", "w4a8"), r["model"]) for r in rows):
        for m in sorted({r["m"] for r in rows}):
            here = [r for r in rows if r.get("fmt", "w4a8") == fmt and r["model"] == model
                    and r["m"] == m and "us" in r]  # fmt: skip
            layers = {r["layer"] for r in here}
            if len(layers) < len(SHAPES[model]):
                continue  # the budget ran out inside this model
            total = {kind: sum(r["us"] for r in here if r["kernel"] == kind)
                     for kind in ("w4a8:gemm", "w4a16")}  # fmt: skip
            wg = [r for r in here if r["kernel"].startswith("w4a8-wgmma")]
            if {r["layer"] for r in wg} != layers:  # every config failed on some layer
                best = float("nan")
            else:
                best = sum(min(r["us"] for r in wg if r["layer"] == la) for la in layers)
            per_cfg: dict[str, list[float]] = {}
            for r in wg:
                name = str(r["config"]) + (" ws" if r["kernel"].endswith("-ws") else "")
                per_cfg.setdefault(name, []).append(r["us"])
            whole = [(sum(v), c) for c, v in per_cfg.items() if len(v) == len(layers)]
            single = f"{min(whole)[0]:.1f} {min(whole)[1]}" if whole else "none ran on all"
            md.append(f"| {fmt} | {model} | {m} | {total['w4a8:gemm']:.1f} | "
                      f"{total['w4a16']:.1f} | {best:.1f} | {single} |")  # fmt: skip
    skipped = [mo for mo in SHAPES if not any(r["model"] == mo for r in rows)]
    if skipped:
        md += ["", f"Not timed (the time budget ran out first): {', '.join(skipped)}."]
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--formats", default="w4a8", help=f"comma-separated, of {', '.join(TWIN)}")
    ap.add_argument("--models", default=",".join(SHAPES))
    ap.add_argument("--budget-s", type=float, default=240)
    ap.add_argument("--commit", default=None)
    ap.add_argument("--ms", default=",".join(map(str, MS)),
                    help="token counts, e.g. 128,256,512 for prefill sizes")  # fmt: skip
    ap.add_argument("--ws", action="store_true", help="time the warp-specialized twin "
                    "(WS_CANDIDATES) next to the synchronous table's configs")  # fmt: skip
    ap.add_argument("--no-check", action="store_true", help="skip the checks (the cuda-marked "
                    "tests cover them) and spend the whole budget timing")  # fmt: skip
    args = ap.parse_args()
    candidates = WS_CANDIDATES if args.ws else CANDIDATES
    formats = args.formats.split(",")
    if any(f not in TWIN for f in formats):
        raise SystemExit(f"unknown formats in {formats}; known: {', '.join(TWIN)}")
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        raise SystemExit("w4a8_probe needs a Hopper GPU (wgmma)")
    start = time.time()
    try:
        checks = [] if args.no_check else check(candidates)
    except Exception as e:  # keep going: the timings say whether it is worth fixing
        checks = [dict(error=repr(e)[:500], rel_err=float("nan"))]
    # the budget counts from here: the checks compile most configs first
    ms = tuple(int(m) for m in args.ms.split(","))
    rows = timings(time.time() + args.budget_s, formats, args.models.split(","), ms, candidates)
    meta = dict(gpu_run_meta(args.commit), seconds=time.time() - start)
    report = dict(meta=meta, checks=checks, timings=rows)
    out = args.out / "w4a8_probe.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))  # before the markdown, which could fail
    write_report(out, report, markdown(meta, checks, rows))


if __name__ == "__main__":
    main()
