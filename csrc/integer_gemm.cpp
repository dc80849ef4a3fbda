// Integer GEMM of gradq's integer model (docs/integer.md section 3; the weight layout and the kernel
// arithmetic are written down in docs/kernels.md, "Integer GEMM").
//
//   out[m, c] = clamp(((acc * M[c] + 2^(n[c]-1)) >> n[c]) + zo, lo, hi),
//   acc       = sum_k (x[m, k] - zx) * Wi[c, k] + bq[c]                       (exact in int32)
//
// computed as acc = dot(xu[m, :], Wi[c, :]) + offset[c] with xu the input codes as uint8 (int8 codes
// flipped by XOR 0x80, i.e. plus 128) and offset[c] = bq[c] - zeff * sum_k Wi[c, k] (zeff = zx, or zx + 128
// for int8 codes), in wrap-around 32-bit arithmetic: the true acc fits in int32 (the layer's bound), so
// the wrapped sum is exact. Weights come packed at 8, 4, 2 or 1 bit in 64-element blocks and are unpacked
// in registers; per-group sub-scales r multiply each group's partial dot (group sizes that are multiples of
// 64); other group sizes come as int16 Wi. Three code paths, chosen at run time: AVX-512 VNNI, AVX2 and
// portable C++. All compute the same integers; the tests compare each with the pure-PyTorch reference.
//
// Convolutions: im2col into the GEMM, im2col tile by tile into torch._int_mm and the same epilogue, or a
// direct VNNI convolution without im2col (docs/kernels.md). The other operations on codes (pooling, the
// residual add, quantize, dequantize) are in code_ops.cpp.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <climits>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "integer_gemm.h"
#include "simd.h"

using gradq_simd::has_avx512_bw;
using gradq_simd::has_avx512_dq;
using gradq_simd::has_avx512_vnni;
using gradq_simd::has_avx512_vnni_dq;
using gradq_simd::store_bytes16;

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace {

constexpr int64_t kBlock = 64;       // weights per layout block
constexpr int64_t kRowChunk = 64;    // rows per parallel task
constexpr int64_t kChanChunk = 64;   // channels per parallel task

enum Isa : int64_t { kAuto = 0, kPortable = 1, kAvx2 = 2, kAvx512Vnni = 3 };

struct Weights {
  const uint8_t* packed = nullptr;  // (C, row_bytes) blocks of 64 codes, or null
  const int16_t* wide = nullptr;    // (C, kp) Wi, or null
  int64_t row_bytes = 0;
  int bits = 8;
  bool sign = false;                // 1-bit sign codes: bit 1 is -1, bit 0 is +1
  bool offset_binary = false;       // 2/4-bit fields hold q + 2^(bits-1) (else two's complement)
  int64_t nblocks = 0;              // kp / 64
  const int32_t* sub = nullptr;     // (C, groups) sub-scales r, or null
  int64_t blocks_per_group = 0;
  int64_t groups = 0;
};

struct Epilogue {
  const int64_t* offset;  // (C) bq - zeff * sum_k Wi
  const int32_t* mult;    // (C) M
  const int8_t* shift;    // (C) n in [1, 62]
  int64_t zo, lo, hi;
};

struct Output {  // codes (rows, channels), row-major: a Linear's output, or a convolution's channels-last
  void* data;
  bool is_signed;
  int64_t channels;  // channels of the whole output
};

inline int64_t requantize_one(uint32_t raw, int64_t c, const Epilogue& e) {
  const auto acc = static_cast<int32_t>(raw + static_cast<uint32_t>(static_cast<uint64_t>(e.offset[c])));
  const int n = e.shift[c];
  const int64_t v = ((static_cast<int64_t>(acc) * e.mult[c] + (int64_t{1} << (n - 1))) >> n) + e.zo;
  return std::min(std::max(v, e.lo), e.hi);
}

inline void store(const Output& o, int64_t m, int64_t c, int64_t v) {
  const int64_t i = m * o.channels + c;
  if (o.is_signed) {
    static_cast<int8_t*>(o.data)[i] = static_cast<int8_t>(v);
  } else {
    static_cast<uint8_t*>(o.data)[i] = static_cast<uint8_t>(v);
  }
}

// ---------------------------------------------------------------------------------------------
// Portable C++: the layout read one code at a time.

inline int32_t weight_at(const Weights& w, int64_t c, int64_t k) {
  if (w.wide != nullptr) return w.wide[c * w.nblocks * kBlock + k];
  const int64_t e = k % kBlock;
  const uint8_t* block = w.packed + c * w.row_bytes + (k / kBlock) * 8 * w.bits;
  int64_t byte, shift;
  if (w.bits == 8 || w.bits == 1) {  // natural order, LSB first
    byte = e * w.bits / 8;
    shift = e * w.bits % 8;
  } else {  // 8 / bits slices of (8 * bits) codes; byte j holds code j of every slice
    const int64_t slice = 8 * w.bits;
    byte = e % slice;
    shift = (e / slice) * w.bits;
  }
  const int32_t f = (block[byte] >> shift) & ((1 << w.bits) - 1);
  int32_t q;
  if (w.sign) {
    q = 1 - 2 * f;
  } else if (w.offset_binary) {
    q = f - (1 << (w.bits - 1));
  } else {
    const int32_t s = 1 << (w.bits - 1);
    q = (f ^ s) - s;
  }
  if (w.sub != nullptr) q *= w.sub[c * w.groups + (k / kBlock) / w.blocks_per_group];
  return q;
}

uint32_t dot_portable(const uint8_t* x, const Weights& w, int64_t c) {
  uint32_t acc = 0;
  const int64_t kp = w.nblocks * kBlock;
  if (w.wide != nullptr) {
    const int16_t* row = w.wide + c * kp;
    for (int64_t k = 0; k < kp; ++k) acc += static_cast<uint32_t>(static_cast<int32_t>(x[k]) * row[k]);
    return acc;
  }
  for (int64_t k = 0; k < kp; ++k) acc += static_cast<uint32_t>(static_cast<int32_t>(x[k]) * weight_at(w, c, k));
  return acc;
}

// ---------------------------------------------------------------------------------------------
// AVX-512 VNNI: a block of 64 codes becomes one register of int8 weights; vpdpbusd multiplies the uint8
// inputs by them and adds groups of four products to 16 int32 lanes.

template <int BITS, bool OFFSET>
GRADQ_AVX512 inline __m512i unpack512(const uint8_t* p, bool sign) {
  if constexpr (BITS == 8) {
    return _mm512_loadu_si512(p);
  } else if constexpr (BITS == 1) {
    uint64_t bits;
    std::memcpy(&bits, p, 8);
    (void)sign;
    return _mm512_mask_blend_epi8(bits, _mm512_set1_epi8(1), _mm512_set1_epi8(-1));
  } else {
    __m512i f;
    if constexpr (BITS == 4) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
      const __m256i mask = _mm256_set1_epi8(0x0F);
      const __m256i lo = _mm256_and_si256(v, mask);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
      f = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    } else {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
      const __m128i mask = _mm_set1_epi8(3);
      f = _mm512_castsi128_si512(_mm_and_si128(v, mask));
      f = _mm512_inserti32x4(f, _mm_and_si128(_mm_srli_epi16(v, 2), mask), 1);
      f = _mm512_inserti32x4(f, _mm_and_si128(_mm_srli_epi16(v, 4), mask), 2);
      f = _mm512_inserti32x4(f, _mm_and_si128(_mm_srli_epi16(v, 6), mask), 3);
    }
    if constexpr (OFFSET) return f;  // q + 2^(BITS-1), corrected per row after the dot products
    const __m512i s = _mm512_set1_epi8(1 << (BITS - 1));
    return _mm512_sub_epi8(_mm512_xor_si512(f, s), s);
  }
}

template <int BITS, int MR, int NR, bool GROUPED, bool OFFSET>
GRADQ_AVX512 void tile_avx512(const uint8_t* x, int64_t x_stride, const Weights& w, int64_t c0, uint32_t* raw) {
  __m512i acc[MR][NR], part[MR][NR];
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; ++j) acc[i][j] = part[i][j] = _mm512_setzero_si512();
  }
  const int64_t block_bytes = 8 * BITS;
  for (int64_t b = 0; b < w.nblocks; ++b) {
    if constexpr (MR == 1) {  // a GEMV streams the weights once: fetch rows two channel tiles ahead
      for (int j = 0; j < NR; ++j) {
        _mm_prefetch(reinterpret_cast<const char*>(w.packed + (c0 + 2 * NR + j) * w.row_bytes + b * block_bytes),
                     _MM_HINT_T0);
      }
    }
    __m512i wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = unpack512<BITS, OFFSET>(w.packed + (c0 + j) * w.row_bytes + b * block_bytes, w.sign);
    for (int i = 0; i < MR; ++i) {
      const __m512i xv = _mm512_loadu_si512(x + i * x_stride + b * kBlock);
      for (int j = 0; j < NR; ++j) {
        if constexpr (GROUPED) {
          part[i][j] = _mm512_dpbusd_epi32(part[i][j], xv, wv[j]);
        } else {
          acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], xv, wv[j]);
        }
      }
    }
    if constexpr (GROUPED) {
      if ((b + 1) % w.blocks_per_group == 0) {
        const int64_t g = b / w.blocks_per_group;
        for (int j = 0; j < NR; ++j) {
          const __m512i r = _mm512_set1_epi32(w.sub[(c0 + j) * w.groups + g]);
          for (int i = 0; i < MR; ++i) {
            acc[i][j] = _mm512_add_epi32(acc[i][j], _mm512_mullo_epi32(part[i][j], r));
            part[i][j] = _mm512_setzero_si512();
          }
        }
      }
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; ++j) raw[i * NR + j] = static_cast<uint32_t>(_mm512_reduce_add_epi32(acc[i][j]));
  }
}

// ---------------------------------------------------------------------------------------------
// AVX2: a block is two registers of 32 int8 weights (codes 0-31 and 32-63). Codes of at most 4 bits use
// vpmaddubsw (pairs of uint8 * int8 summed in int16: at most 2 * 255 * 8, no saturation); 8-bit codes are
// widened to int16 and multiplied with vpmaddwd.

GRADQ_AVX2 inline __m256i sign_extend256(__m256i f, int bits) {
  const __m256i s = _mm256_set1_epi8(static_cast<char>(1 << (bits - 1)));
  return _mm256_sub_epi8(_mm256_xor_si256(f, s), s);
}

GRADQ_AVX2 inline __m256i expand_sign_bits(uint32_t bits) {
  const __m256i v = _mm256_set1_epi32(static_cast<int>(bits));
  const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                          2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i select = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ULL));
  const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(v, spread), select), select);
  return _mm256_or_si256(set, _mm256_set1_epi8(1));  // -1 where the bit is 1, else +1
}

template <int BITS, bool OFFSET>
GRADQ_AVX2 inline void unpack256(const uint8_t* p, __m256i* h) {
  if constexpr (BITS == 8) {
    h[0] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    h[1] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32));
  } else if constexpr (BITS == 1) {
    uint64_t bits;
    std::memcpy(&bits, p, 8);
    h[0] = expand_sign_bits(static_cast<uint32_t>(bits));
    h[1] = expand_sign_bits(static_cast<uint32_t>(bits >> 32));
  } else if constexpr (BITS == 4) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i mask = _mm256_set1_epi8(0x0F);
    h[0] = _mm256_and_si256(v, mask);
    h[1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
    if constexpr (!OFFSET) {
      h[0] = sign_extend256(h[0], 4);
      h[1] = sign_extend256(h[1], 4);
    }
  } else {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m128i mask = _mm_set1_epi8(3);
    const __m128i s0 = _mm_and_si128(v, mask), s1 = _mm_and_si128(_mm_srli_epi16(v, 2), mask);
    const __m128i s2 = _mm_and_si128(_mm_srli_epi16(v, 4), mask), s3 = _mm_and_si128(_mm_srli_epi16(v, 6), mask);
    h[0] = _mm256_set_m128i(s1, s0);
    h[1] = _mm256_set_m128i(s3, s2);
    if constexpr (!OFFSET) {
      h[0] = sign_extend256(h[0], 2);
      h[1] = sign_extend256(h[1], 2);
    }
  }
}

template <int BITS>
GRADQ_AVX2 inline __m256i dot32(__m256i acc, const uint8_t* x, __m256i w) {
  const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  if constexpr (BITS <= 4) {
    const __m256i pairs = _mm256_maddubs_epi16(xv, w);
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
  } else {
    const __m256i x0 = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(xv));
    const __m256i x1 = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(xv, 1));
    const __m256i w0 = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(w));
    const __m256i w1 = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(w, 1));
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(x0, w0));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(x1, w1));
  }
}

GRADQ_AVX2 inline uint32_t hsum256(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return static_cast<uint32_t>(_mm_cvtsi128_si32(s));
}

template <int BITS, int MR, int NR, bool GROUPED, bool OFFSET>
GRADQ_AVX2 void tile_avx2(const uint8_t* x, int64_t x_stride, const Weights& w, int64_t c0, uint32_t* raw) {
  __m256i acc[MR][NR], part[MR][NR];
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; ++j) acc[i][j] = part[i][j] = _mm256_setzero_si256();
  }
  const int64_t block_bytes = 8 * BITS;
  for (int64_t b = 0; b < w.nblocks; ++b) {
    __m256i wv[NR][2];
    for (int j = 0; j < NR; ++j) unpack256<BITS, OFFSET>(w.packed + (c0 + j) * w.row_bytes + b * block_bytes, wv[j]);
    for (int i = 0; i < MR; ++i) {
      const uint8_t* xb = x + i * x_stride + b * kBlock;
      for (int j = 0; j < NR; ++j) {
        __m256i& a = GROUPED ? part[i][j] : acc[i][j];
        a = dot32<BITS>(dot32<BITS>(a, xb, wv[j][0]), xb + 32, wv[j][1]);
      }
    }
    if constexpr (GROUPED) {
      if ((b + 1) % w.blocks_per_group == 0) {
        const int64_t g = b / w.blocks_per_group;
        for (int j = 0; j < NR; ++j) {
          const __m256i r = _mm256_set1_epi32(w.sub[(c0 + j) * w.groups + g]);
          for (int i = 0; i < MR; ++i) {
            acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_mullo_epi32(part[i][j], r));
            part[i][j] = _mm256_setzero_si256();
          }
        }
      }
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; ++j) raw[i * NR + j] = hsum256(acc[i][j]);
  }
}

// ---------------------------------------------------------------------------------------------
// Driver: tiles of 4 rows x 4 channels (edges one at a time), the epilogue applied to each tile.

using TileFn = void (*)(const uint8_t*, int64_t, const Weights&, int64_t, uint32_t*);

struct Tiles {
  TileFn t44, t14, t41, t11;
};

template <int BITS, bool GROUPED, bool OFFSET>
Tiles tiles_for(Isa isa) {
  if (isa == kAvx512Vnni) {
    return {tile_avx512<BITS, 4, 4, GROUPED, OFFSET>, tile_avx512<BITS, 1, 4, GROUPED, OFFSET>,
            tile_avx512<BITS, 4, 1, GROUPED, OFFSET>, tile_avx512<BITS, 1, 1, GROUPED, OFFSET>};
  }
  return {tile_avx2<BITS, 4, 4, GROUPED, OFFSET>, tile_avx2<BITS, 1, 4, GROUPED, OFFSET>,
          tile_avx2<BITS, 4, 1, GROUPED, OFFSET>, tile_avx2<BITS, 1, 1, GROUPED, OFFSET>};
}

template <int BITS>
Tiles tiles_for_bits(Isa isa, bool grouped, bool offset) {
  if (grouped) return tiles_for<BITS, true, false>(isa);
  if constexpr (BITS == 2 || BITS == 4) {
    if (offset) return tiles_for<BITS, false, true>(isa);
  }
  return tiles_for<BITS, false, false>(isa);
}

Tiles select_tiles(Isa isa, const Weights& w) {
  const bool grouped = w.sub != nullptr;
  switch (w.bits) {
    case 8: return tiles_for_bits<8>(isa, grouped, false);
    case 4: return tiles_for_bits<4>(isa, grouped, w.offset_binary);
    case 2: return tiles_for_bits<2>(isa, grouped, w.offset_binary);
    default: return tiles_for_bits<1>(isa, grouped, false);
  }
}

Isa resolve_isa(int64_t requested) {
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const Isa best = has_avx512_vnni() ? kAvx512Vnni : (avx2 ? kAvx2 : kPortable);
  if (requested == kAuto) return best;
  TORCH_CHECK(requested >= kPortable && requested <= best, "integer GEMM: instruction set ", requested,
              " is not available on this CPU (best: ", static_cast<int64_t>(best), ")");
  return static_cast<Isa>(requested);
}

// out rows [m0, m1) x channels [c0, c1) of one GEMM; x points at row 0 (row stride x_stride).
void run_block(const uint8_t* x, int64_t x_stride, const Weights& w, const Epilogue& e, const Output& o,
               int64_t channel_base, Isa isa, const Tiles& t, const uint32_t* row_sums, int64_t m0, int64_t m1,
               int64_t c0, int64_t c1) {
  uint32_t raw[16];
  const bool vector = isa != kPortable && w.wide == nullptr;
  // offset-binary weights give sum_k x (q + half): take half * sum_k x off again
  const uint32_t half = vector && w.offset_binary ? (1u << (w.bits - 1)) : 0u;
  for (int64_t c = c0; c < c1;) {
    const int64_t nc = (vector && c + 4 <= c1) ? 4 : 1;
    for (int64_t m = m0; m < m1;) {
      const int64_t nm = (vector && m + 4 <= m1) ? 4 : 1;
      const uint8_t* xr = x + m * x_stride;
      if (!vector) {
        raw[0] = dot_portable(xr, w, c);
      } else if (nm == 4) {
        (nc == 4 ? t.t44 : t.t41)(xr, x_stride, w, c, raw);
      } else {
        (nc == 4 ? t.t14 : t.t11)(xr, x_stride, w, c, raw);
      }
      for (int64_t i = 0; i < nm; ++i) {
        const uint32_t correction = half ? half * row_sums[m + i] : 0u;
        for (int64_t j = 0; j < nc; ++j) {
          store(o, m + i, channel_base + c + j, requantize_one(raw[i * nc + j] - correction, c + j, e));
        }
      }
      m += nm;
    }
    c += nc;
  }
}

// One GEMM of rows (M, kp) by channels [0, C) of w (pointers already at the group's first channel).
void gemm(const uint8_t* x, int64_t rows, int64_t x_stride, const Weights& w, int64_t channels, const Epilogue& e,
          const Output& o, int64_t channel_base, Isa isa) {
  const Tiles t = (isa == kPortable || w.wide != nullptr) ? Tiles{} : select_tiles(isa, w);
  std::vector<uint32_t> row_sums;
  if (w.offset_binary && isa != kPortable) {
    row_sums.resize(rows);
    const int64_t kp = w.nblocks * kBlock;
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) {
        uint32_t sum = 0;
        for (int64_t k = 0; k < kp; ++k) sum += x[m * x_stride + k];
        row_sums[m] = sum;
      }
    });
  }
  const int64_t row_chunks = (rows + kRowChunk - 1) / kRowChunk;
  const int64_t chan_chunks = (channels + kChanChunk - 1) / kChanChunk;
  at::parallel_for(0, row_chunks * chan_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t rc = task % row_chunks, cc = task / row_chunks;
      run_block(x, x_stride, w, e, o, channel_base, isa, t, row_sums.data(), rc * kRowChunk,
                std::min(rows, (rc + 1) * kRowChunk),
                cc * kChanChunk, std::min(channels, (cc + 1) * kChanChunk));
    }
  });
}

struct Layer {
  Weights w;
  int64_t channels;
  Epilogue e;
};

Layer make_layer(const torch::Tensor& packed, const torch::Tensor& wide, int64_t bits, bool sign, bool offset_binary,
                 int64_t kp,
                 const torch::Tensor& sub, int64_t group_size, const torch::Tensor& offset, const torch::Tensor& mult,
                 const torch::Tensor& shift, int64_t zo, int64_t lo, int64_t hi) {
  Layer l{};
  TORCH_CHECK(kp % kBlock == 0 && kp > 0, "integer GEMM: padded K must be a positive multiple of 64");
  l.w.nblocks = kp / kBlock;
  l.w.bits = static_cast<int>(bits);
  l.w.sign = sign;
  l.w.offset_binary = offset_binary;
  if (wide.numel() > 0) {
    l.w.wide = wide.data_ptr<int16_t>();
    l.channels = wide.size(0);
  } else {
    l.w.packed = packed.data_ptr<uint8_t>();
    l.w.row_bytes = packed.size(1);
    l.channels = packed.size(0);
    TORCH_CHECK(l.w.row_bytes == kp * bits / 8, "integer GEMM: packed rows must hold kp * bits / 8 bytes");
  }
  if (sub.numel() > 0) {
    l.w.sub = sub.data_ptr<int32_t>();
    l.w.groups = sub.size(1);
    l.w.blocks_per_group = group_size / kBlock;
  }
  l.e = {offset.data_ptr<int64_t>(), mult.data_ptr<int32_t>(), shift.data_ptr<int8_t>(), zo, lo, hi};
  return l;
}

// Rows of uint8 codes: x (rows, k) copied into (rows, kp), flipped to uint8 for int8 codes.
torch::Tensor padded_rows(const torch::Tensor& x, int64_t kp) {
  const bool flip = x.scalar_type() == torch::kInt8;
  const int64_t rows = x.size(0), k = x.size(1);
  if (!flip && k == kp) return x;
  auto out = torch::zeros({rows, kp}, x.options().dtype(torch::kUInt8));
  const auto* src = static_cast<const uint8_t*>(x.data_ptr());
  uint8_t* dst = out.data_ptr<uint8_t>();
  const uint8_t mask = flip ? 0x80 : 0;
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t i = 0; i < k; ++i) dst[r * kp + i] = src[r * k + i] ^ mask;
    }
  });
  return out;
}

}  // namespace

int64_t integer_gemm_isa() { return resolve_isa(kAuto); }

torch::Tensor integer_linear(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& wide,
                             int64_t bits, bool sign, bool offset_binary, int64_t kp, const torch::Tensor& sub,
                             int64_t group_size,
                             const torch::Tensor& offset, const torch::Tensor& mult, const torch::Tensor& shift,
                             int64_t zo, int64_t lo, int64_t hi, bool out_signed, int64_t isa) {
  const Isa chosen = resolve_isa(isa);
  const Layer l =
      make_layer(packed, wide, bits, sign, offset_binary, kp, sub, group_size, offset, mult, shift, zo, lo, hi);
  const torch::Tensor rows = padded_rows(x, kp);
  auto out = torch::empty({x.size(0), l.channels}, x.options().dtype(out_signed ? torch::kInt8 : torch::kUInt8));
  const Output o{out.data_ptr(), out_signed, l.channels};
  gemm(rows.data_ptr<uint8_t>(), x.size(0), kp, l.w, l.channels, l.e, o, 0, chosen);
  return out;
}

namespace {

// out[0:n] = in[0:n] ^ mask for n <= 64, one masked load and store (masked-off bytes are not touched).
GRADQ_AVX512_BW inline void copy_xor_avx512(uint8_t* out, const uint8_t* in, int64_t n, uint8_t mask) {
  if (n == 16) {  // whole vectors need no mask (masked stores are slow on some cores)
    const __m128i v = _mm_xor_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in)), _mm_set1_epi8(static_cast<char>(mask)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), v);
    return;
  }
  if (n == 32) {
    const __m256i v = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(in)), _mm256_set1_epi8(static_cast<char>(mask)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), v);
    return;
  }
  const __mmask64 keep = n == 64 ? ~__mmask64{0} : ((__mmask64{1} << n) - 1);
  const __m512i v = _mm512_xor_si512(_mm512_maskz_loadu_epi8(keep, in), _mm512_set1_epi8(static_cast<char>(mask)));
  _mm512_mask_storeu_epi8(out, keep, v);
}

}  // namespace

namespace {

// The geometry of one im2col: the input as (N, H, W, C_in) bytes and the output rows' layout.
struct Im2col {
  const uint8_t* hwc;           // (N, H, W, C_in) codes
  torch::Tensor owner;          // the channels-last copy, when the input was not channels-last
  int64_t n, cin, h, wd, kh, kw, cg, oh, ow, groups, width, row_width;
  std::vector<int64_t> stride, padding, dilation;
  uint8_t mask, pad;            // XOR applied to every code; the padding byte (the code of a real 0, masked)
  // One input channel and a small kernel (single_channel_rows): the masked codes with their padding, as
  // (N, H + 2 pad_h, W + 2 pad_w + 8) bytes, so that every patch row is an 8-byte load inside the buffer.
  torch::Tensor padded;
  int64_t padded_h = 0, padded_w = 0;
};

bool has_avx512_vbmi() {
  static const bool ok = has_avx512_bw() && __builtin_cpu_supports("avx512vl") &&
                         __builtin_cpu_supports("avx512vbmi");
  return ok;
}

// Rows of a one-channel image's patches, at most 4 x 8 taps, one byte shuffle each: the patch's kernel rows
// are 8-byte loads at (row i, column ox * stride) of the padded input, placed in one 32-byte register, and
// vpermb picks byte i * 8 + j for column i * kw + j (zeros from column kh * kw on). Writes 16 bytes per row
// of 16, else 32 (single_channel_path: rows of 16 or at least 32 bytes).
GRADQ_AVX512_VBMI void single_channel_rows(const uint8_t* rows, int64_t padded_w, int64_t kh, int64_t kw,
                                           int64_t stride, int64_t ow, int64_t row_width, uint8_t* out) {
  alignas(32) uint8_t index[32] = {};
  for (int64_t t = 0; t < kh * kw; ++t) index[t] = static_cast<uint8_t>((t / kw) * 8 + t % kw);
  const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(index));
  const auto keep = static_cast<__mmask32>(kh * kw == 32 ? 0xFFFFFFFFu : (1u << (kh * kw)) - 1);
  const auto row = [&](int64_t i, int64_t col) {
    return i < kh ? _mm_loadl_epi64(reinterpret_cast<const __m128i*>(rows + i * padded_w + col)) : _mm_setzero_si128();
  };
  for (int64_t ox = 0; ox < ow; ++ox) {
    const int64_t col = ox * stride;
    const __m128i lo = _mm_unpacklo_epi64(row(0, col), row(1, col));
    const __m128i hi = _mm_unpacklo_epi64(row(2, col), row(3, col));
    const __m256i patch = _mm256_maskz_permutexvar_epi8(keep, idx, _mm256_set_m128i(hi, lo));
    if (row_width >= 32) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + ox * row_width), patch);
    } else {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + ox * row_width), _mm256_castsi256_si128(patch));
    }
  }
}

// Whether im2col takes single_channel_rows: one input channel, dilation 1, at most 4 x 8 taps, and rows of
// 16 bytes (at most 16 taps) or at least 32.
bool single_channel_path(const Im2col& g) {
  const bool rows_fit = (g.row_width == 16 && g.kh * g.kw <= 16) || g.row_width >= 32;
  return g.cin == 1 && g.groups == 1 && g.dilation[0] == 1 && g.dilation[1] == 1 && g.kh <= 4 && g.kw <= 8 &&
         rows_fit && has_avx512_vbmi();
}

Im2col plan_im2col(const torch::Tensor& x, const std::vector<int64_t>& kernel, const std::vector<int64_t>& stride,
                   const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation, int64_t groups,
                   int64_t width, int64_t zx, bool minus_128) {
  Im2col g{};
  g.n = x.size(0), g.cin = x.size(1), g.h = x.size(2), g.wd = x.size(3);
  g.kh = kernel[0], g.kw = kernel[1], g.cg = g.cin / groups, g.groups = groups, g.width = width;
  g.oh = (g.h + 2 * padding[0] - dilation[0] * (g.kh - 1) - 1) / stride[0] + 1;
  g.ow = (g.wd + 2 * padding[1] - dilation[1] * (g.kw - 1) - 1) / stride[1] + 1;
  g.row_width = groups * width;
  g.stride = stride, g.padding = padding, g.dilation = dilation;
  // uint8 codes pass as they are, int8 codes are flipped to uint8; minus_128 flips back to int8 bits
  g.mask = static_cast<uint8_t>((x.scalar_type() == torch::kInt8 ? 0x80 : 0) ^ (minus_128 ? 0x80 : 0));
  g.pad = static_cast<uint8_t>(static_cast<uint8_t>(zx) ^ g.mask);
  // The input as (N, H, W, C) bytes, so that a patch row is runs of C_in/groups bytes (channels-last input
  // is read in place).
  const auto* src = static_cast<const uint8_t*>(x.data_ptr());
  const int64_t sn = x.stride(0), sc = x.stride(1), sh = x.stride(2), sw = x.stride(3);
  const int64_t cin = g.cin, h = g.h, wd = g.wd;
  g.hwc = src;
  if (!((sc == 1 || cin == 1) && sw == cin && sh == wd * cin && sn == h * wd * cin)) {
    g.owner = torch::empty({g.n, h, wd, cin}, x.options().dtype(torch::kUInt8));
    uint8_t* buf = g.owner.data_ptr<uint8_t>();
    at::parallel_for(0, g.n * h, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const uint8_t* in = src + (r / h) * sn + (r % h) * sh;
        uint8_t* out = buf + r * wd * cin;
        for (int64_t c = 0; c < cin; ++c) {
          for (int64_t xx = 0; xx < wd; ++xx) out[xx * cin + c] = in[c * sc + xx * sw];
        }
      }
    });
    g.hwc = buf;
  }
  if (single_channel_path(g)) {
    g.padded_h = h + 2 * padding[0], g.padded_w = wd + 2 * padding[1] + 8;
    g.padded = torch::full({g.n, g.padded_h, g.padded_w}, static_cast<int64_t>(g.pad), x.options().dtype(torch::kUInt8));
    uint8_t* dst = g.padded.data_ptr<uint8_t>();
    for (int64_t r = 0; r < g.n * h; ++r) {
      const uint8_t* in = g.hwc + r * wd;
      uint8_t* out = dst + ((r / h) * g.padded_h + r % h + padding[0]) * g.padded_w + padding[1];
      for (int64_t xx = 0; xx < wd; ++xx) out[xx] = in[xx] ^ g.mask;
    }
  }
  return g;
}

// Rows of output rows (sample, oy) in [task0, task1) (each ow rows of row_width bytes) written from dst on;
// the columns past each group's kh * kw * cg are left as they are (the caller zeroes them once).
void im2col_tasks(const Im2col& g, int64_t task0, int64_t task1, uint8_t* dst) {
  if (g.padded.defined()) {
    const uint8_t* src = g.padded.data_ptr<uint8_t>();
    at::parallel_for(task0, task1, 4, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t s = task / g.oh, oy = task % g.oh;
        single_channel_rows(src + (s * g.padded_h + oy * g.stride[0]) * g.padded_w, g.padded_w, g.kh, g.kw,
                            g.stride[1], g.ow, g.row_width, dst + (task - task0) * g.ow * g.row_width);
      }
    });
    return;
  }
  const bool wide_copy = has_avx512_bw();
  const int64_t ow = g.ow, row_width = g.row_width, cg = g.cg, cin = g.cin, wd = g.wd, h = g.h;
  const uint8_t mask = g.mask, pad = g.pad;
  // One task per output row (sample, oy): each tap (i, j) copies C_in/groups bytes for every ox, padding
  // outside the valid range [lo, hi) of ox.
  at::parallel_for(task0, task1, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t s = task / g.oh, oy = task % g.oh;
      uint8_t* block = dst + (task - task0) * ow * row_width;  // rows (s, oy, 0..ow-1)
      for (int64_t gr = 0; gr < g.groups; ++gr) {
        for (int64_t i = 0; i < g.kh; ++i) {
          const int64_t y = oy * g.stride[0] - g.padding[0] + i * g.dilation[0];
          const bool row_inside = y >= 0 && y < h;
          for (int64_t j = 0; j < g.kw; ++j) {
            const int64_t first = j * g.dilation[1] - g.padding[1];  // input column of ox = 0
            const int64_t st = g.stride[1];
            const int64_t lo = row_inside ? std::min(ow, first >= 0 ? 0 : (-first + st - 1) / st) : ow;
            const int64_t hi = row_inside ? std::max(lo, std::min(ow, first >= wd ? 0 : (wd - 1 - first) / st + 1)) : ow;
            uint8_t* out = block + gr * g.width + (i * g.kw + j) * cg;
            const uint8_t* in = g.hwc + (s * h + std::max<int64_t>(y, 0)) * wd * cin + gr * cg + first * cin;
            const int64_t step = st * cin;
            for (int64_t ox = 0; ox < lo; ++ox) std::memset(out + ox * row_width, pad, cg);
            if (cg == 1) {
              for (int64_t ox = lo; ox < hi; ++ox) out[ox * row_width] = in[ox * step] ^ mask;
            } else if (wide_copy && cg <= 64) {
              for (int64_t ox = lo; ox < hi; ++ox) copy_xor_avx512(out + ox * row_width, in + ox * step, cg, mask);
            } else {
              for (int64_t ox = lo; ox < hi; ++ox) {
                for (int64_t c = 0; c < cg; ++c) out[ox * row_width + c] = in[ox * step + c] ^ mask;
              }
            }
            for (int64_t ox = hi; ox < ow; ++ox) std::memset(out + ox * row_width, pad, cg);
          }
        }
      }
    }
  });
}

}  // namespace

torch::Tensor im2col_codes(const torch::Tensor& x, std::vector<int64_t> kernel, std::vector<int64_t> stride,
                           std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups, int64_t width,
                           int64_t zx, bool minus_128) {
  const Im2col g = plan_im2col(x, kernel, stride, padding, dilation, groups, width, zx, minus_128);
  const int64_t rows = g.n * g.oh * g.ow;
  const bool filled = g.kh * g.kw * g.cg == width;  // else zero columns after each group's K
  auto cols = filled ? torch::empty({rows, g.row_width}, x.options().dtype(torch::kUInt8))
                     : torch::zeros({rows, g.row_width}, x.options().dtype(torch::kUInt8));
  im2col_tasks(g, 0, g.n * g.oh, cols.data_ptr<uint8_t>());
  return cols;
}

torch::Tensor integer_conv2d(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& wide,
                             int64_t bits, bool sign, bool offset_binary, int64_t kp, const torch::Tensor& sub,
                             int64_t group_size,
                             const torch::Tensor& offset, const torch::Tensor& mult, const torch::Tensor& shift,
                             int64_t zo, int64_t lo, int64_t hi, bool out_signed, int64_t isa,
                             std::vector<int64_t> kernel, std::vector<int64_t> stride, std::vector<int64_t> padding,
                             std::vector<int64_t> dilation, int64_t groups, int64_t zx) {
  const Isa chosen = resolve_isa(isa);
  const Layer l =
      make_layer(packed, wide, bits, sign, offset_binary, kp, sub, group_size, offset, mult, shift, zo, lo, hi);
  const torch::Tensor cols = im2col_codes(x, kernel, stride, padding, dilation, groups, kp, zx, false);
  const int64_t n = x.size(0), rows = cols.size(0), positions = rows / n, width = groups * kp;
  const int64_t oh = (x.size(2) + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) / stride[0] + 1;
  const int64_t cout = l.channels, cpg = cout / groups;
  auto out = torch::empty({n, oh, positions / oh, cout}, x.options().dtype(out_signed ? torch::kInt8 : torch::kUInt8));
  const Output o{out.data_ptr(), out_signed, cout};  // rows x channels: channels last
  const uint8_t* dst = cols.data_ptr<uint8_t>();
  for (int64_t g = 0; g < groups; ++g) {
    Weights wg = l.w;
    if (wg.wide != nullptr) wg.wide += g * cpg * kp;
    if (wg.packed != nullptr) wg.packed += g * cpg * wg.row_bytes;
    if (wg.sub != nullptr) wg.sub += g * cpg * wg.groups;
    Epilogue eg = l.e;
    eg.offset += g * cpg;
    eg.mult += g * cpg;
    eg.shift += g * cpg;
    gemm(dst + g * kp, rows, width, wg, cpg, eg, o, g * cpg, chosen);
  }
  return out.permute({0, 3, 1, 2});
}

namespace {

// The epilogue of rows of C int32 accumulators into rows of C codes, 16 channels at a time: the even and
// the odd channels of a 16-lane int32 vector each take 8 int64 lanes (vpmuldq multiplies the low halves),
// so round and shift are laid out per 16 channels as [the 8 even channels, the 8 odd ones].
struct VectorEpilogue {
  std::vector<int32_t> offset, mult;         // offset mod 2^32; M
  std::vector<int64_t> round, shift;         // 2^(n-1), n: even/odd order within each 16 channels
};

VectorEpilogue vector_epilogue(const Epilogue& e, int64_t channels) {
  const int64_t padded = (channels + 15) / 16 * 16;
  VectorEpilogue v{std::vector<int32_t>(padded), std::vector<int32_t>(padded), std::vector<int64_t>(padded, 1),
                   std::vector<int64_t>(padded, 1)};
  for (int64_t c = 0; c < channels; ++c) {
    v.offset[c] = static_cast<int32_t>(static_cast<uint32_t>(static_cast<uint64_t>(e.offset[c])));
    v.mult[c] = e.mult[c];
    const int64_t at = c / 16 * 16 + (c % 2) * 8 + (c % 16) / 2;
    v.shift[at] = e.shift[c];
    v.round[at] = int64_t{1} << (e.shift[c] - 1);
  }
  return v;
}

// clamp(((product + round) >> shift) + zo, lo, hi) in 8 int64 lanes (a function, not a lambda: a lambda
// does not inherit its enclosing function's target attribute).
GRADQ_AVX512_DQ inline __m512i requantize_lanes(__m512i product, const int64_t* round, const int64_t* shift,
                                                __m512i zo, __m512i lo, __m512i hi) {
  const __m512i x = _mm512_srav_epi64(_mm512_add_epi64(product, _mm512_loadu_si512(round)), _mm512_loadu_si512(shift));
  return _mm512_min_epi64(_mm512_max_epi64(_mm512_add_epi64(x, zo), lo), hi);
}

// The codes of channels [c, c + 16) from their 16 int32 accumulators (without the offset).
GRADQ_AVX512_DQ inline __m128i requantize16(__m512i acc, const VectorEpilogue& v, int64_t c, __m512i zo, __m512i lo,
                                            __m512i hi) {
  const __m512i sum = _mm512_add_epi32(acc, _mm512_loadu_si512(v.offset.data() + c));
  const __m512i m = _mm512_loadu_si512(v.mult.data() + c);
  // both factors fit int32: the signed 32 x 32 -> 64-bit products of the even and of the odd channels
  const __m512i even = requantize_lanes(_mm512_mul_epi32(sum, m), v.round.data() + c, v.shift.data() + c, zo, lo, hi);
  const __m512i odd = requantize_lanes(_mm512_mul_epi32(_mm512_srli_epi64(sum, 32), _mm512_srli_epi64(m, 32)),
                                       v.round.data() + c + 8, v.shift.data() + c + 8, zo, lo, hi);
  // the codes (in [lo, hi]) back in channel order as 16 int32 lanes, then their low bytes
  const __m512i codes = _mm512_or_si512(_mm512_and_si512(even, _mm512_set1_epi64(0xFFFFFFFF)), _mm512_slli_epi64(odd, 32));
  return _mm512_cvtepi32_epi8(codes);
}

GRADQ_AVX512_DQ void requantize_row_avx512(const int32_t* acc, int64_t channels, const VectorEpilogue& v,
                                           const Epilogue& e, uint8_t* out) {
  const __m512i zo = _mm512_set1_epi64(e.zo), lo = _mm512_set1_epi64(e.lo), hi = _mm512_set1_epi64(e.hi);
  for (int64_t c = 0; c < channels; c += 16) {
    const int64_t left = std::min<int64_t>(16, channels - c);
    const __mmask16 mask = static_cast<__mmask16>((1u << left) - 1);
    store_bytes16(out + c, requantize16(_mm512_maskz_loadu_epi32(mask, acc + c), v, c, zo, lo, hi), left);
  }
}

}  // namespace

namespace {

// Codes (rows, channels) at out of int32 accumulators (rows, channels) at a plus the offset.
void requantize_rows(const int32_t* a, int64_t rows, int64_t channels, const Epilogue& e, bool out_signed, void* out) {
  const Output o{out, out_signed, channels};
  if (has_avx512_dq()) {
    const VectorEpilogue v = vector_epilogue(e, channels);
    auto* dst = static_cast<uint8_t*>(out);
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) requantize_row_avx512(a + m * channels, channels, v, e, dst + m * channels);
    });
    return;
  }
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      for (int64_t c = 0; c < channels; ++c) {
        store(o, m, c, requantize_one(static_cast<uint32_t>(a[m * channels + c]), c, e));
      }
    }
  });
}

}  // namespace

torch::Tensor requantize_int32(const torch::Tensor& acc, const torch::Tensor& offset, const torch::Tensor& mult,
                               const torch::Tensor& shift, int64_t zo, int64_t lo, int64_t hi, bool out_signed) {
  const int64_t rows = acc.size(0), channels = acc.size(1);
  auto out = torch::empty({rows, channels}, acc.options().dtype(out_signed ? torch::kInt8 : torch::kUInt8));
  const Epilogue e{offset.data_ptr<int64_t>(), mult.data_ptr<int32_t>(), shift.data_ptr<int8_t>(), zo, lo, hi};
  requantize_rows(acc.data_ptr<int32_t>(), rows, channels, e, out_signed, out.data_ptr());
  return out;
}

torch::Tensor conv2d_int_mm(const torch::Tensor& x, const torch::Tensor& w8, const torch::Tensor& offset,
                            const torch::Tensor& mult, const torch::Tensor& shift, int64_t zo, int64_t lo, int64_t hi,
                            bool out_signed, std::vector<int64_t> kernel, std::vector<int64_t> stride,
                            std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t zx,
                            int64_t tile_bytes) {
  const int64_t width = w8.size(0), channels = w8.size(1);
  const Im2col g = plan_im2col(x, kernel, stride, padding, dilation, 1, width, zx, true);
  const int64_t tasks = g.n * g.oh;
  // whole output rows per tile, about tile_bytes of im2col rows and int32 products (at least one output row)
  const int64_t row_bytes = width + 4 * channels;
  TORCH_CHECK(g.oh > 0 && g.ow > 0, "integer conv2d: the padded input (", g.h + 2 * padding[0], " x ", g.wd + 2 * padding[1],
              ") is smaller than the dilated kernel; no output position")
  const int64_t per_tile = std::max<int64_t>(1, std::min(tasks, tile_bytes / (g.ow * row_bytes)));
  const auto options = x.options();
  auto cols = torch::zeros({per_tile * g.ow, width}, options.dtype(torch::kInt8));  // zero columns past K stay 0
  auto acc = torch::empty({per_tile * g.ow, channels}, options.dtype(torch::kInt32));
  auto out = torch::empty({g.n, g.oh, g.ow, channels}, options.dtype(out_signed ? torch::kInt8 : torch::kUInt8));
  const Epilogue e{offset.data_ptr<int64_t>(), mult.data_ptr<int32_t>(), shift.data_ptr<int8_t>(), zo, lo, hi};
  auto* dst = static_cast<uint8_t*>(out.data_ptr());
  for (int64_t t0 = 0; t0 < tasks; t0 += per_tile) {
    const int64_t t1 = std::min(tasks, t0 + per_tile), rows = (t1 - t0) * g.ow;
    im2col_tasks(g, t0, t1, static_cast<uint8_t*>(cols.data_ptr()));
    auto part = acc.narrow(0, 0, rows);
    at::_int_mm_out(part, cols.narrow(0, 0, rows), w8);
    requantize_rows(part.data_ptr<int32_t>(), rows, channels, e, out_signed, dst + t0 * g.ow * channels);
  }
  return out.permute({0, 3, 1, 2});
}

namespace {

// Direct convolution (groups 1) with AVX-512 VNNI, no im2col. The input becomes
// uint8 codes (int8 codes plus 128), channels last, padded with the code of a real 0. The patch of an
// output position is S segments of L contiguous input bytes: with dilation 1 along W, a kernel row's
// kw * C_in codes (S = kh), else one tap's C_in (S = kh * kw). Each vpdpbusd broadcasts 4 bytes of a segment
// and multiplies them by a 64-byte row of weights (4 inputs x 16 output channels); the weights are zero
// past L, so the up to 3 bytes read past a segment do not count. R output positions by NB blocks of 16
// output channels accumulate in registers over the whole patch; the epilogue then requantizes them and
// stores 16 codes per block.

struct DirectConv {
  const uint8_t* padded;         // (N, Hp, Wp, C_in) uint8, then 4 spare bytes
  const int8_t* weights;         // (S, G4, C16, 4) int8, G4 = ceil(L / 4), C16 = C_out rounded up to 16
  const int64_t* segment;        // (S) bytes from a position's first input byte to each segment
  int64_t segments, groups4, channels, out_channels, hp, wp, cin, oh, ow, stride_h, stride_w;
};

inline int32_t load_u32(const uint8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// Output positions [m, m + R) (flattened over N, OH, OW; positions past `last` repeat `last`, computed but
// not stored) by channel blocks [b0, b0 + NB), into out (positions, C_out).
template <int NB, int R>
GRADQ_DIRECT void direct_block(const DirectConv& d, int64_t m, int64_t last, int64_t b0, const VectorEpilogue& v,
                               const Epilogue& e, uint8_t* out) {
  const uint8_t* at[R];
  int64_t ox = m % d.ow, oy = (m / d.ow) % d.oh, s = m / (d.ow * d.oh);  // position m, then step by one
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    at[r] = d.padded + ((s * d.hp + oy * d.stride_h) * d.wp + ox * d.stride_w) * d.cin;
    if (m + r < last && ++ox == d.ow) {
      ox = 0;
      if (++oy == d.oh) oy = 0, ++s;
    }
  }
  __m512i acc[R][NB];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_setzero_si512();
  }
  const int64_t row = d.channels * 4;  // bytes of weights per 4 inputs
  for (int64_t t = 0; t < d.segments; ++t) {
    const int64_t off = d.segment[t];
    const int8_t* w = d.weights + t * d.groups4 * row + b0 * 64;
    for (int64_t g = 0; g < d.groups4; ++g, w += row) {
      __m512i wr[NB];
#pragma GCC unroll 4
      for (int b = 0; b < NB; ++b) wr[b] = _mm512_loadu_si512(w + b * 64);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const __m512i x = _mm512_set1_epi32(load_u32(at[r] + off + g * 4));
#pragma GCC unroll 4
        for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_dpbusd_epi32(acc[r][b], x, wr[b]);
      }
    }
  }
  const __m512i zo = _mm512_set1_epi64(e.zo), lo = _mm512_set1_epi64(e.lo), hi = _mm512_set1_epi64(e.hi);
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {  // a constant trip count: acc stays in registers
    if (m + r > last) break;
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) {
      const int64_t c = (b0 + b) * 16;  // the last block of C_out not a multiple of 16: a masked store
      store_bytes16(out + (m + r) * d.out_channels + c, requantize16(acc[r][b], v, c, zo, lo, hi),
                    std::min<int64_t>(16, d.out_channels - c));
    }
  }
}

// Output positions per register block for NB = 1..4 blocks of 16 channels: R x NB accumulators (8 or 24)
// plus NB weight registers and a broadcast fit the 32 vector registers.
constexpr int kDirectPositions[5] = {0, 8, 12, 8, 6};

// x (N, C_in, H, W) codes in any strides -> (N, H + 2 ph, W + 2 pw, C_in) uint8 codes (int8 codes XOR 0x80)
// padded with the code zx of a real 0, at dst (then 4 spare bytes, zero).
void pad_channels_last(const torch::Tensor& x, int64_t ph, int64_t pw, int64_t zx, uint8_t* dst) {
  const int64_t n = x.size(0), cin = x.size(1), h = x.size(2), wd = x.size(3), hp = h + 2 * ph, wp = wd + 2 * pw;
  const uint8_t mask = x.scalar_type() == torch::kInt8 ? 0x80 : 0;
  const auto pad = static_cast<uint8_t>(static_cast<uint8_t>(zx) ^ mask);
  const auto* src = static_cast<const uint8_t*>(x.data_ptr());
  const int64_t sn = x.stride(0), sc = x.stride(1), sh = x.stride(2), sw = x.stride(3);
  const bool dense_rows = (sc == 1 || cin == 1) && sw == cin;  // a row's W x C_in codes lie contiguous
  at::parallel_for(0, n * hp, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t s = r / hp, y = r % hp - ph;
      uint8_t* out = dst + r * wp * cin;
      if (y < 0 || y >= h) {
        std::memset(out, pad, wp * cin);
        continue;
      }
      std::memset(out, pad, pw * cin);
      std::memset(out + (pw + wd) * cin, pad, pw * cin);
      const uint8_t* in = src + s * sn + y * sh;
      uint8_t* o = out + pw * cin;
      if (dense_rows) {
        for (int64_t i = 0; i < wd * cin; ++i) o[i] = in[i] ^ mask;
      } else {
        for (int64_t xx = 0; xx < wd; ++xx) {
          for (int64_t c = 0; c < cin; ++c) o[xx * cin + c] = in[xx * sw + c * sc] ^ mask;
        }
      }
    }
  });
  std::memset(dst + n * hp * wp * cin, 0, 4);
}

}  // namespace

bool conv2d_direct_available() { return has_avx512_vnni_dq(); }

torch::Tensor conv2d_direct(const torch::Tensor& x, const torch::Tensor& weights, const torch::Tensor& offset,
                            const torch::Tensor& mult, const torch::Tensor& shift, int64_t zo, int64_t lo, int64_t hi,
                            bool out_signed, std::vector<int64_t> kernel, std::vector<int64_t> stride,
                            std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t zx) {
  TORCH_CHECK(has_avx512_vnni_dq(), "integer conv2d: the direct kernel needs AVX-512 VNNI and DQ; use engine='int_mm'")
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4 && (x.scalar_type() == torch::kUInt8 || x.scalar_type() == torch::kInt8),
              "integer conv2d: the direct kernel takes (N, C_in, H, W) uint8/int8 codes on the CPU, got ", x.scalar_type(),
              " of shape ", x.sizes(), " on ", x.device())
  const int64_t n = x.size(0), cin = x.size(1), h = x.size(2), wd = x.size(3);
  const bool rows = dilation[1] == 1;  // a kernel row's taps are contiguous in the padded input
  const int64_t segments = rows ? kernel[0] : kernel[0] * kernel[1], length = rows ? kernel[1] * cin : cin;
  const int64_t groups4 = (length + 3) / 4, channels = weights.size(2);
  const int64_t out_channels = offset.numel();
  TORCH_CHECK(weights.is_contiguous() && mult.numel() == out_channels && shift.numel() == out_channels &&
              (out_channels + 15) / 16 * 16 == channels, "integer conv2d: direct weights must be contiguous, with one "
              "offset, multiplier and shift per output channel and the channels rounded up to 16")
  TORCH_CHECK(weights.dim() == 4 && weights.size(0) == segments && weights.size(1) == groups4 && weights.size(3) == 4,
              "integer conv2d: direct weights of shape ", weights.sizes(), " do not fit a ",
              kernel[0], "x", kernel[1], " kernel over ", cin, " input channels (want (", segments, ", ", groups4,
              ", C16, 4))")
  const int64_t hp = h + 2 * padding[0], wp = wd + 2 * padding[1];
  TORCH_CHECK(hp >= dilation[0] * (kernel[0] - 1) + 1 && wp >= dilation[1] * (kernel[1] - 1) + 1,
              "integer conv2d: the padded input (", hp, " x ", wp, ") is smaller than the dilated kernel; no output position")
  const int64_t oh = (hp - dilation[0] * (kernel[0] - 1) - 1) / stride[0] + 1;
  const int64_t ow = (wp - dilation[1] * (kernel[1] - 1) - 1) / stride[1] + 1;
  auto padded = torch::empty({n * hp * wp * cin + 4}, x.options().dtype(torch::kUInt8));
  pad_channels_last(x, padding[0], padding[1], zx, padded.data_ptr<uint8_t>());
  std::vector<int64_t> segment(segments);
  for (int64_t t = 0; t < segments; ++t) {
    const int64_t i = rows ? t : t / kernel[1], j = rows ? 0 : t % kernel[1];
    segment[t] = (i * dilation[0] * wp + j * dilation[1]) * cin;
  }
  const DirectConv d{padded.data_ptr<uint8_t>(), weights.data_ptr<int8_t>(), segment.data(), segments, groups4,
                     channels, out_channels, hp, wp, cin, oh, ow, stride[0], stride[1]};
  const Epilogue e{offset.data_ptr<int64_t>(), mult.data_ptr<int32_t>(), shift.data_ptr<int8_t>(), zo, lo, hi};
  const VectorEpilogue v = vector_epilogue(e, out_channels);
  auto out = torch::empty({n, oh, ow, out_channels}, x.options().dtype(out_signed ? torch::kInt8 : torch::kUInt8));
  auto* o = static_cast<uint8_t*>(out.data_ptr());
  const int64_t positions = n * oh * ow, last = positions - 1, blocks16 = channels / 16;
  for (int64_t b0 = 0; b0 < blocks16; b0 += 4) {
    const int64_t nb = std::min<int64_t>(4, blocks16 - b0);
    const int64_t r = kDirectPositions[nb];
    at::parallel_for(0, (positions + r - 1) / r, 8, [&](int64_t begin, int64_t end) {
      for (int64_t blk = begin; blk < end; ++blk) {
        switch (nb) {
          case 1: direct_block<1, kDirectPositions[1]>(d, blk * r, last, b0, v, e, o); break;
          case 2: direct_block<2, kDirectPositions[2]>(d, blk * r, last, b0, v, e, o); break;
          case 3: direct_block<3, kDirectPositions[3]>(d, blk * r, last, b0, v, e, o); break;
          default: direct_block<4, kDirectPositions[4]>(d, blk * r, last, b0, v, e, o); break;
        }
      }
    });
  }
  return out.permute({0, 3, 1, 2});
}

#pragma GCC diagnostic pop
