"""Path selection: the stream's device, the environment variable and
``use_backend``; unknown or unavailable backends are errors."""

import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

import mlx_quant_ops as mqo
from mlx_quant_ops._backend import gpu_backend


def test_cpu_stream_runs_the_reference():
    assert mqo.backend(mx.cpu) == "reference"
    assert mqo.backend(mx.default_stream(mx.cpu)) == "reference"


def test_gpu_stream_follows_the_build():
    if gpu_backend() is None:
        pytest.skip("no GPU backend")
    assert mqo.backend(mx.gpu) == gpu_backend()


def test_use_backend_overrides_and_restores():
    before = mqo.backend(mx.cpu)
    with mqo.use_backend("REFERENCE") as name:
        assert name == "reference"
        assert mqo.backend(mx.gpu) == "reference"
    assert mqo.backend(mx.cpu) == before


@pytest.mark.parametrize("name", ["vulkan", "", 3])
def test_use_backend_rejects_unknown_names(name):
    with pytest.raises(
        ValueError, match=r"use_backend\(name\): expected one of metal, cuda, reference"
    ):
        with mqo.use_backend(name):
            pass


def test_use_backend_rejects_unavailable_gpu():
    missing = [b for b in ("metal", "cuda") if b != gpu_backend()]
    for name in missing:
        with pytest.raises(ValueError, match=f"backend '{name}' is not available"):
            with mqo.use_backend(name):
                pass


def _backend_in_subprocess(value):
    env = dict(os.environ, MLX_QUANT_OPS_BACKEND=value)
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "import mlx_quant_ops as m, mlx.core as mx; print(m.backend(mx.gpu))",
        ],
        env=env,
        capture_output=True,
        text=True,
    )


def test_environment_variable_selects_the_path():
    result = _backend_in_subprocess("reference")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "reference"


def test_environment_variable_rejects_unknown_names():
    result = _backend_in_subprocess("tpu")
    assert result.returncode != 0
    assert (
        "environment variable MLX_QUANT_OPS_BACKEND: expected one of" in result.stderr
    )


@pytest.mark.gpu
def test_cuda_include_and_inline_sources_give_the_same_kernels():
    # CUDA kernels normally reach MLX as #include lines; the inline text is
    # the fallback where the package folder cannot be spelled in one. Both
    # must build and compute the same thing.
    if gpu_backend() != "cuda":
        pytest.skip("CUDA only")
    from mlx_quant_ops import _kernels

    w = mx.random.normal((40, 256), key=mx.random.key(0)).astype(mx.float16)
    x = mx.random.normal((3, 256), key=mx.random.key(1)).astype(mx.float16)
    packed = mqo.quantize(w, 64, 4)
    outputs = []
    for includes in (True, False):
        token = _kernels.CUDA_INCLUDES.set(includes)
        try:
            with mx.stream(mx.gpu):
                out = mqo.quantized_matmul(x, *packed, True, 64, 4)
                mx.eval(out)
        finally:
            _kernels.CUDA_INCLUDES.reset(token)
        outputs.append(out)
    assert mx.array_equal(outputs[0], outputs[1]).item()
    # And what they compute is the product (normwise, float64 on the host).
    dense = np.array(mx.dequantize(*packed, 64, 4, stream=mx.cpu), dtype=np.float64)
    exact = np.array(x, dtype=np.float64) @ dense.T
    error = np.linalg.norm(np.array(outputs[0], dtype=np.float64) - exact)
    assert error <= 5e-3 * np.linalg.norm(exact)  # tests/test_affine.py TOLERANCE
