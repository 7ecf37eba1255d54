// MLX affine mat-vec for decode (a few rows of x per weight matrix), plain,
// batched and MoE-gathered: out[s] = x[slot_x[s]] @ W[slot_expert[s]].T for
// every slot s (one output row each, in order).
//
// Threadgroup row y takes XR consecutive slots and walks them in runs that
// share an expert (sorted MoE indices give long runs, unsorted ones runs of
// one; a plain product is one run), so a run of up to XR rows reads each
// weight word once. The run boundaries come from the index arrays on the
// device: nothing is read back to the host, so MoE layers need no sync and
// work under mx.compile. An expert or x row out of range never reads out of
// bounds: it reads entry 0 instead and its output row is NaN.
// A threadgroup (SIMDGROUPS simdgroups) covers SIMDGROUPS * R output
// columns, R per simdgroup. Lanes walk K in units of 32 values (`bits`
// words, one or two vector loads per row); a unit lies in one group, so per
// unit each lane keeps sum(q * x) per (x row, W row) and sum(x) per x row
// and adds scale * sum(q * x) + bias * sum(x) at its end. The next unit's
// words are loaded before the current one is used. Every fixed-trip loop
// is unrolled so the code words stay in registers (indexed by constants).
// One simd_sum per output at the end of a run; every thread walks the same
// runs, so all reach it.
// Template: T, bits, group_size, XR (slots per threadgroup row, <= 8).
// Inputs: x [x rows, K], w [experts * N, K * bits / 32], scales, biases
// [experts * N, K / group_size], slot_expert, slot_x [slots] (any integer
// type), params [N, K, experts, x rows, slots]. Output: out [slots, N].
constexpr int SIMDGROUPS = 4;
// W rows per simdgroup: more rows share each activation load; fewer keep
// the registers of wide codes and many x rows in check.
constexpr int R = XR == 1 ? (bits <= 4 ? 8 : 4) : (XR <= 2 ? 4 : 2);
const int N = params[0];
const int K = params[1];
const int experts = params[2];
const int x_rows = params[3];
const int slots = params[4];
const uint lane = thread_index_in_simdgroup;
const uint sg = simdgroup_index_in_threadgroup;
const int slot0 = threadgroup_position_in_grid.y * XR;
const int count = metal::min(XR, slots - slot0);
const int n0 = (threadgroup_position_in_grid.x * SIMDGROUPS + sg) * R;
const int words_per_row = K / AFFINE_UNIT * bits;
const int groups_per_row = K / group_size;
const int units = K / AFFINE_UNIT;
const float nan_value = as_type<float>(0x7FC00000u);

for (int run = 0; run < count;) {
  // Indices are compared as 64-bit signed values, so a uint32 index past
  // INT_MAX is out of range rather than negative.
  const long expert = static_cast<long>(slot_expert[slot0 + run]);
  int run_end = run + 1;
  while (run_end < count &&
         static_cast<long>(slot_expert[slot0 + run_end]) == expert) {
    ++run_end;
  }
  const bool expert_ok = expert >= 0 && expert < experts;

  const device T* xr[XR];
  bool row_ok[XR];
  #pragma unroll
  for (int m = 0; m < XR; ++m) {
    // Rows past the run repeat its last row (never stored).
    long xrow = static_cast<long>(slot_x[slot0 + metal::min(run + m, run_end - 1)]);
    row_ok[m] = expert_ok && xrow >= 0 && xrow < x_rows;
    xr[m] = x + static_cast<ulong>(row_ok[m] ? xrow : 0) * K;
  }
  const device uint* wr[R];
  const device T* sr[R];
  const device T* br[R];
  #pragma unroll
  for (int r = 0; r < R; ++r) {
    // Columns past N read row N - 1 (never stored).
    ulong row = static_cast<ulong>(expert_ok ? expert : 0) * N +
        metal::min(n0 + r, N - 1);
    wr[r] = w + row * words_per_row;
    sr[r] = scales + row * groups_per_row;
    br[r] = biases + row * groups_per_row;
  }

  float acc[XR][R];
  #pragma unroll
  for (int m = 0; m < XR; ++m) {
    #pragma unroll
    for (int r = 0; r < R; ++r) {
      acc[m][r] = 0.0f;
    }
  }
  uint cur[R][bits];
  int u = lane;
  if (u < units) {
    #pragma unroll
    for (int r = 0; r < R; ++r) {
      AffineUnit<bits>::load(wr[r] + u * bits, cur[r]);
    }
  }
  for (; u < units; u += MQO_SIMD_SIZE) {
    uint nxt[R][bits];
    const int u_next = u + MQO_SIMD_SIZE;
    if (u_next < units) {
      #pragma unroll
      for (int r = 0; r < R; ++r) {
        AffineUnit<bits>::load(wr[r] + u_next * bits, nxt[r]);
      }
    }
    const int g = u * AFFINE_UNIT / group_size;
    float qx[XR][R];
    float sx[XR];
    #pragma unroll
    for (int m = 0; m < XR; ++m) {
      sx[m] = 0.0f;
      #pragma unroll
      for (int r = 0; r < R; ++r) {
        qx[m][r] = 0.0f;
      }
    }
    #pragma unroll
    for (int j = 0; j < AFFINE_UNIT / 8; ++j) {
      float xv[XR][8];
      #pragma unroll
      for (int m = 0; m < XR; ++m) {
        AffineLoad8<T>::load(xr[m] + u * AFFINE_UNIT + 8 * j, xv[m]);
        #pragma unroll
        for (int i = 0; i < 8; ++i) {
          sx[m] += xv[m][i];
        }
      }
      #pragma unroll
      for (int r = 0; r < R; ++r) {
        #pragma unroll
        for (int i = 0; i < 8; ++i) {
          float q = affine_code_float(affine_code<bits>(cur[r], 8 * j + i));
          #pragma unroll
          for (int m = 0; m < XR; ++m) {
            qx[m][r] = metal::fma(q, xv[m][i], qx[m][r]);
          }
        }
      }
    }
    #pragma unroll
    for (int r = 0; r < R; ++r) {
      float s = static_cast<float>(sr[r][g]);
      float b = static_cast<float>(br[r][g]);
      #pragma unroll
      for (int m = 0; m < XR; ++m) {
        acc[m][r] += s * qx[m][r] + b * sx[m];
      }
    }
    #pragma unroll
    for (int r = 0; r < R; ++r) {
      #pragma unroll
      for (int i = 0; i < bits; ++i) {
        cur[r][i] = nxt[r][i];
      }
    }
  }
  #pragma unroll
  for (int m = 0; m < XR; ++m) {
    #pragma unroll
    for (int r = 0; r < R; ++r) {
      acc[m][r] = simd_sum(acc[m][r]);
    }
  }
  if (lane == 0) {
    #pragma unroll
    for (int m = 0; m < XR; ++m) {
      #pragma unroll
      for (int r = 0; r < R; ++r) {
        if (m < run_end - run && n0 + r < N) {
          ulong o = static_cast<ulong>(slot0 + run + m) * N + n0 + r;
          out[o] = static_cast<T>(row_ok[m] ? acc[m][r] : nan_value);
        }
      }
    }
  }
  run = run_end;
}
