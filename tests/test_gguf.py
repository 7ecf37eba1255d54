"""GGUF quantize / dequantize / qdq: bit-identical to ggml on every path.

Oracles: ggml's own output (tests/data/ggml_golden, made by ggml's C
reference quantizers) and the ``gguf`` package (llama.cpp's Python
reference). Every test is parametrized over the format registry
(``mqo.gguf.FORMATS``) and over the paths (reference; GPU kernels where a GPU
backend exists), so a new format or path is tested without new code.
"""

from pathlib import Path

import gguf as gguf_ref
import mlx.core as mx
import numpy as np
import pytest
from distributions import KINDS, sample

import mlx_quant_ops as mqo

GOLDEN = Path(__file__).parent / "data" / "ggml_golden"
GOLDEN_SHAPE = (64, 1024)
DTYPES = {"f32": mx.float32, "f16": mx.float16, "bf16": mx.bfloat16}
FORMAT_NAMES = sorted(mqo.gguf.FORMATS)


def _qtype(name):
    return gguf_ref.GGMLQuantizationType[name]


def _bits(a) -> np.ndarray:
    """Raw bit patterns, so NaN and -0 compare exactly too."""
    a = np.asarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def _as_numpy(a: mx.array) -> np.ndarray:
    if a.dtype == mx.bfloat16:
        # numpy has no bfloat16; the float32 widening is exact.
        return np.array(a.astype(mx.float32))
    return np.array(a)


def assert_bit_identical(ours: mx.array, expected: np.ndarray, what: str):
    ours = _as_numpy(ours)
    assert (
        ours.shape == expected.shape
    ), f"{what}: shape {ours.shape} != {expected.shape}"
    mismatch = _bits(ours) != _bits(expected.astype(ours.dtype))
    if mismatch.any():
        first = np.argwhere(mismatch)[0]
        pytest.fail(
            f"{what}: {mismatch.sum()} of {mismatch.size} elements differ, first at "
            f"{tuple(first)}: ours {ours[tuple(first)]!r}, "
            f"expected {expected[tuple(first)]!r}"
        )


def _round_to(values: np.ndarray, dtype: mx.Dtype) -> np.ndarray:
    """float32 values rounded to ``dtype`` by MLX's cast, back as float32."""
    return np.array(mx.array(values).astype(dtype).astype(mx.float32))


# ---- ggml's own output ------------------------------------------------------


def _golden(name, suffix, dtype, shape):
    path = GOLDEN / f"{name.lower()}_{suffix}.bin"
    return np.fromfile(path, dtype=dtype).reshape(shape)


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_matches_ggml_golden(name, path):
    fmt = mqo.gguf.FORMATS[name]
    x = np.fromfile(GOLDEN / "input_f32.bin", dtype=np.float32).reshape(GOLDEN_SHAPE)
    row_bytes = GOLDEN_SHAPE[1] // fmt.block_elems * fmt.block_bytes
    blocks = _golden(name, "blocks", np.uint8, (GOLDEN_SHAPE[0], row_bytes))
    values = _golden(name, "dequant_f32", np.float32, GOLDEN_SHAPE)

    assert_bit_identical(mqo.gguf.quantize(mx.array(x), name), blocks, "quantize")
    assert_bit_identical(
        mqo.gguf.dequantize(mx.array(blocks), name), values, "dequantize"
    )
    assert_bit_identical(mqo.gguf.qdq(mx.array(x), name), values, "qdq")


# ---- the gguf package on fresh data -----------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=list(DTYPES))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_matches_gguf_package(name, kind, dtype, path):
    fmt = mqo.gguf.FORMATS[name]
    dtype = DTYPES[dtype]
    rows, cols = 7, 3 * fmt.block_elems  # odd row count, several blocks
    x = mx.array(sample(kind, rows, cols, fmt.block_elems)).astype(dtype)
    # ggml quantizes float32; the input dtype's values, widened exactly.
    x32 = _as_numpy(x).astype(np.float32)

    expected_blocks = gguf_ref.quants.quantize(x32, _qtype(name))
    expected_values = gguf_ref.quants.dequantize(expected_blocks, _qtype(name))

    blocks = mqo.gguf.quantize(x, name)
    assert_bit_identical(blocks, expected_blocks, "quantize")
    assert_bit_identical(
        mqo.gguf.dequantize(blocks, name), expected_values, "dequantize f32"
    )
    assert_bit_identical(
        mqo.gguf.dequantize(blocks, name, dtype=dtype),
        _round_to(expected_values, dtype),
        f"dequantize {dtype}",
    )
    qdq = mqo.gguf.qdq(x, name)
    assert qdq.dtype == dtype
    assert_bit_identical(qdq, _round_to(expected_values, dtype), "qdq")


@pytest.mark.parametrize(
    "shape",
    [(1, 1), (5, 3, 2), (2, 1, 1, 9), (1,)],
    ids=lambda s: "x".join(map(str, s)),
)
@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_leading_shapes(name, shape, path):
    """Any leading shape; the last axis counts blocks."""
    fmt = mqo.gguf.FORMATS[name]
    *lead, n_blocks = shape
    cols = n_blocks * fmt.block_elems
    rows = int(np.prod(lead)) if lead else 1
    x32 = sample("outliers", rows, cols, fmt.block_elems, seed=3)
    x = mx.array(x32.reshape(*lead, cols))
    blocks = mqo.gguf.quantize(x, name)
    assert blocks.shape == (*lead, n_blocks * fmt.block_bytes)
    expected = gguf_ref.quants.quantize(x32, _qtype(name))
    assert_bit_identical(blocks.reshape(rows, -1), expected, "quantize")
    values = mqo.gguf.dequantize(blocks, name)
    assert values.shape == x.shape
    assert_bit_identical(
        values.reshape(rows, -1),
        gguf_ref.quants.dequantize(expected, _qtype(name)),
        "dequantize",
    )


@pytest.mark.parametrize("shape", [(0, 2), (2, 0, 1)], ids=("0x2", "2x0x1"))
@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_no_rows(name, shape, path):
    """Empty inputs give empty blocks and values (MLX's argmax, which the
    reference quantizers use, refuses every empty array)."""
    fmt = mqo.gguf.FORMATS[name]
    *lead, n_blocks = shape
    x = mx.zeros((*lead, n_blocks * fmt.block_elems), mx.float16)
    blocks = mqo.gguf.quantize(x, name)
    expected = gguf_ref.quants.quantize(np.zeros(x.shape, np.float32), _qtype(name))
    assert_bit_identical(blocks, expected, "quantize")
    for values in (
        mqo.gguf.dequantize(blocks, name, mx.float16),
        mqo.gguf.qdq(x, name),
    ):
        mx.eval(values)
        assert values.shape == x.shape and values.dtype == mx.float16


def test_type_names_are_case_insensitive():
    x = mx.array(sample("normal", 2, 64, 32))
    for name in FORMAT_NAMES:
        assert mx.array_equal(
            mqo.gguf.quantize(x, name.lower()), mqo.gguf.quantize(x, name)
        )


def test_registry_layout_matches_gguf_package():
    for name, fmt in mqo.gguf.FORMATS.items():
        block_elems, block_bytes = gguf_ref.GGML_QUANT_SIZES[_qtype(name)]
        assert (fmt.block_elems, fmt.block_bytes) == (block_elems, block_bytes)
        assert fmt.ggml_type == int(_qtype(name))


# ---- errors -----------------------------------------------------------------

ERROR_CASES = [
    # (op, call, exception, text the message must contain)
    (
        "quantize",
        lambda: mqo.gguf.quantize([1.0] * 32, "Q4_0"),
        TypeError,
        "[mlx_quant_ops.gguf.quantize] x: expected an mlx.core.array, got list",
    ),
    (
        "quantize",
        lambda: mqo.gguf.quantize(mx.zeros((2, 32), dtype=mx.int32), "Q4_0"),
        TypeError,
        "[mlx_quant_ops.gguf.quantize] x: expected dtype float32, float16 or "
        "bfloat16, got int32",
    ),
    (
        "quantize",
        lambda: mqo.gguf.quantize(mx.zeros((2, 48)), "Q8_0"),
        ValueError,
        "[mlx_quant_ops.gguf.quantize] x: expected a last axis that is a positive "
        "multiple of 32 (Q8_0 blocks hold 32 values), got shape (2, 48)",
    ),
    (
        "quantize",
        lambda: mqo.gguf.quantize(mx.array(1.0), "Q8_0"),
        ValueError,
        "got shape ()",
    ),
    (
        "quantize",
        lambda: mqo.gguf.quantize(mx.zeros((2, 0)), "Q8_0"),
        ValueError,
        "got shape (2, 0)",
    ),
    (
        "quantize",
        lambda: mqo.gguf.quantize(mx.zeros((2, 32)), "Q3_X"),
        ValueError,
        "[mlx_quant_ops.gguf.quantize] type: expected one of",
    ),
    (
        "quantize",
        lambda: mqo.gguf.quantize(mx.zeros((2, 32)), 2),
        TypeError,
        "[mlx_quant_ops.gguf.quantize] type: expected a GGUF type name (str), got 2",
    ),
    (
        "dequantize",
        lambda: mqo.gguf.dequantize(mx.zeros((2, 18), dtype=mx.int8), "Q4_0"),
        TypeError,
        "[mlx_quant_ops.gguf.dequantize] blocks: expected dtype uint8, got int8",
    ),
    (
        "dequantize",
        lambda: mqo.gguf.dequantize(mx.zeros((2, 35), dtype=mx.uint8), "Q8_0"),
        ValueError,
        "[mlx_quant_ops.gguf.dequantize] blocks: expected a last axis that is a "
        "positive multiple of 34 (Q8_0 blocks are 34 bytes), got shape (2, 35)",
    ),
    (
        "dequantize",
        lambda: mqo.gguf.dequantize(
            mx.zeros((2, 18), dtype=mx.uint8), "Q4_0", dtype=mx.int32
        ),
        TypeError,
        "[mlx_quant_ops.gguf.dequantize] dtype: expected mlx.core.float32, "
        "mlx.core.float16 or mlx.core.bfloat16, got mlx.core.int32",
    ),
    (
        "qdq",
        lambda: mqo.gguf.qdq(mx.zeros((3, 31), dtype=mx.float16), "q4_0"),
        ValueError,
        "[mlx_quant_ops.gguf.qdq] x: expected a last axis that is a positive "
        "multiple of 32 (Q4_0 blocks hold 32 values), got shape (3, 31)",
    ),
]


@pytest.mark.parametrize(
    "case", ERROR_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(ERROR_CASES)]
)
def test_errors(case, path):
    """Same exception and message on every path, raised before any launch."""
    _, call, exception, text = case
    with pytest.raises(exception) as info:
        call()
    assert text in str(info.value)
