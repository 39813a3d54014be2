// Dropout's random numbers: Philox4x32-10, bit for bit the generator of the Triton backend.
//
// The Triton kernels draw a (query, key column) pair's number as
//     tl.uint_to_uniform_float(tl.philox(seed, counter, stream, 0, 0)[0])
// with counter = query * (P + Nk) + column (prefix slots first, then the sequence keys) and
// stream = sample * Hq + head, and keep the probability iff that number is >= dropout_p. This header reproduces
// triton.language.random exactly: key (seed_lo, seed_hi), counter (c0, c1, 0, 0), ten rounds with the key raised
// after each, the first output word, then the int32 reinterpretation folded to non-negative (x < 0 -> ~x) times
// 4.6566127342e-10 in float32. Same seed, same mask: the CUDA and Triton backends drop the same probabilities.
//
// Host and device code both include it: the host version is what the CPU tests compare with Triton's mask.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define PTV2_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PTV2_HOST_DEVICE inline
#endif

namespace ptv2 {

PTV2_HOST_DEVICE uint32_t mul_hi_u32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * static_cast<uint64_t>(b)) >> 32);
#endif
}

// First 32-bit word of Philox4x32-10 with key (seed_lo, seed_hi) on counter (c0, c1, 0, 0).
PTV2_HOST_DEVICE uint32_t philox_first_word(uint64_t seed, uint32_t c0, uint32_t c1) {
  uint32_t k0 = static_cast<uint32_t>(seed & 0xffffffffull);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  uint32_t c2 = 0u, c3 = 0u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t old0 = c0, old2 = c2;
    c0 = mul_hi_u32(0xCD9E8D57u, old2) ^ c1 ^ k0;
    c2 = mul_hi_u32(0xD2511F53u, old0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * old2;
    c3 = 0xD2511F53u * old0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// triton.language.random.uint_to_uniform_float for a 32-bit word: a float32 in [0, 1).
PTV2_HOST_DEVICE float uniform_from_word(uint32_t word) {
  int32_t x = static_cast<int32_t>(word);
  if (x < 0) x = ~x;
  // Triton rounds the Python constant (a double) to float32 once; so does this cast.
  return static_cast<float>(x) * static_cast<float>(4.6566127342e-10);
}

// Whether dropout keeps the probability of (query row, key column) of one (sample, head) stream.
// cols_total = P + Nk; column = prefix slot p, or P + sequence key j.
PTV2_HOST_DEVICE bool dropout_keep(uint64_t seed, uint32_t stream, uint32_t row, uint32_t column, uint32_t cols_total,
                                   float dropout_p) {
  const uint32_t counter = row * cols_total + column;
  return uniform_from_word(philox_first_word(seed, counter, stream)) >= dropout_p;
}

}  // namespace ptv2
