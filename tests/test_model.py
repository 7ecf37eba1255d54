"""The embedded default model, ``pystdlib-llama``: shipped, loadable offline
with ``mlx_lm.load``, shaped for every format family, byte-exact tokenizer,
and actually trained (it writes Python and beats the unigram byte entropy on
standard-library files it never saw).

The model is a shipped artifact: where its directory is missing these tests
fail rather than skip. ``MLX_QUANT_OPS_TEST_MODEL_DIR`` points them at another
copy (for checking a freshly trained model before it is committed).
"""

import ast
import json
import math
import os
import socket
import string
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import mlx_quant_ops
from mlx_quant_ops.models import pystdlib

SIZE_LIMIT_BYTES = 8_000_000

TRICKY_TEXTS = [
    "",
    "def f(x):\n\treturn x  # tab, newline\n",
    "    leading spaces\n        and more\n",
    " a ,b  ,  c . d",
    "line\r\nwindows\rold mac\n",
    "caf\u00e9 na\u00efve \u00fcber \u00df \u4e2d\u6587 \U0001f600 \u200b zero-width",
    "\x00\x01\x1f\x7f control bytes",
    "text with <|endoftext|> inside, which stays bytes",
    "\u00a0\u00ad\u0100 latin stand-ins of ByteLevel",
]


def model_dir() -> Path:
    override = os.environ.get("MLX_QUANT_OPS_TEST_MODEL_DIR")
    return Path(override) if override else mlx_quant_ops.default_model_path()


def _no_network(*args, **kwargs):
    raise OSError("test_model: network access attempted while loading the model")


@pytest.fixture(scope="module")
def loaded():
    """``mlx_lm.load`` of the model with every socket connection refused."""
    path = model_dir()
    assert (path / "config.json").is_file(), (
        f"the embedded model is missing from {path}; train it with "
        "examples/train_default_model.py and commit it there"
    )
    import mlx_lm

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", _no_network)
        mp.setattr(socket, "create_connection", _no_network)
        model, tokenizer = mlx_lm.load(str(path))
    return model, tokenizer


def test_model_directory_is_shipped():
    path = model_dir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (path / name).is_file(), f"{name} missing from {path}"
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size <= SIZE_LIMIT_BYTES, f"{path} holds {size:,} bytes"


def test_llama_with_linear_inputs_multiple_of_256(loaded):
    from mlx_lm.models.llama import Model

    model, _ = loaded
    config = json.loads((model_dir() / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert isinstance(model, Model)
    linears = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.QuantizedLinear))
    ]
    # q, k, v, o and three MLP projections per layer; the head is tied.
    assert len(linears) == 7 * config["num_hidden_layers"] > 0
    for name, m in linears:
        in_dims = m.weight.shape[1]
        if isinstance(m, nn.QuantizedLinear):
            in_dims = in_dims * 32 // m.bits
        assert in_dims % 256 == 0, f"{name}: input dimension {in_dims}"
    embed = model.model.embed_tokens.weight
    assert embed.shape == (config["vocab_size"], config["hidden_size"])
    assert config["hidden_size"] % 256 == 0


def check_byte_tokenizer(tokenizer):
    for text in TRICKY_TEXTS:
        ids = tokenizer.encode(text)
        assert ids == list(text.encode("utf-8")), repr(text)
        assert tokenizer.decode(ids) == text, repr(text)
    assert tokenizer.decode(list(range(256))) == bytes(range(256)).decode(
        "utf-8", errors="replace"
    )
    assert tokenizer.eos_token_id == pystdlib.EOT_ID
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") == pystdlib.EOT_ID
    assert tokenizer.decode([pystdlib.EOT_ID]) == "<|endoftext|>"
    assert len(tokenizer) == pystdlib.VOCAB_SIZE


def test_shipped_tokenizer_is_bytes(loaded):
    check_byte_tokenizer(loaded[1])


def test_built_tokenizer_is_bytes():
    check_byte_tokenizer(pystdlib.build_tokenizer())


def test_streaming_detokenizer_keeps_whitespace(loaded):
    # mlx_lm.generate's text comes from the streaming detokenizer, not from
    # decode; indentation and leading spaces must survive it.
    detokenizer = loaded[1].detokenizer
    for text in TRICKY_TEXTS:
        detokenizer.reset()
        for b in text.encode("utf-8"):
            detokenizer.add_token(b)
        detokenizer.finalize()
        assert detokenizer.text == text, repr(text)


def test_greedy_generation_is_python(loaded):
    import mlx_lm

    model, tokenizer = loaded
    text = mlx_lm.generate(model, tokenizer, "import ", max_tokens=60)
    allowed = set(string.printable) - set("\x0b\x0c")
    assert set(text) <= allowed, f"not plain ASCII code: {text!r}"
    assert "\n" in text, f"no complete line in {text!r}"
    # The first line completes the prompt into an import statement.
    first = "import " + text.split("\n", 1)[0]
    try:
        tree = ast.parse(first)
    except SyntaxError:
        pytest.fail(f"not Python: {first!r} (generated {text!r})")
    assert isinstance(tree.body[0], ast.Import), first


def heldout_slice(files=4, length=256):
    """The first bytes of a few held-out standard-library files, as token rows
    that start with the end-of-text token (how the model saw file starts)."""
    root = pystdlib.default_stdlib_dir()
    _, held_out = pystdlib.split_files(pystdlib.stdlib_files(root))
    rows = []
    for rel in held_out:
        assert pystdlib.is_validation(rel)
        data = (root / rel).read_bytes()
        if len(data) >= length and not rel.startswith("encodings/"):
            rows.append([pystdlib.EOT_ID] + list(data[: length - 1]))
        if len(rows) == files:
            break
    assert len(rows) == files, f"too few held-out files under {root}"
    return np.array(rows, dtype=np.int32)


def test_heldout_loss_well_below_unigram_entropy(loaded):
    model, _ = loaded
    tokens = heldout_slice()
    x, y = mx.array(tokens[:, :-1]), mx.array(tokens[:, 1:])
    logits = model(x).astype(mx.float32)
    nats = nn.losses.cross_entropy(logits, y, reduction="sum").item()
    targets = tokens[:, 1:].ravel()
    bits_per_byte = nats / math.log(2) / targets.size

    counts = np.bincount(targets, minlength=256).astype(np.float64)
    p = counts[counts > 0] / targets.size
    unigram_bits = float(-(p * np.log2(p)).sum())
    assert unigram_bits > 3.5  # sanity of the oracle: source code, not a table
    assert bits_per_byte < 0.6 * unigram_bits, (
        f"held-out loss {bits_per_byte:.3f} bits/byte vs unigram entropy "
        f"{unigram_bits:.3f}"
    )


def test_split_is_fixed_and_about_five_percent():
    files = pystdlib.stdlib_files(pystdlib.default_stdlib_dir())
    train, held_out = pystdlib.split_files(files)
    assert sorted(train + held_out) == files and not set(train) & set(held_out)
    assert 0.03 < len(held_out) / len(files) < 0.08
    # Decided by the path alone, so it is the same under any root or order.
    assert pystdlib.split_files(reversed(files)) == (train, held_out)
    assert not any(
        part in pystdlib.EXCLUDED_DIRS for f in files for part in f.split("/")
    )
