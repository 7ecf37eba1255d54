"""GGUF rows: quantize, dequantize and the qdq round trip, as throughput
against the copy bandwidth (each reads its input once and writes its output
once)."""

import mlx.core as mx

from .. import gguf
from .core import WEIGHT_SETS, Case

FULL_SHAPE = (4096, 14336)
QUICK_SHAPE = (256, 1024)


def cases(quick: bool):
    rows, cols = QUICK_SHAPE if quick else FULL_SHAPE
    out = []
    for dtype in (mx.float32, mx.float16):
        values = [
            mx.random.normal((rows, cols), key=mx.random.key(i)).astype(dtype)
            for i in range(WEIGHT_SETS)
        ]
        mx.eval(values)
        tag = "f32" if dtype == mx.float32 else "f16"
        for fmt in gguf.FORMATS.values():
            if fmt.block_elems != 32 and quick:
                continue
            n = rows * cols
            block_bytes = n // fmt.block_elems * fmt.block_bytes
            blocks = [gguf.quantize(v, fmt.name) for v in values]
            mx.eval(blocks)
            name = f"{fmt.name} {rows}x{cols} {tag}"
            out.append(
                Case(
                    "gguf qdq",
                    name,
                    lambda i, v=values, f=fmt.name: gguf.qdq(v[i], f),
                    bytes_moved=2 * n * dtype.size,
                )
            )
            out.append(
                Case(
                    "gguf quantize",
                    name,
                    lambda i, v=values, f=fmt.name: gguf.quantize(v[i], f),
                    bytes_moved=n * dtype.size + block_bytes,
                )
            )
            out.append(
                Case(
                    "gguf dequantize",
                    name,
                    lambda i, b=blocks, f=fmt.name, d=dtype: gguf.dequantize(
                        b[i], f, dtype=d
                    ),
                    bytes_moved=n * dtype.size + block_bytes,
                )
            )
    return out
