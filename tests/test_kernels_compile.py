"""Every kernel instantiation the CUDA path builds compiles with nvcc.

The ops themselves decide what gets built: each entry of :data:`EXERCISES`
calls public ops over the template parameters a family uses (dtypes, types,
bits, group sizes, kernel variants), with the ``cuda`` path forced and
kernel launches recorded rather than run (see ``cuda_compile.py``). Each
distinct kernel definition is then compiled once, with all of its recorded
instantiations, for sm_90a as MLX's CUDA path would assemble it. Skipped
only where ``nvcc`` is absent.
"""

import tempfile
from pathlib import Path
from unittest import mock

import mlx.core as mx
import pytest
from cuda_compile import (
    HOPPER,
    compile_unit,
    group_by_definition,
    nvcc_path,
    record_launches,
    stream_everything,
    translation_unit,
)

import mlx_quant_ops as mqo

FLOATS = (mx.float32, mx.float16, mx.bfloat16)


def exercise_gguf():
    outputs = []
    for type_name, fmt in mqo.gguf.FORMATS.items():
        for dtype in FLOATS:
            x = mx.zeros((3, 2 * fmt.block_elems), dtype=dtype)
            blocks = mqo.gguf.quantize(x, type_name)
            outputs += [
                blocks,
                mqo.gguf.dequantize(blocks, type_name, dtype=dtype),
                mqo.gguf.qdq(x, type_name),
            ]
    return outputs


def _affine_calls(dtype, bits, group_size, decode_rows=(1,), prefill=True):
    """Public affine ops on one (dtype, bits, group size): quantize,
    dequantize, the decode kernel for each ``decode_rows`` count (its x-row
    template), the prefill kernel and a MoE gather."""
    k = 2 * group_size
    w = mx.zeros((40, k), dtype=dtype)
    w_q, scales, biases = mqo.quantize(w, group_size, bits)
    out = [w_q, mqo.dequantize(w_q, scales, biases, group_size, bits)]
    for m in decode_rows:
        x = mx.zeros((m, k), dtype=dtype)
        out.append(mqo.quantized_matmul(x, w_q, scales, biases, True, group_size, bits))
    if dtype == mx.float32:
        # x @ W (transpose=False) has its own float32 kernel.
        x = mx.zeros((3, 40), dtype=dtype)
        out.append(
            mqo.quantized_matmul(x, w_q, scales, biases, False, group_size, bits)
        )
    if prefill:
        x = mx.zeros((70, k), dtype=dtype)
        out.append(mqo.quantized_matmul(x, w_q, scales, biases, True, group_size, bits))
        experts = [a[None] for a in (w_q, scales, biases)]
        out.append(
            mqo.gather_qmm(
                mx.zeros((3, 1, k), dtype=dtype),
                *experts,
                rhs_indices=mx.array([0, 0, 0]),
                group_size=group_size,
                bits=bits,
            )
        )
    return out


def _tall_prefill():
    """Prefill with 128 and 256 x rows, the tile heights the tensor-core
    kernels take for long prompts (the calls above stay at 64; 256 is
    Hopper's alone), in half and bfloat16, at every width."""
    outputs = []
    for bits in mqo.affine.AFFINE_BITS:
        w_q, scales, biases = mqo.quantize(mx.zeros((40, 128), mx.float16), bits=bits)
        outputs += [
            mqo.quantized_matmul(
                mx.zeros((rows, 128), dtype),
                w_q,
                scales.astype(dtype),
                biases.astype(dtype),
                bits=bits,
            )
            for dtype in (mx.float16, mx.bfloat16)
            for rows in (128, 256)
        ]
    return outputs


def exercise_affine():
    # Every bit width at group 64 in half (all kernels), every dtype and
    # group size at 4 bits, and the decode kernel's x-row variants: the
    # template axes each kernel has, without the full cross product (which
    # would take nvcc minutes).
    outputs = []
    for bits in mqo.affine.AFFINE_BITS:
        outputs += _affine_calls(mx.float16, bits, 64)
        outputs += _affine_calls(mx.float32, bits, 64, decode_rows=(1, 5))
    for dtype in FLOATS:
        for group_size in mqo.affine.AFFINE_GROUP_SIZES:
            outputs += _affine_calls(dtype, 4, group_size, prefill=group_size == 64)
    for bits in mqo.affine.AFFINE_BITS:
        # bfloat16 decode at every width (8 bits takes another dequantizer
        # on tensor cores), with one and two n8 tiles of x rows.
        outputs += _affine_calls(mx.bfloat16, bits, 64, (1, 13))
    outputs += _affine_calls(mx.bfloat16, 4, 64, decode_rows=(2, 3, 8), prefill=False)
    outputs += _tall_prefill()
    outputs += _streamed_decodes()
    outputs += _fused_decodes()
    # A long K on a short N: the tensor-core mat-vec splits K over 8 warps
    # (K not a multiple of 8 groups, which would stream instead).
    w_q, scales, biases = mqo.quantize(mx.zeros((16, 4160), mx.float16))
    outputs.append(
        mqo.quantized_matmul(mx.zeros((1, 4160), mx.float16), w_q, scales, biases)
    )
    # One row of K past 12288 takes one-unit trips, and 16 warps for 8-bit
    # group-32 codes.
    long_k = (mqo.affine._QMV_MMA_LONG_K // 128 + 1) * 128
    for bits, group_size in ((5, 64), (8, 32)):
        packed = mqo.quantize(mx.zeros((16, long_k), mx.float16), group_size, bits)
        x = mx.zeros((1, long_k), mx.float16)
        outputs.append(mqo.quantized_matmul(x, *packed, True, group_size, bits))
    # One 8-bit row on 8 warps takes one-unit trips at any K; more rows of
    # the long K split it over 8 warps below 8 bits.
    packed = mqo.quantize(mx.zeros((16, 4096), mx.float16), 32, 8)
    x = mx.zeros((1, 4096), mx.float16)
    outputs.append(mqo.quantized_matmul(x, *packed, True, 32, 8))
    packed = mqo.quantize(mx.zeros((16, long_k), mx.float16), 64, 5)
    x = mx.zeros((5, long_k), mx.float16)
    outputs.append(mqo.quantized_matmul(x, *packed, True, 64, 5))
    return outputs


def _fused_decodes():
    # The fused mat-vecs of two and three weights (rows of each not a
    # whole tile) at every width in half, and at 4 and 8 bits in bfloat16,
    # with one and two n8 tiles of x rows.
    outputs = []
    for dtype, widths in ((mx.float16, mqo.affine.AFFINE_BITS), (mx.bfloat16, (4, 8))):
        for bits in widths:
            weights = [
                mqo.quantize(mx.zeros((n, 128), dtype), 64, bits) for n in (40, 24, 8)
            ]
            for count in (2, 3):
                for rows in (1, 13):
                    x = mx.zeros((rows, 128), dtype)
                    outputs += mqo.fused_quantized_matmul(x, weights[:count], 64, bits)
    return outputs


def _streamed_decodes():
    # The streamed mat-vec at every width in both half types, x staged in
    # shared memory (one row) and not (13 rows): the kernel runs more cases
    # than the dispatcher gives it, and the tests run them all. A staged
    # row of K = 2048 gets its pair-order copy beside the stages (XP = 1);
    # one of K = 8192 leaves no room and is rewritten in place (XP = 0).
    outputs = []
    mqo._kernels.clear_plans()  # before and after: plans follow the rule
    with mock.patch.multiple(mqo.affine, **stream_everything()):
        for dtype in (mx.float16, mx.bfloat16):
            for bits in mqo.affine.AFFINE_BITS:
                for k, row_counts in ((2048, (1, 13)), (8192, (1,))):
                    w_q, scales, biases = mqo.quantize(
                        mx.zeros((16, k), dtype), 64, bits
                    )
                    for rows in row_counts:
                        x = mx.zeros((rows, k), dtype)
                        outputs.append(
                            mqo.quantized_matmul(x, w_q, scales, biases, bits=bits)
                        )
    mqo._kernels.clear_plans()
    return outputs


def exercise_affine_pre_hopper():
    # On a GPU without wgmma (sm_80, sm_89, sm_100) the prefill tile of the
    # whole-word widths is the mma.sync one, which an H100 never builds.
    outputs = []
    for dtype in (mx.float16, mx.bfloat16):
        for bits in mqo.affine.AFFINE_BITS:
            outputs += _affine_calls(dtype, bits, 64, decode_rows=())
    return outputs + _tall_prefill()


#: family name -> (a function calling that family's public ops so that every
#: kernel and template instantiation it can build gets launched once, the GPU
#: architecture the ops see while it runs).
EXERCISES = {
    "gguf": (exercise_gguf, HOPPER),
    "affine": (exercise_affine, HOPPER),
    "affine_pre_hopper": (exercise_affine_pre_hopper, "sm_80"),
}


def _record(family):
    exercise, architecture = EXERCISES[family]
    return record_launches(exercise, architecture)


@pytest.fixture(scope="module")
def nvcc():
    path = nvcc_path()
    if path is None:
        pytest.skip("nvcc is not installed")
    return path


def _definitions(family):
    launches = _record(family)
    assert launches, f"{family}: the exercise launched no kernel on the cuda path"
    return group_by_definition(launches)


@pytest.mark.parametrize("family", sorted(EXERCISES))
def test_kernels_compile_for_cuda(family, nvcc):
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        for definition, launches in _definitions(family).items():
            result = compile_unit(
                translation_unit(launches), Path(tmp), definition.name
            )
            if result.returncode != 0:
                failures.append(f"--- {definition.name}\n{result.stderr[-4000:]}")
    assert not failures, "nvcc rejected:\n" + "\n".join(failures)


def test_recorder_sees_every_gguf_kernel():
    # Guards the harness itself: if recording silently caught nothing (say,
    # the ops stopped reaching the kernel path), the compile test would pass
    # vacuously.
    names = {d.name for d in _definitions("gguf")}
    assert names == {
        "gguf_quantize_block32",
        "gguf_dequantize_block32",
        "gguf_qdq_block32",
    }


def _widths(definitions, name):
    """The bit widths the recorded launches of kernel ``name`` were built for."""
    return {
        dict(launch.template)["bits"]
        for definition, launches in definitions.items()
        if definition.name == name
        for launch in launches
    }


def test_recorder_sees_every_affine_kernel():
    definitions = _definitions("affine")
    names = {d.name for d in definitions}
    # A Hopper GPU takes every width's prefill on the wgmma tile; the
    # mma.sync one is for other GPUs (the pre-Hopper exercise below).
    assert names == {
        "affine_quantize",
        "affine_dequantize",
        "affine_qmv",
        "affine_qmv_mma",
        "affine_qmv_stream",
        "affine_qmm",
        "affine_qmm_n",
        "affine_qmm_wgmma",
        "affine_qmv_mma_pair",
        "affine_qmv_mma_triple",
    }
    assert _widths(definitions, "affine_qmm_wgmma") == set(mqo.affine.AFFINE_BITS)
    for fused in ("affine_qmv_mma_pair", "affine_qmv_mma_triple"):
        assert _widths(definitions, fused) == set(mqo.affine.AFFINE_BITS)


def test_recorder_sees_the_pre_hopper_prefill_tile():
    definitions = _definitions("affine_pre_hopper")
    assert "affine_qmm_wgmma" not in {d.name for d in definitions}
    assert _widths(definitions, "affine_qmm_mma") == set(mqo.affine.AFFINE_BITS)


def test_compile_catches_a_broken_body(nvcc):
    launches = _record("gguf")
    broken = launches[0]
    source = translation_unit([broken]).replace(
        broken.kernel.source, broken.kernel.source + "\nthis_is_not_cuda;\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        result = compile_unit(source, Path(tmp), "broken")
    assert result.returncode != 0
