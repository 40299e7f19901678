"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import json
import statistics
import subprocess
from pathlib import Path
from typing import Any

import torch


def git_commit() -> str:
    """Short hash of HEAD, "+modified" where tracked files differ from it (the GPU machine's
    copy of the tree can carry a stale HEAD: pass the commit there), or "unknown" without
    a git checkout."""
    try:
        head = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
        changed = subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no"],
                                          text=True).strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+modified" if changed else "")


def cpu_run_meta() -> dict[str, str]:
    """Where and when a CPU benchmark ran: cpu, torch, date, commit (for its report)."""
    import platform
    import time

    return {
        "cpu": f"{platform.machine()} ({torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "commit": git_commit(),
    }


def cpu_run_text(meta: dict[str, Any]) -> str:
    """The report's first words: where and when it ran (a dict with cpu_run_meta's keys)."""
    return f"CPU {meta['cpu']}, torch {meta['torch']}, {meta['date']}, commit {meta['commit']}."


def gpu_run_meta(commit: str | None = None) -> dict[str, str]:
    """Where and when a GPU benchmark ran: card, torch, date, commit (given, or git HEAD)."""
    import time

    return {
        "card": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "commit": commit or git_commit(),
    }


def gpu_run_where(meta: dict[str, Any]) -> str:
    """Card, date, commit and torch of a GPU run (gpu_run_meta's keys), as reports open."""
    return (f"Card: {meta['card']}; date {meta['date']}; commit {meta['commit']}; torch "
            f"{meta['torch']}")  # fmt: skip


def gpu_run_text(meta: dict[str, Any], stage: str) -> str:
    """The report's first words for a `bench/gpu_kernels.sh` stage (gpu_run_meta's keys)."""
    return f"{gpu_run_where(meta)}. Reproduce: `STAGE={stage} bench/gpu_kernels.sh`."


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend, or an exit that says how to get it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("the plot needs matplotlib: pip install 'specquant[bench]'") from None
    return plt


def write_report(out: Path, report: dict[str, Any], md: list[str]) -> None:
    """The JSON report at `out` and its markdown next to it (same name, .md); the markdown is
    also printed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def copy_bandwidth_gbs(device: torch.device | str = "cuda") -> float:
    """Device-to-device copy of 2 GiB, bytes read + written, median of 10 (after 2 warm-ups)."""
    a = torch.empty(2**29, dtype=torch.float32, device=device).normal_()
    b = torch.empty_like(a)
    times = []
    for _ in range(12):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return 2 * a.numel() * 4 / statistics.median(times[2:]) / 1e9
