"""The prepared model's eval() against an independent oracle of docs/integer.md.

The oracle is written from the document with numpy: fp32 weight scales and codes, im2col (F.unfold) and an
int64 GEMM for the accumulator, float64 bias rounding, frexp multipliers, int64 single-rounding shift. It
takes only the calibrated activation parameters (scale, zero point) from the model. Equality is exact.
"""

import math
import zlib
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gradq
from gradq.fixedpoint import quantize_multiplier, requantize
from gradq.modelquant import QuantConfig, activation_scheme, weight_scheme
from gradq.scheme import PerAxis, PerGroup, PerTensor, QuantScheme

f32 = np.float32


def oracle_weights(w: np.ndarray, scheme: QuantScheme) -> tuple[np.ndarray, np.ndarray]:
    """(Wi int64 (C, K), sw float32 (C,)) per docs/integer.md section 2, min/max range."""
    c = w.shape[0]
    w2 = w.reshape(c, -1).astype(f32)
    gran = scheme.granularity
    g = gran.group_size if isinstance(gran, PerGroup) else w2.shape[1]
    blocks = w2.reshape(c, -1, g) if not isinstance(gran, PerTensor) else w2.reshape(1, 1, -1)
    if scheme.codebook == "sign":
        s = np.abs(blocks.astype(np.float64)).mean(-1).astype(f32)
    else:
        s = (np.abs(blocks).max(-1) / f32(scheme.qmax)).astype(f32)
        s[s == 0] = f32(1)
    if isinstance(gran, PerGroup):
        top = s.max(1)
        safe = np.where(top == 0, f32(1), top).astype(f32)
        r = np.clip(np.ceil((f32(255) * s / safe[:, None]).astype(f32)), 1, 255).astype(np.int64)
        eff = ((top[:, None] * r.astype(f32)).astype(f32) / f32(255)).astype(f32)
        sw = (top / f32(255)).astype(f32)
    else:
        r, eff = np.ones_like(s, dtype=np.int64), s
        sw = np.broadcast_to(s.reshape(-1), (c,)).astype(f32)
    if scheme.codebook == "sign":
        q = np.where(blocks >= 0, 1, -1).astype(np.int64)
    else:
        q = np.clip(np.round((blocks / eff[..., None]).astype(f32)), -scheme.qmax, scheme.qmax).astype(np.int64)
    wi = (q * r[..., None]).reshape(c, -1) if not isinstance(gran, PerTensor) else q.reshape(c, -1)
    return wi, sw


def oracle_requant(acc: np.ndarray, m: np.ndarray, zo: int, lo: int, hi: int, channel_axis: int) -> np.ndarray:
    out = np.empty_like(acc)
    for ch, mc in enumerate(m):
        f, e = math.frexp(float(mc))
        big = round(f * 2**31)
        if big == 2**31:
            big, e = 2**30, e + 1
        n = 31 - e
        if n > 62 or mc == 0:
            big, n = 0, 1
        idx = [slice(None)] * acc.ndim
        idx[channel_axis] = ch
        a = acc[tuple(idx)]
        out[tuple(idx)] = np.clip(((a * big + (1 << (n - 1))) >> n) + zo, lo, hi)
    return out


def oracle_forward(x: torch.Tensor, layer: nn.Module, bn: nn.Module | None, relu: bool, wscheme: QuantScheme,
                   in_q, out_q) -> torch.Tensor:
    w = layer.weight.detach().double()
    b = layer.bias.detach().double() if layer.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    if bn is not None:
        factor = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
        w = w * factor.view(-1, *([1] * (w.dim() - 1)))
        b = (b - bn.running_mean.double()) * factor + bn.bias.detach().double()
    w, b = w.float().numpy(), b.float().numpy()
    wi, sw = oracle_weights(w, wscheme)
    sx, zx = f32(in_q.qparams()[0]), in_q.qparams()[1]
    so, zo = f32(out_q.qparams()[0]), out_q.qparams()[1]
    a = in_q.scheme
    qx = np.clip(np.round((x.numpy().astype(f32) / sx).astype(f32)) + zx, a.qmin, a.qmax).astype(np.int64) - zx
    c = w.shape[0]
    if isinstance(layer, nn.Linear):
        acc = qx @ wi.T
        channel_axis = -1
    else:
        two_d = isinstance(layer, nn.Conv2d)
        q4 = torch.from_numpy(qx).double() if two_d else torch.from_numpy(qx).double().unsqueeze(2)
        ks = layer.kernel_size if two_d else (1, layer.kernel_size[0])
        pad = layer.padding if two_d else (0, layer.padding[0])
        st = layer.stride if two_d else (1, layer.stride[0])
        dil = layer.dilation if two_d else (1, layer.dilation[0])
        cols = F.unfold(q4, ks, dilation=dil, padding=pad, stride=st).numpy().astype(np.int64)  # (N, Cin*k, L)
        groups, cin = layer.groups, q4.shape[1]
        per_in, per_out = (cin // groups) * math.prod(ks), c // groups
        parts = []
        for g in range(groups):
            cg = cols[:, g * per_in:(g + 1) * per_in, :]
            parts.append(np.einsum("ok,nkl->nol", wi[g * per_out:(g + 1) * per_out], cg))
        acc = np.concatenate(parts, axis=1)
        out_hw = [(q4.shape[2 + i] + 2 * pad[i] - dil[i] * (ks[i] - 1) - 1) // st[i] + 1 for i in range(2)]
        acc = acc.reshape(acc.shape[0], c, *(out_hw if two_d else out_hw[1:]))
        channel_axis = 1
    bq = np.round(b.astype(np.float64) / (np.float64(sx) * sw.astype(np.float64))).astype(np.int64)
    shape = [1] * acc.ndim
    shape[channel_axis] = -1
    acc = acc + bq.reshape(shape)
    m = np.float64(sx) * sw.astype(np.float64) / np.float64(so)
    o = out_q.scheme
    lo = max(o.qmin, zo) if relu else o.qmin
    qo = oracle_requant(acc, m, zo, lo, o.qmax, channel_axis)
    return torch.from_numpy((f32(so) * (qo - zo).astype(f32)).astype(f32))


def _bn(channels: int, gen: torch.Generator) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels)
    bn.running_mean = torch.randn(channels, generator=gen) * 0.1
    bn.running_var = torch.rand(channels, generator=gen) + 0.5
    bn.weight.data = torch.rand(channels, generator=gen) + 0.5
    bn.bias.data = torch.randn(channels, generator=gen) * 0.1
    return bn.eval()


LAYERS = {
    "linear": lambda: (nn.Linear(24, 10), (5, 24)),
    "conv2d": lambda: (nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1), (2, 4, 9, 7)),
    "conv2d-dilated-groups": lambda: (nn.Conv2d(6, 4, (3, 2), stride=1, padding=(2, 1), dilation=2, groups=2),
                                      (2, 6, 8, 9)),
    "conv1d": lambda: (nn.Conv1d(3, 5, 4, stride=2, padding=3, dilation=2, bias=False), (3, 3, 17)),
}


def _weight_schemes():
    out = []
    for bits in range(1, 9):
        out.append(weight_scheme(bits))
        out.append(weight_scheme(bits, group_size=6))
        if bits > 1:
            out.append(QuantScheme.uniform(bits, granularity=PerTensor()))
    return out


def _scheme_id(s: QuantScheme) -> str:
    return f"{s.codebook}{s.bits}-{type(s.granularity).__name__}"


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("wscheme", _weight_schemes(), ids=_scheme_id)
@pytest.mark.parametrize("fuse", ["none", "relu", "bn+relu"])
def test_eval_equals_integer_oracle(kind, wscheme, fuse):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{kind}{wscheme}{fuse}".encode()))
    torch.manual_seed(zlib.crc32(f"{fuse}{wscheme}{kind}".encode()))
    layer, shape = LAYERS[kind]()
    bn = _bn(layer.out_channels, gen) if fuse == "bn+relu" and kind == "conv2d" else None
    relu = fuse != "none"
    parts = [layer] + ([bn] if bn is not None else []) + ([nn.ReLU()] if relu else [])
    model = nn.Sequential(*parts).eval()
    abits = 8 if wscheme.bits >= 4 else 4
    config = QuantConfig(weight=wscheme, activation=activation_scheme(abits))
    prepared = gradq.prepare(model, config)
    batches = [torch.randn(shape, generator=gen) * 2 for _ in range(3)]
    gradq.calibrate(prepared, batches, progress=False)
    qlayer = prepared.get_submodule("0")
    x = torch.randn(shape, generator=gen) * 2.5  # some values beyond the calibrated range: saturation
    got = prepared(x)
    # the model's input quantizer rounds x first; the oracle starts from the same codes
    want = oracle_forward(x, layer, bn, relu, wscheme, qlayer.input_quantizer, qlayer.output_quant)
    assert got.dtype == torch.float32
    assert torch.equal(got, want), (got - want).abs().max()
    assert got.unique().numel() > 3, "degenerate output: the test would not see rounding differences"


def test_requantize_is_the_exactly_rounded_product():
    gen = torch.Generator().manual_seed(0)
    m = torch.cat([torch.rand(200, generator=gen, dtype=torch.float64) * 10.0 ** torch.randint(-9, 3, (200,),
                                                                                               generator=gen),
                   torch.tensor([2.0**-31 / 3, 0.5, 1.0, 2.0**29])])
    mult, shift = quantize_multiplier(m)
    for mc, big, n in zip(m.tolist(), mult.tolist(), shift.tolist(), strict=True):
        if big:
            assert 2**30 <= big < 2**31 and 1 <= n <= 62
            assert abs(Fraction(big, 2**n) - Fraction(mc)) <= Fraction(mc) * Fraction(1, 2**30)
        else:
            assert mc < 2.0**-31
    acc = torch.randint(-(2**31) + 1, 2**31 - 1, (50,), generator=gen)
    acc = torch.cat([acc, torch.tensor([0, 1, -1, 2**31 - 1, -(2**31) + 1])])
    for ch in range(len(m)):
        codes = requantize(acc.unsqueeze(1), mult[ch:ch + 1], shift[ch:ch + 1], 0, -(2**62), 2**62, -1)
        for a, v in zip(acc.tolist(), codes.flatten().tolist(), strict=True):
            exact = Fraction(a * mult[ch].item(), 2 ** shift[ch].item())
            assert v == math.floor(exact + Fraction(1, 2)), (a, ch)


def test_requantize_ties_saturation_and_shift_edges():
    mult, shift = torch.tensor([2**30]), torch.tensor([31])  # m = 0.5 exactly
    acc = torch.tensor([[1], [-1], [3], [-3], [5]])
    assert requantize(acc, mult, shift, 0, -128, 127, -1).flatten().tolist() == [1, 0, 2, -1, 3]  # ties up
    big = torch.tensor([[10**6], [-(10**6)]])
    assert requantize(big, mult, shift, 10, -128, 127, -1).flatten().tolist() == [127, -128]
    m1, n1 = quantize_multiplier(torch.tensor([2.0**29], dtype=torch.float64))  # shift 1 (largest multiplier)
    assert n1.item() == 1 and m1.item() == 2**30
    assert requantize(torch.tensor([[3]]), m1, n1, 0, -(2**40), 2**40, -1).item() == 3 * 2**29
    near = torch.tensor([1 - 2.0**-40], dtype=torch.float64)  # rounds up to 2**31: carried into the exponent
    m2, n2 = quantize_multiplier(near)
    assert m2.item() == 2**30 and n2.item() == 30
    with pytest.raises(ValueError, match="2\\*\\*30"):
        quantize_multiplier(torch.tensor([2.0**30], dtype=torch.float64))
    with pytest.raises(ValueError, match="finite"):
        quantize_multiplier(torch.tensor([float("nan")], dtype=torch.float64))


def test_weight_only_eval_uses_the_dequantized_weight():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 8))
    prepared = gradq.prepare(model, "w4")
    x = torch.randn(4, 16)
    wi, sw = oracle_weights(model[0].weight.detach().numpy(), weight_scheme(4))
    w = torch.from_numpy((sw.astype(np.float64)[:, None] * wi).astype(f32))
    assert torch.equal(prepared.eval()(x), F.linear(x, w, model[0].bias))


def test_per_channel_weights_follow_the_core_quantizer():
    torch.manual_seed(2)
    w = torch.randn(6, 10)
    wq = gradq.modelquant.weights.WeightQuantizer(weight_scheme(4), "minmax", w.shape, learn=False)
    wi, sw = wq.integer(w)
    qt = gradq.quantize(w, QuantScheme.uniform(4, granularity=PerAxis(0)))
    assert torch.equal(wi, qt.codes.to(torch.int64)) and torch.equal(sw, qt.scale)
