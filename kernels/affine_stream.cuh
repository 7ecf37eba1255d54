// CUDA-only helpers for the streamed mat-vec (affine_qmv_stream.cu, sm_90):
// the Hopper copy engine's bulk copies from global to shared memory, the
// shared-memory barriers (mbarrier) that say when a copy has landed and
// when a buffer may be refilled, and a barrier over some warps of a block.
// After affine_mma.cuh.
#pragma once

__device__ __forceinline__ unsigned int affine_shared_address(const void* p) {
  return static_cast<unsigned int>(__cvta_generic_to_shared(p));
}

// A barrier in shared memory that completes a phase once `count` threads
// have arrived and every byte announced to it (expect_tx) has landed.
__device__ __forceinline__ void
affine_mbarrier_init(unsigned long long* bar, unsigned int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(
                   affine_shared_address(bar)),
               "r"(count)
               : "memory");
}

// Makes the initialized barriers visible to the copy engine (the async
// proxy) and to the other threads (after a __syncthreads).
__device__ __forceinline__ void affine_mbarrier_init_fence() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

// One arrival that also announces `bytes` still to land by bulk copies.
__device__ __forceinline__ void
affine_mbarrier_expect_bytes(unsigned long long* bar, unsigned int bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(
                   affine_shared_address(bar)),
               "r"(bytes)
               : "memory");
}

// One arrival, releasing this thread's earlier shared-memory accesses.
__device__ __forceinline__ void affine_mbarrier_arrive(unsigned long long* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(
                   affine_shared_address(bar))
               : "memory");
}

// Waits until the phase of parity `parity` (0, 1, 0, ... for a barrier's
// first, second, third use) has completed.
__device__ __forceinline__ void
affine_mbarrier_wait(unsigned long long* bar, unsigned int parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n"
      "}\n" ::"r"(affine_shared_address(bar)),
      "r"(parity)
      : "memory");
}

// `bytes` (a multiple of 16; both addresses 16-byte aligned) from global
// to shared memory by the copy engine; `bar` counts them when they land.
__device__ __forceinline__ void affine_bulk_copy(
    void* shared_dst,
    const void* global_src,
    unsigned int bytes,
    unsigned long long* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes "
      "[%0], [%1], %2, [%3];\n" ::"r"(affine_shared_address(shared_dst)),
      "l"(global_src),
      "r"(bytes),
      "r"(affine_shared_address(bar))
      : "memory");
}

// A barrier over the first `threads` threads of the block (whole warps),
// on hardware barrier `id` (0 is __syncthreads').
__device__ __forceinline__ void affine_warps_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Staged x rows in pair order: word p of a unit holds the activations of
// pair p (AffinePairs::x_pair), so the consumers load the mma's B
// registers as they are, without two byte permutes per step.

// Word `e` of x rows staged in shared memory (at `xs`) in pair order: pair
// e % 16 of unit e / 16.
template <typename T, int bits>
__device__ __forceinline__ uint32_t affine_stream_x_pair_word(const T* xs, int e) {
  typedef AffinePairs<bits> Pairs;
  const int p = e % (AFFINE_UNIT / 2);
  const T* unit = xs + (e / (AFFINE_UNIT / 2)) * AFFINE_UNIT;
  const unsigned short* raw = reinterpret_cast<const unsigned short*>(unit);
  return static_cast<uint32_t>(raw[Pairs::lo(p)]) |
      (static_cast<uint32_t>(raw[Pairs::hi(p)]) << 16);
}

// The same in place: one unit (32 values at `xs`, 16-byte aligned), by one
// thread, for when there is no room for a second copy.
template <typename T, int bits>
__device__ __forceinline__ void affine_stream_pair_x_unit(T* xs) {
  uint4* v = reinterpret_cast<uint4*>(xs);
  uint32_t pairs[16];
#pragma unroll
  for (int p = 0; p < 16; ++p) {
    pairs[p] = affine_stream_x_pair_word<T, bits>(xs, p);
  }
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    v[q] = make_uint4(pairs[4 * q], pairs[4 * q + 1], pairs[4 * q + 2], pairs[4 * q + 3]);
  }
}
