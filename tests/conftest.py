"""Test-wide setup: ``tests/`` on the import path for shared helpers, and
the ``gpu`` marker, which skips a test where MLX has no GPU backend."""

import os
import sys

# The embedded model and every fixture are local files; never reach for the
# network (Hugging Face lookups included).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402

from mlx_quant_ops._backend import gpu_backend  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if gpu_backend() is not None:
        return
    skip = pytest.mark.skip(reason="no GPU backend (Metal or CUDA) in this MLX build")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
