// MLX affine mat-vec on tensor cores (CUDA only; half and bfloat16), one
// weight: block x takes weight rows 16 x .. 16 x + 15 and block y XR
// consecutive slots (kernels/affine_qmv_mma_block.cuh has the method).
// Template: T, bits, group_size, XR, KW, UNROLL, RUN (see the header).
// Inputs: x [x rows, K], w [experts * N, K * bits / 32], scales, biases
// [experts * N, K / group_size], slot_expert, slot_x [slots] (any integer
// type), params [N, K, experts, x rows, slots]. Output: out [slots, N].
affine_qmv_mma_block<T, bits, group_size, XR, KW, UNROLL, RUN>(
    x, w, scales, biases, slot_expert, slot_x, out, params[0], params[1],
    params[2], params[3], params[4], blockIdx.x * 16, blockIdx.y * XR);
