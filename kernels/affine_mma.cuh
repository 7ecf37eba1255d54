// CUDA-only helpers for the tensor-core affine kernels (affine_qmm_mma.cu):
// warp-level mma.sync m16n8k16 with float accumulators, through inline PTX
// (NVRTC needs no extra header for it), and packing two floats into the
// 16-bit pair an mma operand register holds. Only the cuda path includes
// this file (see affine.py); the Metal bodies never see it.
#pragma once

template <typename T>
struct AffineMma;

template <>
struct AffineMma<__half> {
  static __device__ __forceinline__ unsigned int pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<unsigned int*>(&h);
  }
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
  static __device__ __forceinline__ unsigned int pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned int*>(&h);
  }
  static __device__ __forceinline__ void
  mma(float* d, const unsigned int* a, const unsigned int* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};
