"""Which path an op runs on: ``metal``, ``cuda`` or ``reference``.

The path follows the device of the stream an op runs on: a GPU stream runs
the kernel path of the GPU backend MLX was built with, a CPU stream runs the
pure-``mx`` reference path. The environment variable ``MLX_QUANT_OPS_BACKEND``
and the :func:`use_backend` context manager override that choice; an unknown
name, or a GPU backend this MLX build cannot run, is an error rather than a
silent fallback.
"""

import contextlib
import contextvars
import ctypes
import functools
import os
from typing import Callable, Iterator, Optional, Union

import mlx.core as mx

BACKENDS = ("metal", "cuda", "reference")
ENV_VAR = "MLX_QUANT_OPS_BACKEND"

_override: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar(
    "mlx_quant_ops_backend", default=None
)

StreamLike = Union[None, mx.Stream, mx.Device]


def gpu_backend() -> Optional[str]:
    """The GPU backend this MLX build can run, or ``None`` where it has none."""
    if mx.metal.is_available():
        return "metal"
    if mx.cuda.is_available():
        return "cuda"
    return None


@functools.lru_cache(maxsize=None)
def gpu_architecture() -> str:
    """The GPU's architecture as MLX reports it, e.g. ``"sm_90"`` on an H100
    or H200; ``""`` where MLX names none (no GPU, or a backend that does not
    say). Kernels that need one architecture's instructions (wgmma) ask this.
    """
    return str(mx.device_info(mx.gpu).get("architecture", ""))


# What the CUDA driver is asked when MLX does not say (see gpu_multiprocessors).
_CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT = 16
_ASSUMED_MULTIPROCESSORS = 132  # an H100 SXM or H200


@functools.lru_cache(maxsize=None)
def gpu_multiprocessors() -> int:
    """Streaming multiprocessors of the CUDA GPU MLX runs on (device 0), for
    kernels that launch one block per SM and loop. MLX's device_info does
    not list them, so the driver library is asked directly; where that
    fails, an H100's count (a persistent grid is correct with any count,
    only its balance suffers).
    """
    try:
        driver = ctypes.CDLL("libcuda.so.1")
        device, count = ctypes.c_int(), ctypes.c_int()
        ok = (
            driver.cuInit(0) == 0
            and driver.cuDeviceGet(ctypes.byref(device), 0) == 0
            and driver.cuDeviceGetAttribute(
                ctypes.byref(count),
                _CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
                device,
            )
            == 0
        )
    except OSError:
        ok = False
    return count.value if ok and count.value > 0 else _ASSUMED_MULTIPROCESSORS


def _check_name(name: str, where: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(
            f"[mlx_quant_ops] {where}: expected one of {', '.join(BACKENDS)}, "
            f"got {name!r}."
        )
    name = name.lower()
    if name != "reference" and gpu_backend() != name:
        usable = ", ".join(repr(n) for n in ("reference", gpu_backend()) if n)
        raise ValueError(
            f"[mlx_quant_ops] {where}: backend {name!r} is not available in this "
            f"MLX build; usable here: {usable}."
        )
    return name


@functools.lru_cache(maxsize=None)
def _environment_choice() -> Optional[str]:
    # Read on the first op, then kept, as MLX reads its own MLX_* variables:
    # an environment lookup costs a microsecond, on every op of every token.
    env = os.environ.get(ENV_VAR)
    if env:
        return _check_name(env, f"environment variable {ENV_VAR}")
    return None


def _requested() -> Optional[str]:
    name = _override.get()
    if name is not None:
        return name
    return _environment_choice()


def override() -> Optional[str]:
    """The path :func:`use_backend` forces here, if any (part of every
    planned call's key)."""
    return _override.get()


def _device_of(stream: StreamLike) -> mx.Device:
    if stream is None:
        return mx.default_device()
    if isinstance(stream, mx.Stream):
        return stream.device
    return stream


def backend(stream: StreamLike = None) -> str:
    """The path an op on ``stream`` runs on now.

    Args:
        stream (mlx.core.Stream or mlx.core.Device, optional): the stream or
            device the op would run on. Default: the default device.

    Returns:
        str: ``"metal"``, ``"cuda"`` or ``"reference"``.
    """
    requested = _requested()
    if requested is not None:
        return requested
    if _device_of(stream) == mx.gpu:
        return gpu_backend() or "reference"
    return "reference"


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Run the ops inside the ``with`` block on the named path.

    Args:
        name (str): ``"metal"``, ``"cuda"`` or ``"reference"``.

    Yields:
        str: the backend name, lower-cased.
    """
    name = _check_name(name, "use_backend(name)")
    token = _override.set(name)
    try:
        yield name
    finally:
        _override.reset(token)


class StreamKey:
    """A stream, device or None as a cache key. MLX's streams compare equal
    by value but hash by handle, and every ``mx.default_stream`` call makes
    a new handle, so caches key on the text that names the stream instead.
    The stream itself rides along in ``.stream``."""

    __slots__ = ("stream", "_name")

    def __init__(self, stream: StreamLike):
        self.stream = stream
        self._name = None if stream is None else repr(stream)

    def __hash__(self) -> int:
        return hash(self._name)

    def __eq__(self, other) -> bool:
        return isinstance(other, StreamKey) and self._name == other._name


def stream_name(stream: StreamLike) -> str:
    """The stream an op on ``stream`` runs on, named (``None`` and a device
    mean that device's default stream now, which ``mx.stream`` blocks
    change): a key for work planned for one stream."""
    global _last_named
    if stream is None:
        stream = mx.default_stream(mx.default_device())
    elif not isinstance(stream, mx.Stream):  # a Device or DeviceType
        stream = mx.default_stream(stream)
    # Naming a stream costs a microsecond; comparing two, a tenth of that,
    # and an op's stream is nearly always the one the last op named.
    last, name = _last_named
    if last is None or stream != last:
        name = repr(stream)
        _last_named = (stream, name)
    return name


_last_named = (None, "")


def kernel_stream(stream: StreamLike) -> mx.Stream:
    """The stream a kernel launch goes to: ``stream`` when it is on the GPU,
    else the default GPU stream (a GPU path forced on a CPU stream)."""
    if isinstance(stream, mx.Stream) and stream.device == mx.gpu:
        return stream
    if isinstance(stream, mx.Device) and stream == mx.gpu:
        return mx.default_stream(stream)
    if stream is None and mx.default_device() == mx.gpu:
        return mx.default_stream(mx.default_device())
    return mx.default_stream(mx.gpu)


def has_empty(args) -> bool:
    """Whether any ``mx.array`` among ``args`` has no elements."""
    # A loop, not any() over a generator: this runs on every CPU-path call.
    for a in args:
        if type(a) is mx.array and a.size == 0:
            return True
    return False


def dispatch(
    reference: Callable[..., object],
    kernel: Callable[..., object],
    *args,
    stream: StreamLike = None,
    **kwargs,
):
    """Run ``reference`` or ``kernel`` by the path :func:`backend` picks.

    The reference runs on ``stream`` (as the default stream inside it); the
    kernel path receives ``stream=`` set to the GPU stream to launch on.
    Validation happens before this call, once, so every path sees the same
    checked arguments. A call with an empty array argument runs the
    reference on the CPU, which gives the empty result with plain ``mx``
    ops: a kernel's grid would be empty along an axis, which a GPU refuses
    to launch, and on CUDA MLX's own quantized ops and compiled kernels stop
    the process on empty arrays (MLX 0.32.4).
    """
    if has_empty(args):
        with mx.stream(mx.cpu):
            return reference(*args, **kwargs)
    if backend(stream) == "reference":
        scope = mx.stream(stream) if stream is not None else contextlib.nullcontext()
        with scope:
            return reference(*args, **kwargs)
    return kernel(*args, stream=kernel_stream(stream), **kwargs)
