"""Where a patched model's decode step spends the host's time, against
MLX's layers, on one of the benchmark's models (by default the
Llama-3.2-1B shape, whose every decode call but the tied head's goes to
MLX's op on a GPU host)::

    python scripts/step_profile.py [--steps 40] [--rounds 6] [--model 1b|8b|tiny]
        [--settings mlx ours handed fused]

Settings: MLX's layers (``mlx``), ours as ``patch`` leaves them
(``ours``), ours with every decode call handed to MLX's op, the head too
(``handed``), ours with sibling groups (``fused``). Each round times every
setting in turns (build, ``mx.async_eval`` encode, each step's graph
evaluated before the next is built so the device is idle); then it prints
medians, the primitives in one step's graph, and a profile of each
setting's builds (the Python functions that took the most time of their
own; a C++ call, such as a compiled replay, counts in its caller's).
"""

import argparse
import collections
import cProfile
import io
import pstats
import re
import statistics
import tempfile
import time

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from mlx_quant_ops import _kernels, affine
from mlx_quant_ops import nn as mqo_nn
from mlx_quant_ops.bench.decode_cases import (
    FULL_MODELS,
    QUICK_MODELS,
    model_and_layer_sets,
)

MODELS = {"8b": FULL_MODELS[0], "1b": FULL_MODELS[1], "tiny": QUICK_MODELS[0]}


def set_fusion(model, on: bool) -> None:
    """Group the model's sibling projections afresh (``patch(model,
    fuse_siblings=True)``), or leave every layer on its own as ``patch``
    does by default."""
    for _, module in model.named_modules():
        if isinstance(module, mqo_nn.QuantizedLinear):
            object.__setattr__(module, "_siblings", None)
    if on:
        mqo_nn.patch(model, fuse_siblings=True)


def steps(model, prompt, count, profile=None):
    """Build, encode and run ``count`` decode steps; the build and encode
    seconds of each."""
    cache = make_prompt_cache(model)
    token = mx.argmax(model(prompt[None], cache=cache)[0, -1])
    mx.eval(token)
    builds, encodes = [], []
    for _ in range(count):
        start = time.perf_counter()
        if profile is not None:
            profile.enable()
        logits = model(token.reshape(1, 1), cache=cache)
        token = mx.argmax(logits[0, -1])
        if profile is not None:
            profile.disable()
        built = time.perf_counter()
        mx.async_eval(token)
        encoded = time.perf_counter()
        mx.eval(token)
        builds.append(built - start)
        encodes.append(encoded - built)
    return builds, encodes


SETTINGS = ("mlx", "ours", "handed", "fused")
# The hand-over limits as the package has them; "handed" lifts them.
LIMITS = dict(affine.LAYER_BUILTIN_DECODE_BELOW)


def step_primitives(model, prompt) -> collections.Counter:
    """How many nodes of each primitive one decode step's graph holds (read
    from ``mx.export_to_dot``), so settings whose build or encode differ can
    be told apart by what they put in the graph."""
    cache = make_prompt_cache(model)
    token = mx.argmax(model(prompt[None], cache=cache)[0, -1])
    mx.eval(token)
    token = mx.argmax(model(token.reshape(1, 1), cache=cache)[0, -1])
    with tempfile.NamedTemporaryFile("r", suffix=".dot") as dot:
        mx.export_to_dot(dot.name, token)
        labels = re.findall(r'label ="([^"]+)", shape=rectangle', dot.read())
    mx.eval(token)
    return collections.Counter(labels)


def use(model, layer_sets, setting: str) -> None:
    """Put ``setting``'s layers in the model: MLX's (``mlx``), ours as
    ``patch`` leaves them (``ours``), ours with every decode call handed to
    MLX's op, the head too (``handed``), or ours with sibling groups
    (``fused``)."""
    affine.LAYER_BUILTIN_DECODE_BELOW.update(
        {bits: 1 << 40 for bits in LIMITS} if setting == "handed" else LIMITS
    )
    # Layers keep their last call's plan: plan afresh under these limits.
    _kernels.clear_plans()
    model.update_modules(layer_sets["ours"])
    set_fusion(model, setting == "fused")
    if setting == "mlx":
        model.update_modules(layer_sets["builtin"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--model", choices=sorted(MODELS), default="1b")
    parser.add_argument(
        "--settings",
        nargs="+",
        choices=SETTINGS,
        default=list(SETTINGS),
        help="which layer settings to time and profile (default: all)",
    )
    args = parser.parse_args()
    settings = tuple(args.settings)
    name, module, fields = MODELS[args.model]
    model, layer_sets = model_and_layer_sets(module, fields)
    prompt = mx.random.randint(0, fields["vocab_size"], (32,))
    print(name, "device", mx.default_device(), "MLX", mx.__version__)
    times = {setting: ([], []) for setting in settings}
    for round_ in range(args.rounds + 1):
        # Each setting in each place of the order, round by round.
        shift = round_ % len(settings)
        for setting in settings[shift:] + settings[:shift]:
            use(model, layer_sets, setting)
            builds, encodes = steps(model, prompt, args.steps)
            if round_:
                times[setting][0].extend(builds)
                times[setting][1].extend(encodes)
    for setting, (builds, encodes) in times.items():
        print(
            f"{setting}: build {statistics.median(builds) * 1e6:.1f} µs,"
            f" encode {statistics.median(encodes) * 1e6:.1f} µs a step (median)"
        )
    for setting in settings:
        use(model, layer_sets, setting)
        counts = step_primitives(model, prompt)
        print(f"== {setting}: {sum(counts.values())} nodes a step:", dict(counts))
    for setting in settings:
        use(model, layer_sets, setting)
        steps(model, prompt, 4)
        profile = cProfile.Profile()
        steps(model, prompt, args.steps, profile)
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(16)
        print(f"== profile of {args.steps} builds, {setting}")
        print("\n".join(text.getvalue().splitlines()[4:30]))


if __name__ == "__main__":
    main()
