"""DDP step time and gradient traffic of every gradq compressor next to PyTorch's own hooks.

Runs real DDP on W local ranks (Gloo over loopback, one thread per rank) and, one configuration after
another in the same process group: PyTorch's ``noop_hook`` (no communication: the floor), plain fp32
allreduce, PyTorch's fp16 and PowerSGD (rank 1, one bucket: it fails on Gloo with several) hooks, and
gradq's hook with each compressor. Per configuration it reports the median step time over the timed
steps, wire bytes per rank per step measured from the kernel's loopback counter (all ranks' TCP traffic
/ W), gradq's own payload statistics, the compression ratio against fp32 allreduce, and gradq's
compression time per step. Then it checks the targets of two-phase onebit: payload <= 1/25 of fp32
allreduce, compression time < 15% of the no-communication step time.

    .venv/bin/python benchmarks/ddp.py [--ranks 4] [--steps 6] [--warmup 3] [--batch 128]
                                       [--model mlp25m|small] [--output benchmarks/results/ddp.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks import debugging_hooks, default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel as DDP

import comm_hooks
import gradq

CONFIGS = {
    "noop (floor)": ("torch", "noop"),
    "fp32 allreduce": ("torch", "allreduce"),
    "torch fp16 hook": ("torch", "fp16"),
    "torch PowerSGD r=1": ("torch", "powersgd"),
    "gradq none": ("gradq", "none"),
    "gradq fp16": ("gradq", "fp16"),
    "gradq bf16": ("gradq", "bf16"),
    "gradq onebit": ("gradq", "onebit"),
    "gradq onebit allgather": ("gradq", "onebit:allgather"),
    "gradq terngrad": ("gradq", "terngrad"),
    "gradq qsgd": ("gradq", "qsgd"),
}
MODELS = {"mlp25m": (2048, 4096, 4096, 128), "small": (256, 512, 512, 10)}
START_ITER = 2  # gradq and PowerSGD: plain allreduce before this iteration


def build_model(widths: tuple[int, ...]) -> torch.nn.Module:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


def loopback_tx_bytes() -> int:
    return int(Path("/sys/class/net/lo/statistics/tx_bytes").read_text())


def attach(ddp: DDP, kind: str, name: str) -> object:
    """Register the configuration's hook; returns gradq's state (None for PyTorch's hooks)."""
    if kind == "gradq":
        compressor, _, mode = name.partition(":")
        return comm_hooks.register(ddp, compressor, mode=mode or "two_phase", start_iter=START_ITER)
    if name == "noop":
        ddp.register_comm_hook(None, debugging_hooks.noop_hook)
    elif name == "fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif name == "powersgd":
        state = powerSGD_hook.PowerSGDState(
            process_group=None, matrix_approximation_rank=1, start_powerSGD_iter=START_ITER
        )
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    return None


def run_config(rank: int, world: int, args: argparse.Namespace, label: str) -> dict[str, float]:
    kind, name = CONFIGS[label]
    widths = MODELS[args.model]
    single_bucket = name == "powersgd"
    ddp = DDP(build_model(widths), bucket_cap_mb=1024 if single_bucket else 25)
    state = attach(ddp, kind, name)
    opt = torch.optim.SGD(ddp.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch, widths[0], generator=gen)
    y = torch.randint(0, widths[-1], (args.batch,), generator=gen)
    times, codec = [], []
    tx_start = 0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            dist.barrier()
            tx_start = loopback_tx_bytes()
        dist.barrier()
        start = time.perf_counter()
        opt.zero_grad(set_to_none=False)
        torch.nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
        elapsed = time.perf_counter() - start
        if step >= args.warmup:
            times.append(elapsed)
            if state is not None:
                codec.append(state.stats.codec_seconds_last_step)
        if rank == 0:
            print(f"  {label}: step {step + 1}/{args.warmup + args.steps} {elapsed:.3f} s", file=sys.stderr, flush=True)
    dist.barrier()
    tx = loopback_tx_bytes() - tx_start
    numel = sum(p.numel() for p in ddp.parameters())
    result = {
        "step_s": statistics.median(times),
        "wire_bytes_per_rank_step": tx / world / args.steps,
        "params": numel,
        "buckets": 1 if single_bucket else None,
    }
    if state is not None:
        result.update(
            payload_bytes_per_step=state.stats.bytes_sent_last_step,
            fp32_bytes_per_step=state.stats.fp32_bytes_last_step,
            codec_s=statistics.median(codec),
            buckets=state.stats.buckets_last_step,
        )
    del ddp, opt
    return result


def worker(rank: int, world: int, args: argparse.Namespace, store: str, out: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600)
    )
    results = {}
    for i, label in enumerate(args.configs):
        if rank == 0:
            print(f"[{i + 1}/{len(args.configs)}] {label}", file=sys.stderr, flush=True)
        results[label] = run_config(rank, world, args, label)
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def report(results: dict[str, dict[str, float]], world: int) -> dict[str, object]:
    floor = results.get("noop (floor)", {}).get("step_s")
    fp32 = results.get("fp32 allreduce", {})
    header = (
        f"{'configuration':<24}{'step s':>8}{'x floor':>8}{'wire MB':>9}{'payload MB':>11}"
        f"{'vs fp32':>9}{'codec s':>9}{'codec %':>8}"
    )
    print(header)
    print("-" * len(header))
    for label, r in results.items():
        ratio = (
            fp32.get("wire_bytes_per_rank_step", 0) / r["wire_bytes_per_rank_step"]
            if r["wire_bytes_per_rank_step"]
            else 0
        )
        payload = r.get("payload_bytes_per_step")
        codec = r.get("codec_s")
        print(
            f"{label:<24}{r['step_s']:>8.3f}{r['step_s'] / floor if floor else 0:>8.2f}"
            f"{r['wire_bytes_per_rank_step'] / 1e6:>9.2f}{'' if payload is None else f'{payload / 1e6:.2f}':>11}"
            f"{'-' if label.startswith('noop') else f'{ratio:.1f}x':>9}"
            f"{'' if codec is None else f'{codec:.3f}':>9}"
            f"{'' if codec is None or not floor else f'{100 * codec / floor:.1f}%':>8}"
        )
    print(f"\nW = {world}. wire MB: loopback bytes of all ranks / W per step (kernel counter, TCP payload + headers);")
    print("payload MB: gradq's own count per rank; vs fp32: wire bytes of fp32 allreduce / this; codec: gradq's")
    print("(de)compression time per step (median), % of the no-communication step time.")
    checks = {}
    onebit = results.get("gradq onebit")
    if onebit and floor:
        traffic = onebit["payload_bytes_per_step"] / onebit["fp32_bytes_per_step"]
        codec_share = onebit["codec_s"] / floor
        checks = {
            "onebit_payload_vs_fp32": traffic,
            "onebit_payload_target_met": traffic <= 1 / 25,
            "onebit_codec_share_of_floor": codec_share,
            "onebit_codec_target_met": codec_share < 0.15,
        }
        print("\nTargets of two-phase onebit:")
        print(f"  payload = 1/{1 / traffic:.1f} of fp32 allreduce (<= 1/25): {'PASS' if traffic <= 1 / 25 else 'FAIL'}")
        print(
            f"  compression time = {100 * codec_share:.1f}% of the no-communication step (< 15%): "
            f"{'PASS' if codec_share < 0.15 else 'FAIL'}"
        )
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (>= 3: past start_iter)")
    parser.add_argument("--batch", type=int, default=128, help="samples per rank per step")
    parser.add_argument("--model", choices=sorted(MODELS), default="mlp25m")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated labels")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/ddp.json"))
    args = parser.parse_args()
    args.configs = [c.strip() for c in args.configs.split(",")]
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown configurations {unknown}; choose from {list(CONFIGS)}")
    if args.ranks < 2 or args.warmup <= START_ITER or args.steps < 1:
        parser.error(f"need --ranks >= 2, --warmup > {START_ITER} and --steps >= 1")
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "results.json")
        mp.spawn(worker, args=(args.ranks, args, str(Path(tmp) / "store"), out), nprocs=args.ranks, join=True)
        results = json.loads(Path(out).read_text())
    checks = report(results, args.ranks)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps(
            {
                "command": shlex.join([sys.executable, *sys.argv]),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "torch": torch.__version__,
                "gradq": gradq.__version__,
                "native_kernels": gradq.native_available(),
                "cpu": platform.processor() or platform.machine(),
                "cores": os.cpu_count(),
                "ranks": args.ranks,
                "model": {"name": args.model, "widths": MODELS[args.model]},
                "batch_per_rank": args.batch,
                "steps": args.steps,
                "warmup": args.warmup,
                "results": results,
                "checks": checks,
            },
            indent=2,
        )
    )
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
