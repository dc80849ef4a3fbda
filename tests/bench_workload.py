"""A user workload for tests/test_bench.py's --model test: a 2-layer MLP on a linearly separable set."""

import torch

from gradq_bench import Workload

WIDTHS = (16, 32, 4)


def workload() -> Workload:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(512, WIDTHS[0], generator=gen)
    y = (x @ torch.randn(WIDTHS[0], WIDTHS[-1], generator=gen)).argmax(1)
    return Workload(
        "user-mlp",
        lambda: torch.nn.Sequential(
            torch.nn.Linear(WIDTHS[0], WIDTHS[1]), torch.nn.ReLU(), torch.nn.Linear(WIDTHS[1], WIDTHS[2])
        ),
        x[:384],
        y[:384],
        x[384:],
        y[384:],
        batch_size=16,
        lr=0.05,
    )


def not_a_workload() -> int:
    return 3


def raises() -> Workload:
    raise FileNotFoundError("train.csv is missing")


def broken_on_rank_1() -> Workload:
    import dataclasses

    import torch.distributed as dist

    def build() -> torch.nn.Module:
        if dist.get_rank() == 1:
            raise RuntimeError("model broken on rank 1")
        return torch.nn.Linear(WIDTHS[0], WIDTHS[-1])

    return dataclasses.replace(workload(), build_model=build)
