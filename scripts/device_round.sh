#!/usr/bin/env bash
# One device call's worth of checks, in the order that makes the most of a
# cold machine: the GPU test suite first (its parallel groups fill the PTX
# cache, so the timed runs after it do not pay NVRTC), then the end-to-end
# rows as the package is, with the sibling projections fused (fused:
# patch(..., fuse_siblings=True), off by default since the thirty-fifth
# session, when it measured slower), and with MLX's own __call__
# in every Llama layer of ours (mlx-all, the A/A control: what the
# benchmark reads for identical code). e2e_variants.py has more
# (fewer-nodes, no-steps, concat-builtin, uncompiled-plans, ...), and
# scripts/step_profile.py profiles a step's build fused and not. The tests
# take about 300 s and a variant 70-150 s, so a 600 s call may end inside
# the variants: give it the 600 s limit, and run the rest in a second call
# with TESTS=0 and VARIANTS naming them. Run from the repository root:
#
#     source scripts/device_env.sh && bash scripts/device_round.sh
#     ... && TESTS=0 VARIANTS="mlx-all" bash scripts/device_round.sh
#
# Logs go to $OUT (the device tool's folder), the JSON to /tmp; after the
# tests, the PTX cache goes to $OUT/ptx_cache.tgz (copy it into .devcarry/
# for the next call: see device_env.sh).
set -u
out=${OUT:-/tmp}
nvidia-smi --query-gpu=name --format=csv,noheader
# The device tool brings back at most 8 files: the 17 test logs go to one
# file, and each variant's JSON stays on the machine.
if [ "${TESTS:-1}" != 0 ]; then
  OUT=/tmp/gpu_logs timeout 300 bash scripts/gpu_check.sh
  for log in /tmp/gpu_logs/gpu_*.txt; do
    echo "== $(basename "$log")"
    cat "$log"
  done > "$out/gpu_all.txt"
fi
# The compiled kernels, for the next call to carry (see device_env.sh): at
# most 15 MB, the device tool's limit a file being 16 MiB.
save_ptx_cache() {
  local tgz="$out/ptx_cache.tgz"
  tar czf "$tgz" -C "${MLX_PTX_CACHE_DIR:-/tmp/ptx}" . 2>/dev/null || rm -f "$tgz"
  if [ -f "$tgz" ] && [ "$(stat -c %s "$tgz")" -gt 15000000 ]; then
    echo "PTX cache: $(stat -c %s "$tgz") bytes, too large to bring back"
    rm -f "$tgz"
  fi
}
[ "${TESTS:-1}" != 0 ] && save_ptx_cache
variants=${VARIANTS:-current fused mlx-all}
for variant in $variants; do
  start=$(date +%s)
  timeout 150 python scripts/e2e_variants.py "$variant" "/tmp/e2e_$variant.json" \
    > "$out/e2e_$variant.txt" 2>&1
  echo "== e2e $variant: rc $?, $(( $(date +%s) - start )) s"
  grep -A4 "^mlx-lm decode" "$out/e2e_$variant.txt" | tail -3
done
# Again with what the variants compiled.
save_ptx_cache
