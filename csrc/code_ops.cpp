// Integer operations on code tensors of the integer model, besides the layers (docs/integer.md section 5):
// max and average pooling, the residual add, the input quantization and the output dequantization. Each
// has a pure-PyTorch reference in gradq/_integer_reference.py that it equals bit for bit (tests/
// test_integer_kernels.py); AVX-512 paths are chosen at run time.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "code_ops.h"
#include "simd.h"

using gradq_simd::has_avx512_bw;
using gradq_simd::has_avx512_dq;
using gradq_simd::store_bytes16;

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace {

// Max pooling of one (H, W) plane of codes; padding never wins (it is -infinity).
template <typename T>
void max_pool_plane(const T* in, T* out, int64_t h, int64_t w, int64_t oh, int64_t ow, const std::vector<int64_t>& k,
                    const std::vector<int64_t>& s, const std::vector<int64_t>& p, T* rowmax) {
  for (int64_t oy = 0; oy < oh; ++oy) {
    const int64_t y0 = std::max<int64_t>(oy * s[0] - p[0], 0), y1 = std::min(oy * s[0] - p[0] + k[0], h);
    std::copy(in + y0 * w, in + (y0 + 1) * w, rowmax);
    for (int64_t y = y0 + 1; y < y1; ++y) {
      const T* row = in + y * w;
      for (int64_t x = 0; x < w; ++x) rowmax[x] = std::max(rowmax[x], row[x]);
    }
    for (int64_t ox = 0; ox < ow; ++ox) {
      const int64_t x0 = std::max<int64_t>(ox * s[1] - p[1], 0), x1 = std::min(ox * s[1] - p[1] + k[1], w);
      T m = rowmax[x0];
      for (int64_t x = x0 + 1; x < x1; ++x) m = std::max(m, rowmax[x]);
      out[oy * ow + ox] = m;
    }
  }
}

template <typename T>
void max_pool_codes(const torch::Tensor& x, torch::Tensor& out, const std::vector<int64_t>& k,
                    const std::vector<int64_t>& s, const std::vector<int64_t>& p) {
  const int64_t planes = x.size(0) * x.size(1), h = x.size(2), w = x.size(3), oh = out.size(2), ow = out.size(3);
  const T* src = static_cast<const T*>(x.data_ptr());
  T* dst = static_cast<T*>(out.data_ptr());
  at::parallel_for(0, planes, 8, [&](int64_t begin, int64_t end) {
    std::vector<T> rowmax(w);
    for (int64_t i = begin; i < end; ++i) {
      max_pool_plane(src + i * h * w, dst + i * oh * ow, h, w, oh, ow, k, s, p, rowmax.data());
    }
  });
}

}  // namespace

namespace {

// The channels of one output position: max over the window's rows [y0, y1) and columns [x0, x1) of the
// channels-last codes of one sample at `in`, 64 channels at a time (masked loads: no byte outside is read).
template <bool SIGNED>
GRADQ_AVX512_BW void max_pool_position_avx512(const uint8_t* in, int64_t w, int64_t c, int64_t y0, int64_t y1,
                                              int64_t x0, int64_t x1, uint8_t* o) {
  for (int64_t ch = 0; ch < c; ch += 64) {
    const __mmask64 mask = c - ch >= 64 ? ~__mmask64{0} : ((__mmask64{1} << (c - ch)) - 1);
    __m512i m = _mm512_maskz_loadu_epi8(mask, in + (y0 * w + x0) * c + ch);
    for (int64_t y = y0; y < y1; ++y) {
      for (int64_t xx = x0; xx < x1; ++xx) {
        const __m512i v = _mm512_maskz_loadu_epi8(mask, in + (y * w + xx) * c + ch);
        m = SIGNED ? _mm512_max_epi8(m, v) : _mm512_max_epu8(m, v);
      }
    }
    if (c - ch >= 64) {
      _mm512_storeu_si512(o + ch, m);  // masked stores are slow on some cores
    } else {
      _mm512_mask_storeu_epi8(o + ch, mask, m);
    }
  }
}

// Max pooling of channels-last codes: each output position is the element-wise max of C-byte rows.
template <typename T>
void max_pool_channels_last(const T* in, T* out, int64_t n, int64_t h, int64_t w, int64_t c, int64_t oh, int64_t ow,
                            const std::vector<int64_t>& k, const std::vector<int64_t>& s,
                            const std::vector<int64_t>& p) {
  const bool vector = has_avx512_bw();
  at::parallel_for(0, n * oh, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / oh, oy = r % oh;
      const int64_t y0 = std::max<int64_t>(oy * s[0] - p[0], 0), y1 = std::min(oy * s[0] - p[0] + k[0], h);
      for (int64_t ox = 0; ox < ow; ++ox) {
        const int64_t x0 = std::max<int64_t>(ox * s[1] - p[1], 0), x1 = std::min(ox * s[1] - p[1] + k[1], w);
        T* o = out + ((b * oh + oy) * ow + ox) * c;
        if (vector) {
          max_pool_position_avx512<std::is_signed_v<T>>(reinterpret_cast<const uint8_t*>(in + b * h * w * c), w, c,
                                                         y0, y1, x0, x1, reinterpret_cast<uint8_t*>(o));
          continue;
        }
        std::copy(in + ((b * h + y0) * w + x0) * c, in + ((b * h + y0) * w + x0 + 1) * c, o);
        for (int64_t y = y0; y < y1; ++y) {
          for (int64_t xx = (y == y0 ? x0 + 1 : x0); xx < x1; ++xx) {
            const T* v = in + ((b * h + y) * w + xx) * c;
            for (int64_t i = 0; i < c; ++i) o[i] = std::max(o[i], v[i]);
          }
        }
      }
    }
  });
}

}  // namespace

torch::Tensor max_pool2d_codes(const torch::Tensor& x, std::vector<int64_t> kernel, std::vector<int64_t> stride,
                               std::vector<int64_t> padding) {
  const int64_t oh = (x.size(2) + 2 * padding[0] - kernel[0]) / stride[0] + 1;
  const int64_t ow = (x.size(3) + 2 * padding[1] - kernel[1]) / stride[1] + 1;
  if (!x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    auto out = torch::empty({x.size(0), oh, ow, x.size(1)}, x.options());
    if (x.scalar_type() == torch::kInt8) {
      max_pool_channels_last(static_cast<const int8_t*>(x.data_ptr()), static_cast<int8_t*>(out.data_ptr()),
                             x.size(0), x.size(2), x.size(3), x.size(1), oh, ow, kernel, stride, padding);
    } else {
      max_pool_channels_last(static_cast<const uint8_t*>(x.data_ptr()), static_cast<uint8_t*>(out.data_ptr()),
                             x.size(0), x.size(2), x.size(3), x.size(1), oh, ow, kernel, stride, padding);
    }
    return out.permute({0, 3, 1, 2});
  }
  auto out = torch::empty({x.size(0), x.size(1), oh, ow}, x.options());
  if (x.scalar_type() == torch::kInt8) {
    max_pool_codes<int8_t>(x, out, kernel, stride, padding);
  } else {
    max_pool_codes<uint8_t>(x, out, kernel, stride, padding);
  }
  return out;
}

#pragma GCC diagnostic pop

namespace {

// 8 codes at p as int64 lanes (a function, not a lambda, for the target attribute).
GRADQ_AVX512_DQ inline __m512i widen8(const uint8_t* p, bool is_signed) {
  const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return is_signed ? _mm512_cvtepi8_epi64(v) : _mm512_cvtepu8_epi64(v);
}

// add_codes on codes [0, count) - count % 8, 8 at a time in int64 lanes; the products by vpmuldq, exact
// because q - z and both multipliers fit int32 (the caller checks). Returns how many codes it wrote.
template <bool A_SIGNED, bool B_SIGNED>
GRADQ_AVX512_DQ int64_t add_codes_avx512(const uint8_t* pa, const uint8_t* pb, uint8_t* po, int64_t count, int64_t za,
                                         int64_t zb, int64_t ma, int64_t mb, int64_t n, int64_t zo, int64_t lo,
                                         int64_t hi) {
  const __m512i vza = _mm512_set1_epi64(za), vzb = _mm512_set1_epi64(zb), vma = _mm512_set1_epi64(ma);
  const __m512i vmb = _mm512_set1_epi64(mb), round = _mm512_set1_epi64(int64_t{1} << (n - 1));
  const __m512i shift = _mm512_set1_epi64(n), vzo = _mm512_set1_epi64(zo), vlo = _mm512_set1_epi64(lo);
  const __m512i vhi = _mm512_set1_epi64(hi);
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const __m512i da = _mm512_sub_epi64(widen8(pa + i, A_SIGNED), vza);
    const __m512i db = _mm512_sub_epi64(widen8(pb + i, B_SIGNED), vzb);
    __m512i v = _mm512_add_epi64(_mm512_add_epi64(_mm512_mul_epi32(da, vma), _mm512_mul_epi32(db, vmb)), round);
    v = _mm512_add_epi64(_mm512_srav_epi64(v, shift), vzo);
    v = _mm512_min_epi64(_mm512_max_epi64(v, vlo), vhi);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(po + i), _mm512_cvtepi64_epi8(v));
  }
  return i;
}

}  // namespace

torch::Tensor add_codes(const torch::Tensor& a, const torch::Tensor& b, int64_t za, int64_t zb, int64_t ma,
                        int64_t mb, int64_t n, int64_t zo, int64_t lo, int64_t hi, bool out_signed) {
  auto out = torch::empty_like(a, a.options().dtype(out_signed ? torch::kInt8 : torch::kUInt8));
  const int64_t count = a.numel();
  const bool a_signed = a.scalar_type() == torch::kInt8, b_signed = b.scalar_type() == torch::kInt8;
  const auto* pa = static_cast<const uint8_t*>(a.data_ptr());
  const auto* pb = static_cast<const uint8_t*>(b.data_ptr());
  auto* po = static_cast<uint8_t*>(out.data_ptr());
  const int64_t round = int64_t{1} << (n - 1);
  const auto fits32 = [](int64_t v) { return v >= INT32_MIN && v <= INT32_MAX; };
  const bool vector = has_avx512_dq() && fits32(ma) && fits32(mb) && fits32(za - 255) && fits32(za + 128) &&
                      fits32(zb - 255) && fits32(zb + 128);
  at::parallel_for(0, count, 4096, [&](int64_t begin, int64_t end) {
    if (vector) {
      const auto run = a_signed ? (b_signed ? add_codes_avx512<true, true> : add_codes_avx512<true, false>)
                                : (b_signed ? add_codes_avx512<false, true> : add_codes_avx512<false, false>);
      begin += run(pa + begin, pb + begin, po + begin, end - begin, za, zb, ma, mb, n, zo, lo, hi);
    }
    for (int64_t i = begin; i < end; ++i) {
      const int64_t qa = a_signed ? static_cast<int8_t>(pa[i]) : pa[i];
      const int64_t qb = b_signed ? static_cast<int8_t>(pb[i]) : pb[i];
      const int64_t v = (((qa - za) * ma + (qb - zb) * mb + round) >> n) + zo;
      po[i] = static_cast<uint8_t>(std::min(std::max(v, lo), hi));
    }
  });
  return out;
}

namespace {

// The window's mean code T / count (T: the window's sum of codes, padding counted as the zero point), rounded
// to nearest with ties to the even code. The double division is exact enough: IEEE division is correctly
// rounded, |T / count| < 2^9 so an ulp of the quotient is at most 2^-43, and a quotient that is not a tie
// lies at least 1 / (2 count) from one (count < 2^42); nearbyint rounds ties to even in the default mode.
inline int32_t rounded_mean(int64_t total, double count) {
  return static_cast<int32_t>(std::nearbyint(static_cast<double>(total) / count));
}

// rounded_mean of 8 int32 sums (a function, not a lambda, for the target attribute).
GRADQ_AVX512_DQ inline __m256i rounded_means(__m256i sums, __m512d count) {
  const __m512d q = _mm512_div_pd(_mm512_cvtepi32_pd(sums), count);
  return _mm512_cvtpd_epi32(_mm512_roundscale_pd(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// One output position of a channels-last average pool: for each channel, the rounded mean of the window's
// codes (rows [y0, y1) x columns [x0, x1) of the sample at `in`, row stride sh, column stride sw), padding
// counted as the zero point; 16 channels at a time in int32 lanes, the division as rounded_mean's.
GRADQ_AVX512_DQ void avg_pool_position_avx512(const uint8_t* in, int64_t sh, int64_t sw, int64_t y0, int64_t y1,
                                              int64_t x0, int64_t x1, int64_t c, bool is_signed, int32_t base,
                                              double count, uint8_t* out) {
  const __m512d dcount = _mm512_set1_pd(count);
  for (int64_t ch = 0; ch < c; ch += 16) {
    const __mmask16 mask = static_cast<__mmask16>(c - ch >= 16 ? 0xFFFF : (1u << (c - ch)) - 1);
    __m512i acc = _mm512_set1_epi32(base);
    for (int64_t y = y0; y < y1; ++y) {
      for (int64_t xx = x0; xx < x1; ++xx) {
        const __m128i v = _mm_maskz_loadu_epi8(mask, in + y * sh + xx * sw + ch);
        acc = _mm512_add_epi32(acc, is_signed ? _mm512_cvtepi8_epi32(v) : _mm512_cvtepu8_epi32(v));
      }
    }
    const __m512i r = _mm512_inserti64x4(_mm512_castsi256_si512(rounded_means(_mm512_castsi512_si256(acc), dcount)),
                                         rounded_means(_mm512_extracti64x4_epi64(acc, 1), dcount), 1);
    store_bytes16(out + ch, _mm512_cvtepi32_epi8(r), std::min<int64_t>(16, c - ch));
  }
}

}  // namespace

torch::Tensor avg_pool2d_codes(const torch::Tensor& x, std::vector<int64_t> kernel, std::vector<int64_t> stride,
                               std::vector<int64_t> padding, int64_t zero_point) {
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t oh = (h + 2 * padding[0] - kernel[0]) / stride[0] + 1;
  const int64_t ow = (w + 2 * padding[1] - kernel[1]) / stride[1] + 1;
  auto out = torch::empty({n, c, oh, ow}, x.options().memory_format(x.suggest_memory_format()));
  const int64_t count = kernel[0] * kernel[1];
  const bool is_signed = x.scalar_type() == torch::kInt8;
  const auto* src = static_cast<const uint8_t*>(x.data_ptr());
  auto* dst = static_cast<uint8_t*>(out.data_ptr());
  const int64_t sn = x.stride(0), sc = x.stride(1), sh = x.stride(2), sw = x.stride(3);
  const int64_t dn = out.stride(0), dc = out.stride(1), dh = out.stride(2), dw = out.stride(3);
  TORCH_CHECK(count <= (int64_t{1} << 22), "avg_pool2d_codes: a window of ", count, " codes would overflow the int32 sums; at most 2^22");
  const double dcount = static_cast<double>(count);
  if (sc == 1 && c > 1 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) {  // whole channel rows at a time
    at::parallel_for(0, n * oh, 1, [&](int64_t begin, int64_t end) {
      std::vector<int32_t> t(c);
      const bool vector = has_avx512_dq();
      for (int64_t row = begin; row < end; ++row) {
        const int64_t b = row / oh, oy = row % oh;
        const int64_t y0 = std::max<int64_t>(oy * stride[0] - padding[0], 0);
        const int64_t y1 = std::min(oy * stride[0] - padding[0] + kernel[0], h);
        for (int64_t ox = 0; ox < ow; ++ox) {
          const int64_t x0 = std::max<int64_t>(ox * stride[1] - padding[1], 0);
          const int64_t x1 = std::min(ox * stride[1] - padding[1] + kernel[1], w);
          // padding positions count as the zero point (a real 0)
          const auto base = static_cast<int32_t>(zero_point * (count - (y1 - y0) * (x1 - x0)));
          uint8_t* o = dst + b * dn + oy * dh + ox * dw;
          if (vector) {
            avg_pool_position_avx512(src + b * sn, sh, sw, y0, y1, x0, x1, c, is_signed, base, dcount, o);
            continue;
          }
          std::fill(t.begin(), t.end(), base);
          int32_t* acc = t.data();
          for (int64_t y = y0; y < y1; ++y) {
            for (int64_t xx = x0; xx < x1; ++xx) {
              const uint8_t* v = src + b * sn + y * sh + xx * sw;
              if (is_signed) {
                const auto* sv = reinterpret_cast<const int8_t*>(v);
                for (int64_t ch = 0; ch < c; ++ch) acc[ch] += sv[ch];
              } else {
                for (int64_t ch = 0; ch < c; ++ch) acc[ch] += v[ch];
              }
            }
          }
          for (int64_t ch = 0; ch < c; ++ch) o[ch] = static_cast<uint8_t>(rounded_mean(acc[ch], dcount));
        }
      }
    });
    return out;
  }
  at::parallel_for(0, n * c, 16, [&](int64_t begin, int64_t end) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t b = plane / c, ch = plane % c;
      const uint8_t* in = src + b * sn + ch * sc;
      for (int64_t oy = 0; oy < oh; ++oy) {
        const int64_t y0 = std::max<int64_t>(oy * stride[0] - padding[0], 0);
        const int64_t y1 = std::min(oy * stride[0] - padding[0] + kernel[0], h);
        for (int64_t ox = 0; ox < ow; ++ox) {
          const int64_t x0 = std::max<int64_t>(ox * stride[1] - padding[1], 0);
          const int64_t x1 = std::min(ox * stride[1] - padding[1] + kernel[1], w);
          int64_t t = zero_point * (count - (y1 - y0) * (x1 - x0));  // padding counts as the zero point
          for (int64_t y = y0; y < y1; ++y) {
            for (int64_t xx = x0; xx < x1; ++xx) {
              const uint8_t v = in[y * sh + xx * sw];
              t += is_signed ? static_cast<int8_t>(v) : v;
            }
          }
          dst[b * dn + ch * dc + oy * dh + ox * dw] = static_cast<uint8_t>(rounded_mean(t, dcount));
        }
      }
    }
  });
  return out;
}

namespace {

// Codes of src[0:count] as quantize_codes, 16 floats at a time: the division is IEEE (correctly rounded, as
// the scalar v / s) and roundscale rounds to nearest even, as nearbyint; returns whether all were finite.
GRADQ_AVX512_DQ bool quantize_avx512(const float* src, uint8_t* dst, int64_t count, float s, float z, float lo,
                                     float hi) {
  const __m512 vs = _mm512_set1_ps(s), vz = _mm512_set1_ps(z), vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(hi);
  __mmask16 bad = 0;
  for (int64_t i = 0; i < count; i += 16) {
    const __mmask16 mask = static_cast<__mmask16>(count - i >= 16 ? 0xFFFF : (1u << (count - i)) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(mask, src + i);
    const __mmask16 nonfinite = _mm512_fpclass_ps_mask(v, 0x99) & mask;  // NaN (quiet, signalling) or +-Inf
    bad |= nonfinite;
    __m512 q = _mm512_roundscale_ps(_mm512_div_ps(v, vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(q, vz), vlo), vhi);
    q = _mm512_mask_blend_ps(nonfinite, q, vlo);
    store_bytes16(dst + i, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(q)), std::min<int64_t>(16, count - i));
  }
  return bad == 0;
}

}  // namespace

std::vector<torch::Tensor> quantize_codes(const torch::Tensor& x, double scale, int64_t zero_point, int64_t qmin,
                                          int64_t qmax, bool out_signed) {
  auto out = torch::empty(x.sizes(), x.options().dtype(out_signed ? torch::kInt8 : torch::kUInt8));
  const float* src = x.data_ptr<float>();
  auto* dst = static_cast<uint8_t*>(out.data_ptr());
  const auto s = static_cast<float>(scale), z = static_cast<float>(zero_point);
  const auto lo = static_cast<float>(qmin), hi = static_cast<float>(qmax);
  const int64_t count = x.numel();
  std::atomic<bool> finite{true};
  const bool vector = has_avx512_dq();
  at::parallel_for(0, count, 1 << 14, [&](int64_t begin, int64_t end) {
    if (vector) {
      if (!quantize_avx512(src + begin, dst + begin, end - begin, s, z, lo, hi)) finite = false;
      return;
    }
    bool ok = true;
    for (int64_t i = begin; i < end; ++i) {
      const float v = src[i];
      const bool fin = std::isfinite(v);
      ok &= fin;
      const float q = fin ? std::min(std::max(std::nearbyint(v / s) + z, lo), hi) : lo;
      dst[i] = static_cast<uint8_t>(static_cast<int32_t>(q));
    }
    if (!ok) finite = false;
  });
  return {out, torch::tensor(finite.load())};
}

torch::Tensor dequantize_codes(const torch::Tensor& codes, double scale, int64_t zero_point) {
  auto out = torch::empty(codes.sizes(), codes.options().dtype(torch::kFloat32));
  float* dst = out.data_ptr<float>();
  const auto s = static_cast<float>(scale);
  const auto z = static_cast<int32_t>(zero_point);
  const bool is_signed = codes.scalar_type() == torch::kInt8;
  const void* src = codes.data_ptr();
  at::parallel_for(0, codes.numel(), 1 << 14, [&](int64_t begin, int64_t end) {
    if (is_signed) {
      const auto* q = static_cast<const int8_t*>(src);
      for (int64_t i = begin; i < end; ++i) dst[i] = static_cast<float>(static_cast<int32_t>(q[i]) - z) * s;
    } else {
      const auto* q = static_cast<const uint8_t*>(src);
      for (int64_t i = begin; i < end; ++i) dst[i] = static_cast<float>(static_cast<int32_t>(q[i]) - z) * s;
    }
  });
  return out;
}
