// CUDA-only helpers for the Hopper (sm_90a) affine prefill kernel,
// affine_qmm_wgmma.cu: warpgroup mma (wgmma.mma_async) with A from registers
// and B from shared memory through a matrix descriptor, and the fences the
// asynchronous proxy needs. After affine_mma.cuh.
#pragma once

// Descriptor of a K-major tile in shared memory with the 128-byte swizzle:
// rows of 64 16-bit values (128 bytes), 16-byte chunk c of row r stored at
// chunk c ^ (r % 8), eight-row groups 1024 bytes apart (the stride byte
// offset; the leading offset is unused in this mode). `start` may sit
// 32 s bytes into the rows (k16 step s); the tile base must be 1024-aligned.
__device__ __forceinline__ unsigned long long
affine_wgmma_desc(const void* start) {
  const unsigned int address =
      static_cast<unsigned int>(__cvta_generic_to_shared(start));
  unsigned long long desc = (address & 0x3FFFFu) >> 4;
  desc |= 1ull << 16;  // leading byte offset (ignored when swizzled)
  desc |= static_cast<unsigned long long>(1024 >> 4) << 32;  // stride byte offset
  desc |= 1ull << 62;  // 128-byte swizzle
  return desc;
}

// Generic-proxy writes to shared memory (st.shared, cp.async) made visible
// to the asynchronous proxy that wgmma reads through; then a barrier.
__device__ __forceinline__ void affine_fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
__device__ __forceinline__ void affine_wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void affine_wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int pending>
__device__ __forceinline__ void affine_wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(pending) : "memory");
}
// Pins a register the asynchronous mma owns, so the compiler neither moves
// nor copies it across the wgmma calls.
__device__ __forceinline__ void affine_wgmma_pin(float& r) {
  asm volatile("" : "+f"(r)::"memory");
}

// D (64 x N, f32) += A (64 x 16) * B (16 x N), both K-major tiles in
// shared memory read through descriptors (affine_wgmma_desc).
// One specialization per (type, N) below: the instruction names both, and
// asm text cannot come from template parameters.
template <typename T, int N>
struct AffineWgmma;

// The accumulator operands: a thread holds N / 2 of D's floats, d[0] on,
// eight per macro; and their placeholders in the instruction text.
#define AFFINE_WGMMA_D8(o)                                                  \
  "+f"(d[o]), "+f"(d[o + 1]), "+f"(d[o + 2]), "+f"(d[o + 3]), "+f"(d[o + 4]), \
      "+f"(d[o + 5]), "+f"(d[o + 6]), "+f"(d[o + 7])
#define AFFINE_WGMMA_D32 \
  AFFINE_WGMMA_D8(0), AFFINE_WGMMA_D8(8), AFFINE_WGMMA_D8(16), AFFINE_WGMMA_D8(24)
#define AFFINE_WGMMA_D64 \
  AFFINE_WGMMA_D32, AFFINE_WGMMA_D8(32), AFFINE_WGMMA_D8(40), AFFINE_WGMMA_D8(48), \
      AFFINE_WGMMA_D8(56)
#define AFFINE_WGMMA_D128                                                     \
  AFFINE_WGMMA_D64, AFFINE_WGMMA_D8(64), AFFINE_WGMMA_D8(72), AFFINE_WGMMA_D8(80), \
      AFFINE_WGMMA_D8(88), AFFINE_WGMMA_D8(96), AFFINE_WGMMA_D8(104),              \
      AFFINE_WGMMA_D8(112), AFFINE_WGMMA_D8(120)
#define AFFINE_WGMMA_R32 \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define AFFINE_WGMMA_R64 \
  AFFINE_WGMMA_R32 ", %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, " \
                   "%44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, " \
                   "%57, %58, %59, %60, %61, %62, %63"
#define AFFINE_WGMMA_R128 AFFINE_WGMMA_R64 ", " "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79" ", " "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95" ", " "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111" ", " "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"

// A's and B's descriptors follow the accumulators (AB_REGS names their
// placeholders); the trailing 1, 1, 1, 0, 0 are D scaled by one, A and B
// unnegated, neither transposed (both K-major).
#define AFFINE_WGMMA(CTYPE, PTX_TYPE, N, D_REGS, D_OPERANDS, AB_REGS)                \
  template <>                                                                      \
  struct AffineWgmma<CTYPE, N> {                                                   \
    static __device__ __forceinline__ void                                         \
    mma(float* d, unsigned long long a_desc, unsigned long long b_desc) {          \
      asm volatile("wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." PTX_TYPE      \
                   "." PTX_TYPE " {" D_REGS "}, " AB_REGS ", 1, 1, 1, 0, 0;\n"     \
                   : D_OPERANDS                                                    \
                   : "l"(a_desc), "l"(b_desc));                                    \
    }                                                                              \
  };

AFFINE_WGMMA(__half, "f16", 64, AFFINE_WGMMA_R32, AFFINE_WGMMA_D32, "%32, %33")
AFFINE_WGMMA(__half, "f16", 128, AFFINE_WGMMA_R64, AFFINE_WGMMA_D64, "%64, %65")
AFFINE_WGMMA(__nv_bfloat16, "bf16", 64, AFFINE_WGMMA_R32, AFFINE_WGMMA_D32,
             "%32, %33")
AFFINE_WGMMA(__nv_bfloat16, "bf16", 128, AFFINE_WGMMA_R64, AFFINE_WGMMA_D64,
             "%64, %65")
AFFINE_WGMMA(__half, "f16", 256, AFFINE_WGMMA_R128, AFFINE_WGMMA_D128, "%128, %129")
AFFINE_WGMMA(__nv_bfloat16, "bf16", 256, AFFINE_WGMMA_R128, AFFINE_WGMMA_D128,
             "%128, %129")

#undef AFFINE_WGMMA
#undef AFFINE_WGMMA_R128
#undef AFFINE_WGMMA_R64
#undef AFFINE_WGMMA_R32
#undef AFFINE_WGMMA_D128
#undef AFFINE_WGMMA_D64
#undef AFFINE_WGMMA_D32
#undef AFFINE_WGMMA_D8
