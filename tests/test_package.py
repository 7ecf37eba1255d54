"""What an installed copy must carry: every kernel source and the embedded
model, found at run time wherever the package is installed."""

import importlib
import pkgutil
from pathlib import Path

import pytest

import mlx_quant_ops as mqo
from mlx_quant_ops import _kernels

REPO_KERNELS = Path(__file__).resolve().parent.parent / "kernels"


def test_kernel_sources_are_shipped():
    found = {p.name for p in _kernels.kernel_dir().iterdir()}
    assert "metal_compat.cuh" in found and "metal_prelude.h" in found
    if REPO_KERNELS.is_dir():
        # Run from a checkout: whatever kernels/ holds must be in the package
        # this test imported (the installed wheel, under the README command).
        wanted = {
            p.name
            for p in REPO_KERNELS.iterdir()
            if p.suffix in (".metal", ".h", ".cuh", ".cu")
        }
        assert wanted <= found, f"missing from the package: {sorted(wanted - found)}"


def test_every_kernel_spec_has_its_body():
    # Reading each body through the loader fails if a file is not shipped.
    import mlx_quant_ops.gguf as gguf_module

    specs = [
        v for v in vars(gguf_module).values() if isinstance(v, _kernels.KernelSpec)
    ]
    assert specs
    for spec in specs:
        assert spec.body().strip()
        for dialect in _kernels.DIALECT_PRELUDE:
            assert spec.header_text(dialect).strip()


def test_default_model_path_is_inside_the_package():
    path = Path(mqo.default_model_path())
    assert Path(mqo.__file__).parent in path.parents


def test_installed_copy_reads_its_own_kernels():
    package_dir = Path(mqo.__file__).resolve().parent
    if REPO_KERNELS.parent == package_dir.parent:
        pytest.skip("imported from the source tree, not an installed copy")
    # An installed wheel must not fall back to a source checkout's kernels/.
    assert package_dir in _kernels.kernel_dir().resolve().parents


def _tokens(text: str) -> str:
    return " ".join(_kernels._LINE_COMMENT.sub("", text).split())


def test_compacted_sources_lose_only_comments_and_spacing():
    # MLX hashes a kernel's whole source on every launch, so sources go to
    # it compacted (_kernels.compact). That cuts a line at `//`, which is
    # only safe while no string literal holds one.
    for path in sorted(_kernels.kernel_dir().iterdir()):
        if path.suffix not in (".metal", ".h", ".cuh", ".cu"):
            continue
        text = path.read_text()
        for number, line in enumerate(text.splitlines(), 1):
            if '"' in line and "//" in line:
                assert line.index("//") < line.index('"'), f"{path.name}:{number}"
        compacted = _kernels.compact(text)
        assert "//" not in compacted
        assert _tokens(compacted) == _tokens(text), path.name
