"""mlx-lm greedy decoding on the CPU: MLX's quantized layers against ours.

On a Linux CPU, MLX runs a quantized product on one core, and its half
precision kernel is far slower than its float32 one; this package's CPU path
multiplies in float32 and splits large products over the cores (README,
"Every op runs on three paths"). This script shows what that means for a
user decoding with mlx-lm on a CPU: a Llama model of the Llama-3.2-1B widths
(hidden 2048, MLP 8192, 32 heads, 8 KV heads, tied embeddings; fewer layers
and a smaller vocabulary, so MLX's half-precision rows finish), or with
``--arch deepseek_v3`` a DeepSeek-V3 model with DeepSeek-V2-Lite's attention
widths (MLA: 16 heads, latent 512; dense MLP 4096), quantized to
4 bits in groups of 64, decoded greedily with MLX's layers and with ours over
the same arrays, in turns. It prints the best milliseconds a token of each,
and whether the two made the same tokens (MLX's layers compute in the half
type, ours in float32, so random weights may pick a different token where
two logits are nearly equal).

Run from the repository root::

    python scripts/cpu_decode.py [--arch llama|deepseek_v3]
        [--dtypes bfloat16,float16,float32] [--layers 4] [--vocab 32000]
        [--tokens 8] [--rounds 2]
"""

import argparse
import time

import mlx.core as mx
from mlx_lm.generate import generate_step

from mlx_quant_ops.bench.decode_cases import _llama, model_and_layer_sets

# The keys of model_and_layer_sets' layer sets: MLX's layers, ours.
THEIRS, OURS = "builtin", "ours"


def decode(model, prompt: mx.array, tokens: int):
    """Milliseconds a greedy token (after the prompt) and the tokens."""
    steps = generate_step(prompt, model, max_tokens=tokens + 1)
    next(steps)
    start = time.perf_counter()
    made = [int(token) for token, _ in steps]
    return (time.perf_counter() - start) / tokens * 1e3, made


def fields_of(arch: str, layers: int, vocab: int) -> dict:
    """mlx-lm ModelArgs fields of the model ``arch`` decodes."""
    if arch == "llama":
        fields = _llama(2048, layers, 8192, 32, 8, vocab)
        return dict(fields, tie_word_embeddings=True)
    return dict(
        model_type="deepseek_v3",
        vocab_size=vocab,
        hidden_size=2048,
        intermediate_size=4096,
        moe_intermediate_size=1408,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        n_routed_experts=8,
        num_experts_per_tok=2,
        first_k_dense_replace=layers,  # every MLP dense: MLA is what differs
        kv_lora_rank=512,
        q_lora_rank=None,
        qk_rope_head_dim=64,
        qk_nope_head_dim=128,
        v_head_dim=128,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=("llama", "deepseek_v3"), default="llama")
    parser.add_argument("--dtypes", default="bfloat16,float16,float32")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    mx.set_default_device(mx.cpu)
    prompt = mx.arange(32) * 7 % args.vocab
    for name in args.dtypes.split(","):
        model, layer_sets = model_and_layer_sets(
            args.arch, fields_of(args.arch, args.layers, args.vocab), getattr(mx, name)
        )
        best, made = {}, {}
        for round_ in range(args.rounds):
            order = list(layer_sets) if round_ % 2 == 0 else list(layer_sets)[::-1]
            for key in order:
                model.update_modules(layer_sets[key])
                ms, made[key] = decode(model, prompt, args.tokens)
                best[key] = min(ms, best.get(key, ms))
        theirs, ours = best[THEIRS], best[OURS]
        print(
            f"{name:>8}, {args.layers} layers: MLX's layers {theirs:8.1f} ms a token,"
            f" ours {ours:6.1f} ({theirs / ours:.1f}x);"
            f" same tokens: {made[THEIRS] == made[OURS]}"
        )


if __name__ == "__main__":
    main()
