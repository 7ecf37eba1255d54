// Two mat-vecs of one input in one launch (a gate|up pair of projections):
// out0 = x @ W0.T and out1 = x @ W1.T on tensor cores (CUDA only; half and
// bfloat16). Block x takes the 16-row tiles of W0, then those of W1; block
// y takes XR consecutive slots (kernels/affine_qmv_mma_block.cuh).
// Template: T, bits, group_size, XR, KW, UNROLL, RUN (see the header).
// Inputs: x [x rows, K], w0, scales0, biases0, w1, scales1, biases1 (each
// weight [N_i, K * bits / 32], its scales and biases [N_i, K / group_size]),
// slot_expert (zeros), slot_x [slots], params [K, x rows, slots, N0, N1].
// Outputs: out0 [slots, N0], out1 [slots, N1].
const int tiles0 = (params[3] + 15) / 16;
const bool second = static_cast<int>(blockIdx.x) >= tiles0;
affine_qmv_mma_block<T, bits, group_size, XR, KW, UNROLL, RUN>(
    x, second ? w1 : w0, second ? scales1 : scales0,
    second ? biases1 : biases0, slot_expert, slot_x, second ? out1 : out0,
    second ? params[4] : params[3], params[0], 1, params[1], params[2],
    (blockIdx.x - (second ? tiles0 : 0)) * 16, blockIdx.y * XR);
