"""Why 1-bit error feedback diverged at momentum 0.9 on Fashion-MNIST, and what makes it converge.

In-process simulation of 4 data-parallel ranks on gradq-bench's fmnist workload (the CNN, batch 64 per
rank, SGD lr 0.05, momentum 0.9, 400 steps, the first 2 uncompressed as in the hook): each step every
rank's gradient goes through the two-phase arithmetic of gradq's compressed allreduce, with gradq's own
onebit compressor and error-feedback memory (worker error feedback, mean, server error feedback; no
chunking, no communication). Variants: what is compressed (the gradient, each rank's own momentum, or a
momentum shared by all ranks as 1-bit Adam keeps it), the scale block, error feedback on or off. Also
prints, for the gradient variant at the old block of 65536, each layer's residual against its gradient
and the compressor's energy ratio delta = 1 - |x - C(x)|^2 / |x|^2 at both blocks. The code is onebit with
the scale mean |x|, its default when this diagnosis was made (``--scale rms`` for today's default).

    .venv/bin/python benchmarks/onebit_momentum.py [--seeds 0,1,2] [--scale mean|rms] [--output ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gradq.compressors import OneBit  # noqa: E402
from gradq.memory import ErrorFeedback  # noqa: E402
from gradq_bench.workloads import fmnist  # noqa: E402

RANKS, STEPS, START = 4, 400, 2
# name: (what is compressed, block, error feedback)
VARIANTS = {
    "fp32 allreduce": ("exact", 0, False),
    "gradient, block 65536": ("gradient", 65536, True),
    "gradient, block 512": ("gradient", 512, True),
    "gradient, block 512, no EF": ("gradient", 512, False),
    "own momentum, block 512": ("local", 512, True),
    "shared momentum, block 65536": ("shared", 65536, True),
    "shared momentum, block 512": ("shared", 512, True),
}


def delta(x: torch.Tensor, block: int, scale: str) -> float:
    """1 - |x - C(x)|^2 / |x|^2 for the onebit code C with this block (1: lossless, 0: nothing kept)."""
    c = OneBit(block, scale=scale)
    return 1 - float((x - c.decompress(c.compress(x), x.numel())).square().sum() / x.square().sum())


class TwoPhase:
    """The arithmetic of a two-phase compressed allreduce over RANKS simulated ranks."""

    def __init__(self, block: int, error_feedback: bool, scale: str) -> None:
        self.code = OneBit(block, scale=scale)
        self.workers = [ErrorFeedback() for _ in range(RANKS)]
        self.server = ErrorFeedback()
        self.error_feedback = error_feedback

    def _roundtrip(self, memory: ErrorFeedback, x: torch.Tensor) -> torch.Tensor:
        payload = memory.compress(self.code, x, 0) if self.error_feedback else self.code.compress(x)
        return self.code.decompress(payload, x.numel())

    def mean(self, values: list[torch.Tensor]) -> torch.Tensor:
        decoded = [self._roundtrip(memory, v) for memory, v in zip(self.workers, values, strict=True)]
        return self._roundtrip(self.server, sum(decoded) / RANKS)


def train(variant: str, seed: int, report_layers: bool, scale: str) -> dict:
    what, block, error_feedback = VARIANTS[variant]
    workload = fmnist()
    torch.manual_seed(seed)
    model = workload.build_model()
    params = list(model.parameters())
    sizes = [p.numel() for p in params]
    in_hook = what in ("local", "shared")
    opt = torch.optim.SGD(params, lr=workload.lr, momentum=0.0 if in_hook else workload.momentum)
    reduce = TwoPhase(block, error_feedback, scale) if block else None
    own = [torch.zeros(sum(sizes)) for _ in range(RANKS)]
    shared = torch.zeros(sum(sizes))
    gen = torch.Generator().manual_seed(seed)
    layers = []
    for step in range(STEPS):
        grads = []
        for _ in range(RANKS):
            idx = torch.randint(len(workload.train_x), (workload.batch_size,), generator=gen)
            model.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(workload.train_x[idx]), workload.train_y[idx])
            loss.backward()
            grads.append(torch.cat([p.grad.reshape(-1) for p in params]))
        if what == "local":
            for m, g in zip(own, grads, strict=True):
                m.mul_(workload.momentum).add_(g)
            sent = [m.clone() for m in own]
        elif what == "shared":
            sent = [workload.momentum * shared + g for g in grads]
        else:
            sent = grads
        mean = sum(sent) / RANKS if reduce is None or step < START else reduce.mean(sent)
        if what == "shared":
            shared = mean.clone()
        for p, piece in zip(params, mean.split(sizes), strict=True):
            p.grad.copy_(piece.view_as(p))
        opt.step()
        if report_layers and step + 1 in (50, 100, 150):
            residual = reduce.workers[0].residuals[0]
            pairs = zip(residual.split(sizes), grads[0].split(sizes), strict=True)
            ratios = [float(r.norm() / g.norm()) for r, g in pairs]
            kept = {f"delta_{b}": delta(grads[0], b, scale) for b in (65536, 512)}
            layers.append({"step": step + 1, "residual_over_gradient": ratios, **kept})
    with torch.no_grad():
        accuracy = float((model(workload.test_x).argmax(1) == workload.test_y).double().mean())
    return {"variant": variant, "seed": seed, "accuracy": accuracy, "final_train_loss": float(loss.detach()),
            "layers": layers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--scale", choices=("mean", "rms"), default="mean", help="onebit's scale (default mean)")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/onebit_momentum.json"))
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    torch.set_num_threads(2)
    runs, started = [], time.perf_counter()
    for variant in VARIANTS:
        for seed in seeds:
            report = variant == "gradient, block 65536" and seed == seeds[0]
            run = train(variant, seed, report_layers=report, scale=args.scale)
            runs.append(run)
            print(f"[{time.perf_counter() - started:5.0f} s] {variant}, seed {seed}: {100 * run['accuracy']:.1f}%",
                  file=sys.stderr, flush=True)  # fmt: skip
    names = [f"{tuple(p.shape)}" for p in fmnist().build_model().parameters()]
    print("\nOnebit, gradient compressed, block 65536: residual / gradient per layer (rank 0), and delta")
    for row in next(r for r in runs if r["layers"])["layers"]:
        cells = "  ".join(f"{n} {v:.1f}" for n, v in zip(names, row["residual_over_gradient"], strict=True))
        print(f"step {row['step']:3d}: {cells}  | delta 65536 {row['delta_65536']:.3f}, 512 {row['delta_512']:.3f}")
    print(f"\n{'variant':32}" + "".join(f"{'seed ' + str(s):>9}" for s in seeds) + f"{'median':>9}")
    for variant in VARIANTS:
        accs = [100 * r["accuracy"] for r in runs if r["variant"] == variant]
        print(f"{variant:32}" + "".join(f"{a:9.1f}" for a in accs) + f"{statistics.median(accs):9.1f}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"command": " ".join(sys.argv), "ranks": RANKS, "steps": STEPS, "runs": runs},
                                      indent=1))  # fmt: skip
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
