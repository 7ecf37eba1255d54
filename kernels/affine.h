// MLX affine format (mx.quantize, mode "affine"), shared by the affine_*
// bodies. Metal dialect; CUDA sees it through metal_compat.cuh.
//
// The codes of a weight row form one little-endian bit stream, value i at
// bit i * bits, stored in uint32 words. 32 consecutive values therefore fill
// exactly `bits` whole words (a "unit"), whatever the bit width, and since
// group sizes are multiples of 32 a unit never straddles two groups. Every
// kernel walks rows unit by unit: load `bits` words, pull 32 codes out.
#pragma once

constant constexpr int AFFINE_UNIT = 32;  // values per unit

// Code v (0 <= v < 32) of a unit held in words[0 .. bits-1]. With v known at
// compile time (unrolled loops) the word index and shifts are constants and
// codes straddling two words (3, 5, 6 bits) cost one extra shift and or.
template <int bits>
METAL_FUNC uint affine_code(thread const uint* words, int v) {
  const int bit = v * bits;
  const int word = bit >> 5;
  const int shift = bit & 31;
  uint code = words[word] >> shift;
  if (shift + bits > 32) {
    code |= words[word + 1] << (32 - shift);
  }
  return code & ((1u << bits) - 1u);
}

// A code as float without an integer-to-float conversion instruction (those
// run at a fraction of the FMA rate on GPUs): 2^23 + code has the code in
// its low mantissa bits, and subtracting 2^23 is exact.
METAL_FUNC float affine_code_float(uint code) {
  return as_type<float>(code | 0x4B000000u) - 8388608.0f;
}

// Load one unit (`bits` words starting at p) with the widest aligned vector
// loads the width allows: a unit starts at a multiple of `bits` words and
// rows hold a multiple of 32 values, so 2-, 4- and 8-bit units are 8-, 16-
// and 32-byte aligned.
template <int bits>
struct AffineUnit {
  static METAL_FUNC void load(const device uint* p, thread uint* words) {
    for (int i = 0; i < bits; ++i) {
      words[i] = p[i];
    }
  }
};
template <>
struct AffineUnit<2> {
  static METAL_FUNC void load(const device uint* p, thread uint* words) {
    uint2 v = *((const device uint2*)p);
    words[0] = v.x;
    words[1] = v.y;
  }
};
template <>
struct AffineUnit<4> {
  static METAL_FUNC void load(const device uint* p, thread uint* words) {
    uint4 v = *((const device uint4*)p);
    words[0] = v.x;
    words[1] = v.y;
    words[2] = v.z;
    words[3] = v.w;
  }
};
template <>
struct AffineUnit<8> {
  static METAL_FUNC void load(const device uint* p, thread uint* words) {
    uint4 a = ((const device uint4*)p)[0];
    uint4 b = ((const device uint4*)p)[1];
    words[0] = a.x;
    words[1] = a.y;
    words[2] = a.z;
    words[3] = a.w;
    words[4] = b.x;
    words[5] = b.y;
    words[6] = b.z;
    words[7] = b.w;
  }
};
