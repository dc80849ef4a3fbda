"""Gradient code books and stochastic rounding: unbiasedness, variance, error feedback, non-finite input.

Statistical tests use fixed seeds and tolerances of 5 standard deviations derived from the exact
per-element variance of stochastic rounding: a value y between integer levels, p = y - floor(y), is
rounded up with probability p, so the error has mean 0 and variance step^2 * p * (1 - p).
"""

import math

import pytest
import torch

import gradq
from gradq import PerAxis, QuantScheme

DRAWS = 2000


def gradient(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen) * torch.rand(n, generator=gen)


def draws(x: torch.Tensor, scheme: QuantScheme, count: int = DRAWS) -> torch.Tensor:
    """``count`` dequantized draws of x, one per Philox stream offset: (count, *x.shape) float64."""
    return torch.stack(
        [gradq.dequantize(gradq.quantize(x, scheme, seed=2024, offset=t)) for t in range(count)]
    ).double()


def step_and_fraction(x: torch.Tensor, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    y = x.double().abs() / step.double()
    return step.double(), y - torch.floor(y)


def assert_unbiased(samples: torch.Tensor, x: torch.Tensor, step: torch.Tensor) -> None:
    step, p = step_and_fraction(x, step)
    sigma_of_mean = step * torch.sqrt(p * (1 - p) / samples.shape[0])
    grid_bias = step * 2.0**-24  # u lives on a 2^-24 grid
    error = (samples.mean(0) - x.double()).abs()
    assert (error <= 5 * sigma_of_mean + grid_bias + 1e-12).all(), float((error / (sigma_of_mean + 1e-30)).max())


def test_uniform_stochastic_rounding_is_unbiased():
    x = gradient(64, 0).view(8, 8)
    scheme = QuantScheme.uniform(3, rounding="stochastic", granularity=PerAxis(0))
    step = gradq.choose_qparams(x, scheme)[0].view(8, 1).expand(8, 8)
    assert_unbiased(draws(x, scheme), x, step)


@pytest.mark.parametrize("clip", [0.0, 2.5])
def test_terngrad_is_unbiased_inside_the_clipping_range(clip):
    x = gradient(256, 1)
    x[3] = 8.0  # an outlier that clipping at 2.5 RMS cuts
    scheme = QuantScheme.ternary(bucket_size=128, clip=clip)
    samples = draws(x, scheme)
    scales = gradq.quantize(x, scheme, seed=0).scale.repeat_interleave(128)
    assert set(samples.abs().unique().tolist()) <= {0.0, *scales.double().unique().tolist()}
    inside = x.abs() <= scales
    assert_unbiased(samples[:, inside], x[inside], scales[inside])
    if clip:
        assert not inside[3] and (samples[:, 3] == scales[3].double()).all()
    else:
        assert inside.all()


@pytest.mark.parametrize("levels, bucket", [(1, 64), (4, 512), (15, 128)])
def test_qsgd_unbiased_and_variance_within_alistarh_bound(levels, bucket):
    n = 1024
    x = gradient(n, levels)
    scheme = QuantScheme.qsgd(levels, bucket)
    samples = draws(x, scheme, 1000)
    norms = torch.stack([c.double().norm() for c in x.split(bucket)])
    step = (norms / levels).repeat_interleave(bucket).float()
    assert_unbiased(samples, x, step)

    step64, p = step_and_fraction(x, step)
    exact_variance = (step64**2 * p * (1 - p)).split(bucket)
    bound = min(bucket / levels**2, math.sqrt(bucket) / levels)
    for var, norm in zip(exact_variance, norms, strict=True):
        assert float(var.sum()) <= bound * float(norm) ** 2
    # E||Q(v)-v||^2 estimated from the draws; Var of ||Q-v||^2 is sum step^4 p(1-p)(1-2p)^2 per draw.
    squared_error = ((samples - x.double()) ** 2).sum(1)
    expected = float(sum(v.sum() for v in exact_variance))
    sigma = math.sqrt(float((step64**4 * p * (1 - p) * (1 - 2 * p) ** 2).sum()) / samples.shape[0])
    assert abs(float(squared_error.mean()) - expected) <= 5 * sigma


def test_qsgd_codes_hold_level_and_sign():
    x = torch.tensor([3.0, -4.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])  # ||x|| = 5
    qt = gradq.quantize(x, QuantScheme.qsgd(levels=5, bucket_size=8), seed=1)
    assert qt.scale.tolist() == [5.0]
    assert qt.codes.tolist()[:2] == [3, 4 | 8] and qt.codes.tolist()[2:] == [0] * 6  # exact levels 3 and 4
    assert gradq.dequantize(qt).tolist() == x.tolist()


def test_sign_code_and_mean_abs_scale_are_exact():
    x = torch.tensor([1.0, -3.0, 2.0, -2.0, 0.0, 4.0, -1.0, 5.0, -0.0])
    qt = gradq.quantize(x, QuantScheme.sign(bucket_size=8))
    assert qt.codes.tolist() == [0, 1, 0, 1, 0, 0, 1, 0, 0]  # 0 and -0 map to +1
    assert qt.scale.tolist() == [18 / 8, 0.0]
    assert gradq.dequantize(qt).tolist() == [2.25, -2.25, 2.25, -2.25, 2.25, 2.25, -2.25, 2.25, 0.0]


def test_sign_rms_scale_keeps_the_block_norm_unless_capped():
    """scale_from='rms': s = the smallest fp32 with s^2 >= mean x^2, so ||decoded||^2 = n s^2 is the input's
    ||x||^2 up to that rounding up (relative 2^-22 at most), on Gaussian blocks (rms = 1.25 mean |x|); a
    sparse block (rms > 1.5 mean |x|) gets 1.5 mean |x|, which keeps error feedback contracting. The codes
    are mean_abs's."""
    x = torch.randn(5000, generator=torch.Generator().manual_seed(4))
    mean_abs = gradq.quantize(x, QuantScheme.sign(bucket_size=512))
    rms = gradq.quantize(x, QuantScheme.sign(bucket_size=512, scale_from="rms"))
    assert torch.equal(rms.codes, mean_abs.codes)
    decoded = gradq.dequantize(rms).double()
    for block, x_block in zip(decoded.split(512), x.double().split(512), strict=True):
        energy, want = float(block.square().sum()), float(x_block.square().sum())
        assert want <= energy <= want * (1 + 2**-22)
    assert (rms.scale > mean_abs.scale).all()  # rms > mean |x| unless every |x| of a block is equal
    s = gradq.quantize(torch.tensor([3.0, -4.0]), QuantScheme.sign(scale_from="rms")).scale.double()
    assert s**2 >= 12.5 > torch.nextafter(s.float(), torch.tensor(0.0)).double() ** 2  # rms sqrt(12.5), rounded up
    sparse = torch.tensor([4.0, -2.0] + [0.0] * 6)  # mean |x| 0.75, rms sqrt(2.5) = 1.58 > 1.5 * 0.75
    assert gradq.quantize(sparse, QuantScheme.sign(8, scale_from="rms")).scale.tolist() == [1.125]
    with pytest.raises(ValueError, match="binary weights .* take scale_from='mean_abs'"):
        QuantScheme(1, granularity=PerAxis(0), scale_from="rms", codebook="sign")


def test_mean_abs_minimizes_the_sign_residual():
    x = gradient(4096, 3)
    s = float(gradq.quantize(x, QuantScheme.sign()).scale)
    sign = torch.where(x < 0, -1.0, 1.0)

    def residual(scale: float) -> float:
        return float((x - scale * sign).double().square().sum())

    assert residual(s) < residual(s * 1.01) and residual(s) < residual(s * 0.99)


def test_sign_error_feedback_conserves_the_gradient_sum():
    """sum_t decoded_t + r_T == sum_t x_t + r_0: error feedback loses nothing, up to fp32 rounding."""
    n, block, steps = 10_001, 512, 50
    residual = torch.zeros(n)
    applied = torch.zeros(n, dtype=torch.float64)
    total = torch.zeros(n, dtype=torch.float64)
    for t in range(steps):
        x = gradient(n, 100 + t)
        packed, scales = gradq.sign_compress(x, residual, block=block)
        applied += gradq.sign_decompress(packed, scales, block=block, numel=n).double()
        total += x.double()
    drift = (applied + residual.double() - total).abs()
    # each step rounds m = x + r and m - d once in fp32: |error| <= 2 * eps32 * max|m| per step
    assert float(drift.max()) <= steps * 2 * 2**-24 * 8
    assert float(residual.abs().max()) < 8  # bounded memory, not a growing sum


def test_non_finite_gradient_leaves_the_residual_untouched_and_stays_non_finite():
    x = gradient(64, 5)
    residual = gradient(64, 6)
    before = residual.clone()
    x[10] = float("nan")
    x[40] = float("inf")
    packed, scales = gradq.sign_compress(x, residual, block=32)
    assert torch.equal(residual, before)
    decoded = gradq.sign_decompress(packed, scales, block=32, numel=64)
    assert not torch.isfinite(decoded[:32]).any() and not torch.isfinite(decoded[32:]).any()
    for scheme in (QuantScheme.ternary(32), QuantScheme.qsgd(4, 32)):
        values = gradq.dequantize(gradq.quantize(x, scheme, seed=0))
        assert torch.isnan(values).all()  # every block holds a NaN or an Inf
    x[10] = 1.0
    values = gradq.dequantize(gradq.quantize(x, QuantScheme.qsgd(4, 32), seed=0))
    assert torch.isfinite(values[:32]).all() and torch.isnan(values[32:]).all()


def test_error_feedback_is_kept_per_block_where_a_value_is_not_finite():
    x, residual = gradient(96, 7), gradient(96, 8)
    x[40] = float("inf")  # block 1 of 3
    before = residual.clone()
    packed, scales = gradq.sign_compress(x, residual, block=32)
    assert torch.equal(residual[32:64], before[32:64])
    decoded = gradq.sign_decompress(packed, scales, block=32, numel=96)
    m = x + before
    for lo in (0, 64):  # the finite blocks moved on: residual = m - decoded
        assert torch.equal(residual[lo : lo + 32], m[lo : lo + 32] - decoded[lo : lo + 32])
    assert torch.isfinite(residual).all() and not torch.isfinite(decoded[32:64]).any()


@pytest.mark.parametrize(
    "call, exc, words",
    [
        (lambda: gradq.sign_compress(torch.ones(8, dtype=torch.float64), block=8), TypeError, "x must have dtype"),
        (lambda: gradq.sign_compress(torch.ones(2, 8), block=8), ValueError, "x must be 1-D"),
        (lambda: gradq.sign_compress(torch.ones(8), torch.ones(9), block=8), ValueError, "residual must match"),
        (lambda: gradq.sign_compress(torch.ones(8), block=12), ValueError, "multiple of 8"),
        (lambda: gradq.sign_compress(torch.ones(8), block=0), ValueError, "block"),
        (
            lambda: gradq.sign_decompress(torch.zeros(1, dtype=torch.uint8), torch.ones(2), block=8, numel=8),
            ValueError,
            "scales has 2 entries",
        ),
        (lambda: gradq.signmag_compress(torch.ones(8), levels=4, block=8, rule="max", seed=0), ValueError, "rule"),
        (lambda: gradq.signmag_compress(torch.ones(8), levels=200, block=8, rule="l2", seed=0), ValueError, "levels"),
        (
            lambda: gradq.signmag_compress(torch.ones(8), levels=4, block=8, rule="l2", seed=0, clip=2.0),
            ValueError,
            "clip applies",
        ),
        (lambda: gradq.signmag_compress(torch.ones(8), levels=4, block=8, rule="l2", seed=2**64), ValueError, "seed"),
        (
            lambda: gradq.signmag_decompress(
                torch.zeros(3, dtype=torch.uint8), torch.ones(1), levels=4, block=8, numel=8
            ),
            ValueError,
            "packed has 3 bytes",
        ),
        (
            lambda: gradq.signmag_compress(torch.ones(8), levels=4, block=8, rule="absmax", seed=0, escape=True),
            ValueError,
            "escape=True needs rule='l2'",
        ),
        (
            lambda: gradq.signmag_compress(torch.ones(8), levels=4, block=8, rule="l2", seed=0, escape=1),
            TypeError,
            "escape must be True or False",
        ),
        (
            lambda: gradq.signmag_decompress(
                torch.zeros(4, dtype=torch.uint8), torch.ones(1), levels=4, block=8, numel=8, escape=True
            ),
            ValueError,
            "packed has 4 bytes but 8 values in the escape code need 6",
        ),
        (lambda: gradq.philox_uniform(-1, 0), ValueError, "numel"),
        (
            lambda: gradq.kernels.sign_mean_compress(
                torch.zeros(2, 2, dtype=torch.uint8), torch.ones(2, 2), block=8, numel=24
            ),
            ValueError,
            r"need packed_rows \(2, 3\) and scale_rows \(2, 3\)",
        ),
        (
            lambda: gradq.kernels.sign_mean_compress(
                torch.zeros(2, dtype=torch.uint8), torch.ones(2, 1), block=8, numel=8
            ),
            ValueError,
            "packed_rows must be 2-D",
        ),
        (
            lambda: gradq.kernels.signmag_mean_compress(
                torch.zeros(2, 5, dtype=torch.uint8), torch.ones(2, 1), levels=4, block=8, numel=8, rule="l2", seed=0
            ),
            ValueError,
            r"need packed_rows \(2, 4\) and scale_rows \(2, 1\) for 8 values",
        ),
        (
            lambda: gradq.kernels.signmag_mean_compress(
                torch.zeros(2, 2, dtype=torch.uint8), torch.ones(2, 1), levels=1, block=8, numel=8, rule="max", seed=0
            ),
            ValueError,
            "rule must be one of",
        ),
        (
            lambda: gradq.kernels.signmag_mean_compress(
                torch.zeros(2, 2, dtype=torch.uint8),
                torch.ones(2, 1),
                levels=1,
                block=8,
                numel=8,
                rule="absmax",
                seed=0,
                escape=True,
            ),
            ValueError,
            "escape=True needs rule='l2'",
        ),
    ],
)
def test_kernel_bad_input(call, exc, words):
    with pytest.raises(exc, match=words):
        call()


def test_escape_code_sizes():
    """Entries per block: min(levels**2, block) rounded up to 8 (0 at one level); bytes follow format.md."""
    cases = {(1, 64): 0, (2, 64): 8, (3, 8): 8, (4, 512): 16, (8, 16): 16, (127, 4096): 4096}
    assert {key: gradq.signmag_escapes(*key) for key in cases} == cases
    assert gradq.signmag_packed_nbytes(1000, 4, 512, escape=True) == 250 + 2 * 16 * 4 // 8
    assert gradq.signmag_packed_nbytes(1000, 4, 512) == 500
    assert gradq.signmag_packed_nbytes(9, 1, 8, escape=True) == gradq.signmag_packed_nbytes(9, 1, 8) == 3
