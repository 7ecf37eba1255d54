// MLX affine mat-mat for prefill (many rows of x per weight matrix), plain
// and MoE-gathered, on plain SIMT arithmetic in float32: the portable body
// (Metal, and float32 on CUDA; CUDA runs half and bfloat16 through the
// tensor-core variant affine_qmm_mma.cu).
//
// Tiles as in affine_qmv.metal: tile t (grid y) is an expert and up to BM
// slots (x row slot_x[s] -> out row slot_out[s]); grid x covers N in steps
// of BN. Per K step of BK = 32 values (one unit; inside one group), the
// threadgroup stages BM x BK activations and BN x BK dequantized weights in
// threadgroup memory (rows padded by one float against bank conflicts),
// then each thread accumulates a 4 x 4 block of outputs. Both barriers are
// reached by every thread.
// Template: T, bits, group_size. Inputs as affine_qmv. Output: out.
constexpr int BM = 32;
constexpr int BN = 64;
constexpr int BK = AFFINE_UNIT;
threadgroup float xs[BM][BK + 1];
threadgroup float ws[BN][BK + 1];
const int N = params[0];
const int K = params[1];
const int tid = thread_index_in_threadgroup;
const int tile = threadgroup_position_in_grid.y;
const int expert = tiles[3 * tile];
const int slot0 = tiles[3 * tile + 1];
const int count = tiles[3 * tile + 2];
const int n0 = threadgroup_position_in_grid.x * BN;
const int words_per_row = K / AFFINE_UNIT * bits;
const int groups_per_row = K / group_size;

// Loaders: 4 threads per activation row (8 values each); 2 threads per
// weight row (16 values each; the half is uniform per simdgroup).
const int x_row = tid / 4;
const int x_col = (tid % 4) * 8;
const bool x_valid = x_row < count;
const device T* xp =
    x + static_cast<ulong>(slot_x[slot0 + metal::min(x_row, count - 1)]) * K +
    x_col;
const int w_row = tid % BN;
const int w_half = tid / BN;
const ulong w_index =
    static_cast<ulong>(expert) * N + metal::min(n0 + w_row, N - 1);
const device uint* wp = w + w_index * words_per_row;
const device T* sp = scales + w_index * groups_per_row;
const device T* bp = biases + w_index * groups_per_row;

// Compute: thread (ty, tx) owns rows 4 ty .. 4 ty + 3 and columns tx + 16 j.
const int ty = tid / 16;
const int tx = tid % 16;
float acc[4][4];
for (int i = 0; i < 4; ++i) {
  for (int j = 0; j < 4; ++j) {
    acc[i][j] = 0.0f;
  }
}
for (int k0 = 0; k0 < K; k0 += BK) {
  float xv[8];
  AffineLoad8<T>::load(xp + k0, xv);
  for (int i = 0; i < 8; ++i) {
    xs[x_row][x_col + i] = x_valid ? xv[i] : 0.0f;
  }
  uint words[bits];
  AffineUnit<bits>::load(wp + (k0 / AFFINE_UNIT) * bits, words);
  const float s = static_cast<float>(sp[k0 / group_size]);
  const float b = static_cast<float>(bp[k0 / group_size]);
  if (w_half == 0) {
    for (int i = 0; i < 16; ++i) {
      ws[w_row][i] = metal::fma(affine_code_float(affine_code<bits>(words, i)), s, b);
    }
  } else {
    for (int i = 0; i < 16; ++i) {
      ws[w_row][16 + i] =
          metal::fma(affine_code_float(affine_code<bits>(words, 16 + i)), s, b);
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int k = 0; k < BK; ++k) {
    float a[4];
    float c[4];
    for (int i = 0; i < 4; ++i) {
      a[i] = xs[4 * ty + i][k];
      c[i] = ws[tx + 16 * i][k];
    }
    for (int i = 0; i < 4; ++i) {
      for (int j = 0; j < 4; ++j) {
        acc[i][j] = metal::fma(a[i], c[j], acc[i][j]);
      }
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
}
for (int i = 0; i < 4; ++i) {
  const int m = 4 * ty + i;
  if (m < count) {
    const ulong o = static_cast<ulong>(slot_out[slot0 + m]) * N;
    for (int j = 0; j < 4; ++j) {
      const int n = n0 + tx + 16 * j;
      if (n < N) {
        out[o + n] = static_cast<T>(acc[i][j]);
      }
    }
  }
}
