"""mlx_quant_ops.nn: our layers against MLX's / mlx-lm's, and patch() on
mlx-lm models.

Oracles: the MLX / mlx-lm layers themselves (outputs, parameters, frozen
state, gradients), a float64 numpy product of the weight as ``mx.dequantize``
reads it, and the greedy tokens an unpatched mlx-lm model generates.
"""

import contextlib
import io
import os
import re
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map
from mlx_lm.generate import generate_step
from mlx_lm.models import llama, qwen3_moe
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.models.mla import MultiLinear
from mlx_lm.models.mla import QuantizedMultiLinear as LMQuantizedMulti
from mlx_lm.models.switch_layers import QuantizedSwitchLinear as LMQuantizedSwitch
from mlx_lm.models.switch_layers import SwitchGLU, SwitchLinear
from mlx_lm.utils import load_model, quantize_model, save_config, save_model

import mlx_quant_ops as mqo
from mlx_quant_ops import _kernels, affine
from mlx_quant_ops._kernels import CallPlans, clear_plans

# Relative error of a matmul against a float64 product (DESIGN.md).
TOL = {mx.float32: 1e-5, mx.float16: 5e-3, mx.bfloat16: 5e-3}
DTYPES = [mx.float32, mx.float16, mx.bfloat16]
GROUP_SIZES = [32, 64, 128]
# The devices a test runs its layers on (the GPU where MLX has a backend).
DEVICES = [
    pytest.param(mx.cpu, id="cpu"),
    pytest.param(mx.gpu, id="gpu", marks=pytest.mark.gpu),
]


# The measured hand-over of small decodes and lookups to MLX's built-ins
# (CUDA only).
MEASURED_BUILTIN_DECODE_BELOW = dict(affine.LAYER_BUILTIN_DECODE_BELOW)
MEASURED_BUILTIN_LOOKUP_ROWS = affine.LAYER_BUILTIN_LOOKUP_ROWS


@pytest.fixture(autouse=True)
def layers_on_our_kernels(monkeypatch):
    """Layers here run this package's kernels on every path, so the GPU
    tests test them: the hand-over of small decodes and lookups to MLX's
    built-ins (``affine.LAYER_BUILTIN_DECODE_BELOW`` and
    ``LAYER_BUILTIN_LOOKUP_ROWS``) has its own tests, which turn it back
    on."""
    monkeypatch.setattr(affine, "LAYER_BUILTIN_DECODE_BELOW", {})
    monkeypatch.setattr(affine, "LAYER_BUILTIN_LOOKUP_ROWS", 0)
    clear_plans()  # nothing kept from another test's rules replays here
    yield
    clear_plans()


def sample(shape, dist, dtype=mx.float32):
    if dist == "normal":
        a = mx.random.normal(shape)
    elif dist == "uniform":
        a = mx.random.uniform(-1.0, 1.0, shape)
    else:  # heavy-tailed: a few large outliers per row, as in real weights
        a = mx.random.normal(shape) * mx.exp(mx.random.normal(shape))
    return a.astype(dtype)


def f64(a):
    return np.array(a.astype(mx.float32), dtype=np.float64)


def rel_err(y, y_ref):
    y, y_ref = f64(y), np.asarray(y_ref, dtype=np.float64)
    return np.linalg.norm(y - y_ref) / np.linalg.norm(y_ref)


def dequantized_f64(layer):
    """The layer's weight as mx.dequantize reads it, in float64."""
    w = mx.dequantize(
        layer.weight,
        layer.scales.astype(mx.float32),
        layer.biases.astype(mx.float32),
        group_size=layer.group_size,
        bits=layer.bits,
    )
    return f64(w)


def assert_same_arrays(ours, theirs):
    """Same parameter names, and each parameter the very same array."""
    a, b = dict(tree_flatten(ours.parameters())), dict(
        tree_flatten(theirs.parameters())
    )
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] is b[k], k


def assert_equal_arrays(ours, theirs):
    """Same parameter names, dtypes, shapes and bits."""
    a, b = dict(tree_flatten(ours.parameters())), dict(
        tree_flatten(theirs.parameters())
    )
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert mx.array_equal(a[k], b[k]).item(), k


def assert_close_to_mlx(y, y_mlx, exact, dtype):
    """``y`` within our tolerance of the exact product, so within that
    plus MLX's own error of MLX's output. (MLX's CPU kernels are looser than
    DESIGN.md's tolerance in half precision: about 2e-3 in float16 and 1.7e-2
    in bfloat16 against float64.)"""
    mlx_err = rel_err(y_mlx, exact)
    assert rel_err(y, f64(y_mlx)) <= 1.05 * (TOL[dtype] + mlx_err)


def trainable_names(module):
    return sorted(k for k, _ in tree_flatten(module.trainable_parameters()))


# ---------------------------------------------------------------- layers


def linear(in_dims, out_dims, dtype, dist="normal", bias=True):
    layer = nn.Linear(in_dims, out_dims, bias=bias)
    layer.weight = sample((out_dims, in_dims), dist, dtype) * in_dims**-0.5
    if bias:
        layer.bias = sample((out_dims,), dist, dtype)
    return layer


LINEAR_CASES = [(d, b, g) for d in DTYPES for b in (3, 4, 8) for g in GROUP_SIZES] + [
    (mx.float32, b, 64) for b in (1, 2, 5, 6)
]


@pytest.mark.parametrize("dtype,bits,group_size", LINEAR_CASES)
def test_quantized_linear_matches_mlx(dtype, bits, group_size):
    mx.random.seed(bits * 1000 + group_size)
    in_dims, out_dims = 384, 72
    for dist in ("normal", "heavy"):
        float_layer = linear(in_dims, out_dims, dtype, dist)
        theirs = nn.QuantizedLinear.from_linear(float_layer, group_size, bits)
        ours = mqo.nn.QuantizedLinear.from_linear(float_layer, group_size, bits)
        assert type(ours) is mqo.nn.QuantizedLinear
        assert isinstance(ours, nn.QuantizedLinear)
        assert (ours.group_size, ours.bits, ours.mode) == (group_size, bits, "affine")
        # from_linear quantizes with our quantize, bit-identical to MLX's.
        assert_equal_arrays(ours, theirs)
        assert trainable_names(ours) == trainable_names(theirs) == ["bias"]

        adopted = mqo.nn.QuantizedLinear.from_quantized(theirs)
        assert_same_arrays(adopted, theirs)
        w = dequantized_f64(theirs)
        for shape in [(1, in_dims), (3, in_dims), (17, in_dims), (2, 5, in_dims)]:
            x = sample(shape, dist, dtype)
            y = adopted(x)
            assert y.shape == shape[:-1] + (out_dims,) and y.dtype == dtype
            exact = f64(x) @ w.T + f64(theirs.bias)
            assert rel_err(y, exact) <= TOL[dtype]
            assert_close_to_mlx(y, theirs(x), exact, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits,group_size", [(4, 64), (8, 32), (3, 128), (2, 32)])
def test_quantized_embedding_matches_mlx(dtype, bits, group_size):
    mx.random.seed(7 * bits + group_size)
    vocab, dims = 301, 256
    float_layer = nn.Embedding(vocab, dims)
    float_layer.weight = sample((vocab, dims), "normal", dtype)
    theirs = nn.QuantizedEmbedding.from_embedding(float_layer, group_size, bits)
    ours = mqo.nn.QuantizedEmbedding.from_embedding(float_layer, group_size, bits)
    assert type(ours) is mqo.nn.QuantizedEmbedding
    assert isinstance(ours, nn.QuantizedEmbedding)
    assert (ours.num_embeddings, ours.dims) == (vocab, dims)
    assert_equal_arrays(ours, theirs)
    assert trainable_names(ours) == trainable_names(theirs) == []

    adopted = mqo.nn.QuantizedEmbedding.from_quantized(theirs)
    assert_same_arrays(adopted, theirs)
    tokens = mx.random.randint(0, vocab, (3, 11))
    rows = adopted(tokens)
    assert rows.shape == (3, 11, dims) and rows.dtype == dtype
    expected = theirs(tokens)
    # Dequantizing is one multiply-add per element: equal up to rounding.
    eps = {mx.float32: 1e-6, mx.float16: 1e-3, mx.bfloat16: 8e-3}[dtype]
    assert np.allclose(f64(rows), f64(expected), rtol=eps, atol=eps)

    w = dequantized_f64(theirs)
    for m in (1, 17):
        x = sample((m, dims), "uniform", dtype)
        y = adopted.as_linear(x)
        assert y.shape == (m, vocab) and y.dtype == dtype
        exact = f64(x) @ w.T
        assert rel_err(y, exact) <= TOL[dtype]
        assert_close_to_mlx(y, theirs.as_linear(x), exact, dtype)


def switch_oracle(x, w_f64, indices, bias=None):
    """x [T, 1, 1, K] or [T, 1, K], indices [T, k] or [T] -> float64 [..., 1, N]."""
    xs = f64(x)
    idx = np.array(indices)
    if xs.ndim == 4:  # unsorted: every token against each of its experts
        out = np.einsum("tmk,tenk->tenm", xs[:, 0], w_f64[idx]).swapaxes(-1, -2)
    else:  # sorted: one row per (token, expert) pair
        out = np.einsum("tmk,tnk->tmn", xs, w_f64[idx])
    if bias is not None:
        out = out + f64(bias)[idx][..., None, :]
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits,group_size", [(4, 64), (8, 32), (3, 128), (6, 64)])
def test_quantized_switch_linear_matches_mlx_lm(dtype, bits, group_size):
    mx.random.seed(11 * bits + group_size)
    experts, in_dims, out_dims, tokens, top_k = 6, 256, 40, 9, 2
    float_layer = SwitchLinear(in_dims, out_dims, experts, bias=True)
    float_layer.weight = sample((experts, out_dims, in_dims), "heavy", dtype) * 0.05
    float_layer.bias = sample((experts, out_dims), "normal", dtype)
    theirs = float_layer.to_quantized(group_size, bits)
    ours = mqo.nn.QuantizedSwitchLinear.from_switch_linear(
        float_layer, group_size, bits
    )
    assert type(ours) is mqo.nn.QuantizedSwitchLinear
    assert isinstance(ours, LMQuantizedSwitch)
    assert (ours.input_dims, ours.output_dims, ours.num_experts) == (
        in_dims,
        out_dims,
        experts,
    )
    assert_equal_arrays(ours, theirs)
    assert trainable_names(ours) == trainable_names(theirs) == ["bias"]

    adopted = mqo.nn.QuantizedSwitchLinear.from_quantized(theirs)
    assert_same_arrays(adopted, theirs)
    w = dequantized_f64(theirs)
    indices = mx.random.randint(0, experts, (tokens, top_k))
    # As SwitchGLU calls it for a few tokens...
    x = sample((tokens, 1, 1, in_dims), "normal", dtype)
    y = adopted(x, indices)
    assert y.shape == (tokens, top_k, 1, out_dims) and y.dtype == dtype
    exact = switch_oracle(x, w, indices, theirs.bias)
    assert rel_err(y, exact) <= TOL[dtype]
    assert_close_to_mlx(y, theirs(x, indices), exact, dtype)
    # ...and for many, sorted by expert.
    flat = indices.flatten()
    order = mx.argsort(flat)
    xs = mx.repeat(x.reshape(tokens, 1, in_dims), top_k, axis=0)[order]
    ys = adopted(xs, flat[order], sorted_indices=True)
    assert ys.shape == (tokens * top_k, 1, out_dims)
    exact = switch_oracle(xs, w, flat[order], theirs.bias)
    assert rel_err(ys, exact) <= TOL[dtype]
    assert_close_to_mlx(ys, theirs(xs, flat[order], sorted_indices=True), exact, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits,group_size", [(4, 64), (8, 32), (3, 128), (5, 64)])
def test_quantized_multi_linear_matches_mlx_lm(dtype, bits, group_size):
    """MLA attention's per-head products (mlx-lm's QuantizedMultiLinear) as
    DeepSeek-V3 calls them: a decode step's queries, one row a head, by each
    head's weight transposed; a prompt's latent rows, shared by the heads
    (a batch dimension of one), by the weights as they are and transposed."""
    mx.random.seed(7 * bits + group_size)
    heads, in_dims, out_dims = 4, 128, 2 * group_size
    float_layer = MultiLinear(in_dims, out_dims, heads)
    float_layer.weight = sample((heads, out_dims, in_dims), "heavy", dtype) * 0.05
    theirs = float_layer.to_quantized(group_size, bits)
    ours = mqo.nn.QuantizedMultiLinear.from_multi_linear(float_layer, group_size, bits)
    assert type(ours) is mqo.nn.QuantizedMultiLinear
    assert isinstance(ours, LMQuantizedMulti)
    assert (ours.group_size, ours.bits, ours.mode) == (group_size, bits, "affine")
    assert_equal_arrays(ours, theirs)
    assert trainable_names(ours) == trainable_names(theirs) == []

    adopted = mqo.nn.QuantizedMultiLinear.from_quantized(theirs)
    assert_same_arrays(adopted, theirs)
    w = dequantized_f64(theirs)  # [heads, out_dims, in_dims]
    calls = [
        (sample((2, heads, 1, in_dims), "normal", dtype), True),
        (sample((2, 1, 17, out_dims), "normal", dtype), False),
        (sample((2, 1, 9, in_dims), "normal", dtype), True),
    ]
    for x, transpose in calls:
        y = adopted(x, transpose=transpose)
        exact = f64(x) @ (np.swapaxes(w, -1, -2) if transpose else w)
        assert y.shape == exact.shape and y.dtype == dtype, transpose
        assert rel_err(y, exact) <= TOL[dtype], transpose
        assert_close_to_mlx(y, theirs(x, transpose=transpose), exact, dtype)


@pytest.mark.parametrize("device", ("cpu", "simulated-cuda"))
def test_layers_on_empty_inputs(monkeypatch, device):
    """An empty input (no tokens) gives an empty output of the right shape
    and dtype through every layer: on the CPU, and on the CUDA path
    simulated (MLX's ops run on the CPU) with its hand-overs to MLX's ops,
    which must not take an empty call: MLX's CPU op stops the process on
    one (0.32.4), and its lookup refuses it."""
    from cuda_compile import recording

    monkeypatch.setattr(
        affine, "LAYER_BUILTIN_DECODE_BELOW", MEASURED_BUILTIN_DECODE_BELOW
    )
    monkeypatch.setattr(
        affine, "LAYER_BUILTIN_LOOKUP_ROWS", MEASURED_BUILTIN_LOOKUP_ROWS
    )
    mx.random.seed(5)
    dtype = mx.float16
    linear_layer = mqo.nn.QuantizedLinear.from_linear(linear(256, 40, dtype), 64, 4)
    embedding = mqo.nn.QuantizedEmbedding.from_embedding(nn.Embedding(100, 256), 64, 4)
    switch = SwitchLinear(256, 40, 6, bias=False)
    switch.set_dtype(dtype)
    switch = mqo.nn.QuantizedSwitchLinear.from_switch_linear(switch, 64, 4)
    heads = MultiLinear(256, 64, 4)
    heads.set_dtype(dtype)
    heads = mqo.nn.QuantizedMultiLinear.from_multi_linear(heads, 64, 4)
    scope = (
        recording(forced=False)
        if device == "simulated-cuda"
        else contextlib.nullcontext([])
    )
    with scope as launches:
        for _ in range(2):  # planned, then replayed
            y = linear_layer(mx.zeros((1, 0, 256), dtype))
            rows = embedding(mx.zeros((1, 0), mx.int32))
            head = embedding.as_linear(mx.zeros((0, 256), dtype))
            experts = switch(
                mx.zeros((0, 1, 1, 256), dtype), mx.zeros((0, 2), mx.uint32)
            )
            per_head = heads(mx.zeros((1, 4, 0, 256), dtype))
            mx.eval(y, rows, head, experts, per_head)
            assert per_head.shape == (1, 4, 0, 64) and per_head.dtype == dtype
            assert y.shape == (1, 0, 40) and y.dtype == dtype
            assert rows.shape == (1, 0, 256) and rows.dtype == embedding.scales.dtype
            assert head.shape == (0, 100)
            assert experts.shape == (0, 2, 1, 40) and experts.dtype == dtype
        assert launches == []  # nothing empty reaches a kernel
        # Calls that are not empty are handed over as before.
        linear_layer(mx.zeros((1, 1, 256), dtype))
        embedding(mx.zeros((1, 1), mx.int32))
        mx.eval(heads(mx.zeros((1, 4, 1, 256), dtype)))
        handed_over = type(linear_layer._replay) is _kernels.HandedOverReplay
        assert handed_over == (device == "simulated-cuda")
        assert launches == []  # the heads' decode went to MLX's op too


def test_forwards_run_our_ops(monkeypatch):
    """Each forward is planned by mlx_quant_ops' op (its checks and kernel
    choice), not by an mx built-in."""
    calls, flags = [], []

    def spy(name):
        plan = getattr(affine, f"_plan_{name}")

        def wrapped(*args):
            calls.append(name)
            if name == "gather_qmm":
                flags.append(args[-1])  # sorted_indices
            return plan(*args)

        monkeypatch.setattr(affine, f"_plan_{name}", wrapped)

    for name in ("quantized_matmul", "gather_qmm", "dequantize"):
        spy(name)
    clear_plans()  # so every call below meets its op's planner
    lin = mqo.nn.QuantizedLinear(128, 16)
    emb = mqo.nn.QuantizedEmbedding(10, 128)
    sw = mqo.nn.QuantizedSwitchLinear(128, 16, 4)
    x = mx.random.normal((2, 128))
    mx.eval(lin(x))
    assert calls == ["quantized_matmul"]
    mx.eval(emb(mx.array([1, 2])))
    mx.eval(emb.as_linear(x))
    mx.eval(sw(x.reshape(2, 1, 1, 128), mx.array([[0, 3], [1, 1]])))
    mx.eval(sw(x.reshape(2, 1, 128), mx.array([1, 2]), sorted_indices=True))
    assert (
        calls
        == ["quantized_matmul", "dequantize", "quantized_matmul"] + ["gather_qmm"] * 2
    )
    assert flags == [False, True]  # mlx-lm's sorted-experts hint passes on


@pytest.mark.parametrize("device", DEVICES)
def test_layer_calls_replay_their_last_plan(monkeypatch, device):
    """A layer called again with the same weight arrays and input shape
    replays its last planned call without going back to the op's
    CallPlans. New arrays (assigned, updated, or swapped in behind the
    layer's back), a new shape, a forced path, a changed or bad option go
    back there, and every result is the product of the layer's current
    arrays (on the GPU the compiled kernel call, on the CPU the reference
    path's)."""
    with mx.stream(device):
        check_layer_replay(monkeypatch)


def plan_visits(monkeypatch) -> list:
    """The list each trip through an op's ``CallPlans`` appends its plan
    function's name to (a call that did not replay a kept plan). Every
    trip, whether or not it runs the plan, goes through ``CallPlans.plan``."""
    visits = []
    plan = CallPlans.plan

    def counted(self, make, *args):
        visits.append(make.__name__)
        return plan(self, make, *args)

    monkeypatch.setattr(CallPlans, "plan", counted)
    return visits


def check_layer_replay(monkeypatch):
    visits = plan_visits(monkeypatch)
    mx.random.seed(7)
    ours = mqo.nn.QuantizedLinear.from_quantized(
        nn.QuantizedLinear.from_linear(linear(128, 40, mx.float32), 64, 4)
    )
    other = nn.QuantizedLinear.from_linear(linear(128, 40, mx.float32), 64, 4)

    def check(x):
        y = ours(x)
        exact = f64(x) @ dequantized_f64(ours).T + f64(ours.bias)
        assert rel_err(y, exact) <= TOL[mx.float32]

    first, second = sample((3, 128), "normal"), sample((3, 128), "uniform")
    check(first)
    check(second)
    assert len(visits) == 1
    check(first[:1])
    assert len(visits) == 2
    ours.update({"scales": other.scales})  # as DWQ's optimizer step does
    check(first[:1])
    ours.weight = other.weight
    check(first[:1])
    assert len(visits) == 4
    dict.__setitem__(ours, "biases", other.biases)  # bypasses the layer
    check(first[:1])
    check(first[:1])
    assert len(visits) == 5
    clear_plans()  # as after new dispatch rules: nothing kept replays
    check(first[:1])
    assert len(visits) == 6
    with mqo.use_backend("reference"):
        check(first[:1])
    assert len(visits) == 7
    # Another stream of the same device, and another device.
    with mx.stream(mx.new_stream(mx.default_device())):
        check(first[:1])
        check(second[:1])
    with mx.stream(mx.cpu):
        check(first[:1])
    # Options are the layer's attributes, not arrays: a new group size over
    # the old scales goes back to the op's checks, which refuse it.
    ours.group_size = 32
    with pytest.raises(ValueError, match="quantized_matmul"):
        ours(first[:1])
    ours.group_size = 64
    check(first[:1])
    # An option is kept by identity: 1 never stands in for True.
    sw = mqo.nn.QuantizedSwitchLinear(128, 16, 4)
    xs, experts = mx.random.normal((2, 1, 128)), mx.array([1, 2])
    sw(xs, experts, sorted_indices=True)
    with pytest.raises(TypeError, match="sorted_indices"):
        sw(xs, experts, sorted_indices=1)
    # An MoE layer's call varies in two arrays, the input and the experts:
    # new values of both replay, a new shape or dtype of either does not.
    visits.clear()

    def check_switch(xs, experts):
        y = sw(xs, experts)
        exact = switch_oracle(xs, dequantized_f64(sw), experts, sw.bias)
        assert rel_err(y, exact) <= TOL[mx.float32]

    tokens = sample((3, 1, 1, 128), "normal"), sample((3, 1, 1, 128), "uniform")
    picks = mx.array([[1, 2], [0, 3], [2, 2]]), mx.array([[3, 0], [1, 1], [0, 2]])
    check_switch(tokens[0], picks[0])
    check_switch(tokens[1], picks[1])
    assert len(visits) == 1
    check_switch(tokens[1], picks[1].astype(mx.uint32))
    check_switch(tokens[1], picks[1][:, :1])
    check_switch(tokens[1][:2], picks[1][:2])
    assert len(visits) == 4


def test_builtin_decode_rule(monkeypatch):
    """Which layer calls ``layer_decode_on_builtin`` hands to MLX: on the
    CUDA path (pretended here, the rule reads only shapes), at most 8 rows
    of x, fewer weight values than the width's entry, no forced path."""
    monkeypatch.setattr(affine, "LAYER_BUILTIN_DECODE_BELOW", {4: 1 << 24})
    monkeypatch.setattr(affine, "backend", lambda stream: "cuda")
    rule = affine.layer_decode_on_builtin
    below, at = mx.zeros((4095, 512), mx.uint32), mx.zeros((4096, 512), mx.uint32)
    one, eight, nine = (
        mx.zeros(s, mx.float16) for s in [(4096,), (2, 4, 4096), (9, 4096)]
    )
    assert rule(one, below, 4) and rule(eight, below, 4)
    assert not rule(nine, below, 4)
    assert not rule(one, at, 4)  # 4096 x 4096 values is 2**24
    assert not rule(one, mx.zeros((4095, 1024), mx.uint32), 8)  # no 8-bit entry
    # Never an empty x or weight, on which MLX's op may stop the process.
    assert not rule(mx.zeros((0, 4096), mx.float16), below, 4)
    assert not rule(one, mx.zeros((0, 512), mx.uint32), 4)
    with mqo.use_backend("reference"):
        assert not rule(one, below, 4)


def test_builtin_heads_decode_rule(monkeypatch):
    """Which calls of a per-head layer (MLA) ``layer_heads_decode_on_builtin``
    hands to MLX: on the CUDA path, at most 8 rows a head, fewer weight
    values over all heads than the width's entry; and the layer keeps the
    products of weights as they are (``transpose=False``: MLX 0.32.4's CUDA
    build has no float32 kernel for them) and of longer inputs on our
    kernels, recorded on the simulated CUDA path."""
    from cuda_compile import recording

    monkeypatch.setattr(affine, "LAYER_BUILTIN_DECODE_BELOW", {4: 1 << 20})
    rule = affine.layer_heads_decode_on_builtin
    with recording(forced=False):
        below = mx.zeros((15, 128, 64), mx.uint32)  # 15 * 2**16 values
        at = mx.zeros((16, 128, 64), mx.uint32)  # 2**20
        one_a_head, eight, nine = (
            mx.zeros(s, mx.float16)
            for s in [(2, 16, 1, 512), (1, 1, 8, 512), (1, 1, 9, 512)]
        )
        assert rule(one_a_head, below, 4) and rule(eight, below, 4)
        assert not rule(nine, below, 4)
        assert not rule(one_a_head, at, 4)
        assert not rule(one_a_head, below, 8)  # no 8-bit entry
        assert not rule(mx.zeros((2, 16, 0, 512), mx.float16), below, 4)
        assert not rule(mx.zeros((512,), mx.float16), below, 4)
        with mqo.use_backend("reference"):
            assert not rule(one_a_head, below, 4)
    assert not rule(one_a_head, below, 4)  # the CPU path

    multi = MultiLinear(128, 64, 4)
    multi.set_dtype(mx.float16)
    layer = mqo.nn.QuantizedMultiLinear.from_multi_linear(multi, 64, 4)
    with recording(forced=False) as launches:
        decode = layer(mx.ones((1, 4, 1, 128), mx.float16))
        mx.eval(decode)
        assert launches == [] and decode.shape == (1, 4, 1, 64)
        latent = layer(mx.ones((1, 1, 1, 64), mx.float16), transpose=False)
        mx.eval(latent)
        # Half-precision x @ W: the op's dense float32 weight, then a matmul.
        assert [l.kernel.name for l in launches] == ["affine_dequantize"]
        assert latent.shape == (1, 4, 1, 128)
        prompt = layer(mx.ones((1, 1, 9, 128), mx.float16))
        mx.eval(prompt)
        assert [l.kernel.name for l in launches][1:] == ["affine_qmv_mma"]
        assert prompt.shape == (1, 4, 9, 64)
        mx.eval(layer(mx.ones((1, 4, 1, 128), mx.float16)))
        assert len(launches) == 2


def test_builtin_lookup_rule(monkeypatch):
    """Which embedding lookups ``layer_lookup_on_builtin`` hands to MLX: on
    the CUDA path (pretended here, the rule reads only the indices' size),
    at most ``LAYER_BUILTIN_LOOKUP_ROWS`` tokens, no forced path."""
    monkeypatch.setattr(affine, "LAYER_BUILTIN_LOOKUP_ROWS", 8)
    monkeypatch.setattr(affine, "backend", lambda stream: "cuda")
    rule = affine.layer_lookup_on_builtin
    assert rule(mx.array([3])) and rule(mx.zeros((2, 4), mx.int32))
    assert not rule(mx.zeros((1, 9), mx.int32))
    assert not rule(mx.zeros((1, 0), mx.int32))  # mx.dequantize refuses no rows
    with mqo.use_backend("reference"):
        assert not rule(mx.array([3]))
    monkeypatch.setattr(affine, "backend", lambda stream: "reference")
    assert not rule(mx.array([3]))


def test_embedding_lookups_replay_and_hand_over(monkeypatch):
    """On the CUDA path (simulated: MLX's ops run on the CPU, our kernels
    are recorded), a decode-sized lookup is MLX's ``mx.dequantize`` of the
    gathered rows, bit for bit, and replays without the op's plans, also
    between the tied output projections a model alternates it with; a
    prompt-sized lookup runs our kernel; a replaced table is the one looked
    up."""
    from cuda_compile import recording

    monkeypatch.setattr(
        affine, "LAYER_BUILTIN_LOOKUP_ROWS", MEASURED_BUILTIN_LOOKUP_ROWS
    )
    visits = plan_visits(monkeypatch)
    mx.random.seed(9)
    float_layer = nn.Embedding(300, 128)
    theirs = nn.QuantizedEmbedding.from_embedding(float_layer, 64, 4)
    ours = mqo.nn.QuantizedEmbedding.from_quantized(theirs)
    token, prompt = mx.array([[17]]), mx.arange(40).reshape(2, 20)
    hidden = sample((1, 1, 128), "normal")

    def mlx_rows(layer, ids):
        rows = (layer.weight[ids], layer.scales[ids], layer.biases[ids])
        return mx.dequantize(*rows, group_size=64, bits=4)

    with recording(forced=False) as launches:
        for _ in range(3):
            rows = ours(token)
            assert "CustomTransforms" not in graph_ops(rows)
            assert mx.array_equal(rows, mlx_rows(theirs, token))
            ours.as_linear(hidden)
        assert visits == ["_plan_dequantize", "_plan_quantized_matmul"]
        launches.clear()
        rows = ours(prompt)
        assert "CustomTransforms" in graph_ops(rows)
        assert launches  # our kernel, traced for the new shape
        with mqo.use_backend("cuda"):
            assert "CustomTransforms" in graph_ops(ours(token))
        visits.clear()
        ours.scales = theirs.scales * 2  # through the layer: drops its replays
        assert mx.array_equal(ours(token), mlx_rows(ours, token))
        dict.__setitem__(ours, "biases", theirs.biases + 1)  # behind its back
        assert mx.array_equal(ours(token), mlx_rows(ours, token))
    assert visits == ["_plan_dequantize"] * 2


def test_handed_over_call_replays_on_the_layers_options(monkeypatch):
    """A decode call handed to MLX's built-in (on the CUDA path, simulated:
    MLX's op runs on the CPU) replays while the layer's arrays and options
    stay; a changed option goes back to the op's checks instead of running
    the built-in with the old one."""
    from cuda_compile import recording

    monkeypatch.setattr(affine, "LAYER_BUILTIN_DECODE_BELOW", {4: 1 << 30})
    visits = plan_visits(monkeypatch)
    mx.random.seed(5)
    theirs = nn.QuantizedLinear.from_linear(linear(128, 40, mx.float32), 64, 4)
    ours = mqo.nn.QuantizedLinear.from_quantized(theirs)
    x = sample((1, 128), "normal")
    with recording(forced=False) as launches:
        for _ in range(3):
            y = ours(x)
            assert "QuantizedMatmul" in graph_ops(y)
            assert mx.array_equal(y, theirs(x))
        assert visits == ["_plan_quantized_matmul"]
        assert launches == []  # our kernel was not even traced for it
        ours.group_size = 32
        with pytest.raises(ValueError, match="quantized_matmul"):
            ours(x)
        ours.group_size = 64  # the kept call's option again: it replays
        assert mx.array_equal(ours(x), theirs(x))
    assert visits == ["_plan_quantized_matmul"] * 2


def test_layer_replay_keeps_no_replaced_arrays_alive():
    """The replay a layer keeps holds its arrays; replacing (``update``) or
    deleting them drops it, so their memory is freed at once, not at the
    layer's next call."""

    def mlx_layer():
        layer = nn.QuantizedLinear.from_linear(
            linear(1024, 2048, mx.float32, bias=False), 64, 4
        )
        mx.eval(layer.parameters())
        return layer

    keys = ("weight", "scales", "biases")
    ours = mqo.nn.QuantizedLinear.from_quantized(mlx_layer())
    x = mx.random.normal((1, 1024))
    mx.eval(ours(x), ours(x))  # the second call replays the kept one
    size = sum(ours[key].nbytes for key in keys)
    replacement = dict(mlx_layer())  # its arrays, the layer let go
    before = mx.get_active_memory()
    ours.update(replacement)
    assert before - mx.get_active_memory() >= size
    mx.eval(ours(x), ours(x))
    del replacement  # the layer and its replay hold the new arrays now
    before = mx.get_active_memory()
    for key in keys:
        del ours[key]
    assert before - mx.get_active_memory() >= size


def test_layer_replay_runs_only_what_it_was_planned_for(monkeypatch):
    """``LayerReplay.replay`` runs the kept function on the call's arrays
    for an input (and expert indices) of the kept shapes and dtypes, the
    same array and option objects, forced path, testing switches, plan
    generation and default device; anything else gives None (planning)."""
    calls, kept = [], mx.array(0)

    def run(*arrays):
        calls.append(arrays)
        return kept

    w, scales, biases = mx.zeros((8, 4), mx.uint32), mx.ones((8, 1)), mx.ones((8, 1))
    x, experts = mx.ones((1, 32)), mx.array([[1, 2]])
    linear_call = (w, scales, biases, 32, 4)
    replay = _kernels.LayerReplay(run, x, *linear_call)
    new_x = mx.zeros((1, 32))
    assert replay.replay(new_x, *linear_call) is kept
    assert same_objects(calls.pop(), (new_x, w, scales, biases))
    # The input: shape, dtype, type.
    assert replay.replay(mx.zeros((2, 32)), *linear_call) is None
    assert replay.replay(x.astype(mx.float16), *linear_call) is None
    assert replay.replay(np.ones((1, 32), np.float32), *linear_call) is None
    # The layer's arrays and options, by identity.
    for position, other in enumerate([mx.array(w), mx.array(scales), mx.array(biases)]):
        changed = list(linear_call)
        changed[position] = other
        assert replay.replay(x, *changed) is None
    assert replay.replay(x, w, scales, biases, 64, 4) is None
    assert replay.replay(x, w, scales, biases, 32, 8) is None
    # What the plan rests on besides its arguments.
    with mqo.use_backend("reference"):
        assert replay.replay(x, *linear_call) is None
    with _kernels.poison_outputs():
        assert replay.replay(x, *linear_call) is None
    token = _kernels.CUDA_INCLUDES.set(False)
    assert replay.replay(x, *linear_call) is None
    _kernels.CUDA_INCLUDES.reset(token)
    with mx.stream(mx.new_stream(mx.default_device())):
        assert replay.replay(x, *linear_call) is kept  # not compared
    other_device = mx.gpu if mx.default_device() == mx.cpu else mx.cpu
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(other_device))
    assert replay.replay(x, *linear_call) is None
    monkeypatch.undo()
    assert replay.replay(x, *linear_call) is kept
    clear_plans()
    assert replay.replay(x, *linear_call) is None
    # An MoE layer's call: the indices by shape and dtype, its flag by
    # identity (1 never passes for True); a linear layer's replay takes
    # no indices and a switch layer's needs them.
    calls.clear()
    switch = _kernels.LayerReplay(run, x, *linear_call, experts, True)
    new_experts = mx.array([[3, 0]])
    assert switch.replay(x, *linear_call, new_experts, True) is kept
    assert same_objects(calls.pop(), (x, w, scales, biases, None, new_experts))
    assert switch.replay(x, *linear_call, mx.array([[3]]), True) is None
    uint_experts = experts.astype(mx.uint32)
    assert switch.replay(x, *linear_call, uint_experts, True) is None
    assert switch.replay(x, *linear_call, experts, 1) is None
    assert switch.replay(x, *linear_call, experts, False) is None
    assert switch.replay(x, *linear_call, np.array([[1, 2]]), True) is None
    assert switch.replay(x, *linear_call) is None
    linear_replay = _kernels.LayerReplay(run, x, *linear_call)
    assert linear_replay.replay(x, *linear_call, experts, None) is None
    assert calls == []


def test_handed_over_replay_compares_what_the_hand_over_rests_on(monkeypatch):
    """``HandedOverReplay.replay`` runs another library's op (positional
    ``quantized_matmul`` arguments) on the layer's current arrays and
    options while the input's shape and dtype, the weight, the options, the
    plan generation and the default device stay and no path is forced.
    The scales and biases go to the op as they are, and our kernels'
    testing switches do not concern it."""
    calls, kept = [], mx.array(0)

    def op(*arguments):
        calls.append(arguments)
        return kept

    w, scales, biases = mx.zeros((8, 4), mx.uint32), mx.ones((8, 1)), mx.ones((8, 1))
    x = mx.ones((1, 32))
    replay = _kernels.HandedOverReplay(op, x, w, scales, biases, 32, 4)
    new_x, new_scales, new_biases = mx.zeros((1, 32)), mx.ones((8, 1)), mx.ones((8, 1))
    assert replay.replay(new_x, w, new_scales, new_biases, 32, 4) is kept
    assert same_objects(calls.pop()[:4], (new_x, w, new_scales, new_biases))
    assert replay.replay(x, w, scales, biases, 32, 4) is kept
    assert calls.pop()[4:] == (True, 32, 4)
    with _kernels.poison_outputs():
        assert replay.replay(x, w, scales, biases, 32, 4) is kept
    token = _kernels.CUDA_INCLUDES.set(False)
    assert replay.replay(x, w, scales, biases, 32, 4) is kept
    _kernels.CUDA_INCLUDES.reset(token)
    calls.clear()
    for call in [
        (mx.zeros((2, 32)), w, scales, biases, 32, 4),
        (x.astype(mx.float16), w, scales, biases, 32, 4),
        (x.astype(mx.int32), w, scales, biases, 32, 4),  # MLX's op would take it
        (np.ones((1, 32), np.float32), w, scales, biases, 32, 4),
        (x, mx.array(w), scales, biases, 32, 4),
        (x, w, scales, biases, 64, 4),
        (x, w, scales, biases, 32, 8),
    ]:
        assert replay.replay(*call) is None
    assert replay.replay(x, w, scales, biases, 32, 4, mx.array([[1]])) is None
    with mqo.use_backend("reference"):
        assert replay.replay(x, w, scales, biases, 32, 4) is None
    other_device = mx.gpu if mx.default_device() == mx.cpu else mx.cpu
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(other_device))
    assert replay.replay(x, w, scales, biases, 32, 4) is None
    monkeypatch.undo()
    clear_plans()
    assert replay.replay(x, w, scales, biases, 32, 4) is None
    assert calls == []


def same_objects(got: tuple, expected: tuple) -> bool:
    """Whether two tuples hold the same objects, position by position."""
    return len(got) == len(expected) and all(a is b for a, b in zip(got, expected))


def graph_ops(y):
    """The primitives of the graph that computes ``y`` (inputs evaluated
    beforehand leave theirs out)."""
    dot = io.StringIO()
    mx.export_to_dot(dot, y)
    return set(re.findall(r'label ="(\w+)"', dot.getvalue()))


def assert_same_scale_bias_grads(ours, theirs, x):
    """The gradients of a loss on each layer's output for ``x`` with
    respect to its scales and biases (unfrozen here) are bit for bit the
    same: the hand-overs run MLX's op, so they train as MLX's layer does."""
    for m in (ours, theirs):
        m.unfreeze(keys=["scales", "biases"], recurse=False)
    loss = lambda m: (m(x).astype(mx.float32) ** 2).sum()  # noqa: E731
    ours_g = nn.value_and_grad(ours, lambda: loss(ours))()[1]
    theirs_g = nn.value_and_grad(theirs, lambda: loss(theirs))()[1]
    assert sorted(k for k, _ in tree_flatten(ours_g)) == ["biases", "scales"]
    for (k, a), (_, b) in zip(tree_flatten(ours_g), tree_flatten(theirs_g)):
        assert mx.array_equal(a, b), k


@pytest.mark.gpu
def test_small_decodes_run_on_mlx_builtin(monkeypatch):
    """On CUDA a linear layer's decode call (at most 8 rows) of a weight
    below its width's size in ``LAYER_BUILTIN_DECODE_BELOW`` is one
    ``mx.quantized_matmul``, bit for bit, its gradients too; longer
    inputs, larger weights, unlisted widths and a forced path run our
    kernel, bit for bit the public op's. The graph's primitives say which
    ran (the two kernels can round alike)."""
    if mqo.backend(mx.default_stream(mx.gpu)) != "cuda":
        pytest.skip("the hand-over is measured on CUDA only")

    def hand_over_below(table):
        monkeypatch.setattr(affine, "LAYER_BUILTIN_DECODE_BELOW", table)
        clear_plans()  # as after any change of the dispatch rules

    hand_over_below(MEASURED_BUILTIN_DECODE_BELOW)
    mx.random.seed(11)

    def layers(out_dims, in_dims, bits):
        theirs = nn.QuantizedLinear.from_linear(
            linear(in_dims, out_dims, mx.float16, bias=False), 64, bits
        )
        mx.eval(theirs.parameters())
        return theirs, mqo.nn.QuantizedLinear.from_quantized(theirs)

    def ran_builtin(layer, x):
        mx.eval(x)
        args = (x, layer.weight, layer.scales, layer.biases, True, 64, layer.bits)
        first, again = layer(x), layer(x)  # the second replays what the first kept
        builtin = "QuantizedMatmul" in graph_ops(first)
        assert ("QuantizedMatmul" in graph_ops(again)) == builtin
        expected = (mx.quantized_matmul if builtin else mqo.quantized_matmul)(*args)
        assert mx.array_equal(first, expected) and mx.array_equal(again, expected)
        return builtin

    with mx.stream(mx.gpu):
        theirs, small = layers(512, 2048, 4)
        one, eight = sample((1, 2048), "normal", mx.float16), sample(
            (2, 4, 2048), "normal", mx.float16
        )
        assert ran_builtin(small, one) and ran_builtin(small, eight)
        assert mx.array_equal(small(one), theirs(one))
        assert not ran_builtin(small, sample((17, 2048), "normal", mx.float16))
        # Arrays swapped in behind the layer's back are the ones multiplied
        # (the replay compares them by identity and plans again).
        small(one)
        dict.__setitem__(small, "biases", small.biases + 1)
        expected = mx.quantized_matmul(
            one, small.weight, small.scales, small.biases, True, 64, 4
        )
        assert mx.array_equal(small(one), expected)
        dict.__setitem__(small, "biases", theirs.biases)
        with mqo.use_backend("cuda"):
            assert not ran_builtin(small, one)
        assert ran_builtin(small, one)
        # A weight of exactly 4 bits' limit is not below it; at 8 bits the
        # same shape is (the wider the codes, the later our kernel wins).
        limit = MEASURED_BUILTIN_DECODE_BELOW[4]
        assert MEASURED_BUILTIN_DECODE_BELOW[8] > limit
        one_4096 = sample((1, 4096), "normal", mx.float16)
        _, at_limit = layers(limit // 4096, 4096, 4)
        assert not ran_builtin(at_limit, one_4096)
        _, at_limit_8bit = layers(limit // 4096, 4096, 8)
        assert ran_builtin(at_limit_8bit, one_4096)
        unlisted = {b: n for b, n in MEASURED_BUILTIN_DECODE_BELOW.items() if b != 4}
        hand_over_below(unlisted)
        assert not ran_builtin(small, one)
        hand_over_below(MEASURED_BUILTIN_DECODE_BELOW)

        assert_same_scale_bias_grads(small, theirs, one)


@pytest.mark.gpu
def test_small_lookups_run_on_mlx_builtin(monkeypatch):
    """On CUDA an embedding lookup of at most ``LAYER_BUILTIN_LOOKUP_ROWS``
    tokens is MLX's ``mx.dequantize`` of the gathered rows, bit for bit,
    with MLX's layer's gradients for the scales and biases; a longer one
    runs our kernel, bit for bit the public op's."""
    if mqo.backend(mx.default_stream(mx.gpu)) != "cuda":
        pytest.skip("the hand-over is measured on CUDA only")
    monkeypatch.setattr(
        affine, "LAYER_BUILTIN_LOOKUP_ROWS", MEASURED_BUILTIN_LOOKUP_ROWS
    )
    clear_plans()
    mx.random.seed(12)
    float_layer = nn.Embedding(1000, 512)
    float_layer.weight = sample((1000, 512), "normal", mx.float16)
    theirs = nn.QuantizedEmbedding.from_embedding(float_layer, 64, 4)
    mx.eval(theirs.parameters())
    ours = mqo.nn.QuantizedEmbedding.from_quantized(theirs)
    with mx.stream(mx.gpu):
        token = mx.array([[411]])
        for _ in range(2):  # planned, then replayed
            rows = ours(token)
            assert "CustomTransforms" not in graph_ops(rows)
            assert mx.array_equal(rows, theirs(token))
        prompt = mx.arange(0, 1000, 59).reshape(1, -1)
        rows = ours(prompt)
        assert "CustomTransforms" in graph_ops(rows)
        gathered = (ours.weight[prompt], ours.scales[prompt], ours.biases[prompt])
        assert mx.array_equal(rows, mqo.dequantize(*gathered, group_size=64, bits=4))

        assert_same_scale_bias_grads(ours, theirs, token)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["linear", "embedding", "switch", "heads"])
def test_freezing_and_gradients_match_mlx(kind, device):
    """DWQ's recipe: unfreeze scales and biases, differentiate through the
    forward; trainable sets and gradients equal MLX's (computed on the CPU:
    MLX's CUDA matmuls may round float32 to TF32)."""
    mx.random.seed(3)
    if kind == "linear":
        theirs = nn.QuantizedLinear.from_linear(linear(256, 48, mx.float32), 64, 4)
        ours = mqo.nn.QuantizedLinear.from_quantized(theirs)
        x = mx.random.normal((5, 256))
        run = lambda m: m(x)  # noqa: E731
    elif kind == "embedding":
        emb = nn.Embedding(50, 256)
        theirs = nn.QuantizedEmbedding.from_embedding(emb, 32, 3)
        ours = mqo.nn.QuantizedEmbedding.from_quantized(theirs)
        tokens, x = mx.array([[1, 4, 4, 49]]), mx.random.normal((3, 256))
        run = lambda m: m(tokens).sum() + m.as_linear(x)  # noqa: E731
    elif kind == "heads":
        theirs = MultiLinear(256, 24, 3).to_quantized(64, 4)
        ours = mqo.nn.QuantizedMultiLinear.from_quantized(theirs)
        x, latent = mx.random.normal((2, 3, 1, 256)), mx.random.normal((2, 1, 5, 24))
        run = lambda m: m(x).sum() + m(latent, transpose=False)  # noqa: E731
    else:
        sw = SwitchLinear(256, 24, 4, bias=True)
        theirs = sw.to_quantized(64, 4)
        ours = mqo.nn.QuantizedSwitchLinear.from_quantized(theirs)
        x, idx = mx.random.normal((5, 1, 1, 256)), mx.array([[0, 3]] * 2 + [[2, 1]] * 3)
        run = lambda m: m(x, idx)  # noqa: E731

    assert trainable_names(ours) == trainable_names(theirs)
    for m in (ours, theirs):
        m.unfreeze(keys=["scales", "biases"], recurse=False)
    assert trainable_names(ours) == trainable_names(theirs)
    assert "scales" in trainable_names(ours) and "weight" not in trainable_names(ours)

    def grads(m, stream):
        loss = lambda: (run(m) ** 2).sum()  # noqa: E731
        with mx.stream(stream):
            return dict(tree_flatten(nn.value_and_grad(m, loss)()[1]))

    ours_g = grads(ours, device)
    theirs_g = grads(theirs, mx.cpu)
    assert ours_g.keys() == theirs_g.keys()
    # The scales' gradient is a float32 matmul of the cotangent and x, which
    # MLX's CUDA backend may round to TF32 (about 1e-4 relative per product).
    bound = 1e-4 if device == mx.cpu else 1e-3
    for k in ours_g:
        assert rel_err(ours_g[k], f64(theirs_g[k])) <= bound, k

    for m in (ours, theirs):
        m.freeze()
    assert trainable_names(ours) == trainable_names(theirs) == []


def test_constructors_match_mlx():
    pairs = [
        (mqo.nn.QuantizedLinear(64, 32), nn.QuantizedLinear(64, 32)),
        (
            mqo.nn.QuantizedLinear(64, 32, False, 32, 8),
            nn.QuantizedLinear(64, 32, False, 32, 8),
        ),
        (
            mqo.nn.QuantizedEmbedding(10, 128, 128, 3),
            nn.QuantizedEmbedding(10, 128, 128, 3),
        ),
        (mqo.nn.QuantizedSwitchLinear(64, 32, 4), LMQuantizedSwitch(64, 32, 4)),
        (
            mqo.nn.QuantizedMultiLinear(64, 32, 4),
            LMQuantizedMulti(64, 32, 4, 64, 4, "affine"),
        ),
        (
            mqo.nn.QuantizedMultiLinear(128, 16, 2, 32, 3),
            LMQuantizedMulti(128, 16, 2, 32, 3, "affine"),
        ),
    ]
    for ours, theirs in pairs:
        for attr in ("group_size", "bits", "mode"):
            assert getattr(ours, attr) == getattr(theirs, attr)
        a, b = dict(tree_flatten(ours.parameters())), dict(
            tree_flatten(theirs.parameters())
        )
        assert {k: (v.shape, v.dtype) for k, v in a.items()} == {
            k: (v.shape, v.dtype) for k, v in b.items()
        }
        assert trainable_names(ours) == trainable_names(theirs)


def test_constructors_reject_other_modes():
    with pytest.raises(
        ValueError, match=r"\[mlx_quant_ops\.nn\.QuantizedLinear\] mode"
    ):
        mqo.nn.QuantizedLinear(64, 32, mode="mxfp4")
    with pytest.raises(ValueError, match=r"nn\.QuantizedEmbedding\] mode.*'mxfp8'"):
        mqo.nn.QuantizedEmbedding(10, 64, mode="mxfp8")
    with pytest.raises(ValueError, match=r"nn\.QuantizedSwitchLinear\] mode"):
        mqo.nn.QuantizedSwitchLinear(64, 32, 4, mode="nvfp4")
    with pytest.raises(ValueError, match=r"nn\.QuantizedMultiLinear\] mode"):
        mqo.nn.QuantizedMultiLinear(64, 32, 4, 32, 4, "mxfp4")
    with pytest.raises(ValueError, match=r"from_multi_linear\] mode"):
        mqo.nn.QuantizedMultiLinear.from_multi_linear(
            MultiLinear(64, 32, 4), mode="nvfp4"
        )
    with pytest.raises(TypeError, match=r"QuantizedMultiLinear.from_quantized\] layer"):
        mqo.nn.QuantizedMultiLinear.from_quantized(nn.QuantizedLinear(64, 32))
    fp4_heads = LMQuantizedMulti(64, 32, 4, 32, 4, "mxfp4")
    with pytest.raises(ValueError, match=r"QuantizedMultiLinear.from_quantized\] mode"):
        mqo.nn.QuantizedMultiLinear.from_quantized(fp4_heads)
    fp4 = nn.QuantizedLinear(64, 32, mode="mxfp4")
    with pytest.raises(ValueError, match=r"from_quantized\] mode.*'mxfp4'"):
        mqo.nn.QuantizedLinear.from_quantized(fp4)
    with pytest.raises(TypeError, match=r"from_quantized\] layer: expected a mlx"):
        mqo.nn.QuantizedLinear.from_quantized(nn.QuantizedEmbedding(10, 64))
    with pytest.raises(ValueError, match="from_linear"):
        mqo.nn.QuantizedLinear.from_linear(nn.Linear(64, 32), mode="nvfp4")
    with pytest.raises(
        TypeError, match=r"nn\.patch\] model: expected an mlx.nn.Module"
    ):
        mqo.nn.patch({"not": "a module"})


# ---------------------------------------------------------------- patch()


class Custom(nn.QuantizedLinear):
    """A model-specific subclass: patch() must leave it alone."""


class Block(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.proj = nn.Linear(dims, dims)
        self.experts = SwitchGLU(dims, 64, 4)
        self.head = {"a": nn.Linear(dims, 32, bias=False), "b": [nn.Linear(dims, 32)]}

    def __call__(self, x):
        x = self.proj(x)
        x = x + self.experts(x, mx.array([[[0, 2], [3, 1], [1, 1]]])).sum(axis=-2)
        return self.head["a"](x) + self.head["b"][0](x)


class Toy(nn.Module):
    def __init__(self, dims=128):
        super().__init__()
        self.embed = nn.Embedding(100, dims)
        self.blocks = [Block(dims), Block(dims)]
        self.fp4 = nn.Linear(dims, dims)
        self.kept_float = nn.Linear(dims, dims)
        self.custom = Custom(dims, dims)

    def __call__(self, tokens):
        x = self.embed(tokens)
        x = self.kept_float(self.fp4(x)) + self.custom(x)
        return sum(b(x) for b in self.blocks) + self.embed.as_linear(x).sum()


def toy_quantized():
    mx.random.seed(5)
    model = Toy()

    def predicate(path, module):
        if path == "fp4":
            return {"group_size": 32, "bits": 4, "mode": "mxfp4"}
        if path.endswith("head.a"):
            return {"group_size": 32, "bits": 8}
        return path != "kept_float" and hasattr(module, "to_quantized")

    nn.quantize(model, 64, 4, class_predicate=predicate)
    return model


def module_types(model):
    return {name: type(m) for name, m in model.named_modules()}


def test_patch_swaps_affine_layers_in_place():
    model = toy_quantized()
    model.blocks[1].proj.unfreeze(keys=["scales"], recurse=False)
    model.blocks[0].head["b"][0].freeze()
    model.eval()
    tokens = mx.array([[3, 1, 4]])
    before = model(tokens)
    params_before = dict(tree_flatten(model.parameters()))
    trainable_before = trainable_names(model)
    untouched = [model.fp4, model.kept_float, model.custom]

    assert mqo.nn.patch(model) is model

    types = module_types(model)
    assert types["embed"] is mqo.nn.QuantizedEmbedding
    for b in ("blocks.0", "blocks.1"):
        assert types[f"{b}.proj"] is mqo.nn.QuantizedLinear
        assert types[f"{b}.head.a"] is mqo.nn.QuantizedLinear
        assert types[f"{b}.head.b.0"] is mqo.nn.QuantizedLinear
        for p in ("gate_proj", "up_proj", "down_proj"):
            assert types[f"{b}.experts.{p}"] is mqo.nn.QuantizedSwitchLinear
    assert (
        model.blocks[0].head["a"].bits == 8
        and model.blocks[0].head["a"].group_size == 32
    )
    # Other modes, float layers and subclasses stay as they were.
    assert all(
        a is b for a, b in zip(untouched, [model.fp4, model.kept_float, model.custom])
    )
    assert type(model.fp4) is nn.QuantizedLinear and model.fp4.mode == "mxfp4"
    # Same arrays, same trainable set, same mode, same function.
    params_after = dict(tree_flatten(model.parameters()))
    assert params_after.keys() == params_before.keys()
    assert all(params_after[k] is params_before[k] for k in params_after)
    assert trainable_names(model) == trainable_before
    assert "blocks.1.proj.scales" in trainable_before
    assert "blocks.0.head.b.0.bias" not in trainable_before
    assert not any(m.training for _, m in model.named_modules())
    assert rel_err(model(tokens), f64(before)) <= 1e-5

    # The model's class is extended (same name, a subclass) to run calls
    # as steps.
    stepped = type(model)
    assert stepped.__bases__ == (Toy,) and stepped.__name__ == "Toy"
    assert isinstance(model, Toy)

    # Idempotent: a second patch keeps every module object and the class.
    modules = dict(model.named_modules())
    assert mqo.nn.patch(model) is model
    assert all(modules[k] is m for k, m in model.named_modules())
    assert type(model) is stepped


def test_patch_bare_layer_returns_replacement():
    layer = nn.QuantizedLinear(64, 32, group_size=32, bits=8)
    layer.unfreeze()
    patched = mqo.nn.patch(layer)
    assert type(patched) is mqo.nn.QuantizedLinear
    assert_same_arrays(patched, layer)
    assert (
        trainable_names(patched)
        == trainable_names(layer)
        == ["bias", "biases", "scales", "weight"]
    )
    assert mqo.nn.patch(patched) is patched
    patched.freeze()  # the replacement's frozen set is its own
    assert trainable_names(layer) == ["bias", "biases", "scales", "weight"]
    fp4 = nn.QuantizedLinear(64, 32, mode="mxfp4")
    assert mqo.nn.patch(fp4) is fp4


def test_quantize_is_nn_quantize_then_patch():
    mx.random.seed(9)
    model = Toy()
    reference = Toy()
    reference.update(model.parameters())
    assert mqo.nn.quantize(model, 32, 8) is model
    nn.quantize(reference, 32, 8)
    types = module_types(model)
    # The model itself runs as steps (see test_patched_models_run_as_steps).
    assert types.pop("") is mqo.nn._stepped(Toy)
    for name, cls in module_types(reference).items():
        if not name:
            continue
        expected = {
            nn.QuantizedLinear: mqo.nn.QuantizedLinear,
            nn.QuantizedEmbedding: mqo.nn.QuantizedEmbedding,
            LMQuantizedSwitch: mqo.nn.QuantizedSwitchLinear,
        }.get(cls, cls)
        assert types[name] is expected, name
    assert_equal_arrays(model, reference)


# ---------------------------------------------------------- mlx-lm models

VOCAB = 512


CONFIGS = {
    "llama": dict(
        model_type="llama",
        hidden_size=256,
        num_hidden_layers=2,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=VOCAB,
        tie_word_embeddings=True,  # output through QuantizedEmbedding.as_linear
    ),
    "qwen3_moe": dict(
        model_type="qwen3_moe",
        hidden_size=256,
        num_hidden_layers=2,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=8,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        moe_intermediate_size=128,
        rms_norm_eps=1e-6,
        vocab_size=VOCAB,
        head_dim=64,
        rope_theta=1e6,
        tie_word_embeddings=False,  # output through a QuantizedLinear lm_head
        max_position_embeddings=4096,
        norm_topk_prob=True,
    ),
}
MODULES = {"llama": llama, "qwen3_moe": qwen3_moe}
MODELS = list(CONFIGS)


def random_model(arch):
    mx.random.seed(0)
    module = MODULES[arch]
    model = module.Model(module.ModelArgs.from_dict(CONFIGS[arch]))
    # The default init gives near-uniform logits and a random model then
    # repeats one token; scaled-up weights give varied, well-separated
    # logits, so equal greedy tokens mean something.
    model.update(tree_map(lambda p: p * 4 if p.ndim > 1 else p, model.parameters()))
    mx.eval(model.parameters())
    return model


def greedy(model, stream, n=16):
    # 40 prompt tokens x top-2 experts = 80 expert rows: mlx-lm's SwitchGLU
    # sorts them (>= 64), so prefill takes the sorted gather_qmm path and
    # each decode step the unsorted one.
    prompt = (mx.arange(40) * 37) % VOCAB
    return [
        int(t) for t, _ in generate_step(prompt, model, stream=stream, max_tokens=n)
    ]


def check_patched_model_generates_same(arch, bits, group_size, stream):
    model = random_model(arch)
    nn.quantize(model, group_size, bits)
    prompt = ((mx.arange(24) * 13) % VOCAB)[None]
    with mx.stream(stream):
        logits = model(prompt)
    tokens = greedy(model, stream)
    assert len(set(tokens)) > 4, tokens  # the check is not a constant sequence

    assert mqo.nn.patch(model) is model
    kinds = {type(m) for _, m in model.named_modules()}
    assert not kinds & {nn.QuantizedLinear, nn.QuantizedEmbedding, LMQuantizedSwitch}
    assert mqo.nn.QuantizedLinear in kinds and mqo.nn.QuantizedEmbedding in kinds
    if arch == "qwen3_moe":
        assert mqo.nn.QuantizedSwitchLinear in kinds

    with mx.stream(stream):
        patched_logits = model(prompt)
    # Two implementations of the same float32 model: ours is exact float32
    # on every path, while MLX's CUDA backend allows TF32 for float32 by
    # default (MLX_ENABLE_TF32), about 1e-4 relative error per product, so
    # the GPU comparison allows for that. The tokens must match exactly.
    bound = 1e-4 if mqo.backend(stream) == "reference" else 1e-3
    assert rel_err(patched_logits, f64(logits)) <= bound
    assert greedy(model, stream) == tokens


def count_handed_over_checks(monkeypatch) -> list:
    """The list each full check of a handed-over call
    (``HandedOverReplay.replay``) appends to."""
    checks = []
    replay = _kernels.HandedOverReplay.replay

    def counted(self, *args):
        checks.append(1)
        return replay(self, *args)

    monkeypatch.setattr(_kernels.HandedOverReplay, "replay", counted)
    return checks


@pytest.mark.parametrize("arch", MODELS)
def test_decode_steps_replay_on_the_cuda_path(monkeypatch, arch):
    """On the CUDA path (simulated without a GPU: our kernels recorded, not
    run; MLX's ops on the CPU), a patched model's decode steps plan nothing
    once the first has run: every layer replays its last call, the small
    projections and the embedding lookup handed to MLX's built-ins. A
    layer that planned again would cost the host tens of µs a token, which
    no result shows."""
    from cuda_compile import recording

    model = random_model(arch)
    model.set_dtype(mx.float16)
    nn.quantize(model, 64, 4)
    mqo.nn.patch(model)
    # Attention projections (at most 256x256 values) to MLX's built-in, the
    # MLP and the head to our kernels, as on a Llama-3-8B-shaped model.
    table = {bits: 256 * 256 + 1 for bits in MEASURED_BUILTIN_DECODE_BELOW}
    monkeypatch.setattr(affine, "LAYER_BUILTIN_DECODE_BELOW", table)
    monkeypatch.setattr(
        affine, "LAYER_BUILTIN_LOOKUP_ROWS", MEASURED_BUILTIN_LOOKUP_ROWS
    )
    visits = plan_visits(monkeypatch)
    checks = count_handed_over_checks(monkeypatch)
    with recording(forced=False) as launches:
        cache = make_prompt_cache(model)
        token = mx.argmax(model(((mx.arange(24) * 13) % VOCAB)[None], cache=cache))
        for step in range(5):
            logits = model(token.reshape(1, 1), cache=cache)
            if step == 1:
                visits.clear()
                launches.clear()
                checks.clear()
            ops = graph_ops(logits)  # MLX's op and our kernel's custom function
            assert {"QuantizedMatmul", "CustomTransforms"} <= ops
            token = mx.argmax(logits[0, -1])
            mx.eval(token)
    assert visits == []
    assert launches == []  # our kernel calls replayed their compiled graphs
    assert checks == []  # the handed-over calls ran in the model's steps


def llama_handed_over(monkeypatch):
    """A float16 4-bit Llama whose every decode call and lookup goes to
    MLX's built-ins on CUDA, with its two layer sets, MLX's and ours
    (patched), for ``model.update_modules``."""
    monkeypatch.setattr(affine, "LAYER_BUILTIN_DECODE_BELOW", {4: 1 << 40})
    monkeypatch.setattr(
        affine, "LAYER_BUILTIN_LOOKUP_ROWS", MEASURED_BUILTIN_LOOKUP_ROWS
    )
    model, theirs = patched_half_llama()
    return model, {"theirs": theirs, "ours": model.leaf_modules()}


def patched_half_llama(fuse_siblings=False):
    """A float16 4-bit Llama, patched (with ``fuse_siblings``), and MLX's
    layer set for it."""
    model = random_model("llama")
    model.set_dtype(mx.float16)
    nn.quantize(model, 64, 4)
    mx.eval(model.parameters())
    theirs = model.leaf_modules()
    mqo.nn.patch(model, fuse_siblings=fuse_siblings)
    return model, theirs


def decode_logits(model, layers, tokens):
    """The logits of decoding ``tokens`` one at a time from an empty cache
    on ``layers``."""
    model.update_modules(layers)
    cache = make_prompt_cache(model)
    steps = [model(mx.array([[t]]), cache=cache) for t in tokens]
    mx.eval(steps)
    return steps


def test_patched_models_run_as_steps(monkeypatch):
    """A patched model's forward is a step (simulated CUDA path: MLX's ops
    on the CPU): its handed-over layer calls skip the per-call checks
    (none reaches ``HandedOverReplay.replay`` once planned) and compute
    what MLX's layers do, bit for bit. The step ends with the forward,
    raised or returned; layers called on their own, a forced path and
    cleared plans get every check again."""
    from cuda_compile import recording

    tokens = [5, 77, 300, 12, 5, 9]
    with recording(forced=False) as launches:
        model, layer_sets = llama_handed_over(monkeypatch)
        expected = decode_logits(model, layer_sets["theirs"], tokens)
        decode_logits(model, layer_sets["ours"], tokens[:1])  # plans each call
        checks = count_handed_over_checks(monkeypatch)
        visits = plan_visits(monkeypatch)
        got = decode_logits(model, layer_sets["ours"], tokens)
        assert all(mx.array_equal(a, b) for a, b in zip(got, expected))
        assert checks == [] and visits == [] and launches == []
        assert _kernels._step.get() == 0

        # On its own, a layer checks everything: an integer input of the
        # kept size is refused as the op refuses it.
        layer = model.model.layers[0].self_attn.q_proj
        mlx_layer = layer_sets["theirs"]["model"]["layers"][0]["self_attn"]["q_proj"]
        x = mx.ones((1, 1, 256), mx.float16)
        assert mx.array_equal(layer(x), mlx_layer(x))
        assert len(checks) == 1
        with pytest.raises(TypeError, match="quantized_matmul"):
            layer(x.astype(mx.int32))

        # Inside a step, a call on a weight put in behind the layer's back
        # and a prefill's calls (more rows than kept) get every check too.
        up_proj = model.model.layers[1].mlp.up_proj
        dict.__setitem__(up_proj, "weight", mx.array(up_proj.weight))
        checks.clear()
        decode_logits(model, layer_sets["ours"], tokens[:2])
        assert len(checks) == 1
        checks.clear()
        mx.eval(model(mx.array([tokens * 2])))
        assert len(checks) == 15

        # A forward that raises ends its step too.
        with pytest.raises(ValueError, match="indices"):
            model(mx.zeros((1, 1), mx.float32))  # float token ids
        assert _kernels._step.get() == 0

        # Cleared plans (the dispatch rules may have changed): each call
        # plans again, once, then the steps skip the checks again.
        clear_plans()
        visits.clear()
        decode_logits(model, layer_sets["ours"], tokens[:1])
        planned = len(visits)
        # 2 layers of 7 projections, and the tied head.
        assert visits.count("_plan_quantized_matmul") == 15
        decode_logits(model, layer_sets["ours"], tokens[:2])
        assert len(visits) == planned

        # A forced path reaches every call, which then runs our kernel.
        checks.clear()
        launches.clear()
        with mqo.use_backend("cuda"):
            decode_logits(model, layer_sets["ours"], tokens[:1])
        assert len(checks) == 15
        assert any(a.kernel.name.startswith("affine_qmv") for a in launches)


@pytest.mark.gpu
def test_steps_decode_as_mlx_layers_gpu(monkeypatch):
    """On CUDA, a patched Llama whose every decode call and lookup goes to
    MLX's built-ins decodes bit for bit as on MLX's layers, and once each
    call has planned, its steps check none of them one by one."""
    if mqo.backend(mx.default_stream(mx.gpu)) != "cuda":
        pytest.skip("the hand-over is measured on CUDA only")
    tokens = [5, 77, 300, 12, 5, 9]
    with mx.stream(mx.gpu):
        model, layer_sets = llama_handed_over(monkeypatch)
        expected = decode_logits(model, layer_sets["theirs"], tokens)
        decode_logits(model, layer_sets["ours"], tokens[:1])
        checks = count_handed_over_checks(monkeypatch)
        got = decode_logits(model, layer_sets["ours"], tokens)
    assert checks == []
    assert all(mx.array_equal(a, b) for a, b in zip(got, expected))


@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize("bits,group_size", [(4, 64), (8, 32)])
def test_patched_model_generates_same_tokens(arch, bits, group_size):
    stream = mx.default_stream(mx.cpu)
    assert mqo.backend(stream) == "reference"
    check_patched_model_generates_same(arch, bits, group_size, stream)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize("bits,group_size", [(4, 64), (8, 32)])
def test_patched_model_generates_same_tokens_gpu(arch, bits, group_size):
    stream = mx.default_stream(mx.gpu)
    assert mqo.backend(stream) in ("metal", "cuda")
    check_patched_model_generates_same(arch, bits, group_size, stream)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ["llama", "qwen3_moe"])
def test_patched_model_compiles(arch, device):
    """DESIGN.md: the ops build into MLX graphs, mx.compile included (so MoE
    routing must never read indices back to the host); a compiled patched
    model computes what the uncompiled one does."""
    model = random_model(arch)
    mqo.nn.quantize(model, 64, 4)
    prompt = ((mx.arange(24) * 13) % VOCAB)[None]
    with mx.stream(device):
        expected = model(prompt)
        compiled = mx.compile(lambda tokens: model(tokens))(prompt)
        mx.eval(expected, compiled)
    assert rel_err(compiled, f64(expected)) <= 1e-5


# Small configs of other mlx-lm architectures, each with a layer pattern of
# its own: attention biases (qwen2), a tied head under logit soft-capping
# (gemma2), fused q|k|v and gate|up projections (phi3), plain MoE (mixtral),
# MoE with expert biases and its own activation (gpt_oss), MLA attention
# (per-head products in mlx-lm's QuantizedMultiLinear) and shared experts
# (deepseek_v3), biases and a non-gated MLP (starcoder2).
SMALL = dict(
    hidden_size=64,
    num_hidden_layers=2,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    vocab_size=256,
)
MOE = dict(num_local_experts=4, num_experts_per_tok=2)
OTHER_ARCHITECTURES = {
    "qwen2": SMALL,
    "gemma2": dict(SMALL, head_dim=16, query_pre_attn_scalar=16.0),
    "phi3": SMALL,
    "mixtral": dict(SMALL, **MOE),
    "gpt_oss": dict(SMALL, **MOE, head_dim=16, sliding_window=64),
    "deepseek_v3": dict(
        SMALL,
        moe_intermediate_size=64,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        kv_lora_rank=32,
        q_lora_rank=32,
        qk_rope_head_dim=8,
        qk_nope_head_dim=32,  # MLA's per-head products quantize along it
        v_head_dim=32,
        first_k_dense_replace=1,
    ),
    "starcoder2": SMALL,
}


def other_architecture(arch: str, dtype: mx.Dtype) -> nn.Module:
    """A model of :data:`OTHER_ARCHITECTURES` with small random weights in
    ``dtype``, quantized by MLX to 4 bits in groups of 32."""
    import importlib

    module = importlib.import_module(f"mlx_lm.models.{arch}")
    mx.random.seed(0)
    fields = dict(OTHER_ARCHITECTURES[arch], model_type=arch)
    model = module.Model(module.ModelArgs.from_dict(fields))
    model.update(
        tree_map(
            lambda p: mx.random.normal(p.shape) * 0.05 if p.ndim > 1 else p,
            model.parameters(),
        )
    )
    model.set_dtype(dtype)
    nn.quantize(model, 32, 4, class_predicate=lambda _, m: hasattr(m, "to_quantized"))
    return model


def logits_of_steps(model: nn.Module) -> mx.array:
    """The last position's logits of a prompt and of three decode steps
    after it, from an empty KV cache."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    out = [model(mx.array([[1, 5, 9, 33, 7, 2]]), cache=cache)[:, -1]]
    for token in (17, 200, 3):
        out.append(model(mx.array([[token]]), cache=cache)[:, -1])
    return mx.concatenate(out)


@pytest.mark.parametrize(
    "device", [*DEVICES, pytest.param("cpu-reference", id="cpu-reference")]
)
@pytest.mark.parametrize("arch", sorted(OTHER_ARCHITECTURES))
def test_patch_other_architectures(monkeypatch, arch, device):
    """Patched, each architecture computes what it does on MLX's layers, on
    a prompt and on decode steps with its KV cache, and every affine layer
    MLX and mlx-lm quantized becomes ours. On the CPU, few-row products go
    to MLX's own CPU kernel; ``cpu-reference`` turns that off, so that the
    products are our reference's."""
    if device == "cpu-reference":
        monkeypatch.setattr(affine, "_CPU_BUILTIN", False)
        device = mx.cpu
    oracle_device = device
    if arch == "deepseek_v3" and device == mx.gpu and mx.cuda.is_available():
        # MLX's layers cannot run this model there: MLA's prompt multiplies
        # by mlx-lm's QuantizedMultiLinear weights as they are (x @ W), for
        # which MLX 0.32.4's CUDA quantized_matmul has no float32 kernel
        # ("No implementation for problem shape"). Ours has one, so the
        # patched model runs on the GPU against MLX's layers on the CPU.
        oracle_device = mx.cpu
    model = other_architecture(arch, mx.float32)
    swapped = (
        nn.QuantizedLinear,
        nn.QuantizedEmbedding,
        LMQuantizedSwitch,
        LMQuantizedMulti,
    )
    count = sum(type(m) in swapped for _, m in model.named_modules())
    with mx.stream(oracle_device):
        expected = logits_of_steps(model)
    with mx.stream(device):
        mqo.nn.patch(model)
        assert not any(type(m) in swapped for _, m in model.named_modules())
        ours = sum(
            type(m).__module__ == "mlx_quant_ops.nn" for _, m in model.named_modules()
        )
        assert ours == count > 0
        # float32 on both; MLX's CUDA matmuls may use TF32 (see above).
        bound = 1e-4 if mqo.backend(mx.default_stream(device)) == "reference" else 1e-3
        assert rel_err(logits_of_steps(model), f64(expected)) <= bound


def test_patched_model_pickles_and_copies():
    """A patched model, used, survives pickle (every protocol that carries
    MLX arrays) and ``copy.deepcopy`` as a patched model: same classes,
    run as steps, the same outputs; its layers' replays (compiled
    functions and closures) are left behind, to be planned again."""
    import copy
    import pickle

    model = random_model("llama")
    nn.quantize(model, 64, 4)
    mqo.nn.patch(model)
    prompt = ((mx.arange(12) * 13) % VOCAB)[None]
    expected = model(prompt)
    lookup = model.model.embed_tokens
    assert lookup._replay is not None and lookup._lookup_replay is not None
    copies = [
        pickle.loads(pickle.dumps(model, protocol))
        for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1)
    ] + [copy.deepcopy(model)]
    for other in copies:
        assert type(other) is type(model)
        assert module_types(other) == module_types(model)
        layer = other.model.embed_tokens
        assert layer._replay is None and layer._lookup_replay is None
        assert mx.array_equal(other(prompt), expected)


def test_patch_model_loaded_from_disk(tmp_path):
    """The way users get a quantized model: mlx-lm quantizes with the model's
    own mixed-precision predicate (Qwen3-MoE keeps its router at 8 bits),
    saves, and loads it; the patched loaded model generates what the
    unpatched one in memory does."""
    model = random_model("qwen3_moe")
    model, config = quantize_model(model, dict(CONFIGS["qwen3_moe"]), 64, 4)
    save_model(tmp_path, model)
    save_config(config, tmp_path / "config.json")
    stream = mx.default_stream(mx.cpu)
    tokens = greedy(model, stream)

    loaded, _ = load_model(tmp_path)
    assert mqo.nn.patch(loaded) is loaded
    router = loaded.model.layers[0].mlp.gate
    assert type(router) is mqo.nn.QuantizedLinear
    assert (router.bits, router.group_size) == (8, 64)
    experts = loaded.model.layers[1].mlp.switch_mlp.down_proj
    assert type(experts) is mqo.nn.QuantizedSwitchLinear and experts.bits == 4
    assert_equal_arrays(loaded, model)
    assert greedy(loaded, stream) == tokens


def test_switch_layer_without_mlx_lm():
    """mlx-lm is optional: without it the switch and per-head layers stand
    alone (same fields, our ops) and patch() still handles MLX's layers."""
    script = """
import sys
sys.modules["mlx_lm"] = None  # any import of mlx-lm now fails
import mlx.core as mx, mlx.nn as nn
import mlx_quant_ops as mqo
assert mqo.nn._MLXLMQuantizedSwitchLinear is None  # the fallback base is in use
sw = mqo.nn.QuantizedSwitchLinear(128, 24, 4, bias=True, group_size=32, bits=8)
assert (sw.input_dims, sw.output_dims, sw.num_experts) == (128, 24, 4)
assert not sw.trainable_parameters()  # frozen on construction, as mlx-lm's
x, idx = mx.random.normal((3, 1, 1, 128)), mx.array([[0, 3], [2, 2], [1, 0]])
ref = mx.gather_qmm(x, sw.weight, sw.scales, sw.biases, rhs_indices=idx,
                    group_size=32, bits=8) + mx.expand_dims(sw.bias[idx], -2)
assert mx.allclose(sw(x, idx), ref, rtol=1e-5, atol=1e-5).item()
assert mqo.nn._MLXLMQuantizedMultiLinear is None
heads = mqo.nn.QuantizedMultiLinear(128, 24, 4, 32, 8)
assert heads.weight.shape == (4, 24, 32) and not heads.trainable_parameters()
x = mx.random.normal((2, 4, 3, 128))
ref = mx.quantized_matmul(x, heads.weight, heads.scales, heads.biases,
                          group_size=32, bits=8)
assert mx.allclose(heads(x), ref, rtol=1e-5, atol=1e-5).item()
model = nn.Sequential(nn.QuantizedLinear(64, 32))
assert type(mqo.nn.patch(model).layers[0]) is mqo.nn.QuantizedLinear
print("ok")
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_bench_decode_rows_time_both_layer_sets(monkeypatch):
    # The end-to-end benchmark rows run mlx-lm's decoding on MLX's layers and
    # on ours, in turns: both timings are real, and each timed pass ran
    # the layer set it is counted for; so did each set's host timing. The
    # paired ratio is the median of each round's ours / MLX's layers.
    from mlx_quant_ops.bench import decode_cases

    patched, ran_ours, times = [], [], []
    real_patch = mqo.nn.patch
    monkeypatch.setattr(mqo.nn, "patch", lambda m: patched.append(m) or real_patch(m))
    real_time = decode_cases._per_token_us

    def on_ours(model):
        q_proj = model.model.layers[0].self_attn.q_proj
        return isinstance(q_proj, mqo.nn.QuantizedLinear)

    def timed(model, prompt, tokens):
        ran_ours.append(on_ours(model))
        times.append(real_time(model, prompt, tokens))
        return times[-1]

    monkeypatch.setattr(decode_cases, "_per_token_us", timed)
    real_host, host_by_set = decode_cases._host_us, {}

    def host(model, prompt, tokens):
        host_and_build = real_host(model, prompt, tokens)
        host_by_set[on_ours(model)] = host_and_build
        return host_and_build

    monkeypatch.setattr(decode_cases, "_host_us", host)
    lines = []
    (row,) = decode_cases.run(quick=True, log=lines.append)
    assert len(patched) == 1
    # Each round times both sets, taking turns to go first, and as many
    # rounds put one set first as the other (round 0 is untimed).
    rounds = decode_cases.ROUNDS
    assert rounds % 2 == 0
    expected_order = []
    for round_ in range(rounds + 1):
        expected_order += [True, False] if round_ % 2 else [False, True]
    assert ran_ours == expected_order
    timed_passes = list(zip(ran_ours, times))[2:]
    builtin_passes = [t for on, t in timed_passes if not on]
    ours_passes = [t for on, t in timed_passes if on]
    assert (row.builtin_us, row.ours_us) == (min(builtin_passes), min(ours_passes))
    ratios = sorted(o / b for o, b in zip(ours_passes, builtin_passes))
    middle = len(ratios) // 2  # an even count: the mean of the middle two
    assert row.paired_ratio == pytest.approx((ratios[middle - 1] + ratios[middle]) / 2)
    # The quartiles bracket the median and each leaves at most a quarter of
    # the rounds' ratios outside it.
    first_quartile, third_quartile = row.ratio_quartiles
    assert ratios[0] <= first_quartile <= row.paired_ratio <= third_quartile
    assert third_quartile <= ratios[-1]
    assert sum(r < first_quartile for r in ratios) <= len(ratios) // 4
    assert sum(r > third_quartile for r in ratios) <= len(ratios) // 4
    assert host_by_set == {
        True: (row.ours_host_us, row.ours_build_us),
        False: (row.builtin_host_us, row.builtin_build_us),
    }
    for us in (row.ours_us, row.builtin_us, row.ours_host_us, row.builtin_host_us):
        assert 0 < us < 60e6
    # The build is a part of each step's host time.
    assert 0 < row.ours_build_us <= row.ours_host_us
    assert 0 < row.builtin_build_us <= row.builtin_host_us
    assert lines == [decode_cases.format_row(row)]


def assert_half_logits_follow(steps, expected_steps):
    """Each step's float16 logits within 3% of the expected step's (relative
    norm), with the same greedy token."""
    for got, want in zip(steps, expected_steps, strict=True):
        assert rel_err(got, f64(want)) < 3e-2
        assert mx.argmax(got).item() == mx.argmax(want).item()


def fused_llama(monkeypatch):
    """A float16 4-bit Llama, patched, deciding as on the CUDA path
    (``affine`` reads every stream as CUDA, while each op still runs its
    reference on the CPU), with single decode calls planned rather than
    handed to MLX's op: then a fused call and the single calls it replaces
    compute the same thing the same way. Also MLX's layer set."""
    monkeypatch.setattr(affine, "backend", lambda stream: "cuda")
    monkeypatch.setattr(affine, "LAYER_BUILTIN_DECODE_BELOW", {})
    return patched_half_llama(fuse_siblings=True)


def test_patch_groups_siblings_only_when_asked():
    """By default patch leaves every linear layer on its own (the fused
    launch cost a GPU host more than it saved); ``fuse_siblings=True``
    groups q|k|v and gate|up, also on a model patched before; anything but
    a bool is refused before the model changes."""
    model, _ = patched_half_llama()
    linears = [m for _, m in model.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert linears and all(
        type(m) is mqo.nn.QuantizedLinear and m._siblings is None for m in linears
    )
    layer = model.model.layers[0]
    for fuse in (1, "yes", None):
        with pytest.raises(TypeError, match=r"nn\.patch.*fuse_siblings.*True or False"):
            mqo.nn.patch(model, fuse_siblings=fuse)
    assert layer.self_attn.q_proj._siblings is None
    mqo.nn.patch(model, fuse_siblings=True)
    assert layer.self_attn.q_proj._siblings[0].layers == (
        layer.self_attn.q_proj,
        layer.self_attn.k_proj,
        layer.self_attn.v_proj,
    )
    assert layer.mlp.gate_proj._siblings[0].layers == (
        layer.mlp.gate_proj,
        layer.mlp.up_proj,
    )


def test_sibling_projections_fuse_in_steps(monkeypatch):
    """``patch(model, fuse_siblings=True)`` groups each attention's q|k|v
    projections and each MLP's gate|up projections; in a decode step on the
    CUDA path each group runs as one fused call, which computes what the
    single calls compute, bit for bit, and MLX's layers' logits within
    float16's error. Replacing a layer's weight drops the group's kept
    outputs."""
    model, theirs = fused_llama(monkeypatch)
    ours = model.leaf_modules()
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    qkv = attn.q_proj._siblings[0]
    assert [layer._siblings for layer in (attn.k_proj, attn.v_proj)] == [
        (qkv, 1),
        (qkv, 2),
    ]
    assert mlp.gate_proj._siblings[0] is mlp.up_proj._siblings[0]
    assert attn.o_proj._siblings is None and mlp.down_proj._siblings is None

    tokens = [5, 77, 300, 12]
    expected = decode_logits(model, theirs, tokens)
    fused = decode_logits(model, ours, tokens)
    assert qkv.run is not None and len(qkv.outputs) == 3
    # float16 logits through the layers (MLX's CPU kernel sums in half, ours
    # in float32): 1.4% apart.
    assert_half_logits_follow(fused, expected)

    monkeypatch.setattr(affine, "LAYER_FUSE_SIBLINGS", False)
    _kernels.clear_plans()
    unfused = decode_logits(model, ours, tokens)
    assert qkv.run is None  # the unfused steps planned single calls
    assert all(mx.array_equal(a, b).item() for a, b in zip(fused, unfused))

    # k takes v's arrays: the group forgets, and the fused steps follow.
    for key in ("weight", "scales", "biases"):
        setattr(attn.k_proj, key, attn.v_proj[key])
    assert qkv.x is None and qkv.outputs is None
    unfused = decode_logits(model, ours, tokens)
    monkeypatch.setattr(affine, "LAYER_FUSE_SIBLINGS", True)
    _kernels.clear_plans()
    fused = decode_logits(model, ours, tokens)
    assert qkv.run is not None
    assert all(mx.array_equal(a, b).item() for a, b in zip(fused, unfused))


def test_sibling_outputs_belong_to_their_input(monkeypatch):
    """Inside a step a sibling takes the group's kept output only for the
    input object it was computed from; any other input fuses again; outside
    a step each layer runs alone. Gradients flow through the fused call as
    through the single ones."""
    model, _ = fused_llama(monkeypatch)
    attn = model.model.layers[0].self_attn
    qkv = attn.q_proj._siblings[0]
    layers = (attn.q_proj, attn.k_proj, attn.v_proj)
    x1, x2 = (mx.random.normal((1, 1, 256), key=mx.random.key(i)) for i in (1, 2))
    x1, x2 = x1.astype(mx.float16), x2.astype(mx.float16)
    alone = {id(x): [layer(x) for layer in layers] for x in (x1, x2)}
    assert qkv.x is None  # outside a step

    token = _kernels._step.set(affine.step_key())
    try:
        q1 = attn.q_proj(x1)
        assert qkv.x is x1 and q1 is qkv.outputs[0]
        assert attn.k_proj(x1) is qkv.outputs[1]
        v2 = attn.v_proj(x2)  # another input: fused again
        assert qkv.x is x2 and v2 is qkv.outputs[2]
        k1 = attn.k_proj(x1)
        assert qkv.x is x1
        for got, want in zip(
            (q1, k1, v2), (alone[id(x1)][0], alone[id(x1)][1], alone[id(x2)][2])
        ):
            assert mx.array_equal(got, want).item()

        def loss(x, layers_fuse):
            monkeypatch.setattr(affine, "LAYER_FUSE_SIBLINGS", layers_fuse)
            qkv.forget()
            q, k, v = (layer(x) for layer in layers)
            return q.sum() + 2 * k.sum() + 3 * v.sum()

        # (float16: a float32 input makes float32 products, which no fused
        # launch takes.)
        fused_grad = mx.grad(lambda x: loss(x, True))(x1)
        assert qkv.run is not None
        single_grad = mx.grad(lambda x: loss(x, False))(x1)
        assert mx.allclose(fused_grad, single_grad, rtol=1e-2, atol=1e-2).item()
    finally:
        _kernels._step.reset(token)


@pytest.mark.parametrize("arch", ("qwen2", "gemma2", "mixtral", "starcoder2"))
def test_sibling_projections_fuse_in_other_architectures(monkeypatch, arch):
    """In float16 on the CUDA path (simulated as in ``fused_llama``), each
    architecture's q|k|v (with biases: qwen2, starcoder2) and gate|up
    projections (none in starcoder2's MLP, whose names differ) fuse, and
    its logits over a prompt and decode steps are those of the unfused
    layers, bit for bit."""
    monkeypatch.setattr(affine, "backend", lambda stream: "cuda")
    monkeypatch.setattr(affine, "LAYER_BUILTIN_DECODE_BELOW", {})
    model = mqo.nn.patch(other_architecture(arch, mx.float16), fuse_siblings=True)
    groups = {
        id(m._siblings[0]): m._siblings[0]
        for _, m in model.named_modules()
        if getattr(m, "_siblings", None) is not None
    }
    sizes = sorted(len(group.layers) for group in groups.values())
    layers = OTHER_ARCHITECTURES[arch]["num_hidden_layers"]
    gated = arch != "starcoder2"  # mixtral's experts are switch layers
    assert sizes == [2] * (layers if gated and arch != "mixtral" else 0) + [3] * layers

    fused = logits_of_steps(model)
    assert all(group.run is not None for group in groups.values())
    monkeypatch.setattr(affine, "LAYER_FUSE_SIBLINGS", False)
    _kernels.clear_plans()
    assert mx.array_equal(fused, logits_of_steps(model)).item()


@pytest.mark.gpu
def test_sibling_projections_fuse_on_the_gpu(monkeypatch):
    """On CUDA, a float16 model's q|k|v and gate|up decode calls run as the
    fused launch, and its logits follow MLX's layers' within float16's
    error, with the same greedy tokens."""
    if mqo.backend() != "cuda":
        pytest.skip("the fused launch is the CUDA path's")
    model, theirs = patched_half_llama(fuse_siblings=True)
    ours = model.leaf_modules()
    tokens = [5, 77, 300, 12, 9]
    expected = decode_logits(model, theirs, tokens)
    fused = decode_logits(model, ours, tokens)
    qkv = model.model.layers[0].self_attn.q_proj._siblings[0]
    gate_up = model.model.layers[0].mlp.gate_proj._siblings[0]
    assert qkv.run is not None and gate_up.run is not None
    assert_half_logits_follow(fused, expected)
