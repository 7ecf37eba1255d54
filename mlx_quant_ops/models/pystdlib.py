"""Data and tokenizer of the embedded ``pystdlib-llama`` model.

The model is a byte-level Llama trained on the ``.py`` files of the CPython
standard library (``examples/train_default_model.py``). This module holds
what the training script and the tests must agree on, so the held-out files
the tests score are exactly the files the training run never saw:

- which files count as the standard library, and the fixed train/validation
  split, decided by a hash of each file's relative path (so the split is the
  same on every machine and Python version: a path held out here is held
  out everywhere);
- the byte-level tokenizer: token id ``b`` is byte ``b`` for ``b < 256``,
  and :data:`EOT_ID` (``<|endoftext|>``) separates files and serves as BOS and
  EOS.

Importing this module needs only the standard library and numpy;
:func:`build_tokenizer` needs ``tokenizers`` and ``transformers``, which
``mlx-lm`` already depends on.
"""

import functools
import hashlib
import os
import sysconfig
from pathlib import Path
from typing import Iterable, List, Sequence, Tuple

import numpy as np

EOT_TOKEN = "<|endoftext|>"
EOT_ID = 256
VOCAB_SIZE = 257

# Parts per 10,000 of files held out for validation (5%).
VALIDATION_PER_10K = 500

# Directories skipped when collecting the standard library: third-party
# packages, caches, and CPython's own test suites (many distributions ship
# them separately or not at all, and some of their files are deliberately
# malformed), so the corpus means the same thing on every machine.
EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
)


def default_stdlib_dir() -> Path:
    """The directory of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: os.PathLike) -> List[str]:
    """Relative POSIX paths of the standard library's ``.py`` files, sorted.

    Args:
        root: the standard library directory.

    Returns:
        list[str]: paths relative to ``root``, skipping :data:`EXCLUDED_DIRS`.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"standard library directory {str(root)!r} not found")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                found.append(Path(dirpath, name).relative_to(root).as_posix())
    return sorted(found)


def is_validation(relpath: str) -> bool:
    """Whether a file (by relative POSIX path) belongs to the held-out split."""
    digest = hashlib.sha256(relpath.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") % 10_000 < VALIDATION_PER_10K


def split_files(relpaths: Iterable[str]) -> Tuple[List[str], List[str]]:
    """Split relative paths into (train, validation), each in sorted order."""
    train, val = [], []
    for p in sorted(relpaths):
        (val if is_validation(p) else train).append(p)
    return train, val


def token_stream(root: os.PathLike, relpaths: Sequence[str]) -> np.ndarray:
    """The token ids of files joined as ``EOT file EOT file ... EOT``.

    Each file's raw bytes are its tokens (no decoding, so any encoding works);
    the end-of-text token opens the stream and closes every file.

    Returns:
        np.ndarray: ``uint16`` token ids.
    """
    root = Path(root)
    parts = [np.array([EOT_ID], dtype=np.uint16)]
    for p in relpaths:
        data = np.frombuffer((root / p).read_bytes(), dtype=np.uint8)
        parts.append(data.astype(np.uint16))
        parts.append(np.array([EOT_ID], dtype=np.uint16))
    return np.concatenate(parts)


def unigram_entropy_bits(byte_tokens: np.ndarray) -> float:
    """Empirical entropy, in bits per byte, of the byte values in a stream.

    Tokens that are not bytes (the end-of-text marker) are left out.
    """
    b = np.asarray(byte_tokens)
    b = b[b < 256]
    counts = np.bincount(b.astype(np.int64), minlength=256).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def build_tokenizer():
    """The byte-level tokenizer as a ``transformers`` fast tokenizer.

    A byte-level BPE model with no merges whose 256-entry vocabulary is in
    byte order (id ``b`` is byte ``b``), a ByteLevel pre-tokenizer without
    regex splitting or prefix space, and a ByteLevel decoder, plus the
    ``<|endoftext|>`` special (id 256) as BOS and EOS. ``encode(text)`` is
    ``list(text.encode("utf-8"))`` for any text (special-token strings in
    the text stay bytes) and ``decode`` inverts it.

    The decoder is wrapped in a one-element ``Sequence`` on purpose: mlx-lm
    picks its BPE streaming detokenizer for a bare ByteLevel decoder, and that
    one drops a leading space of the generated text (wrong for indented code);
    any other decoder gets mlx-lm's exact, decode-based detokenizer.

    Returns:
        transformers.PreTrainedTokenizerFast
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    # ByteLevel maps every byte to one printable character (GPT-2's table);
    # the vocabulary lists those characters with id == byte value. Check our
    # table against the library's: same alphabet, and the pre-tokenizer maps
    # every ASCII byte and both bytes of a 2-byte character as we do.
    vocab = {byte_char(b): b for b in range(256)}
    if set(vocab) != set(pre_tokenizers.ByteLevel.alphabet()):
        raise RuntimeError("byte-level alphabet differs from the tokenizers library's")
    probe = "".join(chr(b) for b in range(128)) + "\u00e9\u07ff"
    ((pieces, _),) = byte_level.pre_tokenize_str(probe)
    if pieces != "".join(byte_char(b) for b in probe.encode("utf-8")):
        raise RuntimeError("byte-level pre-tokenizer maps bytes differently")

    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.Sequence([decoders.ByteLevel()])
    tok.add_special_tokens([EOT_TOKEN])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT_TOKEN,
        eos_token=EOT_TOKEN,
        clean_up_tokenization_spaces=False,
        split_special_tokens=True,
    )


@functools.lru_cache(maxsize=None)
def _byte_chars() -> Tuple[str, ...]:
    # Printable Latin-1 bytes stand for themselves; the others (controls,
    # space, DEL, NBSP, soft hyphen) take code points 256, 257, ... in order.
    printable = set(range(ord("!"), ord("~") + 1))
    printable |= set(range(ord("\u00a1"), ord("\u00ac") + 1))
    printable |= set(range(ord("\u00ae"), ord("\u00ff") + 1))
    chars, n = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + n))
            n += 1
    return tuple(chars)


def byte_char(b: int) -> str:
    """GPT-2's printable stand-in character for byte ``b`` (ByteLevel's table)."""
    return _byte_chars()[b]


def save_tokenizer(out_dir: os.PathLike) -> None:
    """Write the tokenizer files, ``tokenizer.json`` and ``tokenizer_config.json``.

    Only those two: they are all ``transformers`` needs, and the model
    directory stays small. The config names the class
    ``PreTrainedTokenizerFast`` rather than the ``TokenizersBackend`` that
    transformers 5 writes, so transformers 4 and 5 both load it.
    """
    import json
    import shutil
    import tempfile

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        build_tokenizer().save_pretrained(tmp)
        shutil.copyfile(Path(tmp, "tokenizer.json"), out_dir / "tokenizer.json")
        config = json.loads(Path(tmp, "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config.pop("backend", None)
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    (out_dir / "tokenizer_config.json").write_text(text)
