// GGUF quantize-then-dequantize in one pass for 32-element-block types:
// the values ggml's dequantize gives for ggml's quantization of x, without
// writing the blocks out. Template: T (input and output dtype), qtype.
// Inputs: x [n_blocks * 32], params [n_blocks]. Output: out like x.
uint gid = thread_position_in_grid.x;
uint block = gid / MQO_BLOCK32_LANES;
uint lane = gid % MQO_BLOCK32_LANES;
bool active = block < static_cast<uint>(params[0]);
float v[MQO_BLOCK32_PER_LANE];
block32_load<T>(x, block, lane, active, v);
Block32Codes codes = block32_quantize<qtype>(v, lane);
// Dequantization uses the scale as stored, rounded to fp16.
float d = mqo_f16_bits_to_f32(mqo_f32_to_f16_bits(codes.d));
if (active) {
  device T* o = out + block * MQO_BLOCK32_ELEMS + lane * MQO_BLOCK32_PER_LANE;
  for (int i = 0; i < MQO_BLOCK32_PER_LANE; ++i) {
    o[i] = static_cast<T>(block32_value<qtype>(codes.q[i], d));
  }
}
