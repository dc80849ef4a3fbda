"""comm_hooks.CompressedAdamW (1-bit Adam) on real multi-process DDP (Gloo on loopback)."""

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import comm_hooks
from tests import distributed
from tests.test_ddp_hook import digits, mlp

LR, BETAS, EPS, WD = 3e-3, (0.9, 0.999), 1e-8, 0.01


def _batch(step, rank, y):
    return torch.randint(0, len(y), (32,), generator=torch.Generator().manual_seed(step * 10 + rank))


def _loss(model, x, y):
    return torch.nn.functional.cross_entropy(model(x), y)


def _reference(rank, world, steps, warmup, interval):
    """The oracle, in float64 from every rank's gradient (gathered): AdamW on the exact mean gradient in the
    warm-up and every ``interval``-th step after it, where v takes this step's squared gradient for each of
    the k steps since its last update. Between, each rank's own momentum m_r = 0.9 m_r + 0.1 g_r is divided by
    the last d (v = 0 taking its tensor's mean), clamped to +-(1 - beta1) / sqrt(1 - beta2), and averaged; the
    next fp32 step continues from that average times d."""
    model = mlp(seed=4)
    x, y, *_ = digits(rank, world)
    params = [p.detach().double() for p in model.parameters()]
    sizes = [p.numel() for p in params]
    n = sum(sizes)
    m = [torch.zeros(n, dtype=torch.float64) for _ in range(world)]
    v = torch.zeros(n, dtype=torch.float64)
    d, reduced, unseen, last = None, None, 0, 0
    bound = (1 - BETAS[0]) / (1 - BETAS[1]) ** 0.5
    for step in range(steps):
        flat = torch.cat([p.reshape(-1) for p in params])
        with torch.no_grad():
            for p, q in zip(model.parameters(), params, strict=True):
                p.copy_(q)
        grads = torch.autograd.grad(_loss(model, x[(idx := _batch(step, rank, y))], y[idx]), list(model.parameters()))
        mine = torch.cat([g.reshape(-1) for g in grads]).double()
        everyone = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(everyone, mine)
        t = step + 1
        if t <= warmup or (interval > 0 and (t - warmup) % interval == 0):
            mean = sum(everyone) / world
            if reduced is not None:
                m = [reduced * d for _ in range(world)]
            m = [BETAS[0] * mr + (1 - BETAS[0]) * mean for mr in m]
            k, last = t - last, t
            v = BETAS[1] ** k * v + (1 - BETAS[1] ** k) * mean * mean
            filled = v
            if t >= warmup:
                unseen += int((v == 0).sum())
                filled = torch.cat([torch.where(c == 0, c.mean(), c) for c in v.split(sizes)])
            d = (filled / (1 - BETAS[1] ** t)).sqrt() + EPS
            direction, reduced = m[0] / d, None
        else:
            m = [BETAS[0] * mr + (1 - BETAS[0]) * g for mr, g in zip(m, everyone, strict=True)]
            direction = reduced = sum((mr / d).clamp(-bound, bound) for mr in m) / world
        flat = flat * (1 - LR * WD) - LR / (1 - BETAS[0] ** t) * direction
        params = [c.view_as(p) for c, p in zip(flat.split(sizes), params, strict=True)]
    return torch.cat([p.reshape(-1) for p in params]), unseen


def _train(rank, world, workdir, compressor, steps, warmup, interval=0, options=None):
    ddp = DDP(mlp(seed=4))
    opt = comm_hooks.CompressedAdamW(ddp, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, warmup_steps=warmup,
                                     variance_interval=interval, compressor=compressor, **(options or {}))  # fmt: skip
    x, y, *_ = digits(rank, world)
    sent = []
    for step in range(steps):
        idx = _batch(step, rank, y)
        opt.zero_grad()
        _loss(ddp, x[idx], y[idx]).backward()
        opt.step()
        sent.append(opt.stats.bytes_sent_last_step)
    trained = torch.cat([p.detach().reshape(-1) for p in ddp.parameters()])
    return trained, opt.momentum.clone(), sent, _reference(rank, world, steps, warmup, interval)


@pytest.mark.parametrize("interval", [0, 2])
def test_warm_up_is_adamw_then_v_is_frozen_or_updated_every_interval_and_the_exact_momentum_is_reduced(interval):
    # "none" compresses nothing: after 3 warm-up steps, each rank's exact momentum is reduced (steps 4-7),
    # except that with interval 2 steps 5 and 7 reduce the gradient in fp32 and update v
    for trained, _, sent, (reference, unseen) in distributed.run(_train, 2, "none", 7, 3, interval):
        assert unseen > 0  # some inputs of the digits are blank in the first batches: the rule is exercised
        # fp32 against float64: a frozen small v amplifies rounding (steps of up to ~0.5 here), hence 1e-4
        assert torch.allclose(trained.double(), reference, rtol=1e-4, atol=1e-5)
        assert trained.abs().max() < 10  # nothing went off by lr / eps (1e5 per step)
        numel = trained.numel()
        assert sent[:3] == [4 * numel] * 3  # fp32 gradient allreduce (ring: 2 (W-1)/W x 4 bytes)
        assert sent[3:] == [4 * numel] * 4  # then the momentum, uncompressed, in two phases


def test_onebit_shares_one_compressed_momentum_and_sends_a_thirtieth():
    runs = distributed.run(_train, 2, "onebit", 12, 4)
    (trained0, momentum0, sent, (reference, _)), (trained1, momentum1, _, _) = runs
    assert torch.equal(momentum0, momentum1) and torch.equal(trained0, trained1)  # every rank the same
    n = trained0.numel()
    assert all(s < 4 * n / 25 for s in sent[4:])  # 1 bit + a scale per 512 values, in two phases
    assert not torch.equal(momentum0, torch.zeros_like(momentum0))


def _accuracy(rank, world, workdir, compressor):
    ddp = DDP(mlp(seed=4))
    if compressor == "adamw":
        opt = torch.optim.AdamW(ddp.parameters(), lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    else:
        opt = comm_hooks.CompressedAdamW(ddp, lr=LR, weight_decay=WD, warmup_steps=30, compressor=compressor)
    x, y, x_test, y_test = digits(rank, world)
    for step in range(150):
        idx = _batch(step, rank, y)
        opt.zero_grad()
        _loss(ddp, x[idx], y[idx]).backward()
        opt.step()
    with torch.no_grad():
        return float((ddp.module(x_test).argmax(1) == y_test).double().mean())


def test_compressed_momentum_trains_as_well_as_adamw_on_digits():
    """150 steps (30 of warm-up) on 2 ranks: each compressor within 2 points of torch's AdamW (397 test
    images: 2 points are 8 of them)."""
    exact = distributed.run(_accuracy, 2, "adamw")[0]
    assert exact > 0.9
    for compressor in ("onebit", "terngrad", "qsgd"):
        accuracy = distributed.run(_accuracy, 2, compressor)[0]
        assert accuracy >= exact - 0.02, (compressor, accuracy, exact)


def _nan_step(rank, world, workdir):
    ddp = DDP(mlp(seed=4))
    opt = comm_hooks.CompressedAdamW(ddp, lr=LR, warmup_steps=2, compressor="onebit")
    x, y, *_ = digits(rank, world)
    for step in range(4):
        idx = _batch(step, rank, y)
        opt.zero_grad()
        loss = _loss(ddp, x[idx], y[idx])
        if step == 3 and rank == 0:
            loss = loss * float("nan")
        before = [p.detach().clone() for p in ddp.parameters()], opt.momentum.clone()
        loss.backward()
        opt.step()
    params_kept = all(torch.equal(a, p) for a, p in zip(before[0], ddp.parameters(), strict=True))
    return params_kept, torch.equal(before[1], opt.momentum), opt.skipped_steps, opt.steps


def test_a_nan_on_one_rank_skips_the_compressed_step_on_every_rank():
    for params_kept, momentum_kept, skipped, steps in distributed.run(_nan_step, 2):
        assert params_kept and momentum_kept and skipped == 1 and steps == 3


def _bad_arguments(rank, world, workdir):
    ddp = DDP(mlp(seed=4))
    said = []
    for kwargs in ({"warmup_steps": 0}, {"warmup_steps": 5, "lr": -1.0}, {"warmup_steps": 5, "variance_interval": -1}):
        try:
            comm_hooks.CompressedAdamW(ddp, **kwargs)
        except ValueError as exc:
            said.append(str(exc))
    try:
        comm_hooks.CompressedAdamW(ddp.module, warmup_steps=5)
    except TypeError as exc:
        said.append(str(exc))
    try:  # ranks that disagree raise on every rank
        comm_hooks.CompressedAdamW(ddp, warmup_steps=5 + rank)
    except RuntimeError as exc:
        said.append(str(exc))
    return said


def test_bad_arguments_and_disagreeing_ranks_are_clear_errors():
    for rank, said in enumerate(distributed.run(_bad_arguments, 2)):
        assert "warmup_steps must be an int >= 1" in said[0]
        assert "need lr > 0" in said[1]
        assert "variance_interval must be an int >= 0" in said[2]
        assert "needs the DistributedDataParallel model, got Sequential" in said[3]
        assert "CompressedAdamW settings differ across ranks (ranks [1] disagree with rank 0)" in said[4]
        assert f'"warmup_steps": {5 + rank}' in said[4]  # this rank's own settings


@pytest.mark.parametrize("compressor", ["terngrad", "qsgd"])
def test_without_error_feedback_each_rank_keeps_its_own_momentum(compressor):
    runs = distributed.run(_train, 2, compressor, 10, 3, 3)  # fp32 steps 1-3, 6, 9; the others compressed
    assert not torch.equal(runs[0][1], runs[1][1])  # its own m, not the compressed mean
    assert torch.equal(runs[0][0], runs[1][0])  # but one model, also across the fp32 steps after the warm-up
