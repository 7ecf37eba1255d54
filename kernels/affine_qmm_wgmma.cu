// MLX affine mat-mat on Hopper tensor cores through wgmma (CUDA sm_90a only;
// half and bfloat16; every width): the prefill kernel where the GPU has
// wgmma. Same tiles, inputs and grid as affine_qmm_mma.cu (which the tests
// hold it to through the portable affine_qmm.metal).
//
// Block: 256 threads, two warpgroups. Weight rows are the wgmma M side:
// warp w owns block rows 16 w .. 16 w + 15 and lane (g, t) dequantizes rows
// g and g + 8 of them into shared memory. Activations are the N side: BM x
// rows (tokens). Both operands of a step (64 values of K) are K-major tiles
// with the 128-byte swizzle, in three stage buffers, and wgmma reads both
// through descriptors (an A operand in registers that the next step's
// dequantization writes makes ptxas serialize the wgmma, C7513).
//
// The tile is bound by the L1 (shared memory and global loads share its
// wavefronts), so every access is shaped to touch as few 128-byte lines
// per instruction as it can: a lane's weight words for a step are one
// vector load; a quad loads its rows' four scale and bias values one per
// lane and hands them round by shuffle; eight threads read each x row's
// 128 bytes of the step.
//
// k order: within a unit, position pair P (values 2P, 2P + 1 of the tile
// row) holds code pair P of Order (codes lo(P) and hi(P)). Lane t
// dequantizes step pairs 8 t .. 8 t + 7 (unit t / 2, which makes 16-byte
// chunks 2 t and 2 t + 1 of the row). The activations are staged in the same
// order; the pairs of one code word only mix the activations under that
// word, so a thread permutes the bytes it loaded in place.
// Widths whose codes straddle words (3, 5, 6 bits) cannot give every lane
// the same work from whole words, so there a lane's half unit (16 codes,
// 2 bits bytes) is a byte stream of its own, shifted down to byte 0, and
// pair q of it is codes q and q + 8 (affine_stream_pair): the k order of 2
// bits, whose 16-code words pair the same way.
//
// Pipeline, step k: fence and barrier (step k's stage, written during step
// k - 1, is visible to the tensor cores); issue four wgmma on it; then
// dequantize step k + 1's weights (fetched two steps before) into the next
// stage, fetch step k + 3's, store step k + 1's activations there and load
// step k + 1 + X_SETS's; wait until only step k's wgmma is in flight. The stage
// written in step k was last read by step k - 2's wgmma, which both
// warpgroups finished before the barrier of step k.
// Template: T, bits, group_size, BM (64, 128 or 256).
typedef AffineMma<T> Mma;
typedef typename Mma::T2 T2;
typedef AffinePairs<bits> Pairs;
constexpr bool WHOLE_WORDS = Pairs::whole_words;
typedef AffinePairs<WHOLE_WORDS ? bits : 2> Order;  // the k order (see above)
constexpr int BN = 128;  // weight rows per block
constexpr int X_STAGE_BYTES = BM * 128;  // BM rows of 64 16-bit values
constexpr int W_STAGE_BYTES = BN * 128;
constexpr int STAGES = 3;
constexpr int ACC = BM / 2;  // accumulators per thread (64 x BM per warpgroup)
// A lane's code pairs of a row and step, and the words holding them: at
// straddling widths, the words under its half unit (which starts 0 or 2
// bytes into a word) and the stream words they shift into.
constexpr int LANE_PAIRS = 8;
constexpr int HALF_UNIT_BYTES = 2 * bits;
constexpr int STREAM_WORDS = (HALF_UNIT_BYTES + 3) / 4;
constexpr int LANE_WORDS = WHOLE_WORDS
    ? (LANE_PAIRS >= Pairs::half_word ? LANE_PAIRS / Pairs::half_word : 1)
    : (HALF_UNIT_BYTES + HALF_UNIT_BYTES % 4 + 3) / 4;
// Groups a step's two units span: two at group 32, else one.
constexpr int STEP_GROUPS = group_size == AFFINE_UNIT ? 2 : 1;
// Activation staging: a thread moves X_CHUNK bytes of one row's step, whole
// code words' worth (so the pair permute stays inside them) and at least 16.
constexpr int X_CHUNK = 2 * Order::per_word > 16 ? 2 * Order::per_word : 16;
constexpr int X_REGIONS = 128 / X_CHUNK;  // per row and step
constexpr int X_WORDS = X_CHUNK / 4;
constexpr int X_ITEMS = (BM * X_REGIONS + 255) / 256;  // per thread
// Register sets of activations in flight: two (each load gets two steps to
// arrive) where the registers allow, one at BM = 256.
constexpr int X_SETS = BM > 128 ? 1 : 2;
extern __shared__ __align__(16) unsigned char affine_wgmma_shared[];
// The swizzle needs 1024-byte aligned stages (the launcher adds 1 KB).
// Offsetting the array itself (not a cast address) keeps the compiler's
// knowledge that these are shared: st.shared rather than generic stores.
const unsigned int shared_base =
    static_cast<unsigned int>(__cvta_generic_to_shared(affine_wgmma_shared));
unsigned char* const ws = affine_wgmma_shared + ((1024u - (shared_base & 1023u)) & 1023u);
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

// This lane's rows (row and row + 8, as in the D fragment; rows past N read
// row N - 1 and are never stored). Lanes g and g + 1 of a quarter warp
// differ in row bit 0, so their swizzled 16-byte stores never share banks.
const int row = 16 * warp + g;
const size_t row_lo = static_cast<size_t>(expert) * N + min(n0 + row, N - 1);
const size_t row_hi = static_cast<size_t>(expert) * N + min(n0 + row + 8, N - 1);
const AffineRowPair<T> rows(
    w, scales, biases, row_lo, row_hi, words_per_row, groups_per_row);
// Where the lane's code pairs sit: unit lane_unit of the step, word
// lane_word of the unit on, shifted down by lane_shift bits so that they
// are the first pairs of the words (straddling widths: so that its half
// unit starts at bit 0).
const int lane_unit = t >> 1;
const int lane_pair0 = LANE_PAIRS * (t & 1);
const int lane_word = WHOLE_WORDS ? lane_pair0 / Pairs::half_word : HALF_UNIT_BYTES * (t & 1) / 4;
const int lane_shift =
    WHOLE_WORDS ? bits * (lane_pair0 % Pairs::half_word) : 8 * (HALF_UNIT_BYTES * (t & 1) % 4);
// The quad's scale and bias values of a step: array a (scale lo, bias lo,
// scale hi, bias hi) of the step's unit u sits on quad lane
// STEP_GROUPS == 1 ? a : 2 (a % 2) + u, in half a / 2 of its packed word.
// So this lane fetches, for each of its STEP_GROUPS values, the group of
// unit sb_unit of the step in array sb_array[j].
const T* sb_array[STEP_GROUPS];
#pragma unroll
for (int j = 0; j < STEP_GROUPS; ++j) {
  const int a = STEP_GROUPS == 1 ? t : 2 * j + (t >> 1);
  sb_array[j] = a == 0 ? rows.s_lo : a == 1 ? rows.b_lo : a == 2 ? rows.s_hi : rows.b_hi;
}
const int sb_unit = STEP_GROUPS == 1 ? 0 : (t & 1);

struct Fetched {
  uint32_t lo[LANE_WORDS];
  uint32_t hi[LANE_WORDS];
  T sb[STEP_GROUPS];
  bool valid;
};
auto fetch = [&](Fetched& f, int kt) {
  const int u = 2 * kt + lane_unit;
  f.valid = u < units;  // a unit past K: zero weights
  const int uc = min(u, units - 1);
  // AffineUnit<n> loads n consecutive words as one vector where n is 2 or
  // 4; at whole-word widths the lane's words start at a multiple of
  // LANE_WORDS, so they align. Straddling widths load word by word.
  if constexpr (WHOLE_WORDS) {
    AffineUnit<LANE_WORDS>::load(rows.w_lo + uc * bits + lane_word, f.lo);
    AffineUnit<LANE_WORDS>::load(rows.w_hi + uc * bits + lane_word, f.hi);
  } else {
#pragma unroll
    for (int i = 0; i < LANE_WORDS; ++i) {
      f.lo[i] = rows.w_lo[uc * bits + lane_word + i];
      f.hi[i] = rows.w_hi[uc * bits + lane_word + i];
    }
  }
  const int group_unit = min(2 * kt + sb_unit, units - 1);
#pragma unroll
  for (int j = 0; j < STEP_GROUPS; ++j) {
    f.sb[j] = sb_array[j][group_unit * AFFINE_UNIT / group_size];
  }
};
auto bits16 = [](T v) {
  return static_cast<uint32_t>(*reinterpret_cast<const unsigned short*>(&v));
};
auto from_bits16 = [](uint32_t v) {
  const unsigned short h = static_cast<unsigned short>(v);
  return *reinterpret_cast<const T*>(&h);
};
// A step's weights into shared memory: pairs 8 t .. 8 t + 3 of each row go
// to 16-byte chunk 2 t, the next four to chunk 2 t + 1, swizzled by the row.
auto store_w = [&](const Fetched& f, int buf) {
  unsigned char* stage = ws + buf * W_STAGE_BYTES;
  const uint32_t packed =
      bits16(f.sb[0]) | (STEP_GROUPS == 2 ? bits16(f.sb[STEP_GROUPS - 1]) << 16 : 0u);
  T sb[4];
#pragma unroll
  for (int a = 0; a < 4; ++a) {
    const int source = (lane & ~3) | (STEP_GROUPS == 1 ? a : 2 * (a & 1) + lane_unit);
    const uint32_t v = __shfl_sync(0xFFFFFFFFu, packed, source);
    sb[a] = f.valid ? from_bits16(v >> (16 * (a >> 1) * (STEP_GROUPS - 1)))
                    : static_cast<T>(0.0f);
  }
  const T2 sl2 = Mma::splat(sb[0]), bl2 = Mma::splat(sb[1]);
  const T2 sh2 = Mma::splat(sb[2]), bh2 = Mma::splat(sb[3]);
  const float slf = static_cast<float>(sb[0]), blf = static_cast<float>(sb[1]);
  const float shf = static_cast<float>(sb[2]), bhf = static_cast<float>(sb[3]);
  uint32_t vlo[LANE_PAIRS], vhi[LANE_PAIRS];
  if constexpr (WHOLE_WORDS) {
    uint32_t lo[LANE_WORDS], hi[LANE_WORDS];
#pragma unroll
    for (int i = 0; i < LANE_WORDS; ++i) {
      lo[i] = f.lo[i] >> lane_shift;
      hi[i] = f.hi[i] >> lane_shift;
    }
#pragma unroll
    for (int i = 0; i < LANE_PAIRS; ++i) {
      vlo[i] = affine_weight_pair<T, bits>(lo, i, sl2, bl2, slf, blf);
      vhi[i] = affine_weight_pair<T, bits>(hi, i, sh2, bh2, shf, bhf);
    }
  } else {
    uint32_t lo[STREAM_WORDS], hi[STREAM_WORDS];
#pragma unroll
    for (int i = 0; i < STREAM_WORDS; ++i) {
      const uint32_t lo_next = i + 1 < LANE_WORDS ? f.lo[i + 1] : 0u;
      const uint32_t hi_next = i + 1 < LANE_WORDS ? f.hi[i + 1] : 0u;
      lo[i] = __funnelshift_r(f.lo[i], lo_next, lane_shift);
      hi[i] = __funnelshift_r(f.hi[i], hi_next, lane_shift);
    }
#pragma unroll
    for (int i = 0; i < LANE_PAIRS; ++i) {
      vlo[i] = affine_stream_pair<T, bits>(lo, i, sl2, bl2);
      vhi[i] = affine_stream_pair<T, bits>(hi, i, sh2, bh2);
    }
  }
#pragma unroll
  for (int c = 0; c < 2; ++c) {
    const int chunk = 2 * t + c;
    *reinterpret_cast<uint4*>(stage + row * 128 + 16 * (chunk ^ (row & 7))) =
        make_uint4(vlo[4 * c], vlo[4 * c + 1], vlo[4 * c + 2], vlo[4 * c + 3]);
    *reinterpret_cast<uint4*>(stage + (row + 8) * 128 + 16 * (chunk ^ ((row + 8) & 7))) =
        make_uint4(vhi[4 * c], vhi[4 * c + 1], vhi[4 * c + 2], vhi[4 * c + 3]);
  }
};

// Activations: thread item e = tid + 256 q is region e % X_REGIONS (bytes
// X_CHUNK r.. of the step) of x row e / X_REGIONS; rows past the tile and
// units past K stage zeros.
struct XFetched {
  uint32_t words[X_ITEMS][X_WORDS];
};
// Each item's row start (null past the tile), looked up once.
const T* x_row[X_ITEMS];
#pragma unroll
for (int q = 0; q < X_ITEMS; ++q) {
  const int e = tid + 256 * q;
  const int r = e / X_REGIONS;
  x_row[q] = e < BM * X_REGIONS && r < count
      ? x + static_cast<size_t>(slot_x[slot0 + r]) * K + (e % X_REGIONS) * (X_CHUNK / 2)
      : nullptr;
}
auto load_x = [&](XFetched& xf, int kt) {
#pragma unroll
  for (int q = 0; q < X_ITEMS; ++q) {
    const int e = tid + 256 * q;
    const int value0 = (e % X_REGIONS) * (X_CHUNK / 2);  // into the step
    const int u = 2 * kt + value0 / AFFINE_UNIT;
    if (x_row[q] != nullptr && u < units) {
      const uint4* src = reinterpret_cast<const uint4*>(x_row[q] + 64 * kt);
#pragma unroll
      for (int c = 0; c < X_CHUNK / 16; ++c) {
        const uint4 v = src[c];
        xf.words[q][4 * c] = v.x;
        xf.words[q][4 * c + 1] = v.y;
        xf.words[q][4 * c + 2] = v.z;
        xf.words[q][4 * c + 3] = v.w;
      }
    } else {
#pragma unroll
      for (int i = 0; i < X_WORDS; ++i) {
        xf.words[q][i] = 0u;
      }
    }
  }
};
// Stores in the k order above: pair j of a region holds the activations of
// its code pair j, and 16-byte chunk c of the row goes to chunk c ^ (row % 8).
auto store_x = [&](const XFetched& xf, int buf) {
  unsigned char* stage = xs + buf * X_STAGE_BYTES;
#pragma unroll
  for (int q = 0; q < X_ITEMS; ++q) {
    const int e = tid + 256 * q;
    if (e < BM * X_REGIONS) {
      const int r = e / X_REGIONS;
      const int chunk0 = (e % X_REGIONS) * (X_CHUNK / 16);
      uint32_t v[X_WORDS];
#pragma unroll
      for (int j = 0; j < X_WORDS; ++j) {
        v[j] = Order::x_pair(xf.words[q], j);
      }
#pragma unroll
      for (int c = 0; c < X_CHUNK / 16; ++c) {
        *reinterpret_cast<uint4*>(stage + r * 128 + 16 * ((chunk0 + c) ^ (r & 7))) =
            make_uint4(v[4 * c], v[4 * c + 1], v[4 * c + 2], v[4 * c + 3]);
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
auto step = [&](int kt, Fetched& next, XFetched& x_next) {
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
    store_x(x_next, next_buf);
    if (kt + 1 + X_SETS < k_steps) {
      load_x(x_next, kt + 1 + X_SETS);
    }
  }
  affine_wgmma_wait<1>();
#pragma unroll
  for (int i = 0; i < ACC; ++i) {
    affine_wgmma_pin(acc[i]);
  }
};

Fetched fetched[2];
XFetched x_fetched[X_SETS];
fetch(fetched[0], 0);
load_x(x_fetched[0], 0);
if (k_steps > 1) {
  fetch(fetched[1], 1);
  if (X_SETS == 2) {
    load_x(x_fetched[X_SETS - 1], 1);
  }
}
store_w(fetched[0], 0);
store_x(x_fetched[0], 0);
if (k_steps > 2) {
  fetch(fetched[0], 2);
}
if (k_steps > X_SETS) {
  load_x(x_fetched[0], X_SETS);
}
// Two steps per trip so the register sets have static indices.
for (int kt = 0; kt < k_steps; kt += 2) {
  step(kt, fetched[1], x_fetched[X_SETS - 1]);
  if (kt + 1 < k_steps) {
    step(kt + 1, fetched[0], x_fetched[0]);
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
