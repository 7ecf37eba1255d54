# Source on the GPU machine from the repository root, after carrying
# .devbundle (MLX's CUDA build, see ../shared/tools/mlx_cuda_bundle.py) and
# .devcarry (pure-Python wheels unpacked into .devcarry/site: mlx-lm, gguf,
# pytest with pluggy, iniconfig and packaging).
# The package itself runs from the checkout; its kernels are found in
# kernels/ beside it.
#
# MLX keeps the kernels NVRTC compiled in MLX_PTX_CACHE_DIR, keyed by their
# text (which names a digest of our kernel files, see
# KernelSpec.cuda_include_source), so an edited kernel compiles afresh and
# an unchanged one is read back. A fresh machine starts with none: the GPU
# suite spends most of its 300 s in NVRTC. scripts/device_round.sh brings
# the cache back as $OUT/ptx_cache.tgz; copied into .devcarry/, the next
# call starts from it.
source .devbundle/activate.sh
export PYTHONPATH="$PWD:$PWD/.devcarry/site:$PYTHONPATH"
export PYTHONUNBUFFERED=1
export MLX_PTX_CACHE_DIR="${MLX_PTX_CACHE_DIR:-/tmp/ptx}"
mkdir -p "$MLX_PTX_CACHE_DIR"
if [ -f .devcarry/ptx_cache.tgz ]; then
  tar xzf .devcarry/ptx_cache.tgz -C "$MLX_PTX_CACHE_DIR" \
    && echo "PTX cache: $(ls "$MLX_PTX_CACHE_DIR" | wc -l) files from .devcarry" \
    || echo "PTX cache: .devcarry/ptx_cache.tgz did not unpack; compiling afresh"
fi
