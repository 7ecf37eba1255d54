#!/usr/bin/env bash
# One device call's worth of checks, in the order that makes the most of a
# cold machine: the GPU test suite first (its parallel groups fill the PTX
# cache, so the timed runs after it do not pay NVRTC), then the end-to-end
# rows as the package is and with MLX's own __call__ in every Llama layer
# of ours (the A/A control: what the benchmark reads for identical code),
# without the patched model's steps (no-steps: what they gained), with two
# primitives fewer a Llama layer in ours (fewer-nodes: what fused
# q|k|v and gate|up|SwiGLU kernels could gain at most, before building them),
# and with our kernels' planned calls run uncompiled (does mx.compile's
# replay cost the host less than the custom function and kernel call in
# Python?). About 590 s on an H200 (2026-12-05 estimate; give the device
# call its 600 s limit, the last variant is the one to lose). Run from the
# repository root:
#
#     source scripts/device_env.sh && export MLX_PTX_CACHE_DIR=/tmp/ptx \
#         && bash scripts/device_round.sh
#
# Logs and JSON go to $OUT (the device tool's folder).
set -u
out=${OUT:-/tmp}
nvidia-smi --query-gpu=name --format=csv,noheader
OUT=$out/gpu timeout 300 bash scripts/gpu_check.sh
for variant in current mlx-all no-steps fewer-nodes uncompiled-plans; do
  start=$(date +%s)
  timeout 150 python scripts/e2e_variants.py "$variant" "$out/e2e_$variant.json" \
    > "$out/e2e_$variant.txt" 2>&1
  echo "== e2e $variant: rc $?, $(( $(date +%s) - start )) s"
  grep -A4 "^mlx-lm decode" "$out/e2e_$variant.txt" | tail -3
done
