"""Compressed allreduce on real Gloo process groups (W = 2, 3, 4) against independent oracles.

Oracles: ``dist.all_reduce`` for the uncompressed path, exact means for exactly representable inputs,
a sequential single-process restatement of the two-phase algorithm, a float64 mean with the error bound
of each code book, and the error-feedback conservation law over many steps.
"""

import math

import pytest
import torch
import torch.distributed as dist

import gradq
from comm_hooks import TorchTransport
from gradq.allreduce import CompressedAllreduce, rank_seed, stream_offset
from tests import distributed

COMPRESSORS = {
    "none": gradq.NoCompression(),
    "fp16": gradq.FP16(),
    "bf16": gradq.BF16(),
    "onebit": gradq.OneBit(block=256),
    "terngrad": gradq.TernGrad(block=256),
    "qsgd": gradq.QSGD(levels=4, block=512),
}


def rank_gradients(world: int, n: int, seed: int) -> list[torch.Tensor]:
    """Every rank's gradient; each process builds all of them, so it can compute oracles locally."""
    return [torch.randn(n, generator=torch.Generator().manual_seed(seed * 100 + r)) for r in range(world)]


def padded_chunks(x: torch.Tensor, world: int, align: int) -> list[torch.Tensor]:
    chunk = -(-x.numel() // (world * align)) * align
    padded = torch.zeros(world * chunk)
    padded[: x.numel()] = x
    return list(padded.split(chunk))


def simulate(comp, grads: list[torch.Tensor], mode: str, step: int, key: int) -> torch.Tensor:
    """The compressed mean of one fresh step, computed sequentially in one process."""
    world, n = len(grads), grads[0].numel()

    def code(x, rank, chunk, phase):
        payload = comp.compress(x, seed=rank_seed(0, rank), offset=stream_offset(step, key, chunk, phase))
        return comp.decompress(payload, x.numel())

    if mode == "allgather":
        decoded = [code(g, r, 0, 0) for r, g in enumerate(grads)]
        return (sum(decoded[1:], decoded[0].clone()) / world)[:n]
    per_rank = [
        [code(c, r, i, 0) for i, c in enumerate(padded_chunks(g, world, comp.alignment))] for r, g in enumerate(grads)
    ]
    out = []
    for c in range(world):
        mean = per_rank[0][c].clone()
        for r in range(1, world):
            mean += per_rank[r][c]
        out.append(code(mean / world, c, c, 1))
    return torch.cat(out)[:n]


def error_bound(comp, values: torch.Tensor) -> torch.Tensor:
    """Per-element bound on |decode(encode(v)) - v| over the blocks of ``values``, from each code book's math."""
    if isinstance(comp, gradq.NoCompression):
        return torch.zeros_like(values)
    if isinstance(comp, gradq.FP16 | gradq.BF16):
        return values.abs() * (2.0**-11 if isinstance(comp, gradq.FP16) else 2.0**-8)
    bound = torch.empty_like(values)
    for start in range(0, values.numel(), comp.block):
        block = values[start : start + comp.block]
        if isinstance(comp, gradq.OneBit):  # |±mean|v| - v| <= max|v| + mean|v|
            b = block.abs().max() + block.abs().mean()
        elif isinstance(comp, gradq.TernGrad):  # the level is 0 or 1: error < max|v|
            b = block.abs().max()
        else:  # QSGD: adjacent levels are ||v|| / s apart
            b = block.norm() / comp.levels
        bound[start : start + comp.block] = b
    return bound


def _check_one_step(rank, world, workdir, n):
    transport = TorchTransport()
    grads = rank_gradients(world, n, seed=world)
    exact = torch.stack([g.double() for g in grads]).mean(0)
    for name, comp in COMPRESSORS.items():
        for mode in ("two_phase", "allgather"):
            reducer = CompressedAllreduce(comp, mode=mode, error_feedback=comp.error_feedback_default)
            out = reducer(grads[rank].clone(), transport, key=3, step=7)
            assert torch.equal(out.mean, simulate(comp, grads, mode, step=7, key=3)), (name, mode)
            chunk = -(-n // (world * comp.alignment)) * comp.alignment
            expected_bytes = (
                2 * (world - 1) * comp.payload_nbytes(chunk)
                if mode == "two_phase"
                else (world - 1) * comp.payload_nbytes(n)
            )
            assert out.bytes_sent == expected_bytes, (name, mode)
            # Math bound: the error of each rank's code, averaged, plus the error of re-encoding the mean.
            worker = torch.stack([error_bound(comp, g) for g in grads]).mean(0).double()
            server = error_bound(comp, out.mean.abs() + worker.float()).double() if mode == "two_phase" else 0
            assert ((out.mean.double() - exact).abs() <= worker + server + 1e-6).all(), (name, mode)
    # `none` equals PyTorch's own allreduce / W exactly on values whose sums are exact (dyadic).
    dyadic = torch.randint(-64, 64, (n,), generator=torch.Generator().manual_seed(rank)).float() / 8
    reference = dyadic.clone()
    dist.all_reduce(reference)
    for mode in ("two_phase", "allgather"):
        out = CompressedAllreduce(gradq.NoCompression(), mode=mode, error_feedback=False)(
            dyadic, transport, key=0, step=0
        )
        assert torch.equal(out.mean, reference / world)
    return True


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_one_step_matches_oracles(world):
    assert distributed.run(_check_one_step, world, 5003) == [True] * world


def _check_exactly_representable(rank, world, workdir):
    """Same sign pattern on every rank, magnitude (rank+1)/2: every code is exact, so is the mean."""
    n = world * 512 * 3
    pattern = torch.where(torch.arange(n) % 3 == 0, -1.0, 1.0)
    sparse = torch.where(torch.arange(n) % 32 == 5, pattern, 0.0)  # 16 non-zeros per 512: QSGD levels exact
    transport = TorchTransport()
    for name, comp in {**COMPRESSORS, "terngrad": gradq.TernGrad(block=256, clip=0)}.items():  # max |x|: exact
        base = sparse if name in ("terngrad", "qsgd") else pattern
        x = base * (rank + 1) / 2
        expected = base * 0.25 * (world + 1)
        for mode in ("two_phase", "allgather"):
            reducer = CompressedAllreduce(comp, mode=mode, error_feedback=comp.error_feedback_default)
            assert torch.equal(reducer(x, transport, key=0, step=2).mean, expected), (name, mode)
    return True


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_exactly_representable_gradients_give_the_exact_mean(world):
    assert distributed.run(_check_exactly_representable, world) == [True] * world


def _error_feedback_steps(rank, world, workdir, name, steps):
    comp = COMPRESSORS[name]
    transport = TorchTransport()
    reducer = CompressedAllreduce(comp, mode="two_phase", error_feedback=True, seed=11)
    n = 1001
    applied = torch.zeros(n, dtype=torch.float64)
    truth = torch.zeros(n, dtype=torch.float64)
    for t in range(steps):
        grads = rank_gradients(world, n, seed=1000 + t)
        applied += reducer(grads[rank], transport, key=0, step=t).mean.double()
        truth += torch.stack([g.double() for g in grads]).mean(0)
    worker = torch.cat([reducer.worker_memory.residuals[(0, c)] for c in range(world)])
    dist.all_reduce(worker)
    server = transport.all_gather(reducer.server_memory.residuals[0].view(torch.uint8)).view(torch.float32)
    held = worker.double() / world + server.double()
    return float((applied + held[:n] - truth).abs().max())


@pytest.mark.parametrize("name", ["onebit", "terngrad"])
def test_error_feedback_conserves_the_averaged_gradient(name):
    """sum_t applied_t + mean_r(worker residual_r) + server residual == sum_t true mean_t."""
    steps = 30
    drifts = distributed.run(_error_feedback_steps, 3, name, steps)
    assert max(drifts) <= steps * 6 * 2**-24 * 8  # a few fp32 roundings of values below 8 per step


def _non_finite(rank, world, workdir):
    transport = TorchTransport()
    results = {}
    for name, comp in COMPRESSORS.items():
        reducer = CompressedAllreduce(comp, mode="two_phase", error_feedback=True)
        x = rank_gradients(world, 2000, seed=5)[rank]
        reducer(x, transport, key=0, step=0)  # a finite step first, so residuals are non-zero
        before = {k: v.clone() for k, v in {**reducer.worker_memory.residuals}.items()}
        server_before = {k: v.clone() for k, v in reducer.server_memory.residuals.items()}
        if rank == 1:
            x = x.clone()
            x[123] = float("nan")
            x[1500] = float("inf")
        out = reducer(x, transport, key=0, step=1).mean
        chunk = reducer.worker_memory.residuals[(0, 0)].numel()
        block = getattr(comp, "block", chunk)  # fused kernels keep the blocks; the generic path the call
        kept = True
        for index in (123, 1500) if rank == 1 else ():
            c, local = divmod(index, chunk)
            lo = local // block * block
            after = reducer.worker_memory.residuals[(0, c)]
            kept &= torch.equal(after[lo : lo + block], before[(0, c)][lo : lo + block])
        results[name] = (
            bool(torch.isfinite(out[[123, 1500]]).any()),
            kept,
            all(torch.isfinite(v).all() for v in reducer.worker_memory.residuals.values()),
            all(torch.isfinite(v).all() for v in reducer.server_memory.residuals.values()),
            len(server_before),
        )
    return results


def test_non_finite_gradients_stay_non_finite_and_stay_out_of_the_residuals():
    for results in distributed.run(_non_finite, 2):
        for name, (any_finite, kept, worker_finite, server_finite, _) in results.items():
            assert not any_finite, f"{name}: a NaN/Inf input became finite in the mean"
            assert kept and worker_finite and server_finite, name


def _zero_size(rank, world, workdir):
    out = CompressedAllreduce(gradq.OneBit(), mode="two_phase", error_feedback=True)(
        torch.empty(0), TorchTransport(), key=0, step=0
    )
    return (out.mean.numel(), out.bytes_sent)


def test_zero_size_tensor_sends_nothing():
    assert distributed.run(_zero_size, 2) == [(0, 0), (0, 0)]


def test_two_phase_traffic_is_flat_in_world_size():
    comp, n = gradq.OneBit(), 25_000_000
    per_rank = [2 * (w - 1) * comp.payload_nbytes(-(-n // (w * 8)) * 8) for w in (2, 4, 8, 16)]
    fp32 = [2 * (w - 1) / w * 4 * n for w in (2, 4, 8, 16)]
    assert all(
        math.isclose(p / per_rank[-1], (w - 1) / w / (15 / 16), rel_tol=1e-3)
        for p, w in zip(per_rank, (2, 4, 8, 16), strict=True)
    )
    assert all(f / p > 30 for f, p in zip(fp32, per_rank, strict=True))  # 1 bit + an fp32 scale per 512: 30.1x
