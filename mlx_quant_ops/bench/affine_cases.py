"""MLX affine rows: quantized_matmul (decode M = 1 and 8, prefill M = 512)
on LLM weight shapes and gather_qmm on a MoE layer (128 experts of
768x2048, top-8), each against ``mx.quantized_matmul`` / ``mx.gather_qmm``
on the same packed weights and an fp16 dense product, with the bytes that
must move (packed weight, scales, biases, activations in, results out; for
MoE only the experts the routing touches)."""

import mlx.core as mx
import numpy as np

from .. import affine
from .core import WEIGHT_SETS, Case

# (N outputs, K inputs)
FULL_SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336), (128256, 4096))
QUICK_SHAPES = ((256, 512),)
FULL_ROWS = (1, 8, 512)
QUICK_ROWS = (1, 8, 64)
# (bits, group size, shapes it runs on: None = all)
FORMATS = (
    (4, 64, None),
    (4, 32, ((4096, 14336),)),
    (8, 32, ((4096, 14336),)),
)
# Other widths: one-row decode and prefill, on one shape.
OTHER_BITS = ((2, 64), (3, 64), (5, 64), (6, 64))
MOE_FULL = (128, 768, 2048, 8, (1, 8, 512))  # experts, N, K, top-k, tokens
MOE_QUICK = (16, 64, 256, 4, (1, 32))
DTYPE = mx.float16


def _packed_bytes(n, k, bits, group_size, dtype=DTYPE):
    return n * k * bits // 8 + 2 * (n * k // group_size) * dtype.size


def _weight_sets(shape, bits, group_size):
    """Six packed weights (and their fp16 dense forms) of ``shape``."""
    sets, dense = [], []
    for i in range(WEIGHT_SETS):
        w = (mx.random.normal(shape, key=mx.random.key(i)) * 0.02).astype(DTYPE)
        sets.append(mx.quantize(w, group_size, bits))
        dense.append(w)
        mx.eval(sets[-1], dense[-1])
    return sets, dense


def _matmul_cases(n, k, rows, bits, group_size):
    sets, dense = _weight_sets((n, k), bits, group_size)
    xs = [mx.random.normal((m, k)).astype(DTYPE) for m in rows]
    mx.eval(xs)
    out = []
    for x in xs:
        m = x.shape[0]
        kind = "decode" if m <= 8 else "prefill"
        name = f"q{bits} g{group_size} {n}x{k} M={m}"
        out.append(
            Case(
                f"affine qmm {kind}",
                name,
                lambda i, x=x: affine.quantized_matmul(
                    x, *sets[i], True, group_size, bits
                ),
                builtin=lambda i, x=x: mx.quantized_matmul(
                    x, *sets[i], True, group_size, bits
                ),
                dense=lambda i, x=x: x @ dense[i].T,
                bytes_moved=_packed_bytes(n, k, bits, group_size)
                + (m * k + m * n) * DTYPE.size,
            )
        )
    return out


def _moe_cases(experts, n, k, top_k, token_counts, bits, group_size):
    sets, dense = _weight_sets((experts, n, k), bits, group_size)
    rng = np.random.default_rng(0)
    out = []
    for tokens in token_counts:
        routes = np.argsort(rng.random((tokens, experts)), axis=-1)[:, :top_k]
        touched = len(np.unique(routes))
        if tokens * top_k >= 64:
            # mlx-lm's SwitchGLU layout for many rows: one row per (token,
            # expert) pair, sorted by expert.
            order = np.argsort(routes.reshape(-1), kind="stable")
            x = mx.random.normal((tokens * top_k, 1, k)).astype(DTYPE)
            rhs = mx.array(routes.reshape(-1)[order].astype(np.uint32))
            sort = True
        else:
            x = mx.random.normal((tokens, 1, 1, k)).astype(DTYPE)
            rhs = mx.array(routes.astype(np.uint32))
            sort = False
        mx.eval(x, rhs)
        name = f"q{bits} g{group_size} {experts}x{n}x{k} top{top_k} T={tokens}"

        def dense_op(i, x=x, rhs=rhs, sort=sort):
            # (MLX's CPU gather_mm is float32-only: GPU rows only.)
            w = dense[i].swapaxes(-1, -2)
            return mx.gather_mm(x, w, rhs_indices=rhs, sorted_indices=sort)

        out.append(
            Case(
                "affine gather_qmm",
                name,
                lambda i, x=x, rhs=rhs, sort=sort: affine.gather_qmm(
                    x,
                    *sets[i],
                    rhs_indices=rhs,
                    group_size=group_size,
                    bits=bits,
                    sorted_indices=sort,
                ),
                builtin=lambda i, x=x, rhs=rhs, sort=sort: mx.gather_qmm(
                    x,
                    *sets[i],
                    rhs_indices=rhs,
                    group_size=group_size,
                    bits=bits,
                    sorted_indices=sort,
                ),
                dense=dense_op if mx.default_device() == mx.gpu else None,
                bytes_moved=touched * _packed_bytes(n, k, bits, group_size)
                + tokens * top_k * (k + n) * DTYPE.size,
            )
        )
    return out


def cases(quick: bool):
    shapes = QUICK_SHAPES if quick else FULL_SHAPES
    rows = QUICK_ROWS if quick else FULL_ROWS
    out = []
    for bits, group_size, only in FORMATS:
        for n, k in shapes if (quick or only is None) else only:
            out += _matmul_cases(n, k, rows, bits, group_size)
    n, k = shapes[0] if quick else (4096, 14336)
    for bits, group_size in OTHER_BITS:
        out += _matmul_cases(n, k, (rows[0], rows[-1]), bits, group_size)
    experts, n, k, top_k, token_counts = MOE_QUICK if quick else MOE_FULL
    for bits, group_size, _ in FORMATS:
        counts = token_counts if (bits, group_size) == (4, 64) else token_counts[::2]
        out += _moe_cases(experts, n, k, top_k, counts, bits, group_size)
    return out
