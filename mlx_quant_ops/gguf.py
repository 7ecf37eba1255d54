"""llama.cpp's GGUF block formats as MLX ops.

Blocks live in ``uint8`` arrays of shape ``[..., K / block_elems * block_bytes]``
with ggml's exact byte layout, so they can be written to and read from
``.gguf`` files unchanged. Each format is one class in :data:`FORMATS`, with
its layout numbers as named constants and its reference quantizer and
dequantizer written in plain ``mx`` ops (the CPU path and the oracle).

Every op comes in three pieces: ``_<op>_reference`` (pure ``mx``),
``_<op>_kernel`` (the Metal body in ``kernels/``, run on CUDA through the
compatibility header) and the public ``<op>``, which validates once and then
dispatches on the stream's device.
"""

from typing import Dict, Optional

import mlx.core as mx

from . import _validate as check
from ._backend import StreamLike, dispatch
from ._kernels import KernelSpec, ceil_to, launch, sizes

F16_BYTES = 2
THREADGROUP = 256


def _f16_bytes(values: mx.array) -> mx.array:
    """[n] float32 -> [n, 2] uint8: the fp16 bit pattern, little-endian, as
    ggml stores block scales (rounded to nearest even)."""
    return values.astype(mx.float16).reshape(-1, 1).view(mx.uint8)


def _f16_from_bytes(raw: mx.array) -> mx.array:
    """[n, 2] uint8 -> [n, 1] float32, the inverse of :func:`_f16_bytes`."""
    return mx.contiguous(raw).view(mx.float16).astype(mx.float32)


def _round_half_away(v: mx.array) -> mx.array:
    """C's ``roundf``: halfway cases away from zero (``mx.round`` goes to
    even)."""
    truncated = mx.where(v < 0, mx.ceil(v), mx.floor(v))
    tie = mx.abs(v - truncated) == 0.5
    return mx.where(tie, truncated + mx.sign(v), mx.round(v))


def _inverse_or_zero(d: mx.array) -> mx.array:
    return mx.where(d != 0, 1.0 / mx.where(d != 0, d, 1.0), 0.0)


class GGUFFormat:
    """One GGUF block format.

    Attributes:
        name: GGUF's type name (``"Q4_0"``...).
        ggml_type: ggml's numeric type id (``GGMLQuantizationType``).
        block_elems: values per block.
        block_bytes: bytes per block.
    """

    name: str
    ggml_type: int
    block_elems: int
    block_bytes: int

    def quantize_blocks(self, x: mx.array) -> mx.array:
        """Reference quantizer: ``x`` float32 ``[n, block_elems]`` -> uint8
        ``[n, block_bytes]``, as ggml's ``quantize_row_*_ref``."""
        raise NotImplementedError

    def dequantize_blocks(self, blocks: mx.array) -> mx.array:
        """Reference dequantizer: uint8 ``[n, block_bytes]`` -> float32
        ``[n, block_elems]``, as ggml's ``dequantize_row_*``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"GGUFFormat({self.name})"


class Q4_0(GGUFFormat):
    """fp16 scale d, then 16 bytes: byte j holds element j in its low nibble
    and element j + 16 in its high nibble; value = (nibble - 8) * d."""

    name = "Q4_0"
    ggml_type = 2
    block_elems = 32
    block_bytes = F16_BYTES + block_elems // 2
    code_offset = 8
    code_max = 15

    def quantize_blocks(self, x):
        # d comes from the element of largest magnitude (the first on ties,
        # +0 for an all-zero block), signed, over -8.
        magnitude = mx.abs(x)
        first_max = mx.argmax(magnitude, axis=-1, keepdims=True)
        peak = mx.take_along_axis(x, first_max, axis=-1)
        peak = mx.where(mx.take_along_axis(magnitude, first_max, -1) > 0, peak, 0.0)
        d = peak / -float(self.code_offset)
        scaled = x * _inverse_or_zero(d) + (self.code_offset + 0.5)
        # ggml truncates toward zero with a cast to int8, then caps at 15.
        codes = mx.minimum(scaled.astype(mx.int32), self.code_max).astype(mx.uint8)
        half = self.block_elems // 2
        packed = codes[:, :half] | (codes[:, half:] << 4)
        return mx.concatenate([_f16_bytes(d), packed], axis=-1)

    def dequantize_blocks(self, blocks):
        d = _f16_from_bytes(blocks[:, :F16_BYTES])
        packed = blocks[:, F16_BYTES:]
        codes = mx.concatenate([packed & 0xF, packed >> 4], axis=-1)
        return (codes.astype(mx.float32) - self.code_offset) * d


class Q8_0(GGUFFormat):
    """fp16 scale d, then 32 int8 codes; value = code * d."""

    name = "Q8_0"
    ggml_type = 8
    block_elems = 32
    block_bytes = F16_BYTES + block_elems
    code_max = 127

    def quantize_blocks(self, x):
        d = mx.max(mx.abs(x), axis=-1, keepdims=True) / float(self.code_max)
        codes = _round_half_away(x * _inverse_or_zero(d)).astype(mx.int8)
        return mx.concatenate([_f16_bytes(d), codes.view(mx.uint8)], axis=-1)

    def dequantize_blocks(self, blocks):
        d = _f16_from_bytes(blocks[:, :F16_BYTES])
        codes = mx.contiguous(blocks[:, F16_BYTES:]).view(mx.int8)
        return codes.astype(mx.float32) * d


#: Every supported format, by GGUF type name.
FORMATS: Dict[str, GGUFFormat] = {f.name: f for f in (Q4_0(), Q8_0())}


def get_format(type_name, op: str = "gguf") -> GGUFFormat:
    """The :class:`GGUFFormat` named ``type_name`` (any case).

    Raises:
        TypeError: ``type_name`` is not a string.
        ValueError: no such format; the message lists the supported ones.
    """
    if not isinstance(type_name, str):
        check.fail(op, "type", "a GGUF type name (str)", repr(type_name), TypeError)
    fmt = FORMATS.get(type_name.upper())
    if fmt is None:
        check.fail(op, "type", "one of " + ", ".join(FORMATS), repr(type_name))
    return fmt


# ---- validation shared by the ops -----------------------------------------


def _check_values(op: str, x, fmt: GGUFFormat) -> None:
    check.array(op, "x", x)
    check.dtype(op, "x", x, check.FLOAT_DTYPES)
    check.last_axis_multiple(
        op, "x", x, fmt.block_elems, f"{fmt.name} blocks hold {fmt.block_elems} values"
    )


def _check_blocks(op: str, blocks, fmt: GGUFFormat) -> None:
    check.array(op, "blocks", blocks)
    check.dtype(op, "blocks", blocks, (mx.uint8,))
    check.last_axis_multiple(
        op,
        "blocks",
        blocks,
        fmt.block_bytes,
        f"{fmt.name} blocks are {fmt.block_bytes} bytes",
    )


def _blocks_shape(shape, fmt: GGUFFormat):
    return (*shape[:-1], shape[-1] // fmt.block_elems * fmt.block_bytes)


def _values_shape(shape, fmt: GGUFFormat):
    return (*shape[:-1], shape[-1] // fmt.block_bytes * fmt.block_elems)


# ---- kernels -----------------------------------------------------------------

_BLOCK32_LANES = 8  # lanes per 32-element block; see kernels/gguf.h


def _block32_kernel(name: str, first_input: str) -> KernelSpec:
    return KernelSpec(
        name=name,
        inputs=(first_input, "params"),
        outputs=("out",),
        headers=("common.h", "gguf.h"),
    )


_QUANTIZE_BLOCK32 = _block32_kernel("gguf_quantize_block32", "x")
_QDQ_BLOCK32 = _block32_kernel("gguf_qdq_block32", "x")
_DEQUANTIZE_BLOCK32 = _block32_kernel("gguf_dequantize_block32", "blocks")


def _launch_block32(spec, data, n_blocks, fmt, dtype, out_shape, out_dtype, stream):
    grid = ceil_to(max(n_blocks * _BLOCK32_LANES, 1), THREADGROUP)
    return launch(
        spec,
        [data.reshape(-1), sizes(n_blocks)],
        template=[("T", dtype), ("qtype", fmt.ggml_type)],
        grid=(grid, 1, 1),
        threadgroup=(THREADGROUP, 1, 1),
        output_shapes=[out_shape],
        output_dtypes=[out_dtype],
        stream=stream,
    )[0]


# ---- quantize --------------------------------------------------------------


def _quantize_reference(x, fmt):
    flat = x.astype(mx.float32).reshape(-1, fmt.block_elems)
    if flat.shape[0] == 0:
        # No blocks: MLX's argmax refuses every empty array (0.32.4), even
        # along an axis that is not empty.
        blocks = mx.zeros((0, fmt.block_bytes), mx.uint8)
    else:
        blocks = fmt.quantize_blocks(flat)
    return blocks.reshape(_blocks_shape(x.shape, fmt))


def _quantize_kernel(x, fmt, *, stream):
    n_blocks = x.size // fmt.block_elems
    return _launch_block32(
        _QUANTIZE_BLOCK32,
        x,
        n_blocks,
        fmt,
        x.dtype,
        _blocks_shape(x.shape, fmt),
        mx.uint8,
        stream,
    )


def quantize(x: mx.array, type: str, *, stream: StreamLike = None) -> mx.array:
    """Quantize ``x`` into GGUF blocks, bit-identical to ggml's reference
    quantizer (no importance matrix).

    Args:
        x (mlx.core.array): values, float32, float16 or bfloat16, any leading
            shape; the last axis a multiple of the format's block size.
        type (str): GGUF type name, e.g. ``"Q4_0"`` or ``"Q8_0"`` (any case).
        stream (mlx.core.Stream or Device, optional): where to run.

    Returns:
        mlx.core.array: uint8 blocks, shape ``[..., K / block_elems * block_bytes]``.
    """
    fmt = get_format(type, "gguf.quantize")
    _check_values("gguf.quantize", x, fmt)
    return dispatch(_quantize_reference, _quantize_kernel, x, fmt, stream=stream)


# ---- dequantize ------------------------------------------------------------


def _dequantize_reference(blocks, fmt, dtype):
    flat = blocks.reshape(-1, fmt.block_bytes)
    values = fmt.dequantize_blocks(flat).astype(dtype)
    return values.reshape(_values_shape(blocks.shape, fmt))


def _dequantize_kernel(blocks, fmt, dtype, *, stream):
    n_blocks = blocks.size // fmt.block_bytes
    return _launch_block32(
        _DEQUANTIZE_BLOCK32,
        blocks,
        n_blocks,
        fmt,
        dtype,
        _values_shape(blocks.shape, fmt),
        dtype,
        stream,
    )


def dequantize(
    blocks: mx.array,
    type: str,
    dtype: mx.Dtype = mx.float32,
    *,
    stream: StreamLike = None,
) -> mx.array:
    """Dequantize GGUF blocks, bit-identical to ggml's ``dequantize_row_*``
    (computed in float32, then cast to ``dtype``).

    Args:
        blocks (mlx.core.array): uint8 blocks, last axis a multiple of the
            format's block bytes.
        type (str): GGUF type name (any case).
        dtype (mlx.core.Dtype): output dtype. Default: ``mlx.core.float32``.
        stream (mlx.core.Stream or Device, optional): where to run.

    Returns:
        mlx.core.array: values, shape ``[..., bytes / block_bytes * block_elems]``.
    """
    fmt = get_format(type, "gguf.dequantize")
    _check_blocks("gguf.dequantize", blocks, fmt)
    dtype = check.float_dtype("gguf.dequantize", "dtype", dtype)
    return dispatch(
        _dequantize_reference, _dequantize_kernel, blocks, fmt, dtype, stream=stream
    )


# ---- qdq -------------------------------------------------------------------


def _qdq_reference(x, fmt):
    return _dequantize_reference(_quantize_reference(x, fmt), fmt, x.dtype)


def _qdq_kernel(x, fmt, *, stream):
    n_blocks = x.size // fmt.block_elems
    return _launch_block32(
        _QDQ_BLOCK32, x, n_blocks, fmt, x.dtype, x.shape, x.dtype, stream
    )


def qdq(x: mx.array, type: str, *, stream: StreamLike = None) -> mx.array:
    """``dequantize(quantize(x, type), type, x.dtype)`` in one pass: what the
    values of ``x`` become after a round trip through the GGUF format.

    Args:
        x (mlx.core.array): values, float32, float16 or bfloat16; the last
            axis a multiple of the format's block size.
        type (str): GGUF type name (any case).
        stream (mlx.core.Stream or Device, optional): where to run.

    Returns:
        mlx.core.array: same shape and dtype as ``x``.
    """
    fmt = get_format(type, "gguf.qdq")
    _check_values("gguf.qdq", x, fmt)
    return dispatch(_qdq_reference, _qdq_kernel, x, fmt, stream=stream)
