"""Distributed-consistent calibration and QAT on real Gloo process groups (3 ranks on loopback)."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import comm_hooks
import gradq
from gradq.modelquant import QuantConfig
from tests import distributed

CALIBRATORS = ["minmax", "moving_average", "percentile", "mse", "entropy"]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(6 * 8 * 8, 40), nn.ReLU(), nn.Linear(40, 10),
    ).eval()


def _batches(rank: int, n: int = 4) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    # ranks see different data: different scales and offsets, so their local ranges differ
    return [torch.randn(6, 1, 16, 16, generator=gen) * (1 + rank) + rank for _ in range(n)]


def _qparams(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] in
            ("scale", "zero_point", "lo", "hi", "ema_lo", "ema_hi", "step")}


def _calibrate_on_rank(rank: int, world: int, _workdir) -> dict:
    out = {}
    for name in CALIBRATORS:
        prepared = gradq.prepare(_model(), QuantConfig(calibrator=name))
        gradq.calibrate(prepared, _batches(rank), progress=False)
        out[name] = _qparams(prepared)
    return out


def test_calibration_is_bitwise_identical_across_ranks_and_equals_pooled_data():
    results = distributed.run(_calibrate_on_rank, 3)
    for name in CALIBRATORS:
        for other in results[1:]:
            for key, value in results[0][name].items():
                assert torch.equal(value, other[name][key]), (name, key)
        # one process calibrating on each step's batches of all ranks together sees the same statistics
        pooled = [torch.cat(parts) for parts in zip(*(_batches(r) for r in range(3)), strict=True)]
        single = gradq.prepare(_model(), QuantConfig(calibrator=name))
        gradq.calibrate(single, pooled, progress=False)
        for key, value in _qparams(single).items():
            assert torch.equal(value, results[0][name][key]), (name, key)
    local = gradq.prepare(_model(), QuantConfig())
    gradq.calibrate(local, _batches(0), progress=False)
    assert not torch.equal(_qparams(local)["0.input_quant.scale"], results[0]["minmax"]["0.input_quant.scale"])


def _unequal_batches(rank: int, world: int, _workdir) -> str:
    prepared = gradq.prepare(_model(), QuantConfig())
    try:
        gradq.calibrate(prepared, _batches(rank, n=2 + rank), progress=False)
    except ValueError as exc:
        return str(exc)
    return "no error"


def test_unequal_batch_counts_raise_the_same_error_on_every_rank():
    messages = distributed.run(_unequal_batches, 3)
    assert len(set(messages)) == 1 and "same number of calibration batches" in messages[0]


def _qat_on_rank(rank: int, world: int, _workdir, hook: str | None, learn: str | None) -> dict:
    prepared = gradq.prepare(_model(), QuantConfig.preset("w4a4", learn=learn))
    gradq.calibrate(prepared, _batches(rank), progress=False)
    # DDP's buffer broadcast would hide a missing reduction: our observers must agree on their own
    model = DDP(prepared.train(), broadcast_buffers=False)
    state = comm_hooks.register(model, hook, start_iter=2, overlap=False) if hook else None
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(7 + rank)
    for x in _batches(rank, n=6):
        loss = F.cross_entropy(model(x), torch.randint(0, 10, (len(x),), generator=gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
    if state is not None:
        state.close()
    params = {k: v.detach().clone() for k, v in prepared.state_dict().items()}
    return {"params": params}


def _check_identical(results):
    first = results[0]["params"]
    for other in results[1:]:
        for key, value in first.items():
            assert torch.equal(value, other["params"][key]), key


@pytest.mark.parametrize("learn", [None, "lsq", "pact"])
def test_qat_under_ddp_keeps_quantization_parameters_identical(learn):
    results = distributed.run(_qat_on_rank, 3, None, learn)
    _check_identical(results)
    assert any(k.endswith("step") for k in results[0]["params"]) == (learn is not None)


def test_qat_with_the_onebit_gradient_hook_keeps_ranks_identical():
    results = distributed.run(_qat_on_rank, 3, "onebit", None)
    _check_identical(results)


def test_reductions_are_no_ops_outside_a_job():
    assert not dist.is_initialized()
    assert gradq.modelquant.distributed.reduce_range(1.0, 2.0, "q") == (1.0, 2.0)


def _one_rank_fails(rank: int, world: int, _workdir, how: str) -> str:
    prepared = gradq.prepare(_model(), QuantConfig(calibrator="mse"))
    batches = _batches(rank)
    if rank == 1 and how == "nan":
        batches[2][0, 0, 0, 0] = float("nan")
    if rank == 1 and how == "empty":
        batches = []
    try:
        gradq.calibrate(prepared, batches, progress=False)
    except ValueError as exc:
        return str(exc)
    return "no error"


@pytest.mark.parametrize("how", ["nan", "empty"])
def test_a_problem_on_one_rank_raises_on_every_rank_instead_of_hanging(how):
    messages = distributed.run(_one_rank_fails, 3, how)
    assert "no error" not in messages
    word = {"nan": "NaN", "empty": "no batch"}[how]
    assert word in messages[1] and all("rank" in m or word in m for m in messages)
