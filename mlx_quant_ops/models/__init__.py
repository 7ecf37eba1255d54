"""Models shipped with the package (see :func:`mlx_quant_ops.default_model_path`)."""
