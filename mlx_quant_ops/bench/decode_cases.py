"""End-to-end rows: mlx-lm greedy decoding, microseconds per token, of
LLM-shaped models (random weights, 4-bit group-64 affine) on MLX's quantized
layers and on ours after :func:`mlx_quant_ops.nn.patch`.

The op rows time kernels in a batched graph, where host work overlaps the
device; a decode step is a chain of small dependent ops that mlx-lm builds
on the host every token, so the cost of building and encoding each op shows
here and not there. Models keep a few of their layers (decode time is per
layer plus the output projection) so they build in seconds.

Each row also gives each layer set's host time a token: building the step
and MLX's encoding of it, with the device idle before each step, and the
building alone (the Python of the model and its layers; the rest is MLX's
encoding). Where a set's time a token is about its host time, the host
bounds it and follows the host's speed; where it is well above, the device
does.
"""

import statistics
import time
from dataclasses import dataclass
from typing import List, Tuple

import mlx.core as mx
import mlx.nn as nn

from .core import in_turns


def _llama(hidden: int, layers: int, mlp: int, heads: int, kv_heads: int, vocab: int):
    """mlx-lm ``llama.ModelArgs`` fields of a Llama of these sizes."""
    return dict(
        model_type="llama",
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=mlp,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        rms_norm_eps=1e-5,
        vocab_size=vocab,
        tie_word_embeddings=False,
    )


#: (row name, mlx-lm module, its ModelArgs fields)
FULL_MODELS = (
    (
        "Llama-3-8B shape, 8 of 32 layers",
        "llama",
        _llama(4096, 8, 14336, 32, 8, 128256),
    ),
    (
        "Llama-3.2-1B shape, 16 layers",
        "llama",
        dict(_llama(2048, 16, 8192, 32, 8, 128256), tie_word_embeddings=True),
    ),
    (
        "Qwen3-30B-A3B shape, 4 of 48 layers",
        "qwen3_moe",
        dict(
            model_type="qwen3_moe",
            hidden_size=2048,
            num_hidden_layers=4,
            intermediate_size=6144,
            num_attention_heads=32,
            num_experts=128,
            num_experts_per_tok=8,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            moe_intermediate_size=768,
            rms_norm_eps=1e-6,
            vocab_size=151936,
            num_key_value_heads=4,
            head_dim=128,
            rope_theta=1e6,
            tie_word_embeddings=False,
            max_position_embeddings=4096,
            norm_topk_prob=True,
        ),
    ),
)
QUICK_MODELS = (("tiny Llama", "llama", _llama(256, 2, 512, 4, 2, 1000)),)
PROMPT_TOKENS = 32
DECODE_TOKENS = 48


@dataclass
class DecodeRow:
    name: str
    ours_us: float
    builtin_us: float
    ours_host_us: float
    builtin_host_us: float
    # The build part of the host time (the step's graph made in Python).
    ours_build_us: float
    builtin_build_us: float
    # Median over the timed rounds of ours / MLX's layers, each round's two
    # passes back to back: the host's speed drifts over minutes, so a round
    # compares the two sets at nearly the same speed where the two bests
    # may come from different minutes.
    paired_ratio: float
    # The first and third quartiles of those rounds' ratios: how far the
    # host's swings move one round's ratio.
    ratio_quartiles: Tuple[float, float]


# Timed passes per layer set. Each round times both sets back to back, MLX's
# layers first in even rounds and ours first in odd ones (core.in_turns; an
# even number of rounds), so that neither gains from its place. (Until
# 2026-12-05 MLX's layers always went first; on an H200, with our linear
# layers running MLX's own __call__, the 1B shape's ratio was 1.052 so.) A
# first untimed pass of each compiles kernels and plans calls. The H100
# host's Python speed swings by up to 1.5x from one pass to the next, so a
# row keeps each set's best of several passes, and the median of the rounds'
# ratios (DecodeRow.paired_ratio). A pass is timed whole, as a user's tokens
# per second sees it. A pass takes about a tenth of a second and building a
# model several, so rounds are cheap: at 6 rounds, runs in which both sets
# ran the same layer code read from 0.97 to 1.12 on an H100 host
# (2026-12-05), too wide to tell a 5% difference.
ROUNDS = 24


def _per_token_us(model, prompt: mx.array, tokens: int) -> float:
    """Microseconds per greedy token after the prompt (prefill not
    counted), as ``mlx_lm.generate`` runs it: the next step's graph is
    built while the device runs this one."""
    from mlx_lm.generate import generate_step

    steps = generate_step(prompt, model, max_tokens=tokens + 1)
    next(steps)
    start = time.perf_counter()
    for _ in steps:
        pass
    return (time.perf_counter() - start) / tokens * 1e6


def _host_us(model, prompt: mx.array, tokens: int) -> Tuple[float, float]:
    """Median host microseconds a greedy token takes to build and hand to
    MLX (``mx.async_eval``), each step waiting for the last to finish first
    so that none of it waits on the device, and the median of the build
    alone. On the CPU, where MLX runs the step inside ``mx.async_eval``,
    the first includes the compute.

    Returns:
        tuple: (build and hand-over, build) in microseconds a token.
    """
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    token = mx.argmax(model(prompt[None], cache=cache)[:, -1, :], axis=-1)
    mx.eval(token)
    hosts, builds = [], []
    for _ in range(tokens):
        start = time.perf_counter()
        token = mx.argmax(model(token[None], cache=cache)[:, -1, :], axis=-1)
        built = time.perf_counter()
        mx.async_eval(token)
        hosts.append(time.perf_counter() - start)
        builds.append(built - start)
        mx.eval(token)
    return statistics.median(hosts) * 1e6, statistics.median(builds) * 1e6


def model_and_layer_sets(module: str, fields: dict, dtype: mx.Dtype = mx.float16):
    """An mlx-lm model (``mlx_lm.models.<module>`` built from ``fields``,
    random weights in ``dtype``, quantized to 4 bits in groups of 64) and its
    two layer sets, MLX's (``"builtin"``) and ours (``"ours"``), for
    ``model.update_modules``. Both sets share the same arrays, so swapping
    them is free; the model is left patched.

    Returns:
        tuple: the model and the dict of layer sets.
    """
    import importlib

    from .. import nn as mqo_nn

    models = importlib.import_module(f"mlx_lm.models.{module}")
    mx.random.seed(0)
    model = models.Model(models.ModelArgs(**fields))
    model.set_dtype(dtype)
    nn.quantize(model, group_size=64, bits=4)
    mx.eval(model.parameters())
    model.eval()
    layer_sets = {"builtin": model.leaf_modules()}
    mqo_nn.patch(model)
    layer_sets["ours"] = model.leaf_modules()
    return model, layer_sets


def run(quick: bool, log=print) -> List[DecodeRow]:
    """Time each model on MLX's layers and patched, in rounds that time
    both, in turns first (best of :data:`ROUNDS` passes each); print each
    row.

    Returns:
        list[DecodeRow]: the measured rows.
    """
    rows = []
    for name, module, fields in QUICK_MODELS if quick else FULL_MODELS:
        model, layer_sets = model_and_layer_sets(module, fields)
        prompt = mx.random.randint(0, fields["vocab_size"], (PROMPT_TOKENS,))
        tokens = 8 if quick else DECODE_TOKENS
        passes = {key: [] for key in layer_sets}
        host, build = {}, {}
        for round_ in range(ROUNDS + 1):
            for key, layers in in_turns(layer_sets.items(), round_):
                model.update_modules(layers)
                timed = _per_token_us(model, prompt, tokens)
                if round_ > 0:
                    passes[key].append(timed)
        for key, layers in layer_sets.items():
            model.update_modules(layers)
            host[key], build[key] = _host_us(model, prompt, tokens)
        ratios = [
            ours / builtin for ours, builtin in zip(passes["ours"], passes["builtin"])
        ]
        first_quartile, _, third_quartile = statistics.quantiles(ratios, n=4)
        row = DecodeRow(
            name,
            min(passes["ours"]),
            min(passes["builtin"]),
            host["ours"],
            host["builtin"],
            build["ours"],
            build["builtin"],
            statistics.median(ratios),
            (first_quartile, third_quartile),
        )
        rows.append(row)
        log(format_row(row))
        del model, layer_sets
    return rows


HEADER = (
    f"{'mlx-lm decode':<22} {'model (q4 g64 f16)':<36} {'ours us':>9} {'built-in':>9}"
    f" {'host: ours':>11} {'built-in':>9} {'build: ours':>12} {'built-in':>9}"
    f" {'ours/built-in':>14} {'quartiles':>12}"
)


def format_row(row: DecodeRow) -> str:
    return (
        f"{'per token':<22} {row.name:<36} {row.ours_us:>9.1f} {row.builtin_us:>9.1f}"
        f" {row.ours_host_us:>11.1f} {row.builtin_host_us:>9.1f}"
        f" {row.ours_build_us:>12.1f} {row.builtin_build_us:>9.1f}"
        f" {row.paired_ratio:>14.3f}"
        f" {row.ratio_quartiles[0]:>6.3f}-{row.ratio_quartiles[1]:.3f}"
    )
