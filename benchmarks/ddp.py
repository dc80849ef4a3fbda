"""DDP on 4 local ranks: every gradq compressor next to PyTorch's hooks, on the 25.7M-parameter MLP.

The issue-3 benchmark, run through gradq-bench (real DDP, Gloo over loopback, one thread per rank, batch
128 per rank as in the first recorded runs):
PyTorch's noop_hook (the floor), fp32 allreduce, PyTorch's fp16 and PowerSGD (rank 1, one bucket)
hooks, and gradq's hook with every compressor (two-phase, plus onebit in allgather mode and reducing
inside the hook call, onebit:sync). It prints gradq-bench's table and target checks, among them the
issue-3 targets: two-phase onebit payload <= 1/25 of fp32 allreduce, its compression time < 15% of the
no-communication step (timed on onebit:sync, whose codec does not share the core with backward).

    .venv/bin/python benchmarks/ddp.py [--steps 9] [--output benchmarks/results/ddp]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gradq_bench import main as bench

METHODS = "fp32,torch-fp16,powersgd,none,fp16,bf16,onebit,onebit:sync,onebit:allgather,terngrad,qsgd"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=9, help="steps per method, the first 3 untimed")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/ddp"))
    args = parser.parse_args()
    argv = ["--workload", "mlp25m", "--batch", "128", "--ranks", "4", "--steps", str(args.steps),
            "--eval-every", str(args.steps),
            "--compressors", METHODS, "--output", str(args.output)]  # fmt: skip
    sys.exit(bench(argv))


if __name__ == "__main__":
    main()
