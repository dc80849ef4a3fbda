// The integer layers of csrc/integer_gemm.cpp (GEMM, convolutions, im2col, the requantization epilogue),
// bound in csrc/gradq_kernels.cpp.
// Arguments are validated in Python (gradq/integer_kernels.py): contiguous CPU tensors of the documented dtypes.
#pragma once

#include <torch/extension.h>

#include <vector>

// The instruction set the kernels choose: 1 portable C++, 2 AVX2, 3 AVX-512 VNNI.
int64_t integer_gemm_isa();

// Codes (rows, K) uint8/int8 -> output codes (rows, C) of the integer Linear.
torch::Tensor integer_linear(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& wide,
                             int64_t bits, bool sign, bool offset_binary, int64_t kp, const torch::Tensor& sub,
                             int64_t group_size,
                             const torch::Tensor& offset, const torch::Tensor& mult, const torch::Tensor& shift,
                             int64_t zo, int64_t lo, int64_t hi, bool out_signed, int64_t isa);

// Codes (N, C_in, H, W) -> output codes (N, C, OH, OW), channels-last in memory, of the integer Conv2d
// (im2col, then the GEMM).
torch::Tensor integer_conv2d(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& wide,
                             int64_t bits, bool sign, bool offset_binary, int64_t kp, const torch::Tensor& sub,
                             int64_t group_size,
                             const torch::Tensor& offset, const torch::Tensor& mult, const torch::Tensor& shift,
                             int64_t zo, int64_t lo, int64_t hi, bool out_signed, int64_t isa,
                             std::vector<int64_t> kernel, std::vector<int64_t> stride, std::vector<int64_t> padding,
                             std::vector<int64_t> dilation, int64_t groups, int64_t zx);

// The requantization epilogue alone: output codes (rows, C) of int32 accumulators (rows, C) plus the offset.
torch::Tensor requantize_int32(const torch::Tensor& acc, const torch::Tensor& offset, const torch::Tensor& mult,
                               const torch::Tensor& shift, int64_t zo, int64_t lo, int64_t hi, bool out_signed);

// Codes (N, C_in, H, W) -> output codes (N, C, OH, OW), channels-last in memory, of an integer Conv2d with
// groups = 1 through torch._int_mm: int8 weights w8 (K16, C) (K16 >= kh * kw * C_in, the rest zero), the
// offset for the int8 (minus 128) codes, in tiles of whole output rows of about tile_bytes of im2col rows
// and int32 products, so that each tile's im2col, products and requantization stay in cache.
torch::Tensor conv2d_int_mm(const torch::Tensor& x, const torch::Tensor& w8, const torch::Tensor& offset,
                            const torch::Tensor& mult, const torch::Tensor& shift, int64_t zo, int64_t lo, int64_t hi,
                            bool out_signed, std::vector<int64_t> kernel, std::vector<int64_t> stride,
                            std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t zx,
                            int64_t tile_bytes);

// Whether this CPU runs conv2d_direct (AVX-512 VNNI and DQ).
bool conv2d_direct_available();

// Codes (N, C_in, H, W) -> output codes (N, C, OH, OW), channels-last in memory, of an integer Conv2d with
// groups = 1, by a direct VNNI convolution (no im2col): int8 weights (S, G4, C16, 4) with C16 = C rounded up
// to 16 (zero past C), S segments of L contiguous inputs (dilation 1 along W: S = kh kernel rows of L = kw *
// C_in; else S = kh * kw taps of L = C_in), G4 = ceil(L / 4), zero past L; the offset (C) for uint8 codes
// (int8 codes plus 128).
torch::Tensor conv2d_direct(const torch::Tensor& x, const torch::Tensor& weights, const torch::Tensor& offset,
                            const torch::Tensor& mult, const torch::Tensor& shift, int64_t zo, int64_t lo, int64_t hi,
                            bool out_signed, std::vector<int64_t> kernel, std::vector<int64_t> stride,
                            std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t zx);

// im2col of codes (N, C_in, H, W), any strides: rows (N * OH * OW, groups * width) uint8, each group's K =
// kh * kw * C_in / groups columns in (kh, kw, C_in) order first (the rest of width zero), padding with the
// code zx; values as uint8 codes (int8 codes plus 128), or with minus_128 as int8 bits minus 128 (torch._int_mm).
torch::Tensor im2col_codes(const torch::Tensor& x, std::vector<int64_t> kernel, std::vector<int64_t> stride,
                           std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups, int64_t width,
                           int64_t zx, bool minus_128);
