"""Bench helpers that need no GPU: carry_pieces.py (a file moved to the device in pieces)
and the figures of the GPU verification-cost report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import carry_pieces as CP


def test_split_and_join_give_the_file_back(tmp_path: Path) -> None:
    src = tmp_path / "model.gguf"
    data = bytes(range(256)) * 9000  # 2.2 MiB
    src.write_bytes(data)
    manifest = CP.split(src, tmp_path / "carry", 1.0)
    spec = json.loads(manifest.read_text())
    assert [p["bytes"] for p in spec["pieces"]] == [1 << 20, 1 << 20, len(data) - (2 << 20)]
    CP.join(manifest, tmp_path / "out" / "model.gguf")
    assert (tmp_path / "out" / "model.gguf").read_bytes() == data


def test_join_names_missing_and_changed_pieces(tmp_path: Path) -> None:
    src = tmp_path / "f.bin"
    src.write_bytes(b"x" * 3000)
    manifest = CP.split(src, tmp_path / "c", 1000 / (1 << 20))
    (tmp_path / "c" / "f.bin.part01").unlink()
    (tmp_path / "c" / "f.bin.part02").write_bytes(b"y" * 1000)
    with pytest.raises(SystemExit, match=r"part01 is missing; f\.bin\.part02 differs"):
        CP.join(manifest, tmp_path / "out.bin")
    assert not (tmp_path / "out.bin").exists()
    with pytest.raises(ValueError, match="--max-mib must be positive, not 0"):
        CP.split(src, tmp_path / "c", 0)


def test_verify_cost_report_renders_without_a_gpu(tmp_path: Path) -> None:
    """gpu_verify_cost.py's markdown and figure from a committed report."""
    pytest.importorskip("matplotlib")
    import gpu_verify_cost as V

    report = json.loads((Path(V.__file__).parent / "results" / "gpu_verify_cost.json").read_text())
    md = "\n".join(V.markdown(report))
    assert "| w4a16-g128 | 3.16 | 3.38 |" in md and "t(64)/t(1)" in md
    V.plot(report, tmp_path / "v.png")
    assert (tmp_path / "v.png").stat().st_size > 10_000
