// Metal's vocabulary in CUDA, so the Metal bodies in kernels/*.metal compile
// unchanged through mx.fast.cuda_kernel. Two parts: this core (types,
// address-space words, as_type), which is all the family headers need and
// all a CUDA-only body gets, and metal_compat.cuh (thread positions,
// barriers, SIMD-group functions, metal:: math), which portable bodies get
// after it. MLX hashes a kernel's whole source on every launch, so a CUDA-
// only kernel carries no more of the dialect than it uses.
//
// MLX places this header after its own device headers and before the kernel,
// which it wraps in namespace mlx::core::cu; the kernel body then sees the
// names below exactly as a Metal body sees Metal's. Only what our bodies use
// is mapped, and each mapping keeps Metal's semantics:
//  - address-space words are empty (CUDA pointers are generic), except
//    `threadgroup`, which declares shared memory;
//  - thread-position attributes are values computed from blockIdx/threadIdx;
//  - SIMD-group functions are full-warp shuffles (a simdgroup is a warp of 32;
//    every lane must reach them, hence "no early return before collectives");
//  - metal:: math keeps IEEE results (no fast-math approximations), which the
//    bit-exact quantizers rely on.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#define MQO_CUDA 1

// ---- scalar types ----------------------------------------------------------
typedef __half half;
typedef __nv_bfloat16 bfloat16_t;
typedef unsigned char uchar;
typedef unsigned short ushort;
typedef unsigned int uint;
// glibc's <sys/types.h> (pulled in by nvcc, not by NVRTC) declares ushort,
// uint and ulong with these very types; any other choice would clash there.
// unsigned long is 64-bit on Linux (LP64), as Metal's ulong is.
typedef unsigned long ulong;

// ---- address spaces and function qualifiers -------------------------------
// CUDA spells its own qualifiers through the words we empty below
// (__device__ is __location__(device)), so once `device` is an empty macro
// __device__ would silently mean "host". NVRTC, which MLX uses, compiles
// every function for the device by default and never notices; nvcc (the CI
// compile check) does. Re-spelling the attributes with GNU's underscored
// names keeps them intact under both.
#if !defined(__CUDACC_RTC__)
#undef __device__
#define __device__ __attribute__((__device__))
#undef __constant__
#define __constant__ __attribute__((__constant__))
#endif
#define device
#define constant
#define thread
#define threadgroup __shared__
#define METAL_FUNC __device__ __forceinline__

// ---- reinterpretation ------------------------------------------------------
template <typename To, typename From>
__device__ __forceinline__ To as_type(From value) {
  static_assert(sizeof(To) == sizeof(From), "as_type needs equal sizes");
  To out;
  memcpy(&out, &value, sizeof(To));
  return out;
}
