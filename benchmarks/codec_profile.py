"""Where two-phase compression time goes, on one uncontended process, next to compute and copy.

For gradq-bench's 25.7M-parameter MLP workload (mlp25m) and W = 4 ranks, times (one thread, median of
``--repeats``) each step of the two-phase codec of onebit, TernGrad and QSGD on the shapes one rank
sees: the worker compression of the 4 chunks (with error feedback for onebit), the fused server step
on one chunk, the decode into the bucket; for the stochastic codes also the Philox uniforms alone.
Then the whole codec through ``CompressedAllreduce`` with an in-process transport that hands every
rank's payload back unchanged (as if all ranks sent the same bytes), one rank's compute step (forward,
backward, SGD) and a copy of the gradient. Also prints each step's essential memory traffic per
gradient value (b = payload bits per value): the worker reads x (and reads and writes onebit's
residual) and writes b/8 bytes; the server reads W payloads and writes one (and reads and writes its
residual) for 1/W of the values; the decode reads b/8 and writes 4.

    .venv/bin/python benchmarks/codec_profile.py [--repeats 7] [--output benchmarks/results/codec_profile.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from kernels import time_runs

import gradq
from gradq.allreduce import CompressedAllreduce
from gradq_bench.workloads import mlp25m

WORLD = 4
COMPRESSORS = ("onebit", "terngrad", "qsgd")


class EchoTransport:
    """Every rank sent the same payload: all-to-all returns the send buffer, all-gather repeats it."""

    world_size, rank = WORLD, 0

    def all_to_all(self, send: torch.Tensor) -> torch.Tensor:
        return send

    def all_gather(self, send: torch.Tensor) -> torch.Tensor:
        return send.repeat(WORLD)


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    return statistics.median(time_runs(fn, repeats, warmup=1))


def codec_steps(name: str, n: int) -> list[tuple[str, Callable[[], object], float]]:
    """(label, call, essential bytes per gradient value) of each step of ``name``'s two-phase codec."""
    comp = gradq.get_compressor(name)
    ef = comp.error_feedback_default
    chunk = -(-n // (WORLD * comp.alignment)) * comp.alignment
    grad = torch.randn(WORLD * chunk, generator=torch.Generator().manual_seed(0))
    chunks = grad.split(chunk)
    residuals = torch.zeros(WORLD * chunk).split(chunk)
    bucket = torch.empty(WORLD * chunk).split(chunk)
    payloads = [comp.compress(c, seed=1, offset=i) for i, c in enumerate(chunks)]
    rows = torch.stack(payloads)
    server_residual = torch.zeros(chunk) if ef else None
    b = 8 * comp.payload_nbytes(chunk) / chunk
    residual_bytes = 8 if ef else 0

    def worker() -> None:
        for i, (c, r) in enumerate(zip(chunks, residuals, strict=True)):
            if ef:
                comp.fused_error_feedback(c, r)
            else:
                comp.compress(c, seed=1, offset=i)

    def uniforms() -> None:
        for i in range(WORLD):
            gradq.philox_uniform(chunk, 1, i)

    def decode() -> None:
        for p, out in zip(payloads, bucket, strict=True):
            comp.decompress(p, chunk, out=out)

    steps = [
        (f"worker {'compress + EF' if ef else 'compress'} (4 chunks)", worker, 4 + residual_bytes + b / 8),
        ("server fused_mean_compress (1 chunk)",
         lambda: comp.fused_mean_compress(rows, chunk, server_residual, seed=1, offset=9),
         (WORLD * b / 8 + b / 8 + residual_bytes) / WORLD),
        ("decompress into the bucket (4 chunks)", decode, b / 8 + 4),
    ]  # fmt: skip
    if not ef:
        steps.insert(1, ("  of which Philox uniforms (4 chunks)", uniforms, 4))
    return steps


def whole_codec_seconds(name: str, x: torch.Tensor, out: torch.Tensor, repeats: int) -> float:
    """Median codec seconds that ``CompressedAllreduce`` reports for x, after one warm-up call."""
    reducer = CompressedAllreduce(name, seed=1)
    runs = [reducer(x, EchoTransport(), key="bucket", step=0, out=out).codec_seconds for _ in range(repeats + 1)]
    return statistics.median(runs[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/codec_profile.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    workload = mlp25m()
    torch.manual_seed(0)
    model = workload.build_model()
    n = sum(p.numel() for p in model.parameters())
    x = torch.randn(n)
    out = torch.empty(n)
    print(f"two-phase codecs, {n:,} values, W = {WORLD}, one thread, median of {args.repeats}", flush=True)
    profiles = {}
    for name in COMPRESSORS:
        print(f"\n{name:<44}{'ms':>9}{'bytes/value':>13}")
        kernels = {}
        for label, fn, traffic in codec_steps(name, n):
            ms = 1e3 * median_seconds(fn, args.repeats)
            kernels[label] = {"ms": ms, "bytes_per_value": traffic}
            print(f"{label:<44}{ms:>9.1f}{traffic:>13.2f}", flush=True)
        steps = {k: v for k, v in kernels.items() if not k.startswith(" ")}
        kernels_ms = sum(r["ms"] for r in steps.values())
        total_bytes = sum(r["bytes_per_value"] for r in steps.values())
        codec_ms = 1e3 * whole_codec_seconds(name, x, out, args.repeats)
        print(f"{'steps, sum':<44}{kernels_ms:>9.1f}{total_bytes:>13.2f}")
        print(f"{'whole codec (CompressedAllreduce, echo)':<44}{codec_ms:>9.1f}", flush=True)
        profiles[name] = {"kernels": kernels, "kernels_ms": kernels_ms, "bytes_per_value": total_bytes,
                          "codec_ms": codec_ms}  # fmt: skip

    inputs, labels = workload.train_x[:128], workload.train_y[:128]
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    def compute() -> None:
        opt.zero_grad(set_to_none=False)
        torch.nn.functional.cross_entropy(model(inputs), labels).backward()
        opt.step()

    compute_ms = 1e3 * median_seconds(compute, max(3, args.repeats // 2))
    copy_ms = 1e3 * median_seconds(lambda: out.copy_(x), args.repeats)
    print(f"\n{'one rank compute step (batch 128, SGD)':<44}{compute_ms:>9.1f}")
    print(f"{'copy of the gradient (y.copy_(x))':<44}{copy_ms:>9.1f}{8:>13.2f}")
    print("\ncodec / compute: " + ", ".join(f"{k} {v['codec_ms'] / compute_ms:.1%}" for k, v in profiles.items()))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "command": " ".join([sys.executable, *sys.argv]),
        "values": n, "world": WORLD, "repeats": args.repeats, "compressors": profiles,
        "compute_ms": compute_ms, "copy_ms": copy_ms,
    }, indent=2))  # fmt: skip
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
