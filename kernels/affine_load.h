// Activation loads of the portable affine matmul bodies (affine_qmv.metal,
// affine_qmm.metal), after affine.h. Metal dialect.
#pragma once

// Eight consecutive activations as float, in one or two 16-byte loads
// (p is 16-byte aligned: rows hold a multiple of 32 values). bfloat16 widens
// by a shift; half through its conversion.
template <typename T>
struct AffineLoad8 {
  static METAL_FUNC void load(const device T* p, thread float* out) {
    for (int i = 0; i < 8; ++i) {
      out[i] = static_cast<float>(p[i]);
    }
  }
};
template <>
struct AffineLoad8<float> {
  static METAL_FUNC void load(const device float* p, thread float* out) {
    float4 a = ((const device float4*)p)[0];
    float4 b = ((const device float4*)p)[1];
    out[0] = a.x;
    out[1] = a.y;
    out[2] = a.z;
    out[3] = a.w;
    out[4] = b.x;
    out[5] = b.y;
    out[6] = b.z;
    out[7] = b.w;
  }
};
template <>
struct AffineLoad8<half> {
  static METAL_FUNC void load(const device half* p, thread float* out) {
    uint4 v = *((const device uint4*)p);
    uint w[4] = {v.x, v.y, v.z, v.w};
    for (int i = 0; i < 4; ++i) {
      out[2 * i] = static_cast<float>(as_type<half>(static_cast<ushort>(w[i])));
      out[2 * i + 1] =
          static_cast<float>(as_type<half>(static_cast<ushort>(w[i] >> 16)));
    }
  }
};
template <>
struct AffineLoad8<bfloat16_t> {
  static METAL_FUNC void load(const device bfloat16_t* p, thread float* out) {
    uint4 v = *((const device uint4*)p);
    uint w[4] = {v.x, v.y, v.z, v.w};
    for (int i = 0; i < 4; ++i) {
      out[2 * i] = as_type<float>(w[i] << 16);
      out[2 * i + 1] = as_type<float>(w[i] & 0xFFFF0000u);
    }
  }
};
