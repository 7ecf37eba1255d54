"""MLX's affine quantization format as ops: the drop-in twins of
``mx.quantize``, ``mx.dequantize``, ``mx.quantized_matmul`` and
``mx.gather_qmm`` (``mode="affine"``).

Format (as ``mx.quantize`` writes it): a weight ``[..., K]`` is cut into
groups of ``group_size`` consecutive values along its last axis; each group
has a scale ``s`` and a bias ``b`` (in the weight's dtype) and each value a
``bits``-wide code ``q`` in ``[0, 2**bits)``, standing for ``q * s + b``. The
codes of a row form one little-endian bit stream, value ``i`` at bit
``i * bits``, stored as ``uint32`` words: for 1, 2, 4 and 8 bits each word
holds ``32 / bits`` whole codes; for 3, 5 and 6 bits a code may straddle two
words (MLX writes those as packs of 3, 5 and 3 bytes, which is the same
stream).

Every op comes in three pieces: ``_<op>_reference`` (pure ``mx``; the
definition and the oracle), ``_<op>_kernel`` (the Metal bodies in
``kernels/``, run on CUDA through the compatibility header) and the public
``<op>``, which validates once and dispatches on the stream's device. On a
CPU stream the reference path (``_<op>_cpu``) hands quantize and few-row
products to MLX's own CPU kernels and splits large ops over the cores (see
_CPU_BUILTIN). The public ops plan
each call signature once (``_plan_<op>``, kept by a ``CallPlans``), so a
repeated call, every layer of every decoded token, replays a compiled graph
instead of running this module's Python again. The matmuls are
``mx.custom_function`` s, so gradients with respect to ``x``, ``scales``
and ``biases`` follow the same path as the forward pass.
"""

import dataclasses
import functools
import math
import os
from typing import Callable, Optional, Tuple

import mlx.core as mx
import numpy as np

from . import _backend, _kernels
from . import _validate as check
from ._backend import StreamKey, StreamLike, backend, dispatch, override
from ._kernels import (
    CallPlans,
    HandedOverReplay,
    KernelSpec,
    Launcher,
    LayerReplay,
    ceil_to,
    device_table,
    launch,
    plan_cache,
    sizes,
)

AFFINE_BITS = (1, 2, 3, 4, 5, 6, 8)
AFFINE_GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 64
DEFAULT_BITS = 4
WORD_BITS = 32

# Bits whose codes straddle words: values and bytes per pack as MLX writes
# them (a pack is the smallest run of whole codes filling whole bytes).
_PACKS = {3: (8, 3), 5: (8, 5), 6: (4, 3)}

# mx.quantize's lower bound on a group's scale.
_SCALE_EPS = 1e-7

# ---- kernels (bodies in kernels/affine_*; layouts in kernels/affine.h) -----

_HEADERS = ("common.h", "affine.h")
_MATMUL_INPUTS = ("x", "w", "scales", "biases", "tiles", "slot_x", "slot_out", "params")
_QUANTIZE = KernelSpec(
    "affine_quantize", ("w", "params"), ("w_q", "scales", "biases"), _HEADERS
)
_DEQUANTIZE = KernelSpec(
    "affine_dequantize", ("w", "scales", "biases", "params"), ("out",), _HEADERS
)
# The mat-vec takes per-slot expert and x-row arrays (device arrays for MoE,
# so nothing is read back to the host) instead of a host-built tile list.
_QMV_INPUTS = ("x", "w", "scales", "biases", "slot_expert", "slot_x", "params")
_QMV = KernelSpec("affine_qmv", _QMV_INPUTS, ("out",), _HEADERS + ("affine_load.h",))
_MMA_HEADERS = _HEADERS + ("affine_mma.cuh",)
# Its tensor-core twin for half and bfloat16 on CUDA (same inputs).
_QMV_MMA_HEADERS = _MMA_HEADERS + ("affine_qmv_mma_block.cuh",)
_QMV_MMA = KernelSpec(
    "affine_qmv_mma",
    _QMV_INPUTS,
    ("out",),
    _QMV_MMA_HEADERS,
    body_file="affine_qmv_mma.cu",
    dialects=("cuda",),
)


def _fused_qmv_mma_spec(weights: int, word: str) -> KernelSpec:
    """The tensor-core mat-vec of ``weights`` weights that read one input
    (kernels/affine_qmv_mma_<word>.cu): ``_QMV_MMA``'s inputs with one
    ``w, scales, biases`` triple per weight, and an output per weight."""
    triples = tuple(
        f"{name}{i}" for i in range(weights) for name in ("w", "scales", "biases")
    )
    return KernelSpec(
        f"affine_qmv_mma_{word}",
        ("x", *triples, "slot_expert", "slot_x", "params"),
        tuple(f"out{i}" for i in range(weights)),
        _QMV_MMA_HEADERS,
        body_file=f"affine_qmv_mma_{word}.cu",
        dialects=("cuda",),
    )


# By the number of weights they take.
_QMV_MMA_FUSED = {
    2: _fused_qmv_mma_spec(2, "pair"),
    3: _fused_qmv_mma_spec(3, "triple"),
}
# Hopper's streamed mat-vec for one weight (kernels/affine_qmv_stream.cu):
# a producer warp has the copy engine move chunks of KC values of 16 weight
# rows (1 KB of codes a row at most widths, so each bulk copy is large)
# into STAGES shared-memory buffers while the consumer warps multiply.
_QMV_STREAM_SHARED_BYTES = 96 * 1024  # two blocks fit an SM's 228 KB
_QMV_STREAM = KernelSpec(
    "affine_qmv_stream",
    ("x", "w", "scales", "biases", "params"),
    ("out",),
    _MMA_HEADERS + ("affine_stream.cuh",),
    body_file="affine_qmv_stream.cu",
    dialects=("cuda",),
    shared_memory=_QMV_STREAM_SHARED_BYTES,
)
_QMV_STREAM_WARPS = 8  # consumer warps; one producer warp more
_QMV_STREAM_BLOCKS_PER_SM = 2
_QMV_STREAM_MAX_STAGES = 6
# A chunk is a multiple of 1024 values, so a row's codes in it are a
# multiple of 128 bytes and its scales of 16 (bulk copies move multiples
# of 16 bytes); about 1 KB of codes a row.
_QMV_STREAM_CHUNK_QUANTUM = 1024
_QMV_STREAM_ROW_CODE_BYTES = (2048, 1024)  # tried in turn
# x rows up to this size are staged in shared memory: one row of the
# longest K the dispatcher streams. 32 KB staged left fewer stages: four
# rows of K = 4096 ran slower staged than eight rows read from global memory
# (H200, 128256x4096, twenty-fifth session: q4 132 us against 123; q5 at
# four rows 245 against 196 on the register-batch mat-vec).
_QMV_STREAM_MAX_X_BYTES = 16 * 1024
_QMV_STREAM_ARCHITECTURES = ("sm_90",)  # bulk copies and mbarrier tx counts
# Where it wins on the H100 (same-process A/B, tenth session): one x row,
# 4 bits, K from 4096 up to 8192 (x staged beside two 2 KB-a-row stages).
# Once x was staged in pair order (fourteenth session) 2, 3, 5 and 6 bits
# joined: 0.6-2.4 us ahead at 14336x4096, level to 0.8 ahead at 4096x8192
# and level at 4096x4096 except 3 bits, 0.8 us behind there (fifteenth
# session). 8 bits still lost at 14336x4096 (0.8 us). At K = 14336 and at
# 8 rows it tied or lost, so those stay on the register-batch mat-vec; so
# do rows of K = 2048 (thirteenth
# session: 151936x2048 took 135 us a call there against 151 streamed,
# 4096x2048 43 against 48, and no K = 2048 shape was ahead streamed by
# more than 0.4 us).
_QMV_STREAM_MAX_ROWS = 1
# Weights of many rows (vocabulary heads) stream 2 to 8 x rows too: on the
# H200 (128256x4096, same process, three rounds, twenty-fifth session) two
# rows took 81-147 us streamed against 112-188 on the register-batch
# mat-vec at 2-5 bits, eight rows 112-135 against 137-178 at 2-4 bits (6
# bits 176 against 227). At 14336 rows it tied or won by less.
_QMV_STREAM_WIDE_N = 65536
_QMV_STREAM_WIDE_MAX_ROWS = 8
_QMV_STREAM_MIN_K = 4096
_QMV_STREAM_MAX_K = 8192
_QMV_STREAM_BITS = (2, 3, 4, 5, 6)


def _qmv_stream_geometry(
    bits: int,
    group_size: int,
    itemsize: int,
    x_bytes: int = 0,
    stage_limit: Optional[int] = None,
) -> Tuple[int, int, bool]:
    """``(KC, STAGES, XS)`` of the streamed mat-vec: values per chunk, the
    stage buffers that fit its shared memory (the stage layout of
    kernels/affine_qmv_stream.cu: codes padded by 64 bytes a row, scales
    and biases by 16) and whether ``x_bytes`` of x rows are staged there
    too. Larger chunks first; x is staged where that leaves two stages and
    it is at most ``stage_limit`` bytes (default _QMV_STREAM_MAX_X_BYTES)."""
    quantum = _QMV_STREAM_CHUNK_QUANTUM
    if stage_limit is None:
        stage_limit = _QMV_STREAM_MAX_X_BYTES
    for staged in (True, False) if x_bytes <= stage_limit else (False,):
        room = _QMV_STREAM_SHARED_BYTES - (x_bytes if staged else 0)
        for row_code_bytes in _QMV_STREAM_ROW_CODE_BYTES:
            chunk = max(quantum, row_code_bytes * 8 // bits // quantum * quantum)
            row_bytes = (
                chunk * bits // 8 + 64 + 2 * (chunk // group_size * itemsize + 16)
            )
            stages = min(_QMV_STREAM_MAX_STAGES, room // (16 * row_bytes))
            if stages >= 2:
                return chunk, stages, staged
    raise AssertionError(f"no streamed mat-vec geometry for {bits} bits")


def _qmv_stream_layout(
    bits: int, group_size: int, itemsize: int, x_bytes: int
) -> Tuple[int, int, bool, bool]:
    """``(KC, STAGES, XS, XP)`` of the streamed mat-vec: its geometry
    (:func:`_qmv_stream_geometry`) and whether staged x rows also get a
    second copy in pair order, which is only where that copy costs no
    stage: at K = 8192 the smaller chunks it would force ran 30% slower
    (14336x8192 and 2048x8192 on the H100), while at K = 4096 the copy
    saves 6-7% over rewriting the rows in place."""
    chunk, stages, staged = _qmv_stream_geometry(bits, group_size, itemsize, x_bytes)
    # Only room decides the copy: it is not held to the staging limit.
    copy_pairs = staged and _qmv_stream_geometry(
        bits, group_size, itemsize, 2 * x_bytes, stage_limit=2 * x_bytes
    ) == (chunk, stages, staged)
    return chunk, stages, staged, copy_pairs


def _qmv_stream_fits(
    stream, dtype, rows: int, n: int, k: int, bits: int, group_size: int
) -> bool:
    """Whether the streamed mat-vec takes a decode of ``rows`` x rows by an
    ``[n, k]`` weight: tensor cores on a Hopper GPU; rows of whole 16-byte
    runs of codes and of scales (K a multiple of 8 groups) so that every
    bulk copy is aligned; and a case where it was measured faster than the
    register-batch mat-vec (docs/benchmarks.md, tenth and twenty-fifth
    sessions). The kernel itself takes every width and up to 16 rows."""
    max_rows = (
        _QMV_STREAM_WIDE_MAX_ROWS if n >= _QMV_STREAM_WIDE_N else _QMV_STREAM_MAX_ROWS
    )
    return (
        _tensor_cores(stream, dtype)
        and _backend.gpu_architecture() in _QMV_STREAM_ARCHITECTURES
        and k % (8 * group_size) == 0
        and rows <= max_rows
        and _QMV_STREAM_MIN_K <= k <= _QMV_STREAM_MAX_K
        and bits in _QMV_STREAM_BITS
    )


_QMM = KernelSpec("affine_qmm", _MATMUL_INPUTS, ("out",), _HEADERS + ("affine_load.h",))
_QMM_N = KernelSpec("affine_qmm_n", _MATMUL_INPUTS, ("out",), _HEADERS)
# kernels/affine_qmm_mma.cu's dynamic shared memory: two buffers of BM
# (at most 128) activation rows and BN = 128 weight rows, 72 halves each.
_MMA_SHARED_BYTES = 2 * (128 + 128) * 72 * 2
_QMM_MMA = KernelSpec(
    "affine_qmm_mma",
    _MATMUL_INPUTS,
    ("out",),
    _MMA_HEADERS,
    body_file="affine_qmm_mma.cu",
    dialects=("cuda",),
    shared_memory=_MMA_SHARED_BYTES,
)


# Its Hopper twin (wgmma, sm_90a only; whole-word widths): three stages of
# 128 weight rows and BM x rows, 128 bytes each (64 values of K), plus 1 KB
# to align them for the swizzle.
def _wgmma_shared_bytes(tile_rows: int) -> int:
    return 3 * (128 + tile_rows) * 128 + 1024


_QMM_WGMMA = KernelSpec(
    "affine_qmm_wgmma",
    _MATMUL_INPUTS,
    ("out",),
    _MMA_HEADERS + ("affine_wgmma.cuh",),
    body_file="affine_qmm_wgmma.cu",
    dialects=("cuda",),
    shared_memory=_wgmma_shared_bytes(128),
)
# With 256 x rows a block (m64n256 per warpgroup) each dequantized weight
# serves twice the tokens; it pays once an expert has that many rows, at
# every width (H200, 512 x 14336 x 4096 and 512 x 4096 x 14336: 3, 5 and 6
# bits 162-183 us against 210-252 on the 128-row tile; 8 bits, group 32,
# 171-188 against 205-218, where ptxas keeps it in 255 registers with a
# 4-byte spill).
_WGMMA_TALL_ROWS = 256
_QMM_WGMMA_TALL = dataclasses.replace(
    _QMM_WGMMA, shared_memory=_wgmma_shared_bytes(_WGMMA_TALL_ROWS)
)
_WGMMA_ARCHITECTURES = ("sm_90",)  # wgmma exists on sm_90a alone
_THREADS = 256  # elementwise kernels: threads per threadgroup
_SIMD = 32
_QMV_SIMDGROUPS = 4  # kernels/affine_qmv.metal
_QMV_MAX_ROWS = 8  # x rows one qmv tile carries (its XR)
_QMV_MMA_ROWS = 16  # kernels/affine_qmv_mma.cu: weight rows per block
_QMV_MMA_MAX_ROWS = 16  # and the x rows a block row carries (two n8 tiles)
# It splits K over 8 warps rather than 4 when the grid alone would leave
# SMs short of warps (a bandwidth-bound kernel needs loads in flight), which
# is while one wave of 8-warp blocks holds the grid: four blocks an SM at
# one x row, three at more (their registers: 60-100 at 2-16 rows). Past
# that, 4 warps won at every width (H200, same process, twenty-fifth
# session): one row, 14336x2048, 11008x2048, and 14336x4096 at 8 bits,
# 0.5-3.1 us (896 and 688 blocks); 2, 8 and 16 rows, 14336x4096, 11008x4096
# and 8192x8192 (512 blocks), 0.5-12 us (q8 group 32 at 16 rows 34.6 against
# 47.0). 8 warps stayed ahead at 512 blocks for one row (8192x14336, 4 and
# 8 bits, 0.7-1.6 us) and at 256 for more rows (4096x14336, q6, 0.6-0.9).
# More x rows keep 8 warps only there: K of at least _QMV_MMA_LONG_K,
# under 8 bits and under 16 rows. On grids of one wave or less (128 and
# 256 blocks, 2-16 rows, three rounds, twenty-sixth session) 4 warps won
# at K up to 8192 (q4 4096x8192 at 16 rows 16.8 us against 19.1, q4
# 4096x4096 at 8 rows 7.0 against 7.6), at every K for 8 bits (q8
# 4096x14336 at 16 rows 30.5 against 38.2) and at 16 rows (q4 4096x11008
# 20.0 against 24.2); 8 warps kept 0.5-1.0 us at q4 K 11008-14336 for 2
# and 8 rows.
_QMV_MMA_WIDE_WAVE = 4  # 8-warp blocks an SM takes in a wave, one x row
_QMV_MMA_WIDE_WAVE_ROWS = 3  # the same with more x rows
_QMV_MMA_UNROLL = 2  # units per lane with loads in flight together
# One x row, few blocks and long rows: a trip of one unit per lane with its
# loads issued at once beat two-unit trips at every width but 4 bits (2-6
# bits 0.4-1.3 us, 8 bits 0.5 us, 4096x14336, same-process A/B on the H100,
# fifteenth session), and 8-bit group-32 rows gained another 1.1-1.5 us
# from 16 warps (more loads in flight where a warp's trips are few).
# 8-bit rows take one-unit trips at every K on such grids: 8 warps, 0.1-2.9
# us at 2048-6144 rows of K 2048-8192 (q8 6144x4096 10.0 us against 12.1;
# H200, three rounds, twenty-sixth session).
_QMV_MMA_LONG_K = 12288
_QMV_MMA_SINGLE_UNROLL = 1
_QMV_MMA_WIDE_WARPS = 16
_QMV_MMA_WIDE_FORMATS = ((8, 32),)
# One x row at 6 bits: a lane loads runs of two consecutive units (12 words,
# three 16-byte vectors) where K holds whole runs, in one-run trips, rather
# than a unit's six words one by one: 4096x14336 21.3 us against 23.8,
# 4096x2048 6.0 against 6.3 (H200, same process, twenty-fourth session).
# Runs lost or tied everywhere else: 3 and 5 bits (runs of 4 units, 12 and
# 20 words), 2, 4 and 8 bits, and at 8 x rows.
_QMV_MMA_RUNS = {6: 2}
_UNIT_VALUES = 32  # a unit of codes, AFFINE_UNIT in kernels/affine.h
_QMM_TILE = (32, 64, 128)  # kernels/affine_qmm.metal (and _n): BM, BN, threads
_MMA_TILE = (64, 128, 256)  # kernels/affine_qmm_mma.cu: BM, BN, threads
# Its taller tile (BM = 128) halves the dequantization per output; it pays
# once an expert has that many rows (plain prefill, not typical MoE).
_MMA_TALL_ROWS = 128
_MAX_GRID_Y = 65535  # CUDA's limit on grid y (tiles)


# ---- format and validation -----------------------------------------------


def _format(op: str, group_size, bits, mode, global_scale=None) -> Tuple[int, int]:
    """Checked ``(group_size, bits)``, with MLX's affine defaults for None."""
    if mode != "affine":
        check.fail(
            op,
            "mode",
            "'affine' (the other modes of mlx.core are not provided here)",
            repr(mode),
        )
    if global_scale is not None:
        check.fail(
            op, "global_scale", "None (it applies to mode 'nvfp4' only)", "an array"
        )
    group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
    bits = DEFAULT_BITS if bits is None else bits
    group_size = check.choice(op, "group_size", group_size, AFFINE_GROUP_SIZES)
    return group_size, check.choice(op, "bits", bits, AFFINE_BITS)


def _check_packed(
    op: str, w, scales, biases, group_size: int, bits: int, where: str = ""
) -> int:
    """Check a packed weight and its scales and biases; return K, the
    unpacked length of ``w``'s last axis. ``where`` leads the arguments'
    names in messages (``"weights[1] "`` for an op taking several)."""
    check.array(op, f"{where}w", w)
    check.dtype(op, f"{where}w", w, (mx.uint32,))
    check.ndim(op, f"{where}w", w, at_least=2)
    check.array(op, f"{where}scales", scales)
    check.dtype(op, f"{where}scales", scales, check.FLOAT_DTYPES)
    if biases is None:
        check.fail(
            op, f"{where}biases", "an array (affine quantization needs biases)", None
        )
    check.array(op, f"{where}biases", biases)
    check.dtype(op, f"{where}biases", biases, check.FLOAT_DTYPES)
    packed = w.shape[-1]
    if packed == 0 or (packed * WORD_BITS) % (bits * group_size):
        check.fail(
            op,
            f"{where}w",
            f"a last axis of uint32 words holding whole groups of {group_size} "
            f"{bits}-bit values (a multiple of {bits * group_size // 32} words)",
            f"shape {tuple(w.shape)}",
        )
    k = packed * WORD_BITS // bits
    expected = (*w.shape[:-1], k // group_size)
    if tuple(scales.shape) != expected:
        check.fail(
            op,
            f"{where}scales",
            f"shape {expected} (one per group of {group_size} for w of shape "
            f"{tuple(w.shape)} at {bits} bits)",
            f"shape {tuple(scales.shape)}",
        )
    if tuple(biases.shape) != expected:
        check.fail(
            op,
            f"{where}biases",
            f"shape {expected}, the shape of scales",
            f"shape {tuple(biases.shape)}",
        )
    return k


def _result_dtype(*dtypes: mx.Dtype) -> mx.Dtype:
    """MLX's promotion among float dtypes (f16 with bf16 gives f32)."""
    kinds = set(dtypes)
    return kinds.pop() if len(kinds) == 1 else mx.float32


def _check_matmul(
    op: str, x, w, scales, biases, transpose, group_size, bits, where: str = ""
):
    """Checks shared by the matmuls; returns ``(K, N, out_dtype)`` where the
    product is ``[..., M, K] x [K, N]`` (``where`` as for
    :func:`_check_packed`)."""
    k = _check_packed(op, w, scales, biases, group_size, bits, where)
    check.array(op, "x", x)
    check.dtype(op, "x", x, check.FLOAT_DTYPES)
    check.ndim(op, "x", x, at_least=1)
    check.boolean(op, "transpose", transpose)
    inner, outer = (k, w.shape[-2]) if transpose else (w.shape[-2], k)
    if x.shape[-1] != inner:
        check.fail(
            op,
            "x",
            f"a last axis of {inner} (w of shape {tuple(w.shape)} is a "
            f"{'transposed ' if transpose else ''}{inner}x{outer} matrix at "
            f"{bits} bits)",
            f"shape {tuple(x.shape)}",
        )
    return inner, outer, _result_dtype(x.dtype, scales.dtype, biases.dtype)


def _check_indices(op: str, arg: str, indices) -> None:
    """An index array, if given: an integer ``mx.array`` (checked on the
    host; its values are never read back, see :func:`gather_qmm`)."""
    if indices is not None:
        check.array(op, arg, indices)
        check.integer_dtype(op, arg, indices)


@functools.lru_cache(maxsize=256)
def _broadcast_arange(batch_shape: tuple, shape: tuple) -> mx.array:
    """Every batch entry in order, broadcast to ``shape`` and contiguous
    (built once per shape pair)."""
    entries = np.arange(int(np.prod(batch_shape)), dtype=np.uint32)
    return mx.array(
        np.ascontiguousarray(np.broadcast_to(entries.reshape(batch_shape), shape))
    )


def _indices_in_shape(indices, batch_shape: tuple, shape: tuple) -> mx.array:
    if indices is None:
        return _broadcast_arange(batch_shape, shape)
    return indices if indices.shape == shape else mx.broadcast_to(indices, shape)


def _batch_size(a: mx.array) -> int:
    """How many matrices ``a`` holds over its last two axes, from its
    batch shape (its size over a matrix's would divide by zero for
    matrices of no rows)."""
    return math.prod(a.shape[:-2])


def _gather_valid(lhs, rhs, x, w):
    """Which products have both indices in range, and the indices clipped
    into range (safe to gather with)."""
    x_batch, w_batch = _batch_size(x), _batch_size(w)
    lhs64, rhs64 = lhs.astype(mx.int64), rhs.astype(mx.int64)
    valid = (lhs64 >= 0) & (lhs64 < x_batch) & (rhs64 >= 0) & (rhs64 < w_batch)
    lhs = mx.where(valid, lhs, 0).astype(mx.uint32)
    rhs = mx.where(valid, rhs, 0).astype(mx.uint32)
    return valid, lhs, rhs


def _nan_where_invalid(out, valid):
    return mx.where(valid[..., None, None], out, mx.array(float("nan"), out.dtype))


# ---- packing ---------------------------------------------------------------


def _unpack(w: mx.array, bits: int) -> mx.array:
    """uint32 words ``[..., P]`` -> uint32 codes ``[..., P * 32 / bits]``."""
    # Sizes are spelled out in these reshapes (here and below), since MLX
    # cannot infer an axis (-1) of an empty array.
    lead, k = w.shape[:-1], w.shape[-1] * WORD_BITS // bits
    mask = (1 << bits) - 1
    if WORD_BITS % bits == 0:
        shifts = mx.arange(0, WORD_BITS, bits, dtype=mx.uint32)
        codes = (w[..., None] >> shifts) & mask
        return codes.reshape(*lead, k)
    per_pack, pack_bytes = _PACKS[bits]
    wide = mx.uint64 if pack_bytes * 8 > WORD_BITS else mx.uint32
    raw = mx.contiguous(w).view(mx.uint8).reshape(*lead, k // per_pack, pack_bytes)
    raw = raw.astype(wide)
    packs = raw[..., 0]
    for i in range(1, pack_bytes):
        packs = packs | (raw[..., i] << (8 * i))
    shifts = mx.arange(0, per_pack * bits, bits).astype(wide)
    codes = ((packs[..., None] >> shifts) & mask).astype(mx.uint32)
    return codes.reshape(*lead, k)


def _pack(codes: mx.array, bits: int) -> mx.array:
    """uint32 codes ``[..., K]`` -> uint32 words ``[..., K * bits / 32]``,
    the inverse of :func:`_unpack`."""
    lead, k = codes.shape[:-1], codes.shape[-1]
    if WORD_BITS % bits == 0:
        per_word = WORD_BITS // bits
        shifts = mx.arange(0, WORD_BITS, bits, dtype=mx.uint32)
        fields = codes.reshape(*lead, k // per_word, per_word) << shifts
        # The fields are disjoint, so their sum is their bitwise or.
        return fields.sum(-1).astype(mx.uint32)
    per_pack, pack_bytes = _PACKS[bits]
    wide = mx.uint64 if pack_bytes * 8 > WORD_BITS else mx.uint32
    shifts = mx.arange(0, per_pack * bits, bits).astype(wide)
    fields = codes.reshape(*lead, k // per_pack, per_pack).astype(wide) << shifts
    packs = fields.sum(-1).astype(wide)
    byte_shifts = mx.arange(0, 8 * pack_bytes, 8).astype(wide)
    raw = ((packs[..., None] >> byte_shifts) & 0xFF).astype(mx.uint8)
    return raw.reshape(*lead, k // per_pack * pack_bytes).view(mx.uint32)


# ---- quantize ----------------------------------------------------------------


# On a CPU stream the reference path hands work to MLX's own CPU kernels
# where they are faster (quantize always; products and gathers of few rows:
# see _CPU_BUILTIN_MAX_ROWS). The reference functions stay the definition,
# the oracle where the path is forced on a GPU stream, and the VJPs' basis;
# tests turn this off to check them on the CPU.
_CPU_BUILTIN = True


def _on_cpu_stream() -> bool:
    """Whether the reference path runs now on a CPU stream (``dispatch``
    makes the op's stream the default)."""
    return mx.default_device() == mx.cpu


def _cpu_builtin(*arrays: mx.array) -> bool:
    """Whether the reference path, now running on ``arrays``, may use MLX's
    CPU kernels: not on empty arrays, where some of them stop the process
    with a floating-point exception (MLX 0.32.4: ``mx.quantized_matmul``
    with no rows or no columns, ``mx.gather_qmm`` with no rows)."""
    return _CPU_BUILTIN and _on_cpu_stream() and not _backend.has_empty(arrays)


# MLX runs each CPU stream on its own thread, and a quantized product (MLX's
# CPU kernel, or the reference's unpacking and float32 matmul) on one core.
# So a large product split by output columns over one stream per core runs
# that much faster: 2-core Linux host, 4096x4096 4-bit, one row 11.2 ms ->
# 5.6, 8 rows 97 -> 45, the reference at 64 rows 582 -> 302 and at 512 rows
# 3.36 s -> 1.69. Below about 2^22 multiply-adds the split costs what it
# saves (1024x1024, one row: 0.70 ms against 0.72).
_CPU_SPLIT_MIN_WORK = 1 << 22
_CPU_MAX_PARTS = 8
# Copying out one expert's packed codes costs about as much as casting
# eight experts' scales and biases to float32 (see _gather_qmm_cpu).
_CPU_EXPERT_COPY_COST = 8


@functools.lru_cache(maxsize=1)
def _cpu_worker_streams() -> Tuple[mx.Stream, ...]:
    """One CPU stream per core this process may use (at most
    _CPU_MAX_PARTS), made once; none on a single core."""
    if hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))  # the cores a container allows
    else:
        cores = os.cpu_count() or 1
    if cores < 2:
        return ()
    return tuple(mx.new_stream(mx.cpu) for _ in range(min(cores, _CPU_MAX_PARTS)))


def _over_cores(compute, n: int, work: int, axis: int = -1):
    """``compute(start, stop)`` gives the part ``[start, stop)`` along
    ``axis`` of an op's output (or of each of its outputs) of ``n`` there,
    costing ``work`` in all (multiply-adds, or values for quantize); on a
    CPU stream and past _CPU_SPLIT_MIN_WORK, parts run on the worker
    streams at once and are joined."""
    large = work >= _CPU_SPLIT_MIN_WORK
    streams = _cpu_worker_streams() if large and _on_cpu_stream() else ()
    if len(streams) < 2 or n < 2 * len(streams):
        return compute(0, n)
    step = -(-n // len(streams))
    parts = []
    for start, stream in zip(range(0, n, step), streams):
        with mx.stream(stream):
            parts.append(compute(start, min(start + step, n)))
    if isinstance(parts[0], tuple):
        return tuple(mx.concatenate(p, axis=axis) for p in zip(*parts))
    return mx.concatenate(parts, axis=axis)


def _weight_rows(start: int, stop: int, *arrays):
    """Rows ``[start, stop)`` (the second-to-last axis) of each array (the
    arrays themselves for all their rows: a call not split over the cores
    adds no slices to the graph)."""
    if start == 0 and stop == arrays[0].shape[-2]:
        return list(arrays)
    return [a[..., start:stop, :] for a in arrays]


def _quantize_reference(w, group_size, bits):
    n_bins = float((1 << bits) - 1)
    groups = w.astype(mx.float32).reshape(
        *w.shape[:-1], w.shape[-1] // group_size, group_size
    )
    w_max = groups.max(axis=-1, keepdims=True)
    w_min = groups.min(axis=-1, keepdims=True)
    # Two bits and more: the scale points from the edge of larger magnitude
    # through the other one, and is then nudged so that edge lands exactly
    # on a code; a group whose edge rounds to code 0 keeps a zero bias (as
    # mx.quantize does).
    if bits == 1:
        # One bit: the two codes stand for the group's minimum and maximum.
        scale = mx.maximum(w_max - w_min, _SCALE_EPS)
        bias = w_min
    else:
        min_side = mx.abs(w_min) > mx.abs(w_max)
        scale = mx.maximum((w_max - w_min) / n_bins, _SCALE_EPS)
        scale = mx.where(min_side, scale, -scale)
        edge = mx.where(min_side, w_min, w_max)
        q0 = mx.round(edge / scale)
        on_code = q0 != 0
        scale = mx.where(on_code, edge / mx.where(on_code, q0, 1.0), scale)
        bias = mx.where(on_code, edge, 0.0)
    codes = mx.clip(mx.round((groups - bias) / scale), 0.0, n_bins)
    w_q = _pack(codes.astype(mx.uint32).reshape(w.shape), bits)
    return w_q, scale.squeeze(-1).astype(w.dtype), bias.squeeze(-1).astype(w.dtype)


def _quantize_kernel(w, group_size, bits, *, stream):
    k = w.shape[-1]
    groups = w.size // group_size
    scale_shape = (*w.shape[:-1], k // group_size)
    return tuple(
        launch(
            _QUANTIZE,
            [w.reshape(-1), sizes(groups)],
            template=[("T", w.dtype), ("bits", bits), ("group_size", group_size)],
            grid=(ceil_to(max(groups, 1), _THREADS), 1, 1),
            threadgroup=(_THREADS, 1, 1),
            output_shapes=[
                (*w.shape[:-1], k * bits // WORD_BITS),
                scale_shape,
                scale_shape,
            ],
            output_dtypes=[mx.uint32, w.dtype, w.dtype],
            stream=stream,
        )
    )


def quantize(
    w: mx.array,
    group_size: Optional[int] = None,
    bits: Optional[int] = None,
    mode: str = "affine",
    *,
    global_scale: Optional[mx.array] = None,
    stream: StreamLike = None,
) -> Tuple[mx.array, mx.array, mx.array]:
    """Quantize ``w`` in MLX's affine format, bit-identical to
    ``mx.quantize(w, group_size, bits, mode="affine")``.

    Args:
        w (mlx.core.array): float32, float16 or bfloat16 values, at least two
            dimensions, the last a multiple of ``group_size``.
        group_size (int, optional): values per scale and bias: 32, 64 or 128.
            Default: 64.
        bits (int, optional): bits per value: 1, 2, 3, 4, 5, 6 or 8.
            Default: 4.
        mode (str): only ``"affine"``.
        global_scale: only ``None`` (an ``nvfp4`` option of ``mx.quantize``).
        stream (mlx.core.Stream or Device, optional): where to run.

    Returns:
        tuple(mlx.core.array, mlx.core.array, mlx.core.array): the packed
        codes (uint32, ``[..., K * bits / 32]``), the scales and the biases
        (``w.dtype``, ``[..., K / group_size]``).
    """
    return _QUANTIZE_CALLS(
        _plan_quantize, stream, (w,), (group_size, bits, mode, global_scale)
    )


_QUANTIZE_CALLS = CallPlans()


def _plan_quantize(stream, w, group_size, bits, mode, global_scale):
    op = "quantize"
    group_size, bits = _format(op, group_size, bits, mode, global_scale)
    check.array(op, "w", w)
    check.dtype(op, "w", w, check.FLOAT_DTYPES)
    check.ndim(op, "w", w, at_least=2)
    check.last_axis_multiple(
        op, "w", w, group_size, f"groups of group_size={group_size}"
    )

    def run(w):
        return dispatch(
            _quantize_cpu, _quantize_kernel, w, group_size, bits, stream=stream
        )

    return run


def _quantize_cpu(w, group_size, bits):
    """The reference path's quantize: on a CPU stream ``mx.quantize``
    itself, which the reference matches bit for bit, in one fused pass (2-core
    Linux host, 4096x4096: 59-130 ms against the reference's 200-315), rows
    split over the cores when there are many."""
    builtin = _cpu_builtin(w)

    def rows(start, stop):
        (part,) = _weight_rows(start, stop, w)
        if builtin:
            return tuple(mx.quantize(part, group_size=group_size, bits=bits))
        return _quantize_reference(part, group_size, bits)

    return _over_cores(rows, w.shape[-2], w.size, axis=-2)


# ---- dequantize --------------------------------------------------------------


def _dequantize_reference(w, scales, biases, group_size, bits, dtype):
    # mx.dequantize's arithmetic: the code times the scale, rounded to the
    # scales' dtype, plus the bias; then the cast to the requested dtype.
    codes = _unpack(w, bits).reshape(*scales.shape, group_size)
    values = codes.astype(scales.dtype) * scales[..., None] + biases[..., None]
    return values.reshape(*w.shape[:-1], scales.shape[-1] * group_size).astype(dtype)


def _dequantize_cpu(w, scales, biases, group_size, bits, dtype):
    """The reference path's dequantize, rows split over the cores on a CPU
    stream when there are many (faster than ``mx.dequantize`` already: 2-core
    Linux host, 4096x4096, 64-82 ms against 111-304 in float32)."""
    if w.ndim < 2:
        return _dequantize_reference(w, scales, biases, group_size, bits, dtype)

    def rows(start, stop):
        part = _weight_rows(start, stop, w, scales, biases)
        return _dequantize_reference(*part, group_size, bits, dtype)

    return _over_cores(rows, w.shape[-2], scales.size * group_size, axis=-2)


def _dequantize_kernel(w, scales, biases, group_size, bits, dtype, *, stream):
    if scales.dtype != biases.dtype:
        # Mixed scale and bias dtypes follow MLX's promotion between the
        # product and the sum; rare enough to leave to the mx ops.
        with mx.stream(stream):
            return _dequantize_reference(w, scales, biases, group_size, bits, dtype)
    units = w.size // bits  # 32 values per `bits` words
    return launch(
        _DEQUANTIZE,
        [
            w.reshape(-1),
            scales.reshape(-1),
            biases.reshape(-1),
            sizes(units, w.shape[-1] // bits),
        ],
        template=[
            ("T", scales.dtype),
            ("O", dtype),
            ("bits", bits),
            ("group_size", group_size),
        ],
        grid=(ceil_to(max(units, 1), _THREADS), 1, 1),
        threadgroup=(_THREADS, 1, 1),
        output_shapes=[(*w.shape[:-1], w.shape[-1] * WORD_BITS // bits)],
        output_dtypes=[dtype],
        stream=stream,
    )[0]


def dequantize(
    w: mx.array,
    scales: mx.array,
    biases: Optional[mx.array] = None,
    group_size: Optional[int] = None,
    bits: Optional[int] = None,
    mode: str = "affine",
    global_scale: Optional[mx.array] = None,
    dtype: Optional[mx.Dtype] = None,
    *,
    stream: StreamLike = None,
) -> mx.array:
    """Expand MLX affine codes back to values, bit-identical to
    ``mx.dequantize``: ``q * scale + bias`` in the scales' dtype.

    Args:
        w (mlx.core.array): packed codes, uint32 ``[..., P]``.
        scales (mlx.core.array): ``[..., P * 32 / bits / group_size]``.
        biases (mlx.core.array): same shape as ``scales`` (required).
        group_size (int, optional): 32, 64 or 128. Default: 64.
        bits (int, optional): 1, 2, 3, 4, 5, 6 or 8. Default: 4.
        mode (str): only ``"affine"``.
        global_scale: only ``None``.
        dtype (mlx.core.Dtype, optional): output dtype. Default: the
            promotion of the scales' and biases' dtypes.
        stream (mlx.core.Stream or Device, optional): where to run.

    Returns:
        mlx.core.array: ``[..., P * 32 / bits]`` values.
    """
    return _DEQUANTIZE_CALLS(
        _plan_dequantize,
        stream,
        (w, scales, biases),
        (group_size, bits, mode, global_scale, dtype),
    )


_DEQUANTIZE_CALLS = CallPlans()


def _plan_dequantize(
    stream, w, scales, biases, group_size, bits, mode, global_scale, dtype
):
    op = "dequantize"
    group_size, bits = _format(op, group_size, bits, mode, global_scale)
    _check_packed(op, w, scales, biases, group_size, bits)
    natural = _result_dtype(scales.dtype, biases.dtype)
    dtype = natural if dtype is None else check.float_dtype(op, "dtype", dtype)
    return _differentiable_dequantize(group_size, bits, dtype, StreamKey(stream))


@functools.lru_cache(maxsize=256)  # one per option set, not per call
def _differentiable_dequantize(group_size, bits, dtype, stream_key):
    """``dequantize`` on fixed options as an ``mx.custom_function`` of
    ``(w, scales, biases)``: differentiable with respect to the scales and
    biases, as ``mx.dequantize`` is (DWQ trains a quantized embedding's
    through its lookups)."""
    stream = stream_key.stream

    @mx.custom_function
    def dq(w, scales, biases):
        return dispatch(
            _dequantize_cpu,
            _dequantize_kernel,
            w,
            scales,
            biases,
            group_size,
            bits,
            dtype,
            stream=stream,
        )

    @dq.vjp
    def dq_vjp(primals, cotangents, outputs):
        w, scales, biases = primals
        d_values = _first(cotangents).astype(mx.float32)
        d_scales, d_biases = _scale_bias_grads(
            d_values, w, scales, biases, group_size, bits
        )
        return mx.zeros_like(w), d_scales, d_biases

    return dq


# ---- shared by the matmuls ----------------------------------------------------


def _dense_weight(w, scales, biases, group_size, bits):
    """The float32 weight that ``w`` stands for, shape ``[..., rows, K]``."""
    codes = _unpack(w, bits).reshape(*scales.shape, group_size)
    values = codes.astype(mx.float32) * scales.astype(mx.float32)[..., None]
    values = values + biases.astype(mx.float32)[..., None]
    return values.reshape(*w.shape[:-1], scales.shape[-1] * group_size)


def _reduce_to(g: mx.array, shape) -> mx.array:
    """Sum ``g`` over the axes along which ``shape`` was broadcast to it."""
    shape = tuple(shape)
    extra = g.ndim - len(shape)
    if extra:
        g = g.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, d in enumerate(shape) if d == 1 and g.shape[i] != 1)
    if axes:
        g = g.sum(axis=axes, keepdims=True)
    return g


def _scale_bias_grads(d_dense, w, scales, biases, group_size, bits):
    """Gradients of scales and biases from the gradient of the dense weight
    (``[..., rows, K]``, the layout of ``w``): per group, the sum of the
    weight gradient times the code, and the plain sum."""
    d_groups = d_dense.reshape(*scales.shape, group_size)
    codes = _unpack(w, bits).reshape(*scales.shape, group_size)
    d_scales = (d_groups * codes.astype(d_groups.dtype)).sum(-1)
    d_biases = d_groups.sum(-1)
    return d_scales.astype(scales.dtype), d_biases.astype(biases.dtype)


def _first(cotangents):
    return cotangents[0] if isinstance(cotangents, (list, tuple)) else cotangents


# ---- quantized_matmul --------------------------------------------------------


def _quantized_matmul_reference(x, w, scales, biases, transpose, group_size, bits):
    dense = _dense_weight(w, scales, biases, group_size, bits)
    x32 = x.astype(mx.float32)
    if transpose and x.ndim > 1:
        # x @ dense.T as (dense @ x.T).T: MLX's Linux CPU matmul takes half
        # the time with the large operand untransposed and x.T contiguous
        # (512 x 4096 x 4096: 3.2 s against 8.0, 2-core host).
        out = (dense @ mx.contiguous(x32.swapaxes(-1, -2))).swapaxes(-1, -2)
    else:
        out = x32 @ (dense.swapaxes(-1, -2) if transpose else dense)
    return out.astype(x.dtype)


# A CPU stream's few-row products go to MLX's own CPU kernel in float32: a
# fused loop over the packed codes, where the reference writes the dense
# float32 weight and multiplies (2-core Linux host, 4096x4096 q4, one row:
# 10.8 ms against 70). Past about 16 rows the reference wins (this host's
# float32 matmul costs 7 ms a row against the kernel's 11; 64 rows 530 ms
# against 680). Half types go through float32 too: MLX's half-precision CPU
# kernel takes 0.5 s for that row, and the reference computes in float32.
_CPU_BUILTIN_MAX_ROWS = 16


def _quantized_matmul_cpu(x, w, scales, biases, transpose, group_size, bits):
    """The reference path's product: on a CPU stream MLX's float32 CPU
    kernel for a few rows of x times one weight, else the reference; split
    by output columns over the cores when it is large."""
    rows = math.prod(x.shape[:-1])
    builtin = w.ndim == 2 and rows <= _CPU_BUILTIN_MAX_ROWS and _cpu_builtin(x, w)

    def product(w, scales, biases):
        if builtin:
            return _float32_builtin(
                mx.quantized_matmul,
                x,
                w,
                scales,
                biases,
                transpose=transpose,
                group_size=group_size,
                bits=bits,
            )
        return _quantized_matmul_reference(
            x, w, scales, biases, transpose, group_size, bits
        )

    if not transpose:
        return product(w, scales, biases)

    def columns(start, stop):
        return product(*_weight_rows(start, stop, w, scales, biases))

    n = w.shape[-2]
    return _over_cores(columns, n, x.size * n)


def _float32_builtin(builtin, x, w, scales, biases, **options):
    """``builtin`` (``mx.quantized_matmul`` or ``mx.gather_qmm``) on x,
    scales and biases in float32, the result in x's dtype."""
    f32 = mx.float32
    out = builtin(x.astype(f32), w, scales.astype(f32), biases.astype(f32), **options)
    return out.astype(x.dtype)


def _schedule(lhs: np.ndarray, rhs: np.ndarray, m: int, tile_rows: int):
    """Group the output rows of products ``x[lhs[p]] @ W[rhs[p]].T`` (``m``
    rows each) by expert and cut each expert's rows into tiles.

    Returns:
        (tiles, slot_x, slot_out): int32 ``[n, 3]`` tiles (expert, first
        slot, rows), and per slot the row of ``x`` (as ``[products * m,
        K]``) it reads and the output row it writes.
    """
    order = np.argsort(rhs, kind="stable")
    experts = rhs[order]
    rows = np.arange(m)
    slot_out = (order[:, None] * m + rows).reshape(-1)
    slot_x = (lhs[order].astype(np.int64)[:, None] * m + rows).reshape(-1)
    starts = np.flatnonzero(np.r_[True, experts[1:] != experts[:-1]])
    run_start = starts * m
    run_rows = np.diff(np.r_[starts, rhs.size]) * m
    per_run = -(-run_rows // tile_rows)
    run_of_tile = np.repeat(np.arange(starts.size), per_run)
    first = np.repeat(np.cumsum(per_run) - per_run, per_run)
    begin = run_start[run_of_tile] + (np.arange(per_run.sum()) - first) * tile_rows
    end = (run_start + run_rows)[run_of_tile]
    tiles = np.stack(
        [experts[starts][run_of_tile], begin, np.minimum(end - begin, tile_rows)], -1
    )
    return (
        tiles.astype(np.int32),
        slot_x.astype(np.int32),
        slot_out.astype(np.int32),
    )


def _qmv_rows_per_simdgroup(x_rows: int, bits: int) -> int:
    """W rows per simdgroup in kernels/affine_qmv.metal (its R)."""
    if x_rows == 1:
        return 8 if bits <= 4 else 4
    return 4 if x_rows <= 2 else 2


@functools.lru_cache(maxsize=256)
def _plain_schedule(rows: int, tile_rows: int):
    """Tiles and slots of one weight times ``rows`` rows of x, as device
    arrays built once (a decode step reuses them every call)."""
    one = np.zeros(1, dtype=np.int64)
    tiles, slot_x, slot_out = _schedule(one, one, rows, tile_rows)
    return mx.array(tiles), mx.array(slot_x), mx.array(slot_out)


def _check_grid_rows(rows: int) -> None:
    """Tiles go along grid y, which CUDA caps; refuse a larger launch."""
    if rows > _MAX_GRID_Y:
        raise ValueError(
            f"[mlx_quant_ops] a grid of {rows} rows exceeds the kernel "
            f"grid limit ({_MAX_GRID_Y}); split the call"
        )


@functools.lru_cache(maxsize=256)
def _shape_slots(lhs: tuple, rhs: tuple, m: int):
    """Slots of products ``x[lhs[p]] @ W[rhs[p]].T`` of ``m`` rows each, in
    output order, from index tuples fixed by shapes alone: device tables
    ``(slot_expert, slot_x)`` built once, and the longest run of
    consecutive slots sharing an expert."""
    experts = np.repeat(np.asarray(rhs, dtype=np.int64), m)
    x_rows = (np.asarray(lhs, dtype=np.int64)[:, None] * m + np.arange(m)).reshape(-1)
    change = np.flatnonzero(np.r_[True, experts[1:] != experts[:-1], True])
    longest = int(np.diff(change).max())
    return (
        device_table(experts.tolist()),
        device_table(x_rows.tolist()),
        longest,
    )


def _tensor_cores(stream, dtype) -> bool:
    """Whether the matmul kernels run on tensor cores (CUDA, half or
    bfloat16): the mat-vec always, the tiled kernel with ``transpose``."""
    return backend(stream) == "cuda" and dtype != mx.float32


def _wgmma() -> bool:
    """Whether the tiled kernel is the wgmma one (kernels/affine_qmm_wgmma.cu):
    a Hopper GPU, at every width (those whose codes straddle words, 3, 5 and
    6 bits, dequantize half units as byte streams there)."""
    return _backend.gpu_architecture() in _WGMMA_ARCHITECTURES


def _qmv_max_rows(stream, dtype) -> int:
    """The most x rows per expert that the mat-vec kernel takes at once."""
    return _QMV_MMA_MAX_ROWS if _tensor_cores(stream, dtype) else _QMV_MAX_ROWS


def _qmv_mma_shape(
    blocks: int, k: int, x_rows: int, bits: int, group_size: int
) -> Tuple[int, int, int]:
    """``(KW, UNROLL, RUN)`` of the tensor-core mat-vec: warps splitting K
    in a block, more when one wave of such blocks holds the grid (so the
    blocks alone would leave SMs short of warps) and K is long enough to
    share (for more x rows: see _QMV_MMA_WIDE_WAVE); trips per lane whose
    loads are in flight together (see _QMV_MMA_LONG_K for where one x row
    takes other values); and consecutive units a trip takes (see
    _QMV_MMA_RUNS)."""
    if x_rows == 1:
        few = blocks <= _QMV_MMA_WIDE_WAVE * _backend.gpu_multiprocessors()
        wide = few and k >= 64 * _UNIT_VALUES
    else:
        few = blocks <= _QMV_MMA_WIDE_WAVE_ROWS * _backend.gpu_multiprocessors()
        long_rows = k >= _QMV_MMA_LONG_K and bits < 8 and x_rows < _QMV_MMA_MAX_ROWS
        wide = few and long_rows
    warps = 8 if wide else 4
    run = _QMV_MMA_RUNS.get(bits, 1) if x_rows == 1 else 1
    if run > 1 and k % (run * _UNIT_VALUES) == 0:
        return warps, _QMV_MMA_SINGLE_UNROLL, run
    if x_rows > 1 or not few or bits == 4:
        return warps, _QMV_MMA_UNROLL, 1
    if k < _QMV_MMA_LONG_K:
        single = wide and bits == 8
        return warps, _QMV_MMA_SINGLE_UNROLL if single else _QMV_MMA_UNROLL, 1
    if (bits, group_size) in _QMV_MMA_WIDE_FORMATS:
        warps = _QMV_MMA_WIDE_WARPS
    return warps, _QMV_MMA_SINGLE_UNROLL, 1


def _qmv_launcher(
    x_shape,
    dtype,
    w_shape,
    slots,
    run,
    group_size,
    bits,
    out_shape,
    stream,
    slot_tables=(),
):
    """The mat-vec kernel over per-slot arrays: ``out[s] = x[slot_x[s]] @
    W[slot_expert[s]].T`` for the first ``slots`` entries, taking up to
    ``run`` consecutive slots (a run of one expert, at most
    :func:`_qmv_max_rows`) per threadgroup row. Called with ``x, w, scales,
    biases`` and then ``slot_expert, slot_x``, unless those are fixed by
    the shapes and given here as ``slot_tables``."""
    k = x_shape[-1]
    n = w_shape[-2]
    experts = int(np.prod(w_shape[:-2], dtype=np.int64))
    max_rows = _qmv_max_rows(stream, dtype)
    x_rows = 1 << (min(max(run, 1), max_rows) - 1).bit_length()
    n_tiles = -(-slots // x_rows)
    _check_grid_rows(n_tiles)
    template = [
        ("T", dtype),
        ("bits", bits),
        ("group_size", group_size),
        ("XR", x_rows),
    ]
    if _tensor_cores(stream, dtype):
        spec, columns = _QMV_MMA, _QMV_MMA_ROWS
        blocks = -(-n // columns) * n_tiles
        warps, unroll, run = _qmv_mma_shape(blocks, k, x_rows, bits, group_size)
        template += [("KW", warps), ("UNROLL", unroll), ("RUN", run)]
        threads = warps * _SIMD
    else:
        spec = _QMV
        columns = _QMV_SIMDGROUPS * _qmv_rows_per_simdgroup(x_rows, bits)
        threads = _QMV_SIMDGROUPS * _SIMD
    x_size = int(np.prod(x_shape, dtype=np.int64))
    return Launcher(
        spec,
        (*slot_tables, sizes(n, k, experts, x_size // k, slots)),
        template=template,
        grid=(ceil_to(n, columns) // columns * threads, n_tiles, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[out_shape],
        output_dtypes=[dtype],
        stream=stream,
    )


# Whether the streamed mat-vec's persistent grid deals its tiles evenly
# (see _qmv_stream_blocks); off, it takes every block that fits.
_QMV_STREAM_EVEN_TILES = True
# ... where the filled grid's last round would leave the GPU this idle or
# more: its rounds times its blocks at least this much above the tiles.
_QMV_STREAM_EVEN_MIN_IDLE = 0.1


def _qmv_stream_blocks(tiles: int) -> int:
    """Blocks of the streamed mat-vec's persistent grid for ``tiles``
    16-row tiles: at most :data:`_QMV_STREAM_BLOCKS_PER_SM` an SM. Where
    the tiles do not fill the last round of such a grid well, the fewest
    blocks that walk them in as many rounds, each block the same number
    give or take one. On an H100 (132 SMs, 2026-12-05,
    scripts/stream_blocks.py, q4 one row, µs a call filled / even): 14336
    rows, 896 tiles, 264 blocks of which 104 walk a fourth tile, against
    224 blocks of four: 16.8 / 15.0 (g32 18.0 / 15.9, g128 16.1 / 14.3, 2
    to 6 bits 0.2-0.6 faster); 11008 rows (688 tiles, 230 blocks) 13.8 /
    12.0. Where the last round was nearly full the fewer blocks did not pay:
    28672x8192 (7 rounds, 3% idle) 46.3 / 46.4, 128256x4096 (31 rounds, 2%
    idle) 99.6 / 100.4; hence :data:`_QMV_STREAM_EVEN_MIN_IDLE`."""
    most = min(tiles, _QMV_STREAM_BLOCKS_PER_SM * _backend.gpu_multiprocessors())
    rounds = -(-tiles // most)
    if not _QMV_STREAM_EVEN_TILES or rounds * most < tiles * (
        1 + _QMV_STREAM_EVEN_MIN_IDLE
    ):
        return most
    return -(-tiles // rounds)


def _qmv_stream_launcher(k, n, rows, dtype, group_size, bits, out_shape, stream):
    """The streamed mat-vec (Hopper): ``out = x @ W.T`` for ``rows`` (at
    most 16) rows of x and one weight, on a persistent grid of at most
    :data:`_QMV_STREAM_BLOCKS_PER_SM` blocks per SM walking 16-row tiles.
    Called with ``x, w, scales, biases``."""
    chunk, stages, staged, copy_pairs = _qmv_stream_layout(
        bits, group_size, dtype.size, rows * k * dtype.size
    )
    tiles = ceil_to(n, _QMV_MMA_ROWS) // _QMV_MMA_ROWS
    blocks = _qmv_stream_blocks(tiles)
    threads = (_QMV_STREAM_WARPS + 1) * _SIMD
    return Launcher(
        _QMV_STREAM,
        (sizes(n, k, rows),),
        template=[
            ("T", dtype),
            ("bits", bits),
            ("group_size", group_size),
            ("XR", 8 if rows <= 8 else 16),
            ("KW", _QMV_STREAM_WARPS),
            ("STAGES", stages),
            ("KC", chunk),
            ("XS", int(staged)),
            ("XP", int(copy_pairs)),
        ],
        grid=(blocks * threads, 1, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[out_shape],
        output_dtypes=[dtype],
        stream=stream,
    )


def _launch_context(stream) -> tuple:
    """What a planned launch depends on besides shapes and options: the path
    and the GPU's architecture (both can change under tests and
    use_backend). A planned call's context is ``_kernels.plan_context``."""
    return backend(stream), _backend.gpu_architecture()


def _matmul_rows_kernel(
    x, w, scales, biases, lhs, rhs, m, transpose, group_size, bits, out_shape, stream
):
    """``out[p * m + i] = x[lhs[p] * m + i] @ W[rhs[p]].T`` (or ``@ W``
    with ``transpose=False``) for every product p, with ``x`` read as
    ``[rows, K]`` and ``lhs``, ``rhs`` tuples fixed by the shapes (None: one
    product of all the rows of x), through the launch planned for these
    shapes (:func:`_matmul_rows_plan`)."""
    plan = _matmul_rows_plan(
        tuple(x.shape),
        x.dtype,
        tuple(w.shape),
        lhs,
        rhs,
        m,
        transpose,
        group_size,
        bits,
        tuple(out_shape),
        StreamKey(stream),
        _launch_context(stream),
    )
    return plan(x, w, scales, biases)[0]


@plan_cache
def _matmul_rows_plan(
    x_shape,
    dtype,
    w_shape,
    lhs,
    rhs,
    m,
    transpose,
    group_size,
    bits,
    out_shape,
    stream_key,
    context,
):
    """The launch of :func:`_matmul_rows_kernel` for its shapes: the
    mat-vec kernel when each expert gets few rows (decode) and a tiled
    kernel (tensor cores on CUDA for half and bfloat16) else. Inputs keep
    their shapes and the output is made in ``out_shape``, so one call is
    one op in the graph."""
    stream = stream_key.stream
    k = x_shape[-1]
    n = w_shape[-2] if transpose else w_shape[-1] * WORD_BITS // bits
    mma = transpose and _tensor_cores(stream, dtype)
    template = [("T", dtype), ("bits", bits), ("group_size", group_size)]
    if lhs is None:
        rows = int(np.prod(x_shape, dtype=np.int64)) // k
        experts, longest = 1, rows
    else:
        rows = len(rhs) * m
        experts = len(set(rhs))
        longest = max(rhs.count(e) for e in set(rhs)) * m
    # Up to 8 rows per expert (16 on tensor cores) the mat-vec kernel wins:
    # the tiled kernels spread work over N tiles only and would leave most
    # of the GPU idle.
    if transpose and rows <= _qmv_max_rows(stream, dtype) * experts:
        if lhs is None and _qmv_stream_fits(
            stream, dtype, rows, n, k, bits, group_size
        ):
            return _qmv_stream_launcher(
                k, n, rows, dtype, group_size, bits, out_shape, stream
            )
        if lhs is None:
            slot_expert, slot_x, run = _shape_slots((0,), (0,), rows)
        else:
            slot_expert, slot_x, run = _shape_slots(lhs, rhs, m)
        return _qmv_launcher(
            x_shape,
            dtype,
            w_shape,
            rows,
            run,
            group_size,
            bits,
            out_shape,
            stream,
            slot_tables=(slot_expert, slot_x),
        )
    if mma:
        spec, (tile_rows, columns, threads) = _QMM_MMA, _MMA_TILE
        if longest >= _MMA_TALL_ROWS:
            tile_rows = _MMA_TALL_ROWS
        if _wgmma():
            spec = _QMM_WGMMA  # same tiles, grid and inputs
            if longest >= _WGMMA_TALL_ROWS:
                spec, tile_rows = _QMM_WGMMA_TALL, _WGMMA_TALL_ROWS
        template.append(("BM", tile_rows))
    else:
        spec = _QMM if transpose else _QMM_N
        tile_rows, columns, threads = _QMM_TILE
    if lhs is None:
        tiles, slot_x, slot_out = _plain_schedule(rows, tile_rows)
        n_tiles = tiles.shape[0]
    else:
        tiles, slot_x, slot_out = _schedule(np.array(lhs), np.array(rhs), m, tile_rows)
        n_tiles = len(tiles)
        tiles, slot_x, slot_out = (mx.array(a) for a in (tiles, slot_x, slot_out))
    n_blocks = ceil_to(n, columns) // columns
    # The tensor-core kernels take row tiles along grid x, so the blocks that
    # share a weight tile run together and find it in L2.
    grid = (n_tiles * threads, n_blocks) if mma else (n_blocks * threads, n_tiles)
    _check_grid_rows(grid[1])
    return Launcher(
        spec,
        (tiles, slot_x, slot_out, sizes(n, k)),
        template=template,
        grid=(*grid, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[out_shape],
        output_dtypes=[dtype],
        stream=stream,
    )


@plan_cache
def _gather_qmv_plan(*shapes_and_options, stream_key, context):
    """The mat-vec launch of a gather decode (``_qmv_launcher``'s arguments
    but the stream), whose slot arrays come with each call: built on the
    device from the indices."""
    return _qmv_launcher(*shapes_and_options, stream_key.stream)


def _dense_f32_kernel(w, scales, biases, group_size, bits, stream):
    """The weight in float32 through the dequantize kernel (half and
    bfloat16 products then run in float32: MLX's CUDA matmul would round
    the weight to the activation dtype and accumulate with TF32 or less)."""
    f32 = mx.float32
    return _dequantize_kernel(
        w,
        scales.astype(f32, stream=stream),
        biases.astype(f32, stream=stream),
        group_size,
        bits,
        f32,
        stream=stream,
    )


def _quantized_matmul_kernel(
    x, w, scales, biases, transpose, group_size, bits, *, stream
):
    k = x.shape[-1]
    n = w.shape[-2] if transpose else w.shape[-1] * WORD_BITS // bits
    if not transpose and x.dtype != mx.float32:
        dense = _dense_f32_kernel(w, scales, biases, group_size, bits, stream)
        out = mx.matmul(x.astype(mx.float32, stream=stream), dense, stream=stream)
        return out.astype(x.dtype, stream=stream)
    if w.ndim == 2:
        # One weight: every row of x is a row of one product.
        return _matmul_rows_kernel(
            x,
            w,
            scales,
            biases,
            None,
            None,
            None,
            transpose,
            group_size,
            bits,
            (*x.shape[:-1], n),
            stream,
        )
    batch = np.broadcast_shapes(x.shape[:-2], w.shape[:-2])
    lhs = np.broadcast_to(
        np.arange(int(np.prod(x.shape[:-2]))).reshape(x.shape[:-2]), batch
    )
    rhs = np.broadcast_to(
        np.arange(int(np.prod(w.shape[:-2]))).reshape(w.shape[:-2]), batch
    )
    m = x.shape[-2]
    return _matmul_rows_kernel(
        x,
        w,
        scales,
        biases,
        tuple(lhs.reshape(-1).tolist()),
        tuple(rhs.reshape(-1).tolist()),
        m,
        transpose,
        group_size,
        bits,
        (*batch, m, n),
        stream,
    )


def _quantized_matmul_any(x, w, scales, biases, transpose, group_size, bits, stream):
    return dispatch(
        _quantized_matmul_cpu,
        _quantized_matmul_kernel,
        x,
        w,
        scales,
        biases,
        transpose,
        group_size,
        bits,
        stream=stream,
    )


@functools.lru_cache(maxsize=256)  # one per option set, not per call
def _differentiable_quantized_matmul(transpose, group_size, bits, stream_key):
    """``quantized_matmul`` on fixed options as an ``mx.custom_function``
    of ``(x, w, scales, biases)``."""
    stream = stream_key.stream

    @mx.custom_function
    def qmm(x, w, scales, biases):
        return _quantized_matmul_any(
            x, w, scales, biases, transpose, group_size, bits, stream
        )

    @qmm.vjp
    def qmm_vjp(primals, cotangents, outputs):
        return _quantized_matmul_grads(
            *primals, _first(cotangents), transpose, group_size, bits, stream
        )

    return qmm


def _quantized_matmul_grads(
    x, w, scales, biases, cot, transpose, group_size, bits, stream
):
    """The gradients of ``(x, w, scales, biases)`` of ``quantized_matmul``
    for the output's cotangent ``cot`` (zeros for the integer codes)."""
    d_x = _quantized_matmul_any(
        cot, w, scales, biases, not transpose, group_size, bits, stream
    )
    d_x = _reduce_to(d_x, x.shape).astype(x.dtype)
    # The dense weight's gradient, in w's layout, summed over the batch
    # entries that shared a weight.
    x32, cot32 = x.astype(mx.float32), cot.astype(mx.float32)
    if transpose:
        d_dense = cot32.swapaxes(-1, -2) @ x32
    else:
        d_dense = x32.swapaxes(-1, -2) @ cot32
    d_dense = _reduce_to(d_dense, (*w.shape[:-1], d_dense.shape[-1]))
    d_scales, d_biases = _scale_bias_grads(d_dense, w, scales, biases, group_size, bits)
    return d_x, mx.zeros_like(w), d_scales, d_biases


def quantized_matmul(
    x: mx.array,
    w: mx.array,
    scales: mx.array,
    biases: Optional[mx.array] = None,
    transpose: bool = True,
    group_size: Optional[int] = None,
    bits: Optional[int] = None,
    mode: str = "affine",
    *,
    stream: StreamLike = None,
) -> mx.array:
    """``x @ W.T`` (or ``x @ W`` with ``transpose=False``) for an MLX affine
    quantized ``W``, as ``mx.quantized_matmul``. Differentiable with
    respect to ``x``, ``scales`` and ``biases``.

    Args:
        x (mlx.core.array): float32, float16 or bfloat16, ``[..., M, K]``
            (or ``[K]``).
        w (mlx.core.array): packed codes, uint32 ``[..., N, K * bits / 32]``
            (``[..., K, N * bits / 32]`` with ``transpose=False``).
        scales (mlx.core.array): per-group scales, ``w``'s shape with the
            last axis counting groups.
        biases (mlx.core.array): per-group biases, same shape (required).
        transpose (bool): multiply by ``W.T`` (True) or by ``W``.
        group_size (int, optional): 32, 64 or 128. Default: 64.
        bits (int, optional): 1, 2, 3, 4, 5, 6 or 8. Default: 4.
        mode (str): only ``"affine"``.
        stream (mlx.core.Stream or Device, optional): where to run.

    Returns:
        mlx.core.array: ``[..., M, N]``, leading dimensions of ``x`` and
        ``w`` broadcast together as ``mx.matmul`` broadcasts them (where
        MLX 0.32.4's op multiplies a 2-D ``x`` by the first of a batch of
        weights only); dtype the promotion of ``x``'s, the scales' and the
        biases' dtypes. Empty where ``x`` or ``w`` is.
    """
    return _QUANTIZED_MATMUL_CALLS(
        _plan_quantized_matmul,
        stream,
        (x, w, scales, biases),
        (transpose, group_size, bits, mode),
    )


_QUANTIZED_MATMUL_CALLS = CallPlans()


# ---- fused_quantized_matmul --------------------------------------------------


def _triples(flat) -> list:
    """``(w0, scales0, biases0, w1, ...)`` as ``[(w0, scales0, biases0), ...]``."""
    return [tuple(flat[i : i + 3]) for i in range(0, len(flat), 3)]


def _fused_dtype(x, flat) -> mx.Dtype:
    """The dtype of ``fused_quantized_matmul``'s outputs: the promotion of
    ``x``'s and every scale's and bias's (``flat`` as ``_triples`` takes)."""
    return _result_dtype(x.dtype, *(a.dtype for i, a in enumerate(flat) if i % 3))


def _fused_quantized_matmul_cpu(x, *flat, group_size, bits):
    # The reference path: each product as quantized_matmul's runs it (its
    # reference, or MLX's CPU kernel for a few rows), so a layer's output is
    # the same fused or not.
    return tuple(
        _quantized_matmul_cpu(x, w, scales, biases, True, group_size, bits)
        for w, scales, biases in _triples(flat)
    )


def _fused_quantized_matmul_kernel(x, *flat, group_size, bits, stream):
    plan = _fused_qmv_plan(
        tuple(x.shape),
        x.dtype,
        tuple(tuple(w.shape) for w in flat[::3]),
        group_size,
        bits,
        StreamKey(stream),
        _launch_context(stream),
    )
    if plan is None:
        return tuple(
            _quantized_matmul_kernel(
                x, w, scales, biases, True, group_size, bits, stream=stream
            )
            for w, scales, biases in _triples(flat)
        )
    return tuple(plan(x, *flat))


def _fused_launch_fits(stream, rows, dtype, n_rows, k, group_size, bits) -> bool:
    """Whether :func:`fused_quantized_matmul` runs as one launch: the
    tensor-core mat-vec over two or three weights, for at most 16 rows of
    x (decode) in half or bfloat16 on CUDA, and no large weight that the
    streamed mat-vec takes (it is faster than the fused blocks there). A
    weight below the size where a layer hands its decode call to MLX's op
    (:data:`LAYER_BUILTIN_DECODE_BELOW`: the call is bound by the host,
    not by the GPU) fuses even so: a Llama-3-8B attention's q|k|v.
    Elsewhere the products run one by one."""
    small = LAYER_BUILTIN_DECODE_BELOW.get(bits, 0)
    return (
        len(n_rows) in _QMV_MMA_FUSED
        and _tensor_cores(stream, dtype)
        and 0 < rows <= _QMV_MMA_MAX_ROWS
        and not any(
            n * k >= small
            and _qmv_stream_fits(stream, dtype, rows, n, k, bits, group_size)
            for n in n_rows
        )
    )


@plan_cache
def _fused_qmv_plan(x_shape, dtype, w_shapes, group_size, bits, stream_key, context):
    """The one launch of :func:`_fused_quantized_matmul_kernel` for its
    shapes, or None where :func:`_fused_launch_fits` says the products run
    one by one."""
    stream = stream_key.stream
    k = x_shape[-1]
    rows = math.prod(x_shape[:-1])
    n_rows = [shape[0] for shape in w_shapes]
    if not _fused_launch_fits(stream, rows, dtype, n_rows, k, group_size, bits):
        return None
    slot_expert, slot_x, run = _shape_slots((0,), (0,), rows)
    x_rows = 1 << (run - 1).bit_length()
    blocks = sum(-(-n // _QMV_MMA_ROWS) for n in n_rows)
    warps, unroll, run_units = _qmv_mma_shape(blocks, k, x_rows, bits, group_size)
    threads = warps * _SIMD
    return Launcher(
        _QMV_MMA_FUSED[len(w_shapes)],
        (slot_expert, slot_x, sizes(k, rows, rows, *n_rows)),
        template=[
            ("T", dtype),
            ("bits", bits),
            ("group_size", group_size),
            ("XR", x_rows),
            ("KW", warps),
            ("UNROLL", unroll),
            ("RUN", run_units),
        ],
        grid=(blocks * threads, 1, 1),
        threadgroup=(threads, 1, 1),
        output_shapes=[(*x_shape[:-1], n) for n in n_rows],
        output_dtypes=[dtype] * len(w_shapes),
        stream=stream,
    )


@functools.lru_cache(maxsize=256)  # one per option set, not per call
def _differentiable_fused_quantized_matmul(group_size, bits, stream_key):
    """``fused_quantized_matmul`` on fixed options as an
    ``mx.custom_function`` of ``(x, w0, scales0, biases0, w1, ...)``."""
    stream = stream_key.stream

    @mx.custom_function
    def fused(x, *flat):
        return dispatch(
            _fused_quantized_matmul_cpu,
            _fused_quantized_matmul_kernel,
            x,
            *flat,
            group_size=group_size,
            bits=bits,
            stream=stream,
        )

    @fused.vjp
    def fused_vjp(primals, cotangents, outputs):
        x, *flat = primals
        d_x, d_weights = None, []
        for (w, scales, biases), cot in zip(_triples(flat), cotangents):
            grads = _quantized_matmul_grads(
                x, w, scales, biases, cot, True, group_size, bits, stream
            )
            d_x = grads[0] if d_x is None else d_x + grads[0]
            d_weights += grads[1:]
        return (d_x, *d_weights)

    return fused


def fused_quantized_matmul(
    x: mx.array,
    weights,
    group_size: Optional[int] = None,
    bits: Optional[int] = None,
    mode: str = "affine",
    *,
    stream: StreamLike = None,
) -> Tuple[mx.array, ...]:
    """``x @ W.T`` for each of several MLX affine quantized weights that
    read the same ``x`` (an attention layer's q, k and v projections, an
    MLP's gate and up projections), as one op: where each product is
    ``mx.quantized_matmul(x, w, scales, biases, transpose=True, ...)``.

    On CUDA a decode-sized ``x`` (at most 16 rows) in half or bfloat16
    times two or three weights runs as one launch of the tensor-core
    mat-vec, so a decode step has one graph node where it had one a weight
    (each costs the host several microseconds, which bounds a small
    model's decoding). Elsewhere the products run one by one as
    :func:`quantized_matmul` runs them. Differentiable with respect to
    ``x``, the scales and the biases.

    Args:
        x (mlx.core.array): float32, float16 or bfloat16, ``[..., K]``.
        weights (sequence): one or more ``(w, scales, biases)`` triples,
            each a 2-D weight as :func:`quantized_matmul` takes with
            ``transpose=True`` (``w`` uint32 ``[N_i, K * bits / 32]``,
            ``scales`` and ``biases`` ``[N_i, K / group_size]``), all
            quantized with the same ``group_size`` and ``bits``.
        group_size (int, optional): 32, 64 or 128. Default: 64.
        bits (int, optional): 1, 2, 3, 4, 5, 6 or 8. Default: 4.
        mode (str): only ``"affine"``.
        stream (mlx.core.Stream or Device, optional): where to run.

    Returns:
        tuple[mlx.core.array, ...]: ``[..., N_i]`` for each weight in turn,
        all in the promotion of ``x``'s dtype and every scale's and bias's.
    """
    flat = _flat_weights("fused_quantized_matmul", weights)
    return _FUSED_QUANTIZED_MATMUL_CALLS(
        _plan_fused_quantized_matmul, stream, (x, *flat), (group_size, bits, mode)
    )


_FUSED_QUANTIZED_MATMUL_CALLS = CallPlans()


def _flat_weights(op: str, weights) -> tuple:
    """``weights`` (a sequence of ``(w, scales, biases)``) as one flat
    tuple, after checking its structure (the arrays are checked by the
    plan)."""
    if not isinstance(weights, (list, tuple)) or not weights:
        got = type(weights).__name__
        if isinstance(weights, (list, tuple)):
            got = repr(weights)
        check.fail(
            op,
            "weights",
            "a non-empty list or tuple of (w, scales, biases) triples",
            got,
            TypeError,
        )
    flat = []
    for i, triple in enumerate(weights):
        if not isinstance(triple, (list, tuple)) or len(triple) != 3:
            kind = type(triple).__name__
            if isinstance(triple, (list, tuple)):
                kind = f"a {kind} of {len(triple)} items"
            check.fail(
                op, f"weights[{i}]", "a (w, scales, biases) triple", kind, TypeError
            )
        flat += triple
    return tuple(flat)


def _plan_fused_quantized_matmul(stream, x, *flat_and_options):
    op = "fused_quantized_matmul"
    *flat, group_size, bits, mode = flat_and_options
    group_size, bits = _format(op, group_size, bits, mode)
    for i, (w, scales, biases) in enumerate(_triples(flat)):
        _check_matmul(
            op, x, w, scales, biases, True, group_size, bits, f"weights[{i}] "
        )
        check.ndim(op, f"weights[{i}] w", w, exactly=2)
    dtype = _fused_dtype(x, flat)
    vector = x.ndim == 1
    fn = _differentiable_fused_quantized_matmul(group_size, bits, StreamKey(stream))

    def run(x, *flat):
        if vector:
            x = x[None]
        cast = [a if i % 3 == 0 else a.astype(dtype) for i, a in enumerate(flat)]
        outs = fn(x.astype(dtype), *cast)
        return tuple(out.squeeze(-2) for out in outs) if vector else tuple(outs)

    return run


def _hands_over_here() -> bool:
    """What the hand-overs to MLX's built-ins (:func:`layer_decode_on_builtin`,
    :func:`layer_lookup_on_builtin`) ask of the default stream rather than
    of the call: the CUDA path, with no path forced by :func:`use_backend`.
    A patched model's step (:func:`step_key`) checks it once for all the
    handed-over calls inside it."""
    return override() is None and backend(None) == "cuda"


def step_key() -> int:
    """The key a step (a patched model's forward, ``mlx_quant_ops.nn.patch``)
    publishes as it starts: the plan generation plus one where
    :func:`_hands_over_here` holds, which the
    :class:`~mlx_quant_ops._kernels.HandedOverReplay` records made since
    the plans were last cleared hold; else 0, which none holds (nor does
    any call outside a step)."""
    return _kernels._plan_generation + 1 if _hands_over_here() else 0


# Decode calls of mlx_quant_ops.nn's linear layers that MLX's built-in
# finishes first on CUDA: at most this many rows of x, and a weight of
# fewer values than LAYER_BUILTIN_DECODE_BELOW gives for its width (none
# for widths not listed). There a whole call is host-bound: our kernel is
# two graph nodes (the kernel and its custom_function) and a compiled
# replay, MLX's op one node, and that costs more than the GPU time our
# kernel saves. Chains of dependent layer calls, one row, f16, H200
# (ours / MLX; docs/benchmarks.md, sessions 26 and 30), 2026-12-05: 2 to
# 6 bits 0.79-1.04 at 2**24 values (4096x4096, 8192x2048), 0.64-0.75 at
# 8192x4096; 8 bits 0.96-1.11 at 2**24, 0.92-0.93 at 8192x4096 and
# 14336x4096, where 5 bits gave 0.75-0.82. A chain adds host and GPU
# time; a decode step is pipelined, and a model whose host work outlasts
# its GPU work pays our call's extra host time (about 1.5 µs) in full while
# gaining nothing from the GPU time saved. So a limit sits above the size
# where chains break even, taking in sizes where a chain call saved at most
# about 3 µs: 2**24 for 2 to 6 bits, where whole models decoded faster
# handed over (2026-12-04, medians, Llama-3.2-1B shape 2588 against 3043
# µs a token, Llama-3-8B shape 2073 against 2227, one H200 host; 2026-12-05,
# ours / MLX's layers with the 4-bit limit at 2**24 against as it is: 1B
# shape 1.167 against 1.053, 8B shape 0.751 against 0.723), and 14336x4096
# for 8 bits (2.1-2.7 µs saved). The 5-bit limit stops below 8192x4096,
# where a chain call saved 7 µs. Group sizes 32 and 128 moved 4-bit ratios
# by at most 0.05. The public ops never hand over: they are this package's
# kernels, which the benchmark times. scripts/handover_chains.py measures
# the chains.
LAYER_BUILTIN_DECODE_ROWS = 8
LAYER_BUILTIN_DECODE_BELOW = {
    2: 1 << 25,
    3: 1 << 25,
    4: 1 << 25,
    5: 1 << 25,
    6: 1 << 25,
    8: 1 << 26,
}


def layer_decode_on_builtin(x: mx.array, w: mx.array, bits: int) -> bool:
    """Whether a linear layer's call on the default stream hands ``x @
    W.T`` to ``mx.quantized_matmul`` (:data:`LAYER_BUILTIN_DECODE_BELOW`):
    on the CUDA path, unless a path is forced with :func:`use_backend`,
    for a decode-sized ``x`` and a small ``w``.

    Args:
        x (mlx.core.array): the layer's input, ``[..., K]``.
        w (mlx.core.array): the layer's packed weight, ``[N, K * bits / 32]``.
        bits (int): the weight's bits per value.

    Returns:
        bool: True where MLX's built-in takes the call.
    """
    # Never an empty x or w: MLX's op may stop the process on one (see
    # _cpu_builtin), where the planned call gives the empty result.
    return (
        _hands_over_here()
        and 0 < x.size <= LAYER_BUILTIN_DECODE_ROWS * x.shape[-1]
        and _small_for_builtin(w, bits)
    )


def _small_for_builtin(w: mx.array, bits: int) -> bool:
    """Whether a packed weight (all of it, every head or expert) holds
    fewer values than :data:`LAYER_BUILTIN_DECODE_BELOW` gives for its
    width, and any at all."""
    return 0 < w.size * WORD_BITS // bits < LAYER_BUILTIN_DECODE_BELOW.get(bits, 0)


def layer_heads_decode_on_builtin(x: mx.array, w: mx.array, bits: int) -> bool:
    """Whether a layer of per-head weights (mlx-lm's ``QuantizedMultiLinear``
    in MLA attention) hands its ``x @ W[h].T`` products to
    ``mx.quantized_matmul``: as :func:`layer_decode_on_builtin` for a
    linear layer, with the rows counted per head (a decode step's are one
    a head) and the weight's values over all heads.

    Args:
        x (mlx.core.array): the layer's input, ``[..., M, K]``.
        w (mlx.core.array): the packed weights, ``[H, N, K * bits / 32]``.
        bits (int): the weights' bits per value.

    Returns:
        bool: True where MLX's built-in takes the call.
    """
    return (
        _hands_over_here()
        and x.ndim >= 2
        and x.size > 0
        and x.shape[-2] <= LAYER_BUILTIN_DECODE_ROWS
        and _small_for_builtin(w, bits)
    )


def _planned_layer_product(
    x, w, scales, biases, transpose, group_size, bits
) -> Tuple[Callable, bool]:
    """The public op's planned function for a layer's product on the
    default stream (checked and keyed as ``quantized_matmul``'s calls are),
    not yet run, and whether it is kept: a layer keeps a replay only of a
    kept plan."""
    return _QUANTIZED_MATMUL_CALLS.plan(
        _plan_quantized_matmul,
        None,
        (x, w, scales, biases),
        (transpose, group_size, bits, "affine"),
    )


def _layer_quantized_matmul(
    x, w, scales, biases, group_size, bits
) -> Tuple[mx.array, Optional[LayerReplay]]:
    """``quantized_matmul(x, w, scales, biases, transpose=True, ...)`` for a
    layer holding ``w``, ``scales`` and ``biases``: checked and planned as
    the op is, then run by ``mx.quantized_matmul`` where
    :func:`layer_decode_on_builtin` says so.

    Returns:
        The product, and the replay of the call for the layer to keep: a
        :class:`~mlx_quant_ops._kernels.LayerReplay` of the planned call, a
        :class:`~mlx_quant_ops._kernels.HandedOverReplay` of MLX's op, or
        None where the call cannot be kept (arguments the plans cannot key).
    """
    run, kept = _planned_layer_product(x, w, scales, biases, True, group_size, bits)
    if not kept:
        return run(x, w, scales, biases), None
    if layer_decode_on_builtin(x, w, bits):
        y = mx.quantized_matmul(x, w, scales, biases, True, group_size, bits)
        replay = HandedOverReplay(
            mx.quantized_matmul, x, w, scales, biases, group_size, bits
        )
        return y, replay
    y = run(x, w, scales, biases)
    return y, LayerReplay(run, x, w, scales, biases, group_size, bits)


def _layer_heads_matmul(
    x, w, scales, biases, group_size, bits, indices, transpose
) -> Tuple[mx.array, Optional[LayerReplay]]:
    """``quantized_matmul(x, w, scales, biases, transpose, ...)`` for a layer
    of per-head weights ``w [H, N, K * bits / 32]`` (mlx-lm's
    ``QuantizedMultiLinear``): checked and planned as the op is, its batch
    dimensions broadcast as the op's. A decode step's products, with
    ``transpose``, go to ``mx.quantized_matmul`` where
    :func:`layer_heads_decode_on_builtin` says so; ``x @ W`` never does,
    since MLX 0.32.4's CUDA build has no float32 kernel for it (MLA's
    prefill in a float32 model stops there on MLX's layer).

    Args:
        indices: always None (the slot of an MoE layer's indices in
            :class:`~mlx_quant_ops._kernels.LayerReplay`).
        transpose (bool): ``x @ W[h].T`` (True) or ``x @ W[h]``.

    Returns:
        The product, and the replay of the call for the layer to keep
        (keyed on ``transpose`` too), or None where the call cannot be kept.
    """
    run, kept = _planned_layer_product(
        x, w, scales, biases, transpose, group_size, bits
    )
    if not kept:
        return run(x, w, scales, biases), None
    if transpose is True and layer_heads_decode_on_builtin(x, w, bits):

        def run(x, w, scales, biases):
            return mx.quantized_matmul(x, w, scales, biases, True, group_size, bits)

    replay = LayerReplay(
        run, x, w, scales, biases, group_size, bits, indices, transpose
    )
    return run(x, w, scales, biases), replay


# Whether mlx_quant_ops.nn's grouped sibling layers (patch(...,
# fuse_siblings=True)) fuse their decode calls (see
# _layer_fused_quantized_matmul); tests turn it off to compare a grouped
# model's fused steps with its single calls.
LAYER_FUSE_SIBLINGS = True


def _layer_fused_quantized_matmul(x, flat, group_size, bits) -> Optional[object]:
    """The planned function of ``(x, w0, scales0, biases0, w1, ...)`` that
    runs sibling linear layers' calls on ``x`` (layers of one module that
    read the same input, grouped by ``mlx_quant_ops.nn.patch(model,
    fuse_siblings=True)``) as one :func:`fused_quantized_matmul` launch, or
    None where they run one by one. On the CUDA path (where
    :func:`layer_decode_on_builtin` hands single calls over) a decode step
    is bound by the host, and each graph node costs it several
    microseconds (H100 host, 2026-12-05, scripts/node_costs.py: 2.1 µs to
    build and 6.9 µs to encode MLX's quantized_matmul): one launch for a
    q|k|v triple takes two of three nodes out, for a gate|up pair one of
    two. But the fused call's own node cost more than that in a model's
    step (scripts/step_profile.py, same day, under the profiler: about 27
    µs to build a group's fused call, 8 µs a handed-over single call), and
    it encoded no faster, which is why patch groups nothing unless asked.

    Args:
        x (mlx.core.array): the layers' input.
        flat (tuple): the layers' ``weight, scales, biases`` in turn.
        group_size, bits (int): the layers' options (the same for all).

    Returns:
        The planned function, or None.
    """
    if not (
        LAYER_FUSE_SIBLINGS
        and _hands_over_here()
        and 0 < x.size <= _QMV_MMA_MAX_ROWS * x.shape[-1]
    ):
        return None
    dtype = _fused_dtype(x, flat)
    stream = mx.default_stream(mx.default_device())
    n_rows = [w.shape[0] for w in flat[::3]]
    rows = x.size // x.shape[-1]
    if not _fused_launch_fits(
        stream, rows, dtype, n_rows, x.shape[-1], group_size, bits
    ):
        return None
    run, kept = _FUSED_QUANTIZED_MATMUL_CALLS.plan(
        _plan_fused_quantized_matmul, None, (x, *flat), (group_size, bits, "affine")
    )
    return run if kept else None


# Embedding lookups of mlx_quant_ops.nn.QuantizedEmbedding that MLX's
# mx.dequantize runs on CUDA: at most this many rows (a decode step's
# tokens). A lookup dequantizes only its few rows, so whichever kernel runs
# it costs the GPU about nothing, and the host decides: ours is a compiled
# custom function around a kernel, MLX's one graph node. With MLX's own
# lookup in our layers a patched model decoded faster (H200, 2026-12-05,
# 24 rounds, ours / MLX's layers: Llama-3.2-1B shape 1.070 against 1.099,
# Qwen3-30B-A3B shape 0.958 against 1.014; the Llama-3-8B shape's best
# passes were unchanged, 1111 against 1107 µs a token, while its median
# ratio swung between a host-bound and a GPU-bound pace). The results are
# bit for bit the same (both are q * scale + bias in the scales' dtype).
LAYER_BUILTIN_LOOKUP_ROWS = 8


def layer_lookup_on_builtin(indices: mx.array) -> bool:
    """Whether an embedding layer's lookup of ``indices`` on the default
    stream dequantizes its rows with ``mx.dequantize``
    (:data:`LAYER_BUILTIN_LOOKUP_ROWS`): on the CUDA path, unless a path is
    forced with :func:`use_backend`, for a decode step's few tokens.

    Args:
        indices (mlx.core.array): the token ids looked up.

    Returns:
        bool: True where MLX's built-in dequantizes the rows.
    """
    # Never no indices: mx.dequantize refuses empty rows (MLX 0.32.4),
    # where the planned lookup gives the empty result.
    return _hands_over_here() and 0 < indices.size <= LAYER_BUILTIN_LOOKUP_ROWS


def _layer_lookup(
    indices, table, scales, biases, group_size, bits
) -> Tuple[mx.array, Optional[LayerReplay]]:
    """The rows of a quantized embedding ``table`` at ``indices``,
    dequantized: the gathered rows checked and planned as ``dequantize``
    plans them, then run by ``mx.dequantize`` where
    :func:`layer_lookup_on_builtin` says so.

    Returns:
        The rows, and a :class:`~mlx_quant_ops._kernels.LayerReplay` of the
        whole lookup (gathers and dequantize) for the layer to keep, keyed
        on the indices' shape and dtype and the layer's arrays; or None
        where the call cannot be kept.
    """
    rows = (table[indices], scales[indices], biases[indices])
    run, kept = _DEQUANTIZE_CALLS.plan(
        _plan_dequantize, None, rows, (group_size, bits, "affine", None, None)
    )
    if not kept or type(indices) is not mx.array:
        return run(*rows), None
    if layer_lookup_on_builtin(indices):
        y = mx.dequantize(*rows, group_size, bits)

        def lookup(indices, table, scales, biases):
            return mx.dequantize(
                table[indices], scales[indices], biases[indices], group_size, bits
            )

    else:
        y = run(*rows)

        def lookup(indices, table, scales, biases):
            return run(table[indices], scales[indices], biases[indices])

    return y, LayerReplay(lookup, indices, table, scales, biases, group_size, bits)


def _plan_quantized_matmul(
    stream, x, w, scales, biases, transpose, group_size, bits, mode
):
    op = "quantized_matmul"
    group_size, bits = _format(op, group_size, bits, mode)
    _, _, dtype = _check_matmul(op, x, w, scales, biases, transpose, group_size, bits)
    return _checked_quantized_matmul(
        op, x, w, transpose, group_size, bits, dtype, stream
    )


def _checked_quantized_matmul(op, x, w, transpose, group_size, bits, dtype, stream):
    """The function of ``(x, w, scales, biases)`` that multiplies arrays of
    the checked ones' shapes and dtypes (``x`` may be a vector)."""
    vector = x.ndim == 1
    x_batch = x.shape[:-2] if not vector else ()
    check.broadcast_shapes(op, "x and w batch dimensions", x_batch, w.shape[:-2])
    fn = _differentiable_quantized_matmul(
        transpose, group_size, bits, StreamKey(stream)
    )

    def run(x, w, scales, biases):
        if vector:
            x = x[None]
        out = fn(x.astype(dtype), w, scales.astype(dtype), biases.astype(dtype))
        return out.squeeze(-2) if vector else out

    return run


# ---- gather_qmm ----------------------------------------------------------------


def _experts_at(rhs_indices, *arrays):
    """Each array's matrices (over its last two axes) at ``rhs_indices``,
    flattened: the experts of every product in turn."""
    flat = rhs_indices.reshape(-1)
    return [a.reshape(_batch_size(a), *a.shape[-2:])[flat] for a in arrays]


def _gather_qmm_reference(
    x, w, scales, biases, lhs_indices, rhs_indices, transpose, group_size, bits
):
    valid, lhs_indices, rhs_indices = _gather_valid(lhs_indices, rhs_indices, x, w)
    # Few products: unpack only the weights they use; many: unpack every
    # weight once and let mx.gather_mm pick.
    x32 = x.astype(mx.float32)
    if rhs_indices.size < _batch_size(w):
        used = _experts_at(rhs_indices, w, scales, biases)
        dense = _dense_weight(*used, group_size, bits)
        dense = dense.reshape(*rhs_indices.shape, *dense.shape[-2:])
        if transpose:
            dense = dense.swapaxes(-1, -2)
        x_sel = x32.reshape(_batch_size(x), *x.shape[-2:])[lhs_indices]
        out = x_sel @ dense
    else:
        dense = _dense_weight(w, scales, biases, group_size, bits)
        if transpose:
            dense = dense.swapaxes(-1, -2)
        out = mx.gather_mm(x32, dense, lhs_indices, rhs_indices)
    return _nan_where_invalid(out, valid).astype(x.dtype)


def _gather_qmm_cpu(
    x, w, scales, biases, lhs_indices, rhs_indices, transpose, group_size, bits
):
    """The reference path's gather: on a CPU stream, products of at most
    _CPU_BUILTIN_MAX_ROWS rows each go to MLX's float32 CPU kernel (with
    indices clipped into range, and NaN rows where they were not), else
    the reference. MoE layers multiply one row per product: 128 experts
    of 768x2048, top-8, 2-core Linux host, 1 token 8.3 ms against 39,
    8 tokens 68 against 486, 64 tokens 531 against 1716."""
    few = x.shape[-2] <= _CPU_BUILTIN_MAX_ROWS
    if not (few and _cpu_builtin(x, w, rhs_indices)):
        return _gather_qmm_reference(
            x, w, scales, biases, lhs_indices, rhs_indices, transpose, group_size, bits
        )
    valid, lhs_indices, rhs_indices = _gather_valid(lhs_indices, rhs_indices, x, w)
    few_products = rhs_indices.size * _CPU_EXPERT_COPY_COST <= _batch_size(w)
    if x.dtype != mx.float32 and few_products:
        # Half types: casting every expert's scales and biases to float32
        # costs more than copying out the experts the products use, while
        # those are few (128 of 768x2048, f16, top-8: one token 12.3 ms
        # against 5.7; 8 tokens, 64 products, 35.4 against 56.0).
        w, scales, biases = _experts_at(rhs_indices, w, scales, biases)
        rhs_indices = mx.arange(rhs_indices.size, dtype=mx.uint32).reshape(
            rhs_indices.shape
        )

    def columns(start, stop):
        weights = (w, scales, biases)
        part = _weight_rows(start, stop, *weights) if transpose else weights
        return _float32_builtin(
            mx.gather_qmm,
            x,
            *part,
            lhs_indices=lhs_indices,
            rhs_indices=rhs_indices,
            transpose=transpose,
            group_size=group_size,
            bits=bits,
        )

    n = w.shape[-2]
    work = rhs_indices.size * x.shape[-2] * n * x.shape[-1] if transpose else 0
    return _nan_where_invalid(_over_cores(columns, n, work), valid)


@functools.lru_cache(maxsize=256)
def _row_tiles(products: int, m: int, tile_rows: int):
    """For tiled kernels: per tile, its product and first row and row count,
    when every product's ``m`` rows are cut into tiles of ``tile_rows``."""
    chunks = -(-m // tile_rows)
    product = np.repeat(np.arange(products), chunks)
    chunk = np.tile(np.arange(chunks), products)
    first = product * m + chunk * tile_rows
    count = np.minimum(tile_rows, m - chunk * tile_rows)
    slot_rows = np.arange(m)
    return (
        mx.array(product.astype(np.int32)),
        mx.array(np.stack([first, count], -1).astype(np.int32)),
        mx.array(slot_rows.astype(np.int32)),
    )


def _gather_qmm_kernel(
    x,
    w,
    scales,
    biases,
    lhs_indices,
    rhs_indices,
    transpose,
    group_size,
    bits,
    sorted_indices,
    *,
    stream,
):
    # Everything below stays on the device: the indices are never read back,
    # so an MoE layer costs no host sync and compiles under mx.compile.
    m, k = x.shape[-2:]
    products = lhs_indices.size  # both index arrays come in one shape
    per_launch = max(1, _MAX_GRID_Y // m)
    ours_tiled = transpose or x.dtype == mx.float32  # else mx.gather_mm runs
    if products > per_launch and ours_tiled:
        # Tiles go along grid y, which CUDA caps, and a tile holds at least
        # one row of a product: more products (a long MoE prompt, or its
        # backward pass, which gathers unsorted) run as several launches.
        flat_lhs, flat_rhs = lhs_indices.reshape(-1), rhs_indices.reshape(-1)
        parts = [
            _gather_qmm_kernel(
                x,
                w,
                scales,
                biases,
                flat_lhs[start : start + per_launch],
                flat_rhs[start : start + per_launch],
                transpose,
                group_size,
                bits,
                sorted_indices,
                stream=stream,
            )
            for start in range(0, products, per_launch)
        ]
        out = mx.concatenate(parts, stream=stream)
        return out.reshape(*lhs_indices.shape, *out.shape[1:], stream=stream)
    out_shape = (*lhs_indices.shape, m, w.shape[-2] if transpose else None)
    if transpose:
        if m == 1:
            # The kernel reads the index arrays flat, in any integer dtype,
            # as 64-bit values: they go in as they are (a reshape would be
            # one more graph node per MoE call).
            slot_expert, slot_x = rhs_indices, lhs_indices
        else:
            flat_lhs = lhs_indices.reshape(-1).astype(mx.int64, stream=stream)
            slot_expert = mx.repeat(rhs_indices.reshape(-1), m, stream=stream)
            rows = mx.arange(m, dtype=mx.int64, stream=stream)
            slot_x = (flat_lhs[:, None] * m + rows).reshape(-1)
        # The mat-vec kernel validates each index itself (NaN rows for bad
        # ones). Sorted indices come in runs of one expert: a threadgroup
        # then reads each weight once for up to 8 (16) rows. A threadgroup
        # walks the runs in its rows one after another, so its row count
        # follows the average run the shapes promise (rows per expert), not
        # the most it could take: 64 rows over 128 experts are mostly runs
        # of one, and 16 of them in a row would be 16 passes in series.
        run = m
        if sorted_indices:
            experts = _batch_size(w)
            per_expert = max(1, rhs_indices.size * m // experts)
            run = min(_qmv_max_rows(stream, x.dtype), per_expert)
        plan = _gather_qmv_plan(
            tuple(x.shape),
            x.dtype,
            tuple(w.shape),
            rhs_indices.size * m,
            run,
            group_size,
            bits,
            tuple(out_shape),
            stream_key=StreamKey(stream),
            context=_launch_context(stream),
        )
        return plan(x, w, scales, biases, slot_expert, slot_x)[0]
    n = w.shape[-1] * WORD_BITS // bits
    out_shape = (*lhs_indices.shape, m, n)
    valid, lhs, rhs = _gather_valid(lhs_indices, rhs_indices, x, w)
    if x.dtype != mx.float32:
        dense = _dense_f32_kernel(w, scales, biases, group_size, bits, stream)
        out = mx.gather_mm(
            x.astype(mx.float32, stream=stream),
            dense,
            lhs,
            rhs,
            sorted_indices=sorted_indices,
            stream=stream,
        )
        return _nan_where_invalid(out, valid).astype(x.dtype, stream=stream)
    # float32 x @ W: the exact tiled kernel, one product's rows per tile
    # (MLX's CUDA matmul would use TF32); tiles built on the device.
    tile_rows = _QMM_TILE[0]
    product, first_count, rows = _row_tiles(rhs.size, m, tile_rows)
    experts = rhs.reshape(-1).astype(mx.int32)[product]
    tiles = mx.concatenate([experts[:, None], first_count], axis=-1)
    slot_x = (lhs.reshape(-1, 1).astype(mx.int32) * m + rows).reshape(-1)
    slot_out = mx.arange(rhs.size * m, dtype=mx.int32)
    n_blocks = ceil_to(n, _QMM_TILE[1]) // _QMM_TILE[1]
    _check_grid_rows(product.size)
    out = launch(
        _QMM_N,
        [x, w, scales, biases, tiles, slot_x, slot_out, sizes(n, k)],
        template=[("T", x.dtype), ("bits", bits), ("group_size", group_size)],
        grid=(n_blocks * _QMM_TILE[2], product.size, 1),
        threadgroup=(_QMM_TILE[2], 1, 1),
        output_shapes=[out_shape],
        output_dtypes=[x.dtype],
        stream=stream,
    )[0]
    return _nan_where_invalid(out, valid)


def _gather_qmm_any(
    x, w, scales, biases, lhs, rhs, transpose, group_size, bits, sorted_indices, stream
):
    def reference(x, w, scales, biases, lhs, rhs, sorted_indices):
        return _gather_qmm_cpu(
            x, w, scales, biases, lhs, rhs, transpose, group_size, bits
        )

    def kernel(x, w, scales, biases, lhs, rhs, sorted_indices, *, stream):
        return _gather_qmm_kernel(
            x,
            w,
            scales,
            biases,
            lhs,
            rhs,
            transpose,
            group_size,
            bits,
            sorted_indices,
            stream=stream,
        )

    return dispatch(
        reference, kernel, x, w, scales, biases, lhs, rhs, sorted_indices, stream=stream
    )


@functools.lru_cache(maxsize=256)  # one per option set, not per call
def _differentiable_gather_qmm(transpose, group_size, bits, sorted_indices, stream_key):
    """``gather_qmm`` on fixed options as an ``mx.custom_function`` of
    ``(x, w, scales, biases, lhs_indices, rhs_indices)``, the indices
    already broadcast together."""
    stream = stream_key.stream

    @mx.custom_function
    def gqmm(x, w, scales, biases, lhs, rhs):
        return _gather_qmm_any(
            x,
            w,
            scales,
            biases,
            lhs,
            rhs,
            transpose,
            group_size,
            bits,
            sorted_indices,
            stream,
        )

    @gqmm.vjp
    def gqmm_vjp(primals, cotangents, outputs):
        x, w, scales, biases, lhs, rhs = primals
        cot = _first(cotangents)
        m, k = x.shape[-2:]
        # d x[lhs[i]] += cot[i] @ W[rhs[i]] (the product the other way round)
        d_sel = _gather_qmm_any(
            cot,
            w,
            scales,
            biases,
            mx.array(np.arange(rhs.size, dtype=np.uint32).reshape(rhs.shape)),
            rhs,
            not transpose,
            group_size,
            bits,
            False,
            stream,
        )
        flat_lhs = lhs.reshape(-1)
        products = flat_lhs.size
        d_x = mx.zeros((_batch_size(x), m, k), dtype=mx.float32)
        if d_sel.size:  # MLX's scatter stops the process on empty updates
            d_sel = d_sel.reshape(products, m, k).astype(mx.float32)
            d_x = d_x.at[flat_lhs].add(d_sel)
        d_x = d_x.reshape(x.shape).astype(x.dtype)
        # d W[rhs[i]] += the dense gradient of product i
        x_sel = x.astype(mx.float32).reshape(_batch_size(x), m, k)[flat_lhs]
        cot32 = cot.astype(mx.float32).reshape(products, *cot.shape[-2:])
        if transpose:
            d_each = cot32.swapaxes(-1, -2) @ x_sel
        else:
            d_each = x_sel.swapaxes(-1, -2) @ cot32
        experts = _batch_size(w)
        d_dense = mx.zeros((experts, *d_each.shape[-2:]), dtype=mx.float32)
        d_dense = d_dense.at[rhs.reshape(-1)].add(d_each)
        d_dense = d_dense.reshape(*w.shape[:-1], d_each.shape[-1])
        d_scales, d_biases = _scale_bias_grads(
            d_dense, w, scales, biases, group_size, bits
        )
        return (
            d_x,
            mx.zeros_like(w),
            d_scales,
            d_biases,
            mx.zeros_like(lhs),
            mx.zeros_like(rhs),
        )

    return gqmm


def gather_qmm(
    x: mx.array,
    w: mx.array,
    scales: mx.array,
    biases: Optional[mx.array] = None,
    lhs_indices: Optional[mx.array] = None,
    rhs_indices: Optional[mx.array] = None,
    transpose: bool = True,
    group_size: Optional[int] = None,
    bits: Optional[int] = None,
    mode: str = "affine",
    global_scale: Optional[mx.array] = None,
    *,
    sorted_indices: bool = False,
    stream: StreamLike = None,
) -> mx.array:
    """Quantized matmul with matrix-level gather, as ``mx.gather_qmm``:
    ``out[i] = x[lhs_indices[i]] @ W[rhs_indices[i]].T`` (MoE experts).
    Differentiable with respect to ``x``, ``scales`` and ``biases``.

    Args:
        x (mlx.core.array): float32, float16 or bfloat16, ``[..., M, K]``.
        w (mlx.core.array): packed codes, uint32 ``[..., N, K * bits / 32]``
            (``[..., K, N * bits / 32]`` with ``transpose=False``).
        scales (mlx.core.array): per-group scales, ``w``'s batch shape.
        biases (mlx.core.array): per-group biases, same shape (required).
        lhs_indices (mlx.core.array, optional): integer indices into the
            flattened batch dimensions of ``x``. Default: all, in order.
        rhs_indices (mlx.core.array, optional): integer indices into the
            flattened batch dimensions of ``w``. Default: all, in order.
        transpose (bool): multiply by ``W.T`` (True) or by ``W``.
        group_size (int, optional): 32, 64 or 128. Default: 64.
        bits (int, optional): 1, 2, 3, 4, 5, 6 or 8. Default: 4.
        mode (str): only ``"affine"``.
        global_scale: only ``None``.
        sorted_indices (bool): promise that ``rhs_indices`` is sorted
            (lets the kernels group rows by expert). Default: False.
        stream (mlx.core.Stream or Device, optional): where to run.

    Returns:
        mlx.core.array: ``[*broadcast(lhs_indices, rhs_indices).shape, M, N]``.

    Index values are never read back to the host (that would stall the
    device on every MoE layer and break ``mx.compile``): a product whose
    index is out of range comes out as a row of NaN, never as an
    out-of-bounds read.
    """
    return _GATHER_QMM_CALLS(
        _plan_gather_qmm,
        stream,
        (x, w, scales, biases, lhs_indices, rhs_indices),
        (transpose, group_size, bits, mode, global_scale, sorted_indices),
    )


_GATHER_QMM_CALLS = CallPlans()


def _layer_gather_qmm(
    x, w, scales, biases, group_size, bits, indices, sorted_indices
) -> Tuple[mx.array, Optional[LayerReplay]]:
    """``gather_qmm(x, w, scales, biases, rhs_indices=indices,
    transpose=True, ...)`` for a layer holding ``w``, ``scales`` and
    ``biases``, checked and planned as the op is.

    Returns:
        The product, and the
        :class:`~mlx_quant_ops._kernels.LayerReplay` of the planned call
        for the layer to keep (None where the call cannot be kept).
    """
    y, run = _GATHER_QMM_CALLS.call(
        _plan_gather_qmm,
        None,
        (x, w, scales, biases, None, indices),
        (True, group_size, bits, "affine", None, sorted_indices),
    )
    if run is None:
        return y, None
    replay = LayerReplay(
        run, x, w, scales, biases, group_size, bits, indices, sorted_indices
    )
    return y, replay


def _plan_gather_qmm(
    stream,
    x,
    w,
    scales,
    biases,
    lhs_indices,
    rhs_indices,
    transpose,
    group_size,
    bits,
    mode,
    global_scale,
    sorted_indices,
):
    op = "gather_qmm"
    group_size, bits = _format(op, group_size, bits, mode, global_scale)
    check.boolean(op, "sorted_indices", sorted_indices)
    _, _, dtype = _check_matmul(op, x, w, scales, biases, transpose, group_size, bits)
    if lhs_indices is None and rhs_indices is None:
        # MLX's rule: without indices this is a plain quantized_matmul.
        run = _checked_quantized_matmul(
            op, x, w, transpose, group_size, bits, dtype, stream
        )
        return lambda x, w, scales, biases, lhs, rhs: run(x, w, scales, biases)
    check.ndim(op, "x", x, at_least=2)
    _check_indices(op, "lhs_indices", lhs_indices)
    _check_indices(op, "rhs_indices", rhs_indices)
    x_batch, w_batch = tuple(x.shape[:-2]), tuple(w.shape[:-2])
    shape = check.broadcast_shapes(
        op,
        "lhs_indices and rhs_indices",
        x_batch if lhs_indices is None else lhs_indices.shape,
        w_batch if rhs_indices is None else rhs_indices.shape,
    )
    fn = _differentiable_gather_qmm(
        transpose, group_size, bits, sorted_indices, StreamKey(stream)
    )

    def run(x, w, scales, biases, lhs_indices, rhs_indices):
        # Missing indices (every batch entry in order, MLX's default) come
        # prebuilt in the broadcast shape; arrays already of that shape
        # pass through.
        lhs = _indices_in_shape(lhs_indices, x_batch, shape)
        rhs = _indices_in_shape(rhs_indices, w_batch, shape)
        return fn(
            x.astype(dtype), w, scales.astype(dtype), biases.astype(dtype), lhs, rhs
        )

    return run
