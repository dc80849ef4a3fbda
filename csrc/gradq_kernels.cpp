// Native CPU kernels of gradq: bit packing and fused gradient-compression steps.
//
// Every function reproduces its pure-PyTorch reference in gradq/_reference.py bit for bit (the tests
// check this); docs/kernels.md writes down the arithmetic. Arguments are validated in Python
// (gradq/kernels.py): here inputs are 1-D, contiguous, on the CPU and of the documented dtypes.
//
// Work is split with at::parallel_for over whole blocks or groups of 8 elements. Random numbers come
// from Philox4x32-10 keyed by (seed) with the element index as counter, so results do not depend on
// the thread count. Built with -ffp-contract=off: no fused multiply-add may change a rounding.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "code_ops.h"
#include "integer_gemm.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

// GCC 12 reports -W(maybe-)uninitialized inside its avx512fintrin.h wherever the AVX-512 paths below
// use an intrinsic that passes _mm512_undefined_*() (a deliberately uninitialized value) as the unused
// merge source. A false positive, silenced for the kernels (not for the headers above).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace {

constexpr int64_t kGroup = 8;            // elements per packing group: 8 codes of k bits = k bytes
constexpr int64_t kGrain = 1 << 14;      // groups per parallel task for the element-wise kernels
constexpr int64_t kUniformBatch = 128;   // uniforms drawn per Philox call (4 interleaved batches of 8 counters)

// ---------------------------------------------------------------------------------------------
// Philox4x32-10 (Salmon et al., SC'11).

struct Philox {
  static constexpr int kRounds = 10;
  static constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;  // multipliers
  static constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;  // key increments (Weyl)
  uint32_t key0[kRounds], key1[kRounds];  // round r's key: (seed_lo + r W0, seed_hi + r W1) mod 2^32
  uint32_t c2, c3;                        // high half of the counter: the stream offset

  Philox(uint64_t seed, uint64_t offset)
      : c2(static_cast<uint32_t>(offset)), c3(static_cast<uint32_t>(offset >> 32)) {
    for (int r = 0; r < kRounds; ++r) {
      key0[r] = static_cast<uint32_t>(seed) + static_cast<uint32_t>(r) * kW0;
      key1[r] = static_cast<uint32_t>(seed >> 32) + static_cast<uint32_t>(r) * kW1;
    }
  }

  // Four 32-bit words for counter j (the 4 elements 4j .. 4j+3).
  inline void words(uint64_t j, uint32_t out[4]) const {
    uint32_t x0 = static_cast<uint32_t>(j), x1 = static_cast<uint32_t>(j >> 32), x2 = c2, x3 = c3;
    for (int r = 0; r < kRounds; ++r) {
      const uint64_t p0 = static_cast<uint64_t>(kM0) * x0;
      const uint64_t p1 = static_cast<uint64_t>(kM1) * x2;
      const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
      const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
      x0 = hi1 ^ x1 ^ key0[r];
      x1 = lo1;
      x2 = hi0 ^ x3 ^ key1[r];
      x3 = lo0;
    }
    out[0] = x0; out[1] = x1; out[2] = x2; out[3] = x3;
  }

  // Uniforms in [0, 1) on a 2^-24 grid for the 32 * B elements starting at i (i a multiple of 4):
  // counters i/4 .. i/4 + 8B - 1, word w of counter j going to element 4j + w. The B batches of 8
  // counters run interleaved so that the multiplier latency of one hides behind the others.
  template <int B>
  inline void uniforms(int64_t i, float* u) const {
    const uint64_t j0 = static_cast<uint64_t>(i) / 4;
#if defined(__AVX512F__)
    // 16 counters per vector: the products' halves are gathered with one two-source permute each, and
    // the three-way XOR is one ternary-logic op.
    static_assert(B % 2 == 0, "AVX-512 Philox runs 16 counters per vector");
    constexpr int V = B / 2;
    __m512i x0[V], x1[V], x2[V], x3[V];
    const __m512i lane = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i low_halves = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i high_halves = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    for (int v = 0; v < V; ++v) {
      // Counters j0 + 16v + l as (low, high) 32-bit halves, from two vectors of 8 64-bit counters.
      const __m512i a = _mm512_add_epi64(_mm512_set1_epi64(static_cast<int64_t>(j0 + 16 * v)), lane);
      const __m512i b = _mm512_add_epi64(a, _mm512_set1_epi64(8));
      x0[v] = _mm512_permutex2var_epi32(a, low_halves, b);
      x1[v] = _mm512_permutex2var_epi32(a, high_halves, b);
      x2[v] = _mm512_set1_epi32(static_cast<int>(c2));
      x3[v] = _mm512_set1_epi32(static_cast<int>(c3));
    }
    const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kM0));
    const __m512i m1 = _mm512_set1_epi32(static_cast<int>(kM1));
    // Lane 2i of lo takes the low half of even product i, lane 2i+1 that of odd product i; hi the high halves.
    const __m512i lo_idx = _mm512_set_epi32(30, 14, 28, 12, 26, 10, 24, 8, 22, 6, 20, 4, 18, 2, 16, 0);
    const __m512i hi_idx = _mm512_set_epi32(31, 15, 29, 13, 27, 11, 25, 9, 23, 7, 21, 5, 19, 3, 17, 1);
    for (int r = 0; r < kRounds; ++r) {
      const __m512i kv0 = _mm512_set1_epi32(static_cast<int>(key0[r]));
      const __m512i kv1 = _mm512_set1_epi32(static_cast<int>(key1[r]));
      for (int v = 0; v < V; ++v) {
        const __m512i e0 = _mm512_mul_epu32(x0[v], m0), o0 = _mm512_mul_epu32(_mm512_srli_epi64(x0[v], 32), m0);
        const __m512i e1 = _mm512_mul_epu32(x2[v], m1), o1 = _mm512_mul_epu32(_mm512_srli_epi64(x2[v], 32), m1);
        const __m512i lo0 = _mm512_permutex2var_epi32(e0, lo_idx, o0), hi0 = _mm512_permutex2var_epi32(e0, hi_idx, o0);
        const __m512i lo1 = _mm512_permutex2var_epi32(e1, lo_idx, o1), hi1 = _mm512_permutex2var_epi32(e1, hi_idx, o1);
        x0[v] = _mm512_ternarylogic_epi32(hi1, x1[v], kv0, 0x96);  // hi1 ^ x1 ^ key0[r]
        x1[v] = lo1;
        x2[v] = _mm512_ternarylogic_epi32(hi0, x3[v], kv1, 0x96);  // hi0 ^ x3 ^ key1[r]
        x3[v] = lo0;
      }
    }
    const __m512 grid = _mm512_set1_ps(0x1p-24f);
    for (int v = 0; v < V; ++v) {
      // Within each 128-bit lane L (counters 4L .. 4L+3): c[q] holds the 4 words of counter 4L + q.
      const __m512i t0 = _mm512_unpacklo_epi32(x0[v], x1[v]), t1 = _mm512_unpacklo_epi32(x2[v], x3[v]);
      const __m512i t2 = _mm512_unpackhi_epi32(x0[v], x1[v]), t3 = _mm512_unpackhi_epi32(x2[v], x3[v]);
      const __m512i c[4] = {_mm512_unpacklo_epi64(t0, t1), _mm512_unpackhi_epi64(t0, t1),
                            _mm512_unpacklo_epi64(t2, t3), _mm512_unpackhi_epi64(t2, t3)};
      // Transpose the 4 x 4 grid of 128-bit lanes: output vector L holds counters 4L .. 4L+3 in order.
      const __m512i a01 = _mm512_shuffle_i32x4(c[0], c[1], 0x44), b01 = _mm512_shuffle_i32x4(c[2], c[3], 0x44);
      const __m512i a23 = _mm512_shuffle_i32x4(c[0], c[1], 0xEE), b23 = _mm512_shuffle_i32x4(c[2], c[3], 0xEE);
      const __m512i ordered[4] = {_mm512_shuffle_i32x4(a01, b01, 0x88), _mm512_shuffle_i32x4(a01, b01, 0xDD),
                                  _mm512_shuffle_i32x4(a23, b23, 0x88), _mm512_shuffle_i32x4(a23, b23, 0xDD)};
      for (int q = 0; q < 4; ++q)
        _mm512_storeu_ps(u + 64 * v + 16 * q,
                         _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(ordered[q], 8)), grid));
    }
#elif defined(__AVX2__)
    alignas(32) uint32_t lo[8 * B], hi[8 * B];
    for (int l = 0; l < 8 * B; ++l) {
      lo[l] = static_cast<uint32_t>(j0 + l);
      hi[l] = static_cast<uint32_t>((j0 + l) >> 32);
    }
    __m256i x0[B], x1[B], x2[B], x3[B];
    for (int b = 0; b < B; ++b) {
      x0[b] = _mm256_load_si256(reinterpret_cast<const __m256i*>(lo + 8 * b));
      x1[b] = _mm256_load_si256(reinterpret_cast<const __m256i*>(hi + 8 * b));
      x2[b] = _mm256_set1_epi32(static_cast<int>(c2));
      x3[b] = _mm256_set1_epi32(static_cast<int>(c3));
    }
    const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kM0));
    const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kM1));
    for (int r = 0; r < kRounds; ++r) {
      const __m256i kv0 = _mm256_set1_epi32(static_cast<int>(key0[r]));
      const __m256i kv1 = _mm256_set1_epi32(static_cast<int>(key1[r]));
      for (int b = 0; b < B; ++b) {
        // 32x32 -> 64-bit products of the even lanes, then of the odd lanes shifted down.
        const __m256i e0 = _mm256_mul_epu32(x0[b], m0), o0 = _mm256_mul_epu32(_mm256_srli_epi64(x0[b], 32), m0);
        const __m256i e1 = _mm256_mul_epu32(x2[b], m1), o1 = _mm256_mul_epu32(_mm256_srli_epi64(x2[b], 32), m1);
        const __m256i lo0 = _mm256_blend_epi32(e0, _mm256_slli_epi64(o0, 32), 0xAA);
        const __m256i hi0 = _mm256_blend_epi32(_mm256_srli_epi64(e0, 32), o0, 0xAA);
        const __m256i lo1 = _mm256_blend_epi32(e1, _mm256_slli_epi64(o1, 32), 0xAA);
        const __m256i hi1 = _mm256_blend_epi32(_mm256_srli_epi64(e1, 32), o1, 0xAA);
        x0[b] = _mm256_xor_si256(_mm256_xor_si256(hi1, x1[b]), kv0);
        x1[b] = lo1;
        x2[b] = _mm256_xor_si256(_mm256_xor_si256(hi0, x3[b]), kv1);
        x3[b] = lo0;
      }
    }
    const __m256 grid = _mm256_set1_ps(0x1p-24f);
    for (int b = 0; b < B; ++b) {
      // Transpose the 4 word vectors of 8 counters into element order.
      const __m256i t0 = _mm256_unpacklo_epi32(x0[b], x1[b]), t1 = _mm256_unpacklo_epi32(x2[b], x3[b]);
      const __m256i t2 = _mm256_unpackhi_epi32(x0[b], x1[b]), t3 = _mm256_unpackhi_epi32(x2[b], x3[b]);
      const __m256i c04 = _mm256_unpacklo_epi64(t0, t1), c15 = _mm256_unpackhi_epi64(t0, t1);
      const __m256i c26 = _mm256_unpacklo_epi64(t2, t3), c37 = _mm256_unpackhi_epi64(t2, t3);
      const __m256i ordered[4] = {
          _mm256_permute2x128_si256(c04, c15, 0x20), _mm256_permute2x128_si256(c26, c37, 0x20),
          _mm256_permute2x128_si256(c04, c15, 0x31), _mm256_permute2x128_si256(c26, c37, 0x31)};
      for (int v = 0; v < 4; ++v)
        _mm256_storeu_ps(u + 32 * b + 8 * v,
                         _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(ordered[v], 8)), grid));
    }
#else
    uint32_t w[4];
    for (int c = 0; c < 8 * B; ++c) {
      words(j0 + c, w);
      for (int l = 0; l < 4; ++l) u[4 * c + l] = static_cast<float>(w[l] >> 8) * 0x1p-24f;
    }
#endif
  }
};

// ---------------------------------------------------------------------------------------------
// Packing: a group of 8 codes of k bits is k little-endian bytes; code j sits at bits [jk, jk+k).

inline uint64_t load_le(const uint8_t* p, int64_t nbytes) {
  uint64_t v = 0;
  for (int64_t b = 0; b < nbytes; ++b) v |= static_cast<uint64_t>(p[b]) << (8 * b);
  return v;
}

inline void store_le(uint8_t* p, uint64_t v, int64_t nbytes) {
  for (int64_t b = 0; b < nbytes; ++b) p[b] = static_cast<uint8_t>(v >> (8 * b));
}

// Pack `count` (<= 8) codes into ceil(count*k/8) bytes at out.
inline void pack_group(const uint8_t* codes, int64_t count, int k, uint8_t* out) {
  const uint64_t mask = (1u << k) - 1;
  uint64_t acc = 0;
  for (int64_t j = 0; j < count; ++j) acc |= (codes[j] & mask) << (j * k);
  store_le(out, acc, (count * k + 7) / 8);
}

inline void unpack_group(const uint8_t* in, int64_t count, int k, uint8_t* codes) {
  const uint64_t mask = (1u << k) - 1;
  const uint64_t acc = load_le(in, (count * k + 7) / 8);
  for (int64_t j = 0; j < count; ++j) codes[j] = static_cast<uint8_t>((acc >> (j * k)) & mask);
}

int64_t packed_nbytes(int64_t n, int64_t k) { return (n * k + 7) / 8; }

// The low k bits of each of 8 bytes: the fields of a full group once spread one per byte.
inline uint64_t byte_fields_mask(int k) { return 0x0101010101010101ull * ((1u << k) - 1); }

#if defined(__BMI2__)
// A store of k = 1..8 bytes with a constant size per case, so each is one or two moves, not a call.
inline void store_low_bytes(uint8_t* out, uint64_t v, int k) {
  switch (k) {
    case 1: std::memcpy(out, &v, 1); break;
    case 2: std::memcpy(out, &v, 2); break;
    case 3: std::memcpy(out, &v, 3); break;
    case 4: std::memcpy(out, &v, 4); break;
    case 5: std::memcpy(out, &v, 5); break;
    case 6: std::memcpy(out, &v, 6); break;
    case 7: std::memcpy(out, &v, 7); break;
    default: std::memcpy(out, &v, 8); break;
  }
}

// A full group of 8 codes (one per byte of `fields`, each < 2^k) packed into its k bytes at out
// (x86 is little-endian: the low k bytes of the extracted bits).
inline void pack_full_group(uint64_t fields, int k, uint64_t mask, uint8_t* out) {
  store_low_bytes(out, _pext_u64(fields, mask), k);
}

// The 8 codes of a full group (k bytes at in, the buffer ending at end), one per byte. One 8-byte
// load, masked, where 8 bytes remain in the buffer.
inline uint64_t unpack_full_group(const uint8_t* in, const uint8_t* end, int k, uint64_t mask) {
  uint64_t packed;
  if (end - in >= 8) {
    std::memcpy(&packed, in, 8);
    if (k < 8) packed &= (1ull << (8 * k)) - 1;
  } else {
    packed = load_le(in, k);
  }
  return _pdep_u64(packed, mask);
}
#endif

// Calls fn(begin, end) over [0, n) in ranges whose boundaries are multiples of 8.
template <typename Fn>
void for_groups(int64_t n, Fn fn) {
  const int64_t groups = (n + kGroup - 1) / kGroup;
  at::parallel_for(0, groups, kGrain, [&](int64_t g0, int64_t g1) {
    fn(g0 * kGroup, std::min(g1 * kGroup, n));
  });
}

torch::Tensor pack_bits(const torch::Tensor& codes, int64_t k) {
  const int64_t n = codes.numel();
  auto out = torch::empty({packed_nbytes(n, k)}, codes.options().dtype(torch::kUInt8));
  const uint8_t* c = codes.data_ptr<uint8_t>();
  uint8_t* o = out.data_ptr<uint8_t>();
  for_groups(n, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; i += kGroup)
      pack_group(c + i, std::min(kGroup, e - i), static_cast<int>(k), o + (i / kGroup) * k);
  });
  return out;
}

torch::Tensor unpack_bits(const torch::Tensor& packed, int64_t k, int64_t n) {
  auto out = torch::empty({n}, packed.options().dtype(torch::kUInt8));
  const uint8_t* p = packed.data_ptr<uint8_t>();
  uint8_t* o = out.data_ptr<uint8_t>();
  for_groups(n, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; i += kGroup)
      unpack_group(p + (i / kGroup) * k, std::min(kGroup, e - i), static_cast<int>(k), o + i);
  });
  return out;
}

torch::Tensor philox_uniform(int64_t n, uint64_t seed, uint64_t offset) {
  auto out = torch::empty({n}, torch::dtype(torch::kFloat32));
  float* o = out.data_ptr<float>();
  const Philox rng(seed, offset);
  for_groups(n, [&](int64_t b, int64_t e) {
    float u[kUniformBatch];
    for (int64_t i = b; i < e; i += kUniformBatch) {
      rng.uniforms<kUniformBatch / 32>(i, u);
      std::memcpy(o + i, u, sizeof(float) * std::min(kUniformBatch, e - i));
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// Blocked reductions in the reference's fixed order: position p of a block feeds lane p % 8, each
// lane accumulates sequentially in double, and the lanes are then added in order 0..7.

template <typename Term>
inline double lane_sum(int64_t len, Term term) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t p = 0;
  for (; p + 8 <= len; p += 8)
    for (int l = 0; l < 8; ++l) acc[l] += term(p + l);
  for (int l = 0; p + l < len; ++l) acc[l] += term(p + l);
  double total = acc[0];
  for (int l = 1; l < 8; ++l) total += acc[l];
  return total;
}

template <typename Fn>
void for_blocks(int64_t n, int64_t block, Fn fn) {
  const int64_t nblocks = (n + block - 1) / block;
  const int64_t grain = std::max<int64_t>(1, (kGrain * kGroup) / block);
  at::parallel_for(0, nblocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) fn(b, b * block, std::min(block, n - b * block));
  });
}

// fn(b, start, len_a, len_b) for the pairs of blocks b, b+1 (b even), starting at element start; len_b
// is 0 where block b is the last.
template <typename Fn>
void for_block_pairs(int64_t n, int64_t block, Fn fn) {
  const int64_t nblocks = (n + block - 1) / block;
  const int64_t grain = std::max<int64_t>(1, (kGrain * kGroup) / (2 * block));
  at::parallel_for(0, (nblocks + 1) / 2, grain, [&](int64_t p0, int64_t p1) {
    for (int64_t pair = p0; pair < p1; ++pair) {
      const int64_t start = 2 * pair * block;
      fn(2 * pair, start, std::min(block, n - start), std::clamp<int64_t>(n - start - block, 0, block));
    }
  });
}

// The l2 norm rounded up to fp32: the smallest fp32 s with s * s >= sumsq, so that sum((x_i / scale)^2) <= 1
// also for a subnormal scale, the bound that caps the escapes of a block (docs/kernels.md). An exact test
// (an fp32 squared is exact in double) corrects the fp32 nearest the double sqrt by one step either way,
// so the result does not depend on how a sqrt rounds; the reference does the same.
inline float l2_scale(double sumsq) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  float s = static_cast<float>(std::sqrt(sumsq));
  if (static_cast<double>(s) * static_cast<double>(s) < sumsq) s = std::nextafter(s, kInf);
  const float down = std::nextafter(s, 0.0f);
  return static_cast<double>(down) * static_cast<double>(down) >= sumsq ? down : s;
}

// ---------------------------------------------------------------------------------------------
// 1-bit sign with error feedback.

// The rms scale's cap, as a multiple of mean |m|: below 2, so that error feedback contracts (docs/quantization.md).
constexpr double kRmsCap = 1.5;

// Row b of kSignMask has the float sign bit in lane l where bit l of b is set: XOR with it turns s into
// -s in exactly those lanes (the bits of the scalar -s).
struct SignMaskTable {
  alignas(32) uint32_t lanes[256][8];
  SignMaskTable() {
    for (int b = 0; b < 256; ++b)
      for (int l = 0; l < 8; ++l) lanes[b][l] = ((b >> l) & 1) ? 0x80000000u : 0u;
  }
};
const SignMaskTable kSignMask;

#if defined(__AVX2__)
// s in the lanes whose bit of `bits` is clear, -s in the others.
inline __m256 signed_scale8(__m256 s, uint8_t bits) {
  return _mm256_xor_ps(s, _mm256_load_ps(reinterpret_cast<const float*>(kSignMask.lanes[bits])));
}
#endif

// A block's values for the sign kernels: one(q) is element q of the block, eight(p) elements p..p+7.
struct BlockValues {
  const float* x;
  inline float one(int64_t q) const { return x[q]; }
#if defined(__AVX2__)
  inline __m256 eight(int64_t p) const { return _mm256_loadu_ps(x + p); }
#endif
};

// Pass 1 of a sign block: m = v + r (no r: m = v), bit (m < 0) into pb, and the returned scale:
// mean = sum |m| / len, rounded to fp32; with rms, l2_scale(sum m^2 / len) (the root mean square rounded up)
// capped at fp32(RMS_CAP * mean) (each m^2 exact in double). Both sums run in the fixed lane order of lane_sum
// (lanes 0-3 and 4-7 accumulate in two float64 vectors).
template <bool rms, typename Source>
inline float sign_block_pass1(const Source& source, const float* rb, int64_t len, uint8_t* pb) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0}, acc_sq[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t p = 0;
#if defined(__AVX2__)
  {
    const __m256 zero = _mm256_setzero_ps();
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    __m256d acc_lo = _mm256_setzero_pd(), acc_hi = _mm256_setzero_pd();
    __m256d sq_lo = _mm256_setzero_pd(), sq_hi = _mm256_setzero_pd();
    for (; p + 8 <= len; p += 8) {
      __m256 m = source.eight(p);
      if (rb) m = _mm256_add_ps(m, _mm256_loadu_ps(rb + p));
      pb[p / 8] = static_cast<uint8_t>(_mm256_movemask_ps(_mm256_cmp_ps(m, zero, _CMP_LT_OQ)));
      const __m256 a = _mm256_and_ps(m, abs_mask);
      const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(a));
      const __m256d hi = _mm256_cvtps_pd(_mm256_extractf128_ps(a, 1));
      acc_lo = _mm256_add_pd(acc_lo, lo);
      acc_hi = _mm256_add_pd(acc_hi, hi);
      if (rms) {
        sq_lo = _mm256_add_pd(sq_lo, _mm256_mul_pd(lo, lo));
        sq_hi = _mm256_add_pd(sq_hi, _mm256_mul_pd(hi, hi));
      }
    }
    _mm256_storeu_pd(acc, acc_lo);
    _mm256_storeu_pd(acc + 4, acc_hi);
    _mm256_storeu_pd(acc_sq, sq_lo);
    _mm256_storeu_pd(acc_sq + 4, sq_hi);
  }
#endif
  for (; p < len; p += 8) {
    uint32_t byte = 0;
    for (int l = 0; l < 8 && p + l < len; ++l) {
      const float v = source.one(p + l);
      const float m = rb ? v + rb[p + l] : v;
      byte |= static_cast<uint32_t>(m < 0.0f) << l;
      const double a = std::fabs(m);
      acc[l] += a;
      if (rms) acc_sq[l] += a * a;
    }
    pb[p / 8] = static_cast<uint8_t>(byte);
  }
  double total = acc[0], total_sq = acc_sq[0];
  for (int l = 1; l < 8; ++l) total += acc[l];
  const double mean = total / static_cast<double>(len);
  if (!rms) return static_cast<float>(mean);
  for (int l = 1; l < 8; ++l) total_sq += acc_sq[l];
  const float root = l2_scale(total_sq / static_cast<double>(len));
  const float cap = static_cast<float>(kRmsCap * mean);
  return root < cap ? root : cap;
}

// Pass 2 of a sign block (still in cache): r = m - (±s), m = v + r, for a block whose scale is finite.
template <typename Source>
inline void sign_block_pass2(const Source& source, float* rb, int64_t len, float s) {
  int64_t q = 0;
#if defined(__AVX2__)
  const __m256 zero = _mm256_setzero_ps();
  const __m256 pos = _mm256_set1_ps(s), neg = _mm256_set1_ps(-s);
  for (; q + 8 <= len; q += 8) {
    const __m256 m = _mm256_add_ps(source.eight(q), _mm256_loadu_ps(rb + q));
    _mm256_storeu_ps(rb + q, _mm256_sub_ps(m, _mm256_blendv_ps(pos, neg, _mm256_cmp_ps(m, zero, _CMP_LT_OQ))));
  }
#endif
  for (; q < len; ++q) {
    const float m = source.one(q) + rb[q];
    rb[q] = m < 0.0f ? m + s : m - s;  // m - (-s) == m + s exactly
  }
}

// One block of the sign code with error feedback: bits into pb, the scale (mean |m|, or its rms) into
// *scale, the residual rb (may be null) updated unless the scale is non-finite.
template <typename Source>
inline void sign_block(const Source& source, float* rb, int64_t len, uint8_t* pb, float* scale, bool rms) {
  *scale = rms ? sign_block_pass1<true>(source, rb, len, pb) : sign_block_pass1<false>(source, rb, len, pb);
  if (rb && std::isfinite(*scale)) sign_block_pass2(source, rb, len, *scale);
}

std::vector<torch::Tensor> sign_compress(const torch::Tensor& x, const c10::optional<torch::Tensor>& residual_opt,
                                         int64_t block, bool rms) {
  const int64_t n = x.numel();
  const int64_t nblocks = (n + block - 1) / block;
  auto packed = torch::empty({packed_nbytes(n, 1)}, x.options().dtype(torch::kUInt8));
  auto scales = torch::empty({nblocks}, x.options());
  const float* xp = x.data_ptr<float>();
  float* rp = residual_opt.has_value() ? residual_opt->data_ptr<float>() : nullptr;
  uint8_t* pp = packed.data_ptr<uint8_t>();
  float* sp = scales.data_ptr<float>();

  for_blocks(n, block, [&](int64_t b, int64_t start, int64_t len) {
    sign_block(BlockValues{xp + start}, rp ? rp + start : nullptr, len, pp + start / 8, sp + b, rms);
  });
  return {packed, scales};
}

// The output of a decompress kernel: `out` when given (then written or, with accumulate, added to).
torch::Tensor output_for(const c10::optional<torch::Tensor>& out, int64_t n, const torch::Tensor& like) {
  return out.has_value() ? *out : torch::empty({n}, like.options());
}

torch::Tensor sign_decompress(const torch::Tensor& packed, const torch::Tensor& scales, int64_t block, int64_t n,
                              const c10::optional<torch::Tensor>& out_opt, bool accumulate) {
  auto out = output_for(out_opt, n, scales);
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  float* o = out.data_ptr<float>();
  for_blocks(n, block, [&](int64_t b, int64_t start, int64_t len) {
    const float s = sp[b];
    const uint8_t* pb = pp + start / 8;
    float* ob = o + start;
    int64_t q = 0;
#if defined(__AVX2__)
    const __m256 pos = _mm256_set1_ps(s);
    for (; q + 8 <= len; q += 8) {
      const __m256 v = signed_scale8(pos, pb[q >> 3]);
      _mm256_storeu_ps(ob + q, accumulate ? _mm256_add_ps(_mm256_loadu_ps(ob + q), v) : v);
    }
#endif
    for (; q < len; ++q) {
      const float v = ((pb[q >> 3] >> (q & 7)) & 1) ? -s : s;
      ob[q] = accumulate ? ob[q] + v : v;
    }
  });
  return out;
}

// The mean over W ranks of sign codes (one per row of `packed`/`scales`, same blocking), re-encoded
// as a sign code with error feedback: sign_compress(mean, residual, block, rms) where
// mean = ((d_0 + d_1) + ... + d_{W-1}) / W in fp32 and d_r is row r decoded. A block's means go to a
// per-thread buffer (one block: it stays in cache for the two passes of the sign code).
struct SignRows {
  const uint8_t* packed;
  const float* scales;
  int64_t row_bytes, row_scales, rows;

  inline float mean(int64_t b, int64_t i) const {
    float v = 0.0f;
    for (int64_t r = 0; r < rows; ++r) {
      const float s = scales[r * row_scales + b];
      const float d = ((packed[r * row_bytes + (i >> 3)] >> (i & 7)) & 1) ? -s : s;
      v = r ? v + d : d;
    }
    return v / static_cast<float>(rows);
  }

  // The means of block b (elements start .. start+len-1) into m: the same operations as mean().
  inline void block_mean(int64_t b, int64_t start, int64_t len, float* m) const {
    int64_t q = 0;
#if defined(__AVX2__)
    // x / W == x * (1/W) exactly when W is a power of two (both are the correctly rounded x / W).
    const bool power_of_two = (rows & (rows - 1)) == 0;
    const __m256 count = _mm256_set1_ps(static_cast<float>(rows));
    const __m256 inverse = _mm256_set1_ps(1.0f / static_cast<float>(rows));
    for (; q + 8 <= len; q += 8) {
      const int64_t byte = (start + q) >> 3;
      __m256 v = signed_scale8(_mm256_broadcast_ss(scales + b), packed[byte]);
      for (int64_t r = 1; r < rows; ++r)
        v = _mm256_add_ps(v, signed_scale8(_mm256_broadcast_ss(scales + r * row_scales + b),
                                           packed[r * row_bytes + byte]));
      _mm256_storeu_ps(m + q, power_of_two ? _mm256_mul_ps(v, inverse) : _mm256_div_ps(v, count));
    }
#endif
    for (; q < len; ++q) m[q] = mean(b, start + q);
  }
};

std::vector<torch::Tensor> sign_mean_compress(const torch::Tensor& packed_rows, const torch::Tensor& scale_rows,
                                              const c10::optional<torch::Tensor>& residual_opt, int64_t block,
                                              int64_t n, bool rms) {
  const int64_t nblocks = (n + block - 1) / block;
  const SignRows rows{packed_rows.data_ptr<uint8_t>(), scale_rows.data_ptr<float>(), packed_rows.size(1), nblocks,
                      packed_rows.size(0)};
  auto packed = torch::empty({packed_nbytes(n, 1)}, packed_rows.options());
  auto scales = torch::empty({nblocks}, scale_rows.options());
  float* rp = residual_opt.has_value() ? residual_opt->data_ptr<float>() : nullptr;
  uint8_t* pp = packed.data_ptr<uint8_t>();
  float* sp = scales.data_ptr<float>();

  for_blocks(n, block, [&](int64_t b, int64_t start, int64_t len) {
    thread_local std::vector<float> means;
    if (static_cast<int64_t>(means.size()) < len) means.resize(len);
    rows.block_mean(b, start, len, means.data());
    sign_block(BlockValues{means.data()}, rp ? rp + start : nullptr, len, pp + start / 8, sp + b, rms);
  });
  return {packed, scales};
}

// ---------------------------------------------------------------------------------------------
// Stochastic sign-magnitude codes (TernGrad, QSGD).

// The end of a sum of squares in lane_sum's order, its 8 lane accumulators in acc: the squares of the
// last values xb[p .. len-1] (fewer than 8) go to lanes 0.., then the lanes are added in order 0..7.
inline double finish_sum_squares(double acc[8], const float* xb, int64_t p, int64_t len) {
  for (int l = 0; p + l < len; ++l) {
    const double v = xb[p + l];
    acc[l] += v * v;
  }
  double total = acc[0];
  for (int l = 1; l < 8; ++l) total += acc[l];
  return total;
}

// Sum of squares in float64 in the lane order of lane_sum (lanes 0-3 and 4-7 in two vectors).
inline double sum_squares(const float* xb, int64_t len) {
#if defined(__AVX2__)
  double acc[8];
  __m256d acc_lo = _mm256_setzero_pd(), acc_hi = _mm256_setzero_pd();
  int64_t p = 0;
  for (; p + 8 <= len; p += 8) {
    const __m256 v = _mm256_loadu_ps(xb + p);
    const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v)), hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
    acc_lo = _mm256_add_pd(acc_lo, _mm256_mul_pd(lo, lo));
    acc_hi = _mm256_add_pd(acc_hi, _mm256_mul_pd(hi, hi));
  }
  _mm256_storeu_pd(acc, acc_lo);
  _mm256_storeu_pd(acc + 4, acc_hi);
  return finish_sum_squares(acc, xb, p, len);
#else
  return lane_sum(len, [&](int64_t q) { const double v = xb[q]; return v * v; });
#endif
}

// sum_squares of two blocks of the same length, out[0] of xa and out[1] of xb. With AVX-512 each block's
// 8 lanes are one vector, and the two blocks' additions, which sum_squares must do in sequence, overlap.
inline void sum_squares2(const float* xa, const float* xb, int64_t len, double out[2]) {
#if defined(__AVX512F__)
  __m512d acc_a = _mm512_setzero_pd(), acc_b = _mm512_setzero_pd();
  int64_t p = 0;
  for (; p + 8 <= len; p += 8) {
    const __m512d a = _mm512_cvtps_pd(_mm256_loadu_ps(xa + p)), b = _mm512_cvtps_pd(_mm256_loadu_ps(xb + p));
    acc_a = _mm512_add_pd(acc_a, _mm512_mul_pd(a, a));
    acc_b = _mm512_add_pd(acc_b, _mm512_mul_pd(b, b));
  }
  double acc[2][8];
  _mm512_storeu_pd(acc[0], acc_a);
  _mm512_storeu_pd(acc[1], acc_b);
  out[0] = finish_sum_squares(acc[0], xa, p, len);
  out[1] = finish_sum_squares(acc[1], xb, p, len);
#else
  out[0] = sum_squares(xa, len);
  out[1] = sum_squares(xb, len);
#endif
}

// The largest |x| of a block, NaN if the block has one. Non-negative floats order as their bit patterns
// do, and |NaN| is above |inf| as a pattern: an unsigned maximum of the patterns finds both, in any order,
// so several accumulators can run side by side.
inline float max_abs(const float* xb, int64_t len) {
  constexpr uint32_t kAbs = 0x7FFFFFFFu, kInf = 0x7F800000u;
  uint32_t top = 0;
  int64_t q = 0;
#if defined(__AVX512F__)
  {
    const __m512i abs_mask = _mm512_set1_epi32(static_cast<int>(kAbs));
    __m512i t[4] = {_mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512(), _mm512_setzero_si512()};
    for (; q + 64 <= len; q += 64)
      for (int i = 0; i < 4; ++i)
        t[i] = _mm512_max_epu32(t[i], _mm512_and_si512(_mm512_loadu_si512(xb + q + 16 * i), abs_mask));
    for (; q + 16 <= len; q += 16) t[0] = _mm512_max_epu32(t[0], _mm512_and_si512(_mm512_loadu_si512(xb + q), abs_mask));
    top = _mm512_reduce_max_epu32(_mm512_max_epu32(_mm512_max_epu32(t[0], t[1]), _mm512_max_epu32(t[2], t[3])));
  }
#elif defined(__AVX2__)
  {
    const __m256i abs_mask = _mm256_set1_epi32(static_cast<int>(kAbs));
    __m256i t[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
    for (; q + 32 <= len; q += 32)
      for (int i = 0; i < 4; ++i)
        t[i] = _mm256_max_epu32(
            t[i], _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + q + 8 * i)), abs_mask));
    const __m256i m = _mm256_max_epu32(_mm256_max_epu32(t[0], t[1]), _mm256_max_epu32(t[2], t[3]));
    alignas(32) uint32_t lanes[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), m);
    for (int l = 0; l < 8; ++l) top = std::max(top, lanes[l]);
  }
#endif
  for (; q < len; ++q) {
    uint32_t bits;
    std::memcpy(&bits, xb + q, 4);
    top = std::max(top, bits & kAbs);
  }
  if (top > kInf) return std::numeric_limits<float>::quiet_NaN();
  float mx;
  std::memcpy(&mx, &top, 4);
  return mx;
}

// The scale of one block: its l2 norm (l2), or its largest |x|, lowered to clip x its RMS when clip > 0.
inline float block_scale(const float* xb, int64_t len, bool l2, double clip) {
  if (l2) return l2_scale(sum_squares(xb, len));
  float mx = max_abs(xb, len);
  if (mx != mx) return mx;
  if (clip > 0) {
    const double sumsq = sum_squares(xb, len);
    const float threshold = static_cast<float>(clip * std::sqrt(sumsq / static_cast<double>(len)));
    if (mx > threshold) mx = threshold;
  }
  return mx;
}

// The scales of blocks a and b (lengths la and lb; xb nullptr: block a alone) into s[0] and s[1].
inline void block_scales(const float* xa, int64_t la, const float* xb, int64_t lb, bool l2, double clip, float s[2]) {
  if (l2 && xb && la == lb) {
    double sumsq[2];
    sum_squares2(xa, xb, la, sumsq);
    s[0] = l2_scale(sumsq[0]);
    s[1] = l2_scale(sumsq[1]);
    return;
  }
  s[0] = block_scale(xa, la, l2, clip);
  if (xb) s[1] = block_scale(xb, lb, l2, clip);
}

// The 8 field bytes of a group (one per byte, each level | sign << lbits) as 2-bit symbols of the
// escape code, one per byte: the field itself for level 0 or 1 (sign in bit 1), 0b10 for an escape
// (level >= 2). Returns the symbols; `escaped` gets 0x01 in the byte of each escape.
inline uint64_t escape_symbols(uint64_t fields, int lbits, uint64_t& escaped) {
  constexpr uint64_t ones = 0x0101010101010101ull;
  const uint64_t level = fields & (ones * ((1u << lbits) - 1));
  const uint64_t high = level & ~ones;  // level bits above bit 0: nonzero iff level >= 2 (each byte < 0x80)
  escaped = ((high + ones * 0x7F) >> 7) & ones;
  const uint64_t sym = (level & ones) | (((fields >> lbits) & ones) << 1);
  return (sym & ~(escaped * 3)) | (escaped << 1);
}

// Packs a block's escape entries (`count` of `capacity`, the rest zero) as k-bit fields at out.
inline void pack_escapes(const uint8_t* entries, int64_t count, int64_t capacity, int k, uint8_t* out) {
  uint8_t group[8];
  for (int64_t g = 0; g < capacity; g += kGroup) {
    for (int64_t l = 0; l < kGroup; ++l) group[l] = g + l < count ? entries[g + l] : 0;
    pack_group(group, kGroup, k, out + (g / kGroup) * k);
  }
}

inline int64_t escape_area_offset(int64_t n) { return packed_nbytes(n, 2); }

// Escape entry e (k bits) of a block's escape area at area.
inline uint64_t escape_entry(const uint8_t* area, int64_t e, int k) {
  const int64_t bit = e * k;
  const int shift = static_cast<int>(bit % 8);
  return (load_le(area + bit / 8, (shift + k + 7) / 8) >> shift) & ((1u << k) - 1);
}

// A stochastic sign-magnitude code of n values (levels, escape entries per block, scale rule, random
// stream), coded and decoded one block at a time.
struct SignMagCode {
  int64_t n, levels, escapes;
  int lbits, k, kw;  // level bits, field width, width of the main code stream (2 with the escape code)
  bool l2;
  double clip;
  Philox rng;
  float flevels;
  uint64_t mask;
  // For streams of kw <= 4 bits: planes[j] has bit kw*l + j set for l = 0..15, the place of bit j of
  // field l in the 2*kw little-endian bytes of two groups.
  uint64_t planes[4] = {0, 0, 0, 0};

  SignMagCode(int64_t n, int64_t levels, int64_t escapes, bool l2, double clip, uint64_t seed, uint64_t offset)
      : n(n), levels(levels), escapes(escapes), lbits(64 - __builtin_clzll(static_cast<uint64_t>(levels))),
        k(lbits + 1), kw(escapes ? 2 : k), l2(l2), clip(clip), rng(seed, offset),
        flevels(static_cast<float>(levels)), mask(byte_fields_mask(kw)) {
    if (kw <= 4)
      for (int j = 0; j < kw; ++j)
        for (int l = 0; l < 2 * kGroup; ++l) planes[j] |= 1ull << (kw * l + j);
  }

  int64_t nblocks(int64_t block) const { return (n + block - 1) / block; }
  int64_t nbytes(int64_t block) const { return packed_nbytes(n, kw) + nblocks(block) * escapes * k / 8; }

  // Codes block b (elements start .. start+len-1, values xb[0 .. len-1], scale s from block_scales)
  // into the code at pp, s into sp[b]; uniform start+p goes to the value at p. `next` (or nullptr):
  // values read later, prefetched line by line (len of them) while this block is coded, so that their
  // scale pass, which would otherwise wait on memory, reads them from cache.
  void compress_block(const float* xb, int64_t b, int64_t start, int64_t len, float s, uint8_t* pp, float* sp,
                      const float* next) const {
    // Copies of the members the loop reads: locals stay in registers across the byte stores.
    const int lbits = this->lbits, k = this->k, kw = this->kw;
    const int64_t escapes = this->escapes;
    const uint64_t mask = this->mask;
    const float flevels = this->flevels;
    const Philox rng = this->rng;
    sp[b] = s;
    const bool valid = std::isfinite(s) && s > 0.0f;
    uint8_t* pb = pp + (start / kGroup) * kw;
    thread_local std::vector<uint8_t> entries;
    if (static_cast<int64_t>(entries.size()) < escapes) entries.resize(escapes);
    int64_t nescaped = 0;
    // Writes one group's fields (one per byte) to the stream, diverting escapes to `entries`.
    auto emit = [&](uint64_t fields, int64_t p, int64_t count) {
      if (escapes) {
        uint64_t escaped;
        const uint64_t symbols = escape_symbols(fields, lbits, escaped);
        for (; escaped; escaped &= escaped - 1) {
          // The l2 bound allows at most min(levels^2, block) escapes per block (docs/kernels.md).
          TORCH_CHECK(nescaped < escapes, "gradq: more than ", escapes, " escapes in block ", b);
          entries[nescaped++] = static_cast<uint8_t>(fields >> (8 * (__builtin_ctzll(escaped) / 8)));
        }
        fields = symbols;
      }
#if defined(__BMI2__)
      if (count == kGroup) {
        pack_full_group(fields, kw, mask, pb + (p / kGroup) * kw);
        return;
      }
#endif
      uint8_t bytes[8];
      std::memcpy(bytes, &fields, 8);
      pack_group(bytes, count, kw, pb + (p / kGroup) * kw);
    };
    float u[kUniformBatch];
    int64_t p = 0;
#if defined(__AVX512F__) && defined(__BMI2__)
    // Streams of at most 4 bits, 16 values (two groups) per step: each bit of the 16 fields comes out
    // of a compare as a 16-bit mask, and one pdep puts it in place in the groups' 2*kw bytes. The same
    // levels, fields and escape order as the 8-wide path below, whole uniform batches at a time.
    if (valid && kw <= 4) {
      const uint64_t plane0 = planes[0], plane1 = planes[1], plane2 = planes[2];
      const uint64_t sign_plane = escapes ? 0 : planes[lbits];  // lbits = kw - 1 <= 3 without escapes
      const __m512 vs = _mm512_set1_ps(s), vlevels = _mm512_set1_ps(flevels), zero = _mm512_setzero_ps();
      const __m512i one = _mm512_set1_epi32(1), sign_bit = _mm512_set1_epi32(1 << lbits);
      for (; p + kUniformBatch <= len; p += kUniformBatch) {
        rng.uniforms<kUniformBatch / 32>(start + p, u);
        for (int64_t q = p; q < p + kUniformBatch; q += 2 * kGroup) {
          if (next) __builtin_prefetch(next + q, 0, 2);
          const __m512 v = _mm512_loadu_ps(xb + q);
          const __m512 y = _mm512_mul_ps(_mm512_div_ps(_mm512_abs_ps(v), vs), vlevels);
          const __m512 t = _mm512_roundscale_ps(_mm512_add_ps(y, _mm512_loadu_ps(u + (q - p))),
                                                _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
          // t >= levels -> levels (also catches +inf); otherwise t is an exact small integer.
          const __m512i level =
              _mm512_cvttps_epi32(_mm512_mask_blend_ps(_mm512_cmp_ps_mask(t, vlevels, _CMP_GE_OQ), t, vlevels));
          const __mmask16 negative = static_cast<__mmask16>(_mm512_cmp_ps_mask(v, zero, _CMP_LT_OQ) &
                                                            _mm512_cmpgt_epi32_mask(level, _mm512_setzero_si512()));
          uint64_t bits;
          if (escapes) {
            const __mmask16 single = _mm512_cmpeq_epi32_mask(level, one);
            uint32_t escaped = _mm512_cmpgt_epi32_mask(level, one);
            bits = _pdep_u64(single, plane0) | _pdep_u64((negative & single) | escaped, plane1);
            if (escaped) {
              alignas(64) int32_t fields[2 * kGroup];
              _mm512_store_si512(fields, _mm512_mask_or_epi32(level, negative, level, sign_bit));
              for (; escaped; escaped &= escaped - 1) {
                TORCH_CHECK(nescaped < escapes, "gradq: more than ", escapes, " escapes in block ", b);
                entries[nescaped++] = static_cast<uint8_t>(fields[__builtin_ctz(escaped)]);
              }
            }
          } else {
            bits = _pdep_u64(negative, sign_plane) |
                   _pdep_u64(_mm512_test_epi32_mask(level, one), plane0);
            if (lbits > 1) bits |= _pdep_u64(_mm512_test_epi32_mask(level, _mm512_set1_epi32(2)), plane1);
            if (lbits > 2) bits |= _pdep_u64(_mm512_test_epi32_mask(level, _mm512_set1_epi32(4)), plane2);
          }
          store_low_bytes(pb + (q / kGroup) * kw, bits, 2 * kw);
        }
      }
    }
#endif
#if defined(__AVX2__)
    const __m256 vs = _mm256_set1_ps(s), vlevels = _mm256_set1_ps(flevels), zero = _mm256_setzero_ps();
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256i izero = _mm256_setzero_si256();
#endif
    for (; p < len; p += kGroup) {
      if (next && p % (2 * kGroup) == 0) __builtin_prefetch(next + p, 0, 2);
      const int64_t count = std::min(kGroup, len - p);
      uint64_t fields = 0;
      if (valid) {
        if (p % kUniformBatch == 0) rng.uniforms<kUniformBatch / 32>(start + p, u);
        const float* ug = u + p % kUniformBatch;
#if defined(__AVX2__)
        if (count == kGroup) {
          const __m256 v = _mm256_loadu_ps(xb + p);
          const __m256 y = _mm256_mul_ps(_mm256_div_ps(_mm256_and_ps(v, abs_mask), vs), vlevels);
          const __m256 t = _mm256_floor_ps(_mm256_add_ps(y, _mm256_loadu_ps(ug)));
          // t >= levels -> levels (also catches +inf); otherwise t is an exact small integer.
          const __m256 capped = _mm256_blendv_ps(t, vlevels, _mm256_cmp_ps(t, vlevels, _CMP_GE_OQ));
          const __m256i level = _mm256_cvttps_epi32(capped);
          const __m256i negative = _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(v, zero, _CMP_LT_OQ)),
                                                    _mm256_cmpgt_epi32(level, izero));
          const __m256i field = _mm256_or_si256(level, _mm256_and_si256(negative, _mm256_set1_epi32(1 << lbits)));
          // 8 x int32 -> 8 x uint8 (values < 256): pack to 16 then 8 bits within lanes, then gather halves.
          const __m128i f16 = _mm_packus_epi32(_mm256_castsi256_si128(field), _mm256_extracti128_si256(field, 1));
          emit(static_cast<uint64_t>(_mm_cvtsi128_si64(_mm_packus_epi16(f16, f16))), p, count);
          continue;
        }
#endif
        for (int64_t l = 0; l < count; ++l) {
          const float v = xb[p + l];
          const float t = std::floor((std::fabs(v) / s) * flevels + ug[l]);
          const uint32_t level = t >= flevels ? static_cast<uint32_t>(levels) : static_cast<uint32_t>(t);
          const uint32_t neg = (v < 0.0f) && level > 0;
          fields |= static_cast<uint64_t>(level | (neg << lbits)) << (8 * l);
        }
      }
      emit(fields, p, count);
    }
    if (escapes) pack_escapes(entries.data(), nescaped, escapes, k, pp + escape_area_offset(n) + b * escapes * k / 8);
  }

  // Decodes block b (elements start .. start+len-1) of the code at pp (end: one past its last byte), scales
  // sp, into ob[0 .. len-1]: written, or added to with accumulate.
  __attribute__((always_inline)) inline void decode_block(const uint8_t* pp, [[maybe_unused]] const uint8_t* end,
                                                          const float* sp, int64_t b, int64_t start, int64_t len,
                                                          float* ob, bool accumulate) const {
    // Copies of the members the loop reads: locals stay in registers across the stores.
    const int lbits = this->lbits, k = this->k, kw = this->kw;
    const int64_t escapes = this->escapes;
    const uint64_t mask = this->mask;
    const uint32_t lmask = (1u << lbits) - 1;
    const float step = sp[b] / flevels;
    const uint8_t* pb = pp + (start / kGroup) * kw;
    const uint8_t* area = pp + escape_area_offset(n) + b * escapes * k / 8;
    int64_t nescaped = 0;
    // The fields of the group at p, one per byte (zero beyond count), escapes resolved.
    auto group_fields = [&](int64_t p, int64_t count) {
      uint64_t fields = 0;
#if defined(__BMI2__)
      if (count == kGroup)
        fields = unpack_full_group(pb + (p / kGroup) * kw, end, kw, mask);
      else
#endif
      {
        uint8_t bytes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        unpack_group(pb + (p / kGroup) * kw, count, kw, bytes);
        std::memcpy(&fields, bytes, 8);
      }
      if (!escapes) return fields;
      constexpr uint64_t ones = 0x0101010101010101ull;
      uint64_t escaped = (fields >> 1) & ~fields & ones;  // symbol 0b10
      uint64_t resolved = (fields & ones) | (((fields >> 1) & ones) << lbits);
      for (; escaped; escaped &= escaped - 1) {
        const int shift = 8 * (__builtin_ctzll(escaped) / 8);
        TORCH_CHECK_VALUE(nescaped < escapes, "corrupt sign-magnitude payload: block ", b, " has more than ",
                          escapes, " escape symbols");
        resolved = (resolved & ~(0xFFull << shift)) | (escape_entry(area, nescaped++, k) << shift);
      }
      return resolved;
    };
    int64_t p = 0;
#if defined(__AVX512F__) && defined(__BMI2__)
    // Streams of at most 4 bits, 16 values (two groups) per step: one pext per field bit gives that bit
    // of the 16 fields as a mask. Escapes are resolved in order, as in group_fields.
    if (kw <= 4) {
      const uint64_t plane0 = planes[0], plane1 = planes[1], plane2 = planes[2];
      const uint64_t sign_plane = escapes ? 0 : planes[lbits];  // lbits = kw - 1 <= 3 without escapes
      const __m512 vstep = _mm512_set1_ps(step);
      const __m512i vlmask = _mm512_set1_epi32(static_cast<int>(lmask)), one = _mm512_set1_epi32(1);
      const __m512i sign_bit = _mm512_set1_epi32(1 << lbits);
      for (; p + 2 * kGroup <= len; p += 2 * kGroup) {
        const uint8_t* in = pb + (p / kGroup) * kw;
        uint64_t word;  // bits beyond the 2*kw bytes are outside every plane
        if (end - in >= 8)
          std::memcpy(&word, in, 8);
        else
          word = load_le(in, 2 * kw);
        __m512i f;
        if (escapes) {
          const __mmask16 s0 = static_cast<__mmask16>(_pext_u64(word, plane0));
          const __mmask16 s1 = static_cast<__mmask16>(_pext_u64(word, plane1));
          uint32_t escaped = s1 & ~s0 & 0xFFFFu;  // symbol 0b10
          const __m512i level = _mm512_maskz_mov_epi32(s0, one);
          f = _mm512_mask_or_epi32(level, s0 & s1, level, sign_bit);
          if (escaped) {
            alignas(64) int32_t fields[2 * kGroup];
            _mm512_store_si512(fields, f);
            for (; escaped; escaped &= escaped - 1) {
              TORCH_CHECK_VALUE(nescaped < escapes, "corrupt sign-magnitude payload: block ", b, " has more than ",
                                escapes, " escape symbols");
              fields[__builtin_ctz(escaped)] = static_cast<int32_t>(escape_entry(area, nescaped++, k));
            }
            f = _mm512_load_si512(fields);
          }
        } else {
          f = _mm512_maskz_mov_epi32(static_cast<__mmask16>(_pext_u64(word, sign_plane)), sign_bit);
          f = _mm512_mask_or_epi32(f, static_cast<__mmask16>(_pext_u64(word, plane0)), f, one);
          if (lbits > 1)
            f = _mm512_mask_or_epi32(f, static_cast<__mmask16>(_pext_u64(word, plane1)), f, _mm512_set1_epi32(2));
          if (lbits > 2)
            f = _mm512_mask_or_epi32(f, static_cast<__mmask16>(_pext_u64(word, plane2)), f, _mm512_set1_epi32(4));
        }
        // magnitude = level * step, negated by flipping the sign bit: the same bits as the scalar path.
        const __m512i magnitude =
            _mm512_castps_si512(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(f, vlmask)), vstep));
        const __m512i sign = _mm512_slli_epi32(_mm512_srli_epi32(f, lbits), 31);
        const __m512 v = _mm512_castsi512_ps(_mm512_xor_si512(magnitude, sign));
        _mm512_storeu_ps(ob + p, accumulate ? _mm512_add_ps(_mm512_loadu_ps(ob + p), v) : v);
      }
    }
#endif
#if defined(__AVX2__)
    // magnitude = level * step, negated by flipping the sign bit: the same bits as the scalar path.
    const __m256 vstep = _mm256_set1_ps(step);
    const __m256i vlmask = _mm256_set1_epi32(static_cast<int>(lmask));
#endif
    for (; p < len; p += kGroup) {
      const int64_t count = std::min(kGroup, len - p);
      const uint64_t fields = group_fields(p, count);
#if defined(__AVX2__)
      if (count == kGroup) {
        const __m256i f = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<int64_t>(fields)));
        const __m256 magnitude = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_and_si256(f, vlmask)), vstep);
        const __m256 sign = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_srli_epi32(f, lbits), 31));
        const __m256 v = _mm256_xor_ps(magnitude, sign);
        _mm256_storeu_ps(ob + p, accumulate ? _mm256_add_ps(_mm256_loadu_ps(ob + p), v) : v);
        continue;
      }
#endif
      for (int64_t l = 0; l < count; ++l) {
        const uint32_t field = static_cast<uint32_t>(fields >> (8 * l)) & 0xFF;
        const float magnitude = static_cast<float>(field & lmask) * step;
        const float v = (field >> lbits) ? -magnitude : magnitude;
        ob[p + l] = accumulate ? ob[p + l] + v : v;
      }
    }
  }
};

std::vector<torch::Tensor> signmag_compress(const torch::Tensor& x, int64_t levels, int64_t block, bool l2,
                                            double clip, uint64_t seed, uint64_t offset, int64_t escapes) {
  const SignMagCode code(x.numel(), levels, escapes, l2, clip, seed, offset);
  auto packed = torch::empty({code.nbytes(block)}, x.options().dtype(torch::kUInt8));
  auto scales = torch::empty({code.nblocks(block)}, x.options());
  const float* xp = x.data_ptr<float>();
  uint8_t* pp = packed.data_ptr<uint8_t>();
  float* sp = scales.data_ptr<float>();
  // Two blocks at a time: their scales together (block_scales), then each block's code, which
  // prefetches the block two places on (the next pair).
  for_block_pairs(code.n, block, [&](int64_t b, int64_t start, int64_t la, int64_t lb) {
    const float* xa = xp + start;
    float s[2];
    block_scales(xa, la, lb ? xa + la : nullptr, lb, code.l2, code.clip, s);
    code.compress_block(xa, b, start, la, s[0], pp, sp, start + 2 * block < code.n ? xa + 2 * block : nullptr);
    if (lb)
      code.compress_block(xa + la, b + 1, start + la, lb, s[1], pp, sp,
                          start + 3 * block < code.n ? xa + 3 * block : nullptr);
  });
  return {packed, scales};
}

torch::Tensor signmag_decompress(const torch::Tensor& packed, const torch::Tensor& scales, int64_t levels,
                                 int64_t block, int64_t n, const c10::optional<torch::Tensor>& out_opt,
                                 bool accumulate, int64_t escapes) {
  const SignMagCode code(n, levels, escapes, false, 0.0, 0, 0);
  auto out = output_for(out_opt, n, scales);
  const uint8_t* pp = packed.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  float* o = out.data_ptr<float>();
  for_blocks(n, block, [&](int64_t b, int64_t start, int64_t len) {
    code.decode_block(pp, pp + packed.numel(), sp, b, start, len, o + start, accumulate);
  });
  return out;
}

// The mean over W ranks of sign-magnitude codes (one per row of `packed_rows`/`scale_rows`, same
// code), re-encoded: signmag_compress(mean, ...) where mean = ((d_0 + d_1) + ... + d_{W-1}) / W in fp32
// and d_r is row r decoded. A block's means go to a per-thread buffer, where the code reads them.
std::vector<torch::Tensor> signmag_mean_compress(const torch::Tensor& packed_rows, const torch::Tensor& scale_rows,
                                                 int64_t levels, int64_t block, int64_t n, bool l2, double clip,
                                                 uint64_t seed, uint64_t offset, int64_t escapes) {
  const SignMagCode code(n, levels, escapes, l2, clip, seed, offset);
  const int64_t rows = packed_rows.size(0), row_bytes = packed_rows.size(1), nblocks = code.nblocks(block);
  auto packed = torch::empty({code.nbytes(block)}, packed_rows.options());
  auto scales = torch::empty({nblocks}, scale_rows.options());
  const uint8_t* rp = packed_rows.data_ptr<uint8_t>();
  const float* rs = scale_rows.data_ptr<float>();
  uint8_t* pp = packed.data_ptr<uint8_t>();
  float* sp = scales.data_ptr<float>();
  for_block_pairs(n, block, [&](int64_t b, int64_t start, int64_t la, int64_t lb) {
    const int64_t len = la + lb;
    thread_local std::vector<float> means;
    if (static_cast<int64_t>(means.size()) < len) means.resize(len);
    float* m = means.data();
    for (int64_t r = 0; r < rows; ++r) {
      const uint8_t* row = rp + r * row_bytes;
      code.decode_block(row, row + row_bytes, rs + r * nblocks, b, start, la, m, r > 0);
      if (lb) code.decode_block(row, row + row_bytes, rs + r * nblocks, b + 1, start + la, lb, m + la, r > 0);
    }
    int64_t q = 0;
#if defined(__AVX2__)
    // x / W == x * (1/W) exactly when W is a power of two (both are the correctly rounded x / W).
    const bool power_of_two = (rows & (rows - 1)) == 0;
    const __m256 count = _mm256_set1_ps(static_cast<float>(rows));
    const __m256 inverse = _mm256_set1_ps(1.0f / static_cast<float>(rows));
    for (; q + 8 <= len; q += 8) {
      const __m256 v = _mm256_loadu_ps(m + q);
      _mm256_storeu_ps(m + q, power_of_two ? _mm256_mul_ps(v, inverse) : _mm256_div_ps(v, count));
    }
#endif
    for (; q < len; ++q) m[q] /= static_cast<float>(rows);
    float s[2];
    block_scales(m, la, lb ? m + la : nullptr, lb, code.l2, code.clip, s);
    code.compress_block(m, b, start, la, s[0], pp, sp, nullptr);
    if (lb) code.compress_block(m + la, b + 1, start + la, lb, s[1], pp, sp, nullptr);
  });
  return {packed, scales};
}

}  // namespace

#pragma GCC diagnostic pop

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The kernels touch no Python object: they release the GIL, so a DDP hook's background thread can
  // compress while the autograd thread calls the next hook.
  const auto no_gil = py::call_guard<py::gil_scoped_release>();
  m.doc() = "gradq native CPU kernels (see docs/kernels.md)";
  m.def("pack_bits", &pack_bits, "pack k-bit codes", no_gil);
  m.def("unpack_bits", &unpack_bits, "unpack k-bit codes", no_gil);
  m.def("philox_uniform", &philox_uniform, "Philox4x32-10 uniforms", no_gil);
  m.def("sign_compress", &sign_compress, "1-bit sign code with error feedback", no_gil);
  m.def("sign_decompress", &sign_decompress, "decode a 1-bit sign code", no_gil);
  m.def("sign_mean_compress", &sign_mean_compress, "mean of W sign codes, re-encoded with error feedback", no_gil);
  m.def("signmag_compress", &signmag_compress, "stochastic sign-magnitude code", no_gil);
  m.def("signmag_decompress", &signmag_decompress, "decode a sign-magnitude code", no_gil);
  m.def("signmag_mean_compress", &signmag_mean_compress, "mean of W sign-magnitude codes, re-encoded", no_gil);
  m.def("integer_gemm_isa", &integer_gemm_isa, "instruction set of the integer GEMM");
  m.def("integer_linear", &integer_linear, "integer Linear with packed weights", no_gil);
  m.def("integer_conv2d", &integer_conv2d, "integer Conv2d with packed weights", no_gil);
  m.def("requantize_int32", &requantize_int32, "requantization epilogue", no_gil);
  m.def("im2col_codes", &im2col_codes, "im2col of code tensors", no_gil);
  m.def("conv2d_int_mm", &conv2d_int_mm, "integer Conv2d through torch._int_mm in cache-sized tiles", no_gil);
  m.def("conv2d_direct_available", &conv2d_direct_available, "whether the direct VNNI convolution runs here");
  m.def("conv2d_direct", &conv2d_direct, "integer Conv2d by a direct VNNI convolution", no_gil);
  m.def("max_pool2d_codes", &max_pool2d_codes, "max pooling of code tensors", no_gil);
  m.def("add_codes", &add_codes, "integer residual add of code tensors", no_gil);
  m.def("avg_pool2d_codes", &avg_pool2d_codes, "average pooling of code tensors", no_gil);
  m.def("dequantize_codes", &dequantize_codes, "codes to fp32 values", no_gil);
  m.def("quantize_codes", &quantize_codes, "per-tensor uniform quantization to codes", no_gil);
}
