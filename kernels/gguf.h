// GGUF (ggml) block formats with 32-element blocks: Q4_0 and Q8_0.
//
// Layouts, as ggml's block_q4_0 / block_q8_0:
//   Q4_0: fp16 d, then 16 bytes; byte j holds element j in its low nibble and
//         element j + 16 in its high nibble; value = (nibble - 8) * d.
//   Q8_0: fp16 d, then 32 int8 codes; value = code * d.
//
// Work split: eight lanes of a SIMD group own one block, four consecutive
// elements each, so a SIMD group covers four whole blocks and every load is
// coalesced. Reductions across a block are xor-shuffles over masks 4, 2, 1,
// which stay inside each aligned group of eight lanes.
#pragma once

constant constexpr int GGML_TYPE_Q4_0 = 2;
constant constexpr int GGML_TYPE_Q8_0 = 8;

constant constexpr int MQO_BLOCK32_ELEMS = 32;
constant constexpr int MQO_BLOCK32_LANES = 8;
constant constexpr int MQO_BLOCK32_PER_LANE = 4;
constant constexpr int Q4_0_BLOCK_BYTES = 18;
constant constexpr int Q8_0_BLOCK_BYTES = 34;
constant constexpr int MQO_F16_BYTES = 2;

template <int qtype>
struct Block32Format {
  static constexpr int bytes =
      qtype == GGML_TYPE_Q4_0 ? Q4_0_BLOCK_BYTES : Q8_0_BLOCK_BYTES;
};

// A block's scale and this lane's four codes, as ggml's reference quantizer
// computes them.
struct Block32Codes {
  float d;
  int q[MQO_BLOCK32_PER_LANE];
};

template <typename T>
METAL_FUNC void block32_load(
    const device T* x,
    uint block,
    uint lane,
    bool active,
    thread float* v) {
  const device T* p = x + block * MQO_BLOCK32_ELEMS + lane * MQO_BLOCK32_PER_LANE;
  for (int i = 0; i < MQO_BLOCK32_PER_LANE; ++i) {
    v[i] = active ? static_cast<float>(p[i]) : 0.0f;
  }
}

// Q4_0: d = (the element of largest magnitude, first one on ties) / -8;
// code = min(15, (int)(x / d + 8.5)), with x * (1 / d) rounded before the add.
METAL_FUNC Block32Codes q4_0_quantize(thread const float* v, uint lane) {
  // Starts at +0 like ggml's, so an all-zero block stores d = -0.
  float best = 0.0f;
  for (int i = 0; i < MQO_BLOCK32_PER_LANE; ++i) {
    best = metal::abs(v[i]) > metal::abs(best) ? v[i] : best;
  }
  uint best_lane = lane;
  for (uint mask = MQO_BLOCK32_LANES / 2; mask > 0; mask >>= 1) {
    float other = simd_shuffle_xor(best, mask);
    uint other_lane = simd_shuffle_xor(best_lane, mask);
    bool take = metal::abs(other) > metal::abs(best) ||
        (metal::abs(other) == metal::abs(best) && other_lane < best_lane);
    best = take ? other : best;
    best_lane = take ? other_lane : best_lane;
  }
  Block32Codes out;
  out.d = mqo_div(best, -8.0f);
  float id = out.d != 0.0f ? mqo_div(1.0f, out.d) : 0.0f;
  for (int i = 0; i < MQO_BLOCK32_PER_LANE; ++i) {
    int code = static_cast<int>(mqo_add(mqo_mul(v[i], id), 8.5f));
    out.q[i] = metal::min(15, code);
  }
  return out;
}

// Q8_0: d = max |x| / 127; code = round(x * (1 / d)), halfway away from zero.
METAL_FUNC Block32Codes q8_0_quantize(thread const float* v, uint lane) {
  float amax = 0.0f;
  for (int i = 0; i < MQO_BLOCK32_PER_LANE; ++i) {
    amax = metal::max(amax, metal::abs(v[i]));
  }
  for (uint mask = MQO_BLOCK32_LANES / 2; mask > 0; mask >>= 1) {
    amax = metal::max(amax, simd_shuffle_xor(amax, mask));
  }
  Block32Codes out;
  out.d = mqo_div(amax, 127.0f);
  float id = out.d != 0.0f ? mqo_div(1.0f, out.d) : 0.0f;
  for (int i = 0; i < MQO_BLOCK32_PER_LANE; ++i) {
    out.q[i] = static_cast<int>(metal::round(mqo_mul(v[i], id)));
  }
  return out;
}

template <int qtype>
METAL_FUNC Block32Codes block32_quantize(thread const float* v, uint lane) {
  return qtype == GGML_TYPE_Q4_0 ? q4_0_quantize(v, lane)
                                 : q8_0_quantize(v, lane);
}

// The value a code stands for, given the block scale as stored (fp16).
template <int qtype>
METAL_FUNC float block32_value(int code, float d) {
  return qtype == GGML_TYPE_Q4_0 ? static_cast<float>(code - 8) * d
                                 : static_cast<float>(code) * d;
}

// Write one block from its lanes' codes. Lanes 0-3 of a Q4_0 block each own
// four bytes: their own codes in the low nibbles and the codes of lane + 4
// (elements + 16) in the high nibbles. Every lane must call this (it
// shuffles); `active` guards the stores.
template <int qtype>
METAL_FUNC void block32_store(
    device uchar* out,
    uint block,
    uint lane,
    bool active,
    thread const Block32Codes& c) {
  device uchar* blk = out + block * Block32Format<qtype>::bytes;
  if (qtype == GGML_TYPE_Q4_0) {
    uint mine = 0;
    for (int i = 0; i < MQO_BLOCK32_PER_LANE; ++i) {
      mine |= static_cast<uint>(c.q[i]) << (8 * i);
    }
    uint high = simd_shuffle_xor(mine, 4u);
    if (active && lane < 4) {
      for (int i = 0; i < MQO_BLOCK32_PER_LANE; ++i) {
        uint lo = (mine >> (8 * i)) & 0xfu;
        uint hi = (high >> (8 * i)) & 0xfu;
        blk[MQO_F16_BYTES + lane * MQO_BLOCK32_PER_LANE + i] =
            static_cast<uchar>(lo | (hi << 4));
      }
    }
  } else if (active) {
    for (int i = 0; i < MQO_BLOCK32_PER_LANE; ++i) {
      blk[MQO_F16_BYTES + lane * MQO_BLOCK32_PER_LANE + i] =
          static_cast<uchar>(c.q[i] & 0xff);
    }
  }
  if (active && lane == 0) {
    mqo_store_u16(blk, mqo_f32_to_f16_bits(c.d));
  }
}

// Read one lane's codes and the block scale back from a stored block.
template <int qtype>
METAL_FUNC Block32Codes block32_read(
    const device uchar* blocks,
    uint block,
    uint lane) {
  const device uchar* blk = blocks + block * Block32Format<qtype>::bytes;
  Block32Codes c;
  c.d = mqo_f16_bits_to_f32(mqo_load_u16(blk));
  for (int i = 0; i < MQO_BLOCK32_PER_LANE; ++i) {
    uint elem = lane * MQO_BLOCK32_PER_LANE + i;
    if (qtype == GGML_TYPE_Q4_0) {
      uchar byte = blk[MQO_F16_BYTES + (elem & 15u)];
      c.q[i] = elem < 16 ? (byte & 0xf) : (byte >> 4);
    } else {
      int byte = blk[MQO_F16_BYTES + elem];
      c.q[i] = byte >= 128 ? byte - 256 : byte;  // int8 code
    }
  }
  return c;
}
