"""Launch one W4A16 kernel on one Llama-3 linear a few times, for a profiler to attach to.

    ncu --clock-control none --kernel-name 'regex:_w4_|_qlinear_kernel' --launch-skip 2 \
        --launch-count 1 --section WarpStateStats ... python bench/kernel_profile.py \
        --kernel wgmma --model 8b --layer down --m 64

`bench/gpu_kernels.sh` (STAGE=profile) runs it under Nsight Compute with the sections that
say where a kernel's warps wait (stall reasons, issue slots, occupancy, memory traffic) and
writes the report to $OUT. Timings come from kernel_perf.py / the probes, not from here:
this only launches (plain launches, no CUDA graph, so each launch is one profiled kernel).
"""

from __future__ import annotations

import argparse

import torch

from frag_probe import weights
from kernel_perf import SHAPES
from specquant.kernels.triton_ops import w4_fragment as F
from specquant.kernels.triton_ops import w4_wgmma as W
from specquant.kernels.triton_ops.qlinear import qlinear
from specquant.quant.spec import get_format

KERNELS = ("wgmma", "frag", "canonical")


def launcher(kernel: str, fmt: str, n: int, k: int, m: int, config: str | None):
    """A no-argument function that runs the kernel once on fixed random inputs."""
    spec = get_format(fmt)
    group = 0 if spec.group_size == -1 else spec.group_size
    ws, _ = weights(fmt, n, k, torch.Generator(device="cuda").manual_seed(0))
    t = ws[0]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    fields = [int(v) for v in config.split(",")] if config else None
    if kernel == "canonical":
        return lambda: qlinear(x, t, None, spec)
    frag = F.prepare_fragments(t["qweight"])
    if kernel == "frag":
        cfg = F.FragConfig(*fields) if fields else F.frag_config(m, n * k)
        return lambda: F.fragment_linear(x, frag, t["scales"], None, group, config=cfg)
    cfg = W.WgmmaConfig(*fields) if fields else W.wgmma_config(m, n * k)
    if cfg is None:
        raise SystemExit(f"WGMMA_CONFIGS has no config for M={m}, N*K={n * k}; pass --config")
    return lambda: W.wgmma_linear(x, frag, t["scales"], None, group, cfg)


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
    args = ap.parse_args()
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
