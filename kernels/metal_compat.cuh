// The rest of Metal's vocabulary in CUDA, after metal_compat_core.cuh (see
// there): thread positions, barriers, SIMD-group functions and metal:: math,
// for the portable bodies.
#pragma once

// ---- thread-position attributes -------------------------------------------
__device__ __forceinline__ uint mqo_flat_thread_index() {
  return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}
#define thread_position_in_grid                         \
  make_uint3(                                           \
      blockIdx.x * blockDim.x + threadIdx.x,            \
      blockIdx.y * blockDim.y + threadIdx.y,            \
      blockIdx.z * blockDim.z + threadIdx.z)
#define threads_per_grid \
  make_uint3(gridDim.x * blockDim.x, gridDim.y * blockDim.y, gridDim.z * blockDim.z)
#define thread_position_in_threadgroup threadIdx
#define threadgroup_position_in_grid blockIdx
#define threads_per_threadgroup blockDim
#define threadgroups_per_grid gridDim
#define thread_index_in_threadgroup mqo_flat_thread_index()
#define thread_index_in_simdgroup (mqo_flat_thread_index() & 31u)
#define simdgroup_index_in_threadgroup (mqo_flat_thread_index() >> 5)
#define threads_per_simdgroup 32u
#define simdgroups_per_threadgroup \
  ((blockDim.x * blockDim.y * blockDim.z + 31u) >> 5)

// ---- barriers ---------------------------------------------------------------
namespace mem_flags {
constexpr int mem_none = 0;
constexpr int mem_device = 1;
constexpr int mem_threadgroup = 2;
} // namespace mem_flags
__device__ __forceinline__ void threadgroup_barrier(int) {
  __syncthreads();
}
__device__ __forceinline__ void simdgroup_barrier(int) {
  __syncwarp();
}

// ---- SIMD-group functions (one simdgroup = one warp of 32 lanes) -----------
template <typename T>
__device__ __forceinline__ T simd_shuffle(T value, uint lane) {
  return __shfl_sync(0xffffffffu, value, lane);
}
template <typename T>
__device__ __forceinline__ T simd_shuffle_xor(T value, uint mask) {
  return __shfl_xor_sync(0xffffffffu, value, mask);
}
template <typename T>
__device__ __forceinline__ T simd_shuffle_down(T value, uint delta) {
  return __shfl_down_sync(0xffffffffu, value, delta);
}
template <typename T>
__device__ __forceinline__ T simd_shuffle_up(T value, uint delta) {
  return __shfl_up_sync(0xffffffffu, value, delta);
}
template <typename T>
__device__ __forceinline__ T simd_broadcast(T value, uint lane) {
  return __shfl_sync(0xffffffffu, value, lane);
}
template <typename T>
__device__ __forceinline__ T simd_sum(T value) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  }
  return value;
}
template <typename T>
__device__ __forceinline__ T simd_max(T value) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    T other = __shfl_xor_sync(0xffffffffu, value, offset);
    value = other > value ? other : value;
  }
  return value;
}
template <typename T>
__device__ __forceinline__ T simd_min(T value) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    T other = __shfl_xor_sync(0xffffffffu, value, offset);
    value = other < value ? other : value;
  }
  return value;
}

// ---- metal:: math ------------------------------------------------------------
namespace metal {
__device__ __forceinline__ float abs(float x) { return fabsf(x); }
__device__ __forceinline__ int abs(int x) { return x < 0 ? -x : x; }
__device__ __forceinline__ float fabs(float x) { return fabsf(x); }
__device__ __forceinline__ float max(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ float min(float a, float b) { return fminf(a, b); }
__device__ __forceinline__ int max(int a, int b) { return a > b ? a : b; }
__device__ __forceinline__ int min(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ uint max(uint a, uint b) { return a > b ? a : b; }
__device__ __forceinline__ uint min(uint a, uint b) { return a < b ? a : b; }
__device__ __forceinline__ float clamp(float x, float lo, float hi) {
  return fminf(fmaxf(x, lo), hi);
}
__device__ __forceinline__ int clamp(int x, int lo, int hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}
// round(): halfway cases away from zero, as C's roundf and Metal's round.
__device__ __forceinline__ float round(float x) { return roundf(x); }
// rint(): halfway cases to even.
__device__ __forceinline__ float rint(float x) { return rintf(x); }
__device__ __forceinline__ float floor(float x) { return floorf(x); }
__device__ __forceinline__ float ceil(float x) { return ceilf(x); }
__device__ __forceinline__ float trunc(float x) { return truncf(x); }
__device__ __forceinline__ float fma(float a, float b, float c) {
  return fmaf(a, b, c);
}
__device__ __forceinline__ float exp(float x) { return expf(x); }
__device__ __forceinline__ float log(float x) { return logf(x); }
__device__ __forceinline__ float sqrt(float x) { return sqrtf(x); }
__device__ __forceinline__ float rsqrt(float x) { return rsqrtf(x); }
__device__ __forceinline__ bool isnan(float x) { return ::isnan(x); }
namespace precise {
__device__ __forceinline__ float divide(float a, float b) {
  return __fdiv_rn(a, b);
}
} // namespace precise
} // namespace metal

// ---- exact float arithmetic (no contraction into fma) ----------------------
// ggml's reference quantizers round every product and sum separately; these
// keep the CUDA compiler from fusing them (the Metal prelude does the same
// with `#pragma METAL fp contract(off)`).
__device__ __forceinline__ float mqo_mul(float a, float b) {
  return __fmul_rn(a, b);
}
__device__ __forceinline__ float mqo_add(float a, float b) {
  return __fadd_rn(a, b);
}
__device__ __forceinline__ float mqo_div(float a, float b) {
  return __fdiv_rn(a, b);
}
