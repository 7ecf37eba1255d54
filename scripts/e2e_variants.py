"""The benchmark's mlx-lm decode rows under a variant of the layers, to
find where a patched model's time goes (run on a GPU machine from the
repository root)::

    python scripts/e2e_variants.py VARIANT OUT.json [--quick]

Variants: ``current`` (the package as it is); ``lower-limits`` (2- to
6-bit hand-over limits at 2**24 values and 8-bit at 2**25, so 4096x4096
and 8192x2048 weights run our kernels); ``mlx-call`` (our linear layers
run MLX's own ``QuantizedLinear.__call__``, tied heads too: what is left
of the difference is outside the linear layers' calls); ``mlx-embed``
(our embedding lookups run MLX's own ``QuantizedEmbedding.__call__``);
``mlx-all`` (both: what is left is outside our layers altogether);
``uncompiled-plans`` (a planned call of our kernels runs its function as
is, custom function and kernel call in Python, instead of replaying it
through ``mx.compile``: which of the two costs the host less).
"""

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


VARIANTS = {
    "current": lambda: None,
    "lower-limits": lambda: affine.LAYER_BUILTIN_DECODE_BELOW.update(
        {2: 1 << 24, 3: 1 << 24, 4: 1 << 24, 5: 1 << 24, 6: 1 << 24, 8: 1 << 25}
    ),
    "mlx-call": _mlx_linear_call,
    "mlx-embed": _mlx_embedding_call,
    "mlx-all": lambda: (_mlx_linear_call(), _mlx_embedding_call()),
    "uncompiled-plans": _uncompiled_plans,
}

if __name__ == "__main__":
    variant, out, *rest = sys.argv[1:]
    VARIANTS[variant]()
    print("variant", variant, "limits", affine.LAYER_BUILTIN_DECODE_BELOW)
    main(["--only", "mlx-lm decode", "--json", out, *rest])
