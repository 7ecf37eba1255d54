"""Chains of dependent one-row decode calls of linear layers: MLX's layers
against ours on our kernels, per weight shape and width.

This is the measurement behind ``affine.LAYER_BUILTIN_DECODE_BELOW``: on
CUDA a layer hands a decode call of a small weight to MLX's built-in, where
a whole call is bound by the host and MLX's one graph node finishes first.
The limits move with what a layer call costs the host, so rerun this on a
GPU after changing that (a layer's replay, the planned functions).

A chain multiplies one f16 row by a layer pair (``[N, K]`` then ``[K, N]``)
again and again, each call taking the last one's output as a decode step's
projections do, and is evaluated once; its time over the number of calls
is a call's time, host and GPU together. The two layer sets take turns to
go first (until 2026-12-05 MLX's always did), and each shape prints the
median of the rounds, ours over MLX's, and what the current rule picks.
Our set runs with the hand-over off.

Run from the repository root::

    python scripts/handover_chains.py [--rounds 6] [--pairs 64] [--bits 4 8]

Without a GPU the script runs on the CPU path (useful only to check it
runs).
"""

import argparse
import statistics
import time

import mlx.core as mx
import mlx.nn as nn

import mlx_quant_ops as mqo
from mlx_quant_ops import affine
from mlx_quant_ops.bench.core import in_turns

# (N, K) of the first layer of a pair; the limits in affine.py were set
# between these sizes.
SHAPES = (
    (2048, 2048),
    (8192, 2048),
    (4096, 4096),
    (8192, 4096),
    (14336, 4096),
    (32768, 4096),
)


def layer_pair(n: int, k: int, bits: int, group_size: int):
    """MLX's quantized layers ``[n, k]`` and ``[k, n]`` (f16, random), and
    ours over the same arrays."""
    theirs = []
    for out_dims, in_dims in ((n, k), (k, n)):
        dense = nn.Linear(in_dims, out_dims, bias=False)
        dense.set_dtype(mx.float16)
        theirs.append(nn.QuantizedLinear.from_linear(dense, group_size, bits))
    mx.eval([layer.parameters() for layer in theirs])
    return theirs, [mqo.nn.QuantizedLinear.from_quantized(t) for t in theirs]


def chain_us(layers, x: mx.array, pairs: int) -> float:
    """Microseconds a call of a chain of ``pairs`` layer pairs, built and
    evaluated."""
    start = time.perf_counter()
    y = x
    for _ in range(pairs):
        y = layers[1](layers[0](y))
    mx.eval(y)
    return (time.perf_counter() - start) / (2 * pairs) * 1e6


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Even, so that each layer set goes first as often (bench.core.in_turns).
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument(
        "--bits", type=int, nargs="+", default=sorted(affine.LAYER_BUILTIN_DECODE_BELOW)
    )
    args = parser.parse_args(argv)
    limits = dict(affine.LAYER_BUILTIN_DECODE_BELOW)
    print(f"path: {mqo.backend()}, {args.pairs * 2} calls a chain, f16, one row")
    print(
        f"{'bits':>4} {'N x K':>12} {'MLX us':>8} {'ours us':>8} {'ours/MLX':>9}  rule"
    )
    for bits in args.bits:
        for n, k in SHAPES:
            theirs, ours = layer_pair(n, k, bits, args.group_size)
            x = mx.random.normal((1, k)).astype(mx.float16)
            mx.eval(x)
            affine.LAYER_BUILTIN_DECODE_BELOW = {}  # ours on our kernels
            mx.clear_cache()
            try:
                times = {"mlx": [], "ours": []}
                for round_ in range(args.rounds + 1):  # the first warms up
                    for key, layers in in_turns(
                        (("mlx", theirs), ("ours", ours)), round_
                    ):
                        elapsed = chain_us(layers, x, args.pairs)
                        if round_:
                            times[key].append(elapsed)
            finally:
                affine.LAYER_BUILTIN_DECODE_BELOW = limits
            mlx_us, ours_us = (statistics.median(times[key]) for key in times)
            ratio = statistics.median(
                o / m for o, m in zip(times["ours"], times["mlx"])
            )
            # The layers' own rule, with its limits back (False off CUDA).
            on_builtin = affine.layer_decode_on_builtin(x, ours[0]["weight"], bits)
            rule = "MLX" if on_builtin else "ours"
            print(
                f"{bits:>4} {f'{n}x{k}':>12} {mlx_us:>8.1f} {ours_us:>8.1f}"
                f" {ratio:>9.2f}  {rule}"
            )
            del theirs, ours


if __name__ == "__main__":
    main()
