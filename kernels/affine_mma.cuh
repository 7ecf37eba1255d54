// CUDA-only helpers for the tensor-core affine kernels (affine_qmm_mma.cu,
// affine_qmv_mma.cu): warp-level mma.sync m16n8k16 with float accumulators
// through inline PTX (NVRTC needs no extra header for it), packing two
// floats into the 16-bit pair an mma operand register holds, and turning
// two codes into two weights with packed half-precision arithmetic. Only the
// cuda path includes this file (see affine.py); the Metal bodies never see it.
#pragma once

// Two codes as the two 16-bit halves of a word, each below 2^m (m = 10 for
// half, 7 for bfloat16), become two weights code * scale + bias: or-ing in
// the bits of 2^m gives 2^m + code exactly (the code lands in the
// mantissa), one packed subtraction removes 2^m exactly, and one packed fma
// rounds code * scale + bias once. A code that sits e bits up in its half
// (mask without shift) gives 2^m + code * 2^e instead, and one packed fma by
// 2^-e and -2^(m - e) recovers the code, exactly again. So a word of narrow
// codes needs one shift per window of codes that fit under 2^m together:
// for 4-bit half, one shift per four pairs, and about three instructions a
// pair (lop3, sub or fma, fma).
template <typename T>
struct AffineMma;

template <>
struct AffineMma<__half> {
  typedef __half2 T2;
  static constexpr int magic_bits = 10;
  static constexpr unsigned int one = 0x3C00u;  // 1.0
  static __device__ __forceinline__ unsigned int pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<unsigned int*>(&h);
  }
  static __device__ __forceinline__ T2 splat(__half v) {
    return __half2half2(v);
  }
  static constexpr unsigned int magic = 0x64006400u;  // 1024.0 in each half
  // d (16x8, f32) += a (16x16, row-major f16) * b (16x8, column-major f16)
  static __device__ __forceinline__ void
  mma(float* d, const unsigned int* a, const unsigned int* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

template <>
struct AffineMma<__nv_bfloat16> {
  typedef __nv_bfloat162 T2;
  static constexpr int magic_bits = 7;
  static constexpr unsigned int one = 0x3F80u;  // 1.0
  static __device__ __forceinline__ unsigned int pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned int*>(&h);
  }
  static __device__ __forceinline__ T2 splat(__nv_bfloat16 v) {
    return __bfloat162bfloat162(v);
  }
  static constexpr unsigned int magic = 0x43004300u;  // 128.0 in each bf16
  static __device__ __forceinline__ void
  mma(float* d, const unsigned int* a, const unsigned int* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

// (a & b) | c in one instruction (the compiler emits two for the C form).
__device__ __forceinline__ unsigned int
affine_and_or(unsigned int a, unsigned int b, unsigned int c) {
  unsigned int d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// The bits of 2^e in T, in both halves of a word (-m <= e <= m).
template <typename T>
__device__ __forceinline__ constexpr unsigned int affine_pow2_pair(int e) {
  const int h = static_cast<int>(AffineMma<T>::one) +
      e * (1 << AffineMma<T>::magic_bits);
  return static_cast<unsigned int>(h) * 0x00010001u;
}

// The two codes in bits [e, e + width) of each half of `word` (e + width
// <= m) to two weights: see the top of this file.
template <typename T, int width>
__device__ __forceinline__ unsigned int affine_dequant_pair(
    unsigned int word,
    int e,
    typename AffineMma<T>::T2 scale,
    typename AffineMma<T>::T2 bias) {
  typedef typename AffineMma<T>::T2 T2;
  const unsigned int magic = AffineMma<T>::magic;
  const unsigned int mask = (((1u << width) - 1u) * 0x00010001u) << e;
  unsigned int biased = affine_and_or(word, mask, magic);
  T2 codes;
  if (e == 0) {
    codes = __hsub2(
        *reinterpret_cast<T2*>(&biased), *reinterpret_cast<const T2*>(&magic));
  } else {
    const unsigned int down = affine_pow2_pair<T>(-e);
    const unsigned int offset =
        affine_pow2_pair<T>(AffineMma<T>::magic_bits - e) | 0x80008000u;
    codes = __hfma2(
        *reinterpret_cast<T2*>(&biased),
        *reinterpret_cast<const T2*>(&down),
        *reinterpret_cast<const T2*>(&offset));
  }
  T2 w = __hfma2(codes, scale, bias);
  return *reinterpret_cast<unsigned int*>(&w);
}

// How a 32-value unit (bits words) splits into 16 pairs of codes for the
// packed arithmetic above. Where codes do not straddle words (1, 2, 4, 8
// bits) a word of V = 32 / bits codes gives its pairs (i, i + V / 2) with
// one shift and one mask: pair p is codes lo(p) and lo(p) + V / 2. The
// widths whose codes straddle words (3, 5, 6 bits) pair codes p and p + 16,
// which sit exactly 2 * bits bytes apart, so the bytes under the two codes,
// gathered side by side, put both at the same offset of the two 16-bit
// halves (see affine_weight_pair). The products only need the activations
// paired the same way (see AffinePairs::x_pair).
template <int bits>
struct AffinePairs {
  static constexpr bool whole_words = (32 % bits) == 0;
  static constexpr int per_word = 32 / bits;
  static constexpr int half_word = per_word / 2;

  static __device__ __forceinline__ constexpr int lo(int p) {
    return whole_words ? per_word * (p / half_word) + p % half_word : p;
  }
  static __device__ __forceinline__ constexpr int hi(int p) {
    return whole_words ? lo(p) + half_word : p + 16;
  }
  // Codes lo(p) and hi(p) of the unit in words[0 .. bits - 1], as the low
  // and high halves of one word.
  static __device__ __forceinline__ unsigned int
  raw(const unsigned int* words, int p) {
    if constexpr (whole_words) {
      const unsigned int mask = ((1u << bits) - 1u) * 0x00010001u;
      return (words[p / half_word] >> (bits * (p % half_word))) & mask;
    } else {
      return affine_code<bits>(words, lo(p)) | (affine_code<bits>(words, hi(p)) << 16);
    }
  }
  // Where code c of the unit lands: pair_of(c) and which half (0 low).
  static __device__ __forceinline__ constexpr int pair_of(int c) {
    return whole_words ? (c / per_word) * half_word + (c % per_word) % half_word
                       : c % 16;
  }
  static __device__ __forceinline__ constexpr int half_of(int c) {
    return whole_words ? (c % per_word) / half_word : c / 16;
  }
  // The neighbour (weights 2n' and 2n' + 1) built from the same two pairs
  // as neighbour n, their other halves, is n' = n + partner.
  static constexpr int partner = whole_words ? half_word / 2 : 8;
  // Activations lo(p) and hi(p) of a unit held as 16 words of two 16-bit
  // values each (x[2j] low, x[2j + 1] high), in one byte permute.
  static __device__ __forceinline__ unsigned int
  x_pair(const unsigned int* xw, int p) {
    const int a = lo(p);
    const int b = hi(p);
    const unsigned int select =
        ((a & 1) ? 0x0032u : 0x0010u) | ((b & 1) ? 0x7600u : 0x5400u);
    return __byte_perm(xw[a / 2], xw[b / 2], select);
  }
};

// Codes per window: the most, a power of two and at most `limit`, whose
// bits fit under 2^m together, so one shift serves all of them.
__device__ constexpr int
affine_codes_per_window(int bits, int magic_bits, int limit) {
  int window = 1;
  while (window * 2 <= limit && bits * window * 2 <= magic_bits) {
    window *= 2;
  }
  return window;
}

// Bytes b0, b1, b2, b3 of a little-endian byte stream held in words, as
// bytes 0-3 of one word: one byte permute where they sit in at most two
// words, else three. With the indices known at compile time (unrolled
// loops) the choice and the selectors fold away.
__device__ __forceinline__ unsigned int
affine_gather_bytes(const unsigned int* words, int b0, int b1, int b2, int b3) {
  const int w0 = b0 / 4, w1 = b1 / 4, w2 = b2 / 4, w3 = b3 / 4;
  const int other = w1 != w0 ? w1 : (w2 != w0 ? w2 : w3);
  if ((w2 == w0 || w2 == other) && (w3 == w0 || w3 == other)) {
    auto pick = [&](int b) { return (b / 4 == w0 ? 0 : 4) + b % 4; };
    const unsigned int select = pick(b0) | (pick(b1) << 4) | (pick(b2) << 8) | (pick(b3) << 12);
    return __byte_perm(words[w0], words[other], select);
  }
  // Bytes a and b (in words wa and wb) as bytes 0 and 1 of a word.
  auto two = [&](int wa, int a, int wb, int b) {
    return __byte_perm(words[wa], words[wb], (a % 4) | ((b % 4 + (wb != wa ? 4 : 0)) << 4));
  };
  return __byte_perm(two(w0, b0, w1, b1), two(w2, b2, w3, b3), 0x5410);
}

// Codes c and the one `distance` bytes after it of a little-endian stream
// of `bits`-bit codes held in words (a width whose codes straddle words),
// as two weights in T. The two bytes under each code (a code spans at most
// two), gathered side by side, put both codes at the same offset of their
// 16-bit halves, and the packed dequantization of whole-word widths
// applies.
template <typename T, int bits>
__device__ __forceinline__ unsigned int affine_byte_pair(
    const unsigned int* words,
    int c,
    int distance,
    typename AffineMma<T>::T2 scale2,
    typename AffineMma<T>::T2 bias2) {
  const int byte = bits * c / 8;
  const int offset = bits * c % 8;
  const int next = offset + bits > 8 ? 1 : 0;  // the code's second byte, if any
  const unsigned int word = affine_gather_bytes(
      words, byte, byte + next, byte + distance, byte + distance + next);
  // The packed path needs the code under 2^m in each half.
  const int shift = offset + bits > AffineMma<T>::magic_bits ? offset : 0;
  return affine_dequant_pair<T, bits>(word >> shift, offset - shift, scale2, bias2);
}

// Pair p of a unit as two weights in T: the packed path where the codes fit
// the magic number, else through float (bfloat16 8-bit codes reach 255,
// past bfloat16's 2^7 + code trick). Whole-word widths take their pair
// straight from the word where its codes sit below 2^m in each half, so
// the shift is shared by the pairs of one m-bit window.
template <typename T, int bits>
__device__ __forceinline__ unsigned int affine_weight_pair(
    const unsigned int* words,
    int p,
    typename AffineMma<T>::T2 scale2,
    typename AffineMma<T>::T2 bias2,
    float scale,
    float bias) {
  typedef AffinePairs<bits> Pairs;
  if constexpr (Pairs::whole_words && bits <= AffineMma<T>::magic_bits) {
    constexpr int window =
        affine_codes_per_window(bits, AffineMma<T>::magic_bits, Pairs::half_word);
    const int j = p % Pairs::half_word;
    const int e = bits * (j % window);
    const unsigned int word = words[p / Pairs::half_word] >> (bits * (j - j % window));
    return affine_dequant_pair<T, bits>(word, e, scale2, bias2);
  } else if constexpr (!Pairs::whole_words && bits != 3) {
    // 5 and 6 bits: code p + 16 sits 2 * bits bytes after code p.
    return affine_byte_pair<T, bits>(words, p, 2 * bits, scale2, bias2);
  } else if constexpr (bits == 3) {
    // 3 bits, pair p = codes p and p + 16. Codes 0-4 sit in bits 0-14 of
    // word 0 and codes 16-20 in bits 16-30 of word 1; codes 6-9 in bits
    // 18-29 of word 0 and 22-25 in bits 2-13 of word 2; codes 11-15 in bits
    // 1-15 of word 1 and 27-31 in bits 17-31 of word 2. So one byte permute
    // puts each run's two halves side by side with both codes of a pair at
    // the same offset, and its pairs share the permute and one shift per
    // window under 2^m, as whole-word widths do. Pairs 5 and 10 (codes 5,
    // 10, 21 and 26 straddle a word or a half) are extracted one by one.
    if (p == 5 || p == 10) {
      return affine_dequant_pair<T, 16>(Pairs::raw(words, p), 0, scale2, bias2);
    }
    const int first = p < 5 ? 0 : (p < 10 ? 6 : 11);  // the run's first pair
    const int phase = p < 5 ? 0 : (p < 10 ? 2 : 1);  // its first code's offset
    const unsigned int run = p < 5 ? __byte_perm(words[0], words[1], 0x7610)
        : p < 10                   ? __byte_perm(words[0], words[2], 0x5432)
                                   : __byte_perm(words[1], words[2], 0x7610);
    const int fit = (AffineMma<T>::magic_bits - bits - phase) / bits + 1;
    const int shift = bits * ((p - first) / fit * fit);
    const int offset = phase + bits * (p - first);
    return affine_dequant_pair<T, bits>(run >> shift, offset - shift, scale2, bias2);
  } else {
    const unsigned int raw = Pairs::raw(words, p);
    float lo = fmaf(affine_code_float(raw & 0xFFFFu), scale, bias);
    float hi = fmaf(affine_code_float(raw >> 16), scale, bias);
    return AffineMma<T>::pack(lo, hi);
  }
}

// Pair q (0-7) of a 16-code stream of a width whose codes straddle words
// (3, 5 or 6 bits; stream[] holds its 2 * bits bytes from byte 0): codes q
// and q + 8, as two weights in T (code q + 8 sits `bits` bytes after code
// q). Used where a lane owns half a unit (the wgmma prefill).
template <typename T, int bits>
__device__ __forceinline__ unsigned int affine_stream_pair(
    const unsigned int* stream,
    int q,
    typename AffineMma<T>::T2 scale2,
    typename AffineMma<T>::T2 bias2) {
  return affine_byte_pair<T, bits>(stream, q, bits, scale2, bias2);
}

// Weights 2n and 2n + 1 of a unit (natural order, as a tile in shared
// memory wants them) from the pairs above: one byte permute of the two
// pairs that hold them. The same two pairs, other halves, hold neighbour
// n + partner, so with `partner_out` set both come from one build of the
// pairs (nvcc does not merge two builds: their and-or is inline asm).
template <typename T, int bits>
__device__ __forceinline__ unsigned int affine_weight_neighbours(
    const unsigned int* words,
    int n,
    typename AffineMma<T>::T2 scale2,
    typename AffineMma<T>::T2 bias2,
    float scale,
    float bias,
    unsigned int* partner_out = nullptr) {
  typedef AffinePairs<bits> Pairs;
  const int c0 = 2 * n;
  const int c1 = 2 * n + 1;
  const unsigned int a = affine_weight_pair<T, bits>(
      words, Pairs::pair_of(c0), scale2, bias2, scale, bias);
  const unsigned int b = affine_weight_pair<T, bits>(
      words, Pairs::pair_of(c1), scale2, bias2, scale, bias);
  const bool high0 = Pairs::half_of(c0);
  const bool high1 = Pairs::half_of(c1);
  if (partner_out != nullptr) {
    *partner_out = __byte_perm(
        a, b, (high0 ? 0x0010u : 0x0032u) | (high1 ? 0x5400u : 0x7600u));
  }
  return __byte_perm(a, b, (high0 ? 0x0032u : 0x0010u) | (high1 ? 0x7600u : 0x5400u));
}

// The words of RUN consecutive units at p (RUN * bits of them) into words:
// as 16-byte vectors where they make whole vectors and `aligned` says p is
// on 16 bytes, else unit by unit as AffineUnit loads one (a single unit
// keeps that load at every width: callers check nothing for it).
template <int bits, int RUN>
__device__ __forceinline__ void
affine_load_run(const uint32_t* p, uint32_t* words, bool aligned) {
  constexpr int count = RUN * bits;
  if constexpr (RUN > 1 && count % 4 == 0) {
    if (aligned) {
#pragma unroll
      for (int i = 0; i < count; i += 4) {
        AffineUnit<4>::load(p + i, words + i);  // one 16-byte vector
      }
    } else {
#pragma unroll
      for (int i = 0; i < count; ++i) {
        words[i] = p[i];
      }
    }
  } else {
#pragma unroll
    for (int c = 0; c < RUN; ++c) {
      AffineUnit<bits>::load(p + c * bits, words + c * bits);
    }
  }
}

// The activations of unit `unit` that lane (g, t) feeds to the mma as B:
// 16 words (the unit's 32 values) from the x row of column g of each n8
// tile j, read for tile 0 and for later tiles while `columns` (x rows in
// use) reaches them, a condition uniform across the warp.
template <typename T, int XT>
__device__ __forceinline__ void affine_load_x_unit(
    uint32_t (&xw)[XT][16], const T* const* xp, int unit, int columns) {
#pragma unroll
  for (int j = 0; j < XT; ++j) {
    if (j == 0 || 8 * j < columns) {
      const uint4* xv = reinterpret_cast<const uint4*>(xp[j] + unit * AFFINE_UNIT);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const uint4 v = xv[q];
        xw[j][4 * q] = v.x;
        xw[j][4 * q + 1] = v.y;
        xw[j][4 * q + 2] = v.z;
        xw[j][4 * q + 3] = v.w;
      }
    }
  }
}

// One 32-value unit through the tensor cores for lane (g, t) of a 16-row
// tile: the codes of rows g (`lo`, `bits` words) and g + 8 (`hi`) become
// weights with their groups' scales and biases (zeros for a lane past its
// range, so it adds nothing), and eight m16n8k16 steps add them times the
// activations xw (affine_load_x_unit) into acc, one n8 tile j at a time.
// Step s takes pairs 2s and 2s + 1 as the k-columns {2t, 2t + 1} and
// {2t + 8, 2t + 9} of A, and the activations of the same pairs as B. With
// paired_x, xw already holds pair p's activations in word p (see
// affine_stream.cuh), which saves a byte permute per B register.
template <typename T, int bits, int XT, bool paired_x = false>
__device__ __forceinline__ void affine_unit_mma(
    float (&acc)[XT][4],
    const uint32_t* lo,
    const uint32_t* hi,
    T sl,
    T bl,
    T sh,
    T bh,
    const uint32_t (&xw)[XT][16],
    int columns) {
  typedef AffineMma<T> Mma;
  typedef typename Mma::T2 T2;
  typedef AffinePairs<bits> Pairs;
  const T2 sl2 = Mma::splat(sl), bl2 = Mma::splat(bl);
  const T2 sh2 = Mma::splat(sh), bh2 = Mma::splat(bh);
  const float slf = static_cast<float>(sl), blf = static_cast<float>(bl);
  const float shf = static_cast<float>(sh), bhf = static_cast<float>(bh);
#pragma unroll
  for (int s = 0; s < AFFINE_UNIT / 4; ++s) {
    uint32_t a[4];
    a[0] = affine_weight_pair<T, bits>(lo, 2 * s, sl2, bl2, slf, blf);
    a[1] = affine_weight_pair<T, bits>(hi, 2 * s, sh2, bh2, shf, bhf);
    a[2] = affine_weight_pair<T, bits>(lo, 2 * s + 1, sl2, bl2, slf, blf);
    a[3] = affine_weight_pair<T, bits>(hi, 2 * s + 1, sh2, bh2, shf, bhf);
#pragma unroll
    for (int j = 0; j < XT; ++j) {
      if (j == 0 || 8 * j < columns) {  // uniform across the warp
        uint32_t b[2];
        b[0] = paired_x ? xw[j][2 * s] : Pairs::x_pair(xw[j], 2 * s);
        b[1] = paired_x ? xw[j][2 * s + 1] : Pairs::x_pair(xw[j], 2 * s + 1);
        Mma::mma(acc[j], a, b);
      }
    }
  }
}

// Lane (g, t)'s C fragments into its warp's table of partial sums (16 rows,
// PITCH >= 8 * XT columns): acc[j][0..1] are row g, columns 8j + 2t and
// + 1; acc[j][2..3] the same columns of row g + 8.
template <int XT, int PITCH>
__device__ __forceinline__ void affine_store_fragments(
    float (*table)[PITCH], const float (&acc)[XT][4], int g, int t) {
#pragma unroll
  for (int j = 0; j < XT; ++j) {
    const int col = 8 * j + 2 * t;
    table[g][col] = acc[j][0];
    table[g][col + 1] = acc[j][1];
    table[g + 8][col] = acc[j][2];
    table[g + 8][col + 1] = acc[j][3];
  }
}

// Element (row, col) summed over the KW warps' tables.
template <int KW, int PITCH>
__device__ __forceinline__ float
affine_sum_warps(const float (*partial)[16][PITCH], int row, int col) {
  float sum = 0.0f;
#pragma unroll
  for (int kw = 0; kw < KW; ++kw) {
    sum += partial[kw][row][col];
  }
  return sum;
}

// The two weight rows lane (g, t) of a 16-row mma tile owns, g and g + 8
// ("lo" and "hi"): where their codes, scales and biases start, given the
// rows' indices into w (words_per_row words a row) and into scales and
// biases (groups_per_row a row).
template <typename T>
struct AffineRowPair {
  const uint32_t* w_lo;
  const uint32_t* w_hi;
  const T* s_lo;
  const T* s_hi;
  const T* b_lo;
  const T* b_hi;

  __device__ __forceinline__ AffineRowPair(
      const uint32_t* w,
      const T* scales,
      const T* biases,
      size_t row_lo,
      size_t row_hi,
      int words_per_row,
      int groups_per_row)
      : w_lo(w + row_lo * words_per_row),
        w_hi(w + row_hi * words_per_row),
        s_lo(scales + row_lo * groups_per_row),
        s_hi(scales + row_hi * groups_per_row),
        b_lo(biases + row_lo * groups_per_row),
        b_hi(biases + row_hi * groups_per_row) {}

  // Group `group`'s scale and bias of both rows.
  __device__ __forceinline__ void
  group(int group, T& scale_lo, T& bias_lo, T& scale_hi, T& bias_hi) const {
    scale_lo = s_lo[group];
    bias_lo = b_lo[group];
    scale_hi = s_hi[group];
    bias_hi = b_hi[group];
  }
};

// ldmatrix.x4: four 8x8 tiles of 16-bit values from shared memory, lane l
// giving the address of row l % 8 of tile l / 8.
__device__ __forceinline__ void
affine_ldmatrix_x4(unsigned int* out, const void* shared_row) {
  const unsigned int address =
      static_cast<unsigned int>(__cvta_generic_to_shared(shared_row));
  asm volatile(
      "ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
      : "=r"(out[0]), "=r"(out[1]), "=r"(out[2]), "=r"(out[3])
      : "r"(address));
}

// cp.async: 16 bytes from global to shared memory without passing through
// registers; `valid` false writes zeros and reads nothing (the source must
// still be a mapped address, so callers pass a clamped one).
__device__ __forceinline__ void
affine_cp_async16(void* shared_dst, const void* global_src, bool valid) {
  const unsigned int address =
      static_cast<unsigned int>(__cvta_generic_to_shared(shared_dst));
  const int src_bytes = valid ? 16 : 0;
  asm volatile(
      "cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(address),
      "l"(global_src),
      "r"(src_bytes));
}

__device__ __forceinline__ void affine_cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::);
}

// Waits for every cp.async group this thread committed.
__device__ __forceinline__ void affine_cp_async_wait_all() {
  asm volatile("cp.async.wait_group 0;\n" ::);
}
