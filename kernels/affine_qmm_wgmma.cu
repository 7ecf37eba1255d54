// MLX affine mat-mat on Hopper tensor cores through wgmma (CUDA sm_90a only;
// half and bfloat16; bits 1, 2, 4, 8): the prefill kernel where the GPU has
// wgmma. Same tiles, inputs and grid as affine_qmm_mma.cu (which the tests
// hold it to through the portable affine_qmm.metal).
//
// Block: 256 threads, two warpgroups. Weight rows are the wgmma M side:
// warp w takes block rows 16 w .. 16 w + 15, and lane (g, t) dequantizes
// rows g and g + 8 straight into its A fragment registers, as the mat-vec
// does; the weights never pass through shared memory. Activations are the
// N side: BM x rows (tokens) x 64 values per step, K-major with the 128-byte
// swizzle, three buffers, read by wgmma through a descriptor.
//
// k order: within a unit the mma's k pairs P = t + 4 i (the pairs lane t
// holds in the A fragment over the unit's two k16 steps) stand for the
// code pairs 4 t + i of AffinePairs (codes lo(p) and hi(p)), so lane t's
// codes sit in one word (4-bit; two words at 8-bit) and dequantize as in
// the mat-vec. The activations are staged in that order (a byte permute
// per pair on their way to shared memory).
//
// Pipeline, step k: dequantize step k's weights (fetched two steps ahead),
// fetch step k + 2's; fence and barrier (step k's activations, stored
// during step k - 1, are visible); issue four wgmma on them; store step
// k + 1's activations into the third buffer (last read by step k - 2,
// done) and fetch step k + 2's; wait until only step k's wgmma is in
// flight. The intent is that the dequantization of step k + 1 overlaps the
// mma of step k; ptxas does not allow it (C7513: a non-wgmma instruction
// defines a wgmma input register inside the pipeline stage) and serializes
// the wgmma, yet the tile still beats affine_qmm_mma.cu by up to 15% on
// an H100. The way out is A from shared memory as well (docs/benchmarks.md).
// Template: T, bits (1, 2, 4 or 8), group_size, BM (64 or 128).
typedef AffineMma<T> Mma;
typedef typename Mma::T2 T2;
typedef AffinePairs<bits> Pairs;
constexpr int BN = 128;  // weight rows per block
constexpr int STAGE_BYTES = BM * 128;  // BM rows of 64 16-bit values
constexpr int ACC = BM / 2;  // accumulators per thread (64 x BM per warpgroup)
// Words of a unit that hold lane t's four code pairs.
constexpr int LANE_WORDS = Pairs::half_word >= 4 ? 1 : 4 / Pairs::half_word;
// Activation units (x row, unit) a thread stages per step.
constexpr int X_UNITS = (2 * BM + 255) / 256;
extern __shared__ __align__(16) unsigned char affine_wgmma_shared[];
// The swizzle needs 1024-byte aligned stages (the launcher adds 1 KB).
unsigned char* const xs = reinterpret_cast<unsigned char*>(
    (reinterpret_cast<size_t>(affine_wgmma_shared) + 1023) & ~static_cast<size_t>(1023));
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

// This lane's weight rows (rows past N read row N - 1, never stored), and
// where its code pairs sit in a unit: word lane_word on, shifted down by
// lane_shift so that they are the word's first four pairs.
const int row = 16 * warp + g;
const size_t row_lo = static_cast<size_t>(expert) * N + min(n0 + row, N - 1);
const size_t row_hi = static_cast<size_t>(expert) * N + min(n0 + row + 8, N - 1);
const AffineRowPair<T> rows(
    w, scales, biases, row_lo, row_hi, words_per_row, groups_per_row);
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
// The A fragments of a step's four k16 steps: step 2 uu + h takes the
// unit's pairs i = 2 h (k columns 2t, 2t + 1) and 2 h + 1 (2t + 8, 2t + 9).
auto dequantize = [&](const Fetched& f, uint32_t (&a)[4][4]) {
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
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      uint32_t* frag = a[2 * uu + h];
      frag[0] = affine_weight_pair<T, bits>(lo, 2 * h, sl2, bl2, slf, blf);
      frag[1] = affine_weight_pair<T, bits>(hi, 2 * h, sh2, bh2, shf, bhf);
      frag[2] = affine_weight_pair<T, bits>(lo, 2 * h + 1, sl2, bl2, slf, blf);
      frag[3] = affine_weight_pair<T, bits>(hi, 2 * h + 1, sh2, bh2, shf, bhf);
    }
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
// Stores in the mma's k order: position pair P of the unit holds the
// activations of code pair 4 (P % 4) + P / 4; 16-byte chunk c of the row
// (pairs 4c .. 4c + 3) goes to chunk c ^ (row % 8).
auto store_x = [&](const XFetched& xf, int buf) {
  unsigned char* stage = xs + buf * STAGE_BYTES;
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
          v[j] = Pairs::x_pair(xf.words[q], 4 * (pair % 4) + pair / 4);
        }
        const int chunk = (4 * uu + c) ^ (r & 7);
        *reinterpret_cast<uint4*>(stage + r * 128 + 16 * chunk) =
            make_uint4(v[0], v[1], v[2], v[3]);
      }
    }
  }
};

uint32_t a_sets[2][4][4];
float acc[ACC];
#pragma unroll
for (int i = 0; i < ACC; ++i) {
  acc[i] = 0.0f;
}
auto step = [&](int kt, Fetched& f, uint32_t (&a)[4][4], XFetched& xf) {
  dequantize(f, a);
  if (kt + 2 < k_steps) {
    fetch(f, kt + 2);
  }
  affine_fence_proxy_async();
  __syncthreads();
  // Everything a wgmma reads is defined before the fence: ptxas serializes
  // the mma where other instructions write its inputs inside the stage.
  const unsigned char* stage = xs + (kt % 3) * STAGE_BYTES;
  unsigned long long desc[4];
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    desc[s] = affine_wgmma_desc(stage + 32 * s);
  }
  affine_wgmma_fence();
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    AffineWgmma<T, BM>::mma(acc, a[s], desc[s]);
  }
  affine_wgmma_commit();
  if (kt + 1 < k_steps) {
    store_x(xf, (kt + 1) % 3);
    if (kt + 2 < k_steps) {
      load_x(xf, kt + 2);
    }
  }
  affine_wgmma_wait<1>();
  // Step k's fragments are read by its wgmma until the wait of step k + 1:
  // a use of both sets here keeps the compiler from giving either set's
  // registers to anything else in between (it sees the asm read them at
  // issue, not later).
#pragma unroll
  for (int s = 0; s < 4; ++s) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      affine_wgmma_keep(a_sets[0][s][i]);
      affine_wgmma_keep(a_sets[1][s][i]);
    }
  }
};

Fetched fetched[2];
XFetched xf;
fetch(fetched[0], 0);
if (k_steps > 1) {
  fetch(fetched[1], 1);
}
load_x(xf, 0);
store_x(xf, 0);
if (k_steps > 1) {
  load_x(xf, 1);
}
// Two steps per trip with the register sets swapped: static indices.
for (int kt = 0; kt < k_steps; kt += 2) {
  step(kt, fetched[0], a_sets[0], xf);
  if (kt + 1 < k_steps) {
    step(kt + 1, fetched[1], a_sets[1], xf);
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
