"""Quantizer core: exact values, the rounding error bound, granularities, fake quantization, bad input."""

import pytest
import torch

import gradq
from gradq import PerAxis, PerBucket, PerGroup, PerTensor, QuantScheme

UNIFORM_SCHEMES = [
    QuantScheme.uniform(8),
    QuantScheme.uniform(4, signed=False, symmetric=False),
    QuantScheme.uniform(3, symmetric=False),
    QuantScheme.uniform(2, granularity=PerAxis(0)),
    QuantScheme.uniform(5, signed=False, symmetric=False, granularity=PerAxis(-1)),
    QuantScheme.uniform(6, granularity=PerGroup(4, axis=1)),
    QuantScheme.uniform(4, symmetric=False, granularity=PerGroup(8)),
    QuantScheme.uniform(7, granularity=PerBucket(10)),
    QuantScheme.uniform(8, scale_from="norm"),
]


def weights(seed: int = 0) -> torch.Tensor:
    return torch.randn(6, 8, 16, generator=torch.Generator().manual_seed(seed)) * 3


def test_symmetric_codes_exact():
    qt = gradq.quantize(torch.tensor([-7.0, 0.0, 3.5, 2.5, 7.0]), QuantScheme.uniform(4))
    assert qt.scale.item() == 1.0  # max |x| / qmax = 7 / 7
    assert qt.codes.tolist() == [-7, 0, 4, 2, 7]  # halves round to even
    assert qt.codes.dtype == torch.int8 and qt.zero_point is None


def test_affine_codes_and_zero_point_exact():
    qt = gradq.quantize(torch.tensor([-1.0, 3.0]), QuantScheme.uniform(8, signed=False, symmetric=False))
    assert qt.scale.item() == pytest.approx(4 / 255, rel=1e-7)
    assert qt.zero_point.item() == 64  # 0 - round(-1 / (4/255)) = round(63.75)
    assert qt.codes.tolist() == [0, 255]
    assert gradq.dequantize(qt)[1].item() == pytest.approx(3.0, abs=qt.scale.item() / 2)


def test_zero_is_exact_under_affine_schemes():
    x = torch.tensor([0.3, 0.0, 2.7, 1.1])
    scheme = QuantScheme.uniform(3, symmetric=False)
    assert gradq.dequantize(gradq.quantize(x, scheme))[1].item() == 0.0


@pytest.mark.parametrize("scheme", UNIFORM_SCHEMES, ids=repr)
def test_nearest_rounding_error_at_most_half_a_step(scheme):
    x = weights()
    qt = gradq.quantize(x, scheme)
    assert qt.scale.shape == gradq.scale_shape(x.shape, scheme.granularity)
    xhat = gradq.dequantize(qt)
    scale = gradq.dequantize(gradq.QTensor(torch.ones_like(qt.codes), qt.scale, None, scheme, torch.float32))
    if scheme.signed is False and scheme.symmetric:
        x = x.clamp(min=0)
    bound = scale / 2 * (1 + 1e-5) + 1e-6 * x.abs()
    assert ((xhat - x).abs() <= bound).all()


@pytest.mark.parametrize("scheme", UNIFORM_SCHEMES[3:7], ids=repr)
def test_per_channel_and_group_equal_independent_per_tensor_quantization(scheme):
    x = weights(1)
    qt = gradq.quantize(x, scheme)
    gran = scheme.granularity
    axis = gran.axis % x.dim()
    per_tensor = QuantScheme(scheme.bits, scheme.signed, scheme.symmetric, PerTensor())
    if isinstance(gran, PerAxis):
        pieces = [x.select(axis, i) for i in range(x.shape[axis])]
        expected = [gradq.quantize(p, per_tensor).codes for p in pieces]
        actual = [qt.codes.select(axis, i) for i in range(x.shape[axis])]
    else:
        g = gran.group_size
        pieces = x.split(g, dim=axis)
        expected = []
        actual = [c for c in qt.codes.split(g, dim=axis)]
        for p in pieces:
            rows = p.movedim(axis, -1).reshape(-1, g)
            codes = torch.stack([gradq.quantize(r, per_tensor).codes for r in rows])
            expected.append(codes.view(p.movedim(axis, -1).shape).movedim(-1, axis))
    for a, e in zip(actual, expected, strict=True):
        assert torch.equal(a, e)


@pytest.mark.parametrize("scheme", UNIFORM_SCHEMES, ids=repr)
def test_all_zero_and_constant_tensors_have_no_nan(scheme):
    zeros = torch.zeros(4, 8, 16)
    qt = gradq.quantize(zeros, scheme)
    assert (qt.scale == 1).all() and torch.equal(gradq.dequantize(qt), zeros)
    const = torch.full((4, 8, 16), 2.5)
    qt = gradq.quantize(const, scheme)
    step = gradq.dequantize(gradq.QTensor(torch.ones_like(qt.codes), qt.scale, None, scheme, torch.float32))
    xhat = gradq.dequantize(qt)
    assert torch.isfinite(xhat).all()
    assert ((xhat - const).abs() <= step / 2 * (1 + 1e-6)).all()
    if scheme.scale_from == "minmax":  # the extreme value maps onto the top code exactly
        assert torch.allclose(xhat, const, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_round_trip_in_their_dtype(dtype):
    x = weights().to(dtype)
    xhat = gradq.dequantize(gradq.quantize(x, QuantScheme.uniform(8)))
    assert xhat.dtype == dtype
    step = x.float().abs().max() / 127
    assert (xhat.float() - x.float()).abs().max() <= step / 2 + x.float().abs().max() * 2**-7


def test_given_scale_clamps_out_of_range_values():
    x = torch.tensor([-5.0, -0.25, 0.0, 0.26, 5.0])
    qt = gradq.quantize(x, QuantScheme.uniform(4), scale=torch.tensor(0.5))
    assert qt.codes.tolist() == [-7, 0, 0, 1, 7]  # -0.5 rounds half to even: 0


def test_stochastic_rounding_is_reproducible_and_seeded():
    x, scheme = weights(), QuantScheme.uniform(4, rounding="stochastic")
    a = gradq.quantize(x, scheme, seed=11).codes
    assert torch.equal(a, gradq.quantize(x, scheme, seed=11).codes)
    assert not torch.equal(a, gradq.quantize(x, scheme, seed=12).codes)
    assert not torch.equal(a, gradq.quantize(x, scheme, seed=11, offset=1).codes)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(gradq.quantize(x, scheme, generator=g1).codes, gradq.quantize(x, scheme, generator=g2).codes)
    torch.manual_seed(3)
    b = gradq.quantize(x, scheme).codes
    torch.manual_seed(3)
    assert torch.equal(b, gradq.quantize(x, scheme).codes)


def test_stochastic_codes_are_the_floor_of_y_plus_philox_uniforms():
    x = weights()
    scheme = QuantScheme.uniform(5, rounding="stochastic", granularity=PerAxis(1))
    qt = gradq.quantize(x, scheme, seed=42, offset=9)
    u = gradq.philox_uniform(x.numel(), 42, 9).view(x.shape)
    scale = qt.scale.view(1, -1, 1)
    expected = torch.floor(x / scale + u).clamp(scheme.qmin, scheme.qmax)
    assert torch.equal(qt.codes.to(torch.float32), expected)


@pytest.mark.parametrize(
    "scheme",
    [QuantScheme.uniform(8), QuantScheme.uniform(3, symmetric=False, rounding="stochastic", granularity=PerAxis(0))],
    ids=repr,
)
def test_fake_quantize_forward_is_exactly_dequantize_of_quantize(scheme):
    x = weights()
    assert torch.equal(gradq.fake_quantize(x, scheme, seed=4), gradq.dequantize(gradq.quantize(x, scheme, seed=4)))


def test_fake_quantize_gradient_is_the_straight_through_mask():
    x = torch.linspace(-3, 3, 61, requires_grad=True)
    scheme, scale = QuantScheme.uniform(4), torch.tensor(0.25)
    out = gradq.fake_quantize(x, scheme, scale=scale)
    upstream = torch.randn(61, generator=torch.Generator().manual_seed(0))
    out.backward(upstream)
    unclamped = torch.round(x.detach() / scale)
    mask = (unclamped >= -7) & (unclamped <= 7)
    assert 0 < int(mask.sum()) < 61
    assert torch.equal(x.grad, upstream * mask)
    assert torch.equal(out.detach(), gradq.dequantize(gradq.quantize(x.detach(), scheme, scale=scale)))


def test_fake_quantize_affine_per_channel_mask():
    x = weights().requires_grad_()
    scheme = QuantScheme.uniform(4, symmetric=False, granularity=PerAxis(0))
    scale = torch.full((6,), 0.1)
    zero_point = torch.full((6,), 3, dtype=torch.int32)
    gradq.fake_quantize(x, scheme, scale=scale, zero_point=zero_point).sum().backward()
    unclamped = torch.round(x.detach() / 0.1) + 3
    assert torch.equal(x.grad, ((unclamped >= -8) & (unclamped <= 7)).float())


@pytest.mark.parametrize(
    "make, exc, words",
    [
        (lambda: QuantScheme(bits=0), ValueError, "bits"),
        (lambda: QuantScheme(bits=9), ValueError, "bits"),
        (lambda: QuantScheme(bits=1), ValueError, "bits >= 2"),
        (lambda: QuantScheme(rounding="floor"), ValueError, "rounding"),
        (lambda: QuantScheme(granularity="channel"), TypeError, "granularity"),
        (lambda: QuantScheme(symmetric=False, scale_from="norm"), ValueError, "symmetric=True"),
        (lambda: QuantScheme(scale_from="mean_abs"), ValueError, "scale_from"),
        (lambda: QuantScheme(codebook="nf4"), ValueError, "codebook"),
        (lambda: QuantScheme.qsgd(levels=0), ValueError, "levels"),
        (lambda: QuantScheme.qsgd(levels=128), ValueError, "levels"),
        (lambda: QuantScheme.qsgd(bucket_size=100), ValueError, "multiple of 8"),
        (lambda: QuantScheme.ternary(clip=-1.0), ValueError, "clip"),
        (lambda: QuantScheme(2, granularity=PerAxis(0), codebook="sign_magnitude", levels=1), ValueError, "PerTensor"),
        (lambda: PerGroup(0), ValueError, "group_size"),
        (lambda: PerBucket(-4), ValueError, "bucket_size"),
    ],
)
def test_invalid_schemes_are_rejected_with_a_reason(make, exc, words):
    with pytest.raises(exc, match=words):
        make()


@pytest.mark.parametrize(
    "call, exc, words",
    [
        (lambda: gradq.quantize(torch.arange(4), QuantScheme()), TypeError, "x must have dtype"),
        (lambda: gradq.quantize(torch.ones(4), "int8"), TypeError, "scheme"),
        (lambda: gradq.quantize(torch.tensor([1.0, float("nan")]), QuantScheme()), ValueError, "NaN or Inf"),
        (lambda: gradq.quantize(torch.ones(3, 5), QuantScheme(granularity=PerGroup(4))), ValueError, "multiple of 4"),
        (lambda: gradq.quantize(torch.ones(3, 5), QuantScheme(granularity=PerAxis(2))), ValueError, "out of range"),
        (
            lambda: gradq.quantize(torch.ones(4), QuantScheme(), scale=torch.ones(2)),
            ValueError,
            "scale must have shape",
        ),
        (lambda: gradq.quantize(torch.ones(4), QuantScheme(), scale=torch.tensor(0.0)), ValueError, "finite and > 0"),
        (
            lambda: gradq.quantize(torch.ones(4), QuantScheme(), scale=torch.tensor(1.0), zero_point=torch.tensor(0)),
            ValueError,
            "zero_point is only",
        ),
        (
            lambda: gradq.quantize(torch.ones(4), QuantScheme(symmetric=False), scale=torch.tensor(1.0)),
            ValueError,
            "needs zero_point",
        ),
        (
            lambda: gradq.quantize(
                torch.ones(4), QuantScheme(rounding="stochastic"), seed=1, generator=torch.Generator()
            ),
            ValueError,
            "either seed or generator",
        ),
        (lambda: gradq.quantize(torch.ones(4), QuantScheme(rounding="stochastic"), seed=-1), ValueError, "seed"),
        (lambda: gradq.fake_quantize(torch.ones(8), QuantScheme.sign()), ValueError, "uniform"),
        (lambda: gradq.dequantize(torch.ones(3)), TypeError, "QTensor"),
    ],
)
def test_bad_input_raises_a_clear_error(call, exc, words):
    with pytest.raises(exc, match=words):
        call()


@pytest.mark.parametrize("granularity", [PerAxis(0), PerGroup(4, axis=1)])
def test_sign_per_channel_or_group_is_mean_abs_and_round_trips(granularity):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 8, generator=gen)
    x[2] = 0.0
    scheme = QuantScheme(1, granularity=granularity, scale_from="mean_abs", codebook="sign")
    qt = gradq.quantize(x, scheme)
    rows = x.reshape(6, -1) if isinstance(granularity, PerAxis) else x.reshape(6, 2, 4)
    want = rows.double().abs().mean(-1).float()
    assert torch.equal(qt.scale, want)
    assert torch.equal(qt.codes, (x < 0).to(torch.uint8))
    expand = qt.scale[:, None] if isinstance(granularity, PerAxis) else qt.scale.repeat_interleave(4, dim=1)
    assert torch.equal(gradq.dequantize(qt), torch.where(x < 0, -expand, expand))
    payload = gradq.encode_payload(qt)
    assert payload.numel() == gradq.payload_nbytes(x.shape, scheme)
    back = gradq.decode_payload(payload, x.shape, scheme)
    assert torch.equal(back.codes, qt.codes) and torch.equal(back.scale, qt.scale)
    with pytest.raises(ValueError, match="NaN or Inf"):
        gradq.quantize(torch.tensor([[1.0, float("nan")]]), scheme if isinstance(granularity, PerAxis) else
                       QuantScheme(1, granularity=PerAxis(0), scale_from="mean_abs", codebook="sign"))
    with pytest.raises(ValueError, match="PerTensor"):
        QuantScheme(1, granularity=PerBucket(12), scale_from="mean_abs", codebook="sign")


@pytest.mark.parametrize("scheme", [
    QuantScheme.uniform(8, signed=False, symmetric=False),
    QuantScheme.uniform(8, signed=True, symmetric=False),
    QuantScheme.uniform(8),
    QuantScheme.uniform(8, scale_from="norm"),
])
def test_finite_values_near_the_fp32_maximum_give_finite_codes_and_values(scheme):
    # [3e38, -3e38, 1]: hi - lo and the l2 norm pass the fp32 maximum; before, the scale became inf and
    # every dequantized value NaN
    x = torch.tensor([3e38, -3e38, 1.0])
    qt = gradq.quantize(x, scheme)
    assert bool(torch.isfinite(qt.scale).all())
    values = gradq.dequantize(qt)
    assert bool(torch.isfinite(values).all())
    assert float((values - x).abs().max()) <= float(qt.scale) * 1.0001  # within one step (half, plus clamping)


def test_a_scale_past_the_fp32_maximum_is_a_clear_error():
    x = torch.full((100_000,), 3e38)  # per-tensor l2 norm / qmax > 3.4e38
    with pytest.raises(ValueError, match="scale would exceed the fp32 maximum"):
        gradq.quantize(x, QuantScheme.uniform(8, scale_from="norm"))
