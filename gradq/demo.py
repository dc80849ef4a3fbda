"""Demo: compress a real model's gradients with each code book and report sizes and errors.

Trains a small MLP on scikit-learn's bundled digits for a few steps, then sends every parameter's
gradient through quantize -> encode_payload -> decode_payload -> dequantize, checks the round trip,
and prints payload bytes, compression ratio, relative error and encode speed per scheme.
Run: ``python -m gradq.demo`` (or ``gradq-demo``).
"""

from __future__ import annotations

import argparse
import time

import torch

import gradq
from gradq import PerAxis, QuantScheme

SCHEMES = {
    "int8 per-channel": QuantScheme.uniform(8, granularity=PerAxis(0)),
    "int4 affine": QuantScheme.uniform(4, symmetric=False),
    "qsgd s=4 (4 bit)": QuantScheme.qsgd(levels=4, bucket_size=512),
    "terngrad (2 bit)": QuantScheme.ternary(bucket_size=4096, clip=2.5),
    "sign (1 bit)": QuantScheme.sign(bucket_size=4096),
}


def _model_gradients(steps: int, seed: int) -> tuple[dict[str, torch.Tensor], float]:
    """Gradients of a 64-512-512-10 MLP on the digits data after ``steps`` SGD steps, and its accuracy."""
    from sklearn.datasets import load_digits

    torch.manual_seed(seed)
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 512), torch.nn.ReLU(), torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    opt.zero_grad()
    logits = model(x)
    torch.nn.functional.cross_entropy(logits, y).backward()
    accuracy = float((logits.argmax(1) == y).float().mean())
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}, accuracy


def _scheme_for(scheme: QuantScheme, grad: torch.Tensor) -> QuantScheme:
    """Per-channel schemes need 2-D weights: biases fall back to one scale per tensor."""
    if isinstance(scheme.granularity, PerAxis) and grad.dim() < 2:
        return QuantScheme.uniform(scheme.bits, signed=scheme.signed, symmetric=scheme.symmetric)
    return scheme


def run(steps: int = 20, seed: int = 0) -> list[dict[str, float | str]]:
    """Compress the model's gradients with every scheme; returns one row per scheme."""
    grads, accuracy = _model_gradients(steps, seed)
    numel = sum(g.numel() for g in grads.values())
    print(f"model: MLP 64-512-512-10 on sklearn digits, {numel:,} parameters, train accuracy {accuracy:.3f}")
    print(f"native kernels: {'yes' if gradq.native_available() else 'no (reference path)'}\n")
    rows = [{"scheme": "fp32 (uncompressed)", "bytes": 4 * numel, "ratio": 1.0, "rel_error": 0.0, "ms": 0.0}]
    for label, base in SCHEMES.items():
        nbytes, err2, ref2, elapsed = 0, 0.0, 0.0, 0.0
        for index, grad in enumerate(grads.values()):
            scheme = _scheme_for(base, grad)
            start = time.perf_counter()
            payload = gradq.encode_payload(gradq.quantize(grad, scheme, seed=seed, offset=index))
            elapsed += time.perf_counter() - start
            if payload.numel() != gradq.payload_nbytes(grad.shape, scheme):
                raise AssertionError(f"{label}: payload size differs from payload_nbytes")
            decoded = gradq.dequantize(gradq.decode_payload(payload, grad.shape, scheme))
            nbytes += payload.numel()
            err2 += float((decoded - grad).double().square().sum())
            ref2 += float(grad.double().square().sum())
        rows.append(
            {
                "scheme": label,
                "bytes": nbytes,
                "ratio": 4 * numel / nbytes,
                "rel_error": (err2 / ref2) ** 0.5,
                "ms": elapsed * 1e3,
            }
        )
    return rows


def _print_table(rows: list[dict[str, float | str]]) -> None:
    header = f"{'scheme':<22}{'payload bytes':>15}{'vs fp32':>10}{'rel. L2 error':>15}{'encode ms':>11}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['scheme']:<22}{r['bytes']:>15,}{r['ratio']:>9.1f}x{r['rel_error']:>15.3f}{r['ms']:>11.1f}")
    print("\nrel. L2 error = ||decoded - g|| / ||g|| for one step; error feedback (sign) and unbiasedness")
    print("(qsgd, terngrad) make these errors average out over steps during training.")


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="SGD steps before taking the gradients")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 0:
        parser.error("--steps must be >= 0")
    _print_table(run(args.steps, args.seed))


if __name__ == "__main__":
    main()
