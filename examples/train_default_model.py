#!/usr/bin/env python3
"""Train ``pystdlib-llama``, the small byte-level Llama shipped with the package.

The model learns the ``.py`` files of the CPython standard library installed
on the machine (test suites and third-party packages left out). About 5% of
the files, picked by a hash of their relative path, are held out for
validation; see ``mlx_quant_ops/models/pystdlib.py`` for the corpus, the split
and the byte-level tokenizer (token id == byte value, plus ``<|endoftext|>``
= 256 between files).

Every ``nn.Linear`` has an input dimension that is a multiple of 256, so every
format family of mlx-quant-ops (GGUF 256-element super-blocks included)
applies to every layer, and the saved model stays under 8 MB.

The run is reproducible from ``--seed``: the initialization, the order of the
training windows and the learning-rate schedule depend on nothing else, given
the same ``--steps`` (GPU reductions may still differ in their last bits).
Without ``--steps`` the step count is fitted to ``--max-seconds`` from the
speed measured during warm-up (whose learning rates do not depend on it) and
recorded in ``metrics.json``; pass that number as ``--steps`` to repeat a run.

At the end the model is saved in mlx-lm's format, loaded back with
``mlx_lm.load``, scored on the held-out files, and asked for a sample; the
numbers go to ``metrics.json`` and a model card ``README.md``.

The training step is ``mx.compile``d by default. On MLX's CUDA backend every
fused kernel is first compiled by NVRTC, and a custom kernel was measured
there at 1.3-1.5 s each; the step fuses into about 60 kernels (counted on the
CPU), so for a run of a few minutes ``--no-compile`` is likely faster there.

Examples:
    # GPU (MLX CUDA backend), about 4 minutes in all
    python examples/train_default_model.py --out /tmp/pystdlib-llama \\
        --max-seconds 200 --no-compile

    # a quick CPU smoke run
    python examples/train_default_model.py --out /tmp/m --steps 30 --batch-size 4 \\
        --seq-len 256 --eval-max-tokens 20000

    # print the README section for a trained model's metrics
    python examples/train_default_model.py --render-readme path/to/metrics.json
"""

import argparse
import json
import math
import platform
import re
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

try:
    from mlx_quant_ops.models import pystdlib
except ImportError:  # running from a checkout without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from mlx_quant_ops.models import pystdlib

SIZE_LIMIT_BYTES = 8_000_000
# What the output directory holds once a run ends.
OUTPUT_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "metrics.json",
    "README.md",
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, help="output directory of the model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--stdlib",
        type=Path,
        default=pystdlib.default_stdlib_dir(),
        help="standard library directory to train on",
    )
    run = p.add_argument_group("run length")
    run.add_argument(
        "--steps",
        type=int,
        default=None,
        help="optimizer steps; default: fitted to --max-seconds after warm-up",
    )
    run.add_argument(
        "--max-seconds",
        type=float,
        default=200.0,
        help="wall-clock budget of the training loop (a hard stop)",
    )
    run.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="stop after this many steps of the --steps schedule "
        "(repeats a run that --max-seconds cut short)",
    )
    model = p.add_argument_group("model")
    model.add_argument("--hidden-size", type=int, default=256)
    model.add_argument("--num-layers", type=int, default=6)
    model.add_argument("--intermediate-size", type=int, default=512)
    model.add_argument("--num-heads", type=int, default=4)
    model.add_argument("--num-kv-heads", type=int, default=2)
    model.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        default="bfloat16",
        help="dtype of the saved weights (training is float32)",
    )
    opt = p.add_argument_group("optimizer")
    opt.add_argument("--batch-size", type=int, default=128)
    opt.add_argument("--seq-len", type=int, default=512)
    opt.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="mx.compile the training step (see above for CUDA)",
    )
    opt.add_argument("--learning-rate", type=float, default=2e-3)
    opt.add_argument(
        "--min-lr-ratio", type=float, default=0.1, help="final lr / peak lr"
    )
    opt.add_argument("--warmup-steps", type=int, default=200)
    opt.add_argument("--weight-decay", type=float, default=0.1)
    opt.add_argument("--grad-clip", type=float, default=1.0)
    ev = p.add_argument_group("evaluation and sample")
    ev.add_argument(
        "--eval-max-tokens",
        type=int,
        default=None,
        help="score only the first N held-out tokens (default: all)",
    )
    ev.add_argument("--eval-batch-size", type=int, default=32)
    ev.add_argument("--sample-prompt", default="def ")
    ev.add_argument("--sample-tokens", type=int, default=400)
    ev.add_argument("--sample-temp", type=float, default=0.7)
    ev.add_argument("--log-every", type=int, default=100)
    p.add_argument(
        "--render-readme",
        type=Path,
        metavar="METRICS_JSON",
        help="print the README section for a metrics.json and exit",
    )
    args = p.parse_args(argv)
    if args.render_readme is None and args.out is None:
        p.error("--out is required")
    return args


def model_args(args):
    from mlx_lm.models.llama import ModelArgs

    for name in ("hidden_size", "intermediate_size"):
        if getattr(args, name) % 256:
            raise ValueError(f"--{name.replace('_', '-')} must be a multiple of 256")
    if args.hidden_size % args.num_heads or args.num_heads % args.num_kv_heads:
        raise ValueError(
            "--num-heads must divide --hidden-size; kv heads must divide heads"
        )
    return ModelArgs(
        model_type="llama",
        hidden_size=args.hidden_size,
        num_hidden_layers=args.num_layers,
        intermediate_size=args.intermediate_size,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads,
        rms_norm_eps=1e-5,
        vocab_size=pystdlib.VOCAB_SIZE,
        max_position_embeddings=args.seq_len,
        rope_theta=10000.0,
        tie_word_embeddings=True,
    )


def hf_config(margs, dtype):
    """config.json: mlx-lm's Llama arguments plus the fields HF tools expect."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": margs.hidden_size,
        "num_hidden_layers": margs.num_hidden_layers,
        "intermediate_size": margs.intermediate_size,
        "num_attention_heads": margs.num_attention_heads,
        "num_key_value_heads": margs.num_key_value_heads,
        "head_dim": margs.hidden_size // margs.num_attention_heads,
        "rms_norm_eps": margs.rms_norm_eps,
        "vocab_size": margs.vocab_size,
        "max_position_embeddings": margs.max_position_embeddings,
        "rope_theta": margs.rope_theta,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        "bos_token_id": pystdlib.EOT_ID,
        "eos_token_id": pystdlib.EOT_ID,
        "torch_dtype": dtype,
    }


def learning_rate(step, total, args):
    """Linear warm-up to the peak, then cosine decay to min_lr_ratio * peak.

    The warm-up does not depend on ``total``, so a run whose step count is
    fitted during warm-up is repeated exactly by passing that count.
    """
    peak = args.learning_rate
    if step < args.warmup_steps:
        return peak * (step + 1) / args.warmup_steps
    span = max(total - args.warmup_steps, 1)
    t = min((step - args.warmup_steps) / span, 1.0)
    floor = peak * args.min_lr_ratio
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * t))


def eval_windows(stream, seq_len, stride):
    """Sliding windows that score every target of ``stream`` exactly once.

    Block j scores targets ``[1 + j*stride, 1 + (j+1)*stride)`` with up to
    ``seq_len`` tokens of context ending just before each (windows of the
    first blocks are shorter and right-padded; the model is causal, so the
    padding never reaches a scored position).

    Returns:
        (inputs, targets, mask) numpy arrays of shape [blocks, seq_len].
    """
    n = len(stream)
    starts = np.arange(1, n, stride)
    x = np.zeros((len(starts), seq_len), dtype=np.int32)
    y = np.zeros_like(x)
    m = np.zeros(x.shape, dtype=np.float32)
    for j, t0 in enumerate(starts):
        t1 = min(t0 + stride, n)
        w1 = t1 - 1  # inputs stream[w0:w1] predict stream[w0+1:w1+1]
        w0 = max(0, w1 - seq_len)
        k = w1 - w0
        x[j, :k] = stream[w0:w1]
        y[j, :k] = stream[w0 + 1 : w1 + 1]
        m[j, t0 - w0 - 1 : k] = 1.0
    return x, y, m


def evaluate(model, stream, seq_len, batch_size, stride=None):
    """Summed loss (nats) and count of the targets in ``stream``."""
    stride = stride or seq_len // 2
    x, y, m = eval_windows(stream, seq_len, stride)

    def batch_loss(xb, yb, mb):
        logits = model(xb).astype(mx.float32)
        return (nn.losses.cross_entropy(logits, yb, reduction="none") * mb).sum()

    # Not compiled: on CUDA every fused kernel costs a JIT compilation of
    # about a second, more than a few dozen forward passes gain from fusion.
    total = 0.0
    for i in range(0, len(x), batch_size):
        sl = slice(i, i + batch_size)
        total += batch_loss(mx.array(x[sl]), mx.array(y[sl]), mx.array(m[sl])).item()
    return total, float(m.sum())


def loss_metrics(nats, count, n_bytes):
    bits = nats / math.log(2)
    return {
        "loss_nats_per_token": nats / count,
        "bits_per_byte": bits / n_bytes,
        "perplexity_per_byte": math.exp(nats / n_bytes),
    }


def unigram_cross_entropy_bits(train, val):
    """Bits per byte of ``val`` under the byte frequencies of ``train``."""
    train, val = train[train < 256], val[val < 256]
    counts = np.bincount(train.astype(np.int64), minlength=256) + 1.0  # add-one
    logp = np.log2(counts / counts.sum())
    return float(-logp[val.astype(np.int64)].mean())


def dir_size(path):
    """Bytes of all files in a directory (the size the package ships)."""
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())


def train(args, model, train_stream, log):
    """The training loop. Returns a dict of run statistics."""
    rng = np.random.default_rng(args.seed)
    data = mx.array(train_stream.astype(np.int32))
    window = mx.arange(args.seq_len + 1)
    n_starts = len(train_stream) - args.seq_len - 1

    optimizer = optim.AdamW(
        learning_rate=args.learning_rate,
        betas=[0.9, 0.95],
        bias_correction=True,
        weight_decay=args.weight_decay,
    )

    def loss_fn(model, x, y):
        logits = model(x).astype(mx.float32)
        return nn.losses.cross_entropy(logits, y, reduction="mean")

    loss_and_grad = nn.value_and_grad(model, loss_fn)
    optimizer.init(model.trainable_parameters())
    state = [model.state, optimizer.state]

    def step_fn(data, starts):
        tokens = data[starts[:, None] + window]
        loss, grads = loss_and_grad(model, tokens[:, :-1], tokens[:, 1:])
        grads, grad_norm = optim.clip_grad_norm(grads, args.grad_clip)
        optimizer.update(model, grads)
        return loss, grad_norm

    if args.compile:
        step_fn = mx.compile(step_fn, inputs=state, outputs=state)

    total = args.steps
    fitted = total is None
    # Steps [calib0, calib1) are timed to fit the step count; they lie inside
    # the warm-up so the learning rates up to then do not depend on the fit.
    calib0 = min(5, args.warmup_steps // 4)
    calib1 = max(calib0 + 1, min(args.warmup_steps, calib0 + 50))
    if fitted and calib1 > args.warmup_steps:
        raise ValueError("fitting --steps to --max-seconds needs --warmup-steps >= 6")

    t_start = time.perf_counter()
    t_calib = None
    pending = None
    losses, loss_log, stop_reason = [], [], "steps"
    step = 0
    while (total is None or step < total) and step != args.stop_after:
        elapsed = time.perf_counter() - t_start
        if elapsed > args.max_seconds:
            stop_reason = "max_seconds"
            break
        optimizer.learning_rate = mx.array(
            learning_rate(step, total or 10**9, args), dtype=mx.float32
        )
        starts = mx.array(
            rng.integers(0, n_starts, size=args.batch_size), dtype=mx.int32
        )
        loss, grad_norm = step_fn(data, starts)
        mx.async_eval(state, loss, grad_norm)
        if pending is not None:  # keep one step in flight
            losses.append(pending[0].item())
        pending = (loss, grad_norm)
        step += 1

        if fitted and step == calib0:
            mx.eval(state)
            t_calib = time.perf_counter()
        if fitted and step == calib1:
            mx.eval(state)
            per_step = (time.perf_counter() - t_calib) / (calib1 - calib0)
            remaining = args.max_seconds - (time.perf_counter() - t_start)
            # 5% margin for the speed wobbling and the last synchronization.
            total = max(step + 1, step + int(0.95 * remaining / per_step))
            total = max(total, args.warmup_steps + 1)
            log(f"measured {per_step * 1e3:.1f} ms/step: training for {total} steps")
        if step % args.log_every == 0 and losses:
            recent = float(np.mean(losses[-args.log_every :]))
            loss_log.append({"step": step, "train_loss": recent})
            dt = time.perf_counter() - t_start
            log(
                f"step {step:6d}  loss {recent:.4f}  "
                f"lr {learning_rate(step - 1, total or 10**9, args):.2e}  "
                f"{step * args.batch_size * args.seq_len / dt:,.0f} tok/s  {dt:.0f}s"
            )
    if pending is not None:
        losses.append(pending[0].item())
    mx.eval(state)
    wall = time.perf_counter() - t_start
    tail = losses[-min(len(losses), args.log_every) :]
    if step == args.stop_after:
        stop_reason = "stop_after"
    return {
        "steps": step,
        "planned_steps": total if total is not None else step,
        "steps_fitted_to_max_seconds": fitted,
        "stop_reason": stop_reason,
        "tokens_seen": step * args.batch_size * args.seq_len,
        "train_wall_seconds": wall,
        "tokens_per_second": step * args.batch_size * args.seq_len / wall,
        "final_train_loss": float(np.mean(tail)) if tail else None,
        "train_loss_log": loss_log,
    }


def stdlib_version(stdlib_dir):
    """The Python version a standard library directory belongs to."""
    if Path(stdlib_dir).resolve() == pystdlib.default_stdlib_dir().resolve():
        return platform.python_version()
    found = re.search(r"python(\d+\.\d+)", str(stdlib_dir))
    return found.group(1) if found else "unknown"


def device_name():
    """The default device, named as MLX reports it."""
    kind = "gpu" if mx.default_device() == mx.gpu else "cpu"
    info = getattr(mx, "device_info", None)
    name = info().get("device_name") if info is not None else None
    return f"{kind} ({name})" if name else kind


def reproduce_command(args, run):
    """The command line that repeats this run: same flags, the step count fixed."""
    defaults = vars(parse_args(["--out", "x"]))
    words = ["python", "examples/train_default_model.py", "--out", "OUT_DIR"]
    for name, value in vars(args).items():
        if name in ("out", "render_readme", "steps", "max_seconds", "stdlib"):
            continue
        if name == "stop_after":
            continue
        flag = f"--{name.replace('_', '-')}"
        if isinstance(value, bool):
            if value != defaults[name]:
                words.append(flag if value else f"--no-{flag[2:]}")
        elif value != defaults[name] or name == "seed":
            words += [flag, str(value)]
    words += ["--steps", str(run["planned_steps"])]
    if run["steps"] != run["planned_steps"]:
        words += ["--stop-after", str(run["steps"])]
    return " ".join(words + ["--max-seconds", "inf"])


def main(argv=None):
    args = parse_args(argv)
    if args.render_readme is not None:
        print(render_readme_section(json.loads(args.render_readme.read_text())))
        return

    import mlx_lm
    from mlx_lm.models.llama import Model
    from mlx_lm.sample_utils import make_sampler
    from mlx_lm.utils import save_config, save_model

    def log(msg):
        print(msg, flush=True)

    t0 = time.perf_counter()
    mx.random.seed(args.seed)
    log(
        f"mlx {mx.__version__} on {mx.default_device()}; python {platform.python_version()}"
    )

    files = pystdlib.stdlib_files(args.stdlib)
    train_files, val_files = pystdlib.split_files(files)
    train_stream = pystdlib.token_stream(args.stdlib, train_files)
    val_stream = pystdlib.token_stream(args.stdlib, val_files)
    if len(train_files) < 200 or not val_files:
        raise SystemExit(
            f"{args.stdlib} holds {len(files)} .py files: not a standard library?"
        )
    if args.eval_max_tokens is not None:
        val_stream = val_stream[: args.eval_max_tokens]
    log(
        f"stdlib {args.stdlib}: {len(train_files)} train files "
        f"({len(train_stream):,} tokens), {len(val_files)} held out "
        f"({len(val_stream):,} tokens scored)"
    )

    margs = model_args(args)
    model = Model(margs)
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    itemsize = {"bfloat16": 2, "float16": 2, "float32": 4}[args.dtype]
    if n_params * itemsize > SIZE_LIMIT_BYTES:
        raise ValueError(
            f"{n_params:,} parameters in {args.dtype} exceed {SIZE_LIMIT_BYTES:,} bytes"
        )
    log(f"model: {n_params:,} parameters ({n_params * itemsize / 1e6:.2f} MB)")

    run = train(args, model, train_stream, log)
    log(
        f"trained {run['steps']} steps, {run['tokens_seen']:,} tokens in "
        f"{run['train_wall_seconds']:.0f}s"
    )

    # Save in mlx-lm's format first, so a failure later loses no training;
    # then score the float32 weights, and the saved model as loaded back.
    model.eval()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUT_FILES + ("model.safetensors.index.json",):
        (out / name).unlink(missing_ok=True)
    weights_f32 = tree_flatten(model.parameters())
    model.set_dtype(getattr(mx, args.dtype))
    save_model(out, model)
    # One shard needs no index (transformers and mlx-lm both load a lone
    # model.safetensors), and the directory stays to the files listed here.
    (out / "model.safetensors.index.json").unlink()
    save_config(hf_config(margs, args.dtype), out / "config.json")
    pystdlib.save_tokenizer(out)
    log(f"saved {out}")

    model.load_weights(weights_f32)
    n_val_bytes = int((val_stream < 256).sum())
    nats, count = evaluate(model, val_stream, args.seq_len, args.eval_batch_size)
    val_f32 = loss_metrics(nats, count, n_val_bytes)
    del model, weights_f32

    loaded, tokenizer = mlx_lm.load(str(out))
    nats, count = evaluate(loaded, val_stream, args.seq_len, args.eval_batch_size)
    val = loss_metrics(nats, count, n_val_bytes)
    log(
        f"validation: {val['loss_nats_per_token']:.4f} nats/token, "
        f"{val['bits_per_byte']:.4f} bits/byte ({args.dtype}; "
        f"{val_f32['bits_per_byte']:.4f} in float32)"
    )

    mx.random.seed(args.seed)
    sample = mlx_lm.generate(
        loaded,
        tokenizer,
        args.sample_prompt,
        max_tokens=args.sample_tokens,
        sampler=make_sampler(temp=args.sample_temp),
    )
    greedy = mlx_lm.generate(loaded, tokenizer, "import ", max_tokens=40)

    unigram_train = pystdlib.unigram_entropy_bits(train_stream)
    unigram_val = pystdlib.unigram_entropy_bits(val_stream)
    unigram_cross = unigram_cross_entropy_bits(train_stream, val_stream)
    metrics = {
        "model": "pystdlib-llama",
        "seed": args.seed,
        "python_version": stdlib_version(args.stdlib),
        "stdlib_dir": str(args.stdlib),
        "mlx_version": mx.__version__,
        "mlx_lm_version": mlx_lm.__version__,
        "device": device_name(),
        "command": " ".join(sys.argv),
        "reproduce_command": reproduce_command(args, run),
        "parameters": n_params,
        "dtype": args.dtype,
        "config": hf_config(margs, args.dtype),
        "hyperparameters": {
            k: (
                getattr(args, k)
                if k != "max_seconds" or math.isfinite(args.max_seconds)
                else None
            )
            for k in (
                "batch_size",
                "seq_len",
                "learning_rate",
                "min_lr_ratio",
                "warmup_steps",
                "weight_decay",
                "grad_clip",
                "max_seconds",
            )
        },
        "data": {
            "train_files": len(train_files),
            "validation_files": len(val_files),
            "train_tokens": int(len(train_stream)),
            "validation_tokens_scored": int(count),
            "validation_bytes_scored": n_val_bytes,
            "validation_per_10k_files": pystdlib.VALIDATION_PER_10K,
            "excluded_dirs": sorted(pystdlib.EXCLUDED_DIRS),
        },
        **run,
        "validation": val,
        "validation_float32": val_f32,
        "unigram_entropy_train_bits_per_byte": unigram_train,
        "unigram_entropy_validation_bits_per_byte": unigram_val,
        "unigram_cross_entropy_validation_bits_per_byte": unigram_cross,
        "bits_per_byte_over_unigram_entropy": val["bits_per_byte"] / unigram_val,
        "sample_prompt": args.sample_prompt,
        "sample_temperature": args.sample_temp,
        "sample_text": sample,
        "greedy_prompt": "import ",
        "greedy_text": greedy,
    }
    metrics["total_wall_seconds"] = time.perf_counter() - t0
    # The card and metrics report the directory's size, themselves included:
    # write them until the size they state stops changing.
    metrics["size_bytes"] = 0
    for _ in range(4):
        (out / "README.md").write_text(render_model_card(metrics))
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        if metrics["size_bytes"] == dir_size(out):
            break
        metrics["size_bytes"] = dir_size(out)
    size = dir_size(out)
    log(
        f"unigram entropy {unigram_val:.3f} bits/byte (validation), "
        f"{unigram_train:.3f} (train); model {val['bits_per_byte']:.3f} "
        f"= {metrics['bits_per_byte_over_unigram_entropy']:.2f}x"
    )
    log(f"sample ({args.sample_prompt!r}, temperature {args.sample_temp}):\n{sample}")
    log(f"wrote {out} ({size:,} bytes) in {metrics['total_wall_seconds']:.0f}s")
    if size > SIZE_LIMIT_BYTES:
        raise SystemExit(
            f"model directory is {size:,} bytes, over {SIZE_LIMIT_BYTES:,}"
        )


def render_readme_section(m, heading="##"):
    """The README text describing a trained model, from its metrics."""
    c, h, d, val = m["config"], m["hyperparameters"], m["data"], m["validation"]
    fence = "```"
    lines = [
        f"{heading} The embedded model: `pystdlib-llama`",
        "",
        "`mlx_quant_ops.default_model_path()` is a small byte-level Llama in",
        "mlx-lm's format (`config.json`, `model.safetensors`, `tokenizer.json`),",
        "shipped inside the package so the demo and the tests need no download:",
        "",
        f"{fence}python",
        "import mlx_lm",
        "import mlx_quant_ops",
        "",
        "model, tokenizer = mlx_lm.load(str(mlx_quant_ops.default_model_path()))",
        'print(mlx_lm.generate(model, tokenizer, "def ", max_tokens=200))',
        fence,
        "",
        f"- Architecture: Llama with {c['num_hidden_layers']} layers, hidden size "
        f"{c['hidden_size']}, MLP size {c['intermediate_size']},",
        f"  {c['num_attention_heads']} query and {c['num_key_value_heads']} key-value "
        f"heads, tied embeddings: {m['parameters']:,} parameters",
        f"  in {m['dtype']}, {m['size_bytes'] / 1e6:.2f} MB on disk. Every `nn.Linear` "
        "has an input dimension",
        "  that is a multiple of 256, so every format family (GGUF's 256-element",
        "  super-blocks included) applies to every layer.",
        "- Tokens are bytes (id = byte value) plus `<|endoftext|>` (id 256) between",
        "  files, used as BOS and EOS: "
        '`tokenizer.encode(text) == list(text.encode("utf-8"))`.',
        f"- Data: the `.py` files of the CPython {m['python_version']} standard "
        "library, test suites",
        f"  and site-packages left out: {d['train_files']} files "
        f"({d['train_tokens']:,} tokens) for training,",
        f"  {d['validation_files']} files held out by a hash of their path "
        "(`mlx_quant_ops/models/pystdlib.py`).",
        f"- Training: `examples/train_default_model.py`, {m['steps']:,} AdamW steps "
        f"of {h['batch_size']} x {h['seq_len']}",
        f"  tokens ({m['tokens_seen'] / 1e6:.1f}M tokens, "
        f"{m['tokens_seen'] / d['train_tokens']:.1f} epochs) in "
        f"{m['train_wall_seconds']:.0f} s on {m['device']},",
        f"  MLX {m['mlx_version']}. To repeat it:",
        f"  `{m['reproduce_command']}`.",
        "",
        "| on the held-out files | bits/byte | nats/token | perplexity (per byte) |",
        "| --- | --- | --- | --- |",
        f"| `pystdlib-llama` ({m['dtype']}) | {val['bits_per_byte']:.3f} "
        f"| {val['loss_nats_per_token']:.3f} | {val['perplexity_per_byte']:.2f} |",
        "| unigram byte entropy of the same bytes "
        f"| {m['unigram_entropy_validation_bits_per_byte']:.3f} | | |",
        "| unigram model fitted on the training bytes "
        f"| {m['unigram_cross_entropy_validation_bits_per_byte']:.3f} | | |",
        "",
        "The unigram byte entropy of the training data is "
        f"{m['unigram_entropy_train_bits_per_byte']:.3f} bits/byte; the",
        f"model needs {m['bits_per_byte_over_unigram_entropy']:.2f}x the unigram "
        "entropy of the held-out bytes.",
        "",
        f"A sample (prompt `{m['sample_prompt']!r}`, temperature "
        f"{m['sample_temperature']}):",
        "",
        f"{fence}python",
        f"{m['sample_prompt']}{m['sample_text']}",
        fence,
    ]
    return "\n".join(lines) + "\n"


def render_model_card(m):
    return (
        "# pystdlib-llama\n\n"
        "A byte-level Llama trained by `examples/train_default_model.py` of\n"
        "mlx-quant-ops; `metrics.json` beside this file holds every number.\n\n"
        + render_readme_section(m, heading="##")
    )


if __name__ == "__main__":
    main()
