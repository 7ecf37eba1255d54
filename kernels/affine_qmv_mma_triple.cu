// Three mat-vecs of one input in one launch (a q|k|v triple of
// projections): out_i = x @ W_i.T on tensor cores (CUDA only; half and
// bfloat16). Block x takes the 16-row tiles of W0, then those of W1, then
// those of W2; block y takes XR consecutive slots
// (kernels/affine_qmv_mma_block.cuh).
// Template: T, bits, group_size, XR, KW, UNROLL, RUN (see the header).
// Inputs: x [x rows, K], w0, scales0, biases0, w1, scales1, biases1, w2,
// scales2, biases2 (each weight [N_i, K * bits / 32], its scales and
// biases [N_i, K / group_size]), slot_expert (zeros), slot_x [slots],
// params [K, x rows, slots, N0, N1, N2].
// Outputs: out0 [slots, N0], out1 [slots, N1], out2 [slots, N2].
const int tiles0 = (params[3] + 15) / 16;
const int tiles01 = tiles0 + (params[4] + 15) / 16;
const int tile = blockIdx.x;
const int which = tile < tiles0 ? 0 : (tile < tiles01 ? 1 : 2);
affine_qmv_mma_block<T, bits, group_size, XR, KW, UNROLL, RUN>(
    x, which == 0 ? w0 : (which == 1 ? w1 : w2),
    which == 0 ? scales0 : (which == 1 ? scales1 : scales2),
    which == 0 ? biases0 : (which == 1 ? biases1 : biases2), slot_expert,
    slot_x, which == 0 ? out0 : (which == 1 ? out1 : out2), params[3 + which],
    params[0], 1, params[1], params[2],
    (tile - (which == 0 ? 0 : (which == 1 ? tiles0 : tiles01))) * 16,
    blockIdx.y * XR);
