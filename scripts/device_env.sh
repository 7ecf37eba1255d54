# Source on the GPU machine from the repository root, after carrying
# .devbundle (MLX's CUDA build, see ../shared/tools/mlx_cuda_bundle.py) and
# .devcarry (pure-Python wheels unpacked into .devcarry/site: mlx-lm, gguf,
# pytest with pluggy, iniconfig and packaging).
# The package itself runs from the checkout; its kernels are found in
# kernels/ beside it.
source .devbundle/activate.sh
export PYTHONPATH="$PWD:$PWD/.devcarry/site:$PYTHONPATH"
export PYTHONUNBUFFERED=1
