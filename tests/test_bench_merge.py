"""bench/kernel_perf.py --merge (one report from runs that each finished part of the models),
its goal lines, kernel_profile.py's argument checks, wgmma_probe's table and report, and
read_floor.py's summary, report and figure."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import kernel_perf as KP


def _run(path: Path, model: str | None, us: float, commit: str = "abc") -> Path:
    """A kernel_perf.json whose per-linear rows cover `model` only (None: no model)."""
    rows = []
    if model is not None:
        for k, n in KP.SHAPES[model].values():
            for m in KP.MS:
                rows.append(dict(model=model, impl="w4a16-g128", m=m, k=k, n=n,
                                 weight_bytes=n * k // 2, us=us * (1 + m / 64)))  # fmt: skip
    meta = dict(card="H200", date="2026-11-28", commit=commit, torch="t", triton="3.6",
                copy_bw_gbs=4000.0, seconds=1.0, tile_configs="built-in")  # fmt: skip
    chains = [dict(model="8b", impl="bf16", m=1, us=us)]
    report = dict(meta=meta, goals=[], summary=KP.summarize(rows, 4000.0), rows=rows,
                  chains=chains)  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report))
    return path


def test_merge_takes_each_model_from_the_first_run_that_measured_it(tmp_path) -> None:
    first = _run(tmp_path / "a" / "kernel_perf.json", "8b", 10.0)
    second = _run(tmp_path / "b" / "kernel_perf.json", "70b", 20.0)
    KP.merge([first, second], tmp_path / "out")
    report = json.loads((tmp_path / "out" / "kernel_perf.json").read_text())
    assert {r["model"] for r in report["rows"]} == {"8b", "70b"}
    assert report["chains"] == json.loads(first.read_text())["chains"]
    # t(64)/t(1) of the fake timings: (1 + 64/64) / (1 + 1/64)
    assert any("8b W4A16-g128" in g and "time(64)/time(1) = 1.97" in g for g in report["goals"])
    assert any(g.startswith("70b W4A16-g128") for g in report["goals"])
    md = (tmp_path / "out" / "kernel_perf.md").read_text()
    assert "Merged: 8b per linear from run 1 of 2" in md
    assert "Merged: 70b per linear from run 2 of 2" in md


def test_merge_refuses_runs_of_different_commits(tmp_path) -> None:
    first = _run(tmp_path / "a" / "kernel_perf.json", "8b", 10.0)
    second = _run(tmp_path / "b" / "kernel_perf.json", "70b", 20.0, commit="def")
    with pytest.raises(SystemExit, match="one commit on one card"):
        KP.merge([first, second], tmp_path / "out")


def test_chain_goals_compare_w4a8_with_w4a16_from_32_tokens_as_the_model_runs_them() -> None:
    def row(impl: str, m: int, us: float) -> dict[str, object]:
        return dict(model="8b", impl=impl, m=m, us=us)

    faster = [row("w4a8", m, 10.0) for m in (16, 32, 64)] + [
        row("w4a16", m, 20.0 if m >= 32 else 5.0) for m in (16, 32, 64)
    ]
    assert KP.chain_goals(faster) == [
        "8b W4A8 layer linears as run in the model faster than W4A16 (both per channel) at "
        "M >= 32: yes"
    ]  # slower at 16 tokens does not count
    slower = [*faster, row("w4a8", 128, 30.0), row("w4a16", 128, 25.0)]
    assert KP.chain_goals(slower)[0].endswith("no, not at M=[128]")


def _bench_cli(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """A bench/ script run as the GPU session runs it (no GPU here)."""
    root = Path(__file__).resolve().parents[1]
    return subprocess.run(
        [sys.executable, str(root / "bench" / script), *args],
        capture_output=True, text=True, cwd=root / "bench",
        env={"PYTHONPATH": f"{root / 'src'}:{root / 'bench'}", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip


def test_kernel_profile_rejects_an_unknown_layer_before_touching_the_gpu() -> None:
    out = _bench_cli("kernel_profile.py", "--layer", "mlp")
    assert out.returncode != 0
    assert "--layer must be one of ['down', 'gate_up', 'o', 'qkv'], not mlp" in out.stderr


def test_wgmma_probe_table_picks_a_config_only_where_it_beats_the_canonical_kernel() -> None:
    import wgmma_probe as P

    def row(layer: str, m: int, us: float, config: list | None = None) -> dict[str, object]:
        k, n = KP.SHAPES["8b"][layer]
        kernel = "canonical" if config is None else "wgmma"
        return dict(fmt="w4a16", model="8b", layer=layer, n=n, k=k, bytes=1, m=m,
                    kernel=kernel, us=us, **({"config": config} if config else {}))  # fmt: skip

    fast, slow = [128, 128, 8, 3, 1, True, False, False], [64, 128, 4, 3, 1, False, False, True]
    rows = [row("qkv", 16, 10.0), row("qkv", 16, 8.0, fast), row("qkv", 16, 9.0, slow),
            row("qkv", 64, 10.0), row("qkv", 64, 12.0, fast)]  # fmt: skip
    rows.append(dict(row("qkv", 64, 1.5), kernel=P.GATHER))  # not a kernel the table picks
    table = P.table(rows)
    assert table["16"][0] == fast  # qkv is in the smallest size class
    assert table["64"][0] is None  # the canonical kernel was faster
    result = dict(card="H200", torch="t", date="d", commit="c", checks=[], timings=rows,
                  sums=P.sums(rows), table=table, joined=None, finished=False)  # fmt: skip
    md = "\n".join(P.markdown(result))
    assert "**Partial**" in md
    assert "- w4a16 8b M=64: canonical 10.0, " in md  # the gather is no ranked kernel
    assert f"12.0 ({P.GATHER} 1.5, not in the x_perm times)" in md
    # the buckets are the token counts the run timed (prefill sizes too), and the canonical
    # kernel is listed even behind six faster entries ("wgmma best" is one)
    many = [row("qkv", 256, 100.0), *(row("qkv", 256, 50.0 + i, [*fast[:-1], i]) for i in range(7))]
    assert list(P.table(many)) == ["256"]
    result.update(timings=many, sums=P.sums(many), table=P.table(many))
    line = next(x for x in P.markdown(result) if x.startswith("- w4a16 8b M=256"))
    assert line.endswith(" 54.0, canonical 100.0") and "55.0" not in line, line


def test_gather_probe_ways_agree_with_the_launchers_gather() -> None:
    """The view/permute form of the mma-order gather equals the index_select the wgmma
    launcher uses (on the CPU; the GPU run checks it again before timing)."""
    import gather_probe as G

    x = torch.randn(3, 512)
    assert torch.equal(G.by_permute(x), G.by_index(x))
    assert not torch.equal(G.by_index(x), x)  # a real permutation


def test_kernel_perf_rejects_unknown_formats() -> None:
    out = _bench_cli("kernel_perf.py", "--formats", "w4a16,w3")
    assert out.returncode and "unknown formats or baselines ['w3']" in out.stderr


def test_kernel_perf_tune_only_rejects_untunable_formats_and_buckets() -> None:
    out = _bench_cli("kernel_perf.py", "--tune-only", "--formats", "fp8", "--buckets", "64,100")
    assert out.returncode and "got ['fp8'] and ['64', '100']" in out.stderr
    out = _bench_cli("kernel_perf.py", "--tune-only", "--formats", "fp8,w4a16-g128:canonical")
    assert out.returncode and "--tune-only tunes formats" in out.stderr
    out = _bench_cli("kernel_perf.py", "--buckets", "64")
    assert out.returncode and "to time token counts use --ms" in out.stderr


def test_kernel_perf_partial_tune_keeps_the_untuned_buckets() -> None:
    """A run that tuned fp8 at 128 tokens writes a table that measures 1-64 tokens with the
    built-in rules, not with the 128 bucket's."""
    import specquant.kernels.triton_ops.qlinear as Q

    def row(model: str, layer: str, us: float, cfg: tuple[int, ...]) -> dict[str, object]:
        return dict(fmt="fp8", model=model, layer=layer, m=128, cfg=list(cfg), us=us)

    fast, slow = KP._candidates("fp8", 128)[:2]
    rows = [row(mo, la, 1.0, fast) for mo, la in KP.TUNE_SHAPES]
    rows += [row(mo, la, 3.0, slow) for mo, la in KP.TUNE_SHAPES]
    table = KP.with_untuned_buckets(KP.best_configs(rows))
    assert list(table) == ["fp8"]  # only what the rows tuned
    saved = list(Q.CONFIGS["fp8"])
    try:
        KP.apply_configs(table)
        for w in (16 << 20, 100 << 20, 1 << 40):
            assert Q.config_for("fp8", 128, w) == Q.TileConfig(*fast)
        assert [r[:2] for r in Q.CONFIGS["fp8"]] == [r[:2] for r in saved]
        for m, w, cfg in saved:
            if m != 128:
                assert Q.config_for("fp8", m, w) == cfg
    finally:
        Q.CONFIGS["fp8"] = saved


def test_kernel_profile_summarizes_an_ncu_sass_stall_csv(tmp_path: Path) -> None:
    import kernel_profile as KPR

    head = ["Address", "Source", "Warp Stall Sampling (All Samples)", "stall_barrier",
            "stall_long_sb", "stall_long_sb (Not Issued)"]  # fmt: skip
    lines = [["Kernel Name", "_w4_wgmma_kernel"], head,
             ["0x10", "WARPGROUP.DEPBAR.LE gsb0, 0x0", "30", "30", "0", "0"],
             ["0x20", "@!P5 LDG.E R1, desc[UR10][R2.64]", "10", "0", "10", "10"]]  # fmt: skip
    path = tmp_path / "p_sass.csv"
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(lines)
    out = KPR.stall_summary(path)
    assert out[1] == "reasons: barrier 75%, long_sb 25%"
    assert out[2] == "opcodes: WARPGROUP 75%, LDG 25%"
    assert out[3].split() == ["75.0%", "WARPGROUP.DEPBAR.LE", "gsb0,", "0x0", "{'barrier':", "30}"]
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n")
    with pytest.raises(SystemExit, match="no 'Warp Stall Sampling"):
        KPR.stall_summary(bad)


def test_split_probe_report_names_the_launchers_choice_and_leaves_untimed_splits_blank() -> None:
    import split_probe as S

    meta = dict(card="H200", date="2026-11-28", commit="abc", torch="t")
    row = dict(model="70b", layer="qkv", m=32, n=10240, k=8192, tiles=80, config=[],
               launcher=2, us={1: 40.3, 2: 34.0, 4: 27.8, 8: 29.6})  # fmt: skip
    md = S.markdown(meta, [row])
    assert "| 70b | qkv | 32 | 80 | 2: 34.0 | 40.3 | 34.0 |  | 27.8 |  | 29.6 |" in md
    assert md[-2].count("|") == md[-1].count("|")  # the header and the row line up


def test_w4a8_probe_sums_each_layer_set_and_skips_a_model_the_budget_cut_short() -> None:
    import w4a8_probe as W

    meta = dict(card="H200", date="2026-11-28", commit="abc", torch="t")
    rows = []
    for layer in KP.SHAPES["8b"]:
        for m in W.MS:
            base = dict(model="8b", layer=layer, m=m)
            rows += [dict(base, kernel="w4a8:gemm", us=10.0), dict(base, kernel="w4a16", us=8.0),
                     dict(base, kernel="w4a8-wgmma", config=[128], us=6.0),
                     dict(base, kernel="w4a8-wgmma", config=[64], us=7.0 if layer == "o" else 5.0),
                     dict(base, kernel="w4a8-wgmma", config=[256], error="smem")]  # fmt: skip
    rows.append(dict(model="70b", layer="qkv", m=1, kernel="w4a16", us=1.0))
    md = W.markdown(meta, [dict(rel_err=1e-3)], rows)
    assert "| w4a8 | 8b | 64 | 40.0 | 32.0 | 21.0 | 22.0 [64] |" in md
    assert not any(line.startswith("| w4a8 | 70b") for line in md)
    # every config failed on one layer: no crash, and the failed check is flagged
    rows = [r for r in rows if not (r["layer"] == "o" and r["m"] == 1 and "config" in r)]
    md = W.markdown(meta, [dict(rel_err=1e-3), dict(rel_err=0.5)], rows)
    assert "| w4a8 | 8b | 1 | 40.0 | 32.0 | nan | none ran on all |" in md
    assert "**1 FAILED**" in md[4]


def test_w4a8_probe_rejects_an_unknown_format_before_touching_the_gpu() -> None:
    out = _bench_cli("w4a8_probe.py", "--formats", "w4a8,w4a8-g64")
    assert out.returncode and "unknown formats in ['w4a8', 'w4a8-g64']" in out.stderr


def test_frag_probe_report_of_a_tune_only_run_says_the_checks_did_not_run() -> None:
    import frag_probe as F

    meta = dict(card="H200", date="2026-11-28", commit="abc", torch="t")
    md = "\n".join(F.markdown(dict(meta, checks=[], compare=[], table={})))
    assert "Checks against dequantize-and-matmul: not run (not among --stages)." in md
    md = "\n".join(F.markdown(dict(meta, checks=[dict(rel_err=2e-3, roundtrip=True)],
                                   compare=[], table={})))  # fmt: skip
    assert "1 cases, worst relative error 2.0e-03; packing round-trips: yes." in md


def test_kernel_plot_draws_each_models_chains_and_ratios(tmp_path) -> None:
    import kernel_plot as P

    def totals(base: float) -> dict[str, float]:
        return {str(m): base * (1 + m / 64) for m in (1, 32, 64)}

    report = {
        "meta": dict(card="H200", date="2026-11-28", commit="abc"),
        "summary": {
            "8b": {
                "total_us": {
                    "w4a8": totals(50.0),
                    "bf16-cublas": totals(100.0),
                    "made-up": totals(1.0),
                }
            }
        },
        "chains": [
            dict(model="8b", impl=impl, m=m, us=us)
            for impl, m, us in [
                ("w4a8", 64, 90.0),
                ("w4a8", 1, 60.0),
                ("bf16", 1, 130.0),
                ("made-up", 1, 1.0),
                ("w8a8", 1, None),
            ]
        ],
    }
    assert P.chain_series(report, "8b") == {"bf16": [(1, 130.0)], "w4a8": [(1, 60.0), (64, 90.0)]}
    ratios = P.ratio_series(report, "8b")
    assert list(ratios) == ["bf16-cublas", "w4a8"]
    assert [m for m, _ in ratios["w4a8"]] == [1, 32, 64]
    assert [r for _, r in ratios["w4a8"]] == pytest.approx(
        [1.0, 1.5 / (1 + 1 / 64), 2 / (1 + 1 / 64)]
    )
    assert P.chain_series(report, "70b") == {} and P.ratio_series(report, "70b") == {}
    pytest.importorskip("matplotlib")
    P.plot(report, tmp_path / "k.png")
    assert (tmp_path / "k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match="no per-model timings"):
        P.plot(dict(report, summary={}, chains=[]), tmp_path / "none.png")


def test_cpu_spec_quant_report_compares_each_target_with_its_own_and_the_dense_ar() -> None:
    import cpu_spec_quant as C

    def row(target: str, method: str, tok_s: float, same: bool = True) -> dict[str, object]:
        return dict(target=target, method=method, tok_s=tok_s, accept=2.0, same_tokens=same)

    report = dict(cpu="x86_64 (2 threads)", torch="t", date="d", commit="c", prompts=6,
                  new_tokens=64, rows=[row("dense", "ar", 30.0), row("dense", "sps", 15.0),
                                       row("w8a8", "ar", 40.0),
                                       row("w8a8", "eagle2", 50.0, False)])  # fmt: skip
    lines = C.markdown(report)
    assert "| dense | sps | 15.0 | 0.50x | 0.50x | 2.00 | yes |" in lines
    assert "| w8a8 | eagle2 | 50.0 | 1.25x | 1.67x | 2.00 | NO |" in lines


def _floor_rows() -> list[dict]:
    """read_floor.py's rows for both models and formats: a read-only kernel at two configs
    (the faster one must be taken) and the one-token table kernel, per layer; the table's
    ring alone for the first format only (the other's picks have no ring)."""
    import read_floor as RF

    rows: list[dict] = [dict(kind="empty", us=1.0)]
    for fmt in RF.FORMATS:
        for model, shapes in KP.SHAPES.items():
            for layer, (k, n) in shapes.items():
                base = dict(fmt=fmt, model=model, layer=layer, n=n, k=k, bytes=n * k // 2)
                mb = n * k / 2e6
                rows.append(dict(base, kind="table", config="cfg", us=2 + mb / 2000))
                rows.append(dict(base, kind="read", config=[8, 2048, 8], us=1 + mb / 4000))
                rows.append(dict(base, kind="read", config=[1, 2048, 4], us=5 + mb / 1000))
                if fmt == RF.FORMATS[0]:
                    rows.append(dict(base, kind="ring", config="cfg", us=1.5 + mb / 3000))
    return rows


def test_read_floor_summarizes_the_fastest_reader_and_draws_it(tmp_path) -> None:
    pytest.importorskip("triton")
    import read_floor as RF

    summary = RF.summarize(_floor_rows(), 4000.0)
    assert [(s["fmt"], s["model"]) for s in summary] == [
        (f, m) for f in RF.FORMATS for m in KP.SHAPES
    ]
    s = summary[0]
    assert all(r["read_config"] == [8, 2048, 8] for r in s["layers"])  # the faster reader
    layer = s["layers"][0]
    assert layer["roofline_us"] == pytest.approx(
        (layer["bytes"] + 2 * sum(KP.SHAPES[s["model"]][layer["layer"]])) / 4e6
    )
    assert s["read_pct"] == pytest.approx(100 * s["roofline_us"] / s["read_us"])
    assert s["table_pct"] < s["read_pct"]  # the synthetic table kernel is the slower one
    assert s["ring_us"] == pytest.approx(sum(r["ring_us"] for r in s["layers"]))
    assert summary[-1]["ring_us"] is None  # a format whose picks have no ring
    meta = dict(card="H200", date="2026-11-29", commit="abc", torch="t")
    result = dict(meta=meta, bw_gbs=4000.0, empty_us=1.0, summary=summary, rows=[])
    md = "\n".join(RF.markdown(result))
    assert "An empty kernel: 1.00 us" in md and "| w4a16 | 70b |" in md
    assert f"| {summary[-1]['read_us']:.1f} | - | {summary[-1]['table_us']:.1f} |" in md
    pytest.importorskip("matplotlib")
    out = tmp_path / "read_floor.png"
    RF.plot(result, out)
    assert out.stat().st_size > 10_000


def test_read_floor_leaves_out_a_model_the_run_did_not_finish() -> None:
    pytest.importorskip("triton")
    import read_floor as RF

    rows = [r for r in _floor_rows() if not (r.get("model") == "70b" and r.get("layer") == "down")]
    assert {s["model"] for s in RF.summarize(rows, 4000.0)} == {"8b"}
