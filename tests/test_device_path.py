"""The DDP hook on the Triton kernels (the path of CUDA buckets) reads no device value per bucket: the
kernels' checks are recorded and read once at the end of the step (gradq/_checks.py), and the NaN/Inf rules
of residuals and momenta are device-side selects. Runs on CPU tensors with GRADQ_KERNELS=triton through
Triton's interpreter, in real Gloo process groups; every host read of a tensor is counted by patching
torch.Tensor's conversions."""

import os
import traceback
from contextlib import nullcontext

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import comm_hooks
from gradq import _checks, kernels
from tests import distributed
from tests.test_ddp_hook import digits, mlp

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")
CONVERSIONS = ("__bool__", "item", "tolist", "__int__", "__float__")


class HostReads:
    """Counts host reads of tensor values (torch.Tensor conversions) while ``active``."""

    def __init__(self) -> None:
        self.active, self.where = False, []
        self.originals = {name: getattr(torch.Tensor, name) for name in CONVERSIONS}
        for name, real in self.originals.items():
            setattr(torch.Tensor, name, self._counted(real))

    def _counted(self, real):
        def conversion(tensor, *args):
            if self.active:
                self.where.append(traceback.format_stack(limit=4)[-2].strip())
            return real(tensor, *args)

        return conversion

    def restore(self) -> None:
        for name, real in self.originals.items():
            setattr(torch.Tensor, name, real)


def _hook_reads(rank, world, workdir, cases):
    os.environ["GRADQ_KERNELS"] = "triton"
    reads = HostReads()
    found = {}
    try:
        for name, options in cases:
            ddp = DDP(mlp(seed=3, hidden=48))
            state = comm_hooks.register(ddp, name, start_iter=1, min_numel=0, overlap=False, **options)
            real_reduce, real_end = state.reduce_bucket, state._end_step

            def reduce_bucket(*args, _real=real_reduce):
                reads.active = True
                try:
                    return _real(*args)
                finally:
                    reads.active = False

            def end_step(*args, _real=real_end):  # the one read of the step's recorded checks
                active, reads.active = reads.active, False
                try:
                    return _real(*args)
                finally:
                    reads.active = active

            state.reduce_bucket, state._end_step = reduce_bucket, end_step
            opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
            x, y, *_ = digits(rank, world)
            for step in range(3):
                idx = torch.arange(16) + 16 * step
                opt.zero_grad()
                torch.nn.functional.cross_entropy(ddp(x[idx]), y[idx]).backward()
                opt.step()
            found[name, tuple(options.items())] = (list(reads.where), state.stats.codec_seconds_total > 0)
            reads.where.clear()
            state.close()
    finally:
        reads.restore()
    return found


CASES = [
    ("onebit", {}),
    ("onebit", {"momentum": 0.9}),  # the shared momentum
    ("qsgd", {"momentum": 0.9}),  # each rank's own momentum
    ("terngrad", {"error_feedback": True, "block": 512}),  # the unfused error feedback
    ("qsgd", {"mode": "allgather"}),
]


def test_the_hook_on_triton_kernels_reads_no_device_value_per_bucket():
    for found in distributed.run(_hook_reads, 2, CASES):
        for case, (where, compressed) in found.items():
            assert compressed, case  # the compressed path ran
            assert where == [], (case, where[:3])


def _overflow(rank, world, workdir, deferred):
    if deferred:
        os.environ["GRADQ_KERNELS"] = "triton"
    torch.manual_seed(0)
    ddp = DDP(torch.nn.Linear(64, 10, bias=False))
    comm_hooks.register(ddp, "qsgd", start_iter=1, min_numel=0, overlap=False)
    x = torch.full((4, 64), 0.25)
    ddp(x).sum().backward()  # iteration 0 is plain allreduce
    try:  # every gradient is 3e37, finite; a block's l2 norm (3e37 * sqrt(320)) is not
        (ddp(x).sum() * 3e37).backward()
    except Exception as exc:  # noqa: BLE001 - DDP may wrap the hook's error
        return str(exc)
    return "no error"


@pytest.mark.parametrize("deferred", [False, True])
def test_a_norm_overflow_still_fails_loudly_when_checks_are_deferred(deferred):
    for message in distributed.run(_overflow, 2, deferred):
        assert "l2 norm exceeds the fp32 maximum" in message


def test_deferred_checks_raise_the_first_failure_once(monkeypatch):
    with _checks.deferred_checks() as recorded:
        _checks.check(torch.tensor(False), ValueError("first"))
        _checks.check(torch.tensor(True), ValueError("second"))
        _checks.check(torch.tensor(True), RuntimeError("third"))
    assert len(recorded) == 3
    with pytest.raises(ValueError, match="second"):
        _checks.raise_recorded(recorded)
    assert recorded == []
    _checks.raise_recorded(recorded)  # nothing left
    with pytest.raises(RuntimeError, match="now"):
        _checks.check(torch.tensor(True), RuntimeError("now"))  # outside: at once


def test_a_corrupt_escape_payload_is_reported_at_the_end_when_deferred(monkeypatch):
    monkeypatch.setenv("GRADQ_KERNELS", "triton")
    x = torch.randn(2000, generator=torch.Generator().manual_seed(1))
    packed, scales = kernels.signmag_compress(x, levels=7, block=512, rule="l2", escape=True, seed=1)
    stream = (2 * x.numel() + 7) // 8
    corrupt = packed.clone()
    corrupt[:stream] = 0b10101010  # every symbol an escape: more than a block's slots
    with pytest.raises(ValueError, match="corrupt sign-magnitude payload"):
        kernels.signmag_decompress(corrupt, scales, levels=7, block=512, numel=x.numel(), escape=True)
    with _checks.deferred_checks() as recorded:
        out = kernels.signmag_decompress(corrupt, scales, levels=7, block=512, numel=x.numel(), escape=True)
    assert out.shape == x.shape and recorded
    with pytest.raises(ValueError, match="corrupt sign-magnitude payload"):
        _checks.raise_recorded(recorded)


def test_copy_if_finite_selects_on_the_device_when_deferred():
    for deferred in (False, True):
        dst = torch.zeros(5)
        with _checks.deferred_checks() if deferred else nullcontext():
            _checks.copy_if_finite(dst, torch.tensor([1.0, 2, float("nan"), 4, 5]))
            assert torch.equal(dst, torch.zeros(5))
            _checks.copy_if_finite(dst, torch.arange(5.0) + deferred)
            assert torch.equal(dst, torch.arange(5.0) + deferred)
