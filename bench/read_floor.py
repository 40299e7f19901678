"""What any single kernel can reach in kernel_perf's harness at one token: the time of an
empty kernel, and of a kernel that only reads a layer's 4-bit weight bytes (the best of
several grid and block shapes), both as CUDA-graph replays with the buffers rotated
through HBM exactly as kernel_perf.time_graph times the linears. Next to them, in the same
run, the fragment kernel with its one-token pick (w4_fragment.frag_config) on the same
byte counts, and that kernel's data path alone (bench/ring_read.py: its grid and cp.async
ring, without the unpacking and the mma).

The W4A16 goal ">= 70% of the 4-bit roofline at M=1" sums four linears; if four
read-only kernels cannot reach it, no W4A16 kernel launched once per linear can.

    python bench/read_floor.py --out bench/results
    python bench/read_floor.py --render bench/results/read_floor.json   # figure only, no GPU

Writes read_floor.json, read_floor.md and read_floor.png (per layer: the roofline, the
read-only kernel, our kernel's data path alone and our kernel, in microseconds).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
import triton
import triton.language as tl

from common import copy_bandwidth_gbs, gpu_run_meta, gpu_run_where, pyplot, write_report
from frag_probe import GROUP_MAJOR, base_format, weights
from kernel_perf import SHAPES, copies_for, time_graph
from ring_read import ring_read
from specquant.kernels.triton_ops import w4_fragment as F
from specquant.quant.spec import get_format

# (programs per SM, int32 words per program per step, warps): one 16-byte load per thread
# per 4 words, so 4096 words with 8 warps keep 16 KiB in flight per step and program
READERS = [(p, b, w) for p in (1, 2, 4, 8) for b in (2048, 4096, 8192) for w in (4, 8)]
FORMATS = [GROUP_MAJOR, "w4a16"]


@triton.jit
def _empty(out):
    pass


@triton.jit
def _read(src, out, n_words, per_prog, BLOCK: tl.constexpr):
    # every program xor-folds its contiguous slice, so the loads cannot be dropped
    pid = tl.program_id(0)
    start = pid * per_prog
    acc = tl.zeros([BLOCK], tl.int32)
    for off in range(start, start + per_prog, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        acc ^= tl.load(src + idx, mask=idx < n_words, other=0)
    tl.store(out + pid, tl.xor_sum(acc, 0))


def time_empty() -> float:
    out = torch.empty(1, device="cuda", dtype=torch.int32)
    return time_graph(lambda i: _empty[(1,)](out), 1)


def time_read(size: int, reader: tuple[int, int, int]) -> float:
    """Microseconds to read `size` bytes once, rotated over enough copies to miss L2."""
    per_sm, block, warps = reader
    words = size // 4
    bufs = [torch.randint(0, 2**31 - 1, (words,), device="cuda", dtype=torch.int32)
            for _ in range(copies_for(size))]  # fmt: skip
    grid = torch.cuda.get_device_properties(0).multi_processor_count * per_sm
    per_prog = triton.cdiv(triton.cdiv(words, grid), block) * block
    grid = triton.cdiv(words, per_prog)
    out = torch.empty(grid, device="cuda", dtype=torch.int32)

    def run(i: int) -> None:
        _read[(grid,)](bufs[i], out, words, per_prog, BLOCK=block, num_warps=warps)

    return time_graph(run, len(bufs))


def time_layer(fmt: str, n: int, k: int, gen: torch.Generator) -> dict[str, Any]:
    """The layer's one-token fragment kernel (frag_config's pick) and, where that pick has
    a ring, its data path alone: microseconds, the bytes, the config."""
    spec = get_format(base_format(fmt))
    group = 0 if spec.group_size == -1 else spec.group_size
    ws, size = weights(fmt, n, k, gen)
    frags = [F.prepare_fragments(w["qweight"]) for w in ws]
    cfg = F.frag_config(1, n * k, group > 0)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)

    def run(i: int) -> torch.Tensor:
        return F.fragment_linear(x, frags[i], ws[i]["scales"], None, group, config=cfg)

    out: dict[str, Any] = dict(table_us=time_graph(run, len(ws)), bytes=size, config=str(cfg))
    if cfg.stages > 1:
        try:  # a failure here (first GPU run of ring_read) must not lose the other timings
            out["ring_us"] = time_graph(lambda i: ring_read(x, frags[i], cfg), len(ws))
        except Exception as e:
            out["ring_error"] = repr(e)[:300]
            print(f"ring_read failed: {out['ring_error']}", flush=True)
    return out


def measure(deadline: float) -> list[dict[str, Any]]:
    gen = torch.Generator(device="cuda").manual_seed(1)
    rows: list[dict[str, Any]] = [dict(kind="empty", us=time_empty())]
    for fmt in FORMATS:
        for model, shapes in SHAPES.items():
            for layer, (k, n) in shapes.items():
                if time.time() > deadline:
                    return rows
                got = time_layer(fmt, n, k, gen)
                base = dict(fmt=fmt, model=model, layer=layer, n=n, k=k, bytes=got["bytes"])
                rows.append(dict(base, kind="table", config=got["config"], us=got["table_us"]))
                if "ring_us" in got:
                    rows.append(dict(base, kind="ring", config=got["config"], us=got["ring_us"]))
                elif "ring_error" in got:
                    rows.append(dict(base, kind="ring", config=got["config"],
                                     error=got["ring_error"]))  # fmt: skip
                for reader in READERS:
                    rows.append(dict(base, kind="read", config=list(reader),
                                     us=time_read(got["bytes"], reader)))  # fmt: skip
                torch.cuda.empty_cache()
                print(f"timed {fmt} {model} {layer} at {time.time():.0f}", flush=True)
    return rows


def summarize(rows: list[dict[str, Any]], bw_gbs: float) -> list[dict[str, Any]]:
    """Per format and model: the four layers' table time, best read time, roofline and (where
    every layer has one) the table kernel's data path alone."""
    out = []
    for fmt in FORMATS:
        for model, shapes in SHAPES.items():
            sel = [r for r in rows if r.get("fmt") == fmt and r.get("model") == model]
            layers = []
            for layer in shapes:
                mine = [r for r in sel if r["layer"] == layer]
                table = next((r for r in mine if r["kind"] == "table"), None)
                reads = [r for r in mine if r["kind"] == "read"]
                if table is None or not reads:
                    break
                best = min(reads, key=lambda r: r["us"])
                ring = next((r["us"] for r in mine if r["kind"] == "ring" and "us" in r), None)
                roof = (table["bytes"] + 2 * (table["k"] + table["n"])) / (bw_gbs * 1e3)
                layers.append(dict(layer=layer, bytes=table["bytes"], roofline_us=roof,
                                   table_us=table["us"], read_us=best["us"],
                                   read_config=best["config"], ring_us=ring))  # fmt: skip
            if len(layers) == len(shapes):
                roof = sum(r["roofline_us"] for r in layers)
                table = sum(r["table_us"] for r in layers)
                read = sum(r["read_us"] for r in layers)
                rings = [r["ring_us"] for r in layers]
                ring = None if None in rings else sum(rings)
                out.append(dict(fmt=fmt, model=model, layers=layers, roofline_us=roof,
                                table_us=table, read_us=read, table_pct=100 * roof / table,
                                read_pct=100 * roof / read, ring_us=ring))  # fmt: skip
    return out


def _us(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def markdown(result: dict[str, Any]) -> list[str]:
    meta = result["meta"]
    md = [
        "# One token: what a single kernel per linear can reach in kernel_perf's harness",
        "",
        f"{gpu_run_where(meta)}; copy bandwidth {result['bw_gbs']:.0f} GB/s (read + write). "
        "Reproduce: `python bench/read_floor.py`.",
        "",
        "Microseconds per kernel, median of CUDA-graph replays with the buffers rotated "
        "through HBM (kernel_perf.time_graph). `read`: the fastest of "
        f"{len(READERS)} grid/block shapes of a kernel that only reads the layer's weight "
        "bytes (scales included) once; `table`: the fragment kernel with its one-token pick "
        "(frag_config); `ring`: that pick's grid and cp.async ring without the unpacking and "
        "the mma (bench/ring_read.py; `-` where the pick has no ring). % roofline as "
        "kernel_perf reports it: bytes (+ bf16 x and y) over the copy bandwidth, summed over "
        "the four linears.",
        "",
        f"An empty kernel: {result['empty_us']:.2f} us per launch in the graph.",
        "",
        "| format | model | roofline | read-only kernels | table's ring alone | table | "
        "read % roofline | table % roofline |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in result["summary"]:
        md.append(
            f"| {s['fmt']} | {s['model']} | {s['roofline_us']:.1f} | {s['read_us']:.1f} | "
            f"{_us(s.get('ring_us'))} | {s['table_us']:.1f} | {s['read_pct']:.0f}% | "
            f"{s['table_pct']:.0f}% |"
        )
    md += ["", "Per layer (us):", "",
           "| format | model | layer | MB | roofline | read | read config [per SM, words, "
           "warps] | ring | table |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for s in result["summary"]:
        for r in s["layers"]:
            md.append(f"| {s['fmt']} | {s['model']} | {r['layer']} | {r['bytes'] / 1e6:.1f} | "
                      f"{r['roofline_us']:.1f} | {r['read_us']:.1f} | {r['read_config']} | "
                      f"{_us(r.get('ring_us'))} | {r['table_us']:.1f} |")  # fmt: skip
    return md


def plot(result: dict[str, Any], out: Path) -> None:
    """Per model, bars per layer: the roofline, the read-only kernel, our one-token kernel
    and, where the run has it, that kernel's data path alone (the first format of the run,
    W4A16-g128 by default)."""
    plt = pyplot()
    fmt = result["summary"][0]["fmt"]
    runs = [s for s in result["summary"] if s["fmt"] == fmt]
    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4), squeeze=False)
    bars = [("roofline_us", "4-bit roofline"), ("read_us", "read-only kernel"),
            ("ring_us", "our kernel's data path alone"),
            ("table_us", "our one-token kernel")]  # fmt: skip
    bars = [(key, label) for key, label in bars if all(s.get(key) is not None for s in runs)]
    width = 0.8 / len(bars)
    for ax, s in zip(axes[0], runs, strict=True):
        names = [r["layer"] for r in s["layers"]] + ["sum / 4"]
        for i, (key, label) in enumerate(bars):
            vals = [r[key] for r in s["layers"]] + [s[key] / 4]
            pos = [j + (i - (len(bars) - 1) / 2) * width for j in range(len(names))]
            ax.bar(pos, vals, width=width, label=label)
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel("microseconds per linear, one token")
        ax.set_title(f"Llama-3-{s['model'].upper()}: read-only {s['read_pct']:.0f}%, "
                     f"ours {s['table_pct']:.0f}% of the roofline")  # fmt: skip
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    meta = result["meta"]
    fig.suptitle(f"{fmt} at one token: {meta['card']}, {meta['date']}, commit {meta['commit']} "
                 f"(bench/read_floor.py; empty kernel {result['empty_us']:.2f} us)",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--budget-s", type=float, default=200)
    ap.add_argument("--commit", default=None, help="the checkout's name (default: git HEAD)")
    ap.add_argument("--render", type=Path, default=None,
                    help="only draw the figure of an existing read_floor.json")  # fmt: skip
    args = ap.parse_args()
    if args.render:
        plot(json.loads(args.render.read_text()), args.render.with_suffix(".png"))
        return
    bw = copy_bandwidth_gbs()
    rows = measure(time.time() + args.budget_s)
    empty = next(r["us"] for r in rows if r["kind"] == "empty")
    result = dict(meta=gpu_run_meta(args.commit), bw_gbs=bw, empty_us=empty,
                  summary=summarize(rows, bw), rows=rows)  # fmt: skip
    write_report(args.out / "read_floor.json", result, markdown(result))
    plot(result, args.out / "read_floor.png")


if __name__ == "__main__":
    main()
