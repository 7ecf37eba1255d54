"""The timing protocol every benchmark row follows (DESIGN.md, Benchmarks).

Many independent calls go into one ``mx.eval``, rotating at least six weight
sets so repeats do not sit in cache; the time per call is the median over
repeats, after a warm-up that also pays any kernel compilation. Each row
compares our op with MLX's built-in (where one exists) and an fp16 dense
matmul, and with the memory-bandwidth floor: the bytes the op must move over
the measured copy bandwidth.
"""

import statistics
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import mlx.core as mx

WEIGHT_SETS = 6
# Calls in one timed mx.eval, at most. Past about ten of MLX's CUDA graphs
# in flight (some 300 calls of a 4096-wide decode) MLX's runtime leaves
# the GPU idle between kernels: in-kernel timers on the H100 showed a
# 14.4 us kernel timed at 25-28 us a call at 1024 calls and 15-17 at 256,
# and every op faster than about 25 us a call landed near 25-28 at 1024
# calls whatever its kernel took, while slower ops (MLX's own decode at
# 33 us) did not move (docs/benchmarks.md, fourteenth and fifteenth
# sessions). 256 calls still rotate the weight sets 42 times.
MAX_CALLS = 256

#: One call of an op on weight set ``i`` (0 <= i < WEIGHT_SETS).
Op = Callable[[int], mx.array]


def in_turns(contenders: Sequence, round_: int) -> list:
    """``contenders`` in the order a round of back-to-back timings runs
    them: as given in even rounds, reversed in odd ones. Whatever runs
    second meets the host's caches, clocks and MLX's allocator pool as the
    first left them, so over an even number of rounds neither side gains
    from its place.

    Args:
        contenders (sequence): what each round times, one after another.
        round_ (int): the round's number.

    Returns:
        list: the round's order.
    """
    order = list(contenders)
    if round_ % 2:
        order.reverse()
    return order


@dataclass
class Case:
    """One benchmark row.

    Attributes:
        group: the op family and op, e.g. ``"gguf qdq"``.
        name: the shape or variant, e.g. ``"Q4_0 4096x14336 f32"``.
        ours: our op on weight set ``i``.
        builtin: MLX's built-in doing the same work, if one exists.
        dense: the fp16 dense equivalent (matmuls), if meaningful.
        bytes_moved: bytes our op must read and write at the least.
    """

    group: str
    name: str
    ours: Op
    builtin: Optional[Op] = None
    dense: Optional[Op] = None
    bytes_moved: int = 0


def time_op(op: Op, repeats: int = 7, target_seconds: float = 0.02) -> float:
    """Median wall time of one call of ``op``, in microseconds.

    Args:
        op: builds one call's output for a weight-set index.
        repeats: timed repeats; the median is reported.
        target_seconds: roughly how long one repeat should run, within
            :data:`MAX_CALLS` calls.

    Returns:
        float: microseconds per call.
    """
    mx.eval([op(i) for i in range(WEIGHT_SETS)])  # warm-up, compiles kernels
    calls = WEIGHT_SETS
    while True:
        outputs = [op(i % WEIGHT_SETS) for i in range(calls)]
        start = time.perf_counter()
        mx.eval(outputs)
        elapsed = time.perf_counter() - start
        if elapsed >= target_seconds or calls >= MAX_CALLS:
            break
        calls = min(2 * calls, MAX_CALLS)
    samples = []
    for _ in range(repeats):
        outputs = [op(i % WEIGHT_SETS) for i in range(calls)]
        start = time.perf_counter()
        mx.eval(outputs)
        samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples) * 1e6


def copy_bandwidth(megabytes: int = 512) -> float:
    """Measured device copy bandwidth in bytes per second (bytes read plus
    bytes written), the denominator of every floor."""
    n = megabytes * (1 << 20) // 4
    sources = [mx.random.uniform(shape=(n,)) for _ in range(2)]
    mx.eval(sources)
    us = time_op(lambda i: sources[i % 2] + 0.0, repeats=5)
    return 2 * n * 4 / (us * 1e-6)


@dataclass
class Row:
    case: Case
    ours_us: float
    builtin_us: Optional[float]
    dense_us: Optional[float]
    floor_us: Optional[float]


def run_cases(cases: List[Case], bandwidth: float, log=print) -> List[Row]:
    """Time every case; print each row as it completes.

    Returns:
        list[Row]: the measured rows.
    """
    rows = []
    for case in cases:
        ours = time_op(case.ours)
        builtin = time_op(case.builtin) if case.builtin else None
        dense = time_op(case.dense) if case.dense else None
        floor = case.bytes_moved / bandwidth * 1e6 if case.bytes_moved else None
        row = Row(case, ours, builtin, dense, floor)
        rows.append(row)
        log(format_row(row))
    return rows


HEADER = (
    f"{'op':<22} {'case':<36} {'ours us':>9} {'built-in':>9} {'fp16 dense':>10} "
    f"{'floor us':>9} {'floor/ours':>10} {'GB/s':>8}"
)


def _num(value: Optional[float], width: int, fmt: str = ".1f") -> str:
    return f"{value:>{width}{fmt}}" if value is not None else f"{'-':>{width}}"


def format_row(row: Row) -> str:
    fraction = row.floor_us / row.ours_us if row.floor_us else None
    gbs = (
        row.case.bytes_moved / (row.ours_us * 1e-6) / 1e9
        if row.case.bytes_moved
        else None
    )
    return (
        f"{row.case.group:<22} {row.case.name:<36} {row.ours_us:>9.1f} "
        f"{_num(row.builtin_us, 9)} {_num(row.dense_us, 10)} "
        f"{_num(row.floor_us, 9)} {_num(fraction, 10, '.2f')} {_num(gbs, 8, '.0f')}"
    )
