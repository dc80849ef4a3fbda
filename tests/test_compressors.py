"""Compressors and error-feedback memory, in one process."""

import pytest
import torch

import gradq
from gradq import ErrorFeedback, QuantScheme

ALL = ["none", "fp16", "bf16", "onebit", "terngrad", "qsgd"]


def grad(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def test_registry_lists_every_compressor_and_rejects_unknown_names():
    assert gradq.available_compressors() == sorted(ALL)
    with pytest.raises(ValueError, match="unknown compressor 'topk'; registered: bf16, fp16, none, onebit, qsgd"):
        gradq.get_compressor("topk")
    with pytest.raises(TypeError, match="bad options for compressor 'qsgd'"):
        gradq.get_compressor("qsgd", bits=3)
    with pytest.raises(ValueError, match="levels"):
        gradq.get_compressor("qsgd", levels=0)
    with pytest.raises(ValueError, match="multiple of 8"):
        gradq.get_compressor("onebit", block=100)
    with pytest.raises(ValueError, match="onebit's scale is one of 'mean', 'rms', got 'max'"):
        gradq.get_compressor("onebit", scale="max")
    assert gradq.OneBit(scale="mean").config() != gradq.OneBit().config()  # ranks that disagree are told
    with pytest.raises(ValueError, match="already registered"):
        gradq.register_compressor(gradq.OneBit)
    instance = gradq.QSGD(levels=7)
    assert gradq.get_compressor(instance) is instance


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("n", [0, 1, 9, 1000, 70_001])
def test_payload_size_and_round_trip(name, n):
    comp = gradq.get_compressor(name)
    x = grad(n, n)
    payload = comp.compress(x, seed=5, offset=2)
    assert payload.dtype == torch.uint8 and payload.numel() == comp.payload_nbytes(n)
    y = comp.decompress(payload, n)
    assert y.dtype == torch.float32 and y.shape == (n,)
    if name == "none":
        assert torch.equal(y, x)
    elif name in ("fp16", "bf16"):
        assert torch.equal(y, x.to(getattr(torch, {"fp16": "float16", "bf16": "bfloat16"}[name])).float())


def test_code_book_compressors_match_the_quantizer_core():
    """A compressor's payload decodes to exactly what gradq.quantize/dequantize give for the same scheme."""
    x = grad(5000, 1)
    cases = [
        (gradq.OneBit(block=1024), QuantScheme.sign(1024, scale_from="rms")),
        (gradq.OneBit(block=1024, scale="mean"), QuantScheme.sign(1024)),
        (gradq.TernGrad(block=2048, clip=2.5), QuantScheme.ternary(2048, clip=2.5)),
        (gradq.QSGD(levels=4, block=512), QuantScheme.qsgd(4, 512)),
    ]
    for comp, scheme in cases:
        decoded = comp.decompress(comp.compress(x, seed=9, offset=4), x.numel())
        assert torch.equal(decoded, gradq.dequantize(gradq.quantize(x, scheme, seed=9, offset=4))), comp


def test_payload_sizes_give_the_expected_compression():
    n = 1 << 20
    # 1 bit per value and an fp32 scale per block of 512: 32 / (1 + 32 / 512) = 30.1x
    assert gradq.OneBit().payload_nbytes(n) == n // 8 + 4 * (n // 512)
    fp32 = gradq.get_compressor("none").payload_nbytes(n)
    assert fp32 / gradq.OneBit().payload_nbytes(n) == pytest.approx(30.12, 1e-3)
    # TernGrad: 2 bits per value and an fp32 scale per block of 512: 32 / (2 + 32 / 512) = 15.5x
    assert gradq.TernGrad().payload_nbytes(n) == n // 4 + 4 * (n // 512)
    assert fp32 / gradq.TernGrad().payload_nbytes(n) == pytest.approx(15.515, 1e-4)
    # QSGD at 4 levels, blocks of 512: 2-bit symbols + 16 escape entries of 4 bits + a scale per block
    four = gradq.QSGD(levels=4)
    assert four.escape and four.payload_nbytes(n) == n // 4 + (n // 512) * (8 + 4)
    assert fp32 / four.payload_nbytes(n) == pytest.approx(14.63, 1e-3)
    # the default 7 levels: 56 escape entries of 4 bits (room for 7^2 = 49, rounded up to a multiple of 8)
    assert gradq.QSGD().escape and gradq.QSGD().payload_nbytes(n) == n // 4 + (n // 512) * (28 + 4)
    assert fp32 / gradq.QSGD().payload_nbytes(n) == 12.8
    # levels=1 is the plain 2-bit code; at 127 levels the escape code would be larger, so the plain 8 bits
    assert not gradq.QSGD(levels=1).escape and gradq.QSGD(levels=1).payload_nbytes(n) == n // 4 + n // 128
    assert not gradq.QSGD(levels=127).escape and gradq.QSGD(levels=127).payload_nbytes(n) == n + n // 128
    assert gradq.get_compressor("fp16").payload_nbytes(n) == 2 * n


def test_half_precision_input_is_accepted():
    x = grad(4096, 2)
    comp = gradq.OneBit(block=512)
    assert torch.equal(comp.compress(x.half()), comp.compress(x.half().float()))


def test_decompress_rejects_mismatched_payloads():
    comp = gradq.QSGD()
    payload = comp.compress(grad(1000, 0), seed=0)
    with pytest.raises(ValueError, match="payload has 314 bytes but qsgd needs 1256 for 4000 values"):
        comp.decompress(payload, 4000)
    with pytest.raises(TypeError, match="x must have dtype"):
        comp.compress(torch.arange(10))


@pytest.mark.parametrize("name", ["onebit", "onebit-mean", "terngrad", "qsgd", "fp16"])
def test_error_feedback_memory_conserves_the_sum(name):
    """sum of decoded payloads + final residual == sum of inputs (fused path for onebit, generic otherwise).

    Each step rounds m = x + r and m - decoded once in fp32, so the drift is at most 2 eps32 |values| per
    step. QSGD is not contractive, so its residual grows large under error feedback: the bound scales with
    the largest magnitude seen.
    """
    comp = gradq.OneBit(scale="mean") if name == "onebit-mean" else gradq.get_compressor(name)
    memory = ErrorFeedback()
    n, steps = 3001, 40
    applied = torch.zeros(n, dtype=torch.float64)
    total = torch.zeros(n, dtype=torch.float64)
    largest = 0.0
    for t in range(steps):
        x = grad(n, 50 + t)
        payload = memory.compress(comp, x, "layer", seed=3, offset=t)
        decoded = comp.decompress(payload, n)
        applied += decoded.double()
        total += x.double()
        largest = max(largest, float(decoded.abs().max()), float(memory.residuals["layer"].abs().max()))
    residual = memory.residuals["layer"].double()
    assert float((applied + residual - total).abs().max()) <= steps * 4 * 2**-24 * largest


@pytest.mark.parametrize("name", ["onebit", "terngrad", "fp16"])
def test_error_feedback_never_absorbs_non_finite_values(name):
    comp, memory = gradq.get_compressor(name), ErrorFeedback()
    memory.compress(comp, grad(64, 0), 0)
    before = memory.residuals[0].clone()
    bad = grad(64, 1)
    bad[7] = float("nan") if name != "fp16" else 1e6  # fp16: a finite input that overflows the payload
    payload = memory.compress(comp, bad, 0, seed=1)
    assert torch.equal(memory.residuals[0], before)
    assert not torch.isfinite(comp.decompress(payload, 64)).all()


def test_error_feedback_state_round_trip_and_shape_check():
    comp, memory = gradq.OneBit(block=64), ErrorFeedback()
    memory.compress(comp, grad(100, 0), (3, 1))
    saved = memory.state_dict()
    other = ErrorFeedback()
    other.load_state_dict(saved)
    assert torch.equal(other.residuals[(3, 1)], memory.residuals[(3, 1)])
    with pytest.raises(ValueError, match="a key must always name a tensor of the same size"):
        memory.compress(comp, grad(101, 0), (3, 1))


@pytest.mark.parametrize("choice", ["native", "reference"])
def test_qsgd_on_values_whose_norm_passes_the_fp32_maximum_is_a_clear_error(choice, monkeypatch):
    # gradients of 1e38: each block's l2 norm is past 3.4e38, so no fp32 scale holds it; this used to decode
    # to NaN silently
    monkeypatch.setenv("GRADQ_KERNELS", choice)
    x = torch.full((4096,), 1e38)
    x[::3] = -1e38
    with pytest.raises(ValueError, match="l2 norm exceeds the fp32 maximum"):
        gradq.QSGD().compress(x, seed=1)
    # the server step re-encodes a mean of decoded payloads: its own overflow is caught the same way
    big = torch.full((512,), 1.5e37)
    payloads = torch.stack([gradq.QSGD().compress(big, seed=s) for s in range(2)])
    with pytest.raises(ValueError, match="l2 norm exceeds the fp32 maximum"):
        gradq.QSGD().fused_mean_compress(payloads, 512, None, seed=3)
    # TernGrad's max |x| scale cannot overflow: finite in, finite out
    decoded = gradq.TernGrad().decompress(gradq.TernGrad().compress(x, seed=1), x.numel())
    assert bool(torch.isfinite(decoded).all()) and float(decoded.abs().max()) == float(x.abs().max())


@pytest.mark.parametrize("choice", ["native", "reference"])
def test_inf_gradients_stay_visible_and_are_not_the_norm_error(choice, monkeypatch):
    monkeypatch.setenv("GRADQ_KERNELS", choice)
    x = torch.ones(1024)
    x[5] = float("inf")
    decoded = gradq.QSGD().decompress(gradq.QSGD().compress(x, seed=1), x.numel())
    assert not bool(torch.isfinite(decoded).all())  # AMP's GradScaler still sees the overflow
