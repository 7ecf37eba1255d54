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

import mlx.core as mx
import pytest
from cuda_compile import (
    compile_unit,
    group_by_definition,
    nvcc_path,
    record_launches,
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


#: family name -> a function calling that family's public ops so that every
#: kernel and template instantiation it can build gets launched once.
EXERCISES = {
    "gguf": exercise_gguf,
}


@pytest.fixture(scope="module")
def nvcc():
    path = nvcc_path()
    if path is None:
        pytest.skip("nvcc is not installed")
    return path


def _definitions(family):
    launches = record_launches(EXERCISES[family])
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


def test_compile_catches_a_broken_body(nvcc):
    launches = record_launches(EXERCISES["gguf"])
    broken = launches[0]
    source = translation_unit([broken]).replace(
        broken.kernel.source, broken.kernel.source + "\nthis_is_not_cuda;\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        result = compile_unit(source, Path(tmp), "broken")
    assert result.returncode != 0
