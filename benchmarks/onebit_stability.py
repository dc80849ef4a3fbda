"""Where 1-bit error feedback stays stable: test accuracy on digits across learning rate and momentum.

Trains a 64-64-64-10 MLP on scikit-learn's digits (1400/397 split, batch 128, 300 SGD steps) with the
exact gradient and with that gradient sent through gradq's onebit compressor plus error feedback (one
scale per block, the whole model in one block: what a DDP bucket gets), for several seeds, and prints
the accuracies. In-process: the compressor's effect on optimization, without communication.

    .venv/bin/python benchmarks/onebit_stability.py [--seeds 1,2] [--output benchmarks/results/onebit_stability.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from sklearn.datasets import load_digits

import gradq

GRID = [(m, lr) for m in (0.0, 0.5, 0.9) for lr in (0.02, 0.05, 0.1, 0.2)]


def data() -> tuple[torch.Tensor, ...]:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return x[order[:1400]], y[order[:1400]], x[order[1400:]], y[order[1400:]]


def train(compress: bool, lr: float, momentum: float, seed: int, steps: int = 300) -> float:
    x, y, x_test, y_test = data()
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)
    )
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    comp, memory = gradq.OneBit(scale="mean"), gradq.ErrorFeedback()  # the default when this was measured
    for step in range(steps):
        idx = torch.randint(0, len(y), (128,), generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        if compress and step >= 2:
            grads = [p.grad for p in model.parameters()]
            flat = torch.cat([g.reshape(-1) for g in grads])
            sent = comp.decompress(memory.compress(comp, flat, "model"), flat.numel())
            for g, piece in zip(grads, sent.split([g.numel() for g in grads]), strict=True):
                g.copy_(piece.view_as(g))
        opt.step()
    with torch.no_grad():
        return float((model(x_test).argmax(1) == y_test).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="1,2")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/onebit_stability.json"))
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    print(f"{'momentum':>9}{'lr':>6}{'lr/(1-m)':>10}{'exact':>16}{'onebit + EF':>18}")
    for i, (momentum, lr) in enumerate(GRID):
        exact = [train(False, lr, momentum, s) for s in seeds]
        onebit = [train(True, lr, momentum, s) for s in seeds]
        rows.append({"momentum": momentum, "lr": lr, "exact": exact, "onebit": onebit})
        print(
            f"{momentum:>9}{lr:>6}{lr / (1 - momentum):>10.2f}{' '.join(f'{a:.3f}' for a in exact):>16}"
            f"{' '.join(f'{a:.3f}' for a in onebit):>18}   [{i + 1}/{len(GRID)}]",
            flush=True,
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(
        json.dumps({"command": " ".join([sys.executable, *sys.argv]), "seeds": seeds, "rows": rows}, indent=2)
    )
    print(f"accuracy on 397 held-out digits per seed; wrote {args.output}")


if __name__ == "__main__":
    main()
