"""Host cost of a decode step on the CUDA path, measured without a GPU.

On a CUDA machine a patched mlx-lm model is often bound by the host: the
Python that builds each step's graph and MLX's encoding of it. This script
measures the first part on any machine. The ops and layers choose as they
do on a CUDA machine's default stream (through ``tests/cuda_compile.py``'s
recorder: our kernels are recorded, not run; MLX's ops run on the CPU), so
their Python, plans, replays and hand-overs to MLX's built-in are the ones
a GPU host runs. Encoding and GPU time are not measured.

Each step, both layer sets build a token (each on its own KV cache), one
after the other, the order alternating step by step, and both graphs are
evaluated together. So the same work precedes each pair: a set that went
first builds with the host's caches as cold as after a step's evaluation
(on a GPU host, after encoding the last step), the second one warmer. An
earlier version let the sets take turns token by token; MLX's layers then
evaluated their products on the CPU, which left the caches colder for our
set's next build than for theirs and inflated our cost (about 1.4 times
theirs instead of 1.15). It prints per layer set the median build time of
a token when first and when second, and the time spent in each kind of
layer call (summed over a token): MLX's layers, our handed-over calls, our
kernel calls, the embedding lookup (``--no-call-times`` leaves out these
timers, which add their own cost to every call); then the median ratio of
our set's build to MLX's in neighbouring steps, which the host's drift
over a run (1.2x or more on a shared machine) does not move.

Run from the repository root::

    python scripts/host_cost_sim.py [--tokens 200] [--layers 8] [--no-call-times]
        [--model llama|qwen3_moe] [--all-handed-over]

The model is a small Llama (hidden 512, MLP 1792), or a small Qwen3-MoE,
with the hand-over limit set so that attention projections go to MLX's
built-in and the MLP (or the experts) and head to our kernels, as on the
Llama-3-8B and Qwen3-30B-A3B shapes on a GPU; with ``--all-handed-over``
every decode call goes to MLX's built-in, as on the Llama-3.2-1B shape.
A run takes about ten minutes on the development CPU (MLX's CPU kernels
evaluate the steps). In-model costs
run several times the cost of the same call repeated in a loop (caches
are cold in a step that touches every layer once).
"""

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import cuda_compile  # noqa: E402

import mlx_quant_ops as mqo  # noqa: E402
from mlx_quant_ops import affine  # noqa: E402
from mlx_quant_ops.bench.decode_cases import _llama, model_and_layer_sets  # noqa: E402

HIDDEN, MLP = 512, 1792
# mlx-lm ModelArgs fields by number of layers: small models whose decode
# calls choose as the full-size ones of the benchmark do.
MODELS = {
    "llama": lambda layers: _llama(HIDDEN, layers, MLP, 8, 2, 4096),
    # Qwen3-30B-A3B's proportions: 128 experts of 768 (top 8) under a
    # hidden size of 2048, here a quarter of each.
    "qwen3_moe": lambda layers: dict(
        _llama(HIDDEN, layers, MLP, 8, 2, 4096),
        model_type="qwen3_moe",
        num_experts=32,
        num_experts_per_tok=8,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        moe_intermediate_size=192,
        head_dim=64,
        rope_theta=1e6,
        max_position_embeddings=4096,
        norm_topk_prob=True,
    ),
}
WARMUP_STEPS = 16  # both sets planned and compiled by then


def time_layer_calls(totals: dict, which: list):
    """Wrap both sets' linear and embedding classes' ``__call__`` to add
    each call's time to ``totals[(layer set, kind)]``; ``which[0]`` names
    the set."""

    def wrap(cls, kind_of):
        call = cls.__call__

        def timed(self, x):
            start = time.perf_counter()
            y = call(self, x)
            elapsed = time.perf_counter() - start
            totals[(which[0], kind_of(self, x))] += elapsed
            return y

        cls.__call__ = timed

    wrap(nn.QuantizedLinear, lambda layer, x: "MLX's layer")
    wrap(nn.QuantizedEmbedding, lambda layer, x: "embedding")
    wrap(mqo.nn.QuantizedEmbedding, lambda layer, x: "embedding")
    wrap(
        mqo.nn.QuantizedLinear,
        lambda layer, x: (
            "handed over"
            if affine.layer_decode_on_builtin(x, layer["weight"], layer.bits)
            else "our kernel"
        ),
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument(
        "--model",
        choices=sorted(MODELS),
        default="llama",
        help="a Llama, or a Qwen3-MoE whose every MLP is a mixture of experts",
    )
    parser.add_argument(
        "--all-handed-over",
        action="store_true",
        help="every decode call and the head to MLX's op, as on the "
        "Llama-3.2-1B shape (default: the MLP and head to our kernels)",
    )
    parser.add_argument(
        "--no-call-times",
        action="store_true",
        help="skip the per-call timers (they add their own cost to each call)",
    )
    args = parser.parse_args(argv)
    from mlx_lm.models.cache import make_prompt_cache

    model, sets = model_and_layer_sets(args.model, MODELS[args.model](args.layers))
    limit = {
        bits: 1 << 40 if args.all_handed_over else HIDDEN * MLP
        for bits in affine.LAYER_BUILTIN_DECODE_BELOW
    }
    saved_limit = affine.LAYER_BUILTIN_DECODE_BELOW
    totals, which = collections.defaultdict(float), ["builtin"]
    builds = {(key, place): [] for key in sets for place in ("first", "second")}
    with cuda_compile.recording(forced=False):
        affine.LAYER_BUILTIN_DECODE_BELOW = limit
        try:
            if not args.no_call_times:
                time_layer_calls(totals, which)
            caches = {key: make_prompt_cache(model) for key in sets}
            prompt = mx.random.randint(0, 4096, (1, 32))
            tokens = {}
            for key in sets:
                model.update_modules(sets[key])
                logits = model(prompt, cache=caches[key])
                tokens[key] = mx.argmax(logits[:, -1, :], axis=-1)
            mx.eval(tokens)
            for step in range(args.tokens + WARMUP_STEPS):
                timed = step >= WARMUP_STEPS
                if not timed:
                    totals.clear()
                order = ("builtin", "ours") if step % 2 else ("ours", "builtin")
                for key, place in zip(order, ("first", "second")):
                    which[0] = key
                    model.update_modules(sets[key])
                    start = time.perf_counter()
                    logits = model(tokens[key][None], cache=caches[key])
                    if timed:
                        builds[(key, place)].append(time.perf_counter() - start)
                    tokens[key] = mx.argmax(logits[:, -1, :], axis=-1)
                mx.eval(tokens)
        finally:
            affine.LAYER_BUILTIN_DECODE_BELOW = saved_limit
    for key in sets:
        first, second = (
            statistics.median(builds[(key, place)]) * 1e6
            for place in ("first", "second")
        )
        print(f"{key}: build {first:7.1f} us a token first, {second:7.1f} second")
        for (set_key, kind), seconds in sorted(totals.items()):
            if set_key == key:
                print(f"  {kind:<12} {seconds / args.tokens * 1e6:7.1f} us a token")
    # Neighbouring steps in the same place, ours over MLX's: the host's
    # speed drifts over a run, and the ratio of neighbours cancels that.
    ratios = [
        statistics.median(
            ours / builtin
            for ours, builtin in zip(
                builds[("ours", place)], builds[("builtin", place)]
            )
        )
        for place in ("first", "second")
    ]
    print(
        "ours / builtin, neighbouring steps: "
        f"{ratios[0]:.3f} first, {ratios[1]:.3f} second"
    )


if __name__ == "__main__":
    main()
