// GGUF quantize for 32-element-block types (Q4_0, Q8_0).
// Template: T (input dtype), qtype (GGML type id).
// Inputs: x [n_blocks * 32] values, params [n_blocks].
// Output: out [n_blocks * block bytes], ggml's byte layout.
// Grid: eight lanes per block, rounded up to whole threadgroups.
uint gid = thread_position_in_grid.x;
uint block = gid / MQO_BLOCK32_LANES;
uint lane = gid % MQO_BLOCK32_LANES;
bool active = block < static_cast<uint>(params[0]);
float v[MQO_BLOCK32_PER_LANE];
block32_load<T>(x, block, lane, active, v);
Block32Codes codes = block32_quantize<qtype>(v, lane);
block32_store<qtype>(out, block, lane, active, codes);
