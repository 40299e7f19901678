"""Whether one token is really slower than two on the 70B layers (frag_m1.md): times
the fragment kernel at M = 1 and 2 on the 70B gate_up / down shapes, M = 1 again with x padded
to two rows, and counts the compiled variants, to tell a specialisation of M = 1 from a
property of the hardware or of the data.

    python bench/frag_m1.py
"""

from __future__ import annotations

import torch

from frag_probe import time_frag, weights
from kernel_perf import SHAPES
from specquant.kernels.triton_ops import w4_fragment as F


def variants() -> int:
    return sum(len(c[0]) for c in F._w4_fragment_kernel.device_caches.values())


def main() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    for layer in ("gate_up", "down"):
        k, n = SHAPES["70b"][layer]
        ws, _ = weights("w4a16-g128", n, k, gen)
        frags = [F.prepare_fragments(w["qweight"]) for w in ws]
        cfg = F.frag_config(1, n * k)
        x2 = torch.randn(2, k, device="cuda", dtype=torch.bfloat16)
        x1 = x2[:1].clone()
        x1_pad = torch.cat([x1, torch.zeros_like(x1)])
        before = variants()
        t1 = [round(time_frag(x1, frags, ws, 128, cfg), 1) for _ in range(3)]
        mid = variants()
        t2 = [round(time_frag(x2, frags, ws, 128, cfg), 1) for _ in range(3)]
        after = variants()
        tp = [round(time_frag(x1_pad, frags, ws, 128, cfg), 1) for _ in range(3)]
        print(f"70b {layer} {cfg}: M=1 {t1}, M=2 {t2}, M=1 padded to 2 {tp}; compiled "
              f"variants: {before} -> {mid} (M=1) -> {after} (M=2)", flush=True)  # fmt: skip
        del ws, frags
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
