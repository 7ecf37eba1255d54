// MLX affine mat-mat on Hopper tensor cores through wgmma (CUDA sm_90a only;
// half and bfloat16; bits 1, 2, 4, 8): the prefill kernel where the GPU has
// wgmma. Same tiles, inputs and grid as affine_qmm_mma.cu (which the tests
// hold it to through the portable affine_qmm.metal).
//
// Block: 256 threads, two warpgroups. Weight rows are the wgmma M side:
// warp w takes block rows 16 w .. 16 w + 15, and lane (g, t) dequantizes
// rows g and g + 8 as the mat-vec does, then stores them to shared memory.
// Activations are the N side: BM x rows (tokens). Both operands of a step
// (64 values of K) are K-major tiles with the 128-byte swizzle, in three
// stage buffers, and wgmma reads both through descriptors: an A operand in
// registers that the next step's dequantization writes makes ptxas
// serialize the wgmma (C7513), which this layout avoids.
//
// k order: within a unit, position pair P (values 2P, 2P + 1 of the tile
// row) holds code pair P of AffinePairs (codes lo(P) and hi(P)). Lane t
// dequantizes pairs 4 t .. 4 t + 3, which sit in one word (4-bit; two
// words at 8-bit), and stores them as one 16-byte chunk per row and unit.
// The activations are staged in the same order (a byte permute per pair
// on their way to shared memory).
//
// Pipeline, step k: fence and barrier (step k's stage, written during step
// k - 1, is visible to the tensor cores); issue four wgmma on it; then
// dequantize step k + 1's weights (fetched two steps before) into the next
// stage, fetch step k + 3's, store step k + 1's activations there and load
// step k + 2's; wait until only step k's wgmma is in flight. The stage
// written in step k was last read by step k - 2's wgmma, which both
// warpgroups finished before the barrier of step k.
// Template: T, bits (1, 2, 4 or 8), group_size, BM (64 or 128).
typedef AffineMma<T> Mma;
typedef typename Mma::T2 T2;
typedef AffinePairs<bits> Pairs;
constexpr int BN = 128;  // weight rows per block
constexpr int X_STAGE_BYTES = BM * 128;  // BM rows of 64 16-bit values
constexpr int W_STAGE_BYTES = BN * 128;
constexpr int STAGES = 3;
constexpr int ACC = BM / 2;  // accumulators per thread (64 x BM per warpgroup)
// Words of a unit that hold lane t's four code pairs.
constexpr int LANE_WORDS = Pairs::half_word >= 4 ? 1 : 4 / Pairs::half_word;
// Activation units (x row, unit) a thread stages per step.
constexpr int X_UNITS = (2 * BM + 255) / 256;
extern __shared__ __align__(16) unsigned char affine_wgmma_shared[];
// The swizzle needs 1024-byte aligned stages (the launcher adds 1 KB).
unsigned char* const ws = reinterpret_cast<unsigned char*>(
    (reinterpret_cast<size_t>(affine_wgmma_shared) + 1023) & ~static_cast<size_t>(1023));
unsigned char* const xs = ws + STAGES * W_STAGE_BYTES;
const int N = params[0];
const int K = params[1];
const int tid = threadIdx.x;
const int lane = tid & 31;
const int warp = tid >> 5;
const int g = lane >> 2;
const int t = lane & 3;
const int tile = blockIdx.x;  // row tiles along x: blocks sharing a weight tile run together
const int expert = tiles[3 * tile];
const int slot0 = tiles[3 * tile + 1];
const int count = tiles[3 * tile + 2];
const int n0 = blockIdx.y * BN;
const int units = K / AFFINE_UNIT;
const int words_per_row = units * bits;
const int groups_per_row = K / group_size;
const int k_steps = (units + 1) / 2;

// This lane's rows of D (row and row + 8), and the weight rows it
// dequantizes (w_row and w_row + 8; rows past N read row N - 1, never
// stored). They need not match, since wgmma reads the weights from shared
// memory: rows 16 w + q and 16 w + q + 4 for the lanes g = 2q, 2q + 1 of a
// quarter warp put that quarter's 16-byte stores in eight different
// swizzled chunks (rows differing only in bit 0 would share four).
const int row = 16 * warp + g;
const int w_row = 16 * warp + (((g & 1) << 2) | (g >> 1));
const size_t row_lo = static_cast<size_t>(expert) * N + min(n0 + w_row, N - 1);
const size_t row_hi = static_cast<size_t>(expert) * N + min(n0 + w_row + 8, N - 1);
const AffineRowPair<T> rows(
    w, scales, biases, row_lo, row_hi, words_per_row, groups_per_row);
// Where the lane's code pairs sit in a unit: word lane_word on, shifted down
// by lane_shift so that they are the word's first four pairs.
const int lane_word = (4 * t) / Pairs::half_word;
const int lane_shift = bits * ((4 * t) % Pairs::half_word);

struct Fetched {
  uint32_t lo[2][LANE_WORDS];
  uint32_t hi[2][LANE_WORDS];
  T sl[2], bl[2], sh[2], bh[2];
  bool valid[2];
};
auto fetch = [&](Fetched& f, int kt) {
#pragma unroll
  for (int uu = 0; uu < 2; ++uu) {
    const int u = 2 * kt + uu;
    f.valid[uu] = u < units;  // a unit past K: zero weights
    const int uc = min(u, units - 1);
#pragma unroll
    for (int i = 0; i < LANE_WORDS; ++i) {
      f.lo[uu][i] = rows.w_lo[uc * bits + lane_word + i];
      f.hi[uu][i] = rows.w_hi[uc * bits + lane_word + i];
    }
    rows.group(uc * AFFINE_UNIT / group_size, f.sl[uu], f.bl[uu], f.sh[uu], f.bh[uu]);
  }
};
// A step's weights into shared memory: per unit and row, this lane's four
// pairs are 16-byte chunk 4 uu + t of the row, swizzled by the row.
auto store_w = [&](const Fetched& f, int buf) {
  unsigned char* stage = ws + buf * W_STAGE_BYTES;
#pragma unroll
  for (int uu = 0; uu < 2; ++uu) {
    const T zero = static_cast<T>(0.0f);
    const T sl = f.valid[uu] ? f.sl[uu] : zero, bl = f.valid[uu] ? f.bl[uu] : zero;
    const T sh = f.valid[uu] ? f.sh[uu] : zero, bh = f.valid[uu] ? f.bh[uu] : zero;
    const T2 sl2 = Mma::splat(sl), bl2 = Mma::splat(bl);
    const T2 sh2 = Mma::splat(sh), bh2 = Mma::splat(bh);
    const float slf = static_cast<float>(sl), blf = static_cast<float>(bl);
    const float shf = static_cast<float>(sh), bhf = static_cast<float>(bh);
    uint32_t lo[LANE_WORDS], hi[LANE_WORDS];
#pragma unroll
    for (int i = 0; i < LANE_WORDS; ++i) {
      lo[i] = f.lo[uu][i] >> lane_shift;
      hi[i] = f.hi[uu][i] >> lane_shift;
    }
    uint32_t vlo[4], vhi[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      vlo[i] = affine_weight_pair<T, bits>(lo, i, sl2, bl2, slf, blf);
      vhi[i] = affine_weight_pair<T, bits>(hi, i, sh2, bh2, shf, bhf);
    }
    const int chunk = 4 * uu + t;
    *reinterpret_cast<uint4*>(stage + w_row * 128 + 16 * (chunk ^ (w_row & 7))) =
        make_uint4(vlo[0], vlo[1], vlo[2], vlo[3]);
    *reinterpret_cast<uint4*>(
        stage + (w_row + 8) * 128 + 16 * (chunk ^ ((w_row + 8) & 7))) =
        make_uint4(vhi[0], vhi[1], vhi[2], vhi[3]);
  }
};

// Activations: thread unit e = tid + 256 q is x row e / 2, unit e % 2 of
// the step; rows past the tile and units past K stage zeros.
struct XFetched {
  uint32_t words[X_UNITS][16];
};
auto load_x = [&](XFetched& xf, int kt) {
#pragma unroll
  for (int q = 0; q < X_UNITS; ++q) {
    const int e = tid + 256 * q;
    const int r = e >> 1;
    const int u = 2 * kt + (e & 1);
    if (e < 2 * BM && r < count && u < units) {
      const uint4* src = reinterpret_cast<const uint4*>(
          x + static_cast<size_t>(slot_x[slot0 + r]) * K + u * AFFINE_UNIT);
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const uint4 v = src[c];
        xf.words[q][4 * c] = v.x;
        xf.words[q][4 * c + 1] = v.y;
        xf.words[q][4 * c + 2] = v.z;
        xf.words[q][4 * c + 3] = v.w;
      }
    } else {
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        xf.words[q][i] = 0u;
      }
    }
  }
};
// Stores in the k order above: position pair P of the unit holds the
// activations of code pair P; 16-byte chunk c of the row (pairs 4c ..
// 4c + 3) goes to chunk c ^ (row % 8).
auto store_x = [&](const XFetched& xf, int buf) {
  unsigned char* stage = xs + buf * X_STAGE_BYTES;
#pragma unroll
  for (int q = 0; q < X_UNITS; ++q) {
    const int e = tid + 256 * q;
    if (e < 2 * BM) {
      const int r = e >> 1;
      const int uu = e & 1;
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        uint32_t v[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int pair = 4 * c + j;
          v[j] = Pairs::x_pair(xf.words[q], pair);
        }
        const int chunk = (4 * uu + c) ^ (r & 7);
        *reinterpret_cast<uint4*>(stage + r * 128 + 16 * chunk) =
            make_uint4(v[0], v[1], v[2], v[3]);
      }
    }
  }
};

float acc[ACC];
#pragma unroll
for (int i = 0; i < ACC; ++i) {
  acc[i] = 0.0f;
}
// This warpgroup's 64 weight rows of a weight stage.
const int w_rows_offset = (warp / 4) * 64 * 128;
// Step kt; `next` holds step kt + 1's weights and is refilled with kt + 3's.
auto step = [&](int kt, Fetched& next, XFetched& xf) {
  affine_fence_proxy_async();
  __syncthreads();
  const int buf = kt % STAGES;
  const unsigned char* w_stage = ws + buf * W_STAGE_BYTES + w_rows_offset;
  const unsigned char* x_stage = xs + buf * X_STAGE_BYTES;
  unsigned long long w_desc[4], x_desc[4];
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    w_desc[s] = affine_wgmma_desc(w_stage + 32 * s);
    x_desc[s] = affine_wgmma_desc(x_stage + 32 * s);
  }
#pragma unroll
  for (int i = 0; i < ACC; ++i) {
    affine_wgmma_pin(acc[i]);
  }
  affine_wgmma_fence();
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    AffineWgmma<T, BM>::mma(acc, w_desc[s], x_desc[s]);
  }
  affine_wgmma_commit();
  if (kt + 1 < k_steps) {
    const int next_buf = (kt + 1) % STAGES;
    store_w(next, next_buf);
    if (kt + 3 < k_steps) {
      fetch(next, kt + 3);
    }
    store_x(xf, next_buf);
    if (kt + 2 < k_steps) {
      load_x(xf, kt + 2);
    }
  }
  affine_wgmma_wait<1>();
#pragma unroll
  for (int i = 0; i < ACC; ++i) {
    affine_wgmma_pin(acc[i]);
  }
};

Fetched fetched[2];
XFetched xf;
fetch(fetched[0], 0);
if (k_steps > 1) {
  fetch(fetched[1], 1);
}
store_w(fetched[0], 0);
if (k_steps > 2) {
  fetch(fetched[0], 2);
}
load_x(xf, 0);
store_x(xf, 0);
if (k_steps > 1) {
  load_x(xf, 1);
}
// Two steps per trip so the register sets have static indices.
for (int kt = 0; kt < k_steps; kt += 2) {
  step(kt, fetched[1], xf);
  if (kt + 1 < k_steps) {
    step(kt + 1, fetched[0], xf);
  }
}
affine_wgmma_wait<0>();
#pragma unroll
for (int i = 0; i < ACC; ++i) {
  affine_wgmma_pin(acc[i]);
}

// D fragment: acc[4 j + 0..1] are row 16 warp + g, x rows 8 j + 2 t and
// + 1; acc[4 j + 2..3] the same x rows of weight row + 8.
#pragma unroll
for (int j = 0; j < BM / 8; ++j) {
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    const int m = 8 * j + 2 * t + (c & 1);
    const int n = n0 + row + 8 * (c >> 1);
    if (m < count && n < N) {
      out[static_cast<size_t>(slot_out[slot0 + m]) * N + n] = static_cast<T>(acc[4 * j + c]);
    }
  }
}
