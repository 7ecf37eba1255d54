"""Kernel sources: one Metal body per kernel (``*.metal``), Metal-dialect family
headers (``*.h``), the Metal prelude and the CUDA compatibility header
(``metal_compat.cuh``). Shipped inside the wheel as ``mlx_quant_ops.kernels``
and read at run time by :mod:`mlx_quant_ops._kernels`."""
