"""Test data of the distributions DESIGN.md asks every format to survive.

Each draw is float32 numpy of shape ``[rows, cols]`` with ``cols`` a multiple
of ``block`` (the format's block size), so the structured cases (zero blocks,
constant blocks, ties) line up with the format's blocks.
"""

import numpy as np

KINDS = (
    "normal",
    "outliers",
    "zero_blocks",
    "constant_blocks",
    "tied_peaks",
    "tiny",
    "huge",
    "uniform_positive",
    "halfway",
)


def sample(kind: str, rows: int, cols: int, block: int, seed: int = 0) -> np.ndarray:
    """One ``[rows, cols]`` float32 draw of distribution ``kind``."""
    rng = np.random.default_rng([seed, KINDS.index(kind)])
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    blocks = x.reshape(rows, cols // block, block)
    if kind == "outliers":
        # A few values 50-200x the rest, as in LLM activations and weights.
        mask = rng.random(x.shape) < 0.01
        x = np.where(mask, x * rng.uniform(50, 200, x.shape), x).astype(np.float32)
    elif kind == "zero_blocks":
        blocks[:, ::2] = 0.0
    elif kind == "constant_blocks":
        blocks[:] = rng.standard_normal((rows, cols // block, 1)).astype(np.float32)
    elif kind == "tied_peaks":
        # The largest magnitude appears twice per block with opposite signs
        # (and once more with the same sign): the tie rule decides the scale.
        peak = np.abs(blocks).max(axis=-1) * 1.5
        blocks[..., 3] = peak
        blocks[..., 7] = -peak
        blocks[..., block - 1] = peak
    elif kind == "tiny":
        x *= np.float32(1e-6)  # scales in fp16's subnormal range
    elif kind == "huge":
        x *= np.float32(3e3)  # scales near the top of fp16's range
    elif kind == "halfway":
        # Values exactly halfway between codes once scaled (a peak of 127 or
        # -8 makes the scale a power of two): the rounding rule decides.
        steps = rng.integers(-120, 120, x.shape).astype(np.float32) + 0.5
        scale = np.float32(2.0 ** rng.integers(-4, 5))
        x = (steps * scale).astype(np.float32)
        x.reshape(rows, cols // block, block)[..., 0] = 127.0 * scale
    elif kind == "uniform_positive":
        x = rng.uniform(0.0, 4.0, x.shape).astype(np.float32)
    return x
