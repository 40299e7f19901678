"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import subprocess

import torch


def git_commit() -> str:
    """Short hash of HEAD, or "unknown" where there is no git checkout (the GPU machine)."""
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


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
