// Helpers shared by every kernel family, in the Metal dialect (CUDA gets
// them through metal_compat.cuh). Bodies and family headers use these
// instead of re-deriving the same bit tricks.
#pragma once

// Threads of one SIMD group (Apple GPUs and NVIDIA warps both have 32).
constant constexpr int MQO_SIMD_SIZE = 32;

// IEEE half <-> float through the 16-bit pattern stored in byte buffers
// (ggml keeps its block scales as raw fp16 bits). The conversion to half
// rounds to nearest even, as ggml's GGML_FP32_TO_FP16 does.
METAL_FUNC ushort mqo_f32_to_f16_bits(float x) {
  return as_type<ushort>(static_cast<half>(x));
}
METAL_FUNC float mqo_f16_bits_to_f32(ushort bits) {
  return static_cast<float>(as_type<half>(bits));
}

// Little-endian 16-bit load and store of a scale at an even byte offset
// (every GGUF block and every scale inside one starts at an even offset).
// One 16-bit access rather than two byte accesses: on the H100, storing the
// low byte of a freshly converted half through st.u8 wrote 0 (ptxas kept the
// half in the upper half of a 32-bit register), which a 16-bit store avoids.
METAL_FUNC ushort mqo_load_u16(const device uchar* p) {
  return *reinterpret_cast<const device ushort*>(p);
}
METAL_FUNC void mqo_store_u16(device uchar* p, ushort v) {
  *reinterpret_cast<device ushort*>(p) = v;
}
