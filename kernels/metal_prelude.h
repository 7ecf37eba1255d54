// Metal side of the dialect: what kernels/metal_compat.cuh gives CUDA, Metal
// mostly has natively (MLX prepends metal_stdlib and its bfloat16 support).
// This prelude adds the few helpers our bodies use beyond Metal's own names.
#pragma once

// Bit-exact quantizers need IEEE division and no fused multiply-add: Metal
// compiles with fast math by default, so turn contraction off and ask for
// safe math in this translation unit.
#pragma METAL fp math_mode(safe)
#pragma METAL fp contract(off)

using namespace metal;

METAL_FUNC float mqo_mul(float a, float b) {
  return a * b;
}
METAL_FUNC float mqo_add(float a, float b) {
  return a + b;
}
METAL_FUNC float mqo_div(float a, float b) {
  return metal::precise::divide(a, b);
}
