// GGUF dequantize for 32-element-block types (Q4_0, Q8_0).
// Template: T (output dtype), qtype. Inputs: blocks [n_blocks * block bytes],
// params [n_blocks]. Output: out [n_blocks * 32].
uint gid = thread_position_in_grid.x;
uint block = gid / MQO_BLOCK32_LANES;
uint lane = gid % MQO_BLOCK32_LANES;
if (block < static_cast<uint>(params[0])) {
  Block32Codes codes = block32_read<qtype>(blocks, block, lane);
  device T* o = out + block * MQO_BLOCK32_ELEMS + lane * MQO_BLOCK32_PER_LANE;
  for (int i = 0; i < MQO_BLOCK32_PER_LANE; ++i) {
    o[i] = static_cast<T>(block32_value<qtype>(codes.q[i], codes.d));
  }
}
