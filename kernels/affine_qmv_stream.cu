// MLX affine mat-vec for Hopper (sm_90; half and bfloat16) with the weights
// streamed through shared memory by the copy engine: the decode kernel of
// the cuda path for one weight and up to 16 x rows, out = x @ W.T, where
// the shape allows it (see affine.py). Same products as affine_qmv_mma.cu.
//
// Why: a decode is won by keeping enough bytes in flight to cover DRAM's
// latency on every SM for the whole kernel. The register-batch mat-vec
// holds a warp's loads in registers, so what is in flight is capped by
// occupancy, and its many short blocks leave a partly empty last wave.
// Here one producer warp per block asks the copy engine for whole chunks of
// a 16-row tile (STAGES of them in flight, tens of KB per SM, no registers
// held), and the blocks are persistent: a block walks tiles blockIdx.x,
// + gridDim.x, ..., so every SM streams until the end.
//
// Block: KW consumer warps and one producer warp (the last). A chunk is KC
// values of K for the tile's 16 rows: per row, KC * bits / 8 bytes of codes
// and KC / group_size scales and biases, one bulk copy each. Stage buffers
// are reused in turn, guarded by two barriers each: `full` (the copies have
// landed) and `empty` (every consumer warp is done reading).
// Consumers split a chunk's units over the warps as the register-batch
// kernel splits K: lane (g, t) takes rows g and g + 8 and units first + 4 i
// + t of its warp's range (affine_unit_mma). Once a tile's last chunk is
// done, the KW partial sums meet in shared memory and the tile is stored.
//
// Alignment: bulk copies need 16-byte aligned addresses and sizes, which
// the host ensures for sizes (K a multiple of 8 * group_size) and this
// kernel checks for the arrays' addresses; a misaligned array (a view at
// an odd offset) is copied by the producer warp's plain loads instead.
// With XS, the x rows are copied into shared memory once per block (after
// the stages) and read from there: the copy engine's stage buffers leave
// little room for L1, and x reads that miss it stall the consumers. The
// consumers first put the staged rows in pair order (see below), so the
// inner loop loads the mma's B registers without byte permutes.
// Template: T, bits, group_size, XR (x rows, 1 to 16), KW, STAGES, KC (a
// multiple of 8 * group_size), XS (0 or 1), XP (0 or 1: the host left room
// for a second copy of the staged rows, in pair order). Inputs: x [M, K],
// w [N, K * bits / 32], scales, biases [N, K / group_size], params
// [N, K, M]. Output: out [M, N].
constexpr int XT = (XR + 7) / 8;  // n8 tiles of x rows
constexpr int ROWS = 16;  // weight rows per tile
constexpr int COLS = 8 * XT;
// Stage layout: the 16 rows' codes, then their scales, then their biases.
// Row pitches carry padding: with codes 64 bytes past a multiple of 128,
// the 16-byte reads of lanes (g, t) and (g + 1, t) land on different banks.
constexpr int W_ROW_BYTES = KC * bits / 8;
constexpr int W_PITCH = W_ROW_BYTES + 64;
constexpr int G_ROW_BYTES = KC / group_size * sizeof(T);
constexpr int G_PITCH = G_ROW_BYTES + 16;
constexpr int SCALES_AT = ROWS * W_PITCH;
constexpr int BIASES_AT = SCALES_AT + ROWS * G_PITCH;
constexpr int STAGE_BYTES = BIASES_AT + ROWS * G_PITCH;
static_assert(W_ROW_BYTES % 128 == 0 && G_ROW_BYTES % 16 == 0, "chunk size");
extern __shared__ __align__(128) unsigned char affine_stream_shared[];
__shared__ float partial[KW][ROWS][COLS + 1];
__shared__ __align__(8) unsigned long long full[STAGES];
__shared__ __align__(8) unsigned long long empty[STAGES];
__shared__ __align__(8) unsigned long long x_full;
T* const x_shared = reinterpret_cast<T*>(affine_stream_shared + STAGES * STAGE_BYTES);
// With XP, the staged rows again in pair order (the consumers write them).
uint32_t* const x_pairs = reinterpret_cast<uint32_t*>(x_shared + params[2] * params[1]);
const int N = params[0];
const int K = params[1];
const int M = params[2];
const int lane = threadIdx.x & 31;
const int warp = threadIdx.x >> 5;
const int tiles = (N + ROWS - 1) / ROWS;
const int chunks = (K + KC - 1) / KC;
const size_t w_row_bytes = static_cast<size_t>(K) * bits / 8;
const size_t g_row_bytes = static_cast<size_t>(K / group_size) * sizeof(T);

if (threadIdx.x == 0) {
  for (int s = 0; s < STAGES; ++s) {
    affine_mbarrier_init(&full[s], 1);
    affine_mbarrier_init(&empty[s], KW);
  }
  affine_mbarrier_init(&x_full, 1);
  affine_mbarrier_init_fence();
}
__syncthreads();

if (warp == KW) {
  // The producer: fills stage i % STAGES with chunk i of this block's walk
  // once the consumers have released its previous contents.
  const unsigned char* w_bytes = reinterpret_cast<const unsigned char*>(w);
  const unsigned char* s_bytes = reinterpret_cast<const unsigned char*>(scales);
  const unsigned char* b_bytes = reinterpret_cast<const unsigned char*>(biases);
  const bool bulk = ((reinterpret_cast<size_t>(w) | reinterpret_cast<size_t>(scales) |
                      reinterpret_cast<size_t>(biases)) &
                     15) == 0;
  if (XS) {
    const unsigned int x_row_bytes = K * sizeof(T);
    if ((reinterpret_cast<size_t>(x) & 15) == 0) {
      if (lane == 0) {
        affine_mbarrier_expect_bytes(&x_full, M * x_row_bytes);
      }
      __syncwarp();
      if (lane < M) {
        affine_bulk_copy(x_shared + static_cast<size_t>(lane) * K,
                         x + static_cast<size_t>(lane) * K, x_row_bytes, &x_full);
      }
    } else {
      for (int e = lane; e < M * K; e += 32) {
        x_shared[e] = x[e];
      }
      __syncwarp();
      if (lane == 0) {
        affine_mbarrier_arrive(&x_full);
      }
    }
  }
  int i = 0;
  for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int n0 = tile * ROWS;
    const int rows = min(ROWS, N - n0);  // rows past N keep stale bytes, never stored
    for (int c = 0; c < chunks; ++c, ++i) {
      const int stage = i % STAGES;
      if (i >= STAGES) {
        affine_mbarrier_wait(&empty[stage], (i / STAGES - 1) & 1);
      }
      const int k0 = c * KC;
      const int values = min(KC, K - k0);
      const unsigned int code_bytes = values * bits / 8;
      const unsigned int group_bytes = values / group_size * sizeof(T);
      unsigned char* dst = affine_stream_shared + stage * STAGE_BYTES;
      const size_t w_at = static_cast<size_t>(n0) * w_row_bytes + k0 * bits / 8;
      const size_t g_at =
          static_cast<size_t>(n0) * g_row_bytes + k0 / group_size * sizeof(T);
      if (bulk) {
        if (lane == 0) {
          affine_mbarrier_expect_bytes(
              &full[stage], rows * (code_bytes + 2 * group_bytes));
        }
        __syncwarp();
        if (lane < rows) {
          affine_bulk_copy(dst + lane * W_PITCH, w_bytes + w_at + lane * w_row_bytes,
                           code_bytes, &full[stage]);
          affine_bulk_copy(dst + SCALES_AT + lane * G_PITCH,
                           s_bytes + g_at + lane * g_row_bytes, group_bytes,
                           &full[stage]);
          affine_bulk_copy(dst + BIASES_AT + lane * G_PITCH,
                           b_bytes + g_at + lane * g_row_bytes, group_bytes,
                           &full[stage]);
        }
      } else {
        // Codes are 4-byte words and scales 2-byte values wherever the
        // arrays start, so those are the units of the plain copy.
        for (int r = 0; r < rows; ++r) {
          for (unsigned int b = 4 * lane; b < code_bytes; b += 128) {
            *reinterpret_cast<uint32_t*>(dst + r * W_PITCH + b) =
                *reinterpret_cast<const uint32_t*>(w_bytes + w_at + r * w_row_bytes + b);
          }
          for (unsigned int b = 2 * lane; b < group_bytes; b += 64) {
            const size_t from = g_at + r * g_row_bytes + b;
            *reinterpret_cast<unsigned short*>(dst + SCALES_AT + r * G_PITCH + b) =
                *reinterpret_cast<const unsigned short*>(s_bytes + from);
            *reinterpret_cast<unsigned short*>(dst + BIASES_AT + r * G_PITCH + b) =
                *reinterpret_cast<const unsigned short*>(b_bytes + from);
          }
        }
        __syncwarp();
        if (lane == 0) {
          affine_mbarrier_arrive(&full[stage]);
        }
      }
    }
  }
} else {
  const int g = lane >> 2;
  const int t = lane & 3;
  // x row of column g of each n8 tile; columns past M read row 0 and are
  // never stored (a column of B only feeds the same column of C).
  const T* xp[XT];
#pragma unroll
  for (int j = 0; j < XT; ++j) {
    const int col = 8 * j + g;
    const T* rows_at = XS ? (XP ? reinterpret_cast<const T*>(x_pairs) : x_shared) : x;
    xp[j] = rows_at + static_cast<size_t>(col < M ? col : 0) * K;
  }
  if (XS) {
    // The staged rows are put in pair order before any consumer reads
    // them: copied beside them a word per thread where the host left room
    // (XP), else rewritten in place a unit per thread. In-kernel timers on
    // the H100 (14336x4096, one row): the byte permutes cost 7% of the
    // kernel's time, and the rewrite in place wins back only half of it.
    affine_mbarrier_wait(&x_full, 0);
    if (XP) {
      for (int e = threadIdx.x; e < M * K / 2; e += 32 * KW) {
        x_pairs[e] = affine_stream_x_pair_word<T, bits>(x_shared, e);
      }
    } else {
      for (int u = threadIdx.x; u < M * (K / AFFINE_UNIT); u += 32 * KW) {
        affine_stream_pair_x_unit<T, bits>(x_shared + u * AFFINE_UNIT);
      }
    }
    affine_warps_sync(1, 32 * KW);
  }
  const T zero = static_cast<T>(0.0f);
  int i = 0;
  for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int n0 = tile * ROWS;
    float acc[XT][4];
#pragma unroll
    for (int j = 0; j < XT; ++j) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        acc[j][c] = 0.0f;
      }
    }
    for (int c = 0; c < chunks; ++c, ++i) {
      const int stage = i % STAGES;
      const int unit0 = c * (KC / AFFINE_UNIT);
      const int units = min(KC, K - c * KC) / AFFINE_UNIT;
      const int u_first = warp * units / KW;
      const int u_last = (warp + 1) * units / KW;
      const int trips = (u_last - u_first + 3) / 4;
      const unsigned char* src = affine_stream_shared + stage * STAGE_BYTES;
      const AffineRowPair<T> rows(
          reinterpret_cast<const uint32_t*>(src),
          reinterpret_cast<const T*>(src + SCALES_AT),
          reinterpret_cast<const T*>(src + BIASES_AT),
          g,
          g + 8,
          W_PITCH / 4,
          G_PITCH / sizeof(T));
      affine_mbarrier_wait(&full[stage], (i / STAGES) & 1);
#pragma unroll 2
      for (int trip = 0; trip < trips; ++trip) {
        // Every lane makes the same trips (mma.sync needs the whole warp);
        // one past its range reads a unit in range and zeroes it.
        const int u = u_first + 4 * trip + t;
        const bool ok = u < u_last;
        const int uc = min(u, u_last - 1);
        uint32_t lo[bits];
        uint32_t hi[bits];
        AffineUnit<bits>::load(rows.w_lo + uc * bits, lo);
        AffineUnit<bits>::load(rows.w_hi + uc * bits, hi);
        T sl, bl, sh, bh;
        rows.group(uc * AFFINE_UNIT / group_size, sl, bl, sh, bh);
        uint32_t xw[XT][16];
        affine_load_x_unit<T, XT>(xw, xp, unit0 + uc, M);
        affine_unit_mma<T, bits, XT, (XS != 0)>(
            acc,
            lo,
            hi,
            ok ? sl : zero,
            ok ? bl : zero,
            ok ? sh : zero,
            ok ? bh : zero,
            xw,
            M);
      }
      __syncwarp();
      if (lane == 0) {
        affine_mbarrier_arrive(&empty[stage]);
      }
    }

    // The tile's sums meet over the consumer warps only (the producer may
    // be waiting on a stage), on hardware barrier 1.
    affine_store_fragments<XT, COLS + 1>(partial[warp], acc, g, t);
    affine_warps_sync(1, 32 * KW);
    for (int e = threadIdx.x; e < ROWS * COLS; e += 32 * KW) {
      const int r = e % ROWS;  // consecutive threads: consecutive outputs
      const int col = e / ROWS;
      if (col < M && n0 + r < N) {
        out[static_cast<size_t>(col) * N + n0 + r] =
            static_cast<T>(affine_sum_warps<KW, COLS + 1>(partial, r, col));
      }
    }
    affine_warps_sync(1, 32 * KW);
  }
}
