"""The warp-specialized wgmma W4A16 kernel (kernels/triton_ops/w4_wgmma_ws.py) on the GPU:
checked against the reference and, bit for bit, against the synchronous wgmma kernel with
the same tiles; then timed on the Llama-3 8B/70B linears next to what the layers run
without it (`table`: the fragment kernel's pick up to 8 tokens, `w4_wgmma.wgmma_config`'s
above) in the same run.

    python bench/ws_probe.py --out bench/results --ms 16,32,64,128
    python bench/ws_probe.py --skip-check --ms 8 --configs "64,128,4,6,2,64;64,128,4,4,1,128"

Writes ws_probe.json (every timing and check) and ws_probe.md (per model and M: the sum
over the four linears of `table`, each warp-specialized config, and the best of them per
layer).
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
from frag_probe import (
    FORMATS,  # g128 on group-major scales and per channel, as the layers run them
    base_format,
    check_cases,
    rel_err,
    weights,
)
from kernel_perf import SHAPES, time_graph
from specquant.kernels.reference import to_mma_order
from specquant.kernels.triton_ops import w4_fragment as F
from specquant.kernels.triton_ops import w4_wgmma as W
from specquant.kernels.triton_ops import w4_wgmma_ws as WS
from specquant.quant.spec import get_format

_C = WS.WsConfig
# WsConfig(BLOCK_N, BLOCK_K, consumer warps, stages, split waves, maxnreg). Registers: the
# producer warp rounds the CTA up to a whole extra warpgroup, so 4 consumer warps make an
# 8-warp CTA (128 registers: two CTAs per SM, 80: three) and 8 make a 12-warp one.
CANDIDATES = [_C(64, 128, 4, 4, 1, 128), _C(64, 128, 4, 3, 2, 80), _C(64, 128, 4, 5, 1, 128),
              _C(64, 128, 4, 4, 2, 128), _C(64, 128, 4, 4, 2, 80), _C(64, 256, 4, 2, 1, 128),
              _C(128, 128, 4, 4, 1, 128), _C(128, 128, 4, 3, 1, 128), _C(128, 128, 4, 4, 2, 128),
              _C(128, 256, 4, 2, 1, 128),
              _C(128, 128, 8, 4, 1, 80)]  # fmt: skip
CHECKED = [_C(64, 128, 4, 2), _C(128, 128, 4, 3), _C(128, 128, 8, 4, 1, 80),
           _C(256, 128, 8, 3)]  # fmt: skip
MS = [16, 32, 64, 128]


def check(gen: torch.Generator) -> list[dict[str, Any]]:
    """Each checked config against the reference, and against the synchronous wgmma
    kernel with the same tile, K step and split (the same sums in the same order)."""
    rows = []
    for c in check_cases(gen, (9, 17, 33, 64, 100, 130)):
        for cfg in CHECKED:
            if cfg.block_n > c.n:
                continue
            for split in (None, 2):
                y = WS.wgmma_ws_linear(c.x, c.frag, c.t["scales"], c.bias, c.group, cfg, split)
                twin = W.WgmmaConfig(cfg.block_n, cfg.block_k, cfg.warps, 3, cfg.split_waves,
                                     True, x_perm=True)  # fmt: skip
                ref = W.wgmma_linear(c.x, c.frag, c.t["scales"], c.bias, c.group, twin, split)
                rows.append(dict(rel_err(y, c), config=list(astuple(cfg)), split_k=split,
                                 same_bits=bool(torch.equal(y, ref))))  # fmt: skip
    return rows


def timings(deadline: float, formats: list[str], models: list[str], ms: list[int],
            candidates: list[WS.WsConfig]) -> list[dict[str, Any]]:  # fmt: skip
    gen = torch.Generator(device="cuda").manual_seed(1)
    rows = []
    for fmt in formats:
        spec = get_format(base_format(fmt))
        group = 0 if spec.group_size == -1 else spec.group_size
        for model in models:
            for layer, (k, n) in SHAPES[model].items():
                ws, size = weights(fmt, n, k, gen)
                frags = [F.prepare_fragments(w["qweight"]) for w in ws]
                for m in ms:
                    if time.time() > deadline:
                        return rows
                    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                    xo = to_mma_order(x)
                    base = dict(fmt=fmt, model=model, layer=layer, n=n, k=k, bytes=size, m=m)
                    frag_cfg = F.frag_config(m, n * k, group > 0)
                    pick = W.wgmma_config(m, n, k)
                    if frag_cfg is not None:  # up to 8 tokens the layers run this kernel

                        def frag_run(i: int, x=x, cfg=frag_cfg, fr=frags, ws=ws,
                                     g=group) -> torch.Tensor:  # fmt: skip
                            return F.fragment_linear(x, fr[i], ws[i]["scales"], None, g, cfg)

                        rows.append(dict(base, kernel="table", config=str(frag_cfg),
                                         us=time_graph(frag_run, len(ws))))  # fmt: skip
                    elif pick is not None and pick.x_perm:

                        def table_run(i: int, xo=xo, cfg=pick, fr=frags, ws=ws,
                                      g=group) -> torch.Tensor:  # fmt: skip
                            return W.wgmma_linear(xo, fr[i], ws[i]["scales"], None, g, cfg,
                                                  x_in_mma_order=True)  # fmt: skip

                        rows.append(dict(base, kernel="table", config=list(astuple(pick)),
                                         us=time_graph(table_run, len(ws))))  # fmt: skip
                    for cfg in candidates:

                        def run(i: int, xo=xo, cfg=cfg, fr=frags, ws=ws, g=group) -> torch.Tensor:
                            return WS.wgmma_ws_linear(xo, fr[i], ws[i]["scales"], None, g, cfg,
                                                      x_in_mma_order=True)  # fmt: skip

                        row = dict(base, kernel="ws", config=list(astuple(cfg)))
                        try:
                            row["us"] = time_graph(run, len(ws))
                        except Exception as e:  # a config that does not fit (shared memory)
                            row["error"] = repr(e)[:300]
                        rows.append(row)
                print(f"timed {fmt} {model} {layer} at {time.time():.0f}", flush=True)
                del ws, frags
                torch.cuda.empty_cache()
    return rows


def sums(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """(fmt, model, M) -> name -> microseconds over the model's four linears ('ws best':
    each layer's best warp-specialized config)."""
    out: dict[str, dict[str, float]] = {}
    for key in sorted({(r["fmt"], r["model"], r["m"]) for r in rows}):
        sel = [r for r in rows if (r["fmt"], r["model"], r["m"]) == key and "us" in r]
        cell: dict[str, list[float]] = {}
        best: dict[str, float] = {}
        for r in sel:
            name = "table" if r["kernel"] == "table" else f"ws {r['config']}"
            cell.setdefault(name, []).append(r["us"])
            if r["kernel"] == "ws":
                best[r["layer"]] = min(best.get(r["layer"], float("inf")), r["us"])
        full = max(len(v) for v in cell.values())
        res = {name: round(sum(v), 1) for name, v in cell.items() if len(v) == full}
        if len(best) == full:
            res["ws best"] = round(sum(best.values()), 1)
        out[f"{key[0]} {key[1]} M={key[2]}"] = res
    return out


def markdown(result: dict[str, Any]) -> list[str]:
    checks = result["checks"]
    md = ["# Warp-specialized wgmma W4A16 kernel: checks, and timings against the table's "
          "picks", "", gpu_run_text(result, "ws"), ""]  # fmt: skip
    if checks:
        worst = max(r["rel_err"] for r in checks)
        same = sum(r["same_bits"] for r in checks)
        md += [f"Checks: {len(checks)} cases, worst relative error against dequantize-and-"
               f"matmul {worst:.1e}; {same} of them bit-equal to the synchronous wgmma kernel "
               "with the same tile and split.", ""]  # fmt: skip
    md += ["Microseconds summed over one decoder layer's four linears (median of CUDA-graph "
           "replays, weights rotated through HBM, x in mma order). `table`: the layers' own "
           "picks without this kernel (the fragment kernel up to 8 tokens, else wgmma); "
           "ws configs: [BLOCK_N, BLOCK_K, consumer warps, stages, split waves, "
           "maxnreg].", ""]  # fmt: skip
    for key, cell in result["sums"].items():
        ranked = sorted(cell.items(), key=lambda kv: kv[1])
        md.append(f"- {key}: " + ", ".join(f"{n} {us}" for n, us in ranked))
    md += [
        "",
        "Per layer (us): the table's pick, and the best ws config.",
        "",
        "| fmt | model | layer | M | table | best ws | config |",
        "|---|---|---|---|---|---|---|",
    ]
    keys = sorted({(r["fmt"], r["model"], r["layer"], r["m"]) for r in result["timings"]})
    for key in keys:
        sel = [r for r in result["timings"]
               if (r["fmt"], r["model"], r["layer"], r["m"]) == key and "us" in r]  # fmt: skip
        tab = next((r["us"] for r in sel if r["kernel"] == "table"), None)
        wss = [r for r in sel if r["kernel"] == "ws"]
        if not wss:
            continue
        best = min(wss, key=lambda r: r["us"])
        md.append(f"| {' | '.join(map(str, key))} | {tab and round(tab, 1)} | "
                  f"{best['us']:.1f} | {best['config']} |")  # fmt: skip
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--budget-s", type=float, default=300)
    ap.add_argument("--commit", default=None, help="the checkout's name (default: git HEAD)")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--formats", default=",".join(FORMATS), help="comma-separated")
    ap.add_argument("--models", default=",".join(SHAPES), help="comma-separated")
    ap.add_argument("--ms", default=",".join(map(str, MS)), help="token counts to time")
    ap.add_argument("--configs", default=None, help="';'-separated configs to time instead "
                    "of CANDIDATES, each BLOCK_N,BLOCK_K,warps,stages,split_waves,"
                    "maxnreg")  # fmt: skip
    args = ap.parse_args()
    candidates = CANDIDATES
    if args.configs:
        candidates = [_C(*(int(v) for v in c.split(","))) for c in args.configs.split(";")]
    start = time.time()
    gen = torch.Generator(device="cuda").manual_seed(0)
    checks = [] if args.skip_check else check(gen)
    if checks:
        worst = max(checks, key=lambda r: r["rel_err"])
        print(f"checks: {len(checks)}, worst {json.dumps(worst)}, bit-equal "
              f"{sum(r['same_bits'] for r in checks)}", flush=True)  # fmt: skip
    rows = timings(start + args.budget_s, args.formats.split(","), args.models.split(","),
                   [int(m) for m in args.ms.split(",")], candidates)  # fmt: skip
    result = dict(gpu_run_meta(args.commit), checks=checks, timings=rows, sums=sums(rows))
    write_report(args.out / "ws_probe.json", result, markdown(result))
    print("\n".join(markdown(result)))


if __name__ == "__main__":
    main()
