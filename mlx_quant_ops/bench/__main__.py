"""``python -m mlx_quant_ops.bench [--quick] [--only TEXT]``: one row per op
and LLM-shaped case (see :mod:`mlx_quant_ops.bench.core` for the protocol),
then mlx-lm decoding per token where mlx-lm is installed
(:mod:`mlx_quant_ops.bench.decode_cases`)."""

import argparse
import datetime
import importlib
import importlib.util
import json
import os
import platform

import mlx.core as mx

from .._backend import backend
from .core import HEADER, copy_bandwidth, run_cases

# Each module exposes ``cases(quick: bool) -> list[Case]``.
CASE_MODULES = ("gguf_cases", "affine_cases")


def mlx_environment() -> dict:
    """MLX's own ``MLX_*`` environment variables as this run sees them.

    They change what is timed: on CUDA, ``MLX_MAX_OPS_PER_BUFFER`` and
    ``MLX_MAX_MB_PER_BUFFER`` set how MLX cuts work into CUDA graphs, which
    moves the batched op rows (docs/benchmarks.md, fourteenth session).

    Returns:
        dict: name to value, sorted by name; empty where MLX runs on its
        defaults.
    """
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("MLX_")}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m mlx_quant_ops.bench")
    parser.add_argument(
        "--quick", action="store_true", help="small shapes (CPU, smoke runs)"
    )
    parser.add_argument(
        "--only",
        default=None,
        help="run only cases whose op and case, as printed, contain this text",
    )
    parser.add_argument("--json", default=None, help="also write rows to this file")
    args = parser.parse_args(argv)

    device = mx.default_device()
    print(
        f"# {datetime.date.today()} {platform.node()} MLX {mx.__version__} "
        f"device={device} path={backend()}"
    )
    bandwidth = copy_bandwidth(64 if args.quick else 1024)
    print(f"# measured copy bandwidth: {bandwidth / 1e12:.3f} TB/s")
    settings = mlx_environment()
    shown = " ".join(f"{k}={v}" for k, v in settings.items())
    print(f"# MLX environment: {shown or 'defaults'}")
    print(HEADER)
    rows = []
    for name in CASE_MODULES:
        module_name = f"{__package__}.{name}"
        if importlib.util.find_spec(module_name) is None:
            continue
        cases = importlib.import_module(module_name).cases(args.quick)
        if args.only:
            # The op then the case, as a row prints them, so a run can take
            # one width or shape ("qmm decode q6") as well as a whole op.
            cases = [c for c in cases if args.only in f"{c.group} {c.name}"]
        rows += run_cases(cases, bandwidth)
    decode_rows = []
    wants_decode = args.only is None or args.only in "mlx-lm decode"
    if wants_decode and importlib.util.find_spec("mlx_lm") is not None:
        from . import decode_cases

        print(decode_cases.HEADER)
        decode_rows = decode_cases.run(args.quick)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "date": str(datetime.date.today()),
                    "mlx": mx.__version__,
                    "path": backend(),
                    "mlx_environment": settings,
                    "copy_bandwidth": bandwidth,
                    "rows": [
                        {
                            "op": r.case.group,
                            "case": r.case.name,
                            "ours_us": r.ours_us,
                            "builtin_us": r.builtin_us,
                            "dense_us": r.dense_us,
                            "floor_us": r.floor_us,
                        }
                        for r in rows
                    ],
                    "decode": [
                        {
                            "model": r.name,
                            "ours_us_per_token": r.ours_us,
                            "builtin_us_per_token": r.builtin_us,
                            "ours_host_us_per_token": r.ours_host_us,
                            "builtin_host_us_per_token": r.builtin_host_us,
                            "ours_build_us_per_token": r.ours_build_us,
                            "builtin_build_us_per_token": r.builtin_build_us,
                            "ours_over_builtin_paired": r.paired_ratio,
                            "paired_ratio_quartiles": list(r.ratio_quartiles),
                        }
                        for r in decode_rows
                    ],
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
