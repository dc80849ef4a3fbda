"""Under mpirun (``mpirun -n N python -m pytest --with-mpi tests/mpi``): the mpi4py backend, init_from_mpi,
and a DDP gradq hook started from Open MPI's environment. Every rank runs every test."""

import pytest
import torch
import torch.distributed as dist
from mpi4py import MPI
from torch.nn.parallel import DistributedDataParallel as DDP

import comm_hooks
import comm_hooks.mpi as gmpi
from comm_hooks.launch import init_from_mpi
from gradq.allreduce import CompressedAllreduce
from tests.test_allreduce_dist import COMPRESSORS, rank_gradients, simulate

COMM = MPI.COMM_WORLD
pytestmark = pytest.mark.mpi(min_size=2)


@pytest.fixture(scope="module")
def torch_group():
    """torch.distributed started by init_from_mpi, once per process."""
    if not dist.is_initialized():
        rank, size, _ = init_from_mpi()
        assert (rank, size) == (COMM.Get_rank(), COMM.Get_size())
    yield
    COMM.Barrier()


@pytest.mark.parametrize("mode", ["two_phase", "allgather"])
@pytest.mark.parametrize("name", sorted(COMPRESSORS))
def test_mpi_allreduce_matches_the_sequential_definition(name, mode):
    world, rank = COMM.Get_size(), COMM.Get_rank()
    grads = rank_gradients(world, 3001, seed=17)
    state = gmpi.MPIState(COMPRESSORS[name], mode=mode)
    for step in range(2):
        mean = gmpi.allreduce(grads[rank], state=state, key=5)
        if step == 0:  # the first step of fresh residuals has a closed-form oracle
            assert torch.equal(mean, simulate(COMPRESSORS[name], grads, mode, step=0, key=5))
    assert state.steps[5] == 2 and state.bytes_sent > 0


@pytest.mark.parametrize("name", ["onebit", "qsgd", "fp16"])
def test_mpi_and_torch_distributed_give_identical_bits(torch_group, name):
    """The same algorithm over two engines: residuals, random streams and results agree exactly."""
    world, rank = COMM.Get_size(), COMM.Get_rank()
    comp = COMPRESSORS[name]
    over_mpi = gmpi.MPIState(comp, seed=3)
    over_torch = CompressedAllreduce(comp, mode="two_phase", error_feedback=comp.error_feedback_default, seed=3)
    transport = comm_hooks.TorchTransport()
    for step in range(3):
        x = rank_gradients(world, 5000, seed=40 + step)[rank]
        a = gmpi.allreduce(x, state=over_mpi, key="w")
        b = over_torch(x, transport, key="w", step=step).mean
        assert torch.equal(a, b)


def test_ddp_hook_trains_identically_on_every_rank_after_init_from_mpi(torch_group):
    torch.manual_seed(0)
    model = DDP(torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4)))
    state = comm_hooks.register(model, "onebit", start_iter=1, min_numel=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(COMM.Get_rank())
    for _ in range(4):
        opt.zero_grad()
        model(torch.randn(16, 32, generator=gen)).square().mean().backward()
        opt.step()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()
    everyone = COMM.allgather(flat.tobytes())
    assert all(b == everyone[0] for b in everyone)
    assert state.stats.steps == 4 and state.stats.compression_ratio > 20


def test_mismatched_settings_fail_on_every_rank():
    state = gmpi.MPIState("onebit" if COMM.Get_rank() == 0 else "terngrad")
    with pytest.raises(RuntimeError, match="gradq MPI settings differ across ranks"):
        gmpi.allreduce(torch.ones(64), state=state)


def test_one_off_call_with_a_compressor_name():
    world, rank = COMM.Get_size(), COMM.Get_rank()
    grads = rank_gradients(world, 1000, seed=3)
    mean = gmpi.allreduce(grads[rank], "fp16", comm=COMM)
    assert torch.equal(mean, simulate(COMPRESSORS["fp16"], grads, "two_phase", step=0, key="tensor"))
    with pytest.raises(ValueError, match="through MPIState"):
        gmpi.allreduce(grads[rank], "fp16", state=gmpi.MPIState("fp16"))


def test_bad_tensors_are_rejected():
    state = gmpi.MPIState("onebit")
    with pytest.raises(ValueError, match="tensor must be 1-D"):
        gmpi.allreduce(torch.ones(4, 4), state=state)
    with pytest.raises(ValueError, match="mode must be one of"):
        gmpi.MPIState("onebit", mode="ring")


def _raised(call) -> str:
    try:
        call()
    except (RuntimeError, ValueError) as exc:
        return str(exc)
    return ""


def test_keys_sizes_and_empty_tensors_that_differ_across_ranks_fail_on_every_rank():
    rank = COMM.Get_rank()
    x = torch.ones(64)
    # keys in another order on rank 1: without the check, rank 0's "a" would be averaged with rank 1's "b"
    state = gmpi.MPIState("none")
    order = ["a", "b"] if rank != 1 else ["b", "a"]
    err = _raised(lambda: [gmpi.allreduce(x, state=state, key=k) for k in order])
    assert "called with another key, size or dtype than rank 0" in err and "same keys" in err
    # sizes that differ (a truncated receive or a hang before), and an empty tensor on one rank
    world = COMM.Get_size()
    for numel, differing in ((64 + rank, list(range(1, world))), (0 if rank == 1 else 64, [1])):
        err = _raised(lambda numel=numel: gmpi.allreduce(torch.ones(numel), state=gmpi.MPIState("onebit"), key="w"))
        assert f"ranks {differing} called with another key" in err and f"'numel': {numel}" in err
    # a key whose size changes later is refused locally
    state = gmpi.MPIState("none")
    gmpi.allreduce(x, state=state, key="w")
    assert "had 64 elements and now has 32" in _raised(lambda: gmpi.allreduce(torch.ones(32), state=state, key="w"))
    COMM.Barrier()
