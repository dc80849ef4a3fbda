// The code operations of csrc/code_ops.cpp, bound in csrc/gradq_kernels.cpp. Arguments are validated in
// Python (gradq/integer_kernels.py): CPU tensors of the documented dtypes and layouts.
#pragma once

#include <torch/extension.h>

#include <vector>

// Max pooling (dilation 1, floor mode) of codes (N, C, H, W) uint8 or int8, contiguous or channels-last
// (the output keeps the input's memory format).
torch::Tensor max_pool2d_codes(const torch::Tensor& x, std::vector<int64_t> kernel, std::vector<int64_t> stride,
                               std::vector<int64_t> padding);

// The integer residual add (docs/integer.md section 5) of two code tensors of the same shape and strides,
// dense in their memory format: the output has that layout.
torch::Tensor add_codes(const torch::Tensor& a, const torch::Tensor& b, int64_t za, int64_t zb, int64_t ma,
                        int64_t mb, int64_t n, int64_t zo, int64_t lo, int64_t hi, bool out_signed);

// Average pooling of codes (N, C, H, W) in any memory format (kept): the window mean of q - z rounded to
// nearest, ties to even, plus z; padding counts as z (docs/integer.md section 5).
torch::Tensor avg_pool2d_codes(const torch::Tensor& x, std::vector<int64_t> kernel, std::vector<int64_t> stride,
                               std::vector<int64_t> padding, int64_t zero_point);

// Codes clamp(round(fp32(x / scale)) + zero_point, qmin, qmax) of contiguous fp32 x (round half to even, as
// gradq.quantize), and whether every x was finite.
std::vector<torch::Tensor> quantize_codes(const torch::Tensor& x, double scale, int64_t zero_point, int64_t qmin,
                                          int64_t qmax, bool out_signed);

// fp32(q - zero_point) * fp32(scale) of contiguous int8/uint8 codes (the integer model's Dequantize).
torch::Tensor dequantize_codes(const torch::Tensor& codes, double scale, int64_t zero_point);
