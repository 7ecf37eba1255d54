#!/usr/bin/env bash
# The GPU test suite on the device machine, split over parallel pytest
# processes (each new kernel instantiation costs ~1.4 s of NVRTC time on its
# first call, and processes do not share that cache). Run from the
# repository root after `source scripts/device_env.sh`; logs go to $OUT.
set -u
out=${OUT:-/tmp}
T="python3 -m pytest -m gpu -q -p no:cacheprovider --tb=short -rf"
start=$(date +%s)
$T tests/test_gguf.py tests/test_backend.py tests/test_package.py > "$out/gpu_gguf.txt" 2>&1 &
$T tests/test_nn.py tests/test_model.py > "$out/gpu_nn.txt" 2>&1 &
$T tests/test_affine.py -k "quantize_dequantize and f32" > "$out/gpu_aff1.txt" 2>&1 &
$T tests/test_affine.py -k "quantize_dequantize and f16 and not bf16" > "$out/gpu_aff2.txt" 2>&1 &
$T tests/test_affine.py -k "quantize_dequantize and bf16" > "$out/gpu_aff10.txt" 2>&1 &
$T tests/test_affine.py -k "matmul_shapes or batch_dims or mixed or defaults or negative or off_hopper or batched_weights" > "$out/gpu_aff3.txt" 2>&1 &
$T tests/test_affine.py -k "bits_and_groups" > "$out/gpu_aff4.txt" 2>&1 &
$T tests/test_affine.py -k "prefill_bits and not bf16" > "$out/gpu_aff5.txt" 2>&1 &
$T tests/test_affine.py -k "prefill_bits and bf16" > "$out/gpu_aff9.txt" 2>&1 &
$T tests/test_affine.py -k "gather or gradient" > "$out/gpu_aff6.txt" 2>&1 &
$T tests/test_affine.py -k "decode_bits and not bf16" > "$out/gpu_aff7.txt" 2>&1 &
$T tests/test_affine.py -k "decode_bits and bf16" > "$out/gpu_aff8.txt" 2>&1 &
$T tests/test_affine.py -k "streamed and not bf16" > "$out/gpu_aff11.txt" 2>&1 &
$T tests/test_affine.py -k "streamed and bf16" > "$out/gpu_aff12.txt" 2>&1 &
wait
echo "GPU tests took $(( $(date +%s) - start )) s"
for f in "$out"/gpu_*.txt; do echo "== $(basename "$f"): $(tail -1 "$f")"; done
grep -h "^FAILED\|^ERROR" "$out"/gpu_*.txt | head -40
