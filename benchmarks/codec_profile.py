"""Where two-phase onebit's compression time goes, on one uncontended process, next to compute and copy.

For gradq-bench's 25.7M-parameter MLP workload (mlp25m) and W = 4 ranks, times (one thread, median of
``--repeats``): each kernel of the two-phase onebit codec on the shapes one rank sees (worker
compress with error feedback of the 4 chunks, the fused server step, the decode into the bucket), the
whole codec through ``CompressedAllreduce`` with an in-process transport that hands every rank's
payload back unchanged (as if all ranks sent the same bytes), one rank's compute step (forward,
backward, SGD) and a copy of the gradient. Also prints each kernel's essential memory traffic per
gradient value.

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
from gradq.bench.workloads import mlp25m

WORLD = 4


class EchoTransport:
    """Every rank sent the same payload: all-to-all returns the send buffer, all-gather repeats it."""

    world_size, rank = WORLD, 0

    def all_to_all(self, send: torch.Tensor) -> torch.Tensor:
        return send

    def all_gather(self, send: torch.Tensor) -> torch.Tensor:
        return send.repeat(WORLD)


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    return statistics.median(time_runs(fn, repeats, warmup=1))


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
    chunk = -(-n // (WORLD * 8)) * 8
    block = gradq.OneBit().block
    grad = torch.randn(n, generator=torch.Generator().manual_seed(0))
    residual = torch.zeros(WORLD * chunk)
    bucket = torch.empty(n)
    payloads = [gradq.sign_compress(grad[c * chunk : (c + 1) * chunk], None, block=block) for c in range(WORLD)]
    packed_rows = torch.stack([p for p, _ in payloads])
    scale_rows = torch.stack([s for _, s in payloads])
    server_residual = torch.zeros(chunk)

    def worker() -> None:
        for c in range(WORLD):
            gradq.sign_compress(grad[c * chunk : (c + 1) * chunk], residual[c * chunk : (c + 1) * chunk], block=block)

    def decode() -> None:
        for c in range(WORLD):
            gradq.sign_decompress(*payloads[c], block=block, numel=chunk, out=bucket[c * chunk : (c + 1) * chunk])

    reducer = CompressedAllreduce("onebit")
    x = torch.randn(n)
    out = torch.empty(n)
    codec = []

    def whole() -> None:
        codec.append(reducer(x, EchoTransport(), key="bucket", step=0, out=out).codec_seconds)

    inputs, labels = workload.train_x[:128], workload.train_y[:128]
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    def compute() -> None:
        opt.zero_grad(set_to_none=False)
        torch.nn.functional.cross_entropy(model(inputs), labels).backward()
        opt.step()

    copy_target = torch.empty(n)
    # Essential traffic per gradient value (bytes): worker reads x, reads and writes r, writes 1/8;
    # the server step reads W rank bits and reads and writes its residual, for 1/W of the values;
    # the decode reads 1/8 and writes 4.
    rows = [
        ("worker sign_compress + EF (4 chunks)", lambda: worker(), 12 + 1 / 8),
        ("server sign_mean_compress (1 chunk)", lambda: gradq.kernels.sign_mean_compress(
            packed_rows, scale_rows, server_residual, block=block, numel=chunk), (WORLD / 8 + 8 + 1 / 8) / WORLD),
        ("sign_decompress into the bucket (4 chunks)", lambda: decode(), 4 + 1 / 8),
    ]  # fmt: skip
    results = {}
    print(f"two-phase onebit, {n:,} values, W = {WORLD}, one thread, median of {args.repeats}", flush=True)
    print(f"{'step':<44}{'ms':>9}{'bytes/value':>13}")
    for label, fn, traffic in rows:
        ms = 1e3 * median_seconds(fn, args.repeats)
        results[label] = {"ms": ms, "bytes_per_value": traffic}
        print(f"{label:<44}{ms:>9.1f}{traffic:>13.2f}", flush=True)
    kernels_ms = sum(r["ms"] for r in results.values())
    total_bytes = sum(r["bytes_per_value"] for r in results.values())
    median_seconds(whole, args.repeats)
    codec_ms = 1e3 * statistics.median(codec[1:])
    compute_ms = 1e3 * median_seconds(compute, max(3, args.repeats // 2))
    copy_ms = 1e3 * median_seconds(lambda: copy_target.copy_(x), args.repeats)
    print(f"{'kernels, sum':<44}{kernels_ms:>9.1f}{total_bytes:>13.2f}")
    print(f"{'whole codec (CompressedAllreduce, echo)':<44}{codec_ms:>9.1f}")
    print(f"{'one rank compute step (batch 128, SGD)':<44}{compute_ms:>9.1f}")
    print(f"{'copy of the gradient (y.copy_(x))':<44}{copy_ms:>9.1f}{8:>13.2f}")
    print(
        f"\ncodec / compute = {codec_ms / compute_ms:.1%}; kernels move {total_bytes:.1f} bytes per value, "
        f"the copy 8 bytes"
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({
        "command": " ".join([sys.executable, *sys.argv]),
        "values": n, "world": WORLD, "repeats": args.repeats, "kernels": results,
        "kernels_ms": kernels_ms, "bytes_per_value": total_bytes, "codec_ms": codec_ms,
        "compute_ms": compute_ms, "copy_ms": copy_ms,
    }, indent=2))  # fmt: skip
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
