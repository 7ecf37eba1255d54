"""Argument checks shared by every op.

Each check raises before anything is launched, with a message that names the
op, the argument, what was expected and what was given, e.g.::

    [mlx_quant_ops.gguf.quantize] x: expected dtype float32, float16 or
    bfloat16, got int32.

Wrong kinds of object and wrong dtypes are ``TypeError``; wrong shapes,
sizes and option values are ``ValueError``. The same checks run whatever
path the op then takes, so messages are identical on every path.
"""

import itertools
import numbers
from typing import Iterable, Optional, Sequence

import mlx.core as mx
import numpy as np

FLOAT_DTYPES = (mx.float32, mx.float16, mx.bfloat16)
INDEX_DTYPES = (mx.uint32, mx.int32)


def dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).replace("mlx.core.", "")


def _one_of(items: Sequence[str]) -> str:
    items = list(items)
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " or " + items[-1]


def fail(op: str, arg: str, expected: str, got: object, exc=ValueError):
    raise exc(f"[mlx_quant_ops.{op}] {arg}: expected {expected}, got {got}.")


def array(op: str, arg: str, x) -> mx.array:
    """``x`` itself, after checking it is an ``mx.array``."""
    if not isinstance(x, mx.array):
        fail(op, arg, "an mlx.core.array", type(x).__name__, TypeError)
    return x


def dtype(op: str, arg: str, x: mx.array, allowed: Iterable[mx.Dtype]) -> None:
    allowed = tuple(allowed)
    if x.dtype not in allowed:
        fail(
            op,
            arg,
            "dtype " + _one_of([dtype_name(d) for d in allowed]),
            dtype_name(x.dtype),
            TypeError,
        )


def ndim(op: str, arg: str, x: mx.array, at_least: int = 1, exactly=None) -> None:
    if exactly is not None and x.ndim != exactly:
        fail(op, arg, f"{exactly} dimensions", f"shape {tuple(x.shape)}")
    if x.ndim < at_least:
        fail(op, arg, f"at least {at_least} dimension(s)", f"shape {tuple(x.shape)}")


def last_axis_multiple(op: str, arg: str, x: mx.array, multiple: int, why: str):
    if x.ndim == 0 or x.shape[-1] % multiple or x.shape[-1] == 0:
        fail(
            op,
            arg,
            f"a last axis that is a positive multiple of {multiple} ({why})",
            f"shape {tuple(x.shape)}",
        )


def choice(op: str, arg: str, value, allowed: Sequence[int]) -> int:
    """An integer option that must be one of ``allowed``, as a plain
    ``int``. NumPy's integers pass, as MLX's ops take them; any other type,
    a float such as ``4.0`` included, is a ``TypeError`` (MLX's too); a
    bool is a ``ValueError`` (MLX reads ``True`` as 1, never allowed)."""
    expected = "one of " + _one_of([str(a) for a in allowed])
    if not isinstance(value, numbers.Integral):
        fail(op, arg, expected, repr(value), TypeError)
    if isinstance(value, bool) or value not in allowed:
        fail(op, arg, expected, repr(value))
    return int(value)


def float_dtype(op: str, arg: str, value) -> mx.Dtype:
    """An output dtype option: one of the float dtypes."""
    if not isinstance(value, mx.Dtype) or value not in FLOAT_DTYPES:
        fail(
            op,
            arg,
            _one_of(["mlx.core." + dtype_name(d) for d in FLOAT_DTYPES]),
            repr(value),
            TypeError,
        )
    return value


def integer_dtype(op: str, arg: str, x: mx.array) -> None:
    """Index arrays: any integer dtype, as MLX's gather ops accept."""
    if not mx.issubdtype(x.dtype, mx.integer):
        fail(op, arg, "an integer dtype", dtype_name(x.dtype), TypeError)


def broadcast_shapes(op: str, arg: str, *shapes: Sequence[int]) -> tuple:
    """The NumPy broadcast of ``shapes``; ValueError naming ``arg`` if they
    do not broadcast."""
    result = []
    for dims in itertools.zip_longest(*(reversed(tuple(s)) for s in shapes)):
        sizes = {d for d in dims if d is not None and d != 1}
        if len(sizes) > 1:
            fail(
                op,
                arg,
                "shapes that broadcast together",
                " and ".join(str(tuple(s)) for s in shapes),
            )
        result.append(sizes.pop() if sizes else 1)
    return tuple(reversed(result))


def boolean(op: str, arg: str, value) -> bool:
    if not isinstance(value, bool):
        fail(op, arg, "True or False", repr(value), TypeError)
    return value


# Options a call signature may hold as they are; anything else (lists,
# NumPy arrays, other objects, subclasses of these) makes the call unkeyable.
_PLAIN_TYPES = frozenset((int, float, bool, str, type(None), mx.Dtype))


def signature(arrays: Sequence, options: Sequence) -> Optional[tuple]:
    """What the checks of a call can see, as a hashable key: each array's
    shape and dtype (``None`` for an omitted one), each option's type and
    value (so ``True`` and ``1`` differ). ``None`` where an argument is of
    any other kind (a list, a NumPy array): such a call is checked afresh
    every time.

    This runs on every call of every op (a decode step makes hundreds), so
    it is written for speed: no tags, one flat list.
    """
    key = []
    for a in arrays:
        if type(a) is mx.array:
            key.append(a.shape)
            key.append(a.dtype)
        elif a is None:
            # A shape is never None, so one entry keeps the key unambiguous.
            key.append(None)
        else:
            return None
    for option in options:
        kind = type(option)
        if kind not in _PLAIN_TYPES:
            return None
        key.append(kind)
        key.append(option)
    return tuple(key)
