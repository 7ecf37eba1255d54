#!/usr/bin/env bash
# The GPU test suite on the device machine, split over parallel pytest
# processes (each new kernel instantiation costs ~1.4 s of NVRTC time on its
# first call, and processes do not share that cache). Run from the
# repository root after `source scripts/device_env.sh`; logs go to $OUT.
set -u
out=${OUT:-/tmp}
mkdir -p "$out"
T="python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short -rf"
start=$(date +%s)
# Each group prints its summary line as it ends, so a run stopped by a
# timeout still reports the groups that finished.
group() {
  local log="$out/$1"
  shift
  $T "$@" > "$log" 2>&1
  echo "== $(basename "$log") ($(( $(date +%s) - start )) s): $(tail -1 "$log")"
}
group gpu_gguf.txt tests/test_gguf.py tests/test_backend.py tests/test_package.py &
# The layer and model tests spend most of their time in NVRTC (MLX's own
# fused kernels under mx.compile and generation, besides ours): three groups.
group gpu_nn.txt tests/test_nn.py tests/test_model.py -k "not generates_same and not model_compiles and not sibling" &
group gpu_nn2.txt tests/test_nn.py -k "generates_same" &
group gpu_nn3.txt tests/test_nn.py -k "model_compiles or sibling" &
# The affine tests by name, and a last group with every affine test none of
# these names (a new test is never left out).
affine_groups=(
  "quantize_dequantize and f32"
  "quantize_dequantize and f16 and not bf16"
  "quantize_dequantize and bf16"
  "matmul_shapes or batch_dims or mixed or defaults or negative or off_hopper or batched_weights"
  "bits_and_groups"
  "prefill_bits and not bf16"
  "prefill_bits and bf16"
  "gather or gradient"
  "decode_bits and not bf16"
  "decode_bits and bf16"
  "streamed and not bf16"
  "streamed and bf16"
  "fused and bf16"
  "fused and f16 and not bf16"
  "fused and not f16"
)
rest=""
for i in "${!affine_groups[@]}"; do
  group "gpu_aff$((i + 1)).txt" tests/test_affine.py -k "${affine_groups[$i]}" &
  rest="$rest${rest:+ and }not (${affine_groups[$i]})"
done
group gpu_aff_rest.txt tests/test_affine.py -k "$rest" &
wait
echo "GPU tests took $(( $(date +%s) - start )) s"
grep -h "^FAILED\|^ERROR" "$out"/gpu_*.txt | head -40
