"""Tokenizers through `transformers`, from an HF directory or from GGUF metadata.

Converting a GGUF vocabulary takes seconds, so the converted tokenizer is cached on disk,
keyed by the GGUF file's path, size and modification time.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any


def cache_dir() -> Path:
    root = os.environ.get("SPECQUANT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "specquant"
    )
    return Path(root)


def load_tokenizer(path: Path, gguf_file: Path | None = None) -> Any:
    from transformers import AutoTokenizer

    if gguf_file is None:
        return AutoTokenizer.from_pretrained(str(path))
    st = gguf_file.stat()
    key = hashlib.sha256(f"{gguf_file.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    cached = cache_dir() / "tokenizers" / key.hexdigest()[:16]
    if (cached / "tokenizer_config.json").exists():
        try:
            return AutoTokenizer.from_pretrained(str(cached))
        except Exception:  # a stale or partial cache entry: rebuild it below
            pass
    tok = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    try:
        tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
        tok.save_pretrained(str(tmp))
        if cached.exists():  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, cached)
    except OSError:
        pass  # a read-only cache only costs time
    return tok
