"""One rank of gradq-bench: trains the workload once per method in one process group and records it.

Started by the launcher (``gradq_bench.launch``): locally through :func:`local_entry`, under mpirun
(also across the emulated cluster) as ``python -m gradq_bench.worker SPEC.json``. The spec is a JSON
object written by the CLI (see :func:`gradq_bench.cli.build_spec`); rank 0 writes the results there.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from gradq_bench.methods import Meter, describe, single_bucket
from gradq_bench.workloads import Workload, load_workload

TIMEOUT = datetime.timedelta(minutes=10)


def tx_bytes(interface: str) -> int:
    """Bytes ``interface`` has sent, from the kernel."""
    return int(Path(f"/sys/class/net/{interface}/statistics/tx_bytes").read_text())


def loss_of(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits (..., classes) against int64 labels of the leading shape (N) or (N, T)."""
    return torch.nn.functional.cross_entropy(logits.flatten(0, -2), labels.flatten(), reduction=reduction)


def evaluate(model: torch.nn.Module, workload: Workload, rank: int, world: int) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) over the test labels (every position of a sequence counts once).

    Each rank evaluates every ``world``-th test sample from ``rank`` and the sums are all-reduced in float64,
    so the whole test set costs each rank 1/world of it; collective: every rank must call it.
    """
    model.eval()
    loss, correct = 0.0, 0
    test_x, test_y = workload.test_x[rank::world], workload.test_y[rank::world]
    with torch.no_grad():
        for x, y in zip(test_x.split(256), test_y.split(256), strict=True):
            logits = model(x)
            loss += float(loss_of(logits, y, "sum"))
            correct += int((logits.argmax(-1) == y).sum())
    model.train()
    totals = torch.tensor([loss, correct, test_y.numel()], dtype=torch.float64)
    dist.all_reduce(totals)
    return float(totals[0] / totals[2]), float(totals[1] / totals[2])


MAX_EXP_ARGUMENT = math.log(sys.float_info.max)


def perplexity(loss: float) -> float:
    """exp(loss); inf for a diverged run whose loss is past exp's float range (NaN stays NaN)."""
    return math.inf if loss >= MAX_EXP_ARGUMENT else math.exp(loss)


def _batches(workload: Workload, rank: int, world: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's shard of the training set, reshuffled every epoch, in batches of batch_size."""
    shard = torch.arange(rank, len(workload.train_x), world)
    gen = torch.Generator().manual_seed(seed * 7919 + rank)
    size = workload.batch_size  # the CLI checked that a shard holds a batch
    while True:
        order = shard[torch.randperm(len(shard), generator=gen)]
        for i in range(0, len(order) - size + 1, size):
            index = order[i : i + size]
            yield workload.train_x[index], workload.train_y[index]


def run_method(workload: Workload, name: str, seed: int, spec: dict, rank: int, world: int, title: str) -> dict:
    """Train ``workload`` with method ``name`` from ``seed`` (model, data order, compressor randomness) for
    spec["steps"] steps; rank 0's figures plus gathered ones."""
    steps, warmup = spec["steps"], spec["warmup"]
    torch.manual_seed(seed)
    ddp = DDP(workload.build_model(), bucket_cap_mb=1 << 16 if single_bucket(name) else 25)
    meter = Meter(ddp, name, seed=seed, workload=workload)
    opt = meter.optimizer
    batches = _batches(workload, rank, world, seed)
    step_seconds, losses, sent, codec, evals = [], [], [], [], []
    progress = None
    if rank == 0 and spec["progress"]:
        from tqdm import tqdm

        progress = tqdm(total=steps, desc=title, file=sys.stderr, mininterval=0.5, ncols=100)
    wire_start = 0
    for step in range(steps):
        if step == warmup:
            dist.barrier()
            wire_start = tx_bytes(spec["interface"])
        x, y = next(batches)
        start = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        loss = loss_of(ddp(x), y)
        loss.backward()
        opt.step()
        step_seconds.append(time.perf_counter() - start)
        figures = meter.step()
        losses.append(float(loss.detach()))
        sent.append(figures.bytes_sent)
        codec.append(figures.codec_seconds)
        last = step + 1 == steps
        if workload.test_x is not None and ((step + 1) % spec["eval_every"] == 0 or last):
            test_loss, accuracy = evaluate(ddp.module, workload, rank, world)
            evals.append({"step": step + 1, "train_seconds": sum(step_seconds), "bytes_sent": sum(sent),
                          "loss": test_loss, "accuracy": accuracy, "perplexity": perplexity(test_loss)})  # fmt: skip
        if progress is not None:
            progress.set_postfix_str(f"loss {losses[-1]:.3f}, {step_seconds[-1]:.3f} s/step", refresh=False)
            progress.update()
    dist.barrier()
    wire = tx_bytes(spec["interface"]) - wire_start
    if progress is not None:
        progress.close()
    per_rank = [None] * world
    dist.all_gather_object(per_rank, {"losses": losses, "wire": wire})
    timed = steps - warmup
    if spec["interface"] == "lo":  # one counter shared by all local ranks
        wire_per_rank = [per_rank[0]["wire"] / world / timed] * world
    else:
        wire_per_rank = [r["wire"] / timed for r in per_rank]
    timed_codec = [c for c in codec[warmup:] if c is not None]
    if workload.metric == "perplexity":
        target = workload.target_perplexity
        reached = [e for e in evals if target is not None and e["perplexity"] <= target]
    else:
        target = workload.target_accuracy
        reached = [e for e in evals if target is not None and e["accuracy"] >= target]
    result = {
        "method": name,
        "seed": seed,
        "label": describe(name),
        "params": sum(p.numel() for p in ddp.module.parameters()),
        "step_seconds": step_seconds,
        "median_step_s": statistics.median(step_seconds[warmup:]),
        "bytes_per_step": sent,
        "payload_bytes_per_step": statistics.median(sent[warmup:]),
        "fp32_bytes_per_step": meter.fp32_bytes_per_step,
        "wire_bytes_per_step": statistics.fmean(wire_per_rank),
        "wire_bytes_per_step_per_rank": wire_per_rank,
        "codec_s_per_step": statistics.median(timed_codec) if timed_codec else None,
        "train_loss": [statistics.fmean(r["losses"][i] for r in per_rank) for i in range(steps)],
        "evals": evals,
        "final_loss": evals[-1]["loss"] if evals else None,
        "final_accuracy": evals[-1]["accuracy"] if evals else None,
        "final_perplexity": evals[-1]["perplexity"] if evals else None,
        "time_to_target_s": reached[0]["train_seconds"] if reached else None,
    }
    meter.close()
    del ddp, opt
    return result


def run_rank(spec: dict, rank: int, world: int) -> None:
    """Every method of the spec in order, for each of spec["seeds"] in turn; rank 0 writes spec["result_path"]."""
    torch.set_num_threads(spec["threads"])
    workload = load_workload(spec["workload"])
    if spec["batch"] is not None:
        workload = dataclasses.replace(workload, batch_size=spec["batch"])
    results = []
    jobs = [(seed, name) for seed in spec["seeds"] for name in spec["methods"]]
    for i, (seed, name) in enumerate(jobs):
        title = f"[{i + 1}/{len(jobs)}] {name}" + (f" seed {seed}" if len(spec["seeds"]) > 1 else "")
        results.append(run_method(workload, name, seed, spec, rank, world, title))
    if rank == 0:
        Path(spec["result_path"]).write_text(json.dumps({"workload": workload.name, "runs": results}))
    dist.barrier()


def local_entry(rank: int, world: int, spec_path: str) -> None:
    """Entry of a locally spawned rank: Gloo over loopback, rendezvous through a file next to the spec."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    spec = json.loads(Path(spec_path).read_text())
    store = Path(spec_path).with_suffix(".store")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=TIMEOUT)
    try:
        run_rank(spec, rank, world)
    finally:
        dist.destroy_process_group()


def main() -> None:
    """Entry under mpirun: ``python -m gradq_bench.worker SPEC.json``."""
    from comm_hooks.launch import init_from_mpi

    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m gradq_bench.worker SPEC.json (started by gradq-bench)")
    spec = json.loads(Path(sys.argv[1]).read_text())
    rank, world, _ = init_from_mpi(timeout=TIMEOUT)
    try:
        run_rank(spec, rank, world)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
