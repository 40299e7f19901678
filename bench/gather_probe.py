"""What gathering x into the wgmma kernel's mma K order costs (WgmmaConfig.x_perm), per way
of doing it, on the Llama-3 8B/70B linears' K at 16/64/128 tokens.

    python bench/gather_probe.py --out bench/results

The order is a bit permutation of the column index (w4_fragment.pi), so besides
`index_select` over each 128-column block, a view and a permute express the same gather as
one strided copy (reference.to_mma_order, the launcher's); both are checked equal here before
they are timed. Writes
gather_probe.json / .md (microseconds per call, median of CUDA-graph replays). Run by
`STAGE=gather bench/gpu_kernels.sh`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from common import gpu_run_meta, gpu_run_text, write_report
from kernel_perf import SHAPES, time_graph
from specquant.kernels.reference import to_mma_order
from specquant.kernels.triton_ops import w4_fragment as F


def by_index(x: torch.Tensor) -> torch.Tensor:
    """index_select with pi's table (what the launcher did up to d85fc05)."""
    m, k = x.shape
    order = F._column_order(x.device)
    return x.view(m, k // F.ATOM_K, F.ATOM_K).index_select(2, order).view(m, k)


by_permute = to_mma_order  # a view and a permute: one strided copy (the launcher's since)


WAYS = {"index_select": by_index, "permute": by_permute}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--commit", default=None)
    args = ap.parse_args()
    ks = sorted({k for layers in SHAPES.values() for k, _ in layers.values()})
    rows: list[dict[str, Any]] = []
    for k in ks:
        for m in (16, 64, 128):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            want = by_index(x)
            for name, fn in WAYS.items():
                assert torch.equal(fn(x), want), (name, m, k)
                rows.append(dict(way=name, m=m, k=k, us=time_graph(lambda i, x=x, fn=fn: fn(x), 1)))
            print(rows[-2:], flush=True)
    result = dict(gpu_run_meta(args.commit), rows=rows)
    md = ["# Gathering x into mma K order", "", gpu_run_text(result, "gather"), "",
          "| K | M | " + " | ".join(WAYS) + " |", "|---" * (2 + len(WAYS)) + "|"]  # fmt: skip
    for k in ks:
        for m in (16, 64, 128):
            t = {r["way"]: r["us"] for r in rows if (r["k"], r["m"]) == (k, m)}
            md.append(f"| {k} | {m} | " + " | ".join(f"{t[w]:.1f}" for w in WAYS) + " |")
    write_report(args.out / "gather_probe.json", result, md)


if __name__ == "__main__":
    main()
