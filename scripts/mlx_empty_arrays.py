"""Which ops survive arrays with no elements on the default device: MLX's
plain and compiled ops, MLX's quantized ops and this package's, each case in
a process of its own (several of MLX's stop the process with SIGFPE or
SIGSEGV; rc -8 and -11). On an H100 with MLX 0.32.4 CUDA (2026-12-05) plain
element-wise ops, matmul, reductions and gathers took empty arrays, while
compiled element-wise kernels and every quantized op of MLX's died; this
package's ops give empty results (``docs/benchmarks.md``). Run from the
repository root, optionally with a prefix of the case names::

    python scripts/mlx_empty_arrays.py [ours]
"""

import subprocess
import sys

PRE = """
import faulthandler; faulthandler.enable()
import mlx.core as mx, numpy as np
import mlx_quant_ops as mqo
e = mx.zeros((0, 128)); eh = mx.zeros((0, 128), mx.float16)
q, s, b = mx.quantize(mx.random.normal((20, 128)))
qe, se, be = mx.quantize(mx.random.normal((4, 20, 128)))
"""
CASES = {
    "zeros": "y = mx.zeros((0, 128))",
    "astype": "y = e.astype(mx.float16)",
    "add": "y = e + 1",
    "shift_u32": "y = (mx.zeros((0, 16), mx.uint32)[..., None] >> mx.arange(0, 32, 4, dtype=mx.uint32)) & 15",
    "contiguous_T": "y = mx.contiguous(e.T)",
    "matmul_x0": "y = e @ mx.ones((128, 8))",
    "matmul_n0": "y = mx.ones((3, 128)) @ mx.zeros((128, 0))",
    "sum_empty": "y = mx.zeros((0, 2, 64)).sum(-1)",
    "reshape": "y = e.reshape(0, 2, 64)",
    "take": "y = mx.ones((5, 8))[mx.zeros((0,), mx.uint32)]",
    "compiled_ew": "y = mx.compile(lambda a: (a * 2 + 1).astype(mx.float16))(e)",
    "compiled_ew_u32": "y = mx.compile(lambda a: ((a[..., None] >> mx.arange(0, 32, 4, dtype=mx.uint32)) & 15).astype(mx.float32))(mx.zeros((0, 16), mx.uint32))",
    "grad_zeros_like": "y = mx.grad(lambda a: (a * 0).sum())(e)",
    "mx_quantize_w0": "y = mx.quantize(mx.zeros((0, 128)))",
    "mx_dequantize_w0": "y = mx.dequantize(q[:0], s[:0], b[:0])",
    "mx_qmm_x0": "y = mx.quantized_matmul(e, q, s, b)",
    "mx_qmm_n0": "y = mx.quantized_matmul(mx.ones((3, 128)), q[:0], s[:0], b[:0])",
    "mx_gather_x0": "y = mx.gather_qmm(mx.zeros((0, 128)), qe, se, be, rhs_indices=mx.array([1, 2]))",
    "mx_gather_idx0": "y = mx.gather_qmm(mx.ones((1, 128)), qe, se, be, rhs_indices=mx.zeros((0,), mx.uint32))",
    "ours_quantize_w0": "y = mqo.quantize(mx.zeros((0, 128)))",
    "ours_dequantize_w0": "y = mqo.dequantize(q[:0], s[:0], b[:0])",
    "ours_qmm_x0": "y = mqo.quantized_matmul(e, q, s, b)",
    "ours_qmm_n0": "y = mqo.quantized_matmul(mx.ones((3, 128)), q[:0], s[:0], b[:0])",
    "ours_qmm_n0_built": "q0, s0, b0 = mqo.quantize(mx.zeros((0, 128))); y = mqo.quantized_matmul(mx.ones((3, 128)), q0, s0, b0)",
    "ours_gather_x0": "y = mqo.gather_qmm(mx.zeros((0, 128)), qe, se, be, rhs_indices=mx.array([1, 2]))",
    "ours_gather_idx0": "y = mqo.gather_qmm(mx.ones((1, 128)), qe, se, be, rhs_indices=mx.zeros((0,), mx.uint32))",
    "ours_gather_grad_x0": "y = mx.grad(lambda x: mqo.gather_qmm(x, qe, se, be, rhs_indices=mx.array([1, 2])).sum())(mx.zeros((0, 128)))",
    "ours_qmm_grad_n0": "y = mx.grad(lambda s_: mqo.quantized_matmul(mx.ones((3, 128)), q[:0], s_, b[:0]).sum())(s[:0])",
}
for name, code in CASES.items():
    if len(sys.argv) > 1 and not name.startswith(sys.argv[1]):
        continue
    src = (
        PRE
        + code
        + "\nmx.eval(y)\nprint('OK', [a.shape for a in (y if isinstance(y, (list, tuple)) else [y])])"
    )
    p = subprocess.run(
        [sys.executable, "-c", src], capture_output=True, text=True, timeout=120
    )
    tail = (p.stdout.strip().splitlines() or [""])[-1]
    err = [
        l
        for l in p.stderr.splitlines()
        if "Error" in l or "line" in l and "<string>" in l
    ][-2:]
    print(
        f"{name:24s} rc={p.returncode:4d} {tail[:60]} {' | '.join(err)[:160]}",
        flush=True,
    )
