"""How many K splits each Llama-3 linear wants in the wgmma W4A16 kernel (one H100/H200).

The launcher splits K in powers of two until the grid covers every SM once
(`qlinear.choose_split_k`), so 70B's qkv (80 tiles of 128 outputs) runs 160 programs on 132
SMs: some SMs run two, most one. This times the table's config (`WGMMA_CONFIGS`) on each
layer with every split count that divides the K tiles, x handed over in mma order as the
model does, and reports the launcher's choice next to the fastest.

    python bench/split_probe.py --out bench/results     # STAGE=split bench/gpu_kernels.sh
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from common import gpu_run_meta, gpu_run_text, write_report
from frag_probe import weights
from kernel_perf import SHAPES, time_graph
from specquant.kernels.reference import to_mma_order
from specquant.kernels.triton_ops import w4_fragment as F
from specquant.kernels.triton_ops import w4_wgmma as W
from specquant.quant.spec import get_format

SPLITS = (1, 2, 3, 4, 6, 8)


def timings(fmt: str, models: list[str], ms: list[int], deadline: float) -> list[dict[str, Any]]:
    gen = torch.Generator(device="cuda").manual_seed(2)
    spec = get_format(fmt)
    group = 0 if spec.group_size == -1 else spec.group_size
    rows = []
    for model in models:
        for layer, (k, n) in SHAPES[model].items():
            ws, _ = weights(fmt, n, k, gen)
            frags = [F.prepare_fragments(w["qweight"]) for w in ws]
            for m in ms:
                cfg = W.wgmma_config(m, n, k)
                if cfg is None or time.time() > deadline:
                    continue
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                x = to_mma_order(x) if cfg.x_perm else x
                # the launcher's own plan (its split count, and its K tile: group-bounded)
                g = F.plan_grid(torch.empty(m, n, device="cuda"), k, group, cfg.block_n,
                                cfg.block_k, W.token_tile(m), cfg.split_waves, None)  # fmt: skip
                tiles, k_blocks, chosen = g.n_tiles * g.m_tiles, k // g.block_k, g.split_k
                row = dict(model=model, layer=layer, m=m, n=n, k=k, tiles=tiles, config=cfg,
                           launcher=chosen, us={})  # fmt: skip
                for split in sorted({chosen, *(s for s in SPLITS if k_blocks % s == 0)}):

                    def run(i: int, split=split, x=x, cfg=cfg, fr=frags, ws=ws) -> torch.Tensor:
                        return W.wgmma_linear(x, fr[i], ws[i]["scales"], None, group, cfg, split,
                                              x_in_mma_order=cfg.x_perm)  # fmt: skip

                    row["us"][split] = time_graph(run, len(ws))
                rows.append(row)
                best = min(row["us"], key=row["us"].get)
                print(f"{model} {layer} M={m}: launcher {chosen} -> {row['us'][chosen]:.1f} us, "
                      f"best {best} -> {row['us'][best]:.1f} us", flush=True)  # fmt: skip
            del ws, frags
            torch.cuda.empty_cache()
    return rows


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    md = ["# K splits per linear in the wgmma W4A16 kernel", "", gpu_run_text(meta, "split"), "",
          "Microseconds per launch (median of CUDA-graph replays, weights rotated through HBM), "
          "the table's config, x in mma order; launcher: the split count it chooses.", "",
          "| model | layer | M | tiles | launcher | "
          + " | ".join(f"split {s}" for s in SPLITS) + " |",
          "|---|---|---|---|---|" + "---|" * len(SPLITS)]  # fmt: skip
    for r in rows:
        cells = []
        for s in SPLITS:
            us = r["us"].get(s)
            text = "" if us is None else f"{us:.1f}"
            cells.append(text)
        chosen = f"{r['launcher']}: {r['us'][r['launcher']]:.1f}"
        md.append(f"| {r['model']} | {r['layer']} | {r['m']} | {r['tiles']} | {chosen} | "
                  + " | ".join(cells) + " |")  # fmt: skip
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--format", default="w4a16-g128")
    ap.add_argument("--models", default=",".join(SHAPES))
    ap.add_argument("--ms", default="32,64,128")
    ap.add_argument("--budget-s", type=float, default=240)
    ap.add_argument("--commit", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("split_probe needs a CUDA GPU")
    start = time.time()
    rows = timings(args.format, args.models.split(","), [int(m) for m in args.ms.split(",")],
                   start + args.budget_s)  # fmt: skip
    meta = dict(gpu_run_meta(args.commit), format=args.format, seconds=time.time() - start)
    for r in rows:
        r["config"] = list(r["config"].__dict__.values())
    write_report(args.out / "split_probe.json", dict(meta=meta, rows=rows),
                 markdown(meta, rows))  # fmt: skip


if __name__ == "__main__":
    main()
