// MLX affine mat-mat on tensor cores (CUDA only; half and bfloat16): the
// prefill and MoE-prefill kernel of the cuda path on GPUs without wgmma
// (Hopper takes affine_qmm_wgmma.cu at every width). Same tiles and inputs as
// affine_qmm.metal (the portable body, which the tests hold it to).
//
// Block: 256 threads (8 warps) computing BM (64 or 128) rows x BN = 128
// columns, K in steps of BK = 64 values (two units), double-buffered in
// shared memory (dynamic: AFFINE_MMA_SHARED_BYTES, set by the launcher),
// rows padded to 72 values (144 bytes) so the eight 16-byte rows an
// ldmatrix phase reads fall in distinct banks.
// Activations go to shared memory by cp.async one step ahead, through no
// registers. Weights are fetched into registers two steps ahead (two sets),
// then dequantized (packed arithmetic, affine_weight_neighbours; thread
// (row tid % 128, unit tid / 128) one whole unit) into shared memory right
// after the mma work of the step before theirs, so one barrier per step
// suffices. Warp (wm, wn) owns rows BM/2 wm .. +BM/2 and columns
// 32 wn .. +32: BM/32 x 4 mma.sync m16n8k16 tiles with float accumulators.
// K need only be a multiple of 32: a last step of one unit reads zeros for
// the other (weights and activations both, so nothing past K is read).
// Template: T (__half or __nv_bfloat16), bits, group_size, BM.
typedef AffineMma<T> Mma;
typedef typename Mma::T2 T2;
constexpr int MT = BM / 32;  // m16 tiles per warp
constexpr int BN = 128;
constexpr int BK = 2 * AFFINE_UNIT;
constexpr int LDS = BK + 8;
constexpr int X_CHUNKS = BM * BK / 8 / 256;  // 16-byte activation chunks per thread
extern __shared__ __align__(16) unsigned short affine_mma_shared[];
unsigned short* xs[2] = {affine_mma_shared, affine_mma_shared + BM * LDS};
unsigned short* ws[2] = {
    affine_mma_shared + 2 * BM * LDS, affine_mma_shared + 2 * BM * LDS + BN * LDS};
const int N = params[0];
const int K = params[1];
const int tid = threadIdx.x;
const int lane = tid & 31;
const int warp = tid >> 5;
const int tile = blockIdx.x;  // row tiles along x: blocks sharing a weight tile run together
const int expert = tiles[3 * tile];
const int slot0 = tiles[3 * tile + 1];
const int count = tiles[3 * tile + 2];
const int n0 = blockIdx.y * BN;
const int units = K / AFFINE_UNIT;
const int words_per_row = units * bits;
const int groups_per_row = K / group_size;

// Weight loader: one row and one of the step's two units per thread (the
// unit is uniform per warp).
const int w_row = tid % BN;
const int w_unit = tid / BN;
const size_t w_index = static_cast<size_t>(expert) * N + min(n0 + w_row, N - 1);
const uint32_t* wp = w + w_index * words_per_row;
const T* sp = scales + w_index * groups_per_row;
const T* bp = biases + w_index * groups_per_row;
// Activation loader: 8 values (16 bytes) per chunk, 8 threads per row,
// rows tid / 8 + 32 c.
const int x_col = (tid & 7) * 8;
int x_row[X_CHUNKS];
const T* xp[X_CHUNKS];
#pragma unroll
for (int c = 0; c < X_CHUNKS; ++c) {
  x_row[c] = (tid >> 3) + 32 * c;
  xp[c] = x + static_cast<size_t>(slot_x[slot0 + min(x_row[c], count - 1)]) * K;
}
auto load_x = [&](int k0, int buf) {
  const int col = k0 + x_col;
  const bool col_ok = col < K;
#pragma unroll
  for (int c = 0; c < X_CHUNKS; ++c) {
    affine_cp_async16(
        &xs[buf][x_row[c] * LDS + x_col],
        xp[c] + (col_ok ? col : 0),
        col_ok && x_row[c] < count);
  }
  affine_cp_async_commit();
};

// Two register sets of fetched weights, so their loads run two K steps
// ahead of their use (one step of mma work does not cover a trip to DRAM).
struct Fetched {
  uint32_t words[bits];
  float scale;
  float bias;
  bool valid;
};
Fetched stages[2];
auto fetch = [&](Fetched& f, int k0) {
  const int unit = k0 / AFFINE_UNIT + w_unit;
  f.valid = unit < units;
  const int uc = min(unit, units - 1);
  AffineUnit<bits>::load(wp + uc * bits, f.words);
  f.scale = static_cast<float>(sp[uc * AFFINE_UNIT / group_size]);
  f.bias = static_cast<float>(bp[uc * AFFINE_UNIT / group_size]);
};
auto stage = [&](const Fetched& f, int buf) {
  // A unit past K stages zeros (zero scale and bias), as its activations.
  const float scale = f.valid ? f.scale : 0.0f;
  const float bias = f.valid ? f.bias : 0.0f;
  const T2 scale2 = Mma::splat(static_cast<T>(scale));
  const T2 bias2 = Mma::splat(static_cast<T>(bias));
  uint4* dst = reinterpret_cast<uint4*>(&ws[buf][w_row * LDS + AFFINE_UNIT * w_unit]);
  // Two halves of eight neighbours (two quads of four, 16 bytes each), so
  // only eight results are live at once. Each half holds every neighbour's
  // partner (AffinePairs::partner), built with it from the same pairs.
  constexpr int partner = AffinePairs<bits>::partner;
  auto quad_of = [](int h, int j) { return partner == 8 ? h + 2 * j : 2 * h + j; };
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    uint32_t out[16];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int quad = quad_of(h, j);
#pragma unroll
      for (int n = 4 * quad; n < 4 * quad + 4; ++n) {
        if ((n / partner) % 2 == 0) {
          out[n] = affine_weight_neighbours<T, bits>(
              f.words, n, scale2, bias2, scale, bias, &out[n + partner]);
        }
      }
    }
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int quad = quad_of(h, j);
      dst[quad] = make_uint4(out[4 * quad], out[4 * quad + 1], out[4 * quad + 2], out[4 * quad + 3]);
    }
  }
};

const int wm = warp >> 2;
const int wn = warp & 3;
const int g = lane >> 2;
const int t2 = (lane & 3) * 2;
float acc[MT][4][4];
#pragma unroll
for (int i = 0; i < MT; ++i) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      acc[i][j][c] = 0.0f;
    }
  }
}

auto mma_step = [&](int buf) {
  const unsigned short* xb = xs[buf];
  const unsigned short* wb = ws[buf];
#pragma unroll
  for (int kk = 0; kk < BK; kk += 16) {
    uint32_t a[MT][4];
    uint32_t b[4][2];
    // Fragments by ldmatrix: A (x rows) one x4 per m16 tile, lanes 0-15
    // rows 0-15 at k, lanes 16-31 the same rows at k + 8; B (weight rows
    // as columns) one x4 per pair of n8 tiles, lanes 0-7 / 8-15 the first
    // tile's rows at k / k + 8, lanes 16-31 the second tile's.
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      const int r = wm * (BM / 2) + i * 16 + (lane & 15);
      affine_ldmatrix_x4(a[i], &xb[r * LDS + kk + 8 * (lane >> 4)]);
    }
#pragma unroll
    for (int jj = 0; jj < 2; ++jj) {
      const int n = wn * 32 + jj * 16 + (lane & 7) + 8 * (lane >> 4);
      uint32_t frag[4];
      affine_ldmatrix_x4(frag, &wb[n * LDS + kk + 8 * ((lane >> 3) & 1)]);
      b[2 * jj][0] = frag[0];
      b[2 * jj][1] = frag[1];
      b[2 * jj + 1][0] = frag[2];
      b[2 * jj + 1][1] = frag[3];
    }
#pragma unroll
    for (int i = 0; i < MT; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        AffineMma<T>::mma(acc[i][j], a[i], b[j]);
      }
    }
  }
};

// Step kt computes on shared buffer kt % 2 with the register set `used`.
// At its barrier, the activations of step kt (cp.async, issued one step
// before) have landed and its weights are staged; right after, the
// activations of step kt + 1 go out to the other buffer (read last in step
// kt - 1, before the barrier), the weights of step kt + 2 are fetched into
// `used`, and after the mma work step kt + 1's weights (`next`) are
// staged. The loop takes two steps at a time with the sets swapped, so
// every register index is static.
const int k_steps = (K + BK - 1) / BK;
auto k_step = [&](int kt, int buf, Fetched& used, const Fetched& next) {
  affine_cp_async_wait_all();
  __syncthreads();
  if (kt + 1 < k_steps) {
    load_x((kt + 1) * BK, buf ^ 1);
  }
  if (kt + 2 < k_steps) {
    fetch(used, (kt + 2) * BK);
  }
  mma_step(buf);
  if (kt + 1 < k_steps) {
    stage(next, buf ^ 1);
  }
};
fetch(stages[0], 0);
if (k_steps > 1) {
  fetch(stages[1], BK);
}
load_x(0, 0);
stage(stages[0], 0);
for (int kt = 0; kt < k_steps; kt += 2) {
  k_step(kt, 0, stages[0], stages[1]);
  if (kt + 1 < k_steps) {
    k_step(kt + 1, 1, stages[1], stages[0]);
  }
}

#pragma unroll
for (int i = 0; i < MT; ++i) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int m = wm * (BM / 2) + i * 16 + g + 8 * h;
    if (m < count) {
      T* o = out + static_cast<size_t>(slot_out[slot0 + m]) * N;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int n = n0 + wn * 32 + j * 8 + t2;
        if (n < N) {
          o[n] = static_cast<T>(acc[i][j][2 * h]);
        }
        if (n + 1 < N) {
          o[n + 1] = static_cast<T>(acc[i][j][2 * h + 1]);
        }
      }
    }
  }
}
