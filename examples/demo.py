"""mlx-quant-ops demo: quantize a weight matrix and a small LM in each format
family on the active path, and show what it costs in accuracy and time.

    python examples/demo.py            # the default device (GPU if MLX has one)
    python examples/demo.py --cpu      # force the CPU (reference path)

The model is the one shipped in the package (a small Llama trained on
CPython's standard library; ``mlx_quant_ops.default_model_path()``). It is
scored in bits per byte on the standard-library files held out of its
training (the same split as its model card).
"""

import argparse
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

import mlx_quant_ops as mqo
from mlx_quant_ops.models import pystdlib

# Held-out bytes scored per model: a few windows no longer than the model's
# training context, kept small because MLX's CPU matmuls are slow in
# bfloat16 (the model's dtype) and the demo scores seven variants.
EVAL_WINDOWS = 4
EVAL_WINDOW_BYTES = 256


def timed(fn, repeats=5):
    """(result, median seconds per call) of ``fn()``, evaluated."""
    mx.eval(fn())  # warm-up: kernel compilation, caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        mx.eval(result)
        times.append(time.perf_counter() - start)
    return result, float(np.median(times))


def relative_error(approx: mx.array, exact: mx.array) -> float:
    diff = (approx.astype(mx.float32) - exact.astype(mx.float32)).square().sum()
    return float(mx.sqrt(diff / exact.astype(mx.float32).square().sum()))


# ---- the embedded model ------------------------------------------------------


def load_model():
    """The embedded model and its tokenizer, or ``None`` without mlx-lm."""
    try:
        from mlx_lm import load
    except ImportError:
        print(
            "(mlx-lm is not installed: pip install 'mlx-quant-ops[lm]' for the model)"
        )
        return None
    path = mqo.default_model_path()
    if not (path / "config.json").exists():
        print(f"(no embedded model at {path}; model sections are skipped)")
        return None
    return load(str(path))


def held_out_tokens() -> mx.array:
    """``[EVAL_WINDOWS, EVAL_WINDOW_BYTES]`` byte tokens from the start of
    the first held-out standard-library files (tokens are bytes, so no
    tokenizer is needed)."""
    root = pystdlib.default_stdlib_dir()
    _, held_out = pystdlib.split_files(pystdlib.stdlib_files(root))
    windows = []
    for relpath in held_out:
        data = (Path(root) / relpath).read_bytes()
        if len(data) >= EVAL_WINDOW_BYTES:
            windows.append(list(data[:EVAL_WINDOW_BYTES]))
        if len(windows) == EVAL_WINDOWS:
            break
    return mx.array(windows)


def bits_per_byte(model, tokens: mx.array) -> float:
    """Next-token cross-entropy in bits; the vocabulary is bytes, so this is
    bits per byte of source text."""
    logits = model(tokens[:, :-1]).astype(mx.float32)
    nats = nn.losses.cross_entropy(logits, tokens[:, 1:], reduction="mean")
    return float(nats) / float(np.log(2))


def linear_layers(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]


# ---- GGUF --------------------------------------------------------------------


def gguf_section(model, tokens):
    print("\n== GGUF (llama.cpp block formats) ==")
    w = mx.random.normal((4096, 4096), key=mx.random.key(0))
    mx.eval(w)
    print(f"weight 4096x4096 f32; path: {mqo.backend()}")
    print(
        f"{'type':<6} {'bits/w':>7} {'rel. error':>11} {'quantize ms':>12} {'qdq ms':>8}"
    )
    for name, fmt in mqo.gguf.FORMATS.items():
        blocks, quantize_s = timed(lambda: mqo.gguf.quantize(w, name))
        restored, qdq_s = timed(lambda: mqo.gguf.qdq(w, name))
        bits = 8 * fmt.block_bytes / fmt.block_elems
        print(
            f"{name:<6} {bits:>7.2f} {relative_error(restored, w):>11.2e} "
            f"{quantize_s * 1e3:>12.2f} {qdq_s * 1e3:>8.2f}"
        )

    if model is None:
        return
    baseline = bits_per_byte(model, tokens)
    originals = {name: layer.weight for name, layer in linear_layers(model)}
    print(
        f"\nembedded model, every Linear weight round-tripped "
        f"(bits/byte on {tokens.size} held-out bytes):"
    )
    print(f"{'full precision':<16} {baseline:.4f}")
    for name in mqo.gguf.FORMATS:
        start = time.perf_counter()
        for layer_name, layer in linear_layers(model):
            layer.weight = mqo.gguf.qdq(originals[layer_name], name)
        mx.eval(model.parameters())
        seconds = time.perf_counter() - start
        score = bits_per_byte(model, tokens)
        print(
            f"{name:<16} {score:.4f}  ({score - baseline:+.4f}; {seconds * 1e3:.0f} ms)"
        )
    for layer_name, layer in linear_layers(model):
        layer.weight = originals[layer_name]


# ---- MLX affine ----------------------------------------------------------------

AFFINE_CONFIGS = ((4, 64), (8, 32))  # (bits, group size): mlx-lm's usual choices
DECODE_TOKENS = 32


def parameter_megabytes(model) -> float:
    return sum(a.nbytes for _, a in tree_flatten(model.parameters())) / 2**20


def quantized_copy(model, bits: int, group_size: int, patch: bool = True):
    """A copy of ``model`` (sharing its float arrays) quantized by
    ``nn.quantize`` and, with ``patch``, moved onto this package's ops by
    ``mqo.nn.patch``; ``model`` itself stays in full precision."""
    copy = type(model)(model.args)
    copy.update(model.parameters())
    copy.eval()
    nn.quantize(copy, group_size=group_size, bits=bits)
    return mqo.nn.patch(copy) if patch else copy


def decode_tokens_per_second(model, prompt: mx.array) -> float:
    """Greedy generation speed after ``prompt``, prefill not counted."""
    from mlx_lm.generate import generate_step

    steps = generate_step(prompt, model, max_tokens=DECODE_TOKENS + 1)
    next(steps)  # the prefill and the first token
    start = time.perf_counter()
    for _ in steps:
        pass
    return DECODE_TOKENS / (time.perf_counter() - start)


def affine_section(model, tokens):
    print("\n== MLX affine (the format of mx.quantize and mlx-lm models) ==")
    w = mx.random.normal((4096, 4096), key=mx.random.key(1)) * 4096**-0.5
    x = mx.random.normal((1, 4096), key=mx.random.key(2))
    mx.eval(w, x)
    exact = x @ w.T
    print(f"weight 4096x4096 f32, x 1x4096 (decode); path: {mqo.backend()}")
    print(
        f"{'bits, group':<12} {'== mx.quantize':>14} {'qmm error':>10} {'vs mx':>8}"
        f" {'quantize ms (mx)':>17} {'qmm ms (mx)':>15}"
    )
    for bits, group_size in AFFINE_CONFIGS:
        opts = dict(group_size=group_size, bits=bits)
        q, quantize_s = timed(lambda: mqo.quantize(w, **opts))
        q_mx, quantize_mx_s = timed(lambda: mx.quantize(w, **opts))
        same = all(mx.array_equal(a, b).item() for a, b in zip(q, q_mx))
        y, qmm_s = timed(lambda: mqo.quantized_matmul(x, *q, **opts))
        y_mx, qmm_mx_s = timed(lambda: mx.quantized_matmul(x, *q_mx, **opts))
        print(
            f"{bits}-bit g{group_size:<5} {'yes' if same else 'NO':>14} "
            f"{relative_error(y, exact):>10.2e} {relative_error(y, y_mx):>8.1e} "
            f"{quantize_s * 1e3:>8.1f} ({quantize_mx_s * 1e3:>6.1f}) "
            f"{qmm_s * 1e3:>7.2f} ({qmm_mx_s * 1e3:>5.2f})"
        )
    print("(qmm error: against the float product x @ w.T; vs mx: against")
    print(" mx.quantized_matmul on the same codes)")
    if mqo.backend() == "reference" and mx.default_device() == mx.cpu:
        print("(on the CPU, quantize and products of up to 16 rows run MLX's own")
        print(" CPU kernels, in float32, where they beat the plain-mx reference,")
        print(" and large ops split over the cores; the tests check the reference")
        print(" itself against both oracles)")

    if model is None:
        return
    print(
        f"\nembedded model, nn.quantize + mqo.nn.patch; bits/byte on "
        f"{tokens.size} held-out bytes, greedy decode speed:"
    )
    print(f"{'':<16} {'bits/byte':>9} {'MB':>7} {'tokens/s':>9}")
    rows = [("full precision", model)]
    for bits, group_size in AFFINE_CONFIGS:
        # The same quantized weights on mlx_quant_ops' layers, then on MLX's.
        rows.append(
            (f"{bits}-bit g{group_size}", quantized_copy(model, bits, group_size))
        )
        rows.append(("  mx layers", quantized_copy(model, bits, group_size, False)))
    for name, m in rows:
        score = bits_per_byte(m, tokens)
        speed = decode_tokens_per_second(m, tokens[0, :32])
        print(f"{name:<16} {score:>9.4f} {parameter_megabytes(m):>7.2f} {speed:>9.1f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="run on the CPU")
    args = parser.parse_args()
    if args.cpu:
        mx.set_default_device(mx.cpu)
    print(f"mlx {mx.__version__}, device {mx.default_device()}, path {mqo.backend()}")

    loaded = load_model()
    model, tokens = None, None
    if loaded is not None:
        model, _ = loaded
        tokens = held_out_tokens()
    gguf_section(model, tokens)
    affine_section(model, tokens)


if __name__ == "__main__":
    main()
