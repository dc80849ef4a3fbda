"""The modules of the integer model (docs/integer.md sections 4 and 5): quantize at the input, integer
layers with packed weights, weight-only layers, the residual add and average pooling on codes, ReLU on
codes, dequantize. Built by ``gradq.convert``; their buffers are what ``gradq.save_quantized`` stores.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch
from torch import nn

from gradq._backend import ENV_VAR as KERNELS_ENV
from gradq.integer_kernels import (
    IntegerGemm,
    WeightOnlyGemm,
    plan_add_codes,
    plan_avg_pool2d,
    plan_conv2d,
    plan_dequantize_codes,
    plan_integer_gemm,
    plan_linear,
    plan_max_pool2d,
    plan_quantize_codes,
    plan_weight_only,
    uses_triton,
    weight_only_linear,
)
from gradq.kernels import pack_bits, unpack_bits
from gradq.modelquant.integer_ops import LAYER_FUNCTIONS, integer_layer, pool_window
from gradq.modelquant.modules import QuantLayer, activate
from gradq.modelquant.quant_ops import PoolSpec, QuantAdd
from gradq.modelquant.weights import dequantized_weight, integer_weights
from gradq.quantize import quantize
from gradq.scheme import PerGroup, PerTensor, QuantScheme


def code_dtype(scheme: QuantScheme) -> torch.dtype:
    return torch.int8 if scheme.signed else torch.uint8


MAX_PLANS = 16
"""Planned calls kept per module (one per input signature); more input shapes than this start over."""


PLAN_EPOCH = [0]
"""Counts the times any integer module dropped its plans: a program of planned calls (``IntegerModel``)
made before is stale."""


def signature(t: torch.Tensor) -> tuple:
    """What a planned call depends on of one input tensor: shape, strides, dtype and device."""
    return (t.shape, t.stride(), t.dtype, t.device)


def call_key(inputs: tuple[torch.Tensor, ...]) -> tuple:
    """The key of planned calls (and of ``IntegerModel`` programs) for ``inputs``: each input's
    :func:`signature`, and ``GRADQ_KERNELS``."""
    return (os.environ.get(KERNELS_ENV), *map(signature, inputs))


class _Planned(nn.Module):
    """A module that checks its inputs and chooses its kernels once per input signature (shape, strides,
    dtype, device of each input and ``GRADQ_KERNELS``): :meth:`_plan` returns the forward for inputs of
    that signature as a function, which later calls run directly (about 8 us of Python per call
    otherwise: an average pooling's call took 10 us, its kernel 1.9). Parameters are read when a call is
    planned; ``load_state_dict`` and ``.to()`` plan again."""

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.planned_call(*inputs)(*inputs)

    def planned_call(self, *inputs: torch.Tensor) -> Callable[..., torch.Tensor]:
        """The forward for inputs of the signature of ``inputs``, planned at its first call."""
        key = call_key(inputs)
        calls = self.__dict__.setdefault("_calls", {})
        call = calls.get(key)
        if call is None:
            if len(calls) >= MAX_PLANS:
                calls.clear()
            call = calls[key] = self._plan(*inputs)
        return call

    def _plan(self, *inputs: torch.Tensor) -> Callable[..., torch.Tensor]:
        raise NotImplementedError

    def _forget_plans(self) -> None:
        self.__dict__.pop("_calls", None)
        PLAN_EPOCH[0] += 1

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        self._forget_plans()
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse: bool = True) -> nn.Module:  # noqa: ANN001
        self._forget_plans()
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_calls"}  # closures: plan again after a copy


class QuantizeInput(_Planned):
    """Float tensor -> codes (uint8/int8) with a fixed scale and zero point, exactly as ``gradq.quantize``."""

    def __init__(self, scheme: QuantScheme, scale: torch.Tensor, zero_point: int) -> None:
        super().__init__()
        self.scheme = scheme
        self.register_buffer("scale", scale.detach().clone().to(torch.float32))
        self.register_buffer("zero_point", torch.tensor(zero_point, dtype=torch.int32))

    def _plan(self, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        s = self.scheme
        if s.rounding == "nearest" and s.codebook == "uniform" and isinstance(s.granularity, PerTensor):
            zp = int(self.zero_point) if s.has_zero_point else 0
            return plan_quantize_codes(x, float(self.scale), zp, s.qmin, s.qmax, s.signed)
        scale, zero_point = self.scale, self.zero_point if s.has_zero_point else None
        return lambda x: quantize(x, s, scale=scale, zero_point=zero_point).codes


class Dequantize(_Planned):
    """Codes -> fp32(scale * (q - zero_point))."""

    def __init__(self, scale: torch.Tensor, zero_point: int) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().clone().to(torch.float32))
        self.register_buffer("zero_point", torch.tensor(zero_point, dtype=torch.int32))

    def _plan(self, codes: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        return plan_dequantize_codes(codes, float(self.scale), int(self.zero_point))


class CodeReLU(nn.Module):
    """ReLU on codes: max(q, zero_point)."""

    def __init__(self, zero_point: int) -> None:
        super().__init__()
        self.register_buffer("zero_point", torch.tensor(zero_point, dtype=torch.int32))

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return codes.clamp(min=int(self.zero_point))


class CodeMaxPool(_Planned, nn.MaxPool2d):
    """``nn.MaxPool2d`` on codes: gradq's max-pooling kernel (dilation 1, floor mode), else the torch op on
    contiguous codes (PyTorch's uint8 max pooling rejects channels-last input); off the CPU the torch op on
    float64 copies of the codes (exact)."""

    @classmethod
    def of(cls, pool: nn.MaxPool2d) -> CodeMaxPool:
        return cls(pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.return_indices, pool.ceil_mode)

    def _plan(self, codes: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        def pair(v: int | tuple) -> tuple[int, int]:
            return (v, v) if isinstance(v, int) else tuple(v)

        pool = super(_Planned, self).forward  # nn.MaxPool2d's
        native = pair(self.dilation) == (1, 1) and not self.ceil_mode and not self.return_indices
        if codes.device.type != "cpu" and not self.return_indices:  # CUDA has no integer max pooling: float64
            return lambda codes: pool(codes.to(torch.float64)).to(codes.dtype)
        if not native or codes.dim() != 4:
            return lambda codes: pool(codes.contiguous())
        kernel = pair(self.kernel_size)
        return plan_max_pool2d(codes, kernel, pair(self.stride or kernel), pair(self.padding))


class _PackedWeights(_Planned):
    """Weights stored as docs/integer.md section 2 says: codes packed at their width (sign: bit 1 is -1),
    8-bit sub-scales per group, fp32 channel scales and the mask of all-zero channels."""

    def __init__(self, layer: QuantLayer) -> None:
        super().__init__()
        scheme = layer.weight_quant.scheme
        self.kind, self.name, self.weight_scheme = layer.kind, layer.name, scheme
        self.weight_shape, self.conv_args = tuple(layer.weight.shape), dict(layer.conv_args)
        self.relu, self.relu6 = layer.relu, layer.relu6
        c, k = self.weight_shape[0], math.prod(self.weight_shape[1:])
        groups = k // scheme.granularity.group_size if isinstance(scheme.granularity, PerGroup) else None
        self.register_buffer("packed_weight", torch.zeros((c * k * scheme.bits + 7) // 8, dtype=torch.uint8))
        self.register_buffer("sub_scales", None if groups is None else torch.zeros(c, groups, dtype=torch.uint8))
        self.register_buffer("zero_channels", torch.zeros(c, dtype=torch.bool))
        self.register_buffer("weight_scale", torch.zeros(c, dtype=torch.float32))
        self._wi: torch.Tensor | None = None
        self._weight: torch.Tensor | None = None
        self._gemm: IntegerGemm | None = None

    def _fill_weights(self, q: torch.Tensor, r: torch.Tensor | None, sw: torch.Tensor, zero: torch.Tensor) -> None:
        """Store ``WeightQuantizer.stored``'s codes, sub-scales, scales and zero-channel mask."""
        scheme = self.weight_scheme
        field = (q < 0).to(torch.uint8) if scheme.codebook == "sign" else (q & (2**scheme.bits - 1)).to(torch.uint8)
        self.packed_weight.copy_(pack_bits(field.reshape(-1).contiguous(), scheme.bits))
        if r is not None:
            self.sub_scales.copy_(r)
        self.zero_channels.copy_(zero)
        self.weight_scale.copy_(sw)

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        self._wi = self._weight = self._gemm = None  # new stored codes: unpack again
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, recurse: bool = True) -> nn.Module:  # noqa: ANN001
        self._wi = self._weight = self._gemm = None  # buffers moved or cast: plan again from them
        return super()._apply(fn, recurse)

    def weight_codes(self) -> torch.Tensor:
        """The weight codes q (C, K) int64 unpacked from the stored bits."""
        c, k = self.weight_shape[0], math.prod(self.weight_shape[1:])
        scheme = self.weight_scheme
        field = unpack_bits(self.packed_weight, scheme.bits, c * k).to(torch.int64).view(c, k)
        if scheme.codebook == "sign":
            return 1 - 2 * field
        sign = 1 << (scheme.bits - 1)
        return (field ^ sign) - sign

    def integer_weights(self) -> torch.Tensor:
        """Wi (C, K) int64 unpacked from the stored codes (cached after the first call)."""
        if self._wi is None:
            r = None if self.sub_scales is None else self.sub_scales.to(torch.int64)
            self._wi = integer_weights(self.weight_codes(), r, self.zero_channels, self.weight_scheme)
        return self._wi


class IntegerLayer(_PackedWeights):
    """An integer Linear/Conv1d/Conv2d: codes in, codes out, parameters as docs/integer.md section 4."""

    def __init__(self, layer: QuantLayer, with_values: bool = True) -> None:
        super().__init__(layer)
        c = self.weight_shape[0]
        self.out_dtype = code_dtype(layer.output_quant.scheme)
        self.in_dtype = code_dtype(layer.input_quantizer.scheme)
        for name, dtype in (("bias_q", torch.int32), ("multiplier", torch.int32), ("shift", torch.int8)):
            self.register_buffer(name, torch.zeros(c, dtype=dtype))
        # zx, zo, the output clamp lo/hi and the accumulator bound, as one int64 tensor
        self.register_buffer("integers", torch.zeros(5, dtype=torch.int64))
        self.register_buffer("io_scales", torch.zeros(2, dtype=torch.float32))  # sx, so (for export)
        if with_values:
            p = layer.integer_parameters()
            self.io_scales.copy_(torch.stack((p["sx"], p["so"])))
            self._fill_weights(p["q"], p["r"], p["sw"], p["zero"])
            self.bias_q.copy_(p["bq"])
            self.multiplier.copy_(p["M"])
            self.shift.copy_(p["n"])
            self.integers.copy_(torch.tensor([p["zx"], p["zo"], p["lo"], p["hi"], p["bound"]]))

    def gemm(self) -> IntegerGemm:
        """The layer planned for the integer GEMM kernels (made once from the stored integers)."""
        if self._gemm is None:
            zx, zo, lo, hi, _ = self.integers.tolist()
            scheme = self.weight_scheme
            group = scheme.granularity.group_size if isinstance(scheme.granularity, PerGroup) else 0
            self._gemm = plan_integer_gemm(
                self.weight_codes(), self.sub_scales, self.zero_channels, scheme.bits, scheme.codebook == "sign",
                group, self.bias_q, self.multiplier, self.shift, zx, zo, lo, hi,
                x_signed=self.in_dtype == torch.int8, out_signed=self.out_dtype == torch.int8,
                taps=math.prod(self.weight_shape[2:]),
            )
        return self._gemm

    def _plan(self, codes: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        if codes.device.type not in ("cpu", "cuda"):  # the exact float emulation (docs/integer.md) elsewhere
            zx, zo, lo, hi, bound = self.integers.tolist()
            p = {"Wi": self.integer_weights(), "bq": self.bias_q.to(torch.int64),
                 "M": self.multiplier.to(torch.int64), "n": self.shift.to(torch.int64), "zx": zx, "zo": zo,
                 "lo": lo, "hi": hi, "bound": bound}
            kind, args, shape, dtype = self.kind, self.conv_args, self.weight_shape, self.out_dtype
            return lambda codes: integer_layer(codes, p, kind, args, shape).to(dtype)
        if self.kind == "linear":
            k = codes.shape[-1]
            rows = codes.reshape(-1, k).contiguous()
            call = plan_linear(rows, self.gemm())
            if codes.dim() == 2 and codes.is_contiguous():
                return call
            lead = codes.shape[:-1]
            return lambda codes: call(codes.reshape(-1, k).contiguous()).view(*lead, -1)
        unbatched, one_d = codes.dim() == len(self.weight_shape) - 1, self.kind == "conv1d"
        x = codes.unsqueeze(0) if unbatched else codes
        a = self.conv_args
        if one_d:  # a Conv1d runs as a Conv2d of height 1
            call = plan_conv2d(x.unsqueeze(2), self.gemm(), (1, self.weight_shape[2]), (1, a["stride"][0]),
                               (0, a["padding"][0]), (1, a["dilation"][0]), a["groups"])
        else:
            call = plan_conv2d(x, self.gemm(), self.weight_shape[2:], a["stride"], a["padding"], a["dilation"],
                               a["groups"])
        if not (unbatched or one_d):
            return call

        def reshaped(codes: torch.Tensor) -> torch.Tensor:
            x = codes.unsqueeze(0) if unbatched else codes
            out = call(x.unsqueeze(2)).squeeze(2) if one_d else call(x)
            return out.squeeze(0) if unbatched else out

        return reshaped

    def extra_repr(self) -> str:
        return f"{self.name}: {self.kind}, {self.weight_scheme.bits}-bit weights, {self.packed_weight.numel()} bytes"


class WeightOnlyLayer(_PackedWeights):
    """A weight-only quantized layer: packed weights, float compute with ``fp32(fp64(sw) * Wi)`` and the
    float bias, ReLU if fused (as the prepared model's eval())."""

    def __init__(self, layer: QuantLayer, with_values: bool = True) -> None:
        super().__init__(layer)
        self.register_buffer("bias", None if layer.bias is None else torch.zeros_like(layer.bias.detach()))
        if with_values:
            self._fill_weights(*layer.weight_quant.stored(layer.weight))
            if layer.bias is not None:
                self.bias.copy_(layer.bias.detach())

    def plan(self) -> WeightOnlyGemm:
        """The Linear planned for the Triton weight-only kernel (made once from the stored integers)."""
        if self._gemm is None:
            scheme = self.weight_scheme
            group = scheme.granularity.group_size if isinstance(scheme.granularity, PerGroup) else 0
            self._gemm = plan_weight_only(self.weight_codes(), self.sub_scales, self.zero_channels, scheme.bits,
                                          scheme.codebook == "sign", group, self.weight_scale, self.bias)
        return self._gemm

    def _plan(self, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """Linear on CUDA (or with GRADQ_KERNELS=triton): the packed-weight kernel; else ``F.linear`` and the
        convolutions with the dequantized weights."""
        relu, relu6 = self.relu, self.relu6
        if self.kind == "linear" and uses_triton(x):
            g = self.plan()
            return lambda x: activate(weight_only_linear(x.reshape(-1, x.shape[-1]).contiguous(), g).view(
                *x.shape[:-1], -1), relu, relu6)
        if self._weight is None:
            self._weight = dequantized_weight(self.integer_weights(), self.weight_scale, self.weight_shape)
        weight, bias, layer, args = self._weight.to(x.dtype), self.bias, LAYER_FUNCTIONS[self.kind], self.conv_args
        return lambda x: activate(layer(x, weight, bias, **args), relu, relu6)


ADD_FIELDS = ("za", "zb", "Ma", "Mb", "n", "zo", "lo", "hi")


class IntegerAdd(_Planned):
    """The residual add on codes (docs/integer.md section 5): both inputs rescaled to the output's scale
    with one shift, rounded once, zero point, clamp (a fused ReLU is the lower clamp)."""

    def __init__(self, add: QuantAdd, with_values: bool = True) -> None:
        super().__init__()
        self.name, self.relu = add.name, add.relu
        self.out_dtype = code_dtype(add.output_quant.scheme)
        self.register_buffer("integers", torch.zeros(len(ADD_FIELDS), dtype=torch.int64))
        self.register_buffer("scales", torch.ones(3, dtype=torch.float32))  # sa, sb, so (for export)
        if with_values:
            p = add.integer_parameters()
            self.integers.copy_(torch.tensor([p[f] for f in ADD_FIELDS]))
            self.scales.copy_(torch.stack([q.qparams()[0] for q in (*add.input_quantizers, add.output_quant)]))

    def _plan(self, a: torch.Tensor, b: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        return plan_add_codes(a, b, *self.integers.tolist(), self.out_dtype == torch.int8)

    def extra_repr(self) -> str:
        return f"{self.name}: integer add{'+ReLU' if self.relu else ''}"


class IntegerAvgPool(_Planned):
    """Average pooling on codes, output on the input's grid (docs/integer.md section 5)."""

    def __init__(self, spec: PoolSpec, scale: torch.Tensor, zero_point: int) -> None:
        super().__init__()
        self.spec = spec
        self.register_buffer("scale", scale.detach().clone().to(torch.float32))  # for export
        self.register_buffer("zero_point", torch.tensor(zero_point, dtype=torch.int32))

    def _plan(self, codes: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        s = self.spec
        x, kernel, stride, padding = pool_window(codes, s.kernel, s.stride, s.padding)
        call = plan_avg_pool2d(x, kernel, stride, padding, int(self.zero_point))
        return call if codes.dim() == 4 else lambda codes: call(codes.unsqueeze(2)).squeeze(2)

    def extra_repr(self) -> str:
        return f"{'global ' if self.spec.kernel is None else ''}average pooling on codes"
