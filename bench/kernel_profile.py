"""Launch one W4A16 kernel on one Llama-3 linear a few times, for a profiler to attach to.

    ncu --clock-control none --kernel-name 'regex:_w4_|_qlinear_kernel' --launch-skip 2 \
        --launch-count 1 --section WarpStateStats ... python bench/kernel_profile.py \
        --kernel wgmma --model 8b --layer down --m 64

`bench/gpu_kernels.sh` (STAGE=profile) runs it under Nsight Compute with the sections that
say where a kernel's warps wait (stall reasons, issue slots, occupancy, memory traffic) and
writes the report to $OUT, with the SASS and its sampled stalls as CSV. Timings come from
kernel_perf.py / the probes, not from here: this only launches (plain launches, no CUDA
graph, so each launch is one profiled kernel).

    python bench/kernel_profile.py --stalls profile_1_sass.csv   # no GPU needed

summarizes such a CSV: the stall reasons' shares, the opcodes the samples fall on, and the
instructions with the most samples.
"""

from __future__ import annotations

import argparse
import collections
import csv
from pathlib import Path

import torch

from frag_probe import GROUP_MAJOR, weights
from kernel_perf import SHAPES
from specquant.kernels.reference import to_mma_order
from specquant.kernels.triton_ops import w4_fragment as F
from specquant.kernels.triton_ops import w4_wgmma as W
from specquant.kernels.triton_ops import w4_wgmma_ws as WS
from specquant.kernels.triton_ops.qlinear import qlinear
from specquant.quant.spec import get_format

KERNELS = ("wgmma", "ws", "frag", "canonical")


def launcher(kernel: str, fmt: str, n: int, k: int, m: int, config: str | None):
    """A no-argument function that runs the kernel once on fixed random inputs (g128 scales
    in group-major memory, as the layers keep them)."""
    spec = get_format(fmt)
    group = 0 if spec.group_size == -1 else spec.group_size
    layout = GROUP_MAJOR if group else fmt
    ws, _ = weights(layout, n, k, torch.Generator(device="cuda").manual_seed(0))
    t = ws[0]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    fields = [int(v) for v in config.split(",")] if config else None
    if kernel == "canonical":
        return lambda: qlinear(x, t, None, spec)
    frag = F.prepare_fragments(t["qweight"])
    if kernel == "frag":
        cfg = F.FragConfig(*fields) if fields else F.frag_config(m, n * k, group > 0)
        return lambda: F.fragment_linear(x, frag, t["scales"], None, group, config=cfg)
    if kernel == "ws":
        # x in mma K order, as the model's norm and silu * up hand it to this kernel
        xm = to_mma_order(x)
        wcfg = WS.WsConfig(*fields) if fields else WS.ws_config(m, n, k, group)
        if wcfg is None:
            raise SystemExit(f"the ws tables have no config for M={m}, [{n}, {k}]; pass --config")
        return lambda: WS.wgmma_ws_linear(xm, frag, t["scales"], None, group, wcfg,
                                          x_in_mma_order=True)  # fmt: skip
    cfg = W.WgmmaConfig(*fields) if fields else W.wgmma_config(m, n, k)
    if cfg is None:
        raise SystemExit(f"WGMMA_CONFIGS has no config for M={m}, N*K={n * k}; pass --config")
    return lambda: W.wgmma_linear(x, frag, t["scales"], None, group, cfg)


def stall_summary(path: Path, top: int = 12) -> list[str]:
    """Lines summarizing `ncu --page source --print-source sass --csv` output: each stall
    reason's share of all samples, the opcodes the samples fall on, the top instructions."""
    rows = list(csv.reader(path.open()))
    head = next((i for i, r in enumerate(rows) if "Warp Stall Sampling (All Samples)" in r), None)
    if head is None:
        raise SystemExit(f"{path} has no 'Warp Stall Sampling (All Samples)' column: not the "
                         "CSV of ncu --page source --print-source sass --csv")  # fmt: skip
    col = {name: j for j, name in enumerate(rows[head])}
    reasons = [n for n in col if n.startswith("stall_") and "Not Issued" not in n]
    total, by_reason, by_op, insts = 0.0, collections.Counter(), collections.Counter(), []
    for r in rows[head + 1 :]:
        if len(r) < len(col):
            continue
        samples = float(r[col["Warp Stall Sampling (All Samples)"]] or 0)
        total += samples
        words = r[col["Source"]].split()
        op = words[1] if words and words[0].startswith("@") and len(words) > 1 else words[0]
        by_op[op.split(".")[0]] += samples
        per = {n[6:]: float(r[col[n]] or 0) for n in reasons}
        by_reason.update(per)
        main_reasons = {k: int(v) for k, v in per.items() if v > 0.1 * samples}
        insts.append((samples, r[col["Source"]].strip()[:60], main_reasons))
    if not total:
        return [f"{path}: no stall samples"]

    def shares(c: collections.Counter[str], n: int) -> str:
        return ", ".join(f"{k} {v / total:.0%}" for k, v in c.most_common(n))

    out = [f"{path}: {total:.0f} samples", "reasons: " + shares(by_reason, 8),
           "opcodes: " + shares(by_op, 12)]  # fmt: skip
    for samples, src, why in sorted(insts, key=lambda t: -t[0])[:top]:
        out.append(f"  {samples / total:5.1%}  {src:60s} {why}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernel", choices=KERNELS, default="wgmma")
    ap.add_argument("--format", default="w4a16-g128", choices=["w4a16-g128", "w4a16"])
    ap.add_argument("--model", choices=list(SHAPES), default="8b")
    ap.add_argument("--layer", default="down", help="qkv, o, gate_up or down")
    ap.add_argument("--m", type=int, default=64)
    ap.add_argument("--config", default=None, help="the kernel's config fields, comma-separated "
                    "(default: its tile table's entry)")  # fmt: skip
    ap.add_argument("--launches", type=int, default=4, help="the first ones compile and warm up")
    ap.add_argument("--stalls", type=Path, default=None, help="only summarize this SASS stall "
                    "CSV of an earlier profile (STAGE=profile's profile_<i>_sass.csv)")  # fmt: skip
    args = ap.parse_args()
    if args.stalls:
        print("\n".join(stall_summary(args.stalls)))
        return
    if args.layer not in SHAPES[args.model]:
        raise SystemExit(f"--layer must be one of {sorted(SHAPES[args.model])}, not {args.layer}")
    k, n = SHAPES[args.model][args.layer]
    run = launcher(args.kernel, args.format, n, k, args.m, args.config)
    for _ in range(args.launches):
        run()
    torch.cuda.synchronize()
    print(f"launched {args.kernel} {args.format} {args.model} {args.layer} M={args.m} "
          f"{args.launches} times", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
