"""The streamed mat-vec's persistent grid, filled (two blocks an SM) or as
the package deals it (``affine._qmv_stream_blocks``: evenly where the
filled grid's last round would be a tenth idle or more), timed in turns in
one process on a Hopper GPU with the benchmark's protocol (independent
calls in one ``mx.eval``, six rotating weight sets)::

    python scripts/stream_blocks.py [--rounds 6]

``affine._QMV_STREAM_EVEN_TILES`` switches between the two. Prints, per
shape, the median µs a call of each setting (range in brackets) and MLX's.
The thirty-sixth session's run is in docs/benchmarks.md.
"""

import argparse
import statistics

import mlx.core as mx

from mlx_quant_ops import _kernels, affine
from mlx_quant_ops.bench.core import WEIGHT_SETS, in_turns, time_op

# (N, K, bits, group size): one-row decodes the streamed mat-vec takes.
CASES = (
    (14336, 4096, 4, 64),
    (14336, 4096, 2, 64),
    (14336, 4096, 3, 64),
    (14336, 4096, 5, 64),
    (14336, 4096, 6, 64),
    (14336, 4096, 4, 32),
    (14336, 4096, 4, 128),
    (11008, 4096, 4, 64),
    (28672, 8192, 4, 64),
    (128256, 4096, 4, 64),
)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    print("device", mx.default_device(), "MLX", mx.__version__)
    for n, k, bits, group_size in CASES:
        sets = []
        for _ in range(WEIGHT_SETS):
            w = mx.random.normal((n, k)).astype(mx.float16)
            sets.append(mx.quantize(w, group_size=group_size, bits=bits))
        x = mx.random.normal((1, k)).astype(mx.float16)
        mx.eval(sets, x)

        def ours(i):
            return affine.quantized_matmul(
                x, *sets[i], group_size=group_size, bits=bits
            )

        def builtin(i):
            return mx.quantized_matmul(x, *sets[i], group_size=group_size, bits=bits)

        times = {"filled": [], "dealt": []}
        for round_ in range(args.rounds):
            for setting in in_turns(times, round_):
                affine._QMV_STREAM_EVEN_TILES = setting == "dealt"
                _kernels.clear_plans()
                times[setting].append(time_op(ours))
        affine._QMV_STREAM_EVEN_TILES = True
        _kernels.clear_plans()
        tiles = -(-n // 16)
        print(
            f"q{bits} g{group_size} {n}x{k} ({tiles} tiles, dealt grid"
            f" {affine._qmv_stream_blocks(tiles)} blocks):"
            + "".join(
                f" {setting} {statistics.median(values):.1f}"
                f" ({min(values):.1f}-{max(values):.1f})"
                for setting, values in times.items()
            )
            + f" MLX {time_op(builtin):.1f} µs a call"
        )
        del sets


if __name__ == "__main__":
    main()
