"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import subprocess


def git_commit() -> str:
    """Short hash of HEAD, or "unknown" where there is no git checkout (the GPU machine)."""
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
