"""The gradq DDP communication hook on real multi-process DDP training (Gloo on loopback)."""

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import comm_hooks
import gradq
from tests import distributed

GRADQ = ["none", "fp16", "bf16", "onebit", "terngrad", "qsgd"]


def digits(rank: int, world: int) -> tuple[torch.Tensor, ...]:
    """scikit-learn's bundled digits: a fixed 1400/397 split, the training part sharded over ranks."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = order[:1400], order[1400:]
    mine = train[rank::world]
    return x[mine], y[mine], x[test], y[test]


class WithUnusedHead(torch.nn.Module):
    """A model with a parameter that never gets a gradient: DDP needs find_unused_parameters=True."""

    def __init__(self, body: torch.nn.Module, hidden: int) -> None:
        super().__init__()
        self.body = body
        self.unused = torch.nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def mlp(seed: int, hidden: int = 64, extra: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers, torch.nn.Linear(hidden, 10))
    return WithUnusedHead(model, hidden) if extra else model


def sgd(model: torch.nn.Module) -> torch.optim.Optimizer:
    """Effective learning rate lr / (1 - momentum) = 0.2: vanilla reaches ~95% here. Above ~0.4 (e.g.
    momentum 0.9 with lr >= 0.05) 1-bit error feedback becomes unstable on this task (benchmarks/RESULTS.md)."""
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)


def train(rank, world, model, steps, *, start=0, optimizer=None, batch=32):
    x, y, x_test, y_test = digits(rank, world)
    opt = optimizer or sgd(model)
    for step in range(start, steps):
        idx = torch.randint(0, len(y), (batch,), generator=torch.Generator().manual_seed(step * 1000 + rank))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
    return opt, accuracy


def _convergence(rank, world, workdir):
    accuracies, stats = {}, {}
    for name in ["vanilla", *GRADQ]:
        ddp = DDP(mlp(seed=1))
        state = None if name == "vanilla" else comm_hooks.register(ddp, name)
        _, accuracies[name] = train(rank, world, ddp, steps=300)
        if state is not None:
            stats[name] = state.stats.as_dict()
    return accuracies, stats


def _single_process(rank, world, workdir):
    accuracies = {}
    for name in ["vanilla", "onebit", "terngrad", "qsgd"]:
        for mode in ("two_phase", "allgather"):
            torch.manual_seed(1)  # a bucket whose payloads are not a multiple of 4 bytes long
            ddp = DDP(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)))
            state = None if name == "vanilla" else comm_hooks.register(ddp, name, mode=mode, min_numel=0)
            _, accuracies[name, mode] = train(rank, world, ddp, steps=300)
            if state is not None:
                assert state.stats.codec_seconds_total > 0  # the compressed path ran (world 1 sends 0 bytes)
                state.close()
    return accuracies


def test_world_size_one_trains_with_every_compressed_mode():
    # A one-process job crashed at the first compressed step in two_phase mode (a byte view of a one-row
    # payload slice). World size 1 must work and learn; that each step is the exact compressed mean is
    # test_allreduce_dist's oracle test at world 1. One rank has no averaging to cut the stochastic codes'
    # variance, so the bar is learning (chance is 10%), not matching plain DDP.
    accuracies = distributed.run(_single_process, 1)[0]
    assert accuracies["vanilla", "two_phase"] > 0.9
    for (name, mode), acc in accuracies.items():
        assert acc > 0.85, (name, mode, acc)


def _small_buckets(rank, world, workdir):
    import warnings

    said = {}
    for min_numel in (1024, 0):
        torch.manual_seed(0)  # the PyTorch DDP tutorial's toy model: 175 parameters, one bucket
        ddp = DDP(torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.ReLU(), torch.nn.Linear(10, 5)))
        state = comm_hooks.register(ddp, "onebit", min_numel=min_numel)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(5):
                ddp(torch.randn(20, 10)).sum().backward()
        state.close()
        said[min_numel] = [str(w.message) for w in caught if "min_numel" in str(w.message)]
    return said


def test_a_model_whose_buckets_are_all_below_min_numel_is_told_once():
    said = distributed.run(_small_buckets, 2)
    for rank_said in said:
        assert len(rank_said[1024]) == 1 and "min_numel=1024" in rank_said[1024][0]
        assert "min_numel=0" in rank_said[1024][0]  # names the setting to change
        assert rank_said[0] == []  # compressed: nothing to say


def _hook_momentum(rank, world, workdir):
    runs = {}
    for label, hook_momentum in (("optimizer", 0.0), ("hook", 0.9)):
        ddp = DDP(mlp(seed=4))
        state = comm_hooks.register(ddp, "none", momentum=hook_momentum, start_iter=1)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9 - hook_momentum)
        x, y, *_ = digits(rank, world)
        for step in range(30):
            idx = torch.randint(0, len(y), (32,), generator=torch.Generator().manual_seed(step * 10 + rank))
            opt.zero_grad()
            torch.nn.functional.cross_entropy(ddp(x[idx]), y[idx]).backward()
            opt.step()
        runs[label] = torch.cat([p.detach().reshape(-1) for p in ddp.parameters()])
        if hook_momentum:
            momenta = state.state_dict()["momenta"]
            # a NaN gradient passes through to the optimizer (AMP would skip the step) and stays out of m
            before = [m.clone() for _, m in momenta]
            for p in ddp.parameters():
                p.grad = None
            out = ddp(x[:4])
            (out.sum() * float("nan")).backward()
            grads_nan = bool(torch.isnan(torch.cat([p.grad.reshape(-1) for p in ddp.parameters()])).any())
            after = [m for _, m in state.state_dict()["momenta"]]
            runs["nan"] = grads_nan and all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
        state.close()
    return runs


def test_momentum_in_the_hook_equals_the_optimizers_momentum_uncompressed():
    for runs in distributed.run(_hook_momentum, 2):
        # M = mean(0.9 M + g): the momentum of the mean gradient, up to rounding
        assert torch.allclose(runs["hook"], runs["optimizer"], rtol=1e-4, atol=1e-5)
        assert not torch.equal(runs["hook"], runs["optimizer"] * 0)  # trained
        assert runs["nan"]


def _compressed_momentum(rank, world, workdir, compressor="onebit", options=None):
    ddp = DDP(mlp(seed=5))
    state = comm_hooks.register(ddp, compressor, momentum=0.9, start_iter=1, min_numel=0, **(options or {}))
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    x, y, *_ = digits(rank, world)
    grads_seen, local = [], {n: torch.zeros_like(p) for n, p in ddp.module.named_parameters()}
    for step in range(6):
        idx = torch.randint(0, len(y), (32,), generator=torch.Generator().manual_seed(step * 10 + rank))
        opt.zero_grad()
        # this rank's own gradient, outside DDP, for the expected local momentum m = 0.9 m + g
        names, params = zip(*ddp.module.named_parameters(), strict=True)
        own = torch.autograd.grad(torch.nn.functional.cross_entropy(ddp.module(x[idx]), y[idx]), params)
        for name, g in zip(names, own, strict=True):
            local[name] = g.clone() if step == 0 else 0.9 * local[name] + g
        torch.nn.functional.cross_entropy(ddp(x[idx]), y[idx]).backward()
        grads_seen.append({n: p.grad.clone() for n, p in ddp.module.named_parameters()})
        opt.step()
    # the shared momentum of each bucket, cut back into parameters
    momenta = {}
    for names, flat in state.state_dict()["momenta"]:
        for name, piece in zip(names, flat.split([state.parameter_numels[n] for n in names]), strict=True):
            momenta[name] = piece
    state.close()
    if compressor != "onebit":
        return momenta, local
    return grads_seen, momenta


def test_compressed_momentum_is_the_hooks_last_result_and_the_same_on_every_rank():
    (grads0, momenta0), (grads1, momenta1) = distributed.run(_compressed_momentum, 2, "onebit", {"block": 64})
    for name, m in momenta0.items():
        assert torch.equal(m, momenta1[name])  # one momentum for all ranks, as in 1-bit Adam
        assert torch.equal(m.view_as(grads0[-1][name]), grads0[-1][name])  # it is what the optimizer got
        assert torch.equal(grads0[-1][name], grads1[-1][name])
    # a 1-bit result: each block of 64 holds one magnitude; and it differs from the last step's
    flat = torch.cat([m for m in momenta0.values()])
    assert flat.abs().unique().numel() < flat.numel() / 8
    assert not all(torch.equal(grads0[-1][n], grads0[-2][n]) for n in momenta0)


@pytest.mark.parametrize("compressor", ["terngrad", "qsgd"])
def test_momentum_without_error_feedback_stays_each_ranks_own(compressor):
    """Unbiased codes without error feedback: each rank's m is its own exact 0.9 m + g, never the
    compressed mean (whose noise would be fed back)."""
    runs = distributed.run(_compressed_momentum, 2, compressor)
    for momenta, local in runs:
        for name, m in momenta.items():
            assert torch.allclose(m.view_as(local[name]), local[name], rtol=1e-5, atol=1e-7), name
    assert not all(torch.equal(runs[0][0][n], runs[1][0][n]) for n in runs[0][0])  # ranks differ


def test_four_rank_training_on_digits_converges_with_every_compressor():
    results = distributed.run(_convergence, 4)
    accuracies, stats = results[0]
    assert all(r[0] == accuracies for r in results)  # every rank holds the same model
    assert accuracies["vanilla"] > 0.9
    for name in GRADQ:
        assert accuracies[name] >= accuracies["vanilla"] - 0.02, (name, accuracies)
    assert stats["onebit"]["compression_ratio"] > 25 and stats["qsgd"]["compression_ratio"] > 12
    assert stats["none"]["compression_ratio"] == pytest.approx(1.0, rel=0.01)
    assert stats["onebit"]["steps"] == 300 and stats["onebit"]["codec_seconds_total"] > 0


def _checkpoint(rank, world, workdir, name, phase, total, stop):
    ddp = DDP(mlp(seed=3))
    state = comm_hooks.register(ddp, name, start_iter=1, seed=5)
    if phase == "full":
        train(rank, world, ddp, total)
    elif phase == "first":
        opt, _ = train(rank, world, ddp, stop)
        torch.save(
            {"model": ddp.state_dict(), "opt": opt.state_dict(), "hook": state.state_dict()},
            workdir / f"ckpt{rank}.pt",
        )
    else:
        ckpt = torch.load(workdir / f"ckpt{rank}.pt", weights_only=False)
        ddp.load_state_dict(ckpt["model"])
        opt = sgd(ddp)
        opt.load_state_dict(ckpt["opt"])
        state.load_state_dict(ckpt["hook"])
        train(rank, world, ddp, total, start=stop, optimizer=opt)
    return [p.detach().clone() for p in ddp.parameters()]


@pytest.mark.parametrize("name", ["onebit", "qsgd"])
def test_resuming_from_a_checkpoint_continues_exactly(name, tmp_path):
    full = distributed.run(_checkpoint, 2, name, "full", 12, 5)
    distributed.run(_checkpoint, 2, name, "first", 12, 5, workdir=tmp_path)
    resumed = distributed.run(_checkpoint, 2, name, "resume", 12, 5, workdir=tmp_path)
    for a, b in zip(full[0], resumed[0], strict=True):
        assert torch.equal(a, b)


def _load_checkpoint_of(rank, world, workdir, source):
    ddp = DDP(mlp(seed=3))
    state = comm_hooks.register(ddp, "onebit", start_iter=1, seed=5)
    ckpt = torch.load(workdir / f"ckpt{source(rank)}.pt", weights_only=False)
    try:
        state.load_state_dict(ckpt["hook"])
    except ValueError as exc:
        return str(exc)
    return ""


def _own_file(rank):
    return rank


def _other_rank_file(rank):
    return 1 - rank


def _rank0_file(rank):
    return 0


def test_a_checkpoint_of_another_rank_or_world_size_fails_on_every_rank(tmp_path):
    distributed.run(_checkpoint, 2, "onebit", "first", 12, 5, workdir=tmp_path)
    assert distributed.run(_load_checkpoint_of, 2, _own_file, workdir=tmp_path) == ["", ""]
    swapped = distributed.run(_load_checkpoint_of, 2, _other_rank_file, workdir=tmp_path)
    assert "holds rank 1's residuals, loaded on rank 0" in swapped[0] and "one file per rank" in swapped[0]
    # the README's old single-file pattern: rank 0 would load fine and then hang; now both ranks raise
    single = distributed.run(_load_checkpoint_of, 2, _rank0_file, workdir=tmp_path)
    assert single[0].startswith("rank 1: this gradq hook checkpoint holds rank 0's")
    assert "loaded on rank 1" in single[1]
    grown = distributed.run(_load_checkpoint_of, 3, _rank0_file, workdir=tmp_path)
    assert all("made by 2 ranks, this job has 3" in e and "cannot be re-chunked" in e for e in grown)


def _many_buckets(rank, world, workdir, mode, overlap=True):
    out = {}
    for name in ("onebit", "qsgd", "none"):
        ddp = DDP(mlp(seed=2, hidden=256, extra=True), bucket_cap_mb=0.01, find_unused_parameters=True)
        state = comm_hooks.register(ddp, name, mode=mode, min_numel=0, overlap=overlap)
        x, y, *_ = digits(rank, world)
        losses = []
        opt = sgd(ddp)
        for step in range(25):
            idx = torch.randint(0, len(y), (32,), generator=torch.Generator().manual_seed(step * 7 + rank))
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(ddp(x[idx]), y[idx])
            loss.backward()
            opt.step()
            losses.append(float(loss))
        flat = torch.cat([p.detach().reshape(-1) for p in ddp.parameters()])
        thread = state.jobs._thread
        out[name] = (state.stats.buckets_last_step, flat, losses, state.iteration, thread and thread.name)
    return out


@pytest.mark.parametrize("mode", ["two_phase", "allgather"])
def test_many_buckets_and_unused_parameters_on_gloo(mode):
    results = distributed.run(_many_buckets, 3, mode)
    for name, (buckets, flat, losses, iterations, thread) in results[0].items():
        assert buckets >= 4, f"expected many buckets, got {buckets}"
        assert iterations == 25
        assert thread == "gradq-ddp-hook"  # the buckets were reduced on the hook's background thread
        for other in results[1:]:
            assert torch.equal(other[name][1], flat), f"{name}: ranks diverged"
        assert sum(losses[-5:]) < sum(losses[:5]), name


def test_overlapped_and_synchronous_hooks_train_bit_for_bit_alike():
    """Reducing buckets on the background thread (DDP meanwhile computing further gradients and issuing its
    own unused-parameter allreduce) changes only the timing: same parameters and losses on every rank."""
    overlapped = distributed.run(_many_buckets, 3, "two_phase", True)
    synchronous = distributed.run(_many_buckets, 3, "two_phase", False)
    for rank, (mine, theirs) in enumerate(zip(overlapped, synchronous, strict=True)):
        for name, (_, flat, losses, _, thread) in theirs.items():
            assert thread is None  # overlap=False never starts the thread
            assert torch.equal(mine[name][1], flat), f"rank {rank} {name}: parameters differ"
            assert mine[name][2] == losses, f"rank {rank} {name}: losses differ"


def _subgroup(rank, world, workdir):
    """Ranks 0 and 1 train a DDP model on their own process group; rank 2 takes no part in it."""
    pair = dist.new_group([0, 1])
    if rank == 2:
        return None
    x, y, *_ = digits(rank, world)
    plain = mlp(seed=3)
    ddp = DDP(mlp(seed=3), process_group=pair)
    state = comm_hooks.register(ddp, "none", start_iter=1, min_numel=0, process_group=pair)
    for step in range(2):  # step 0 plain allreduce, step 1 through the overlapped compressed path
        for model in (plain, ddp):
            model.zero_grad()
            torch.nn.functional.cross_entropy(model(x[step * 8 : step * 8 + 8]), y[step * 8 : step * 8 + 8]).backward()
    local = torch.cat([p.grad.reshape(-1) for p in plain.parameters()])
    both = [torch.empty_like(local) for _ in range(2)]
    dist.all_gather(both, local, group=pair)
    reduced = torch.cat([p.grad.reshape(-1) for p in ddp.parameters()])
    return torch.equal(reduced, (both[0] + both[1]) / 2), state.process_group is not pair, state.stats.steps


def test_overlapped_hook_on_a_subgroup_reduces_over_it_alone():
    results = distributed.run(_subgroup, 3)
    assert results[2] is None
    for exact, own_group, steps in results[:2]:
        assert exact  # "none" sends fp32: the mean of the pair's gradients, bit for bit
        assert own_group and steps == 2


def _mismatch(rank, world, workdir, options):
    import time

    ddp = DDP(mlp(seed=0))
    started = time.perf_counter()
    try:
        comm_hooks.register(ddp, **options[rank])
    except (RuntimeError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}", time.perf_counter() - started
    return "no error", time.perf_counter() - started


@pytest.mark.parametrize("options", [
    [{"compressor": "onebit"}, {"compressor": "terngrad"}],  # different compressors
    [{"overlap": True}, {"overlap": False}],  # used to hang: only one rank made the overlap process group
    [{"min_numel": 0}, {"min_numel": 1024}],
])
def test_mismatched_settings_fail_on_every_rank_at_register(options):
    for message, seconds in distributed.run(_mismatch, 2, options):
        assert "gradq hook settings differ across ranks (ranks [1] disagree with rank 0)" in message, message
        assert seconds < 20


def test_a_registration_that_fails_on_one_rank_fails_quickly_on_the_others():
    # rank 1's option is invalid; rank 0 used to wait in the process-group rendezvous for 30 minutes
    (zero, t0), (one, _) = distributed.run(_mismatch, 2, [{"compressor": "qsgd"}, {"compressor": "qsgd", "levels": 0}])
    assert one.startswith("ValueError:") and "levels" in one
    assert zero.startswith("RuntimeError: comm_hooks.register failed on rank 1 (ValueError:") and t0 < 20


def _late_rank(rank, world, workdir):
    import os
    import time

    os.environ["GRADQ_REGISTER_TIMEOUT"] = "3"
    ddp = DDP(mlp(seed=0))
    if rank == 1:
        dist.barrier()  # never registers; waits for rank 0 to give up
        return "", 0.0
    started = time.perf_counter()
    try:
        comm_hooks.register(ddp)
    except RuntimeError as exc:
        dist.barrier()
        return str(exc), time.perf_counter() - started
    return "no error", 0.0


def test_a_rank_that_never_registers_makes_register_fail_after_the_bounded_wait():
    message, seconds = distributed.run(_late_rank, 2)[0]
    assert "ranks [1] did not reach their register call within 3 s" in message and "GRADQ_REGISTER_TIMEOUT" in message
    assert 3 <= seconds < 15


def _bad_registration(rank, world, workdir):
    ddp = DDP(mlp(seed=0))
    errors = {}
    for label, call in {
        "unknown": lambda: comm_hooks.register(ddp, "topk"),
        "mode": lambda: comm_hooks.register(ddp, mode="ring"),
        "start_iter": lambda: comm_hooks.register(ddp, start_iter=0),
        "overlap": lambda: comm_hooks.register(ddp, overlap="yes"),
        "not ddp": lambda: comm_hooks.register(mlp(seed=0)),
    }.items():
        try:
            call()
        except (TypeError, ValueError) as exc:
            errors[label] = f"{type(exc).__name__}: {exc}"
    errors["qsgd error feedback"] = comm_hooks.register(ddp, "qsgd").allreduce.error_feedback
    try:
        comm_hooks.register(ddp, "qsgd")
    except RuntimeError as exc:
        errors["twice"] = str(exc)
    errors["onebit error feedback"] = comm_hooks.register(DDP(mlp(seed=0)), "onebit").allreduce.error_feedback
    errors["seed"] = ""
    try:
        comm_hooks.register(DDP(mlp(seed=0)), seed=-1)
    except ValueError as exc:
        errors["seed"] = str(exc)
    dist.barrier()
    return errors


def test_bad_registrations_raise_clear_errors():
    errors = distributed.run(_bad_registration, 2)[0]
    assert errors["unknown"].startswith("ValueError: unknown compressor 'topk'; registered:")
    assert "mode must be one of" in errors["mode"]
    assert "start_iter must be an int >= 1" in errors["start_iter"]
    assert errors["overlap"] == "TypeError: overlap must be True or False, got 'yes'"
    assert errors["not ddp"].startswith("TypeError: register needs a torch.nn.parallel.DistributedDataParallel")
    assert "already registered" in errors["twice"]
    assert errors["onebit error feedback"] is True and errors["qsgd error feedback"] is False  # defaults resolved
    assert "seed must be" in errors["seed"]


def _stats(rank, world, workdir):
    import gc

    ddp = DDP(mlp(seed=0, hidden=128))
    state = comm_hooks.register(ddp, "onebit", start_iter=1)
    train(rank, world, ddp, steps=3)
    numel = sum(p.numel() for p in ddp.parameters())
    stats, thread = state.stats.as_dict(), state.jobs._thread
    del ddp, state
    gc.collect()
    thread.join(timeout=10)
    return stats, numel, thread.is_alive()


def test_statistics_report_the_bytes_each_step_sent():
    (stats, numel, thread_alive), _ = distributed.run(_stats, 2)
    assert not thread_alive  # the hook's thread ends with its model
    chunk = -(-numel // 16) * 8
    assert stats["steps"] == 3
    assert stats["bytes_sent_last_step"] == 2 * gradq.OneBit().payload_nbytes(chunk)
    assert stats["fp32_bytes_last_step"] == 4 * numel
    assert stats["bytes_sent_total"] == 4 * numel + 2 * stats["bytes_sent_last_step"]  # step 0 is plain fp32
    assert stats["compression_ratio"] == pytest.approx(4 * numel / stats["bytes_sent_last_step"])


def _close(rank, world, workdir):
    pair = dist.new_group([0, 1])
    hooks, groups, accuracies = [], [], []
    for _ in range(3):  # three models one after the other, each closed before the next
        ddp = DDP(mlp(seed=0), process_group=pair)
        state = comm_hooks.register(ddp, "onebit", start_iter=1, process_group=pair)
        accuracies.append(train(rank, world, ddp, steps=3)[1])
        hooks.append((ddp, state, state.jobs._thread))
        groups.append(state.process_group)
        state.close()
        state.close()  # idempotent
    ddp, state, thread = hooks[0]
    try:
        train(rank, world, ddp, steps=1)
        error = "no error"
    except RuntimeError as exc:
        error = str(exc)
    open_a = comm_hooks.register(DDP(mlp(seed=0), process_group=pair), "onebit", process_group=pair)
    open_b = comm_hooks.register(DDP(mlp(seed=0), process_group=pair), "onebit", process_group=pair)
    return {
        "threads alive": [t.is_alive() for _, _, t in hooks],
        "groups after close": [s.process_group for _, s, _ in hooks],
        "one group reused": all(g is groups[0] for g in groups) and groups[0] is not pair,
        "open hooks' groups": (open_a.process_group is groups[0], open_b.process_group is not groups[0]),
        "accuracies": accuracies,
        "error": error,
    }


def test_close_ends_the_hooks_thread_and_a_later_hook_reuses_its_process_group():
    for result in distributed.run(_close, 2):
        assert result["threads alive"] == [False] * 3 and result["groups after close"] == [None] * 3
        assert result["one group reused"]  # not one group per registration
        assert result["open hooks' groups"] == (True, True)  # two open hooks never share a group
        assert len(set(result["accuracies"])) == 1  # the reused group reduces the same way, bit for bit
        assert "gradq hook was closed" in result["error"] and "new DistributedDataParallel" in result["error"]


def _rank_dies(rank, world, store):
    import datetime
    import os
    import time

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=20)
    )
    ddp = DDP(mlp(seed=0))
    comm_hooks.register(ddp, "onebit", start_iter=1)
    x, y, *_ = digits(rank, world)
    torch.nn.functional.cross_entropy(ddp(x[:8]), y[:8]).backward()  # one step together
    if rank == 1:
        os._exit(0)  # dies without a word
    start = time.monotonic()
    try:
        for _ in range(3):
            torch.nn.functional.cross_entropy(ddp(x[:8]), y[:8]).backward()
    except RuntimeError as exc:
        torch.save((time.monotonic() - start, str(exc)), f"{store}.result")
        os._exit(0)  # the group is broken: skip its teardown
    torch.save((None, "no error"), f"{store}.result")


def test_a_rank_that_dies_makes_the_others_fail_quickly(tmp_path):
    store = str(tmp_path / "store")
    torch.multiprocessing.spawn(_rank_dies, args=(2, store), nprocs=2, join=True)
    elapsed, message = torch.load(f"{store}.result")
    assert elapsed is not None, "the surviving rank kept waiting for the dead one"
    assert elapsed < 60, elapsed  # bounded by the 20 s collective timeout plus teardown
    assert message
