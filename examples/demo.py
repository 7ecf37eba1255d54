"""mlx-quant-ops demo: quantize a weight matrix and a small LM in each format
family on the active path, and show what it costs in accuracy and time.

    python examples/demo.py            # the default device (GPU if MLX has one)
    python examples/demo.py --cpu      # force the CPU (reference path)

The model is the one shipped in the package (a small Llama trained on
CPython's standard library; ``mlx_quant_ops.default_model_path()``). It is
scored in bits per byte on Python source it never saw in training: this
package's own code.
"""

import argparse
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

import mlx_quant_ops as mqo

HELD_OUT_TEXT = Path(mqo.__file__).parent / "gguf.py"
EVAL_BYTES = 2048


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


def held_out_tokens(tokenizer) -> mx.array:
    text = HELD_OUT_TEXT.read_text()[:EVAL_BYTES]
    return mx.array(tokenizer.encode(text))[None]


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
    print(f"\nembedded model, every Linear weight round-tripped (held-out bits/byte):")
    print(f"{'full precision':<16} {baseline:.4f}")
    for name in mqo.gguf.FORMATS:
        start = time.perf_counter()
        for layer_name, layer in linear_layers(model):
            layer.weight = mqo.gguf.qdq(originals[layer_name], name)
        mx.eval(model.parameters())
        seconds = time.perf_counter() - start
        score = bits_per_byte(model, tokens)
        print(
            f"{name:<16} {score:.4f}  (+{score - baseline:.4f}; {seconds * 1e3:.0f} ms)"
        )
    for layer_name, layer in linear_layers(model):
        layer.weight = originals[layer_name]


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
        model, tokenizer = loaded
        tokens = held_out_tokens(tokenizer)
    gguf_section(model, tokens)


if __name__ == "__main__":
    main()
