"""Integer inference kernels of the integer model: GEMM with packed low-bit weights and the fused
requantization epilogue, im2col for convolutions, max and average pooling of codes, the residual add and
the input quantization (docs/integer.md sections 3 and 5; the weight layout and the kernels in
docs/kernels.md, "Integer GEMM"). Each runs natively on CPU tensors or by ``gradq._integer_reference``;
on CUDA tensors the GEMMs and their epilogue are Triton kernels (``gradq._triton_integer``) and the code
operations PyTorch ops.

:func:`plan_integer_gemm` turns one layer's stored integers (codes q, sub-scales r, bias, multipliers) into
an :class:`IntegerGemm`: weights repacked once into the kernels' layout at their width (1, 2, 4 or 8 bits
per code; 3, 5, 6 and 7 bits widen to 8), and the offset that folds the bias and the input zero point.
:func:`integer_linear` and :func:`integer_conv2d` run it on code tensors: natively (AVX-512 VNNI, AVX2 or
portable C++, chosen at run time), by Triton on CUDA, or by the pure-PyTorch reference
(``GRADQ_KERNELS=reference``), with bit-identical results. Per-channel weights of any width can instead
use ``torch._int_mm`` (oneDNN; cuBLAS on CUDA) for the products, on an int8 copy of the weights made at
first use, followed by the same epilogue
(``engine="int_mm"``); ``engine="auto"`` takes it where it was measured faster: from INT_MM_MIN_ROWS rows.
Convolutions with per-channel weights run instead as a direct VNNI convolution (``engine="direct"``, the
default where the CPU has AVX-512 VNNI): no im2col, the products accumulated in registers and
requantized there.
:func:`plan_weight_only` and :func:`weight_only_linear` are the weight-only (W4A16) Linear on CUDA.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gradq import _integer_reference, _reference
from gradq._backend import is_triton, kernels_for, uses_triton
from gradq._validate import check_tensor
from gradq.kernels import pack_bits

BLOCK = 64
ISAS = {"auto": 0, "portable": 1, "avx2": 2, "avx512_vnni": 3}
"""Instruction sets of the native kernels, by name (``auto``: the widest this CPU has)."""
ENGINES = ("auto", "gradq", "int_mm", "direct")
INT_MM_K_MULTIPLE = 16
"""``torch._int_mm``'s reduction length is padded to this multiple: oneDNN ran 4x slower at K = 9 than at 16."""
INT_MM_MIN_ROWS = 128
"""``engine="auto"`` uses ``torch._int_mm`` for per-channel weights from this many rows (GEMM rows: batch
rows of a Linear, output positions of a convolution) on: compute-bound there, where oneDNN's int8 kernel
was measured faster than gradq's; below it the GEMM reads weights more than it computes, and gradq's
packed kernel, reading 8/bits times fewer weight bytes, was faster (benchmarks/integer.py)."""
CONV_TILE_BYTES = 1 << 18
"""A native ``int_mm`` convolution runs im2col, ``torch._int_mm`` and the epilogue on tiles of whole output
rows of about this many bytes of im2col rows and int32 products, so that each stays in the core's cache."""


@dataclass(frozen=True, eq=False)
class WeightLayout:
    """Weights planned for the GEMM kernels. C output channels, K inputs per channel, ``kp`` = K rounded up
    to 64: ``packed`` (C, kp * bits / 8) uint8 in the kernels' layout, or ``wide`` (C, kp) int16 Wi when
    the sub-scale groups are not multiples of 64 (the other empty); ``sub`` (C, G) int32 sub-scales per
    ``group_size`` codes, or empty."""

    packed: torch.Tensor
    wide: torch.Tensor
    bits: int
    sign: bool
    offset_binary: bool
    k: int
    kp: int
    sub: torch.Tensor
    group_size: int

    def layout_args(self) -> tuple:
        """The weight arguments of every GEMM kernel, in their order."""
        return (self.packed, self.wide, self.bits, self.sign, self.offset_binary, self.kp, self.sub,
                self.group_size)


@dataclass(frozen=True, eq=False)
class IntegerGemm(WeightLayout):
    """One integer layer ready for the kernels: its :class:`WeightLayout`, then the epilogue: ``offset``
    (C,) int64 = bq - zeff * sum_k Wi with ``zeff`` the input zero point on uint8 codes (zx, plus 128 for
    int8 codes), ``mult`` (C,) int32, ``shift`` (C,) int8, output zero point ``zo`` and clamp ``[lo, hi]``.
    ``signed_offset`` (C,) int64 = offset + 128 * sum_k Wi: the offset for inputs taken as signed bytes
    (uint8 codes minus 128), as ``torch._int_mm`` and the Triton kernels take them; ``fits_int8``: Wi fits
    int8 (per-channel weights, which the ``torch._int_mm`` engine needs)."""

    offset: torch.Tensor
    mult: torch.Tensor
    shift: torch.Tensor
    zx: int
    zo: int
    lo: int
    hi: int
    x_signed: bool
    out_signed: bool
    signed_offset: torch.Tensor
    fits_int8: bool
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def channels(self) -> int:
        return self.offset.numel()

    @property
    def zeff(self) -> int:
        return self.zx + (128 if self.x_signed else 0)

    def int8_weights(self) -> torch.Tensor:
        """Wi (K16, C) int8 for ``torch._int_mm`` (K rounded up to a multiple of 16 with zero rows), unpacked
        from the layout at the first call and kept."""
        if not self.fits_int8:
            raise ValueError("engine='int_mm' needs per-channel weights (Wi must fit int8); use engine='gradq'")
        if "int8" not in self._cache:
            wi = _integer_reference.unpack_layout(self.packed, self.bits, self.sign, self.offset_binary)[:, : self.k]
            if self.sub.numel():  # the binary zero-channel mask
                wi = wi * self.sub.to(torch.int64)
            k16 = -(-self.k // INT_MM_K_MULTIPLE) * INT_MM_K_MULTIPLE
            self._cache["int8"] = torch.nn.functional.pad(wi, (0, k16 - self.k)).T.to(torch.int8).contiguous()
        return self._cache["int8"]

    def direct_weights(self, cin: int, kernel: tuple[int, int], dilation_w: int) -> torch.Tensor:
        """Wi as (S, G4, C16, 4) int8 for the direct convolution over ``cin`` input channels: S segments of L
        contiguous inputs (``dilation_w`` 1: the kh kernel rows, L = kw * cin; else the kh * kw taps, L = cin),
        G4 = ceil(L / 4), C16 = C rounded up to 16, zero past L and C. Made from :meth:`int8_weights` at the
        first call."""
        key = ("direct", cin, tuple(kernel), dilation_w == 1)
        if key not in self._cache:
            kh, kw = kernel
            segments, length = (kh, kw * cin) if dilation_w == 1 else (kh * kw, cin)
            g4, c16 = -(-length // 4), -(-self.channels // 16) * 16
            w = self.int8_weights()[: self.k].view(segments, length, self.channels)
            w = torch.nn.functional.pad(w, (0, c16 - self.channels, 0, 4 * g4 - length)).view(segments, g4, 4, c16)
            self._cache[key] = w.permute(0, 1, 3, 2).contiguous()
        return self._cache[key]

    def weight_nbytes(self) -> int:
        """Bytes of the weights as the kernels read them (layout or wide Wi, plus sub-scales)."""
        return self.packed.numel() + 2 * self.wide.numel() + 4 * self.sub.numel()


def pack_layout(q: torch.Tensor, bits: int, sign: bool, offset_binary: bool = False) -> torch.Tensor:
    """Codes q (C, kp) int64 -> the kernels' layout (C, kp * bits / 8) uint8: blocks of 64 codes; 8 and 1
    bit in natural LSB-first order (sign codes: bit 1 for -1), 4 and 2 bits as 8/bits slices of 8*bits
    codes with byte j holding code j of slice t in bits [t*bits, (t+1)*bits). Fields are two's complement,
    or with ``offset_binary`` (2 and 4 bits) q + 2**(bits-1)."""
    c, kp = q.shape
    if sign:
        fields = (q < 0).to(torch.uint8)
    else:
        fields = (q + (1 << (bits - 1)) if offset_binary else q & ((1 << bits) - 1)).to(torch.uint8)
    if bits in (2, 4):  # the slices' code j side by side: gradq.pack_bits then puts them in byte j
        fields = fields.view(c, kp // BLOCK, 8 // bits, 8 * bits).transpose(2, 3)
    return pack_bits(fields.contiguous(), bits).view(c, -1)


def _layout_weights(q: torch.Tensor, r: torch.Tensor | None, zero: torch.Tensor, bits: int, sign: bool,
                    group_size: int, taps: int) -> tuple[dict, torch.Tensor]:
    """The :class:`WeightLayout` fields for codes ``q`` (C, K), and Wi (C, K) int64 in the planned column
    order."""
    c, k = q.shape
    kp = -(-k // BLOCK) * BLOCK
    q = torch.where(zero.unsqueeze(1), 0, q.to(torch.int64)) if not sign else q.to(torch.int64)
    wi = q if r is None else q * r.to(torch.int64).repeat_interleave(group_size, dim=1)
    wi = torch.where(zero.unsqueeze(1), 0, wi)
    if taps > 1:
        q, wi = (t.view(c, k // taps, taps).transpose(1, 2).reshape(c, k) for t in (q, wi))
    packed, wide, sub = (torch.empty(0, dtype=d, device=q.device) for d in (torch.uint8, torch.int16, torch.int32))
    width = bits if bits in (1, 2, 4, 8) else 8
    grouped_layout = r is not None and group_size % BLOCK == 0 and taps == 1
    # 2/4-bit per-channel codes stored as q + 2**(bits-1): the kernels skip the sign extension and take
    # 2**(bits-1) * sum_k x off per row instead
    offset_binary = width in (2, 4) and not sign and r is None
    if r is not None and not grouped_layout:
        wide = torch.nn.functional.pad(wi, (0, kp - k)).to(torch.int16).contiguous()
    else:
        packed = pack_layout(torch.nn.functional.pad(q, (0, kp - k), value=1 if sign else 0), width, sign,
                             offset_binary)
        if grouped_layout:
            sub = torch.where(zero.unsqueeze(1), 0, r.to(torch.int32)).contiguous()
        elif sign and bool(zero.any()):  # a binary zero channel: one sub-scale per row, 0 where all-zero
            sub, group_size = (~zero).to(torch.int32).unsqueeze(1).contiguous(), kp
    fields = dict(packed=packed.contiguous(), wide=wide, bits=width, sign=sign, offset_binary=offset_binary, k=k,
                  kp=kp, sub=sub, group_size=group_size)
    return fields, wi


def plan_integer_gemm(q: torch.Tensor, r: torch.Tensor | None, zero: torch.Tensor, bits: int, sign: bool,
                      group_size: int, bq: torch.Tensor, mult: torch.Tensor, shift: torch.Tensor, zx: int,
                      zo: int, lo: int, hi: int, x_signed: bool, out_signed: bool, taps: int = 1) -> IntegerGemm:
    """The :class:`IntegerGemm` of a layer with weight codes ``q`` (C, K), sub-scales ``r`` (C, K /
    group_size) or None, all-zero channel mask ``zero`` (C,), ``bits``-wide codes (``sign``: binary), int32
    bias ``bq``, multipliers ``mult``/``shift`` (docs/integer.md section 4) and the input/output code
    parameters, on the device of ``q``. A convolution's K = C_in / groups * ``taps`` columns, given in
    (C_in, kh, kw) order, are planned in the (kh, kw, C_in) order of :func:`integer_conv2d`'s patches; its
    per-group weights then run from int16 Wi (the groups no longer lie in runs of the new order)."""
    fields, wi = _layout_weights(q, r, zero, bits, sign, group_size, taps)
    colsum = wi.sum(1)
    offset = (bq.to(torch.int64) - (zx + (128 if x_signed else 0)) * colsum).contiguous()
    return IntegerGemm(
        **fields, offset=offset, mult=mult.to(torch.int32).contiguous(), shift=shift.to(torch.int8).contiguous(),
        zx=zx, zo=zo, lo=lo, hi=hi, x_signed=x_signed, out_signed=out_signed,
        signed_offset=(offset + 128 * colsum).contiguous(), fits_int8=r is None,
    )


@dataclass(frozen=True, eq=False)
class WeightOnlyGemm(WeightLayout):
    """A weight-only Linear ready for :func:`weight_only_linear`: its :class:`WeightLayout`, the channel
    scales ``scale`` (C,) fp32 and ``bias`` (C,) or None."""

    scale: torch.Tensor
    bias: torch.Tensor | None


def plan_weight_only(q: torch.Tensor, r: torch.Tensor | None, zero: torch.Tensor, bits: int, sign: bool,
                     group_size: int, scale: torch.Tensor, bias: torch.Tensor | None) -> WeightOnlyGemm:
    """The :class:`WeightOnlyGemm` of a Linear with weight codes ``q`` (C, K), sub-scales ``r`` or None, the
    all-zero channel mask ``zero``, channel scales ``scale`` (C,) and float ``bias`` or None."""
    fields, _ = _layout_weights(q, r, zero, bits, sign, group_size, 1)
    return WeightOnlyGemm(**fields, scale=scale.to(torch.float32).contiguous(),
                          bias=None if bias is None else bias.contiguous())


def weight_only_linear(x: torch.Tensor, g: WeightOnlyGemm) -> torch.Tensor:
    """``x`` (rows, K) fp32/fp16/bf16 times the dequantized weights, plus the bias: (rows, C) in x's dtype,
    by the Triton kernel (CUDA tensors; CPU tensors with ``GRADQ_KERNELS=triton`` under the interpreter).
    Each product x * q is exact and the sums are fp32 (the bound is in docs/kernels.md)."""
    check_tensor("x", x, dtypes=(torch.float32, torch.float16, torch.bfloat16), dim=2, contiguous=True)
    if x.shape[1] != g.k:
        raise ValueError(f"x has {x.shape[1]} features but the layer was planned for {g.k}")
    if x.device != g.scale.device:
        raise ValueError(f"x is on {x.device} but the layer's weights are on {g.scale.device}: move one of them")
    if not uses_triton(x):
        raise ValueError("weight_only_linear runs the Triton kernel: give it CUDA tensors (or set "
                         "GRADQ_KERNELS=triton with TRITON_INTERPRET=1 for CPU tensors)")
    from gradq import _triton_integer

    return _triton_integer.weight_only_linear(x, *g.layout_args(), g.scale, g.bias)


def native_isa() -> str:
    """The instruction set the native integer GEMM uses on this CPU (``portable`` without the native build)."""
    from gradq._backend import _C

    if _C is None:
        return "portable"
    return {v: n for n, v in ISAS.items()}[_C.integer_gemm_isa()]


def _kernels(x: torch.Tensor, isa: str) -> tuple[object, int]:
    """The integer kernel module for ``x`` (native, ``gradq._triton_integer`` or the reference) and the ISA id."""
    if isa not in ISAS:
        raise ValueError(f"isa must be one of {', '.join(ISAS)}, got {isa!r}")
    module = kernels_for(x)
    if module is _reference:
        return _integer_reference, ISAS[isa]
    if is_triton(module):
        from gradq import _triton_integer

        return _triton_integer, ISAS[isa]
    return module, ISAS[isa]


def _code_kernels(x: torch.Tensor) -> object:
    """The module of the code operations (pooling, add, input quantization): native for CPU tensors when
    built, else the reference (PyTorch ops, on any device)."""
    module = kernels_for(x) if x.device.type == "cpu" else _reference
    return module if module.__name__ == "gradq._C" else _integer_reference


def _check_codes(x: torch.Tensor, g: IntegerGemm, dim: int, k: int) -> None:
    expected = torch.int8 if g.x_signed else torch.uint8
    check_tensor("codes", x, dtypes=(expected,), dim=dim, contiguous=dim == 2)
    if x.device != g.offset.device:
        raise ValueError(f"codes are on {x.device} but the layer was planned on {g.offset.device}: move the "
                         "model (and plan again) or the codes")
    if k != g.k:
        raise ValueError(f"codes have {k} inputs per output channel but the layer was planned for {g.k}")


def _args(module: object, g: IntegerGemm, isa_id: int) -> tuple:
    """The GEMM's arguments for ``module``: the Triton kernels take ``signed_offset`` and no ISA or zeff."""
    weights = g.layout_args()
    epilogue = (g.mult, g.shift, g.zo, g.lo, g.hi, g.out_signed)
    if module.__name__ == "gradq._triton_integer":
        return (*weights, g.signed_offset, *epilogue), {}
    extra = {"zeff": g.zeff} if module is _integer_reference else {}
    return (*weights, g.offset, *epilogue, isa_id), extra


def _int_mm(xs: torch.Tensor, g: IntegerGemm, module: object) -> torch.Tensor:
    """Codes of signed-byte rows ``xs`` (rows, K16) by ``torch._int_mm`` and ``module``'s epilogue."""
    acc = torch._int_mm(xs, g.int8_weights())
    return module.requantize_int32(acc, g.signed_offset, g.mult, g.shift, g.zo, g.lo, g.hi, g.out_signed)


Call = Callable[[torch.Tensor], torch.Tensor]
"""A planned kernel call: valid for inputs of the shape, strides, dtype and device it was planned for, under
the same ``GRADQ_KERNELS`` (the integer modules keep one per input signature)."""


def integer_linear(x: torch.Tensor, g: IntegerGemm, isa: str = "auto", engine: str = "auto") -> torch.Tensor:
    """Output codes (rows, C) (int8 or uint8 as planned) of input codes ``x`` (rows, K), contiguous, on the
    device the layer was planned on (CPU: native kernels; CUDA: Triton kernels).

    ``engine="int_mm"`` computes the products with ``torch._int_mm`` (per-channel weights only) and
    applies the same epilogue; ``"gradq"`` uses gradq's kernel; ``"auto"`` chooses (:data:`INT_MM_MIN_ROWS`).
    ``isa`` forces an instruction set of the native kernels (tests, benchmarks).
    """
    return plan_linear(x, g, isa, engine)(x)


def plan_linear(x: torch.Tensor, g: IntegerGemm, isa: str = "auto", engine: str = "auto") -> Call:
    """:func:`integer_linear` for inputs like ``x``, checked and chosen once (a :data:`Call`)."""
    _check_codes(x, g, 2, x.shape[1])
    module, isa_id = _kernels(x, isa)
    if _engine(engine, g, x.shape[0], module) == "int_mm":
        k16 = g.int8_weights().shape[0]

        def int_mm(x: torch.Tensor) -> torch.Tensor:
            xs = x if g.x_signed else (x ^ 128).view(torch.int8)  # uint8 codes minus 128
            return _int_mm(xs if k16 == g.k else torch.nn.functional.pad(xs, (0, k16 - g.k)), g, module)

        return int_mm
    args, extra = _args(module, g, isa_id)
    return lambda x: module.integer_linear(x, *args, **extra)


def _engine(engine: str, g: IntegerGemm, rows: int, module: object) -> str:
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    cuda = g.offset.device.type == "cuda"
    if engine == "direct":
        raise ValueError("engine='direct' runs convolutions (integer_conv2d); use engine='gradq' or 'int_mm'")
    if engine == "auto":
        fast = g.fits_int8 and rows >= INT_MM_MIN_ROWS and module is not _integer_reference
        return "int_mm" if fast and (not cuda or g.channels % 8 == 0) else "gradq"
    if engine == "int_mm" and not g.fits_int8:
        raise ValueError("engine='int_mm' needs per-channel weights (Wi must fit int8); use engine='gradq'")
    if engine == "int_mm" and cuda and (g.channels % 8 or rows <= 16):
        raise ValueError(f"torch._int_mm on CUDA needs more than 16 rows and a multiple of 8 channels; got {rows} "
                         f"rows and {g.channels} channels: use engine='gradq'")
    return engine


def integer_conv2d(x: torch.Tensor, g: IntegerGemm, kernel: tuple[int, int], stride: tuple[int, int],
                   padding: tuple[int, int], dilation: tuple[int, int], groups: int, isa: str = "auto",
                   engine: str = "auto") -> torch.Tensor:
    """Output codes (N, C, OH, OW), channels last in memory (natively and on CUDA), of input codes ``x``
    (N, C_in, H, W) in any memory format: im2col (padding with the code of a real 0, ``zx``) and the GEMM of
    each of ``groups`` groups, on the device the layer was planned on. ``engine`` as for
    :func:`integer_linear` (``int_mm`` for ``groups == 1`` only; its rows are the N * OH * OW positions), or
    ``direct``: the native direct convolution (no im2col; groups 1, per-channel weights, AVX-512 VNNI),
    which ``auto`` takes wherever it runs: it was measured faster than ``torch._int_mm`` on every
    convolution of the benchmark models and on 6-40 output channels, at batch 1 and 64."""
    return plan_conv2d(x, g, kernel, stride, padding, dilation, groups, isa, engine)(x)


def plan_conv2d(x: torch.Tensor, g: IntegerGemm, kernel: tuple[int, int], stride: tuple[int, int],
                padding: tuple[int, int], dilation: tuple[int, int], groups: int, isa: str = "auto",
                engine: str = "auto") -> Call:
    """:func:`integer_conv2d` for inputs like ``x``, checked and chosen once (a :data:`Call`)."""
    _check_codes(x, g, 4, x.shape[1] // groups * math.prod(kernel))
    module, isa_id = _kernels(x, isa)
    conv = ([int(v) for v in kernel], [int(v) for v in stride], [int(v) for v in padding],
            [int(v) for v in dilation], int(groups), g.zx)
    n, oh, ow = x.shape[0], *(
        (x.shape[2 + i] + 2 * conv[2][i] - conv[3][i] * (conv[0][i] - 1) - 1) // conv[1][i] + 1 for i in range(2)
    )
    direct = _direct_reason(g, groups, module)
    if engine == "direct" and direct:
        raise ValueError(f"engine='direct' {direct}; use engine='int_mm' or 'gradq'")
    if not direct and (engine == "direct" or (engine == "auto" and isa in ("auto", "avx512_vnni"))):
        args = (g.direct_weights(x.shape[1], conv[0], conv[3][1]), g.offset, g.mult, g.shift, g.zo, g.lo, g.hi,
                g.out_signed, *conv[:4], g.zx)
        return lambda x: module.conv2d_direct(x, *args)
    chosen = _engine("gradq" if engine == "auto" and groups != 1 else engine, g, n * oh * ow, module)
    if chosen == "int_mm":
        if groups != 1:
            raise ValueError("engine='int_mm' runs convolutions with groups=1 only; use engine='gradq'")
        if module.__name__ == "gradq._C":  # im2col, products and epilogue tile by tile, in cache
            args = (g.int8_weights(), g.signed_offset, g.mult, g.shift, g.zo, g.lo, g.hi, g.out_signed, *conv[:4],
                    g.zx, CONV_TILE_BYTES)
            return lambda x: module.conv2d_int_mm(x, *args)
        k16 = g.int8_weights().shape[0]

        def int_mm(x: torch.Tensor) -> torch.Tensor:
            cols = module.im2col_codes(x, *conv[:4], 1, k16, g.zx, True).view(torch.int8)
            return _int_mm(cols, g, module).view(n, oh, ow, g.channels).permute(0, 3, 1, 2)  # channels last

        return int_mm
    args, extra = _args(module, g, isa_id)
    return lambda x: module.integer_conv2d(x, *args, *conv, **extra)


def _direct_reason(g: IntegerGemm, groups: int, module: object) -> str:
    """Why the direct convolution cannot run this layer ("" when it can): it needs the native module on a
    CPU with AVX-512 VNNI, groups 1 and per-channel weights."""
    if getattr(module, "__name__", "") != "gradq._C" or not module.conv2d_direct_available():
        return "needs the native kernels on a CPU with AVX-512 VNNI and DQ"
    if groups != 1:
        return "runs convolutions with groups=1 only"
    if not g.fits_int8:
        return "needs per-channel weights (Wi must fit int8)"
    return ""


def max_pool2d_codes(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int],
                     padding: tuple[int, int]) -> torch.Tensor:
    """Max pooling (dilation 1, floor mode) of codes ``x`` (N, C, H, W) uint8/int8, equal to
    ``F.max_pool2d`` on the codes; contiguous or channels-last input (the output keeps its memory format)."""
    return plan_max_pool2d(x, kernel, stride, padding)(x)


def plan_max_pool2d(x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int],
                    padding: tuple[int, int]) -> Call:
    """:func:`max_pool2d_codes` for inputs like ``x`` (a :data:`Call`)."""
    check_tensor("codes", x, dtypes=(torch.uint8, torch.int8), dim=4, contiguous=False)
    f = _code_kernels(x).max_pool2d_codes
    args = ([int(v) for v in kernel], [int(v) for v in stride], [int(v) for v in padding])
    if not x.is_contiguous():
        return lambda x: f(x.contiguous(memory_format=torch.channels_last), *args)
    return lambda x: f(x, *args)


def _dense(t: torch.Tensor) -> bool:
    return t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last)


def add_codes(a: torch.Tensor, b: torch.Tensor, za: int, zb: int, ma: int, mb: int, n: int, zo: int, lo: int,
              hi: int, out_signed: bool) -> torch.Tensor:
    """The integer residual add (docs/integer.md section 5) of uint8/int8 code tensors ``a`` and ``b``:
    ``clamp((((a - za) ma + (b - zb) mb + 2**(n-1)) >> n) + zo, lo, hi)`` as int8 or uint8 codes. Natively
    when both have the same shape and strides (dense, contiguous or channels-last), else by the reference
    (which broadcasts)."""
    return plan_add_codes(a, b, za, zb, ma, mb, n, zo, lo, hi, out_signed)(a, b)


def plan_add_codes(a: torch.Tensor, b: torch.Tensor, za: int, zb: int, ma: int, mb: int, n: int, zo: int, lo: int,
                   hi: int, out_signed: bool) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """:func:`add_codes` for inputs like ``a`` and ``b``: a function of (a, b)."""
    for name, t in (("a", a), ("b", b)):
        check_tensor(name, t, dtypes=(torch.uint8, torch.int8), contiguous=False)
    module = _code_kernels(a)
    if a.shape != b.shape or a.stride() != b.stride() or not _dense(a):
        module = _integer_reference
    f, args = module.add_codes, (za, zb, ma, mb, n, zo, lo, hi, out_signed)
    return lambda a, b: f(a, b, *args)


def avg_pool2d_codes(x: torch.Tensor, kernel: list[int], stride: list[int], padding: list[int],
                     zero_point: int) -> torch.Tensor:
    """Average pooling of uint8/int8 codes ``x`` (N, C, H, W) in any memory format (kept) on their grid: the
    window's mean code rounded to nearest, ties to even (docs/integer.md section 5); natively on the CPU,
    else by the reference."""
    return plan_avg_pool2d(x, kernel, stride, padding, zero_point)(x)


def plan_avg_pool2d(x: torch.Tensor, kernel: list[int], stride: list[int], padding: list[int],
                    zero_point: int) -> Call:
    """:func:`avg_pool2d_codes` for inputs like ``x`` (a :data:`Call`)."""
    check_tensor("codes", x, dtypes=(torch.uint8, torch.int8), dim=4, contiguous=False)
    f = _code_kernels(x).avg_pool2d_codes
    args = ([int(v) for v in kernel], [int(v) for v in stride], [int(v) for v in padding], int(zero_point))
    return lambda x: f(x, *args)


def quantize_codes(x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int,
                   out_signed: bool) -> torch.Tensor:
    """Codes ``clamp(round(fp32(x / scale)) + zero_point, qmin, qmax)`` (int8 or uint8) of float ``x``, as
    ``gradq.quantize`` computes them for a per-tensor uniform scheme; natively for contiguous fp32 CPU
    tensors. Raises ValueError if ``x`` holds NaN or Inf."""
    return plan_quantize_codes(x, scale, zero_point, qmin, qmax, out_signed)(x)


def plan_quantize_codes(x: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int,
                        out_signed: bool) -> Call:
    """:func:`quantize_codes` for inputs like ``x`` (a :data:`Call`)."""
    check_tensor("x", x, dtypes=(torch.float32, torch.float16, torch.bfloat16), contiguous=False)
    module = _code_kernels(x)
    if x.dtype != torch.float32 or not x.is_contiguous():
        module = _integer_reference
    f, args = module.quantize_codes, (float(scale), int(zero_point), int(qmin), int(qmax), out_signed)

    def call(x: torch.Tensor) -> torch.Tensor:
        codes, finite = f(x, *args)
        if not bool(finite):
            raise ValueError("x contains NaN or Inf; uniform quantization needs finite values")
        return codes

    return call


def dequantize_codes(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    """Values ``fp32(q - zero_point) * fp32(scale)`` (float32, x's shape) of int8/uint8 codes ``x``;
    natively for contiguous CPU codes."""
    return plan_dequantize_codes(x, scale, zero_point)(x)


def plan_dequantize_codes(x: torch.Tensor, scale: float, zero_point: int) -> Call:
    """:func:`dequantize_codes` for inputs like ``x`` (a :data:`Call`)."""
    check_tensor("codes", x, dtypes=(torch.uint8, torch.int8), contiguous=False)
    module = _code_kernels(x) if x.is_contiguous() else _integer_reference
    f, args = module.dequantize_codes, (float(scale), int(zero_point))
    return lambda x: f(x, *args)
