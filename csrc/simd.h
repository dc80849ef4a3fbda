// Shared by the integer kernels (integer_gemm.cpp, code_ops.cpp): the instruction-set attributes of
// their vector functions, run-time CPU feature checks, and a 16-byte store.
#pragma once

#include <immintrin.h>

#include <cstdint>

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// Vector functions carry their instruction set as an attribute, so that the library builds for any x86-64
// and picks a path at run time; a lambda inside such a function does not inherit it (use a function).
#define GRADQ_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
#define GRADQ_AVX2 __attribute__((target("avx2,fma")))
#define GRADQ_AVX512_DQ __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#define GRADQ_AVX512_BW __attribute__((target("avx512f,avx512bw")))
#define GRADQ_AVX512_VBMI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi")))
#define GRADQ_DIRECT __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512dq")))

namespace gradq_simd {

inline bool has_avx512_bw() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  return ok;
}

inline bool has_avx512_dq() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return ok;
}

inline bool has_avx512_vnni() {
  static const bool ok = has_avx512_bw() && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  return ok;
}

inline bool has_avx512_vnni_dq() { return has_avx512_vnni() && has_avx512_dq(); }

// Stores the first n <= 16 bytes of v at out: a plain store for 16 (masked stores are slow on some cores).
GRADQ_AVX512_DQ inline void store_bytes16(uint8_t* out, __m128i v, int64_t n) {
  if (n == 16) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), v);
  } else {
    _mm_mask_storeu_epi8(out, static_cast<__mmask16>((1u << n) - 1), v);
  }
}

}  // namespace gradq_simd

#pragma GCC diagnostic pop
