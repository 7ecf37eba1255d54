// MLX affine quantize, bit-identical to mx.quantize on the CPU: per group
// of group_size values, float32 min and max, then (bits >= 2) a scale from
// the edge of larger magnitude nudged so that edge lands on a code, or
// (bits == 1) scale = max - min and bias = min; codes are
// rint((w - bias) / scale) clamped to [0, 2^bits - 1], computed with the
// unrounded float32 scale; scale and bias are stored rounded to T.
// IEEE division and no fused multiply-add throughout (mqo_* helpers).
// Template: T, bits, group_size. Inputs: w [groups * group_size],
// params [groups]. Outputs: w_q [groups * group_size * bits / 32],
// scales, biases [groups]. One thread per group.
uint group = thread_position_in_grid.x;
if (static_cast<int>(group) < params[0]) {
  const device T* g = w + static_cast<ulong>(group) * group_size;
  float w_min = as_type<float>(0x7F800000u);  // +inf
  float w_max = -w_min;
  for (int i = 0; i < group_size; ++i) {
    float v = static_cast<float>(g[i]);
    w_min = metal::min(w_min, v);
    w_max = metal::max(w_max, v);
  }
  const float n_bins = static_cast<float>((1 << bits) - 1);
  const float eps = 1e-7f;
  float scale;
  float bias;
  if (bits == 1) {
    scale = metal::max(mqo_add(w_max, -w_min), eps);
    bias = w_min;
  } else {
    bool min_side = metal::abs(w_min) > metal::abs(w_max);
    scale = metal::max(mqo_div(mqo_add(w_max, -w_min), n_bins), eps);
    scale = min_side ? scale : -scale;
    float edge = min_side ? w_min : w_max;
    float q0 = metal::rint(mqo_div(edge, scale));
    bias = 0.0f;
    if (q0 != 0.0f) {
      scale = mqo_div(edge, q0);
      bias = edge;
    }
  }
  device uint* packed = w_q + static_cast<ulong>(group) * (group_size * bits / 32);
  for (int u = 0; u < group_size / AFFINE_UNIT; ++u) {
    uint words[bits];
    for (int i = 0; i < bits; ++i) {
      words[i] = 0u;
    }
    for (int v = 0; v < AFFINE_UNIT; ++v) {
      float x = static_cast<float>(g[u * AFFINE_UNIT + v]);
      float q = metal::rint(mqo_div(mqo_add(x, -bias), scale));
      uint code = static_cast<uint>(metal::clamp(q, 0.0f, n_bins));
      int bit = v * bits;
      words[bit >> 5] |= code << (bit & 31);
      if ((bit & 31) + bits > 32) {
        words[(bit >> 5) + 1] |= code >> (32 - (bit & 31));
      }
    }
    for (int i = 0; i < bits; ++i) {
      packed[u * bits + i] = words[i];
    }
  }
  scales[group] = static_cast<T>(scale);
  biases[group] = static_cast<T>(bias);
}
