// MLX affine mat-vec on tensor cores (CUDA only; half and bfloat16): the
// decode and MoE-decode kernel of the cuda path, with the inputs and the
// slot semantics of affine_qmv.metal (the portable body, which the tests
// hold it to): out[s] = x[slot_x[s]] @ W[slot_expert[s]].T for every slot s.
//
// Why tensor cores for a mat-vec: the work per weight byte is what limits a
// decode on the H100 (unpacking, scaling, multiplying), not the multiply
// count. One mma.sync m16n8k16 takes 16 weight rows x 16 values against up
// to 8 x rows at once, so dequantizing each weight once in packed half
// arithmetic (affine_weight_pair, about three instructions per two weights) is
// all the per-weight work, for 1 x row or 16.
//
// Block: 16 weight rows (one m16 tile), KW warps splitting K. Lane (g, t)
// (g = lane / 4, t = lane % 4) owns rows g and g + 8 and, in turn, the runs
// (RUN consecutive units of 32 values, `bits` words each) r = first + 4 i + t
// of its warp's range, so the four lanes of a row read 4 consecutive runs.
// A run of more than one unit is for widths whose unit is not a whole
// 16-byte vector (3, 5 and 6 bits load a unit as 3-6 single words) but
// whose runs are: a lane then loads its run as a few vectors (a w that is a
// view at an odd offset, word by word). The host picks RUN where it
// measured faster and where it divides K (see affine.py).
// A unit gives 16 weight pairs
// and 8 mma steps; step s takes pairs 2s and 2s + 1 as the k-columns
// {2t, 2t + 1} and {2t + 8, 2t + 9} of the A fragment, and the activations
// of the same pairs as the B fragment of x rows (columns) g. The dot product
// does not care in which order k runs, only that A and B agree.
// Slots: a block row takes XR consecutive slots (8 per n8 tile) and walks
// them in runs that share an expert, as affine_qmv.metal does; an expert or
// x row out of range reads nothing and gives a NaN output row.
// The KW partial sums meet in shared memory at the end of each run.
//
// affine_qmv_mma_block is the work of one block: rows n0 .. n0 + 15 of one
// weight against the slots slot0 .. slot0 + XR - 1. The block's kernel
// picks the weight and n0 (kernels/affine_qmv_mma.cu: one weight, block x
// as the row tile; affine_qmv_mma_pair.cu and _triple.cu: several weights
// of one input, the row tiles of each in turn).
// Template: T (__half or __nv_bfloat16), bits, group_size, XR (1..16), KW
// (warps, the block's threads / 32), UNROLL (trips whose loads are in
// flight together), RUN (1, 2 or 4; K a multiple of RUN units).
// Arguments: x [x rows, K], w [experts * N, K * bits / 32], scales, biases
// [experts * N, K / group_size], slot_expert, slot_x [slots] (any integer
// type), out [slots, N].
template <typename T, int bits, int group_size, int XR, int KW, int UNROLL,
          int RUN, typename SlotExpert, typename SlotX>
__device__ __forceinline__ void affine_qmv_mma_block(
    const T* x, const uint32_t* w, const T* scales, const T* biases,
    const SlotExpert* slot_expert, const SlotX* slot_x, T* out, const int N,
    const int K, const int experts, const int x_rows, const int slots,
    const int n0, const int slot0) {
  typedef AffineMma<T> Mma;
  constexpr int XT = (XR + 7) / 8;  // n8 tiles of x rows
  constexpr int ROWS = 16;  // weight rows per block
  constexpr int COLS = 8 * XT;
  __shared__ float partial[KW][ROWS][COLS + 1];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int count = min(XR, slots - slot0);
  const int units = K / AFFINE_UNIT;
  const int runs = units / RUN;
  const int words_per_row = units * bits;
  const int groups_per_row = K / group_size;
  const int r_first = warp * runs / KW;
  const int r_last = (warp + 1) * runs / KW;
  // Every lane of a warp makes the same number of trips (mma.sync needs the
  // whole warp); lanes past the warp's range add zeros.
  const int trips = (r_last - r_first + 3) / 4;
  // Rows start on 16 bytes when RUN * bits words do (they hold whole runs),
  // so only w's own address decides whether runs load as vectors.
  const bool w_aligned = (reinterpret_cast<size_t>(w) & 15) == 0;
  // A run's groups: one, or one for every group_size / 32 of its units.
  constexpr int RUN_GROUPS = RUN * AFFINE_UNIT > group_size ? RUN * AFFINE_UNIT / group_size : 1;
  constexpr int UNITS_PER_GROUP = RUN / RUN_GROUPS;
  const float nan_value = __int_as_float(0x7FC00000);

  for (int run = 0; run < count;) {
    // Indices compare as 64-bit signed values, so a uint32 index past
    // INT_MAX is out of range rather than negative.
    const long long expert = static_cast<long long>(slot_expert[slot0 + run]);
    int run_end = run + 1;
    while (run_end < count &&
           static_cast<long long>(slot_expert[slot0 + run_end]) == expert) {
      ++run_end;
    }
    const int run_len = run_end - run;
    const bool expert_ok = expert >= 0 && expert < experts;
    const size_t row_base = static_cast<size_t>(expert_ok ? expert : 0) * N;
    // Rows past N read row N - 1 (never stored).
    const size_t row_lo = row_base + min(n0 + g, N - 1);
    const size_t row_hi = row_base + min(n0 + g + 8, N - 1);
    const AffineRowPair<T> rows(
        w, scales, biases, row_lo, row_hi, words_per_row, groups_per_row);
    // x row of column g of each n8 tile. Columns past the run and bad rows
    // read row 0: a column of B only feeds the same column of C, and those
    // are never stored (or stored as NaN).
    const T* xp[XT];
  #pragma unroll
    for (int j = 0; j < XT; ++j) {
      const int col = 8 * j + g;
      long long xrow = -1;
      if (col < run_len) {
        xrow = static_cast<long long>(slot_x[slot0 + run + col]);
      }
      const bool ok = expert_ok && xrow >= 0 && xrow < x_rows;
      xp[j] = x + static_cast<size_t>(ok ? xrow : 0) * K;
    }

    // One accumulator set per unrolled trip: the mma of different trips
    // then form independent chains the scheduler can interleave.
    float acc[UNROLL][XT][4];
  #pragma unroll
    for (int r = 0; r < UNROLL; ++r) {
  #pragma unroll
      for (int j = 0; j < XT; ++j) {
  #pragma unroll
        for (int c = 0; c < 4; ++c) {
          acc[r][j][c] = 0.0f;
        }
      }
    }
    // The weight words, scales and biases of UNROLL trips: what a warp has
    // in flight from memory. Loads take no branches (a lane past its range
    // reads a clamped unit and zeroes it by its scales), so all of a batch's
    // loads issue before any of its math.
    struct Batch {
      uint32_t lo[UNROLL][RUN * bits];
      uint32_t hi[UNROLL][RUN * bits];
      T sl[UNROLL][RUN_GROUPS], bl[UNROLL][RUN_GROUPS];
      T sh[UNROLL][RUN_GROUPS], bh[UNROLL][RUN_GROUPS];
      int unit[UNROLL];  // the run's first unit
      bool in_range[UNROLL];
    };
    auto load = [&](Batch& batch, int trip0) {
  #pragma unroll
      for (int r = 0; r < UNROLL; ++r) {
        const int run_index = r_first + 4 * (trip0 + r) + t;
        // Past the last trip, run_index is past r_last too.
        batch.in_range[r] = run_index < r_last;
        const int uc = min(run_index, r_last - 1) * RUN;
        batch.unit[r] = uc;
        affine_load_run<bits, RUN>(rows.w_lo + uc * bits, batch.lo[r], w_aligned);
        affine_load_run<bits, RUN>(rows.w_hi + uc * bits, batch.hi[r], w_aligned);
  #pragma unroll
        for (int q = 0; q < RUN_GROUPS; ++q) {
          rows.group((uc + q * UNITS_PER_GROUP) * AFFINE_UNIT / group_size,
                     batch.sl[r][q], batch.bl[r][q], batch.sh[r][q], batch.bh[r][q]);
        }
      }
    };
    // Activations are read here, not with the batch: they are few and hot
    // in L1. (Loading the next batch during this one's math, two batches in
    // turn, was measured: 114 registers against 78 and no faster.)
    auto compute = [&](const Batch& batch) {
  #pragma unroll
      for (int r = 0; r < UNROLL; ++r) {
  #pragma unroll
        for (int c = 0; c < RUN; ++c) {
          uint32_t xw[XT][16];
          affine_load_x_unit<T, XT>(xw, xp, batch.unit[r] + c, run_len);
          // A lane past its range: zero weights (zero scale and bias) times
          // the activations of a unit in range, which are finite unless x is
          // not (and then the product is not finite either way).
          const T zero = static_cast<T>(0.0f);
          const bool ok = batch.in_range[r];
          const int q = c / UNITS_PER_GROUP;
          affine_unit_mma<T, bits, XT>(
              acc[r],
              batch.lo[r] + c * bits,
              batch.hi[r] + c * bits,
              ok ? batch.sl[r][q] : zero,
              ok ? batch.bl[r][q] : zero,
              ok ? batch.sh[r][q] : zero,
              ok ? batch.bh[r][q] : zero,
              xw,
              run_len);
        }
      }
    };
    for (int trip0 = 0; trip0 < trips; trip0 += UNROLL) {
      Batch batch;
      load(batch, trip0);
      compute(batch);
    }

  #pragma unroll
    for (int j = 0; j < XT; ++j) {
  #pragma unroll
      for (int r = 1; r < UNROLL; ++r) {
  #pragma unroll
        for (int c = 0; c < 4; ++c) {
          acc[0][j][c] += acc[r][j][c];
        }
      }
    }
    affine_store_fragments<XT, COLS + 1>(partial[warp], acc[0], g, t);
    __syncthreads();
    for (int e = threadIdx.x; e < ROWS * COLS; e += 32 * KW) {
      const int r = e % ROWS;  // consecutive threads: consecutive outputs
      const int col = e / ROWS;
      if (col < run_len && n0 + r < N) {
        const float sum = affine_sum_warps<KW, COLS + 1>(partial, r, col);
        const long long xrow = static_cast<long long>(slot_x[slot0 + run + col]);
        const bool ok = expert_ok && xrow >= 0 && xrow < x_rows;
        out[static_cast<size_t>(slot0 + run + col) * N + n0 + r] =
            static_cast<T>(ok ? sum : nan_value);
      }
    }
    __syncthreads();
    run = run_end;
  }
}
