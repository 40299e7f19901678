"""specquant: fast, lossless LLM decoding — speculative decoding meets quantization."""

from __future__ import annotations

import os
from pathlib import Path

# NOTE: the optional OpenBLAS linear kernel (kernels/builtin.py) calls numpy between torch
# ops; with torch's spinning OpenMP workers the two thread pools fight for the cores. It is
# used only when OMP_WAIT_POLICY=PASSIVE was set before torch started its OpenMP runtime
# (checked here, at import): by default torch's own matmul serves the CPU, which measured
# faster on our 2-core machines (bench/results/cpu_decode.md).
OMP_SPINNING = os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE"

from specquant.config import (  # noqa: E402
    EngineConfig,
    GenerationConfig,
    ModelConfig,
    SamplingParams,
    SpecConfig,
)
from specquant.engine.generator import ChatSession, GenerationResult, Generator  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "ChatSession",
    "EngineConfig",
    "GenerationConfig",
    "GenerationResult",
    "Generator",
    "ModelConfig",
    "SamplingParams",
    "SpecConfig",
    "load",
]


def load(
    model: str | Path | None = None,
    *,
    device: str = EngineConfig.device,
    dtype: str = EngineConfig.dtype,
    max_seq_len: int = EngineConfig.max_seq_len,
    cuda_graphs: bool = EngineConfig.cuda_graphs,
    spec: SpecConfig | None = None,
) -> Generator:
    """Load a model (HF directory, .gguf file, or the embedded SmolLM2 default when None)
    and return a `Generator` with `.generate(...)`; `spec` picks a speculative method and
    its drafters (default: plain autoregressive decoding)."""
    from specquant.engine.generator import resolve_device, resolve_dtype
    from specquant.io.loader import load_checkpoint
    from specquant.spec.factory import build_generator

    engine = EngineConfig(
        device=device, dtype=dtype, max_seq_len=max_seq_len, cuda_graphs=cuda_graphs
    )
    spec = spec or SpecConfig()
    dev = resolve_device(engine.device)
    loaded = load_checkpoint(model, dev, resolve_dtype(engine.dtype, dev))
    return build_generator(loaded, engine, spec)
