"""Load kernel sources from ``kernels/`` and build them once per backend.

Every kernel is a Metal body in ``kernels/<name>.metal``. On Apple silicon it
is registered with ``mx.fast.metal_kernel``; on NVIDIA the very same body is
registered with ``mx.fast.cuda_kernel`` behind ``kernels/metal_compat.cuh``,
which maps Metal's vocabulary onto CUDA. Helpers shared by several bodies
live in family headers (``kernels/*.h``) written in the Metal dialect too.

A kernel object is built once per (kernel, backend) and cached; MLX compiles
one instantiation per template argument list (dtype, bits, group size...) and
caches that itself. Sizes such as N and K are runtime inputs, never template
arguments, so a model needs a handful of instantiations, not one per shape.
"""

import contextlib
import contextvars
import functools
import hashlib
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import mlx.core as mx

from . import _validate as check
from ._backend import StreamLike
from ._backend import _override as _forced_path
from ._backend import backend, has_empty, override, stream_name

# When set, every launch pre-fills its outputs with this value (NaN for
# floats) so an element a kernel fails to write shows up in tests instead of
# passing with whatever the allocator left there.
_poison: contextvars.ContextVar = contextvars.ContextVar("mqo_poison", default=None)

# The prelude each dialect starts with; family headers follow it. A
# CUDA-only body needs only the core of the dialect mapping (see
# kernels/metal_compat_core.cuh).
DIALECT_PRELUDE = {
    "metal": ("metal_prelude.h",),
    "cuda": ("metal_compat_core.cuh", "metal_compat.cuh"),
}
CUDA_ONLY_PRELUDE = ("metal_compat_core.cuh",)


@functools.lru_cache(maxsize=None)
def kernel_dir() -> Path:
    """The folder holding the kernel sources.

    An installed package ships them as ``mlx_quant_ops.kernels``; a source
    checkout on ``PYTHONPATH`` without installing has them at the top of the
    repository.
    """
    spec = importlib.util.find_spec("mlx_quant_ops.kernels")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(__file__).resolve().parent.parent / "kernels"


@functools.lru_cache(maxsize=None)
def read_source(filename: str) -> str:
    """The text of one file in :func:`kernel_dir`, read once."""
    return (kernel_dir() / filename).read_text()


_LINE_COMMENT = re.compile(r"//.*")


def compact(source: str) -> str:
    """``source`` without comments, indentation, blank lines or repeated
    spaces: the text MLX is handed.

    MLX hashes a custom kernel's whole source on every launch to find its
    compiled module (cost measured in :meth:`KernelSpec.cuda_include_source`),
    so the inline fallback hands it no more text than it needs. Our kernels
    have no string literal containing ``//``, so a line comment is
    everything from ``//`` on; preprocessor lines keep their spacing.
    """
    lines = []
    for line in source.splitlines():
        line = _LINE_COMMENT.sub("", line).strip()
        if line:
            lines.append(line if line.startswith("#") else " ".join(line.split()))
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class KernelSpec:
    """One kernel: its body file, argument names and the headers it needs.

    Attributes:
        name: the kernel's name; its body is ``kernels/<name>.metal``.
        inputs: input argument names, in call order.
        outputs: output argument names, in call order.
        headers: family headers (in ``kernels/``) the body uses, in order.
        body_file: the body's file name in ``kernels/``, where it is not
            ``<name>.metal`` (a CUDA-only body is ``<name>.cu``).
        dialects: the paths that can build it; a CUDA-only variant (say, a
            tensor-core kernel) lists ``("cuda",)`` and the op must not pick
            it elsewhere.
        shared_memory: bytes of dynamic shared memory a CUDA launch gets
            (``extern __shared__``; MLX lifts the 48 KB default above it).
    """

    name: str
    inputs: Tuple[str, ...]
    outputs: Tuple[str, ...]
    headers: Tuple[str, ...] = ("common.h",)
    body_file: str = ""
    dialects: Tuple[str, ...] = ("metal", "cuda")
    shared_memory: int = 0

    def header_text(self, dialect: str) -> str:
        """The prelude and family headers as one compacted text."""
        parts = [read_source(h) for h in self.files(dialect)[:-1]]
        return compact("\n".join(parts))

    def body(self) -> str:
        return compact(read_source(self.body_filename))

    @property
    def body_filename(self) -> str:
        return self.body_file or f"{self.name}.metal"

    def files(self, dialect: str) -> Tuple[str, ...]:
        """Every file of the kernel's text, in order: prelude, headers, body."""
        cuda_only = self.dialects == ("cuda",)
        prelude = CUDA_ONLY_PRELUDE if cuda_only else DIALECT_PRELUDE[dialect]
        return (*prelude, *self.headers, self.body_filename)

    def cuda_include_source(self) -> Optional[Tuple[str, str]]:
        """``(header, body)`` for ``mx.fast.cuda_kernel`` as ``#include``
        lines naming the installed files, or ``None`` where their folder's
        path cannot be spelled inside an include.

        MLX hashes the whole kernel text on every launch (about 0.65 µs per
        KB on the H100 host, 8 µs for a 12 KB tensor-core kernel, more than
        the kernel runs on small shapes). NVRTC reads included files itself,
        so the hashed text shrinks to a few lines. A digest of the files'
        contents leads the header: MLX keys its compiled-module cache (in
        memory and on disk) by the text, so an edited file must change it.
        """
        folder = str(kernel_dir())
        if not folder.startswith("/") or any(c in folder for c in '"\\\n\r'):
            return None
        names = self.files("cuda")
        digest = hashlib.sha256()
        for name in names:
            digest.update(read_source(name).encode())
        lines = [f'#include "{folder}/{name}"' for name in names]
        header = f"// mlx_quant_ops {digest.hexdigest()[:16]}\n" + "\n".join(lines[:-1])
        return header + "\n", lines[-1] + "\n"


# CUDA kernels are handed to MLX as #include lines (see
# KernelSpec.cuda_include_source); tests switch this off to check the
# inline text compiles the same kernels.
CUDA_INCLUDES: contextvars.ContextVar = contextvars.ContextVar(
    "mqo_cuda_includes", default=True
)


def _build(spec: KernelSpec, dialect: str):
    return _build_once(spec, dialect, CUDA_INCLUDES.get())


@functools.lru_cache(maxsize=None)
def _build_once(spec: KernelSpec, dialect: str, includes: bool):
    if dialect not in spec.dialects:
        raise AssertionError(f"{spec.name} has no {dialect} body ({spec.dialects})")
    if dialect == "metal":
        return mx.fast.metal_kernel(
            name=spec.name,
            input_names=list(spec.inputs),
            output_names=list(spec.outputs),
            source=spec.body(),
            header=spec.header_text("metal"),
        )
    included = spec.cuda_include_source() if includes else None
    header, body = included or (spec.header_text("cuda"), spec.body())
    return mx.fast.cuda_kernel(
        name=spec.name,
        input_names=list(spec.inputs),
        output_names=list(spec.outputs),
        source=body,
        header=header,
        shared_memory=spec.shared_memory,
    )


class Launcher:
    """One kernel launch with everything but its per-call arrays fixed: the
    kernel, its template arguments, grid and output shapes, and constant
    input tables (sizes, slots) that follow the per-call arrays.

    An op builds one per shape through a :func:`plan_cache` function and
    calls it with the arrays; per call that is one MLX kernel call, with no
    Python deciding anew what the shape already decided (mlx-lm builds a
    decode step's graph on the host, op by op, every token).

    ``grid`` counts threads (Metal's convention) and must be a whole number
    of threadgroups in each dimension, so Metal and CUDA launch the same
    threads; kernels bounds-check inside.
    """

    __slots__ = ("spec", "dialect", "constants", "init_value", "kwargs")

    def __init__(
        self,
        spec: KernelSpec,
        constants: Sequence[mx.array] = (),
        *,
        template: Sequence[Tuple[str, object]],
        grid: Tuple[int, int, int],
        threadgroup: Tuple[int, int, int],
        output_shapes: Sequence[Sequence[int]],
        output_dtypes: Sequence[mx.Dtype],
        stream: mx.Stream,
        init_value=None,
    ):
        for g, t in zip(grid, threadgroup):
            if g % t:
                raise AssertionError(
                    f"{spec.name}: grid {grid} is not a whole number of "
                    f"threadgroups {threadgroup}"
                )
        self.spec = spec
        self.dialect = backend(stream)
        self.constants = tuple(constants)
        self.init_value = init_value
        self.kwargs = dict(
            template=list(template),
            grid=tuple(grid),
            threadgroup=tuple(threadgroup),
            output_shapes=[tuple(s) for s in output_shapes],
            output_dtypes=list(output_dtypes),
            stream=stream,
        )

    def __call__(self, *arrays: mx.array) -> List[mx.array]:
        """The kernel's outputs for ``arrays`` (then the constants) as inputs."""
        kwargs = self.kwargs
        init_value = self.init_value
        if init_value is None:
            init_value = _poison.get()
        if init_value is not None:
            kwargs = {**kwargs, "init_value": init_value}
        # Built (or found) per call, not kept: tests swap the CUDA compiler
        # for a recorder and clear _build_once's cache.
        kernel = _build(self.spec, self.dialect)
        return kernel(inputs=[*arrays, *self.constants], **kwargs)


def launch(spec: KernelSpec, inputs: Sequence[mx.array], **options) -> List[mx.array]:
    """Launch ``spec`` on ``inputs`` once (see :class:`Launcher` for the
    options): for paths whose inputs are built per call anyway.

    Returns:
        list[mlx.core.array]: the outputs.
    """
    return Launcher(spec, **options)(*inputs)


_PLAN_CACHES: List = []


def plan_cache(function):
    """``functools.lru_cache`` for a function of shapes and options (never
    of array values) that plans a launch, registered so that
    :func:`clear_plans` empties every such cache at once."""
    cached = functools.lru_cache(maxsize=1024)(function)
    _PLAN_CACHES.append(cached)
    return cached


def clear_plans() -> None:
    """Forget every planned launch and planned call (:class:`CallPlans`).
    Plans follow the dispatch rules and tunables of the moment they were
    made; a test that changes those (or the GPU the ops believe they run
    on) clears them first. A :class:`LayerReplay` kept before then no
    longer matches (see :func:`plan_context`)."""
    global _plan_generation
    _plan_generation += 1
    for cached in _PLAN_CACHES:
        cached.cache_clear()


_plan_generation = 0  # how many times clear_plans ran


# Signatures a CallPlans keeps before starting afresh (a model has a few
# dozen; a server meeting many prompt lengths has more, each a few KB).
_CALL_PLAN_ENTRIES = 2048


class CallPlans:
    """A public op's calls, planned once per call signature.

    mlx-lm builds each decode step's graph on the host, op by op, every
    token, and MLX's built-in ``quantized_matmul`` spends about a
    microsecond there. Running our checks, dispatch, custom function and
    kernel call in Python each time cost 30-50 µs on the H100's host, which
    left a patched model host-bound at a third of MLX's tokens per second.

    So the first call of a signature (the arrays' shapes and dtypes, the
    options' types and values, the stream, the forced path and the testing
    switches) checks its arguments and makes a function of the arrays; on a
    GPU path that function goes through ``mx.compile``, so later calls
    replay its traced graph (custom function and kernels, gradients
    included) without running this package's Python again. The reference
    path runs its function as is. A call whose arguments cannot be keyed (a
    list, a NumPy array) is checked afresh, and fails there.
    """

    __slots__ = ("_plans",)

    def __init__(self):
        self._plans = {}
        _PLAN_CACHES.append(self)

    def cache_clear(self) -> None:
        self._plans.clear()

    def __call__(
        self,
        make: Callable,
        stream: StreamLike,
        arrays: Tuple[Optional[mx.array], ...],
        options: tuple,
    ):
        """``make(stream, *arrays, *options)(*arrays)``, with the function
        ``make`` returns kept for the next call of the same signature.

        Args:
            make: checks the arguments (raising as the op documents) and
                returns a function of ``arrays`` computing the op.
            stream: the op's ``stream`` argument.
            arrays: the op's array arguments (``None`` where omitted).
            options: the op's other arguments.

        Returns:
            What the op returns.
        """
        return self.plan(make, stream, arrays, options)[0](*arrays)

    def call(
        self,
        make: Callable,
        stream: StreamLike,
        arrays: Tuple[Optional[mx.array], ...],
        options: tuple,
    ) -> Tuple[object, Optional[Callable]]:
        """As calling the CallPlans, and also the planned function of
        ``arrays`` that computed the result (``None`` for a call that cannot
        be keyed), for a caller that keeps its own :class:`LayerReplay`."""
        run, kept = self.plan(make, stream, arrays, options)
        return run(*arrays), run if kept else None

    def plan(
        self,
        make: Callable,
        stream: StreamLike,
        arrays: Tuple[Optional[mx.array], ...],
        options: tuple,
    ) -> Tuple[Callable, bool]:
        """The planned function of ``arrays`` for this call, not yet run:
        the kept one for its signature, else ``make``'s (which checks the
        arguments first). For a layer that may hand the call to another
        library's op instead, so that our kernel's graph is neither built
        nor traced for a call it does not run.

        Returns:
            tuple: the function, and whether it is kept (False for a call
            that cannot be keyed: a layer must not keep it either).
        """
        key = check.signature(arrays, options)
        if key is not None:
            key = (plan_context(stream), key)
            run = self._plans.get(key)
            if run is not None:
                return run, True
        run = make(stream, *arrays, *options)
        # Not a call with an empty array: compiled element-wise kernels stop
        # the process on one on CUDA (SIGFPE, MLX 0.32.4).
        if backend(stream) != "reference" and not has_empty(arrays):
            run = mx.compile(run)
        if key is None:
            return run, False
        if len(self._plans) >= _CALL_PLAN_ENTRIES:
            self._plans.clear()
        self._plans[key] = run
        return run, True


def plan_context(stream: StreamLike) -> tuple:
    """What a planned call depends on besides its arguments: the stream it
    runs on (by name: ``None`` follows ``mx.stream`` blocks), the path
    :func:`use_backend` forces, the testing switches, and how many times
    :func:`clear_plans` ran."""
    return (stream_name(stream), *_switches())


class LayerReplay:
    """A layer's last planned call, kept so that the layer's next call with
    the same arrays and an input of the same shape and dtype runs the
    planned function at once.

    mlx-lm calls every projection of every layer once a token, and builds
    the step's graph on the host, so the Python between a layer's call and
    its op counts: on an H200's host our layer's calls took 1.4x (handed to
    MLX's built-in) to 3.7x (our kernel) the time of MLX's own layer's
    (README), and nested Python calls and checks were much of the excess.
    So a layer keeps this record after a call that went through the op's
    :class:`CallPlans`, and its next call goes through one method,
    :meth:`replay`, that compares everything the plan rests on in one
    expression and runs the planned function:

    - the input's (and an MoE layer's expert indices') shape and dtype;
    - the layer's arrays and options, by identity: a layer passes the same
      objects every time, Python keeps one object per small int, bool and
      literal string (so ``1`` never passes for ``True``), and equal
      objects that are not the same only cost a trip through the plans;
    - the forced path and the testing switches by identity, and the plan
      generation (see :func:`plan_context`);
    - the default device, since a CPU call takes the reference path.

    The default stream is not compared: a GPU plan for ``stream=None`` goes
    through ``mx.compile``, which traces again on another default stream,
    and the reference path's function reads the stream as it runs.

    The record holds the layer's arrays, so the layer drops it when one of
    them is replaced (see ``mlx_quant_ops.nn``). A call handed to another
    library's op keeps a :class:`HandedOverReplay` instead.
    """

    __slots__ = (
        "run",
        "x_shape",
        "x_dtype",
        "indices_shape",
        "indices_dtype",
        "weight",
        "scales",
        "biases",
        "group_size",
        "bits",
        "flag",
        "forced_path",
        "poison",
        "includes",
        "generation",
        "device",
    )

    def __init__(
        self, run, x, weight, scales, biases, group_size, bits, indices=None, flag=None
    ):
        """Keep ``run``, planned for these arguments on the default stream.

        Args:
            run (callable): the planned function of ``(x, weight, scales,
                biases)``, or for an MoE layer of ``(x, weight, scales,
                biases, lhs_indices, rhs_indices)``.
            x (mlx.core.array): the input the call was planned for.
            weight, scales, biases (mlx.core.array): the layer's arrays.
            group_size, bits (int): the layer's options.
            indices (mlx.core.array, optional): an MoE layer's expert
                indices (None for a linear layer).
            flag (bool, optional): an MoE layer's ``sorted_indices``.
        """
        self.run = run
        self.x_shape, self.x_dtype = x.shape, x.dtype
        if indices is None:
            self.indices_shape = self.indices_dtype = None
        else:
            self.indices_shape, self.indices_dtype = indices.shape, indices.dtype
        self.weight, self.scales, self.biases = weight, scales, biases
        self.group_size, self.bits, self.flag = group_size, bits, flag
        self.forced_path = _forced_path.get()
        self.poison = _poison.get()
        self.includes = CUDA_INCLUDES.get()
        self.generation = _plan_generation
        self.device = mx.default_device()

    def replay(
        self, x, weight, scales, biases, group_size, bits, indices=None, flag=None
    ) -> Optional[mx.array]:
        """The kept function's output for these arguments (as for the
        constructor), if it was planned for a call like this one; else None
        (plan the call then).

        One expression with no nested Python calls before the run: it runs
        for every layer of every decoded token.
        """
        if (
            type(x) is mx.array
            and x.shape == self.x_shape
            and x.dtype == self.x_dtype
            and weight is self.weight
            and scales is self.scales
            and biases is self.biases
            and group_size is self.group_size
            and bits is self.bits
            and flag is self.flag
            and (
                indices is None
                if self.indices_shape is None
                else type(indices) is mx.array
                and indices.shape == self.indices_shape
                and indices.dtype == self.indices_dtype
            )
            and _forced_path.get() is self.forced_path
            and _poison.get() is self.poison
            and CUDA_INCLUDES.get() is self.includes
            and _plan_generation == self.generation
            and mx.default_device() == self.device
        ):
            if indices is None:
                return self.run(x, weight, scales, biases)
            return self.run(x, weight, scales, biases, None, indices)
        return None


class HandedOverReplay(LayerReplay):
    """A linear layer's call that its plan handed to another library's
    quantized matmul (MLX's ``mx.quantized_matmul`` for a small decode on
    CUDA), kept as :class:`LayerReplay` keeps a planned one.

    ``run`` has that op's positional signature, ``(x, w, scales, biases,
    transpose, group_size, bits)``, and is given the layer's arrays and
    options as they are at each call, so the replay compares only what the
    hand-over rests on: the input's shape and dtype (which also keep the
    op's own checks: an integer input, say, is refused by ours and taken by
    MLX's), the weight (its size) and the options, no forced path, the plan
    generation and the default device. Our kernels' testing switches and
    the scales and biases do not change MLX's op. The call runs with no
    Python frame between the layer and MLX's op. Warm, on the simulated
    CUDA path, a handed-over layer call took 1412 ns against 1547 through a
    :class:`LayerReplay` and a closure (MLX's own layer 1017): a small
    model's decode step on a fast GPU is bound by the host, and nearly all
    of its layer calls are these.

    Inside a step (a patched model's forward, see
    :func:`mlx_quant_ops.affine.step_key`) the
    layer checks less, before this method: the step's key, the weight and
    the input's size. The step has checked the path, the forced path and
    the plan generation once for all its calls. The input's shape and
    dtype are left to MLX's op, as they are for MLX's own layer: inside a
    model an input is an activation of the model's own width and float
    type. That brings a handed-over call to the cost of MLX's layer (1273
    against 1262 ns, against 1706 through this method, development CPU,
    2026-12-05).
    """

    __slots__ = ("step", "x_size")

    def __init__(self, run, x, weight, scales, biases, group_size, bits):
        """As :class:`LayerReplay`'s, for a linear layer; also keeps the
        key of the steps that may run it with fewer checks (see
        :func:`mlx_quant_ops.affine.step_key`) and the input's size."""
        super().__init__(run, x, weight, scales, biases, group_size, bits)
        # Plus one: never the 0 that reads outside every step.
        self.step = _plan_generation + 1
        self.x_size = x.size

    def replay(
        self, x, weight, scales, biases, group_size, bits, indices=None, flag=None
    ) -> Optional[mx.array]:
        """As :meth:`LayerReplay.replay`, for a linear layer (no indices)."""
        # LayerReplay.replay's comparisons, less those that cannot change
        # MLX's op (kept apart: a shared helper would put a Python call on
        # the hot path these two exist to keep short).
        if (
            type(x) is mx.array
            and x.shape == self.x_shape
            and x.dtype == self.x_dtype
            and weight is self.weight
            and group_size is self.group_size
            and bits is self.bits
            and indices is None
            and _forced_path.get() is None
            and _plan_generation == self.generation
            and mx.default_device() == self.device
        ):
            return self.run(x, weight, scales, biases, True, group_size, bits)
        return None


# A patched model's forward runs as one step (mlx_quant_ops.nn.patch): as it
# starts, it works out what every handed-over layer call inside it would
# otherwise check for itself (the path of the default stream, no forced
# path, the plan generation), and publishes the answer here as a key
# (mlx_quant_ops.affine.step_key), for the calls to compare with their
# replay's key in one comparison.
_step: contextvars.ContextVar = contextvars.ContextVar("mqo_step", default=0)


def _switches() -> tuple:
    """What :func:`plan_context` holds besides the stream: the forced path,
    the testing switches and the plan generation (none of them arrays, so
    tuples of them compare by equality). :class:`LayerReplay` records and
    compares the same four values one by one (no tuple built on its hot
    path): a switch added here belongs there too, and in
    :class:`HandedOverReplay` where it concerns MLX's op."""
    return (override(), _poison.get(), CUDA_INCLUDES.get(), _plan_generation)


@contextlib.contextmanager
def poison_outputs(value: float = float("nan")):
    """Inside the block, kernels start from outputs filled with ``value``
    (a testing aid: unwritten elements then fail comparisons). Kernels that
    pass their own ``init_value`` keep it."""
    token = _poison.set(value)
    try:
        yield
    finally:
        _poison.reset(token)


def ceil_to(value: int, multiple: int) -> int:
    """``value`` rounded up to a multiple of ``multiple``."""
    return -(-value // multiple) * multiple


# MLX's CUDA allocator keeps arrays of 8 bytes or less in host memory that
# the GPU reads across the bus (a microsecond or more per first read, in
# every threadgroup); larger ones move to the GPU on first use and stay.
MIN_METADATA_ENTRIES = 4


def device_table(values, dtype=mx.int32) -> mx.array:
    """A small kernel-side table (sizes, slots) as an array of at least
    :data:`MIN_METADATA_ENTRIES` entries, padded with zeros; kernels read
    only the entries they are told exist."""
    values = list(values)
    values += [0] * (MIN_METADATA_ENTRIES - len(values))
    return mx.array(values, dtype=dtype)


@functools.lru_cache(maxsize=1024)
def sizes(*values: int) -> mx.array:
    """Runtime sizes (N, K, ...) for a kernel, as an int32 input array
    (padded, see :func:`device_table`), built once per value list: a fresh
    host array each call would be written by the CPU and faulted over to
    the GPU each call."""
    return device_table(values)
