"""What one graph node of each kind costs the host on the default device:
building it in Python, and MLX's encoding of it (``mx.async_eval``), per
node, for many independent nodes on one decode-sized input. A decode step
of a small model is bound by the host, so this says what fusing layer calls
into fewer nodes can buy, and what kind of node is worth removing::

    python scripts/node_costs.py [--nodes 256] [--rounds 30]

Kinds: MLX's ``quantized_matmul`` (one node), ours through the public op
(our kernel and its custom function, replayed from a compiled plan), our
kernel alone (no custom function), MLX's op inside a custom function, an
element-wise add (a kernel node), a slice (no kernel), and a custom
function around an add. Each round builds every kind once, in turns, so the
host's drift falls on all of them alike; medians over the rounds.
"""

import argparse
import statistics
import time

import mlx.core as mx

import mlx_quant_ops as mqo
from mlx_quant_ops import affine

GROUP_SIZE, BITS = 64, 4


def kinds(x, w, scales, biases, wide):
    """name -> a function of no arguments that adds one node (or one call)
    to the graph and returns its output."""
    stream = mx.default_stream(mx.default_device())

    @mx.custom_function
    def wrapped_builtin(x, w, scales, biases):
        return mx.quantized_matmul(x, w, scales, biases, True, GROUP_SIZE, BITS)

    @mx.custom_function
    def wrapped_add(x):
        return x + 1

    return {
        "mlx quantized_matmul": lambda: mx.quantized_matmul(
            x, w, scales, biases, True, GROUP_SIZE, BITS
        ),
        "ours (kernel + custom function)": lambda: mqo.quantized_matmul(
            x, w, scales, biases, group_size=GROUP_SIZE, bits=BITS
        ),
        "our kernel alone": lambda: affine._quantized_matmul_any(
            x, w, scales, biases, True, GROUP_SIZE, BITS, stream
        ),
        "mlx op in custom function": lambda: wrapped_builtin(x, w, scales, biases),
        "add (kernel node)": lambda: x + 1,
        "slice (no kernel)": lambda: wide[:, 7:2055],
        "add in custom function": lambda: wrapped_add(x),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    print("device", mx.default_device(), "MLX", mx.__version__)
    mx.random.seed(0)
    x = mx.random.normal((1, 2048)).astype(mx.float16)
    wide = mx.random.normal((1, 4096)).astype(mx.float16)
    w, scales, biases = mx.quantize(
        mx.random.normal((2048, 2048)).astype(mx.float16), GROUP_SIZE, BITS
    )
    mx.eval(x, wide, w, scales, biases)
    table = kinds(x, w, scales, biases, wide)
    times = {name: ([], [], []) for name in table}
    for round_ in range(args.rounds + 2):
        for name, make in table.items():
            mx.synchronize()
            start = time.perf_counter()
            outs = [make() for _ in range(args.nodes)]
            built = time.perf_counter()
            mx.async_eval(outs)
            handed = time.perf_counter()
            mx.eval(outs)
            done = time.perf_counter()
            if round_ >= 2:  # two warm-up rounds: kernels built, plans made
                for series, value in zip(
                    times[name], (built - start, handed - built, done - start)
                ):
                    series.append(value / args.nodes * 1e6)
    print(
        f"{'kind':<34} {'build µs':>9} {'encode µs':>10} {'all µs':>8}  (per node, median of {args.rounds})"
    )
    for name, (build, encode, total) in times.items():
        print(
            f"{name:<34} {statistics.median(build):>9.2f}"
            f" {statistics.median(encode):>10.2f} {statistics.median(total):>8.2f}"
        )


if __name__ == "__main__":
    main()
