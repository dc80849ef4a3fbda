"""Shared helpers for the gradq tests."""

import os

import torch

if not torch.cuda.is_available():  # Triton's interpreter runs the GPU kernels on CPU tensors (tests/test_triton.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from gradq import _reference  # noqa: E402
from tests import kernel_variants  # noqa: E402

try:
    from gradq import _C
except ImportError:  # the native-vs-reference tests then fail in test_native_is_built
    _C = None


def pytest_ignore_collect(collection_path, config):
    """tests/mpi runs only under mpirun with pytest-mpi's --with-mpi (see the Makefile's test target)."""
    if collection_path.name == "mpi" and not config.getoption("--with-mpi", default=False):
        return True
    return None


def assert_same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bit-identical tensors: same dtype and shape, same bits for every non-NaN value, NaN at the same places."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, a.shape, b.dtype, b.shape)
    if a.dtype.is_floating_point:
        nan_a, nan_b = torch.isnan(a), torch.isnan(b)
        assert torch.equal(nan_a, nan_b), "NaN positions differ"
        int_dtype = {torch.float32: torch.int32, torch.float64: torch.int64}[a.dtype]
        a, b = a[~nan_a].view(int_dtype), b[~nan_b].view(int_dtype)
    mismatch = (a != b).nonzero()
    assert mismatch.numel() == 0, f"{mismatch.shape[0]} elements differ, first at {mismatch[:5].flatten().tolist()}"


@pytest.fixture(params=["built", *kernel_variants.VARIANTS])
def native(request):
    """The native kernel module as installed ("built"; fails, not skips, when it was not built), then the
    same source compiled without AVX-512 ("avx2") and without AVX2/BMI2 ("scalar")."""
    if request.param != "built":
        return kernel_variants.build(request.param)
    assert _C is not None, "gradq._C is not built: reinstall with `pip install --no-build-isolation -e .`"
    return _C


@pytest.fixture
def reference():
    return _reference
