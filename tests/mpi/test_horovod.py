"""Under mpirun with Horovod built (python -m comm_hooks.horovod_build): gradq's DistributedOptimizer."""

import horovod.torch as hvd
import pytest
import torch
import torch.distributed as dist

import comm_hooks
import comm_hooks.horovod as ghvd
from comm_hooks.launch import init_from_mpi
from gradq.allreduce import CompressedAllreduce
from tests.test_allreduce_dist import COMPRESSORS, rank_gradients
from tests.test_ddp_hook import digits, mlp

pytestmark = pytest.mark.mpi(min_size=2)


@pytest.fixture(scope="module", autouse=True)
def horovod():
    hvd.init()
    if not dist.is_initialized():
        init_from_mpi()
    yield


@pytest.mark.parametrize("name", ["onebit", "terngrad", "qsgd"])
def test_horovod_transport_matches_torch_distributed_bit_for_bit(name):
    comp = COMPRESSORS[name]
    over_hvd = CompressedAllreduce(comp, mode="two_phase", error_feedback=True, seed=1)
    over_torch = CompressedAllreduce(comp, mode="two_phase", error_feedback=True, seed=1)
    hvd_t, torch_t = ghvd.HorovodTransport(), comm_hooks.TorchTransport()
    for step in range(3):
        x = rank_gradients(hvd.size(), 4099, seed=70 + step)[hvd.rank()]
        assert torch.equal(over_hvd(x, hvd_t, key="k", step=step).mean, over_torch(x, torch_t, key="k", step=step).mean)


def _train(make_optimizer, steps=150):
    rank, world = hvd.rank(), hvd.size()
    x, y, x_test, y_test = digits(rank, world)
    model = mlp(seed=rank)  # different on each rank until the broadcast
    opt = make_optimizer(model)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    for step in range(steps):
        idx = torch.randint(0, len(y), (128 // world,), generator=torch.Generator().manual_seed(step * 1000 + rank))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    same = bool(torch.equal(hvd.broadcast(flat, root_rank=0), flat))
    with torch.no_grad():
        return float((model(x_test).argmax(1) == y_test).float().mean()), same


def test_training_reaches_the_accuracy_of_horovods_own_optimizer():
    def sgd(model):
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)

    baseline, _ = _train(lambda m: hvd.DistributedOptimizer(sgd(m), named_parameters=m.named_parameters()))
    for name in ("onebit", "qsgd"):
        accuracy, same = _train(lambda m, n=name: ghvd.DistributedOptimizer(sgd(m), m.named_parameters(), n))
        assert same, "ranks diverged"
        assert accuracy >= baseline - 0.02, (name, accuracy, baseline)
    assert baseline > 0.9


def test_synchronize_skip_synchronize_and_backward_passes():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    opt = ghvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=1.0), model.named_parameters(), "none", backward_passes_per_step=2
    )
    assert isinstance(opt, torch.optim.SGD)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    before = model.weight.detach().clone()
    opt.zero_grad()
    for _ in range(2):  # gradients of two passes accumulate, then one exchange
        model(torch.full((1, 8), float(hvd.rank() + 1))).sum().backward()
    opt.synchronize()
    mean_input = sum(r + 1 for r in range(hvd.size())) / hvd.size()
    assert torch.allclose(model.weight.grad, torch.full((1, 8), 2 * mean_input))
    with opt.skip_synchronize():
        opt.step()  # no second exchange: the gradient stays the synchronized one
    assert torch.allclose(model.weight.detach(), before - 2 * mean_input)


def test_bad_arguments():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="backward_passes_per_step must be >= 1"):
        ghvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), backward_passes_per_step=0)
    with pytest.raises(ValueError, match="missing from named_parameters"):
        ghvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), [("w", model.weight)])
    with pytest.raises(ValueError, match="unknown compressor"):
        ghvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), compressor="topk")
