"""MLX affine ops (quantize, dequantize, quantized_matmul, gather_qmm) on
every path.

Oracles: MLX's own built-ins run on the CPU (``mx.quantize``,
``mx.dequantize``, ``mx.quantized_matmul``, ``mx.gather_qmm``), float64
numpy products of the dequantized weight, central finite differences and
``mx.grad`` of the built-ins. The ``path`` fixture (conftest.py) runs each
test on the reference path and, where a GPU backend exists, on the kernels
(with outputs poisoned with NaN first).
"""

import itertools

import mlx.core as mx
import numpy as np
import pytest
from conftest import PATHS, on_path
from distributions import sample

import mlx_quant_ops as mqo
from mlx_quant_ops._kernels import clear_plans

DTYPES = {"f32": mx.float32, "f16": mx.float16, "bf16": mx.bfloat16}
BITS = (1, 2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
# DESIGN.md: relative error against a float64 product.
TOLERANCE = {mx.float32: 1e-5, mx.float16: 5e-3, mx.bfloat16: 5e-3}
KINDS = ("normal", "outliers", "zero_blocks", "constant_blocks", "uniform_positive")
CPU = mx.cpu


@pytest.fixture(params=[*PATHS, pytest.param("reference-only", id="reference-only")])
def path(request, monkeypatch):
    """conftest.py's paths, and the reference path with MLX's CPU kernels
    turned off: a CPU stream hands quantize and few-row products to them
    (affine._CPU_BUILTIN), so every test here also checks the reference
    functions themselves, the definition of each op and its VJPs' basis."""
    name = request.param
    if name == "reference-only":
        monkeypatch.setattr(mqo.affine, "_CPU_BUILTIN", False)
        name = "reference"
    with on_path(name):
        yield request.param


def _np(a: mx.array) -> np.ndarray:
    if a.dtype == mx.bfloat16:
        a = a.astype(mx.float32)
    return np.array(a)


def _bits(a: mx.array) -> np.ndarray:
    a = np.array(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def assert_identical(ours: mx.array, expected: mx.array, what: str):
    assert ours.dtype == expected.dtype, f"{what}: {ours.dtype} != {expected.dtype}"
    assert ours.shape == expected.shape, f"{what}: {ours.shape} != {expected.shape}"
    mismatch = _bits(ours) != _bits(expected)
    if mismatch.any():
        first = tuple(np.argwhere(mismatch)[0])
        pytest.fail(
            f"{what}: {mismatch.sum()} of {mismatch.size} differ, first at {first}: "
            f"ours {_np(ours)[first]!r}, expected {_np(expected)[first]!r}"
        )


def rel_error(ours, expected) -> float:
    ours = np.asarray(ours, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert ours.shape == expected.shape, f"{ours.shape} != {expected.shape}"
    assert np.isfinite(ours).all(), "non-finite output (unwritten element?)"
    return float(np.linalg.norm(ours - expected) / np.linalg.norm(expected))


def _weights(shape, dtype, group_size, bits, kind="normal", seed=0):
    """A quantized weight of ``shape`` (last axis unpacked), made by MLX's
    own quantizer on the CPU."""
    rows = int(np.prod(shape[:-1]))
    w = sample(kind, rows, shape[-1], group_size, seed).reshape(shape)
    return mx.quantize(mx.array(w).astype(dtype), group_size, bits, stream=CPU)


def _dense64(w_q, scales, biases, group_size, bits) -> np.ndarray:
    """The weight as float64: the codes (dequantized with unit scales by MLX)
    times the stored scales plus the stored biases."""
    codes = mx.dequantize(
        w_q,
        mx.ones(scales.shape, mx.float32),
        mx.zeros(scales.shape, mx.float32),
        group_size,
        bits,
        stream=CPU,
    )
    codes = np.array(codes, dtype=np.float64)
    shape = codes.shape
    groups = codes.reshape(*scales.shape, group_size)
    dense = groups * _np(scales)[..., None].astype(np.float64)
    return (dense + _np(biases)[..., None].astype(np.float64)).reshape(shape)


def _x(shape, dtype, seed=1):
    return mx.array(np.random.default_rng(seed).standard_normal(shape)).astype(dtype)


# ---- quantize / dequantize -------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_quantize_dequantize_bit_identical(path, dtype, bits, group_size):
    for seed, kind in enumerate(KINDS):
        w_np = sample(kind, 6, 2 * group_size, group_size, seed)
        if kind == "normal":
            w_np = w_np * 3 + 1  # groups of mixed sign with an offset
        w = mx.array(w_np.reshape(2, 3, -1)).astype(dtype)
        expected = mx.quantize(w, group_size, bits, stream=CPU)
        ours = mqo.quantize(w, group_size, bits)
        for name, a, b in zip(("codes", "scales", "biases"), ours, expected):
            assert_identical(a, b, f"quantize {kind} {name}")
        assert_identical(
            mqo.dequantize(*expected, group_size, bits),
            mx.dequantize(*expected, group_size, bits, stream=CPU),
            f"dequantize {kind}",
        )
    other = mx.float32 if dtype != mx.float32 else mx.bfloat16
    assert_identical(
        mqo.dequantize(*expected, group_size, bits, dtype=other),
        mx.dequantize(*expected, group_size, bits, dtype=other, stream=CPU),
        "dequantize to another dtype",
    )


def test_quantize_defaults_are_mlx_defaults(path):
    w = _x((4, 128), mx.float16)
    for ours, theirs in zip(mqo.quantize(w), mx.quantize(w, stream=CPU)):
        assert_identical(ours, theirs, "defaults")
    q = mx.quantize(w, stream=CPU)
    assert_identical(mqo.dequantize(*q), mx.dequantize(*q, stream=CPU), "defaults")


def test_quantize_all_negative_and_sliced_inputs(path):
    # All-negative groups and a non-contiguous input (a transposed view).
    w = -mx.abs(_x((128, 64), mx.float32)).T - 0.5
    for bits in (2, 3, 4, 8):
        for ours, theirs in zip(
            mqo.quantize(w, 64, bits), mx.quantize(w, 64, bits, stream=CPU)
        ):
            assert_identical(ours, theirs, f"bits={bits}")


# ---- quantized_matmul --------------------------------------------------------


def _check_matmul(
    x, w_q, scales, biases, transpose, group_size, bits, what, against_mx=True, out=None
):
    """Our product (``out``, else ``mqo.quantized_matmul``'s) against a
    float64 one and (unless ``against_mx`` is False: MLX's CPU sums rows of
    ten thousand bfloat16 values in bfloat16, 10% off on bias-heavy rows)
    against ``mx.quantized_matmul``."""
    if out is None:
        out = mqo.quantized_matmul(x, w_q, scales, biases, transpose, group_size, bits)
    expected = mx.quantized_matmul(
        x, w_q, scales, biases, transpose, group_size, bits, stream=CPU
    )
    assert out.dtype == expected.dtype, what
    assert out.shape == expected.shape, what
    dense = _dense64(w_q, scales, biases, group_size, bits)
    if transpose:
        dense = np.swapaxes(dense, -1, -2)
    exact = _np(x).astype(np.float64) @ dense
    tol = TOLERANCE[out.dtype]
    assert rel_error(_np(out), exact) <= tol, f"{what}: vs float64"
    if not against_mx:
        return out
    # MLX's own result carries its own rounding (bf16 sums on the CPU).
    mx_error = rel_error(_np(expected), exact)
    assert rel_error(_np(out), _np(expected)) <= tol + mx_error, f"{what}: vs mx"
    return out


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("transpose", (True, False), ids=("wT", "w"))
@pytest.mark.parametrize("m", (1, 3, 8, 17, 512))
def test_quantized_matmul_shapes(path, dtype, transpose, m):
    # N (outputs) is odd when it is not the quantized axis.
    group_size, bits = 64, 4
    n, k = (67, 128) if transpose else (128, 67)
    shape = (n, k) if transpose else (k, n)
    w_q, scales, biases = _weights(shape, dtype, group_size, bits, seed=m)
    _check_matmul(
        _x((m, k), dtype, seed=m), w_q, scales, biases, transpose, group_size, bits, m
    )


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_quantized_matmul_bits_and_groups(path, bits, group_size):
    dtype = mx.float32
    for m, transpose in ((1, True), (5, True), (3, False)):
        k = 2 * group_size
        n = 37 if transpose else 2 * group_size
        k = k if transpose else 45
        shape = (n, k) if transpose else (k, n)
        kind = KINDS[(bits + m) % len(KINDS)]
        w_q, scales, biases = _weights(shape, dtype, group_size, bits, kind, bits)
        _check_matmul(
            _x((m, k), dtype, seed=bits),
            w_q,
            scales,
            biases,
            transpose,
            group_size,
            bits,
            f"m={m} transpose={transpose}",
        )


@pytest.mark.parametrize("dtype", (mx.float16, mx.bfloat16), ids=("f16", "bf16"))
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_quantized_matmul_decode_bits(path, dtype, bits, group_size):
    # The decode kernels at every width in half and bfloat16 (on CUDA the
    # tensor-core mat-vec, which pairs codes differently per width): N not
    # a multiple of its 16-row tile, K an odd number of 32-value units so
    # the split over warps and lanes is uneven, one and two n8 tiles of x.
    # One row of K past _QMV_MMA_LONG_K takes one-unit trips (and 16 warps
    # for 8-bit group-32 codes), again with an uneven split; five rows there
    # split K over 8 warps below 8 bits. One row at 6
    # bits takes runs of two units wherever K holds whole runs (36 units: 18
    # runs over 4 warps; the long K over 8), and single units where it does
    # not (11 units).
    kind = KINDS[bits % len(KINDS)]
    n = 37
    long_k = (mqo.affine._QMV_MMA_LONG_K // 128 + 1) * 128  # whole groups of 128
    wide_k = 64 * 32 + group_size  # one 8-bit row on 8 warps: one-unit trips
    cases = (
        (11 * group_size, (1, 13)),
        (36 * 32, (1, 13)),
        (wide_k, (1,)),
        (long_k, (1, 5)),
    )
    for k, rows in cases:
        w_q, scales, biases = _weights((n, k), dtype, group_size, bits, kind, bits)
        for m in rows:
            x = _x((m, k), dtype, seed=m + bits)
            what = f"m={m} k={k}"
            against_mx = k < long_k  # see _check_matmul
            _check_matmul(
                x, w_q, scales, biases, True, group_size, bits, what, against_mx
            )


def _stream_everything(monkeypatch):
    """Lets the streamed mat-vec take every decode it can run, for this
    test (see cuda_compile.stream_everything)."""
    from cuda_compile import stream_everything

    mqo._kernels.clear_plans()  # launches planned under the old rule
    for name, value in stream_everything().items():
        monkeypatch.setattr(mqo.affine, name, value)


@pytest.mark.parametrize("dtype", (mx.float16, mx.bfloat16), ids=("f16", "bf16"))
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_quantized_matmul_streamed_decode(path, monkeypatch, dtype, bits, group_size):
    # Decode shapes the streamed mat-vec takes on Hopper (elsewhere the
    # other decode kernels): K a multiple of 8 groups spanning one full
    # chunk and a shorter last one, N not a multiple of the 16-row tile,
    # and a grid of two blocks, so each block walks several tiles and
    # refills its stage buffers many times, then of four blocks dealt two
    # tiles each (three SMs' six would leave the last round idle); one and
    # two n8 tiles of x.
    # A staged x row is put in pair order in a second copy where the stage
    # buffers leave room for one, else in place: single rows at the
    # shortest K that takes each way the row above did not cover both.
    _stream_everything(monkeypatch)
    chunk, _, _ = mqo.affine._qmv_stream_geometry(bits, group_size, dtype.size)
    n, k = 101, chunk + 8 * group_size
    kind = KINDS[(bits + group_size) % len(KINDS)]
    w_q, scales, biases = _weights((n, k), dtype, group_size, bits, kind, bits)
    for sms, blocks in ((1, 2), (3, 4)):
        monkeypatch.setattr(
            mqo.affine._backend, "gpu_multiprocessors", lambda sms=sms: sms
        )
        mqo._kernels.clear_plans()
        assert mqo.affine._qmv_stream_blocks(-(-n // 16)) == blocks
        for m in (1, 11):
            x = _x((m, k), dtype, seed=m + bits)
            where = f"m={m}, {blocks} blocks"
            _check_matmul(x, w_q, scales, biases, True, group_size, bits, where)

    def layout(k):
        return mqo.affine._qmv_stream_layout(
            bits, group_size, dtype.size, k * dtype.size
        )

    _, _, staged, copied = layout(k)
    for copy in {True, False} - ({copied} if staged else set()):
        k = next(
            (
                k2
                for k2 in range(8 * group_size, 16385, 8 * group_size)
                if layout(k2)[2:] == (True, copy)
            ),
            None,
        )
        assert k is not None, f"no K stages x and has copy_pairs={copy}"
        w_q, scales, biases = _weights((n, k), dtype, group_size, bits, kind, k)
        x = _x((1, k), dtype, seed=bits)
        _check_matmul(x, w_q, scales, biases, True, group_size, bits, f"k={k}")


def _at_odd_offset(a: mx.array, offset: int) -> mx.array:
    """``a`` as a view that starts ``offset`` elements into a larger buffer
    (so its address is not 16-byte aligned), without copying."""
    flat = mx.concatenate([mx.zeros((offset,), a.dtype), a.reshape(-1)])
    return flat[offset:].reshape(a.shape)


@pytest.mark.parametrize("bits", (3, 4))
def test_quantized_matmul_streamed_decode_misaligned_views(path, monkeypatch, bits):
    # Activations, weights, scales and biases that start one element past
    # an aligned address: the streamed mat-vec cannot bulk-copy them and
    # must fall back to plain copies, with the same result (three x rows
    # read from global memory, one staged in shared memory).
    _stream_everything(monkeypatch)
    dtype, group_size = mx.float16, 64
    n, k = 45, 2048
    w_q, scales, biases = _weights((n, k), dtype, group_size, bits, seed=bits)
    views = [_at_odd_offset(a, 1) for a in (w_q, scales, biases)]
    mx.eval(views)
    for x in (_x((3, k), dtype, seed=bits), _x((1, k), dtype, seed=bits)):
        x = _at_odd_offset(x, 1)
        _check_matmul(x, *views, True, group_size, bits, "misaligned")


@pytest.mark.gpu
@pytest.mark.parametrize("bits", (3, 4))
def test_quantized_matmul_streamed_decode_on_the_gpus_grid(bits):
    # A model-sized one-row decode with the GPU's own SM count: 11008 rows
    # are 688 tiles, which the streamed mat-vec deals over 230 blocks of
    # three on 132 SMs (where 264 blocks, two an SM, would leave its last
    # round 15% idle). Against float64 and MLX's own product.
    dtype, group_size, n, k = mx.float16, 64, 11008, 4096
    stream = mx.default_stream(mx.gpu)
    if mqo._backend.gpu_backend() != "cuda" or not mqo.affine._qmv_stream_fits(
        stream, dtype, 1, n, k, bits, group_size
    ):
        pytest.skip("the streamed mat-vec runs on Hopper GPUs")
    tiles = n // 16
    per_sm = mqo.affine._QMV_STREAM_BLOCKS_PER_SM
    most = per_sm * mqo.affine._backend.gpu_multiprocessors()
    blocks = mqo.affine._qmv_stream_blocks(tiles)
    assert -(-tiles // blocks) == -(-tiles // most)
    if most == 264:
        assert blocks == 230
    w_q, scales, biases = _weights((n, k), dtype, group_size, bits, seed=bits)
    x = _x((1, k), dtype, seed=bits)
    _check_matmul(x, w_q, scales, biases, True, group_size, bits, f"{blocks} blocks")


def test_quantized_matmul_decode_runs_of_a_misaligned_weight(path):
    # One row at 6 bits loads runs of two units as 16-byte vectors, which
    # needs w on 16 bytes; a w that is a view 4 bytes into a larger buffer
    # must load the same words one by one. (x stays aligned: its loads are
    # vectors at every width, see the README's known limit.)
    dtype, group_size, bits = mx.float16, 64, 6
    n, k = 45, 2048
    w_q, scales, biases = _weights((n, k), dtype, group_size, bits, seed=bits)
    view = _at_odd_offset(w_q, 1)
    mx.eval(view)
    x = _x((1, k), dtype, seed=bits)
    _check_matmul(x, view, scales, biases, True, group_size, bits, "misaligned w")
    _check_matmul(x, w_q, scales, biases, True, group_size, bits, "aligned w")


@pytest.mark.parametrize("dtype", (mx.float16, mx.bfloat16), ids=("f16", "bf16"))
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_quantized_matmul_prefill_bits(path, dtype, bits, group_size):
    _check_prefill(dtype, bits, group_size, rows=(40, 100, 201, 300))


def _check_prefill(dtype, bits, group_size, rows):
    # Many rows per weight (the tiled kernel), N not a multiple of its tile,
    # K an odd number of 32-value units (the tensor-core tile steps over K
    # two units at a time, so its last step is half empty at group 32).
    # Rows past 128 take the taller tensor-core tile, and past 256 the
    # tallest wgmma one (its second row tile mostly empty).
    n, k = 200, 5 * group_size
    w_q, scales, biases = _weights((n, k), dtype, group_size, bits, seed=bits)
    for m in rows:
        x = _x((m, k), dtype, seed=m)
        _check_matmul(x, w_q, scales, biases, True, group_size, bits, f"m={m}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (mx.float16, mx.bfloat16), ids=("f16", "bf16"))
@pytest.mark.parametrize("bits", BITS)
def test_quantized_matmul_prefill_off_hopper(monkeypatch, dtype, bits):
    # A Hopper GPU runs every width's prefill on the wgmma tile; this runs
    # the mma.sync tile that other NVIDIA GPUs (A100, L40, Blackwell) take,
    # by making the op see another architecture.
    if mqo._backend.gpu_backend() != "cuda":
        pytest.skip("the tensor-core tiles are CUDA kernels")
    monkeypatch.setattr(mqo._backend, "gpu_architecture", lambda: "sm_80")
    launched = []

    class Launcher(mqo.affine.Launcher):
        def __init__(self, spec, *args, **kwargs):
            launched.append(spec.name)
            super().__init__(spec, *args, **kwargs)

    monkeypatch.setattr(mqo.affine, "Launcher", Launcher)
    with on_path("gpu"):
        _check_prefill(dtype, bits, 64, rows=(40, 201))  # both tile heights
    assert set(launched) == {"affine_qmm_mma"}, launched


@pytest.mark.parametrize(
    "x_shape, w_batch",
    [
        ((3, 5, 128), ()),  # batch of x folded over one weight
        ((2, 1, 4, 128), (3,)),  # x and w batches broadcast together
        ((3, 4, 128), (3,)),  # one weight per batch entry
        ((1, 4, 128), (2, 3)),
        ((128,), ()),  # a vector
    ],
)
@pytest.mark.parametrize("dtype", (mx.float32, mx.float16), ids=("f32", "f16"))
def test_quantized_matmul_batch_dims(path, x_shape, w_batch, dtype):
    group_size, bits = 32, 4
    w_q, scales, biases = _weights((*w_batch, 19, 128), dtype, group_size, bits)
    x = _x(x_shape, dtype)
    out = mqo.quantized_matmul(x, w_q, scales, biases, True, group_size, bits)
    dense = np.swapaxes(_dense64(w_q, scales, biases, group_size, bits), -1, -2)
    exact = _np(x).astype(np.float64) @ dense
    assert out.shape == exact.shape
    assert rel_error(_np(out), exact) <= TOLERANCE[dtype]
    if len(x_shape) > 2 and w_batch:
        expected = mx.quantized_matmul(
            x, w_q, scales, biases, True, group_size, bits, stream=CPU
        )
        assert out.shape == expected.shape
        assert rel_error(_np(out), _np(expected)) <= 2 * TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", (mx.float16, mx.bfloat16), ids=("f16", "bf16"))
@pytest.mark.parametrize("bits", (3, 4))
def test_quantized_matmul_batched_weights_many_rows(path, dtype, bits):
    # A batch of weights, each with enough x rows for the tiled kernels: the
    # tiles of different weights share one launch and each reads its own
    # weight's rows (on Hopper the wgmma tile: 4 bits from whole words, 3
    # bits from half-unit streams). N is odd; x batches broadcast against w's.
    group_size = 64
    w_q, scales, biases = _weights((3, 70, 128), dtype, group_size, bits, seed=bits)
    for x_shape in ((3, 40, 128), (2, 1, 150, 128)):
        x = _x(x_shape, dtype, seed=len(x_shape))
        _check_matmul(x, w_q, scales, biases, True, group_size, bits, f"x {x_shape}")


def test_quantized_matmul_mixed_dtypes_promote_like_mlx(path):
    w_q, scales, biases = _weights((40, 64), mx.float32, 64, 4)
    x = _x((3, 64), mx.float16)
    for s_dtype in (mx.float32, mx.bfloat16, mx.float16):
        s, b = scales.astype(s_dtype), biases.astype(s_dtype)
        out = mqo.quantized_matmul(x, w_q, s, b, group_size=64, bits=4)
        expected = mx.quantized_matmul(x, w_q, s, b, group_size=64, bits=4, stream=CPU)
        assert out.dtype == expected.dtype
        assert rel_error(_np(out), _np(expected)) <= 1e-2


# ---- fused_quantized_matmul --------------------------------------------------------

# Rows of the three weights: none a multiple of the tensor-core mat-vec's
# 16-row tile, and a weight of a single partial tile.
FUSED_ROWS = (37, 20, 5)


def _check_fused(dtype, bits, group_size, k, x_shapes):
    """``fused_quantized_matmul`` of one, two and three weights on inputs of
    ``x_shapes``: each output as ``_check_matmul`` checks a product."""
    weights = [
        _weights((n, k), dtype, group_size, bits, KINDS[(bits + i) % len(KINDS)], i)
        for i, n in enumerate(FUSED_ROWS)
    ]
    for count in (1, 2, 3):
        for seed, x_shape in enumerate(x_shapes):
            x = _x(x_shape, dtype, seed=seed + bits)
            outs = mqo.fused_quantized_matmul(x, weights[:count], group_size, bits)
            assert isinstance(outs, tuple) and len(outs) == count
            for i, (out, weight) in enumerate(zip(outs, weights)):
                what = f"weight {i} of {count}, x {x_shape}"
                _check_matmul(x, *weight, True, group_size, bits, what, out=out)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("bits", BITS)
def test_fused_quantized_matmul_bits(path, dtype, bits):
    # Every width in every dtype (on CUDA, half and bfloat16 run the pair and
    # triple launches): one and 13 rows of x (one and two n8 tiles), a batch
    # of 2x3 rows and a vector; K an odd number of 32-value units.
    _check_fused(dtype, bits, 64, 7 * 64, ((1, 448), (13, 448), (2, 3, 448), (448,)))


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("group_size", (32, 64, 128))
def test_fused_quantized_matmul_groups(path, dtype, group_size):
    # The other group sizes at 4 bits, and (at 64) 17 rows: more than one
    # launch takes, so the products run one by one (on CUDA the prefill
    # kernel, whose instantiations cost a GPU run seconds each: one width).
    k = 3 * group_size
    shapes = ((1, k), (6, k)) if group_size != 64 else ((17, k),)
    _check_fused(dtype, 4, group_size, k, shapes)


def test_fused_quantized_matmul_gradients(path):
    # Gradients of x (summed over the weights), the scales and the biases,
    # against mx.grad of MLX's products one by one.
    gs, bits = 32, 4
    weights = [_weights((n, 64), mx.float32, gs, bits, seed=n) for n in FUSED_ROWS]
    x = _x((3, 64), mx.float32)
    cots = [_x((3, n), mx.float32, seed=n + 1) for n in FUSED_ROWS]

    def loss(products):
        def f(x, *scales_and_biases):
            pairs = zip(scales_and_biases[::2], scales_and_biases[1::2])
            triples = [(w[0], s, b) for w, (s, b) in zip(weights, pairs)]
            return sum((y * c).sum() for y, c in zip(products(x, triples), cots))

        return f

    def ours(x, triples):
        return mqo.fused_quantized_matmul(x, triples, gs, bits)

    def theirs(x, triples):
        return [mx.quantized_matmul(x, *t, True, gs, bits) for t in triples]

    args = [x]
    for _, scales, biases in weights:
        args += [scales, biases]
    argnums = tuple(range(len(args)))
    got = mx.grad(loss(ours), argnums)(*args)
    with mx.stream(CPU):
        expected = mx.grad(loss(theirs), argnums)(*args)
    # On a GPU, MLX runs the float32 matmuls of the backward pass (the
    # weight's gradient, cot.T @ x) in TF32 unless MLX_ENABLE_TF32=0: the
    # scales' gradient was 3e-4 off on an H200 (2026-12-05).
    tol = 2e-3 if path == "gpu" else 1e-5
    for i, (a, b) in enumerate(zip(got, expected)):
        assert a.shape == b.shape and a.dtype == b.dtype, i
        assert rel_error(_np(a), _np(b)) <= tol, f"argument {i} vs mx.grad"


def test_fused_quantized_matmul_runs_one_launch():
    """On CUDA (simulated: kernels recorded, not run) one decode of half
    inputs by two or three weights is one launch of the fused mat-vec; a
    single weight, float32, more rows than a launch takes, or a weight the
    streamed mat-vec takes that is too large to hand over run one launch a
    weight."""
    from cuda_compile import recording

    def launched(dtype, counts, rows, k=256):
        weights = [
            mqo.quantize(mx.zeros((n, k), dtype), 64, 4) for n in FUSED_ROWS[:counts]
        ]
        with recording() as launches:
            mx.eval(mqo.fused_quantized_matmul(mx.zeros((rows, k), dtype), weights))
        return [launch.kernel.name for launch in launches]

    assert launched(mx.float16, 3, 1) == ["affine_qmv_mma_triple"]
    assert launched(mx.bfloat16, 2, 16) == ["affine_qmv_mma_pair"]
    assert launched(mx.float16, 1, 1) == ["affine_qmv_mma"]
    assert launched(mx.float32, 3, 1) == ["affine_qmv"] * 3
    assert launched(mx.float16, 2, 17) == ["affine_qmm_wgmma"] * 2
    # The streamed mat-vec keeps large weights; small ones fuse all the same.
    assert launched(mx.float16, 2, 1, k=4096) == ["affine_qmv_mma_pair"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(mqo.affine, "LAYER_BUILTIN_DECODE_BELOW", {4: 37 * 4096})
        assert launched(mx.float16, 2, 1, k=4096) == ["affine_qmv_stream"] * 2


def test_fused_quantized_matmul_of_empty_inputs(path):
    # No rows: empty outputs of each weight's width (MLX's own op, the
    # other tests' oracle, stops the process on these).
    weights = [_weights((n, 128), mx.float16, 64, 4) for n in FUSED_ROWS]
    for x_shape in ((0, 128), (2, 0, 128)):
        outs = mqo.fused_quantized_matmul(mx.zeros(x_shape, mx.float16), weights)
        mx.eval(outs)
        assert [out.shape for out in outs] == [(*x_shape[:-1], n) for n in FUSED_ROWS]
        assert all(out.dtype == mx.float16 for out in outs)


def test_fused_quantized_matmul_errors():
    op = "fused_quantized_matmul"
    x = mx.zeros((1, 64), mx.float16)
    good = _packed()
    _raises(TypeError, op, "weights", lambda: mqo.fused_quantized_matmul(x, good[0]))
    _raises(TypeError, op, "weights", lambda: mqo.fused_quantized_matmul(x, []))
    _raises(
        TypeError,
        op,
        "weights[1]",
        lambda: mqo.fused_quantized_matmul(x, [good, good[:2]]),
    )
    wide = _packed((8, 128))
    # x fits the first weight and not the second.
    _raises(ValueError, op, "x", lambda: mqo.fused_quantized_matmul(x, [good, wide]))
    short_scales = (good[0], good[1][:, :0], good[2])
    _raises(
        ValueError,
        op,
        "weights[0] scales",
        lambda: mqo.fused_quantized_matmul(x, [short_scales]),
    )
    batched = tuple(a[None] for a in good)
    _raises(
        ValueError, op, "weights[0] w", lambda: mqo.fused_quantized_matmul(x, [batched])
    )
    _raises(
        ValueError,
        op,
        "bits",
        lambda: mqo.fused_quantized_matmul(x, [good], bits=7),
    )


# ---- gather_qmm ------------------------------------------------------------------


def _check_gather(x, w_q, scales, biases, lhs, rhs, transpose, gs, bits, sort=False):
    out = mqo.gather_qmm(
        x, w_q, scales, biases, lhs, rhs, transpose, gs, bits, sorted_indices=sort
    )
    expected = mx.gather_qmm(
        x,
        w_q,
        scales,
        biases,
        lhs,
        rhs,
        transpose,
        gs,
        bits,
        sorted_indices=sort,
        stream=CPU,
    )
    assert out.shape == expected.shape and out.dtype == expected.dtype
    dense = _dense64(w_q, scales, biases, gs, bits)
    dense = dense.reshape(-1, *dense.shape[-2:])
    if transpose:
        dense = np.swapaxes(dense, -1, -2)
    xs = _np(x).astype(np.float64)
    xs = xs.reshape(-1, *xs.shape[-2:])
    li = np.arange(xs.shape[0]).reshape(x.shape[:-2]) if lhs is None else np.array(lhs)
    ri = (
        np.arange(dense.shape[0]).reshape(w_q.shape[:-2])
        if rhs is None
        else np.array(rhs)
    )
    li, ri = np.broadcast_arrays(li, ri)
    exact = xs[li] @ dense[ri]
    tol = TOLERANCE[out.dtype]
    assert rel_error(_np(out), exact) <= tol, "vs float64"
    mx_error = rel_error(_np(expected), exact)
    assert rel_error(_np(out), _np(expected)) <= tol + mx_error, "vs mx.gather_qmm"


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("tokens", (1, 3, 17, 64))
@pytest.mark.parametrize("transpose", (True, False), ids=("wT", "w"))
def test_gather_qmm_moe(path, dtype, tokens, transpose):
    # MoE layout (as mlx-lm's SwitchGLU): x [tokens, 1, 1, K], experts
    # [E, N, K], rhs_indices [tokens, top_k].
    experts, top_k, gs, bits = 6, 2, 32, 4
    n, k = (45, 64) if transpose else (64, 45)
    shape = (experts, n, k) if transpose else (experts, k, n)
    w_q, scales, biases = _weights(shape, dtype, gs, bits, seed=tokens)
    rng = np.random.default_rng(tokens)
    rhs = np.argsort(rng.random((tokens, experts)), axis=-1)[:, :top_k]
    x = _x((tokens, 1, 1, k), dtype, seed=tokens)
    rhs = mx.array(rhs.astype(np.uint32))
    _check_gather(x, w_q, scales, biases, None, rhs, transpose, gs, bits)


@pytest.mark.parametrize("bits", (2, 3, 4, 6, 8))
def test_gather_qmm_sorted_and_lhs(path, bits):
    gs, dtype = 64, mx.float16
    w_q, scales, biases = _weights((5, 33, 128), dtype, gs, bits, seed=bits)
    # Sorted: rows grouped by expert, each row its own x entry.
    rhs = mx.array(np.sort(np.random.default_rng(bits).integers(0, 5, 24)))
    x = _x((24, 1, 128), dtype)
    _check_gather(x, w_q, scales, biases, None, rhs, True, gs, bits, sort=True)
    # Both index arrays, M > 1, broadcast against each other.
    x = _x((4, 3, 128), dtype)
    lhs = mx.array([[0], [3], [1]], dtype=mx.int32)
    rhs = mx.array([4, 0], dtype=mx.int32)
    _check_gather(x, w_q, scales, biases, lhs, rhs, True, gs, bits)
    # Only lhs_indices.
    w1 = [a[:1] for a in (w_q, scales, biases)]
    _check_gather(x, *w1, mx.array([2, 2, 0]), None, True, gs, bits)


@pytest.mark.parametrize("transpose", (True, False), ids=("wT", "w"))
@pytest.mark.parametrize("m", (1, 3))
def test_gather_qmm_past_the_grid_limit(path, monkeypatch, m, transpose):
    # More products than one launch's grid holds (CUDA caps grid y at 65535
    # tiles; here the cap is lowered to 7) run as several launches, forward
    # and backward (whose gather is unsorted), and give what one would.
    gs, bits, dtype = 32, 4, mx.float32
    n, k = (40, 64) if transpose else (64, 40)
    w_q, scales, biases = _weights(
        (5, n, k) if transpose else (5, k, n), dtype, gs, bits
    )
    rng = np.random.default_rng(m)
    products = 23
    sorted_rhs = mx.array(np.sort(rng.integers(0, 5, products)).astype(np.uint32))
    rhs = mx.array(rng.integers(0, 5, (products // 2 + 1, 2)).astype(np.uint32))
    x = _x((products, m, k), dtype, seed=m)
    x_pairs = _x((products // 2 + 1, 1, m, k), dtype, seed=m + 1)

    def loss(x, scales, rhs):
        out = mqo.gather_qmm(x, w_q, scales, biases, None, rhs, transpose, gs, bits)
        return (out * mx.cos(out)).sum()

    grad = mx.grad(loss, argnums=(0, 1))
    whole = grad(x_pairs, scales, rhs)
    monkeypatch.setattr(mqo.affine, "_MAX_GRID_Y", 7)
    clear_plans()
    _check_gather(
        x, w_q, scales, biases, None, sorted_rhs, transpose, gs, bits, sort=True
    )
    _check_gather(x_pairs, w_q, scales, biases, None, rhs, transpose, gs, bits)
    for part, expected in zip(grad(x_pairs, scales, rhs), whole):
        assert rel_error(_np(part), _np(expected)) <= 1e-6


def test_gather_qmm_launches_stay_within_the_grid_limit(monkeypatch):
    """On the CUDA path (recorded), every launch of a large gather fits the
    grid, and the parts cover every product once."""
    from cuda_compile import recording

    monkeypatch.setattr(mqo.affine, "_MAX_GRID_Y", 40)
    w_q, scales, biases = _weights((8, 64, 256), mx.float16, 64, 4)
    for m, sort in ((1, False), (1, True), (3, False)):
        rhs = mx.array(np.sort(np.arange(100) % 8).astype(np.uint32))
        x = mx.zeros((100, m, 256), mx.float16)
        with recording() as launches:
            out = mqo.gather_qmm(
                x, w_q, scales, biases, rhs_indices=rhs, sorted_indices=sort
            )
            mx.eval(out)
        assert out.shape == (100, m, 64)
        assert len(launches) > 1
        assert all(launch.grid[1] <= 40 for launch in launches)
    # x @ W in half precision runs mx.gather_mm on the weights dequantized
    # once, which has no such limit: no parts, one dequantize.
    x = mx.zeros((100, 1, 64), mx.float16)
    with recording() as launches:
        mx.eval(
            mqo.gather_qmm(x, w_q, scales, biases, rhs_indices=rhs, transpose=False)
        )
    assert [launch.kernel.name for launch in launches] == ["affine_dequantize"]


def test_cpu_stream_hands_work_to_mlx_kernels(monkeypatch):
    # On a CPU stream quantize, products of up to _CPU_BUILTIN_MAX_ROWS rows
    # and gathers of up to that many rows a product go to MLX's CPU kernels
    # (checked against float64 and MLX by the tests above on the
    # "reference" path); 17 rows, and everything with the switch off (the
    # "reference-only" path), reach the reference functions.
    reached = []
    for name in ("_quantize", "_quantized_matmul", "_gather_qmm"):
        real = getattr(mqo.affine, f"{name}_reference")
        monkeypatch.setattr(
            mqo.affine,
            f"{name}_reference",
            lambda *args, name=name, real=real: reached.append((name, args[0].shape))
            or real(*args),
        )
    w_q, scales, biases = _weights((5, 33, 128), mx.float16, 64, 4)
    rhs = mx.array([[4, 0, 2, 9]], dtype=mx.int32)  # 9: out of range
    ok = mx.array([[4, 0, 2]], dtype=mx.int32)
    for builtin in (True, False):
        monkeypatch.setattr(mqo.affine, "_CPU_BUILTIN", builtin)
        with on_path("reference"):
            w = _x((33, 128), mx.float16)
            for ours, theirs in zip(mqo.quantize(w), mx.quantize(w, stream=CPU)):
                assert_identical(ours, theirs, f"builtin={builtin}")
            for m in (1, 16, 17):
                x = _x((m, 128), mx.float16, seed=m)
                _check_matmul(x, w_q[0], scales[0], biases[0], True, 64, 4, m)
                x = x.reshape(1, 1, m, 128)
                got = _np(mqo.gather_qmm(x, w_q, scales, biases, rhs_indices=rhs))
                assert np.isnan(got[0, 3]).all() and not np.isnan(got[0, :3]).any()
                _check_gather(x, w_q, scales, biases, None, ok, True, 64, 4)
    expected = [
        ("_quantized_matmul", (17, 128)),
        ("_gather_qmm", (1, 1, 17, 128)),
        ("_gather_qmm", (1, 1, 17, 128)),
        ("_quantize", (33, 128)),
    ]
    for m in (1, 16, 17):
        expected += [
            ("_quantized_matmul", (m, 128)),
            ("_gather_qmm", (1, 1, m, 128)),
            ("_gather_qmm", (1, 1, m, 128)),
        ]
    assert reached == expected


@pytest.mark.parametrize("builtin", (True, False), ids=("builtin", "reference"))
def test_cpu_products_split_over_cores(monkeypatch, builtin):
    # A large op on a CPU stream is split over one worker stream per core:
    # quantize and dequantize by weight rows, products by output columns.
    # Here every op is split three ways (37 rows: 13 + 13 + 11), on MLX's
    # kernels and on the reference: quantize, dequantize, one weight and a
    # batch of them, and gathers with an index out of range; 5 rows are too
    # few to split.
    streams = tuple(mx.new_stream(mx.cpu) for _ in range(3))
    monkeypatch.setattr(mqo.affine, "_cpu_worker_streams", lambda: streams)
    monkeypatch.setattr(mqo.affine, "_CPU_SPLIT_MIN_WORK", 0)
    monkeypatch.setattr(mqo.affine, "_CPU_BUILTIN", builtin)
    cuts = []
    real = mqo.affine._weight_rows
    monkeypatch.setattr(
        mqo.affine,
        "_weight_rows",
        lambda start, stop, *arrays: cuts.append((start, stop))
        or real(start, stop, *arrays),
    )
    thirds = [(0, 13), (13, 26), (26, 37)]
    with on_path("reference"):
        w = mx.array(sample("outliers", 37, 128, 64, 5)).astype(mx.float16)
        expected = mx.quantize(w, 64, 3, stream=CPU)
        for ours, theirs in zip(mqo.quantize(w, 64, 3), expected):
            assert_identical(ours, theirs, "quantize")
        assert cuts == thirds, cuts
        cuts.clear()
        assert_identical(
            mqo.dequantize(*expected, 64, 3),
            mx.dequantize(*expected, 64, 3, stream=CPU),
            "dequantize",
        )
        assert cuts == thirds, cuts
        for dtype, m in itertools.product((mx.float32, mx.float16), (1, 17)):
            w_q, scales, biases = _weights((37, 128), dtype, 64, 4, seed=m)
            x = _x((m, 128), dtype, seed=m)
            cuts.clear()
            _check_matmul(x, w_q, scales, biases, True, 64, 4, f"m={m}")
            assert cuts == thirds, cuts
        w_q, scales, biases = _weights((3, 37, 128), mx.float32, 32, 3)
        cuts.clear()
        _check_matmul(_x((3, 2, 128), mx.float32), w_q, scales, biases, True, 32, 3, "")
        assert cuts == thirds, cuts
        x = _x((2, 1, 1, 128), mx.float16)
        w_q, scales, biases = _weights((5, 37, 128), mx.float16, 64, 4)
        rhs = mx.array([[4, 0], [2, 9]], dtype=mx.int32)  # 9: out of range
        cuts.clear()
        got = _np(mqo.gather_qmm(x, w_q, scales, biases, rhs_indices=rhs))
        assert (
            np.isnan(got[1, 1]).all() and not np.isnan(got[[0, 0, 1], [0, 1, 0]]).any()
        )
        assert cuts == (thirds if builtin else []), cuts
        ok = mx.array([[4, 0], [2, 1]], dtype=mx.int32)
        _check_gather(x, w_q, scales, biases, None, ok, True, 64, 4)
        w_q, scales, biases = _weights((5, 128), mx.float32, 64, 4)
        cuts.clear()
        _check_matmul(_x((1, 128), mx.float32), w_q, scales, biases, True, 64, 4, "")
        assert cuts == [(0, 5)], cuts


@pytest.mark.parametrize("dtype", (mx.float16, mx.bfloat16), ids=("f16", "bf16"))
def test_gather_qmm_of_few_experts_in_half_types(path, dtype):
    # A half-type gather whose products use at most an eighth of the
    # experts copies those experts out on a CPU stream (rather than cast
    # every expert's scales to float32): 3 products of 40 experts, the same
    # expert twice, lhs indices, and one index out of range.
    w_q, scales, biases = _weights((40, 33, 128), dtype, 64, 4, seed=3)
    x = _x((3, 2, 128), dtype)
    lhs = mx.array([2, 0, 2], dtype=mx.int32)
    rhs = mx.array([39, 7, 39], dtype=mx.int32)
    _check_gather(x, w_q, scales, biases, lhs, rhs, True, 64, 4)
    got = _np(mqo.gather_qmm(x, w_q, scales, biases, lhs, mx.array([7, 40, 39])))
    assert np.isnan(got[1]).all() and not np.isnan(got[[0, 2]]).any()


def test_gather_qmm_without_indices_is_quantized_matmul(path):
    w_q, scales, biases = _weights((3, 20, 64), mx.float32, 64, 4)
    x = _x((3, 2, 64), mx.float32)
    out = mqo.gather_qmm(x, w_q, scales, biases, group_size=64, bits=4)
    expected = mqo.quantized_matmul(x, w_q, scales, biases, group_size=64, bits=4)
    assert rel_error(_np(out), _np(expected)) <= 1e-6


# ---- empty inputs ----------------------------------------------------------------
# No rows, no columns, no products: empty results of the shape and dtype the
# float64 product has, on every path. MLX's own CPU kernels stop the process
# (SIGFPE) on several of these (MLX 0.32.4), so they are never the oracle
# here, and a test that reached one would not fail but die; the bit-identical
# quantize is the exception (mx.quantize takes empty input).


def _empty_product(x_shape, w_shape, transpose):
    """The float64 product's shape for these shapes (numpy broadcasts the
    batch axes as the op does)."""
    dense = np.zeros(w_shape[:-1] + (w_shape[-1] * 8,))  # 4 bits: 8 a word
    return np.matmul(
        np.zeros(x_shape), np.swapaxes(dense, -1, -2) if transpose else dense
    ).shape


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize(
    "x_shape, w_rows, transpose",
    [
        ((0, 128), 20, True),  # no rows
        ((2, 0, 128), 20, True),
        ((0, 3, 128), 20, True),  # an empty batch
        ((0, 128), 128, False),
        ((3, 128), 0, True),  # no columns (a weight of no rows)
        ((1, 2, 128), 0, True),
    ],
)
def test_quantized_matmul_of_empty_arrays(path, dtype, x_shape, w_rows, transpose):
    group_size, bits = 64, 4
    w_q, scales, biases = mqo.quantize(
        mx.zeros((w_rows, 128), dtype), group_size=group_size, bits=bits
    )
    x = mx.zeros(x_shape, dtype)
    out = mqo.quantized_matmul(x, w_q, scales, biases, transpose, group_size, bits)
    mx.eval(out)
    assert out.shape == _empty_product(x_shape, w_q.shape, transpose)
    assert out.dtype == dtype
    # Its gradients are empty or zero, shaped as their arrays.
    loss = lambda x, s, b: mqo.quantized_matmul(x, w_q, s, b, transpose).sum()
    grads = mx.grad(loss, argnums=(0, 1, 2))(x, scales, biases)
    for grad, array in zip(grads, (x, scales, biases)):
        assert grad.shape == array.shape and grad.dtype == array.dtype
        assert not mx.any(grad).item()


@pytest.mark.parametrize("bits", BITS)
def test_quantize_and_dequantize_of_no_rows(path, bits):
    for shape in ((0, 128), (2, 0, 128)):
        w = mx.zeros(shape, mx.float16)
        ours = mqo.quantize(w, group_size=32, bits=bits)
        for name, a, b in zip(
            ("codes", "scales", "biases"), ours, mx.quantize(w, 32, bits, stream=CPU)
        ):
            assert_identical(a, b, f"{name} of {shape}")
        values = mqo.dequantize(*ours, group_size=32, bits=bits)
        mx.eval(values)
        assert values.shape == shape and values.dtype == mx.float16
        codes, scales, biases = ours
        loss = lambda s, b: mqo.dequantize(codes, s, b, 32, bits).sum()
        grads = mx.grad(loss, argnums=(0, 1))(scales, biases)
        mx.eval(grads)
        assert [g.shape for g in grads] == [scales.shape, biases.shape]


@pytest.mark.parametrize(
    "x_shape, lhs, rhs, sorted_indices",
    [
        ((0, 128), None, [1, 3], False),  # no rows
        ((1, 128), None, [], False),  # no products
        ((1, 128), None, [], True),
        ((2, 1, 128), [], [], False),
        ((2, 0, 128), [[0], [1]], [[2], [0]], False),
    ],
    ids=("no-rows", "no-products", "no-products-sorted", "both-empty", "no-rows-lhs"),
)
def test_gather_qmm_of_empty_arrays(path, x_shape, lhs, rhs, sorted_indices):
    w_q, scales, biases = _weights((4, 20, 128), mx.float16, 64, 4)
    x = mx.zeros(x_shape, mx.float16)
    index = lambda v: None if v is None else mx.array(np.array(v, np.uint32))
    lhs, rhs = index(lhs), index(rhs)
    out = mqo.gather_qmm(
        x,
        w_q,
        scales,
        biases,
        lhs_indices=lhs,
        rhs_indices=rhs,
        sorted_indices=sorted_indices,
    )
    mx.eval(out)
    batch = np.broadcast_shapes(x_shape[:-2] if lhs is None else lhs.shape, rhs.shape)
    assert out.shape == (*batch, x_shape[-2], 20) and out.dtype == mx.float16
    loss = lambda x, s: mqo.gather_qmm(
        x, w_q, s, biases, lhs_indices=lhs, rhs_indices=rhs
    ).sum()
    d_x, d_scales = mx.grad(loss, argnums=(0, 1))(x, scales)
    mx.eval(d_x, d_scales)
    assert d_x.shape == x.shape and d_scales.shape == scales.shape
    assert not mx.any(d_scales).item()


def test_empty_arrays_launch_no_kernel(monkeypatch):
    """On the CUDA path (kernels recorded, not run) an empty call launches
    nothing: its grid would be empty along an axis, which the GPU refuses."""
    from cuda_compile import recording

    w_q, scales, biases = _weights((4, 20, 128), mx.float16, 64, 4)
    with recording() as launches:
        mx.eval(
            mqo.quantized_matmul(
                mx.zeros((0, 128), mx.float16), w_q[0], scales[0], biases[0]
            ),
            mqo.gather_qmm(
                mx.zeros((1, 128), mx.float16),
                w_q,
                scales,
                biases,
                rhs_indices=mx.zeros((0,), mx.uint32),
            ),
            mqo.dequantize(w_q[:, :0], scales[:, :0], biases[:, :0]),
            *mqo.quantize(mx.zeros((0, 128))),
        )
        assert launches == []
        mx.eval(
            mqo.quantized_matmul(
                mx.zeros((1, 128), mx.float16), w_q[0], scales[0], biases[0]
            )
        )
        assert launches  # the recorder sees a launch that is not empty


# ---- gradients -----------------------------------------------------------------


def _finite_difference(f, a: mx.array, index, eps=1e-2):
    plus = a.at[index].add(eps)
    minus = a.at[index].add(-eps)
    return (f(plus) - f(minus)).item() / (2 * eps)


@pytest.mark.parametrize("transpose", (True, False), ids=("wT", "w"))
@pytest.mark.parametrize("bits", (3, 4))
def test_quantized_matmul_gradients(path, transpose, bits):
    gs = 32
    shape = (2, 24, 64) if transpose else (2, 64, 32)
    w_q, scales, biases = _weights(shape, mx.float32, gs, bits, seed=bits)
    k = 64 if transpose else 64
    x = _x((2, 3, k), mx.float32)
    cot = _x((2, 3, shape[1] if transpose else 32), mx.float32, seed=9)

    def loss(fn):
        return lambda x, s, b: (
            fn(x, w_q, s, b, transpose, gs, bits).astype(mx.float32) * cot
        ).sum()

    argnums = (0, 1, 2)
    ours = mx.grad(loss(mqo.quantized_matmul), argnums)(x, scales, biases)
    with mx.stream(CPU):
        theirs = mx.grad(loss(mx.quantized_matmul), argnums)(x, scales, biases)
    for name, a, b in zip(("x", "scales", "biases"), ours, theirs):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert rel_error(_np(a), _np(b)) <= 1e-5, f"d{name} vs mx.grad"
    # Central differences on a few entries of each argument.
    args = [x, scales, biases]
    for i, (grad, index) in enumerate(zip(ours, [(1, 2, 5), (0, 3, 0), (1, 7, 0)])):

        def f(value, i=i):
            trial = list(args)
            trial[i] = value
            return loss(mqo.quantized_matmul)(*trial)

        fd = _finite_difference(f, args[i], index)
        assert abs(grad[index].item() - fd) <= 2e-3 * max(1.0, abs(fd)), f"arg {i}"


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("bits,group_size", ((4, 64), (3, 32), (8, 128)))
def test_dequantize_gradients(path, dtype, bits, group_size):
    """d(scales) and d(biases) of a dequantization, as mx.grad gives them for
    mx.dequantize (a quantized embedding's lookups train them in DWQ)."""
    w_q, scales, biases = _weights((2, 5, 256), dtype, group_size, bits)
    cot = _x((2, 5, 256), mx.float32, seed=9)

    def loss(fn):
        return lambda s, b: (
            fn(w_q, s, b, group_size, bits).astype(mx.float32) * cot
        ).sum()

    ours = mx.grad(loss(mqo.dequantize), (0, 1))(scales, biases)
    with mx.stream(CPU):
        theirs = mx.grad(loss(mx.dequantize), (0, 1))(scales, biases)
    for name, a, b in zip(("scales", "biases"), ours, theirs):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert rel_error(_np(a), _np(b)) <= TOLERANCE[dtype], f"d{name} vs mx.grad"


@pytest.mark.parametrize("dtype", (mx.float32, mx.bfloat16), ids=("f32", "bf16"))
def test_quantized_matmul_gradient_with_broadcast_batch(path, dtype):
    w_q, scales, biases = _weights((3, 16, 64), dtype, 64, 4)
    x = _x((2, 1, 5, 64), dtype)

    def loss(fn):
        return lambda x, s, b: fn(x, w_q, s, b, True, 64, 4).astype(mx.float32).sum()

    ours = mx.grad(loss(mqo.quantized_matmul), (0, 1, 2))(x, scales, biases)
    with mx.stream(CPU):
        theirs = mx.grad(loss(mx.quantized_matmul), (0, 1, 2))(x, scales, biases)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert rel_error(_np(a), _np(b)) <= TOLERANCE[dtype] * 2


def _gather_dense_oracle(w_q, gs, bits, lhs, rhs, transpose):
    """gather_qmm written with MLX built-ins that mx.grad differentiates in
    x, scales and biases: constant codes (mx.dequantize with unit scales)
    times scales plus biases, then mx.gather_mm. (mx.gather_qmm's own VJP
    fails for transpose=False in MLX 0.32.4.)"""
    codes = mx.dequantize(
        w_q,
        mx.ones((*w_q.shape[:-1], w_q.shape[-1] * 32 // bits // gs)),
        mx.zeros((*w_q.shape[:-1], w_q.shape[-1] * 32 // bits // gs)),
        gs,
        bits,
        stream=CPU,
    )
    codes = codes.reshape(*codes.shape[:-1], -1, gs)

    def fn(x, s, b):
        dense = (codes * s[..., None] + b[..., None]).reshape(*w_q.shape[:-1], -1)
        if transpose:
            dense = dense.swapaxes(-1, -2)
        return mx.gather_mm(x, dense, lhs, rhs)

    return fn


@pytest.mark.parametrize("transpose", (True, False), ids=("wT", "w"))
def test_gather_qmm_gradients(path, transpose):
    gs, bits = 32, 4
    shape = (4, 24, 64) if transpose else (4, 64, 32)
    w_q, scales, biases = _weights(shape, mx.float32, gs, bits)
    x = _x((5, 2, 64), mx.float32)
    lhs = mx.array([0, 4, 4, 2, 1, 0], dtype=mx.uint32)
    rhs = mx.array([3, 3, 0, 1, 3, 2], dtype=mx.uint32)
    out_n = shape[1] if transpose else 32
    cot = _x((6, 2, out_n), mx.float32, seed=4)

    def loss(fn):
        return lambda x, s, b: (fn(x, s, b) * cot).sum()

    def ours_fn(x, s, b):
        return mqo.gather_qmm(x, w_q, s, b, lhs, rhs, transpose, gs, bits)

    oracles = [_gather_dense_oracle(w_q, gs, bits, lhs, rhs, transpose)]
    if transpose:
        oracles.append(
            lambda x, s, b: mx.gather_qmm(x, w_q, s, b, lhs, rhs, True, gs, bits)
        )
    ours = mx.grad(loss(ours_fn), (0, 1, 2))(x, scales, biases)
    for oracle in oracles:
        with mx.stream(CPU):
            theirs = mx.grad(loss(oracle), (0, 1, 2))(x, scales, biases)
        for name, a, b in zip(("x", "scales", "biases"), ours, theirs):
            assert a.shape == b.shape, name
            assert rel_error(_np(a), _np(b)) <= 1e-5, f"d{name} vs mx.grad"
    for i, index in enumerate([(4, 1, 3), (3, 5, 0), (0, 2, 0)]):
        args = [x, scales, biases]

        def f(value, i=i):
            trial = list(args)
            trial[i] = value
            return loss(ours_fn)(*trial)

        fd = _finite_difference(f, args[i], index)
        assert abs(ours[i][index].item() - fd) <= 2e-3 * max(1.0, abs(fd)), f"arg {i}"


# ---- errors ------------------------------------------------------------------------


def _packed(shape=(8, 64), bits=4, gs=64, dtype=mx.float16):
    return mx.quantize(mx.zeros(shape, dtype), gs, bits, stream=CPU)


def _raises(exc, op, arg, fn):
    with pytest.raises(exc) as info:
        fn()
    message = str(info.value)
    assert message.startswith(f"[mlx_quant_ops.{op}] {arg}: expected"), message
    assert ", got " in message, message
    return message


def test_errors_quantize():
    w = mx.zeros((4, 64))
    _raises(TypeError, "quantize", "w", lambda: mqo.quantize(np.zeros((4, 64))))
    _raises(TypeError, "quantize", "w", lambda: mqo.quantize(w.astype(mx.int32)))
    _raises(ValueError, "quantize", "w", lambda: mqo.quantize(mx.zeros((64,))))
    msg = _raises(ValueError, "quantize", "w", lambda: mqo.quantize(w[:, :48], 32 * 2))
    assert "(4, 48)" in msg
    msg = _raises(ValueError, "quantize", "bits", lambda: mqo.quantize(w, 64, 7))
    assert "got 7" in msg
    _raises(ValueError, "quantize", "bits", lambda: mqo.quantize(w, 64, True))
    msg = _raises(TypeError, "quantize", "bits", lambda: mqo.quantize(w, 64, 4.0))
    assert "got 4.0" in msg
    _raises(TypeError, "quantize", "group_size", lambda: mqo.quantize(w, "64"))
    # NumPy's integers are integers, as for MLX's ops.
    for ours, theirs in zip(
        mqo.quantize(w + 1, np.int64(32), np.int32(3)), mx.quantize(w + 1, 32, 3)
    ):
        assert mx.array_equal(ours, theirs)
    _raises(ValueError, "quantize", "group_size", lambda: mqo.quantize(w, 16, 4))
    msg = _raises(ValueError, "quantize", "mode", lambda: mqo.quantize(w, mode="mxfp4"))
    assert "'mxfp4'" in msg
    _raises(
        ValueError,
        "quantize",
        "global_scale",
        lambda: mqo.quantize(w, global_scale=mx.array(1.0)),
    )


def test_errors_dequantize():
    w_q, s, b = _packed()
    op = "dequantize"
    _raises(ValueError, op, "biases", lambda: mqo.dequantize(w_q, s))
    _raises(TypeError, op, "w", lambda: mqo.dequantize(w_q.astype(mx.int32), s, b))
    _raises(TypeError, op, "scales", lambda: mqo.dequantize(w_q, s.astype(mx.int32), b))
    _raises(TypeError, op, "biases", lambda: mqo.dequantize(w_q, s, b.astype(mx.uint8)))
    _raises(ValueError, op, "w", lambda: mqo.dequantize(w_q[0], s[0], b[0]))
    msg = _raises(ValueError, op, "scales", lambda: mqo.dequantize(w_q, s[:4], b))
    assert "(8, 1)" in msg and "(4, 1)" in msg
    _raises(ValueError, op, "scales", lambda: mqo.dequantize(w_q, s, b, 32))
    _raises(ValueError, op, "biases", lambda: mqo.dequantize(w_q, s, b[:, :0]))
    # 3-bit words must come in threes (whole groups of 32 values).
    _raises(ValueError, op, "w", lambda: mqo.dequantize(w_q, s, b, 32, 3))
    _raises(TypeError, op, "dtype", lambda: mqo.dequantize(w_q, s, b, dtype=mx.int8))
    _raises(ValueError, op, "mode", lambda: mqo.dequantize(w_q, s, None, mode="nvfp4"))


def test_errors_quantized_matmul():
    w_q, s, b = _packed((8, 64))
    x = mx.zeros((2, 64), mx.float16)
    op = "quantized_matmul"
    qmm = mqo.quantized_matmul
    _raises(ValueError, op, "biases", lambda: qmm(x, w_q, s))
    _raises(TypeError, op, "x", lambda: qmm(x.astype(mx.int32), w_q, s, b))
    _raises(TypeError, op, "x", lambda: qmm([1.0], w_q, s, b))
    msg = _raises(ValueError, op, "x", lambda: qmm(x[:, :32], w_q, s, b))
    assert "64" in msg and "(2, 32)" in msg
    _raises(ValueError, op, "x", lambda: qmm(x, w_q, s, b, transpose=False))
    _raises(TypeError, op, "transpose", lambda: qmm(x, w_q, s, b, transpose=1))
    _raises(ValueError, op, "bits", lambda: qmm(x, w_q, s, b, bits=7))
    _raises(TypeError, op, "bits", lambda: qmm(x, w_q, s, b, bits=4.0))
    _raises(ValueError, op, "scales", lambda: qmm(x, w_q, s, b, group_size=32))
    _raises(ValueError, op, "mode", lambda: qmm(x, w_q, s, b, mode="mxfp8"))
    w3, s3, b3 = _packed((3, 8, 64))
    _raises(
        ValueError,
        op,
        "x and w batch dimensions",
        lambda: qmm(mx.zeros((2, 4, 64)), w3, s3, b3),
    )
    _raises(ValueError, op, "scales", lambda: qmm(x, w3, s3[:, :4], b3))


@pytest.mark.parametrize("transpose", [True, False])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16], ids=["f32", "f16"])
def test_gather_qmm_out_of_range_indices_give_nan_rows(transpose, dtype, path):
    """Index values are never read back to the host (that would sync the
    device and break mx.compile): a product with an index out of range comes
    out as a NaN row, never as an out-of-bounds read or a plausible number."""
    rng = np.random.default_rng(7)
    # N = 40 is not a multiple of any tile; x @ W quantizes along N (128).
    k, experts = 64, 4
    n = 40 if transpose else 128
    shape = (experts, n, k) if transpose else (experts, k, n)
    w = mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype)
    w_q, s, b = mx.quantize(w, 64, 4, stream=CPU)
    x = mx.array(rng.standard_normal((3, 1, k)).astype(np.float32)).astype(dtype)
    lhs = mx.array([0, 1, 2, 3, 1, 0], dtype=mx.int32)
    rhs = mx.array([0, 4, 2, 1, -1, 3], dtype=mx.int32)
    out = mqo.gather_qmm(
        x, w_q, s, b, lhs, rhs, transpose=transpose, group_size=64, bits=4
    )
    got = np.array(out.astype(mx.float32))
    bad = np.array([False, True, False, True, True, False])
    assert np.isnan(got[bad]).all()
    good = np.flatnonzero(~bad)
    expected = mx.gather_qmm(
        x,
        w_q,
        s,
        b,
        lhs[mx.array(good)],
        rhs[mx.array(good)],
        transpose=transpose,
        group_size=64,
        bits=4,
        stream=CPU,
    )
    np.testing.assert_allclose(
        got[good], np.array(expected.astype(mx.float32)), rtol=2e-2, atol=2e-2
    )


def test_errors_gather_qmm():
    w_q, s, b = _packed((4, 8, 64))
    x = mx.zeros((3, 1, 64), mx.float16)
    op = "gather_qmm"

    def g(*args, **kw):
        return lambda: mqo.gather_qmm(x, w_q, s, b, *args, **kw)

    _raises(TypeError, op, "rhs_indices", g(None, mx.array([0.0])))
    _raises(TypeError, op, "lhs_indices", g([0], mx.array([0])))
    _raises(
        ValueError,
        op,
        "lhs_indices and rhs_indices",
        g(mx.array([0, 1, 2]), mx.array([0, 1])),
    )
    _raises(TypeError, op, "sorted_indices", g(None, mx.array([0]), sorted_indices=1))
    _raises(
        ValueError,
        op,
        "x",
        lambda: mqo.gather_qmm(mx.zeros((64,)), w_q, s, b, None, mx.array([0])),
    )
    _raises(ValueError, op, "biases", lambda: mqo.gather_qmm(x, w_q, s, None))
    _raises(
        ValueError,
        op,
        "global_scale",
        g(None, mx.array([0]), global_scale=mx.array(1.0)),
    )


def test_errors_after_a_remembered_good_call():
    # Calls are planned once per signature, the arrays' shapes and dtypes
    # and the options (a decode step repeats them every token): a good call
    # must not let a later bad one through, nor True stand in for 1.
    w_q, scales, biases = _packed((32, 128), 4, 64, mx.float32)
    x = mx.zeros((2, 128))
    mqo.quantized_matmul(x, w_q, scales, biases, True, 64, 4)
    mqo.quantized_matmul(x, w_q, scales, biases, True, 64, 4)
    with pytest.raises(TypeError, match="transpose"):
        mqo.quantized_matmul(x, w_q, scales, biases, 1, 64, 4)
    with pytest.raises(ValueError, match="x: expected a last axis of 128"):
        mqo.quantized_matmul(mx.zeros((2, 64)), w_q, scales, biases, True, 64, 4)
    with pytest.raises(TypeError, match="x: expected dtype"):
        mqo.quantized_matmul(x.astype(mx.int32), w_q, scales, biases, True, 64, 4)
    with pytest.raises(TypeError, match="x: expected an mlx.core.array"):
        mqo.quantized_matmul(np.zeros((2, 128), np.float32), w_q, scales, biases)
    with pytest.raises(ValueError, match="scales: expected shape"):
        mqo.quantized_matmul(x, w_q, scales[:, :1], biases, True, 64, 4)


def test_repeated_calls_replay_one_planned_call():
    # The same signature again (every layer of every decoded token) replays
    # the graph compiled on its first call: the op's Python, launch planning
    # included, runs once per signature, though every call hands MLX a new
    # stream handle (recorded, not run: see cuda_compile.py).
    from cuda_compile import recording

    w_q, scales, biases = _packed((300, 256), 4, 64, mx.float16)
    plan = mqo.affine._matmul_rows_plan
    with recording() as launches:
        for m in (1, 1, 1, 3, 3):
            x = mx.zeros((m, 256), mx.float16)
            mx.eval(mqo.quantized_matmul(x, w_q, scales, biases))
        # Passing the arrays as keywords is the same signature.
        mx.eval(mqo.quantized_matmul(x, w_q, scales=scales, biases=biases))
        info = plan.cache_info()
    assert (info.misses, info.hits) == (2, 0)
    assert [dict(l.template)["XR"] for l in launches] == [1, 4]


def test_planned_calls_follow_their_signature():
    # A replayed call computes on its own arrays, and any change a check or
    # plan could see (shape, dtype, option type, forced path) plans again.
    w_q, scales, biases = _weights((40, 128), mx.float32, 64, 4)
    calls = mqo.affine._QUANTIZED_MATMUL_CALLS
    first = mx.random.normal((2, 128), key=mx.random.key(1))
    second = mx.random.normal((2, 128), key=mx.random.key(2))
    for x in (first, second):
        out = mqo.quantized_matmul(x, w_q, scales, biases, True, 64, 4)
        exact = _np(x).astype(np.float64) @ _dense64(w_q, scales, biases, 64, 4).T
        assert rel_error(_np(out), exact) <= TOLERANCE[mx.float32]
    assert len(calls._plans) == 1
    mqo.quantized_matmul(first[:1], w_q, scales, biases, True, 64, 4)
    mqo.quantized_matmul(first.astype(mx.float16), w_q, scales, biases, True, 64, 4)
    with pytest.raises(TypeError, match="transpose"):
        mqo.quantized_matmul(first, w_q, scales, biases, 1, 64, 4)
    with mqo.use_backend("reference"):
        mqo.quantized_matmul(first, w_q, scales, biases, True, 64, 4)
    # A plan runs on the stream it was made for: another default stream
    # (an mx.stream block) plans again.
    with mx.stream(mx.new_stream(mx.default_device())):
        mqo.quantized_matmul(first, w_q, scales, biases, True, 64, 4)
    assert len(calls._plans) == 5


def test_errors_are_raised_before_any_work():
    # Identical messages whatever path is selected.
    w_q, s, b = _packed()
    messages = []
    for name in ("reference",):
        with mqo.use_backend(name):
            with pytest.raises(ValueError) as info:
                mqo.quantized_matmul(mx.zeros((2, 32)), w_q, s, b)
            messages.append(str(info.value))
    assert len(set(messages)) == 1


def test_all_combinations_listed():
    # The sweeps above cover the full supported set.
    assert set(BITS) == set(mqo.affine.AFFINE_BITS)
    assert set(GROUP_SIZES) == set(mqo.affine.AFFINE_GROUP_SIZES)
    assert len(list(itertools.product(BITS, GROUP_SIZES, DTYPES))) == 63


# ---- kernel choice -------------------------------------------------------------


def test_dispatcher_picks_kernel_by_shape(monkeypatch):
    # Which kernel the cuda path launches for decode, prefill and MoE shapes
    # (recorded, not run: see cuda_compile.py).
    from cuda_compile import HOPPER, record_launches

    def picked(fn, architecture=HOPPER):
        return [
            (l.kernel.name, dict(l.template).get("XR"))
            for l in record_launches(fn, architecture)
        ]

    w_q, scales, biases = _packed((300, 256), 4, 64, mx.float16)
    experts = [mx.stack([a] * 8) for a in (w_q, scales, biases)]

    def qmm(m, dtype=mx.float16):
        return lambda: mqo.quantized_matmul(
            mx.zeros((m, 256), dtype), w_q, scales.astype(dtype), biases.astype(dtype)
        )

    # Half and bfloat16 decode runs on tensor cores (up to 16 rows), float32
    # on the portable mat-vec (up to 8).
    assert picked(qmm(1)) == [("affine_qmv_mma", 1)]
    assert picked(qmm(3)) == [("affine_qmv_mma", 4)]
    assert picked(qmm(8)) == [("affine_qmv_mma", 8)]
    assert picked(qmm(16)) == [("affine_qmv_mma", 16)]

    # One row of 2 to 6 bits with K a multiple of 8 groups, from 4096 to
    # 8192, streams through shared memory on Hopper; more rows, shorter or
    # longer K and 8 bits stay on the register-batch mat-vec (where each
    # was faster).
    def stream_qmm(m, k=4096, bits=4, group_size=64, n=300):
        packed = _packed((n, k), bits, group_size, mx.float16)
        x = mx.zeros((m, k), mx.float16)
        return lambda: mqo.quantized_matmul(
            x, *packed, group_size=group_size, bits=bits
        )

    assert picked(stream_qmm(1)) == [("affine_qmv_stream", 8)]
    assert picked(stream_qmm(1, k=8192)) == [("affine_qmv_stream", 8)]
    for bits in (2, 3, 5, 6):
        assert picked(stream_qmm(1, bits=bits)) == [("affine_qmv_stream", 8)]

    # Its persistent grid deals the 16-row tiles evenly where a grid of two
    # blocks an SM would leave its last round a tenth idle or more: on 132
    # SMs 14336 rows (896 tiles) take 224 blocks of four tiles, not 264 of
    # which 104 walk a fourth, and 11008 rows 230 blocks of three; 4096
    # rows take a block a tile, and 128256 rows (31 rounds, 2% idle) every
    # block. Each block's share, by the kernel's walk (tile = block, block
    # + grid, ...), is the same give or take one, in as many rounds.
    monkeypatch.setattr(mqo.affine._backend, "gpu_multiprocessors", lambda: 132)
    mqo._kernels.clear_plans()
    threads = (mqo.affine._QMV_STREAM_WARPS + 1) * 32
    for n, blocks in ((14336, 224), (11008, 230), (4096, 256), (128256, 264)):
        (launch,) = record_launches(stream_qmm(1, n=n))
        assert launch.kernel.name == "affine_qmv_stream"
        assert launch.grid == (blocks * threads, 1, 1), n
        tiles = -(-n // 16)
        shares = {len(range(b, tiles, blocks)) for b in range(blocks)}
        assert shares <= {tiles // blocks, -(-tiles // blocks)}, n
        assert -(-tiles // blocks) == -(-tiles // min(tiles, 264)), n
    monkeypatch.setattr(mqo.affine, "_QMV_STREAM_EVEN_TILES", False)
    mqo._kernels.clear_plans()
    (launch,) = record_launches(stream_qmm(1, n=14336))
    assert launch.grid == (264 * threads, 1, 1)
    monkeypatch.setattr(mqo.affine, "_QMV_STREAM_EVEN_TILES", True)
    mqo._kernels.clear_plans()

    # The register-batch mat-vec's warps, trip length and run: 8 warps and
    # two-unit trips for a few blocks (more x rows: only for K past 12288,
    # under 8 bits and under 16 rows), one-unit trips for one row of K past
    # 12288 at 1, 2, 3, 5 and 8 bits and for one 8-bit row of any K on 8
    # warps, 16 warps for 8-bit group 32 past 12288; one row at 6 bits
    # takes runs of two units where K holds whole runs.
    def shape(m, k, bits, group_size=64, n=300):
        (launch,) = record_launches(stream_qmm(m, k, bits, group_size, n))
        assert launch.kernel.name == "affine_qmv_mma"
        template = dict(launch.template)
        return template["KW"], template["UNROLL"], template["RUN"]

    assert shape(1, 14336, 4) == (8, 2, 1)
    assert shape(1, 14336, 2) == (8, 1, 1)
    assert shape(1, 14336, 8) == (8, 1, 1)
    assert shape(1, 14336, 8, group_size=32) == (16, 1, 1)
    assert shape(8, 14336, 8, group_size=32) == (4, 2, 1)
    assert shape(1, 4096, 8, group_size=32) == (8, 1, 1)
    assert shape(1, 1024, 8, group_size=32) == (4, 2, 1)
    assert shape(8, 14336, 4) == (8, 2, 1)
    assert shape(16, 14336, 4) == (4, 2, 1)
    assert shape(8, 8192, 4) == (4, 2, 1)
    assert shape(1, 14336, 5) == (8, 1, 1)
    assert shape(1, 14336, 6) == (8, 1, 2)
    assert shape(1, 2048, 6) == (8, 1, 2)
    assert shape(1, 2048 + 32, 6, group_size=32) == (8, 2, 1)  # 65 units: no runs
    assert shape(8, 14336, 6) == (8, 2, 1)
    # 8 warps only while one wave of 8-warp blocks (of 16 weight rows) holds
    # the grid: four an SM at one x row, three at more.
    monkeypatch.setattr(mqo.affine._backend, "gpu_multiprocessors", lambda: 20)
    assert shape(1, 2048, 4, n=16 * 80) == (8, 2, 1)
    assert shape(1, 2048, 4, n=16 * 81) == (4, 2, 1)
    assert shape(2, 14336, 4, n=16 * 60) == (8, 2, 1)
    assert shape(2, 14336, 4, n=16 * 61) == (4, 2, 1)
    # The staged row's pair-order copy fits beside the stages at K = 4096
    # and not at 8192 (rewritten in place there).
    for k, copied in ((4096, 1), (8192, 0)):
        (launch,) = record_launches(stream_qmm(1, k=k))
        assert (dict(launch.template)["XS"], dict(launch.template)["XP"]) == (1, copied)
    assert picked(stream_qmm(1), "sm_80") == [("affine_qmv_mma", 1)]
    assert picked(stream_qmm(2)) == [("affine_qmv_mma", 2)]
    # Weights of at least _QMV_STREAM_WIDE_N rows (vocabulary heads) stream
    # up to 8 x rows; x is staged while it fits 16 KB (two rows of 4096).
    monkeypatch.setattr(mqo.affine, "_QMV_STREAM_WIDE_N", 300)
    for m, staged in ((2, 1), (3, 0), (8, 0)):
        (launch,) = record_launches(stream_qmm(m))
        assert launch.kernel.name == "affine_qmv_stream"
        assert dict(launch.template)["XS"] == staged
    assert picked(stream_qmm(9)) == [("affine_qmv_mma", 16)]
    assert picked(stream_qmm(2, n=299)) == [("affine_qmv_mma", 2)]
    assert picked(stream_qmm(1, k=8704)) == [("affine_qmv_mma", 1)]
    assert picked(stream_qmm(1, k=2048)) == [("affine_qmv_mma", 1)]
    assert picked(stream_qmm(1, bits=8)) == [("affine_qmv_mma", 1)]
    assert picked(stream_qmm(17)) == [("affine_qmm_wgmma", None)]
    # Past 16 rows, the tensor-core tile: wgmma on Hopper at every width,
    # mma.sync on other GPUs.
    assert picked(qmm(17)) == [("affine_qmm_wgmma", None)]
    assert picked(qmm(17), "sm_80") == [("affine_qmm_mma", None)]
    assert picked(qmm(17), "sm_100") == [("affine_qmm_mma", None)]
    w3 = _packed((300, 256), 3, 64, mx.float16)
    three_bits = lambda: mqo.quantized_matmul(
        mx.zeros((17, 256), mx.float16), *w3, bits=3
    )
    assert picked(three_bits) == [("affine_qmm_wgmma", None)]
    assert picked(three_bits, "sm_80") == [("affine_qmm_mma", None)]

    def tile_rows(fn, architecture=HOPPER):
        return [dict(l.template)["BM"] for l in record_launches(fn, architecture)]

    assert tile_rows(qmm(128)) == [128]
    # 256 rows take the m64n256 wgmma tile at every width, on Hopper only.
    assert tile_rows(qmm(256)) == [256]
    assert tile_rows(qmm(256), "sm_80") == [128]
    assert tile_rows(
        lambda: mqo.quantized_matmul(mx.zeros((256, 256), mx.float16), *w3, bits=3)
    ) == [256]
    w8 = _packed((300, 256), 8, 64, mx.float16)
    eight_bits = lambda: mqo.quantized_matmul(
        mx.zeros((256, 256), mx.float16), *w8, bits=8
    )
    assert tile_rows(eight_bits) == [256]
    assert picked(qmm(1, mx.float32)) == [("affine_qmv", 1)]
    assert picked(qmm(3, mx.float32)) == [("affine_qmv", 4)]
    assert picked(qmm(5, mx.float32)) == [("affine_qmv", 8)]
    assert picked(qmm(8, mx.float32)) == [("affine_qmv", 8)]
    assert picked(qmm(9, mx.float32)) == [("affine_qmm", None)]
    transposed = lambda: mqo.quantized_matmul(
        mx.zeros((3, 300), mx.float32),
        w_q,
        scales.astype(mx.float32),
        biases.astype(mx.float32),
        transpose=False,
    )
    assert picked(transposed) == [("affine_qmm_n", None)]
    assert picked(qmm(512, mx.float32)) == [("affine_qmm", None)]
    one_token = lambda: mqo.gather_qmm(
        mx.zeros((1, 1, 1, 256), mx.float16), *experts, rhs_indices=mx.array([[1, 5]])
    )
    assert picked(one_token) == [("affine_qmv_mma", 1)]
    routes = mx.array(np.sort(np.random.default_rng(0).integers(0, 8, 512)))
    many_tokens = lambda: mqo.gather_qmm(
        mx.zeros((512, 1, 256), mx.float16),
        *experts,
        rhs_indices=routes,
        sorted_indices=True,
    )
    # Sorted routes: runs of one expert, up to 16 rows per weight read, with
    # the runs found on the device (no host read of the indices).
    assert picked(many_tokens) == [("affine_qmv_mma", 16)]
    # Fewer sorted rows than experts are mostly runs of one: one slot per
    # threadgroup row rather than 16 runs walked in series.
    few_tokens = lambda: mqo.gather_qmm(
        mx.zeros((6, 1, 256), mx.float16),
        *experts,
        rhs_indices=mx.array([0, 1, 2, 4, 6, 7]),
        sorted_indices=True,
    )
    assert picked(few_tokens) == [("affine_qmv_mma", 1)]
    unsorted = lambda: mqo.gather_qmm(
        mx.zeros((64, 1, 256), mx.float16), *experts, rhs_indices=routes[::-8]
    )
    assert picked(unsorted) == [("affine_qmv_mma", 1)]
