"""The wgmma W4A16 kernel (kernels/triton_ops/w4_wgmma.py) on the GPU: checked against a
dequantize-and-matmul reference, then its tile configs timed on the Llama-3 8B/70B linears
at M = 16, 32, 64 and 128 next to the canonical-layout kernel in the same run.

    python bench/wgmma_probe.py --out bench/results

Writes wgmma_probe.json (every timing) and wgmma_probe.md (sums over each model's four
linears per M: the canonical kernel, each wgmma config, and the best wgmma config per
layer), and the table per M bucket and weight-size class that `WGMMA_CONFIGS` takes.
Configs with x_perm are timed on x already in mma K order, as the model hands it to every
W4A16 linear (norms, silu(gate) * up, attention's head merge for heads of 128 features);
the gather a caller with plain x would add is timed on its own (runs before 2026-11-28's
second probe included it in the x_perm times).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import astuple
from pathlib import Path
from typing import Any

import torch

from common import gpu_run_meta, gpu_run_text, write_report
from frag_probe import (
    FORMATS,  # g128 on group-major scales and per channel, as the layers run them
    base_format,
    check_cases,
    config_table_md,
    rel_err,
    size_class,
    weights,
)
from kernel_perf import SHAPES, time_graph
from specquant.kernels.reference import to_mma_order
from specquant.kernels.triton_ops import w4_fragment as F
from specquant.kernels.triton_ops import w4_wgmma as W
from specquant.kernels.triton_ops.qlinear import qlinear
from specquant.quant.spec import get_format

# WgmmaConfig(BLOCK_N, BLOCK_K, warps, stages, split waves, weights through the ring,
# overlap: asynchronous wgmma with the next tile unpacked meanwhile, x_perm: x gathered into
# mma K order by the launcher and copied in 16-byte pieces, maxnreg: registers per thread)
_C = W.WgmmaConfig
# the best of each earlier probe, and the canonical-x twins of the x_perm ones
_PRIOR = [_C(64, 128, 4, 3), _C(128, 128, 8, 3), _C(128, 128, 8, 3, 1, True),
          _C(128, 128, 4, 3, 1, True)]  # fmt: skip
# x gathered into mma order (16-byte copies) and held to 128 registers, so that two 8-warp
# programs share an SM (f62f021's probe: 70B g128 at 64 tokens 343.3 against 386.7 us)
_PERM = [_C(128, 128, 8, 4, 1, True, x_perm=True, maxnreg=128),
         _C(128, 128, 8, 3, 1, True, x_perm=True, maxnreg=128),
         _C(128, 128, 8, 3, x_perm=True, maxnreg=128),
         _C(128, 128, 8, 4, 2, True, x_perm=True, maxnreg=128),
         _C(128, 128, 8, 3, 2, x_perm=True, maxnreg=128),
         _C(64, 128, 4, 3, x_perm=True, maxnreg=128),
         _C(64, 128, 4, 4, 1, True, x_perm=True, maxnreg=128),
         _C(128, 128, 4, 3, 1, True, x_perm=True),
         _C(256, 128, 16, 4, 1, True, x_perm=True),
         _C(256, 128, 16, 3, x_perm=True)]  # fmt: skip
# more programs for the layers of few output tiles (qkv, o, down): one warpgroup per
# program and K split until two or four of them share each SM
_MORE = [_C(64, 128, 4, 3, 2, True, x_perm=True, maxnreg=128),
         _C(64, 128, 4, 4, 2, True, x_perm=True, maxnreg=128),
         _C(64, 128, 4, 3, 4, True, x_perm=True, maxnreg=128),
         _C(128, 128, 8, 3, 2, True, x_perm=True, maxnreg=128)]  # fmt: skip
CANDIDATES = [*_PRIOR, *_PERM, *_MORE]
CHECKED = [_C(64, 128, 4, 2), _C(128, 128, 8, 3), _C(128, 256, 8, 4, 1, True), _C(256, 128, 8, 3),
           _C(128, 128, 4, 3, 1, True), _C(128, 128, 8, 4, 1, True, True),
           _C(64, 128, 4, 3, 1, False, True), _C(128, 256, 4, 4, 1, True, True),
           _C(256, 128, 16, 3, 1, True), _C(128, 128, 8, 3, 1, True, False, True),
           _C(128, 128, 8, 4, 2, True, maxnreg=128)]  # fmt: skip
GATHER = "x_perm gather"  # the gather of x into mma order, timed on its own (not in x_perm rows)
MS = [16, 32, 64, 128]  # each the bucket of the token counts up to it


def check(gen: torch.Generator) -> list[dict[str, Any]]:
    rows = []
    for c in check_cases(gen, (1, 9, 17, 33, 64, 100, 130)):
        for cfg in CHECKED:
            for split in (None, 2):
                y = W.wgmma_linear(c.x, c.frag, c.t["scales"], c.bias, c.group, cfg, split)
                rows.append(dict(rel_err(y, c), config=list(astuple(cfg)), split_k=split))
    return rows


def timings(
    deadline: float,
    formats: list[str],
    models: list[str],
    ms: list[int],
    layer_done: Callable[[list[dict[str, Any]]], None],
) -> list[dict[str, Any]]:
    """Every candidate and the canonical kernel on each layer; `layer_done` gets the rows
    so far after each layer (the caller writes them, so a run cut short keeps them)."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    rows = []
    for fmt in formats:
        spec = get_format(base_format(fmt))  # frag_probe.weights makes the scale layout
        group = 0 if spec.group_size == -1 else spec.group_size
        for model, layers in ((m, SHAPES[m]) for m in models):
            for layer, (k, n) in layers.items():
                ws, size = weights(fmt, n, k, gen)
                frags = [F.prepare_fragments(w["qweight"]) for w in ws]
                for m in ms:
                    if time.time() > deadline:
                        return rows
                    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                    base = dict(fmt=fmt, model=model, layer=layer, n=n, k=k, bytes=size, m=m)

                    def canon(i: int, x=x, ws=ws, spec=spec) -> torch.Tensor:
                        return qlinear(x, ws[i], None, spec)

                    rows.append(dict(base, kernel="canonical", us=time_graph(canon, len(ws))))

                    def gather(i: int, x=x) -> torch.Tensor:
                        return to_mma_order(x)

                    # x_perm configs take x already in mma order, as the model's norm, silu
                    # and attention write it; a caller with plain x pays this gather on top
                    rows.append(dict(base, kernel=GATHER, us=time_graph(gather, 1)))
                    xo = to_mma_order(x)
                    for cfg in CANDIDATES:

                        def run(i: int, x=x, xo=xo, cfg=cfg, fr=frags, ws=ws,
                                g=group) -> torch.Tensor:  # fmt: skip
                            a = xo if cfg.x_perm else x
                            return W.wgmma_linear(a, fr[i], ws[i]["scales"], None, g, cfg,
                                                  x_in_mma_order=cfg.x_perm)  # fmt: skip

                        row = dict(base, kernel="wgmma", config=list(astuple(cfg)))
                        try:
                            row["us"] = time_graph(run, len(ws))
                        except Exception as e:  # a config that does not fit (shared memory)
                            row["error"] = repr(e)[:300]
                        rows.append(row)
                print(f"timed {fmt} {model} {layer} at {time.time():.0f}", flush=True)
                layer_done(rows)
                del ws, frags
                torch.cuda.empty_cache()
    return rows


def sums(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """(fmt, model, M) -> kernel name -> microseconds summed over the model's four linears
    (a wgmma config only where it ran on all four; 'wgmma best' takes each layer's best)."""
    out: dict[str, dict[str, float]] = {}
    keys = sorted({(r["fmt"], r["model"], r["m"]) for r in rows})
    for fmt, model, m in keys:
        sel = [r for r in rows if (r["fmt"], r["model"], r["m"]) == (fmt, model, m) and "us" in r]
        cell: dict[str, list[float]] = {}
        best: dict[str, float] = {}
        for r in sel:
            name = r["kernel"] if r["kernel"] != "wgmma" else f"wgmma {r['config']}"
            cell.setdefault(name, []).append(r["us"])
            if r["kernel"] == "wgmma":
                best[r["layer"]] = min(best.get(r["layer"], float("inf")), r["us"])
        full = max(len(v) for v in cell.values())
        out[f"{fmt} {model} M={m}"] = {
            name: round(sum(v), 1) for name, v in cell.items() if len(v) == full
        }
        if len(best) == full:
            out[f"{fmt} {model} M={m}"]["wgmma best"] = round(sum(best.values()), 1)
    return out


def table(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """The WGMMA_CONFIGS this run supports: per M bucket and weight-size class the config of
    least total time (both formats, the class's layers) where it beats the canonical kernel's
    total, else None."""
    out: dict[str, list[Any]] = {}
    for m in sorted({r["m"] for r in rows}):  # the buckets this run timed
        out[str(m)] = []
        for cls, _ in F.SIZE_CLASSES:
            sel = [r for r in rows if r["m"] == m and size_class(r["n"], r["k"]) == cls]
            totals: dict[tuple[Any, ...], list[float]] = {}
            for r in sel:
                if "us" in r and r["kernel"] in ("wgmma", "canonical"):
                    key = tuple(r.get("config") or ["canonical"])
                    totals.setdefault(key, []).append(r["us"])
            full = max((len(v) for v in totals.values()), default=0)
            done = {c: sum(v) for c, v in totals.items() if len(v) == full}
            best = min((c for c in done if c != ("canonical",)), key=done.get, default=None)
            wins = best is not None and done[best] < done.get(("canonical",), float("inf"))
            out[str(m)].append(list(best) if wins else None)
    return out


def markdown(result: dict[str, Any]) -> list[str]:
    checks = result["checks"]
    md = [
        "# wgmma W4A16 kernel: checks, and timings against the canonical kernel",
        "",
        gpu_run_text(result, "wgmma"),
        "",
        *(
            [f"Joined with the timings of {result['joined']} that this run did not repeat.", ""]
            if result.get("joined")
            else []
        ),
        *(
            ["**Partial**: written after a layer; the run had not finished.", ""]
            if result.get("finished") is False
            else []
        ),
        f"Checks against dequantize-and-matmul: {len(checks)} cases, worst relative error "
        f"{max((r['rel_err'] for r in checks), default=float('nan')):.1e}.",
        "",
        "Microseconds summed over one decoder layer's four linears (median of CUDA-graph "
        "replays, weights rotated through HBM). wgmma configs: [BLOCK_N, BLOCK_K, warps, "
        "stages, split waves, weights through the ring, overlapping K loop, x gathered "
        "into mma order, registers per thread (0: ptxas decides)].",
        "",
    ]
    for key, cell in result["sums"].items():
        ranked = sorted((kv for kv in cell.items() if kv[0] != GATHER), key=lambda kv: kv[1])
        shown = ranked[:6] + [kv for kv in ranked[6:] if kv[0] == "canonical"]  # the baseline
        gather = f" ({GATHER} {cell[GATHER]}, not in the x_perm times)" if GATHER in cell else ""
        md.append(f"- {key}: " + ", ".join(f"{n} {us}" for n, us in shown) + gather)
    md += ["", "Config per M bucket and weight-size class where the wgmma kernel beat the "
           "canonical one (`WGMMA_CONFIGS`; null: canonical):", "",
           *config_table_md(result["table"])]  # fmt: skip
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--budget-s", type=float, default=300)
    ap.add_argument("--commit", default=None, help="the checkout's name (default: git HEAD)")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--formats", default=",".join(FORMATS),
                    help="comma-separated; w4a16-g128 for g128 on row-major scales (the "
                         "default's g128 reads group-major ones, as layers keep them)")  # fmt: skip
    ap.add_argument("--models", default=",".join(SHAPES), help="comma-separated")
    ap.add_argument("--ms", default=",".join(map(str, MS)), help="token counts to time")
    ap.add_argument("--with", dest="prior", type=Path, default=None, help="an earlier run's "
                    "wgmma_probe.json (same card): its timings join this run's in the sums "
                    "and the table, e.g. to finish what its time budget left out")  # fmt: skip
    args = ap.parse_args()
    prior = json.loads(args.prior.read_text()) if args.prior else None
    if prior and prior["card"] != torch.cuda.get_device_name():
        raise SystemExit(f"--with {args.prior} ran on {prior['card']}, not this card")
    start = time.time()
    gen = torch.Generator(device="cuda").manual_seed(0)
    checks = [] if args.skip_check else check(gen)
    if checks:
        worst = max(checks, key=lambda r: r["rel_err"])
        print(f"checks: {len(checks)}, worst {json.dumps(worst)}", flush=True)

    def report(rows: list[dict[str, Any]], finished: bool) -> dict[str, Any]:
        """Write the report of `rows` (joined with --with's) and return it."""
        if prior:
            done = {(r["fmt"], r["model"], r["layer"], r["m"]) for r in rows}
            rows = [r for r in prior["timings"]
                    if (r["fmt"], r["model"], r["layer"], r["m"]) not in done] + rows  # fmt: skip
        result = dict(gpu_run_meta(args.commit), checks=checks, timings=rows, sums=sums(rows),
                      table=table(rows), joined=str(args.prior) if args.prior else None,
                      finished=finished)  # fmt: skip
        write_report(args.out / "wgmma_probe.json", result, markdown(result))
        return result

    report([], finished=False)  # the checks, should the run be cut short
    rows = timings(start + args.budget_s, args.formats.split(","), args.models.split(","),
                   [int(m) for m in args.ms.split(",")],
                   lambda rows: report(rows, finished=False))  # fmt: skip
    for line in markdown(report(rows, finished=True))[8:]:
        print(line, flush=True)


if __name__ == "__main__":
    main()
