"""The Triton kernels (gradq/_triton_kernels.py) against the pure-PyTorch reference on the CPU, bit for bit.

Without a GPU (CI) they run through Triton's interpreter on CPU tensors (tests/conftest.py sets
TRITON_INTERPRET=1); on a machine with CUDA the same tests run the compiled kernels on the GPU
(benchmarks/gpu.py). Sizes are small and odd: partial groups of 8, short last blocks, several programs.
"""

import sys
import types

import pytest
import torch

import gradq
from gradq import _backend, _reference, kernels
from tests.conftest import assert_same_bits

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's overflow and 0/0 in the interpreter


@pytest.fixture
def on_triton(monkeypatch):
    """Runs gradq.kernels' entry points on the Triton kernels; returns a function that computes the same call
    with the reference on CPU copies of the arguments (the residual, which calls mutate, is cloned)."""
    monkeypatch.setenv("GRADQ_KERNELS", "triton")

    def reference(fn, *args, **kw):
        monkeypatch.setenv("GRADQ_KERNELS", "reference")
        try:
            cpu = [a.detach().cpu().clone() if isinstance(a, torch.Tensor) else a for a in args]
            kw = {k: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
            return fn(*cpu, **kw), cpu, kw
        finally:
            monkeypatch.setenv("GRADQ_KERNELS", "triton")

    return reference


def gradients(n: int, seed: int, special: bool = True) -> torch.Tensor:
    """Heavy-tailed values with zeros of both signs, subnormals and (``special``) NaN, Inf and values whose
    squares overflow fp32."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.rand(n, generator=g).pow(4) * 10
    x[:: max(1, n // 7)] = 0.0
    x[1 :: max(1, n // 5)] = -0.0
    if n > 40:
        x[20] = 1e-41
        x[21] = -3e-45
        if special:
            x[30] = float("nan")
            x[n - 3] = float("-inf")
            x[n // 2 : n // 2 + 3] = torch.tensor([3e38, -3e38, 2e38])
    return x


def cuda(t: torch.Tensor) -> torch.Tensor:
    return t.to(DEVICE)


def test_the_triton_backend_is_what_runs(on_triton):
    assert _backend.uses_triton(torch.empty(0, device=DEVICE))


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [0, 1, 7, 9, 1031, 2053])
def test_pack_and_unpack_equal_the_reference(on_triton, bits, n):
    codes = torch.randint(0, 1 << bits, (n,), generator=torch.Generator().manual_seed(bits * n), dtype=torch.uint8)
    packed = kernels.pack_bits(cuda(codes), bits)
    expected, _, _ = on_triton(kernels.pack_bits, codes, bits)
    assert_same_bits(packed.cpu(), expected)
    assert_same_bits(kernels.unpack_bits(packed, bits, n).cpu(), codes)


def test_philox_matches_the_known_answer_and_the_reference(on_triton):
    words = torch.tensor([0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8], dtype=torch.int64)
    assert_same_bits(kernels.philox_uniform(4, 0, 0, device=DEVICE).cpu(), (words >> 8).float() * 2.0**-24)
    for n, seed, offset in [(1, 3, 0), (1031, 2**64 - 1, 2**64 - 1), (37, 2**40 + 7, 2**33 + 1)]:
        expected, _, _ = on_triton(kernels.philox_uniform, n, seed, offset)
        assert_same_bits(kernels.philox_uniform(n, seed, offset, device=DEVICE).cpu(), expected)


@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("block", [8, 64, 520])
@pytest.mark.parametrize("with_residual", [False, True])
def test_sign_code_equals_the_reference(on_triton, block, with_residual, rms):
    n = 1037
    x = gradients(n, block, special=block < 520)  # with 520, one block stays finite
    residual = gradients(n, block + 1, special=False) if with_residual else None
    before = None if residual is None else residual.clone()
    (packed, scales), cpu, _ = on_triton(kernels.sign_compress, x, residual, block=block, rms=rms)
    device_residual = None if residual is None else cuda(residual)
    got_packed, got_scales = kernels.sign_compress(cuda(x), device_residual, block=block, rms=rms)
    assert_same_bits(got_packed.cpu(), packed)
    assert_same_bits(got_scales.cpu(), scales)
    if with_residual:
        assert_same_bits(device_residual.cpu(), cpu[1])  # updated where the block is finite, kept elsewhere
        kept = ~torch.isfinite(scales).repeat_interleave(block)[:n]  # blocks holding a NaN/Inf keep theirs
        assert torch.equal(cpu[1][kept], before[kept]) and torch.isfinite(cpu[1]).all()
        assert not torch.equal(cpu[1][~kept], before[~kept])
    decoded, _, _ = on_triton(kernels.sign_decompress, packed, scales, block=block, numel=n)
    assert_same_bits(kernels.sign_decompress(got_packed, got_scales, block=block, numel=n).cpu(), decoded)
    out = gradients(n, 7, special=False)
    added, _, _ = on_triton(kernels.sign_decompress, packed, scales, block=block, numel=n, out=out, accumulate=True)
    device_out = cuda(out)
    kernels.sign_decompress(got_packed, got_scales, block=block, numel=n, out=device_out, accumulate=True)
    assert_same_bits(device_out.cpu(), added)


CODES = [  # (levels, rule, clip, escape): TernGrad unclipped and clipped (2.3 is not an fp32), QSGD plain/escape
    (1, "absmax", 0.0, False),
    (1, "absmax", 2.5, False),
    (1, "absmax", 2.3, False),
    (3, "l2", 0.0, False),
    (1, "l2", 0.0, False),
    (8, "l2", 0.0, True),
    (127, "l2", 0.0, True),
]


@pytest.mark.parametrize(("levels", "rule", "clip", "escape"), CODES)
@pytest.mark.parametrize("block", [8, 520])
def test_sign_magnitude_code_equals_the_reference(on_triton, levels, rule, clip, escape, block):
    n = 1037
    x = gradients(n, levels * block, special=block == 8)  # special values only in small blocks: most stay finite
    if rule == "l2" and block == 8:
        x[n // 2 : n // 2 + 3] = torch.tensor([3e18, -3e18, 2e-30])  # finite norm, squares far apart
    settings = dict(levels=levels, block=block, rule=rule, seed=levels + 2**63, offset=5, clip=clip, escape=escape)
    (packed, scales), _, _ = on_triton(kernels.signmag_compress, x, **settings)
    got_packed, got_scales = kernels.signmag_compress(cuda(x), **settings)
    assert_same_bits(got_packed.cpu(), packed)
    assert_same_bits(got_scales.cpu(), scales)
    code = dict(levels=levels, block=block, numel=n, escape=escape)
    decoded, _, _ = on_triton(kernels.signmag_decompress, packed, scales, **code)
    assert_same_bits(kernels.signmag_decompress(got_packed, got_scales, **code).cpu(), decoded)


@pytest.mark.parametrize(("levels", "rule", "clip", "escape"), [CODES[1], CODES[5]])
def test_sign_magnitude_server_step_equals_the_reference(on_triton, levels, rule, clip, escape):
    n, block, settings = 531, 64, dict(levels=levels, rule=rule, clip=clip, escape=escape)
    rows = [kernels.signmag_compress(gradients(n, r, special=False), block=block, seed=r, **settings) for r in range(3)]
    packed_rows, scale_rows = (torch.stack(t).cpu() for t in zip(*rows, strict=True))
    step = dict(block=block, numel=n, seed=9, offset=2, **settings)
    (packed, scales), _, _ = on_triton(kernels.signmag_mean_compress, packed_rows, scale_rows, **step)
    got_packed, got_scales = kernels.signmag_mean_compress(cuda(packed_rows), cuda(scale_rows), **step)
    assert_same_bits(got_packed.cpu(), packed)
    assert_same_bits(got_scales.cpu(), scales)


@pytest.mark.parametrize("rms", [False, True])
def test_sign_server_step_equals_the_reference(on_triton, rms):
    n, block = 531, 64
    rows = [kernels.sign_compress(gradients(n, r, special=False), block=block, rms=rms) for r in range(3)]
    packed_rows, scale_rows = (torch.stack(t).cpu() for t in zip(*rows, strict=True))
    residual = gradients(n, 5, special=False)
    (packed, scales), cpu, _ = on_triton(kernels.sign_mean_compress, packed_rows, scale_rows, residual, block=block,
                                         numel=n, rms=rms)
    device_residual = cuda(residual)
    got = kernels.sign_mean_compress(cuda(packed_rows), cuda(scale_rows), device_residual, block=block, numel=n,
                                     rms=rms)
    assert_same_bits(got[0].cpu(), packed)
    assert_same_bits(got[1].cpu(), scales)
    assert_same_bits(device_residual.cpu(), cpu[2])


def test_corrupt_escape_payload_raises_on_triton(on_triton):
    packed, scales = kernels.signmag_compress(cuda(gradients(64, 1, special=False)), levels=2, block=64, rule="l2",
                                              seed=0, escape=True)
    corrupt = packed.clone()
    corrupt[:16] = 0b10101010  # every value an escape: 64 escape symbols for 8 entries
    out = cuda(torch.ones(64))
    with pytest.raises(ValueError, match="more than 8 escape symbols"):
        kernels.signmag_decompress(corrupt, scales, levels=2, block=64, numel=64, escape=True, out=out,
                                   accumulate=True)
    assert torch.equal(out.cpu(), torch.ones(64))  # raised before writing anything


@pytest.mark.parametrize("name", ["onebit", "terngrad", "qsgd"])
def test_compressors_send_the_same_payload_on_triton(on_triton, name):
    compressor = gradq.get_compressor(name, block=256)  # 9 blocks, the last one short
    x = gradients(2053, 3, special=False)
    expected, _, _ = on_triton(lambda t: compressor.decompress(compressor.compress(t, seed=4, offset=1), 2053), x)
    assert_same_bits(compressor.decompress(compressor.compress(cuda(x), seed=4, offset=1), 2053).cpu(), expected)


def fake_cuda_tensor() -> object:
    """Stands for a CUDA tensor where there is none: dispatch reads only ``device``."""
    return types.SimpleNamespace(device=torch.device("cuda", 0))


def test_dispatch_by_device_and_setting(monkeypatch):
    from gradq import _triton_kernels

    monkeypatch.setenv("GRADQ_KERNELS", "auto")
    assert _backend.kernels_for(torch.empty(0)) is _backend._C  # CPU tensors: the native kernels
    monkeypatch.setattr(_triton_kernels, "INTERPRETED", False)  # Triton compiling for a GPU
    assert _backend.kernels_for(fake_cuda_tensor()) is _triton_kernels
    monkeypatch.setenv("GRADQ_KERNELS", "triton")
    with pytest.raises(ValueError, match=r"run on CUDA tensors, got one on cpu.*TRITON_INTERPRET=1"):
        _backend.kernels_for(torch.empty(0))
    monkeypatch.setattr(_triton_kernels, "INTERPRETED", True)  # the interpreter cannot run CUDA tensors
    assert _backend.kernels_for(torch.empty(0)) is _triton_kernels
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET is set"):
        _backend.kernels_for(fake_cuda_tensor())
    monkeypatch.setenv("GRADQ_KERNELS", "reference")
    assert _backend.kernels_for(fake_cuda_tensor()) is _reference
    monkeypatch.setenv("GRADQ_KERNELS", "native")
    with pytest.raises(ValueError, match="CPU tensors only"):
        _backend.kernels_for(fake_cuda_tensor())


def test_cuda_tensors_without_triton_get_a_clear_error(monkeypatch):
    monkeypatch.setenv("GRADQ_KERNELS", "auto")
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton now raises ImportError
    monkeypatch.delitem(sys.modules, "gradq._triton_kernels", raising=False)
    monkeypatch.delattr(gradq, "_triton_kernels", raising=False)
    with pytest.raises(RuntimeError, match=r"need Triton.*pip install 'gradq\[gpu\]'.*GRADQ_KERNELS=reference"):
        _backend.kernels_for(fake_cuda_tensor())


def test_mixed_devices_and_dtypes_are_rejected(on_triton):
    packed, scales = kernels.sign_compress(cuda(gradients(64, 2, special=False)), block=64)
    with pytest.raises(ValueError, match="scales is on meta but packed is on"):
        kernels.sign_decompress(packed, torch.empty(1, device="meta"), block=64, numel=64)
    with pytest.raises(ValueError, match="residual must match x"):
        kernels.sign_compress(cuda(torch.ones(64)), torch.zeros(64, device="meta"), block=64)
    with pytest.raises(TypeError, match="float32"):
        kernels.sign_compress(cuda(torch.ones(64, dtype=torch.float16)), block=64)
