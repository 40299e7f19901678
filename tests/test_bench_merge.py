"""bench/kernel_perf.py --merge: one report from runs that each finished part of the models."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

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
