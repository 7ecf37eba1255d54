"""mlx-quant-ops: fast, exact quantization kernels for MLX as custom ops.

Three format families (MLX affine, DWQ, llama.cpp's GGUF), each op on three
paths: a Metal kernel, the same kernel on NVIDIA through MLX's CUDA backend,
and a pure-``mx`` reference that serves the CPU and is the oracle. See
``DESIGN.md`` for the contract.
"""

import importlib
from pathlib import Path

from . import affine, gguf
from ._backend import BACKENDS, backend, use_backend
from .affine import (
    dequantize,
    fused_quantized_matmul,
    gather_qmm,
    quantize,
    quantized_matmul,
)

__version__ = "0.1.0"

DEFAULT_MODEL = "pystdlib-llama"


def default_model_path() -> Path:
    """The directory of the embedded small language model (mlx-lm format).

    Returns:
        pathlib.Path: a directory ``mlx_lm.load`` opens.
    """
    return Path(__file__).resolve().parent / "models" / DEFAULT_MODEL


def __getattr__(name: str):
    # ``mqo.nn`` is imported on first use: it imports mlx-lm (for the MoE
    # layer it subclasses), which takes over a second and is optional.
    if name == "nn":
        return importlib.import_module(f"{__name__}.nn")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BACKENDS",
    "backend",
    "use_backend",
    "default_model_path",
    "gguf",
    "affine",
    "quantize",
    "dequantize",
    "quantized_matmul",
    "fused_quantized_matmul",
    "gather_qmm",
    "nn",
]
