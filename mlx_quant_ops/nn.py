"""Quantized layers that run on mlx-quant-ops' affine ops, and :func:`patch`,
which swaps them into a loaded model in place.

The layers are subclasses of the MLX / mlx-lm layers they replace
(:class:`mlx.nn.QuantizedLinear`, :class:`mlx.nn.QuantizedEmbedding`, and
mlx-lm's ``QuantizedSwitchLinear`` and ``QuantizedMultiLinear``), so they
keep those layers' parameters (``weight``, ``scales``, ``biases``,
``bias``), options (``group_size``, ``bits``, ``mode``), class methods and
freezing behaviour, and every ``isinstance`` check in MLX and mlx-lm
(``nn.quantize``, LoRA, DWQ, saving, dequantizing) still recognizes them.
Only the forward passes differ: they call
:func:`mlx_quant_ops.quantized_matmul`, :func:`mlx_quant_ops.gather_qmm`
and :func:`mlx_quant_ops.dequantize` instead of the ``mx.*`` built-ins, so the
matmul runs on this package's Metal / CUDA kernels or its reference path.

Typical use::

    import mlx_lm
    import mlx_quant_ops as mqo

    model, tokenizer = mlx_lm.load("some-4bit-model")
    mqo.nn.patch(model)          # same weights, our kernels

Only the ``"affine"`` quantization mode is this package's format; layers in
other modes (``mxfp4``, ``nvfp4``, ``mxfp8``) are left as they are.
"""

import operator
from typing import Callable, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map_with_path

from . import _kernels
from . import _validate as check
from . import affine
from ._kernels import HandedOverReplay, LayerReplay, _step

try:
    from mlx_lm.models.switch_layers import (
        QuantizedSwitchLinear as _MLXLMQuantizedSwitchLinear,
    )
except ImportError:  # mlx-lm is an optional dependency
    _MLXLMQuantizedSwitchLinear = None
try:
    from mlx_lm.models.mla import QuantizedMultiLinear as _MLXLMQuantizedMultiLinear
except ImportError:  # mlx-lm missing, or older than its MLA layers
    _MLXLMQuantizedMultiLinear = None

AFFINE = "affine"


def _require_affine(op: str, mode) -> None:
    if mode != AFFINE:
        check.fail(
            f"nn.{op}",
            "mode",
            f"{AFFINE!r} (the only quantization mode of mlx_quant_ops)",
            repr(mode),
        )


def _adopt(cls, base: type, layer: nn.Module, op: str) -> nn.Module:
    """A ``cls`` instance holding the state of ``layer`` (a ``base``): the
    same arrays (not copies), the same options and the same frozen set and
    training flag.

    The instance is made without ``cls.__init__``, which would draw and
    quantize a random placeholder weight the size of the layer.
    """
    if not isinstance(layer, base):
        home = "mlx.nn" if base.__module__.startswith("mlx.nn") else base.__module__
        check.fail(
            f"nn.{op}",
            "layer",
            f"a {home}.{base.__name__}",
            type(layer).__name__,
            TypeError,
        )
    _require_affine(op, layer.mode)
    adopted = cls.__new__(cls)
    # Plain attributes first (group_size, bits, mode, _training, ...), then
    # the arrays, which a Module keeps as its dict items.
    adopted.__dict__.update(layer.__dict__)
    for slot in _PlannedCalls.REPLAY_SLOTS:
        adopted.__dict__.pop(slot, None)  # never share another's
    adopted._no_grad = set(layer._no_grad)
    dict.update(adopted, layer)
    return adopted


class _PlannedCalls:
    """Mixed into each layer: its last planned op call (a
    :class:`~mlx_quant_ops._kernels.LayerReplay`), so the layer's next call
    with the same arrays skips the op's checks and plans. An embedding
    keeps its last lookup apart (``_lookup_replay``), since a model with
    tied embeddings alternates lookups with ``as_linear`` products.
    Replacing an array of the layer (``update``, ``load_weights``,
    assignment, deletion: all go through ``__setitem__`` or
    ``__delitem__``) drops them, so old weights are not kept alive; arrays
    put in behind the layer's back are caught by the replays' identity
    checks."""

    REPLAY_SLOTS = ("_replay", "_lookup_replay", "_siblings")
    _replay: Optional[LayerReplay] = None
    _lookup_replay: Optional[LayerReplay] = None
    # A linear layer's (group, index) in its sibling group (see _Siblings).
    _siblings: Optional[tuple] = None
    # Set by each layer: the MLX or mlx-lm class whose layers
    # from_quantized takes over.
    _ADOPTS: type

    @classmethod
    def from_quantized(cls, layer: nn.Module) -> nn.Module:
        """This class's layer over the state of the MLX or mlx-lm layer it
        replaces (``_ADOPTS``: ``mlx.nn.QuantizedLinear``,
        ``mlx.nn.QuantizedEmbedding``, or mlx-lm's ``QuantizedSwitchLinear``
        or ``QuantizedMultiLinear``): its arrays (shared, not copied),
        options and frozen state.

        Args:
            layer (mlx.nn.Module): an ``"affine"``-mode layer of that class.

        Returns:
            mlx.nn.Module: the new layer, of this class.
        """
        return _adopt(cls, cls._ADOPTS, layer, f"{cls.__name__}.from_quantized")

    def _quantize_weight(self, weight: mx.array) -> None:
        """Set ``weight``, ``scales`` and ``biases`` to ``weight`` quantized
        with :func:`mlx_quant_ops.quantize` at the layer's own group size
        and bits (the ``from_*`` constructors, mlx-lm's ``to_quantized``)."""
        self.weight, self.scales, self.biases = affine.quantize(
            weight, group_size=self.group_size, bits=self.bits
        )

    def _keep(self, replay: Optional[LayerReplay], slot: str = "_replay") -> None:
        """Keep ``replay`` in ``slot`` for the next call there; a call that
        could not be kept (None) drops the last one."""
        object.__setattr__(self, slot, replay)

    def _replayed_or_planned(self, slot: str, plan: Callable, x, *extra):
        """The layer's call on ``x`` (and on an MoE layer's ``indices`` and
        ``sorted_indices``, in ``extra``) with its arrays and options: the
        replay kept in ``slot`` where it still holds, else ``plan``'s result
        (one of ``affine``'s ``_layer_*`` functions), whose replay is kept
        there. ``QuantizedLinear.__call__`` spells this out itself: its
        calls are most of a decode step's, and this frame would add about
        80 ns to each."""
        w, scales, biases = self["weight"], self["scales"], self["biases"]
        group_size, bits = self.group_size, self.bits
        replay = getattr(self, slot)
        if replay is not None:
            y = replay.replay(x, w, scales, biases, group_size, bits, *extra)
            if y is not None:
                return y
        y, replay = plan(x, w, scales, biases, group_size, bits, *extra)
        self._keep(replay, slot)
        return y

    def __getstate__(self):
        # The replays are a cache of compiled functions and closures, which
        # pickle cannot carry: a pickled or copied layer plans again.
        state = dict(self.__dict__)
        for slot in self.REPLAY_SLOTS:
            state.pop(slot, None)
        return state

    def _forget_replays(self) -> None:
        # The sibling group stays (it is made once, by patch) but drops
        # its last outputs and plan, which used the old arrays.
        siblings = self._siblings
        if siblings is not None:
            siblings[0].forget()
        object.__setattr__(self, "_replay", None)
        object.__setattr__(self, "_lookup_replay", None)

    def __setitem__(self, key, value):
        self._forget_replays()
        super().__setitem__(key, value)

    def __delitem__(self, key):
        self._forget_replays()
        super().__delitem__(key)


class QuantizedLinear(_PlannedCalls, nn.QuantizedLinear):
    """:class:`mlx.nn.QuantizedLinear` whose forward runs
    :func:`mlx_quant_ops.quantized_matmul`.

    Same constructor, parameters, options and frozen state as MLX's layer
    (``weight``, ``scales`` and ``biases`` are frozen; ``bias`` is not), and
    ``mode`` must be ``"affine"``.

    Args:
        input_dims (int): the size of the input features.
        output_dims (int): the size of the output features.
        bias (bool, optional): whether to add a bias. Default: ``True``.
        group_size (int, optional): the quantization group size. Default: 64.
        bits (int, optional): bits per weight. Default: 4.
        mode (str, optional): must be ``"affine"``. Default: ``"affine"``.
    """

    _ADOPTS = nn.QuantizedLinear  # the layer from_quantized takes

    def __init__(
        self,
        input_dims: int,
        output_dims: int,
        bias: bool = True,
        group_size: Optional[int] = None,
        bits: Optional[int] = None,
        mode: str = AFFINE,
    ):
        _require_affine("QuantizedLinear", mode)
        super().__init__(input_dims, output_dims, bias, group_size, bits, mode)

    def __call__(self, x: mx.array) -> mx.array:
        # Also the tied output projection of QuantizedEmbedding.as_linear.
        siblings = self._siblings
        if siblings is not None:
            y = siblings[0].output(siblings[1], x)
            if y is not None:
                return y + self["bias"] if "bias" in self else y
        # _PlannedCalls._replayed_or_planned, inline (the hot path).
        w, scales, biases = self["weight"], self["scales"], self["biases"]
        replay = self._replay
        if (
            type(replay) is HandedOverReplay
            and _step.get() == replay.step
            and w is replay.weight
            and type(x) is mx.array
            and x.size == replay.x_size
        ):
            # A handed-over call inside a patched model's step, which
            # checked the rest once (see HandedOverReplay).
            y = replay.run(x, w, scales, biases, True, self.group_size, self.bits)
        else:
            y = None
            if replay is not None:
                y = replay.replay(x, w, scales, biases, self.group_size, self.bits)
            if y is None:
                y, replay = affine._layer_quantized_matmul(
                    x, w, scales, biases, self.group_size, self.bits
                )
                self._keep(replay)
        if "bias" in self:
            y = y + self["bias"]
        return y

    @classmethod
    def from_linear(
        cls,
        linear_layer: nn.Module,
        group_size: Optional[int] = None,
        bits: Optional[int] = None,
        mode: str = AFFINE,
    ) -> "QuantizedLinear":
        """Quantize an :class:`mlx.nn.Linear` with
        :func:`mlx_quant_ops.quantize`.

        Args:
            linear_layer (mlx.nn.Linear): the layer to quantize; its bias,
                if any, is kept as it is.
            group_size (int, optional): the quantization group size.
                Default: 64.
            bits (int, optional): bits per weight. Default: 4.
            mode (str, optional): must be ``"affine"``.

        Returns:
            QuantizedLinear: the quantized layer.
        """
        _require_affine("QuantizedLinear.from_linear", mode)
        output_dims, input_dims = linear_layer.weight.shape
        layer = cls(input_dims, output_dims, False, group_size, bits, mode)
        layer._quantize_weight(linear_layer.weight)
        if "bias" in linear_layer:
            layer.bias = linear_layer.bias
        return layer


class QuantizedEmbedding(_PlannedCalls, nn.QuantizedEmbedding):
    """:class:`mlx.nn.QuantizedEmbedding` on mlx-quant-ops' ops.

    A lookup dequantizes only the gathered rows with
    :func:`mlx_quant_ops.dequantize` (on CUDA a decode step's few rows with
    ``mx.dequantize``, bit for bit the same, whose single graph node costs
    the host less: :data:`mlx_quant_ops.affine.LAYER_BUILTIN_LOOKUP_ROWS`);
    :meth:`as_linear` (tied output projections) runs
    :func:`mlx_quant_ops.quantized_matmul`. Same
    constructor, parameters, options and frozen state as MLX's layer, and
    ``mode`` must be ``"affine"``.

    Args:
        num_embeddings (int): the vocabulary size.
        dims (int): the embedding size.
        group_size (int, optional): the quantization group size. Default: 64.
        bits (int, optional): bits per weight. Default: 4.
        mode (str, optional): must be ``"affine"``. Default: ``"affine"``.
    """

    _ADOPTS = nn.QuantizedEmbedding  # the layer from_quantized takes

    def __init__(
        self,
        num_embeddings: int,
        dims: int,
        group_size: Optional[int] = None,
        bits: Optional[int] = None,
        mode: str = AFFINE,
    ):
        _require_affine("QuantizedEmbedding", mode)
        super().__init__(num_embeddings, dims, group_size, bits, mode)

    def __call__(self, x: mx.array) -> mx.array:
        return self._replayed_or_planned("_lookup_replay", affine._layer_lookup, x)

    def as_linear(self, x: mx.array) -> mx.array:
        """``x @ E.T`` for the dequantized embedding table ``E``: the output
        projection of a model with tied embeddings.

        Args:
            x (mlx.core.array): ``[..., dims]`` activations.

        Returns:
            mlx.core.array: ``[..., num_embeddings]``.
        """
        # A linear layer's forward over the table (which has no bias).
        return QuantizedLinear.__call__(self, x)

    @classmethod
    def from_embedding(
        cls,
        embedding_layer: nn.Module,
        group_size: Optional[int] = None,
        bits: Optional[int] = None,
        mode: str = AFFINE,
    ) -> "QuantizedEmbedding":
        """Quantize an :class:`mlx.nn.Embedding` with
        :func:`mlx_quant_ops.quantize`.

        Args:
            embedding_layer (mlx.nn.Embedding): the layer to quantize.
            group_size (int, optional): the quantization group size.
                Default: 64.
            bits (int, optional): bits per weight. Default: 4.
            mode (str, optional): must be ``"affine"``.

        Returns:
            QuantizedEmbedding: the quantized layer.
        """
        _require_affine("QuantizedEmbedding.from_embedding", mode)
        num_embeddings, dims = embedding_layer.weight.shape
        layer = cls(num_embeddings, dims, group_size, bits, mode)
        layer._quantize_weight(embedding_layer.weight)
        return layer


if _MLXLMQuantizedSwitchLinear is not None:
    _SwitchBase = _MLXLMQuantizedSwitchLinear
else:

    class _SwitchBase(nn.Module):
        """The state of mlx-lm's ``QuantizedSwitchLinear`` (affine mode), for
        installs without mlx-lm."""

        def __init__(
            self,
            input_dims: int,
            output_dims: int,
            num_experts: int,
            bias: bool = True,
            group_size: int = 64,
            bits: int = 4,
            mode: str = AFFINE,
        ):
            super().__init__()
            self.group_size = group_size
            self.bits = bits
            self.mode = mode
            scale = (1 / input_dims) ** 0.5
            weight = mx.random.uniform(
                low=-scale, high=scale, shape=(num_experts, output_dims, input_dims)
            )
            self._quantize(weight)
            if bias:
                self.bias = mx.zeros((num_experts, output_dims))
            self.freeze()

        @property
        def input_dims(self) -> int:
            return self.scales.shape[2] * self.group_size

        @property
        def output_dims(self) -> int:
            return self.weight.shape[1]

        @property
        def num_experts(self) -> int:
            return self.weight.shape[0]


class QuantizedSwitchLinear(_PlannedCalls, _SwitchBase):
    """mlx-lm's ``QuantizedSwitchLinear`` (the expert weights of a
    mixture-of-experts layer) whose forward runs
    :func:`mlx_quant_ops.gather_qmm`.

    A subclass of mlx-lm's layer when mlx-lm is installed: same constructor,
    parameters (``weight [E, N, K*bits/32]``, ``scales``, ``biases``,
    optional ``bias [E, N]``), options and frozen state. ``mode`` must be
    ``"affine"`` (so there is no nvfp4 ``global_scale``).

    Args:
        input_dims (int): the size of the input features, K.
        output_dims (int): the size of each expert's output, N.
        num_experts (int): the number of experts, E.
        bias (bool, optional): whether to add a per-expert bias.
            Default: ``True``.
        group_size (int, optional): the quantization group size. Default: 64.
        bits (int, optional): bits per weight. Default: 4.
        mode (str, optional): must be ``"affine"``. Default: ``"affine"``.
    """

    _ADOPTS = _SwitchBase  # the layer from_quantized takes

    def __init__(
        self,
        input_dims: int,
        output_dims: int,
        num_experts: int,
        bias: bool = True,
        group_size: int = 64,
        bits: int = 4,
        mode: str = AFFINE,
    ):
        _require_affine("QuantizedSwitchLinear", mode)
        super().__init__(
            input_dims, output_dims, num_experts, bias, group_size, bits, mode
        )

    def _quantize(self, weight: mx.array, global_scale: bool = False) -> None:
        # mlx-lm's SwitchLinear.to_quantized and our constructor come here.
        if global_scale:
            check.fail(
                "nn.QuantizedSwitchLinear",
                "global_scale",
                "False (a global scale needs nvfp4 mode)",
                repr(global_scale),
            )
        self._quantize_weight(weight)
        self.global_scale = None

    def __call__(
        self, x: mx.array, indices: mx.array, sorted_indices: bool = False
    ) -> mx.array:
        """Each token through its selected experts.

        Args:
            x (mlx.core.array): ``[..., M, K]`` activations (mlx-lm's
                ``SwitchGLU`` passes ``[T, 1, 1, K]``, or ``[T*top_k, 1, K]``
                when it sorts tokens by expert).
            indices (mlx.core.array): expert ids, broadcastable against
                ``x``'s batch shape.
            sorted_indices (bool, optional): ``indices`` are sorted
                (lets the kernel reuse each expert's weights across
                neighbouring tokens). Default: ``False``.

        Returns:
            mlx.core.array: ``[..., M, N]``.
        """
        y = self._replayed_or_planned(
            "_replay", affine._layer_gather_qmm, x, indices, sorted_indices
        )
        if "bias" in self:
            y = y + mx.expand_dims(self["bias"][indices], -2)
        return y

    @classmethod
    def from_switch_linear(
        cls,
        switch_layer: nn.Module,
        group_size: int = 64,
        bits: int = 4,
        mode: str = AFFINE,
    ) -> "QuantizedSwitchLinear":
        """Quantize an mlx-lm ``SwitchLinear`` with
        :func:`mlx_quant_ops.quantize`.

        Args:
            switch_layer (mlx_lm.models.switch_layers.SwitchLinear): the
                experts to quantize; a bias, if any, is kept as it is.
            group_size (int, optional): the quantization group size.
                Default: 64.
            bits (int, optional): bits per weight. Default: 4.
            mode (str, optional): must be ``"affine"``.

        Returns:
            QuantizedSwitchLinear: the quantized layer.
        """
        _require_affine("QuantizedSwitchLinear.from_switch_linear", mode)
        num_experts, output_dims, input_dims = switch_layer.weight.shape
        layer = cls(input_dims, output_dims, num_experts, False, group_size, bits, mode)
        layer._quantize(switch_layer.weight)
        if "bias" in switch_layer:
            layer.bias = switch_layer.bias
        return layer


if _MLXLMQuantizedMultiLinear is not None:
    _MultiBase = _MLXLMQuantizedMultiLinear
else:

    class _MultiBase(nn.Module):
        """The state of mlx-lm's ``QuantizedMultiLinear`` (affine mode), for
        installs without it."""

        def __init__(
            self,
            input_dims: int,
            output_dims: int,
            num_heads: int,
            group_size: int,
            bits: int,
            mode: str,
        ):
            super().__init__()
            self.group_size = group_size
            self.bits = bits
            self.mode = mode
            scale = (1 / input_dims) ** 0.5
            weight = mx.random.uniform(
                low=-scale, high=scale, shape=(num_heads, output_dims, input_dims)
            )
            self.weight, self.scales, self.biases = affine.quantize(
                weight, group_size=group_size, bits=bits
            )
            self.freeze()


class QuantizedMultiLinear(_PlannedCalls, _MultiBase):
    """mlx-lm's ``QuantizedMultiLinear`` (the per-head products of MLA
    attention: DeepSeek-V3, Kimi, GLM-4-MoE-Lite, Mistral 4) whose forward
    runs :func:`mlx_quant_ops.quantized_matmul`.

    A subclass of mlx-lm's layer when mlx-lm has it: same constructor,
    parameters (``weight [H, N, K*bits/32]``, ``scales``, ``biases``),
    options and frozen state. ``mode`` must be ``"affine"``.

    Args:
        input_dims (int): the size of each head's input features, K.
        output_dims (int): the size of each head's output, N.
        num_heads (int): the number of heads, H.
        group_size (int, optional): the quantization group size. Default: 64.
        bits (int, optional): bits per weight. Default: 4.
        mode (str, optional): must be ``"affine"``. Default: ``"affine"``.
    """

    _ADOPTS = _MultiBase  # the layer from_quantized takes

    def __init__(
        self,
        input_dims: int,
        output_dims: int,
        num_heads: int,
        group_size: int = 64,
        bits: int = 4,
        mode: str = AFFINE,
    ):
        _require_affine("QuantizedMultiLinear", mode)
        super().__init__(input_dims, output_dims, num_heads, group_size, bits, mode)

    def __call__(self, x: mx.array, transpose: bool = True) -> mx.array:
        """Each head's product: ``x @ W[h].T`` (or ``x @ W[h]``).

        Args:
            x (mlx.core.array): ``[..., H or 1, M, K]`` activations (``K``
                is ``N`` of the weights with ``transpose=False``); the
                batch dimensions broadcast against the heads.
            transpose (bool, optional): multiply by each head's weight
                transposed. Default: ``True``.

        Returns:
            mlx.core.array: ``[..., H, M, N]`` (``[..., H, M, K]`` with
            ``transpose=False``).
        """
        return self._replayed_or_planned(
            "_replay", affine._layer_heads_matmul, x, None, transpose
        )

    @classmethod
    def from_multi_linear(
        cls,
        multi_layer: nn.Module,
        group_size: int = 64,
        bits: int = 4,
        mode: str = AFFINE,
    ) -> "QuantizedMultiLinear":
        """Quantize an mlx-lm ``MultiLinear`` with
        :func:`mlx_quant_ops.quantize`.

        Args:
            multi_layer (mlx_lm.models.mla.MultiLinear): the per-head
                weights ``[H, N, K]`` to quantize.
            group_size (int, optional): the quantization group size.
                Default: 64.
            bits (int, optional): bits per weight. Default: 4.
            mode (str, optional): must be ``"affine"``.

        Returns:
            QuantizedMultiLinear: the quantized layer.
        """
        _require_affine("QuantizedMultiLinear.from_multi_linear", mode)
        num_heads, output_dims, input_dims = multi_layer.weight.shape
        layer = cls(input_dims, output_dims, num_heads, group_size, bits, mode)
        layer._quantize_weight(multi_layer.weight)
        return layer


# Linear layers of one module that read the same input in the models
# mlx-lm defines (attention's q, k and v projections; a gated MLP's gate and
# up projections), whose decode calls can run as one launch.
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _Siblings:
    """Linear layers of one module that read the same input, grouped by
    ``patch(model, fuse_siblings=True)`` (:data:`SIBLINGS`): inside a
    patched model's step on the CUDA path, the first of them called on a
    decode-sized input runs :func:`mlx_quant_ops.fused_quantized_matmul`
    for all of them in one launch (see
    ``affine._layer_fused_quantized_matmul``) and keeps the outputs with
    the input; the others, called on that same input object, take theirs.
    A call on any other input, or where the launch does not apply, runs
    the layer's own path. The outputs depend only on the input
    and the layers' arrays, and replacing an array of a layer through the
    module (assignment, ``update``, ``load_weights``) drops them
    (``_PlannedCalls._forget_replays``); a new input reads the arrays
    afresh and compares them with the plan's.

    The plan (``run``) is kept with what it was made for: the input's shape
    and dtype, the layers' arrays by identity, the step's key (which
    covers the path, the forced path and the plan generation) and the
    testing switches. ``run`` is None where the calls run one by one.
    """

    __slots__ = (
        "layers",
        "group_size",
        "bits",
        "x",
        "outputs",
        "run",
        "x_shape",
        "x_dtype",
        "arrays",
        "step",
        "poison",
        "includes",
    )

    def __init__(self, layers):
        self.layers = tuple(layers)
        self.group_size, self.bits = layers[0].group_size, layers[0].bits
        self.forget()

    def forget(self) -> None:
        self.x = self.outputs = self.run = self.x_shape = self.arrays = None
        self.step = 0

    def output(self, index: int, x) -> Optional[mx.array]:
        """Layer ``index``'s output for ``x``, or None (the layer runs its
        own path)."""
        if x is self.x:
            return self.outputs[index]
        step = _step.get()
        if not step or type(x) is not mx.array:
            return None
        same_call = (
            step == self.step
            and x.shape == self.x_shape
            and x.dtype == self.x_dtype
            and _kernels._poison.get() is self.poison
            and _kernels.CUDA_INCLUDES.get() is self.includes
        )
        if same_call and self.run is None:
            return None  # declined for this call already
        arrays = []
        for layer in self.layers:
            arrays += (layer["weight"], layer["scales"], layer["biases"])
        if not (same_call and all(map(operator.is_, arrays, self.arrays))):
            self.run = affine._layer_fused_quantized_matmul(
                x, tuple(arrays), self.group_size, self.bits
            )
            self.x_shape, self.x_dtype, self.arrays = x.shape, x.dtype, arrays
            self.step = step
            self.poison = _kernels._poison.get()
            self.includes = _kernels.CUDA_INCLUDES.get()
        if self.run is None:
            return None
        self.outputs = self.run(x, *arrays)
        self.x = x
        return self.outputs[index]


def _group_siblings(model: nn.Module) -> None:
    """Group each module's :data:`SIBLINGS` of ours that can share a launch:
    all present, plain :class:`QuantizedLinear` (no subclass; each adds its
    own bias, if any, to its output) of the same group size, bits, input
    width and scales dtype, and in no group yet."""
    for _, module in model.named_modules():
        for names in SIBLINGS:
            layers = [module.get(name) for name in names]
            first = layers[0]
            if not all(
                type(layer) is QuantizedLinear
                and layer._siblings is None
                and layer.group_size == first.group_size
                and layer.bits == first.bits
                and layer["weight"].ndim == 2
                and layer["weight"].shape[1] == first["weight"].shape[1]
                and layer["scales"].dtype == first["scales"].dtype
                for layer in layers
            ):
                continue
            group = _Siblings(layers)
            for index, layer in enumerate(layers):
                object.__setattr__(layer, "_siblings", (group, index))


def _replacements() -> dict:
    """The exact MLX / mlx-lm layer types :func:`patch` swaps, each mapped to
    ours."""
    table = {
        nn.QuantizedLinear: QuantizedLinear,
        nn.QuantizedEmbedding: QuantizedEmbedding,
    }
    if _MLXLMQuantizedSwitchLinear is not None:
        table[_MLXLMQuantizedSwitchLinear] = QuantizedSwitchLinear
    if _MLXLMQuantizedMultiLinear is not None:
        table[_MLXLMQuantizedMultiLinear] = QuantizedMultiLinear
    return table


def _patched(module: nn.Module) -> nn.Module:
    """``module`` itself, or our layer in its place where :func:`patch` swaps
    it."""
    ours = _replacements().get(type(module))
    if ours is None or getattr(module, "mode", None) != AFFINE:
        return module
    return ours.from_quantized(module)


# The step classes made so far, by the model class each extends.
_STEP_CLASSES: dict = {}


def _stepped(cls: type) -> type:
    """``cls`` extended so that each call of an instance runs as one step
    (see :func:`patch`): the call publishes
    :func:`~mlx_quant_ops.affine.step_key` for the layer calls inside it,
    and takes it back when it returns or raises (nested steps restore the
    outer one's key)."""
    if cls.__dict__.get("_runs_as_steps", False):
        return cls
    stepped = _STEP_CLASSES.get(cls)
    if stepped is None:
        forward = cls.__call__

        def __call__(self, *args, **kwargs):
            token = _step.set(affine.step_key())
            try:
                return forward(self, *args, **kwargs)
            finally:
                _step.reset(token)

        def __reduce_ex__(self, protocol):
            # Pickle finds a class by its name, which leads to the model's
            # own class: an unpickled (or deep-copied) model is made as one
            # of that class run as steps instead.
            reduced = list(cls.__reduce_ex__(self, max(protocol, 2)))
            reduced[:2] = _new_stepped, (cls,)
            return tuple(reduced)

        # Named as the model's own class, so reprs, type names and
        # isinstance checks read as before.
        stepped = type(
            cls.__name__,
            (cls,),
            {
                "__call__": __call__,
                "__reduce_ex__": __reduce_ex__,
                "__module__": cls.__module__,
                "__qualname__": cls.__qualname__,
                "__doc__": cls.__doc__,
                "_runs_as_steps": True,
            },
        )
        _STEP_CLASSES[cls] = stepped
    return stepped


def _new_stepped(cls: type) -> nn.Module:
    """A new, empty instance of ``cls`` run as steps (what pickle calls to
    remake a patched model)."""
    stepped = _stepped(cls)
    return stepped.__new__(stepped)


def patch(model: nn.Module, *, fuse_siblings: bool = False) -> nn.Module:
    """Swap a model's MLX quantized layers for this package's, in place.

    Every ``mlx.nn.QuantizedLinear``, ``mlx.nn.QuantizedEmbedding``, and
    mlx-lm ``QuantizedSwitchLinear`` and ``QuantizedMultiLinear`` (MLA
    attention's per-head products) in ``"affine"`` mode, at any depth
    (attributes, lists, dicts), becomes the matching layer of this module over
    the same arrays (shared, not copied), with the same options and the same
    frozen / trainable state, so the model computes the same function with
    our kernels. Left untouched:

    - layers in other quantization modes (``mxfp4``, ``nvfp4``, ``mxfp8``),
      which this package's ops do not implement;
    - subclasses of those layers (for example a model's own fused variant),
      whose forward may do more than a quantized matmul;
    - layers that are already ours, so patching twice changes nothing.

    mlx-lm builds each decode step on the host, so a patched model decodes
    faster than MLX's layers where the GPU time of the step bounds it (a
    large model), and follows the host's speed where the host does
    (docs/benchmarks.md, twenty-first session). So that the host's part
    costs no more than with MLX's layers, the model's own class is extended
    (same name, a subclass, so ``isinstance`` holds) to run each call of
    the model as a step: a layer call that goes to MLX's own op (a small
    decode on CUDA) then checks only its weight and its input's size, the
    step having checked the path once as it began. A layer called on its
    own, outside the model, checks everything, as before.

    With ``fuse_siblings``, each module's :data:`SIBLINGS` (q|k|v, gate|up)
    are grouped so that their decode calls inside a step on CUDA run as one
    :func:`mlx_quant_ops.fused_quantized_matmul` launch (see
    :class:`_Siblings`). That is off by default: it takes kernel nodes out
    of each step, but on MLX 0.32.4's CUDA backend the fused call's one
    node (a compiled replay of a custom function around a kernel of ten
    inputs) cost the host more than the two or three ``quantized_matmul``
    nodes it replaced, and models decoded slower fused (H100, 2026-12-05,
    ours / MLX's layers: Llama-3.2-1B shape 1.219 against 1.061 unfused,
    Llama-3-8B shape 1.103 against 0.983; docs/benchmarks.md).

    Args:
        model (mlx.nn.Module): a model, typically from ``mlx_lm.load`` or
            after ``mlx.nn.quantize``.
        fuse_siblings (bool, optional): group sibling projections for fused
            decode launches. Default: ``False``.

    Returns:
        mlx.nn.Module: ``model`` itself, patched. If ``model`` is itself one
        of the swapped layers, the replacement layer (a module cannot replace
        itself in place).
    """
    if not isinstance(model, nn.Module):
        check.fail(
            "nn.patch", "model", "an mlx.nn.Module", type(model).__name__, TypeError
        )
    check.boolean("nn.patch", "fuse_siblings", fuse_siblings)
    replacement = _patched(model)
    if replacement is not model:
        return replacement
    leaves = tree_map_with_path(
        lambda _, m: _patched(m), model.leaf_modules(), is_leaf=nn.Module.is_module
    )
    model.update_modules(leaves)
    if fuse_siblings:
        _group_siblings(model)
    if callable(model):
        object.__setattr__(model, "__class__", _stepped(type(model)))
    return model


def quantize(
    model: nn.Module,
    group_size: int = 64,
    bits: int = 4,
    *,
    class_predicate: Optional[Callable[[str, nn.Module], Union[bool, dict]]] = None,
) -> nn.Module:
    """:func:`mlx.nn.quantize` in affine mode, then :func:`patch`.

    Args:
        model (mlx.nn.Module): the model whose layers to quantize, in place.
        group_size (int, optional): the quantization group size. Default: 64.
        bits (int, optional): bits per weight. Default: 4.
        class_predicate (callable, optional): as in :func:`mlx.nn.quantize`:
            ``(path, module) -> bool or dict of to_quantized options``.
            Default: every layer with a ``to_quantized`` method.

    Returns:
        mlx.nn.Module: ``model``, quantized and patched.
    """
    nn.quantize(model, group_size, bits, mode=AFFINE, class_predicate=class_predicate)
    return patch(model)
