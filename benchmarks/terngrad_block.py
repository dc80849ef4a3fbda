"""How much of each layer's gradient TernGrad keeps, by block size, on gradq-bench's fmnist CNN.

Trains the fmnist CNN in one process (SGD lr 0.05, momentum 0.9, batch 64, seed 0) and at the given steps
lays its gradient out as DDP's bucket holds it (parameters in reverse order), splits it into the 4 chunks
of the two-phase allreduce on 4 ranks and TernGrad-compresses each chunk with each block size, ``--draws``
times. Per layer it reports "kept": <E[C(g)], g> / |g|^2, the share of the gradient the expected
compressed gradient keeps (1 for an unbiased code; clipping lowers it), and the layer's gradient RMS
relative to fc1's weights. Prints a table and writes JSON (default benchmarks/results/terngrad_block.json).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gradq  # noqa: E402
from gradq_bench.workloads import fmnist  # noqa: E402

RANKS = 4


def kept_per_layer(grads: dict[str, torch.Tensor], block: int, draws: int) -> dict[str, float]:
    """<E[C(g)], g> / |g|^2 per layer, E over ``draws`` seeds, for TernGrad(block) on the bucket's chunks."""
    flat = torch.cat([g.flatten() for g in grads.values()])
    comp = gradq.TernGrad(block=block)
    mean = torch.zeros_like(flat)
    for seed in range(draws):
        chunks = flat.tensor_split(RANKS)
        mean += torch.cat([comp.decompress(comp.compress(c, seed=seed), c.numel()) for c in chunks]) / draws
    kept, offset = {}, 0
    for name, g in grads.items():
        part = mean[offset:offset + g.numel()]
        kept[name] = float((part * g.flatten()).sum() / g.pow(2).sum())
        offset += g.numel()
    return kept


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, nargs="+", default=[50, 200], help="training steps at which to measure")
    p.add_argument("--blocks", type=int, nargs="+", default=[65536, 512])
    p.add_argument("--draws", type=int, default=20, help="compressions per block size (seeds 0..draws-1)")
    p.add_argument("--output", type=Path, default=Path("benchmarks/results/terngrad_block.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    workload = fmnist()
    torch.manual_seed(0)
    model = workload.build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=workload.lr, momentum=workload.momentum)
    gen = torch.Generator().manual_seed(0)
    params = dict(reversed(list(model.named_parameters())))  # DDP's bucket order
    rows = []
    for step in range(max(args.steps) + 1):
        idx = torch.randint(0, len(workload.train_x), (workload.batch_size,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(workload.train_x[idx]), workload.train_y[idx])
        optimizer.zero_grad()
        loss.backward()
        if step in args.steps:
            grads = {name: q.grad.detach().clone() for name, q in params.items()}
            fc1 = float(grads["7.weight"].pow(2).mean().sqrt())
            kept = {block: kept_per_layer(grads, block, args.draws) for block in args.blocks}
            for name, g in grads.items():
                rows.append({"step": step, "layer": name, "numel": g.numel(),
                             "rms_vs_fc1": float(g.pow(2).mean().sqrt()) / fc1,
                             **{f"kept_block_{b}": kept[b][name] for b in args.blocks}})
            print(f"step {step} measured", flush=True)
        optimizer.step()
    header = f"{'step':>4}  {'layer':<9} {'values':>7} {'rms/fc1':>7}" + "".join(
        f"  {'kept, block ' + str(b):>17}" for b in args.blocks)
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        print(f"{r['step']:>4}  {r['layer']:<9} {r['numel']:>7} {r['rms_vs_fc1']:>7.1f}" + "".join(
            f"  {r[f'kept_block_{b}']:>17.2f}" for b in args.blocks))
    print("\nkept: <E[C(g)], g> / |g|^2 (1 = unbiased; layers: 0 conv1, 3 conv2, 7 fc1, 9 fc2)")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"rows": rows, "settings": vars(args) | {"output": str(args.output)},
                                       "command": " ".join(sys.argv)}, indent=1))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
