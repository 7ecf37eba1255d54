// MLX affine x @ W (transpose=False): W is [K, N] with its groups and
// packing along N. Plain SIMT float32 arithmetic (exact float32 results,
// which MLX's own float32 matmul on CUDA does not give: it uses TF32).
// Tiles and slots as affine_qmm.metal; grid x covers N in steps of BN.
// Per step of BK = 32 rows of W the threadgroup stages BM x BK activations
// and, transposed, BK x BN dequantized weights (two units per W row).
// K (x's last axis) is any size: rows past it read as zero.
// Template: T, bits, group_size. Inputs as affine_qmv with
// w [experts * K, N * bits / 32], scales, biases [experts * K, N / group_size],
// params [N, K]. Output: out.
constexpr int BM = 32;
constexpr int BN = 64;
constexpr int BK = 32;
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
const int words_per_row = N / AFFINE_UNIT * bits;
const int groups_per_row = N / group_size;
const int units_per_row = N / AFFINE_UNIT;

// Activation loader: 8 consecutive values of one row per thread (scalar
// loads: rows of any length K).
const int x_row = tid / 4;
const int x_col = (tid % 4) * 8;
const bool x_valid = x_row < count;
const device T* xp =
    x + static_cast<ulong>(slot_x[slot0 + metal::min(x_row, count - 1)]) * K;
// Weight loader: W row k0 + (tid % 32); the quarter tid / 32 (uniform per
// simdgroup) picks the unit (two per BN) and the half of it.
const int w_k = tid % BK;
const int w_quarter = tid / BK;
const int w_unit = metal::min(n0 / AFFINE_UNIT + w_quarter / 2, units_per_row - 1);
const int w_half = w_quarter % 2;

const int ty = tid / 16;
const int tx = tid % 16;
float acc[4][4];
for (int i = 0; i < 4; ++i) {
  for (int j = 0; j < 4; ++j) {
    acc[i][j] = 0.0f;
  }
}
for (int k0 = 0; k0 < K; k0 += BK) {
  for (int i = 0; i < 8; ++i) {
    const int k = k0 + x_col + i;
    xs[x_row][x_col + i] =
        (x_valid && k < K) ? static_cast<float>(xp[k]) : 0.0f;
  }
  const ulong row =
      static_cast<ulong>(expert) * K + metal::min(k0 + w_k, K - 1);
  uint words[bits];
  AffineUnit<bits>::load(w + row * words_per_row + w_unit * bits, words);
  const int g = w_unit * AFFINE_UNIT / group_size;
  const float s = static_cast<float>(scales[row * groups_per_row + g]);
  const float b = static_cast<float>(biases[row * groups_per_row + g]);
  const int col = (w_quarter / 2) * AFFINE_UNIT;
  if (w_half == 0) {
    for (int i = 0; i < 16; ++i) {
      ws[col + i][w_k] =
          metal::fma(affine_code_float(affine_code<bits>(words, i)), s, b);
    }
  } else {
    for (int i = 0; i < 16; ++i) {
      ws[col + 16 + i][w_k] =
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
