"""What an installed copy must carry: every kernel source and the embedded
model, found at run time wherever the package is installed."""

import importlib
import json
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


def _all_specs():
    import mlx_quant_ops.affine as affine_module
    import mlx_quant_ops.gguf as gguf_module

    return [
        v
        for module in (affine_module, gguf_module)
        for v in vars(module).values()
        if isinstance(v, _kernels.KernelSpec)
    ]


def test_every_kernel_spec_has_its_body():
    # Reading each body through the loader fails if a file is not shipped.
    specs = _all_specs()
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


def test_cuda_include_source_names_the_inline_files_in_order():
    # On CUDA the kernel text MLX hashes per launch is a few #include lines
    # (KernelSpec.cuda_include_source); they must pull in exactly the files
    # the inline text is made of, in the same order, from this package.
    for spec in _all_specs():
        if "cuda" not in spec.dialects:
            continue
        header, body = spec.cuda_include_source()
        included = [
            line.split('"')[1]
            for line in (header + body).splitlines()
            if line.startswith("#include")
        ]
        folder = str(_kernels.kernel_dir())
        assert included == [f"{folder}/{name}" for name in spec.files("cuda")]
        assert all(Path(p).is_file() for p in included)
        inline = _kernels.compact("\n".join(Path(p).read_text() for p in included[:-1]))
        assert inline == spec.header_text("cuda")
        assert _kernels.compact(Path(included[-1]).read_text()) == spec.body()
        assert len(header) + len(body) < 1024


def test_cuda_include_source_changes_with_the_files(monkeypatch):
    # MLX caches compiled modules (in memory and on disk) by the kernel
    # text; an edited header must give a new text, not a stale module.
    spec = next(s for s in _all_specs() if s.name == "affine_qmv_mma")
    before = spec.cuda_include_source()
    original = _kernels.read_source

    def edited(name):
        text = original(name)
        return text + "\n// edited\n" if name == "affine_mma.cuh" else text

    monkeypatch.setattr(_kernels, "read_source", edited)
    after = spec.cuda_include_source()
    assert after[0] != before[0]


def test_cuda_include_source_refuses_unspellable_folders(monkeypatch):
    spec = _all_specs()[0]
    for folder in ('/opt/a"b/kernels', "relative/kernels", "/opt/a\nb"):
        monkeypatch.setattr(_kernels, "kernel_dir", lambda folder=folder: Path(folder))
        assert spec.cuda_include_source() is None


def test_kernel_tables_stay_out_of_mlx_host_scalar_pool():
    # MLX's CUDA allocator keeps arrays of 8 bytes or less in host memory,
    # which every threadgroup then reads across the bus; size and slot
    # tables are padded past that.
    from mlx_quant_ops import affine

    assert _kernels.sizes(7).nbytes > 8
    assert _kernels.sizes(1, 2).tolist()[:2] == [1, 2]
    slot_expert, slot_x, longest = affine._shape_slots((0,), (0,), 1)
    assert slot_expert.nbytes > 8 and slot_x.nbytes > 8 and longest == 1
    assert slot_x.tolist()[0] == 0


def test_bench_records_mlx_environment(monkeypatch, tmp_path, capsys):
    # A benchmark run says which MLX_* settings it ran under (on CUDA they
    # move the batched op rows), in its header and its JSON; other
    # variables stay out.
    from mlx_quant_ops.bench import __main__ as bench_main

    monkeypatch.setenv("MLX_MAX_OPS_PER_BUFFER", "8")
    monkeypatch.setenv("MLXNOT_A_SETTING", "1")
    monkeypatch.setattr(bench_main, "CASE_MODULES", ())
    out = tmp_path / "rows.json"
    bench_main.main(["--quick", "--only", "no such op", "--json", str(out)])
    recorded = json.loads(out.read_text())["mlx_environment"]
    assert recorded.get("MLX_MAX_OPS_PER_BUFFER") == "8"
    assert all(name.startswith("MLX_") for name in recorded)
    assert "# MLX environment: " in capsys.readouterr().out


def test_bench_only_selects_by_op_and_case(monkeypatch):
    # --only matches the op and the case together, so one width of one op
    # can run alone (a device call has minutes, the whole benchmark more).
    from mlx_quant_ops.bench import __main__ as bench_main

    picked = []
    monkeypatch.setattr(
        bench_main, "run_cases", lambda cases, bandwidth: picked.extend(cases) or []
    )
    monkeypatch.setattr(bench_main, "copy_bandwidth", lambda *args: 1e12)
    bench_main.main(["--quick", "--only", "qmm decode q3"])
    assert picked
    assert all(c.group == "affine qmm decode" for c in picked)
    assert all(c.name.startswith("q3 ") for c in picked)
    picked.clear()
    bench_main.main(["--quick", "--only", "gguf"])
    assert {c.group for c in picked} >= {"gguf quantize", "gguf dequantize"}
