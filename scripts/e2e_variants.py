"""The benchmark's mlx-lm decode rows under a variant of the layers, to
find where a patched model's time goes (run on a GPU machine from the
repository root)::

    python scripts/e2e_variants.py VARIANT OUT.json [--quick]

Variants: ``current`` (the package as it is); ``lower-limits`` (2- to
6-bit hand-over limits at 2**24 values and 8-bit at 2**25, so 4096x4096
and 8192x2048 weights run our kernels); ``all-handed-over`` (every
decode call of a linear layer goes to MLX's op, the head too: on the
Llama-3.2-1B shape only the tied head changes, so against ``current``
and ``mlx-call`` it tells the head's share of that row's gap from the
hand-over calls); ``mlx-call`` (our linear layers run MLX's own
``QuantizedLinear.__call__``, tied heads too: what is left
of the difference is outside the linear layers' calls); ``mlx-embed``
(our embedding lookups run MLX's own ``QuantizedEmbedding.__call__``);
``mlx-all`` (both: what is left is outside our layers altogether);
``uncompiled-plans`` (a planned call of our kernels runs its function as
is, custom function and kernel call in Python, instead of replaying it
through ``mx.compile``: which of the two costs the host less);
``fewer-nodes`` (in our layer set, every decode call of a ``v_proj`` or
``up_proj`` layer returns an array kept from its first call, so it adds
nothing to the step's graph: two primitives fewer a Llama layer, the most
a fused q|k|v kernel and a fused gate|up|SwiGLU kernel, each behind its
custom function, could save a host-bound step; its tokens are wrong, its
times are the bound); ``no-steps`` (the patched model keeps its own class,
so its forward is not a step and every handed-over call checks
everything, as before the thirty-second session); ``concat-builtin``
(in our layer set, q|k|v and gate|up decode calls that go to MLX's op run it
once per group on the group's weights joined along their rows, the other
layers taking their rows of that product: one launch and a slice a layer
instead of a launch a layer, with the right tokens, the fusion MLX's own op
allows without a kernel of ours); ``fused`` (the model patched with
``fuse_siblings=True``: q|k|v and gate|up decode calls as one launch of our
fused mat-vec a group, off by default since the thirty-fifth session).
"""

import functools
import sys
import types

import mlx.core as mx
import mlx.nn as nn

import mlx_quant_ops as mqo
from mlx_quant_ops import affine
from mlx_quant_ops.bench.__main__ import main


def _mlx_linear_call():
    mqo.nn.QuantizedLinear.__call__ = nn.QuantizedLinear.__call__


def _mlx_embedding_call():
    mqo.nn.QuantizedEmbedding.__call__ = nn.QuantizedEmbedding.__call__


def _uncompiled_plans():
    # _kernels' own view of mlx.core with compile as the identity: a copy of
    # the module's namespace, so every other name costs what it did.
    from mlx_quant_ops import _kernels

    no_compile = types.ModuleType("mlx.core")
    no_compile.__dict__.update(mx.__dict__)
    no_compile.compile = lambda fun, *args, **kwargs: fun
    _kernels.mx = no_compile


def _fewer_nodes():
    # Marked after patching, so only our layer set has them; every call of
    # ours pays the lookup (about 0.1 µs), which biases the bound against
    # us, not for us.
    patch, call = mqo.nn.patch, mqo.nn.QuantizedLinear.__call__

    def patch_and_mark(model):
        patch(model)
        for name, module in model.named_modules():
            if name.endswith(("v_proj", "up_proj")) and isinstance(
                module, mqo.nn.QuantizedLinear
            ):
                object.__setattr__(module, "_kept_outputs", {})
        return model

    def call_or_kept(self, x):
        kept = self.__dict__.get("_kept_outputs")
        if kept is None or x.size != x.shape[-1]:  # not marked, or prefill
            return call(self, x)
        y = kept.get(x.shape)
        if y is None:
            y = kept[x.shape] = call(self, x)
            mx.eval(y)
        return y

    mqo.nn.patch = patch_and_mark
    mqo.nn.QuantizedLinear.__call__ = call_or_kept


# Projections that read the same input, in the order mlx-lm's Llama calls
# them: the first of a group computes the whole group's product.
_FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _concat_builtin():
    # At patch time, each group's weights, scales and biases are joined
    # along their rows (a copy: this variant doubles those layers' memory).
    # Where the group's first layer hands its decode call to MLX's op, it
    # runs MLX's op once on the joined weight and keeps the result; the
    # others return their rows of it for the same input. Unlike fewer-nodes
    # the tokens are right: this is the fusion MLX's own op allows, one
    # launch and a slice per layer instead of a launch per layer.
    patch, call = mqo.nn.patch, mqo.nn.QuantizedLinear.__call__

    def fuse(layers):
        first = layers[0]
        same = all(
            type(layer) is mqo.nn.QuantizedLinear
            and "bias" not in layer
            and (layer.group_size, layer.bits) == (first.group_size, first.bits)
            and layer.weight.shape[1:] == first.weight.shape[1:]
            for layer in layers
        )
        if not same:
            return
        joined = [
            mx.concatenate([layer[key] for layer in layers])
            for key in ("weight", "scales", "biases")
        ]
        mx.eval(joined)
        group = {"joined": joined, "x": None, "y": None}
        start = 0
        for position, layer in enumerate(layers):
            rows = layer.weight.shape[0]
            object.__setattr__(layer, "_fused", (group, position, start, start + rows))
            start += rows

    def patch_and_fuse(model):
        patch(model)
        for _, module in model.named_modules():
            for names in _FUSED_GROUPS:
                layers = [getattr(module, name, None) for name in names]
                if all(isinstance(layer, nn.Module) for layer in layers):
                    fuse(layers)
        return model

    def fused_call(self, x):
        fused = self.__dict__.get("_fused")
        if fused is None:
            return call(self, x)
        group, position, start, stop = fused
        if position == 0:
            group["x"] = None
            if not affine.layer_decode_on_builtin(x, self["weight"], self.bits):
                return call(self, x)
            w, scales, biases = group["joined"]
            group["x"] = x
            group["y"] = mx.quantized_matmul(
                x, w, scales, biases, True, self.group_size, self.bits
            )
        elif group["x"] is not x:
            return call(self, x)
        return group["y"][..., start:stop]

    mqo.nn.patch = patch_and_fuse
    mqo.nn.QuantizedLinear.__call__ = fused_call


def _no_steps():
    patch = mqo.nn.patch

    def patch_without_steps(model):
        patch(model)
        object.__setattr__(model, "__class__", type(model).__bases__[0])
        return model

    mqo.nn.patch = patch_without_steps


def _fused_siblings():
    # The benchmark patches through mqo.nn.patch, looked up at each call.
    mqo.nn.patch = functools.partial(mqo.nn.patch, fuse_siblings=True)


VARIANTS = {
    "current": lambda: None,
    "lower-limits": lambda: affine.LAYER_BUILTIN_DECODE_BELOW.update(
        {2: 1 << 24, 3: 1 << 24, 4: 1 << 24, 5: 1 << 24, 6: 1 << 24, 8: 1 << 25}
    ),
    "all-handed-over": lambda: affine.LAYER_BUILTIN_DECODE_BELOW.update(
        {bits: 1 << 40 for bits in affine.LAYER_BUILTIN_DECODE_BELOW}
    ),
    "mlx-call": _mlx_linear_call,
    "mlx-embed": _mlx_embedding_call,
    "mlx-all": lambda: (_mlx_linear_call(), _mlx_embedding_call()),
    "uncompiled-plans": _uncompiled_plans,
    "fewer-nodes": _fewer_nodes,
    "no-steps": _no_steps,
    "concat-builtin": _concat_builtin,
    "fused": _fused_siblings,
}

if __name__ == "__main__":
    variant, out, *rest = sys.argv[1:]
    VARIANTS[variant]()
    print("variant", variant, "limits", affine.LAYER_BUILTIN_DECODE_BELOW)
    main(["--only", "mlx-lm decode", "--json", out, *rest])
