"""Test-wide setup: ``tests/`` on the import path for shared helpers, and
the ``gpu`` marker, which skips a test where MLX has no GPU backend."""

import os
import sys

# The embedded model and every fixture are local files; never reach for the
# network (Hugging Face lookups included).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

sys.path.insert(0, os.path.dirname(__file__))

import contextlib  # noqa: E402

import mlx.core as mx  # noqa: E402
import pytest  # noqa: E402

from mlx_quant_ops._backend import gpu_backend, use_backend  # noqa: E402
from mlx_quant_ops._kernels import clear_plans, poison_outputs  # noqa: E402

#: The paths a correctness test runs on: the pure-mx reference everywhere,
#: and the kernel path of this machine's GPU backend (skipped without one).
PATHS = [
    pytest.param("reference", id="reference"),
    pytest.param("gpu", id="gpu", marks=pytest.mark.gpu),
]


@contextlib.contextmanager
def on_path(name: str):
    """Run the ops inside on the named path of :data:`PATHS`; on the GPU,
    kernel outputs start poisoned with NaN so unwritten elements fail."""
    if name == "gpu":
        with use_backend(gpu_backend()), mx.stream(mx.gpu), poison_outputs():
            yield
    else:
        with use_backend("reference"), mx.stream(mx.cpu):
            yield


@pytest.fixture(autouse=True)
def fresh_plans():
    """Every test plans its launches anew. Ops cache a launch per shape,
    made by the dispatch rules of the moment; tests change those rules
    (monkeypatched tunables, another GPU architecture), and a launch that
    an earlier test cached would run the kernel that test picked."""
    clear_plans()
    yield
    clear_plans()


@pytest.fixture(params=PATHS)
def path(request):
    """Parametrizes a test over :data:`PATHS` and runs it on that path."""
    with on_path(request.param):
        yield request.param


def pytest_collection_modifyitems(config, items):
    if gpu_backend() is not None:
        return
    skip = pytest.mark.skip(reason="no GPU backend (Metal or CUDA) in this MLX build")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
