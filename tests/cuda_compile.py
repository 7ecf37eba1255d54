"""Compile every kernel the CUDA path would build, without a GPU.

MLX's ``mx.fast.cuda_kernel`` wraps a body in a generated ``__global__``
function (MLX's default header, our header, the signature from the input and
output names and dtypes, the template arguments as constants) and compiles it
with NVRTC on first use. Without a GPU that never happens, so a typo in a
Metal body would first show up on the GPU machine. This module reproduces the
assembly on the host and hands it to ``nvcc``:

1. :func:`record_launches` runs ordinary public ops with the ``cuda`` path
   forced and ``mx.fast.cuda_kernel`` replaced by a recorder, so the op's own
   Python code chooses the kernels, template arguments and input dtypes, and
   returns zero outputs of the declared shapes;
2. :func:`translation_unit` writes the source MLX would generate for a group
   of recorded launches sharing one kernel definition;
3. :func:`compile_unit` runs ``nvcc`` on it for sm_90a (MLX's target on the
   H100).

The few declarations MLX's default header provides that bodies may use
(``Shape``/``Strides``) are stood in for by :data:`DEFAULT_HEADER_SHIM`; our
own header must not depend on anything else of MLX's.
"""

import contextlib
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import mlx.core as mx

import mlx_quant_ops._backend as backend_module
import mlx_quant_ops._kernels as kernels_module

MLX_MAX_NDIM = 10


def stream_everything() -> Dict[str, object]:
    """``mlx_quant_ops.affine`` settings under which the streamed mat-vec
    takes every decode it can run (all widths, any K, up to 16 rows), not
    only the cases where the dispatcher picks it for speed: patch them in
    (and clear the planned launches) to test or compile the kernel fully."""
    from mlx_quant_ops import affine

    return dict(
        _QMV_STREAM_BITS=affine.AFFINE_BITS,
        _QMV_STREAM_MIN_K=0,
        _QMV_STREAM_MAX_K=1 << 30,
        _QMV_STREAM_MAX_ROWS=16,
        _QMV_STREAM_WIDE_MAX_ROWS=16,
    )


DEFAULT_HEADER_SHIM = f"""
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda/std/array>
#include <cuda/std/limits>
#include <cooperative_groups.h>
#include <cstdint>

namespace mlx::core::cu {{
using Shape = cuda::std::array<int32_t, {MLX_MAX_NDIM}>;
using Strides = cuda::std::array<int64_t, {MLX_MAX_NDIM}>;
}}
"""

CUDA_TYPE = {
    mx.bool_: "bool",
    mx.int8: "int8_t",
    mx.int16: "int16_t",
    mx.int32: "int32_t",
    mx.int64: "int64_t",
    mx.uint8: "uint8_t",
    mx.uint16: "uint16_t",
    mx.uint32: "uint32_t",
    mx.uint64: "uint64_t",
    mx.float16: "__half",
    mx.bfloat16: "__nv_bfloat16",
    mx.float32: "float",
}


@dataclass(frozen=True)
class KernelDefinition:
    """What was passed to ``mx.fast.cuda_kernel``."""

    name: str
    input_names: Tuple[str, ...]
    output_names: Tuple[str, ...]
    source: str
    header: str


@dataclass
class Launch:
    """One call of a built kernel: everything that shapes the generated code."""

    kernel: KernelDefinition
    input_dtypes: Tuple[mx.Dtype, ...]
    input_ndims: Tuple[int, ...]
    output_dtypes: Tuple[mx.Dtype, ...]
    template: Tuple[Tuple[str, object], ...]
    grid: Tuple[int, int, int]
    threadgroup: Tuple[int, int, int]
    extra: Dict = field(default_factory=dict)

    def key(self):
        return (
            self.kernel,
            tuple(str(d) for d in self.input_dtypes),
            self.input_ndims,
            tuple(str(d) for d in self.output_dtypes),
            tuple((n, str(v)) for n, v in self.template),
        )


class _Recorder:
    def __init__(self):
        self.launches: List[Launch] = []

    def cuda_kernel(
        self,
        name,
        input_names,
        output_names,
        source,
        header="",
        ensure_row_contiguous=True,
        shared_memory=0,
    ):
        definition = KernelDefinition(
            name, tuple(input_names), tuple(output_names), source, header
        )

        def call(
            *,
            inputs,
            output_shapes,
            output_dtypes,
            grid,
            threadgroup,
            template=(),
            init_value=None,
            verbose=False,
            stream=None,
        ):
            if len(inputs) != len(input_names):
                raise AssertionError(f"{name}: {len(inputs)} inputs for {input_names}")
            self.launches.append(
                Launch(
                    definition,
                    tuple(a.dtype for a in inputs),
                    tuple(a.ndim for a in inputs),
                    tuple(output_dtypes),
                    tuple(template),
                    tuple(grid),
                    tuple(threadgroup),
                )
            )
            return [
                mx.zeros(tuple(s), dtype=d)
                for s, d in zip(output_shapes, output_dtypes)
            ]

        return call


#: The architecture recordings report by default: the H100's, which
#: :func:`compile_unit` targets (sm_90a), so Hopper-only kernels are recorded.
HOPPER = "sm_90"


@contextlib.contextmanager
def recording(architecture: str = HOPPER, forced: bool = True):
    """Force the ``cuda`` path on a GPU of ``architecture`` (as
    ``mx.device_info`` names it) and record kernel builds and launches
    instead of running them. Yields the list the launches are appended to.

    With ``forced=False`` nothing is forced: every stream reads as the
    GPU's, so ops and layers choose as they do on a CUDA machine's default
    stream (a layer's hand-over to MLX's built-in included), while MLX's
    own ops still run on the CPU."""
    recorder = _Recorder()
    saved = (
        backend_module.gpu_backend,
        backend_module.gpu_architecture,
        backend_module.kernel_stream,
        backend_module._device_of,
        mx.fast.cuda_kernel,
    )
    kernels_module._build_once.cache_clear()
    kernels_module.clear_plans()
    backend_module.gpu_backend = lambda: "cuda"
    backend_module.gpu_architecture = lambda: architecture
    backend_module.kernel_stream = lambda stream: mx.default_stream(mx.cpu)
    if not forced:
        # Every stream reads as the GPU (the kernels' own CPU stream too).
        backend_module._device_of = lambda stream: mx.gpu
    mx.fast.cuda_kernel = recorder.cuda_kernel
    try:
        force = (
            backend_module.use_backend("cuda") if forced else contextlib.nullcontext()
        )
        with force:
            yield recorder.launches
    finally:
        (
            backend_module.gpu_backend,
            backend_module.gpu_architecture,
            backend_module.kernel_stream,
            backend_module._device_of,
            mx.fast.cuda_kernel,
        ) = saved
        kernels_module._build_once.cache_clear()
        kernels_module.clear_plans()


def record_launches(
    exercise: Callable[[], object], architecture: str = HOPPER
) -> List[Launch]:
    """Run ``exercise`` (which calls public ops) on the recorded ``cuda``
    path of a GPU of ``architecture``; return the distinct launches it made."""
    with recording(architecture) as launches:
        mx.eval(exercise())
    unique = {}
    for launch in launches:
        unique.setdefault(launch.key(), launch)
    return list(unique.values())


def _template_hash(template) -> str:
    parts = []
    for _, value in template:
        if isinstance(value, bool):
            parts.append("_t" if value else "_f")
        elif isinstance(value, int):
            parts.append(f"_{value}")
        else:
            parts.append("_" + str(value).replace("mlx.core.", ""))
    return "".join(parts)


def _kernel_function(launch: Launch, index: int) -> str:
    """The ``__global__`` function MLX's ``build_kernel`` generates for one
    launch (named uniquely within a translation unit)."""
    k = launch.kernel
    name = f"custom_kernel_{k.name}{_template_hash(launch.template)}_{index}"
    params = []
    for arg, dtype, ndim in zip(k.input_names, launch.input_dtypes, launch.input_ndims):
        params.append(f"    const {CUDA_TYPE[dtype]}* {arg}")
        if ndim > 0:
            if f"{arg}_shape" in k.source:
                params.append(f"    const __grid_constant__ Shape {arg}_shape")
            if f"{arg}_strides" in k.source:
                params.append(f"    const __grid_constant__ Strides {arg}_strides")
            if f"{arg}_ndim" in k.source:
                params.append(f"    const __grid_constant__ int {arg}_ndim")
    for arg, dtype in zip(k.output_names, launch.output_dtypes):
        params.append(f"    {CUDA_TYPE[dtype]}* {arg}")
    constants = []
    for arg, value in launch.template:
        if isinstance(value, bool):
            constants.append(f"  constexpr bool {arg} = {str(value).lower()};")
        elif isinstance(value, int):
            constants.append(f"  constexpr int {arg} = {value};")
        else:
            constants.append(f"  using {arg} = {CUDA_TYPE[value]};")
    return (
        "namespace mlx::core::cu {\n\n"
        "namespace cg = cooperative_groups;\n\n"
        f"__global__ void {name}(\n"
        + ",\n".join(params)
        + ") {\n"
        + "\n".join(constants)
        + "\n\n"
        + k.source
        + "\n}\n\n} // namespace mlx::core::cu\n"
    )


def translation_unit(launches: List[Launch]) -> str:
    """One source file for launches that share a kernel definition: MLX's
    default header (stood in for), our header once, then one generated
    kernel function per launch."""
    header = launches[0].kernel.header
    assert all(l.kernel.header == header for l in launches)
    functions = [_kernel_function(l, i) for i, l in enumerate(launches)]
    return DEFAULT_HEADER_SHIM + header + "\n" + "\n".join(functions)


def nvcc_path():
    """``nvcc`` on PATH or in the usual CUDA location, else ``None``."""
    found = shutil.which("nvcc")
    if found:
        return found
    for candidate in ("/usr/local/cuda/bin/nvcc", "/usr/local/bin/nvcc"):
        if Path(candidate).exists():
            return candidate
    return None


def compile_unit(source: str, workdir: Path, stem: str) -> subprocess.CompletedProcess:
    """Compile ``source`` for sm_90a to a cubin with ``nvcc``; the result's
    ``returncode`` and ``stderr`` tell whether it built."""
    path = workdir / f"{stem}.cu"
    path.write_text(source)
    return subprocess.run(
        [
            nvcc_path(),
            "-std=c++17",
            "-arch=sm_90a",
            "-cubin",
            "-w",
            "-o",
            str(workdir / f"{stem}.cubin"),
            str(path),
        ],
        capture_output=True,
        text=True,
    )


def group_by_definition(launches: List[Launch]) -> Dict[KernelDefinition, List[Launch]]:
    groups: Dict[KernelDefinition, List[Launch]] = {}
    for launch in launches:
        groups.setdefault(launch.kernel, []).append(launch)
    return groups
