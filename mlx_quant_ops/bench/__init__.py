"""Benchmarks: ``python -m mlx_quant_ops.bench`` (see DESIGN.md, Benchmarks)."""
