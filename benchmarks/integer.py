"""Integer-model benchmark: exactness, size and speed of ``gradq.convert``'s integer models, and the integer
GEMM kernels at LLM-like shapes.

1. GEMM (one thread): M in {1, 16, 64} rows by K = N = 4096, in GOPS (2*M*K*N / seconds): fp32
   ``torch.mm``, ``torch._int_mm`` (oneDNN int8, the products only), and gradq's kernels with the fused
   requantization epilogue for 8-, 4-, 2- and 1-bit weights (and 4-bit per group of 128).
2. Models: LeNet-5 (pretrained, MNIST-5k), the Fashion-MNIST CNN and a residual CNN (both trained here
   for ``--train-epochs`` on ``--train`` Fashion-MNIST images), each at W8A8, W4A8 and W2A8: whether the
   converted model equals the prepared model's eval() bit for bit, its file size against the fp32 state
   dict, onnxruntime (one thread, all optimizations) on the exported graph (values within one output
   step, accuracy), and the speed at batch 1 and 64 (one thread, medians of interleaved repeats in one
   process) against fp32 eager PyTorch, onnxruntime int8 on the same exported W8A8 model and torchao's
   int8 CPU path (dynamic activations; Linear layers only, the convolutions stay fp32).

Prints the tables and the targets with PASS/FAIL, writes ``integer.json`` and ``integer.png`` to
``--output``. About 4 minutes on a 2-core machine.

    .venv/bin/python benchmarks/integer.py [--repeats 15] [--output benchmarks/results/integer]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gradq  # noqa: E402
from benchmarks.quant_data import (  # noqa: E402
    FashionCNN,
    ResidualNet,
    accuracy,
    load_fashion_mnist,
    load_lenet5,
    load_mnist5k,
    mnist5k_split,
)
from benchmarks.quantization import train  # noqa: E402
from gradq.fixedpoint import quantize_multiplier  # noqa: E402
from gradq.integer_kernels import integer_linear, native_isa, plan_integer_gemm  # noqa: E402
from gradq.modelquant import Dequantize, QuantConfig  # noqa: E402

PRESETS = [("W8A8", "w8a8"), ("W4A8", "w4a8"), ("W2A8", "w2a8")]
GEMM_ROWS = (1, 16, 64)
GEMM_SIZE = 4096


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, called in turn after one warm-up, in a new random order (seeded)
    every repeat: what a call finds in the caches depends on the call before it, and a rotated order kept
    that neighbour fixed (gradq W8A8 always ran after onnxruntime, W4A8 after W8A8 of the same model)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    order = random.Random(0)
    for _ in range(repeats):
        order.shuffle(names)
        for name in names:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _gemm_plan(bits: int, group: int, n: int, k: int) -> object:
    gen = torch.Generator().manual_seed(bits)
    q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (n, k), generator=gen) if bits > 1 else (
        torch.where(torch.rand(n, k, generator=gen) < 0.5, -1, 1))
    r = torch.randint(1, 256, (n, k // group), generator=gen) if group else None
    mult, shift = quantize_multiplier(torch.full((n,), 1e-4 if not group else 1e-6, dtype=torch.float64))
    zero = torch.zeros(n, dtype=torch.bool)
    return plan_integer_gemm(q, r, zero, bits, bits == 1, group, torch.zeros(n, dtype=torch.int64), mult, shift,
                             128, 0, 0, 255, False, False)


def gemm_table(repeats: int) -> list[dict]:
    """GOPS of each GEMM at M x 4096 x 4096."""
    k = n = GEMM_SIZE
    plans = {f"gradq W{b}" + (f" g{g}" if g else ""): _gemm_plan(b, g, n, k) for b, g in
             ((8, 0), (4, 0), (2, 0), (1, 0), (4, 128))}
    rows = []
    for m in tqdm(GEMM_ROWS, desc="GEMM", leave=False):
        gen = torch.Generator().manual_seed(m)
        x = torch.randint(0, 256, (m, k), dtype=torch.uint8, generator=gen)
        xf, wf = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
        xs, w8 = (x ^ 128).view(torch.int8), plans["gradq W8"].int8_weights()
        fns = {"fp32 torch.mm": lambda xf=xf, wf=wf: xf @ wf,
               "torch._int_mm (int8)": lambda xs=xs, w8=w8: torch._int_mm(xs, w8)}
        for name, plan in plans.items():
            fns[name] = lambda x=x, plan=plan: integer_linear(x, plan, engine="gradq")
        seconds = interleaved(fns, repeats)
        for name, s in seconds.items():
            weight_bytes = {"fp32 torch.mm": 4 * k * n, "torch._int_mm (int8)": k * n}.get(name)
            if weight_bytes is None:
                weight_bytes = plans[name].weight_nbytes()
            rows.append({"m": m, "kernel": name, "seconds": s, "gops": 2 * m * k * n / s / 1e9,
                         "weight_bytes": weight_bytes})
    return rows


def _fashion_models(n_train: int, epochs: int) -> dict[str, nn.Module]:
    x, y = load_fashion_mnist(train=True)
    models = {}
    for name, cls in (("FashionCNN", FashionCNN), ("ResidualNet", ResidualNet)):
        torch.manual_seed(0)
        model = cls()
        train(model, x[:n_train], y[:n_train], epochs, 0.05, 64, f"train {name}")
        models[name] = model.eval()
    return models


def _ort_session(path: str) -> object:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _torchao_int8(model: nn.Module) -> nn.Module | None:
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError:
        return None
    ao = copy.deepcopy(model)
    quantize_(ao, Int8DynamicActivationInt8WeightConfig())
    return ao


def model_rows(name: str, model: nn.Module, calib: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
               repeats: int, tmp: str) -> tuple[list[dict], dict]:
    """Exactness, size and onnxruntime agreement per preset, then the speed table of this model."""
    rows, converted_by = [], {}
    torch.save(model.state_dict(), f"{tmp}/{name}.pt")
    fp32_bytes = os.path.getsize(f"{tmp}/{name}.pt")
    fp32_acc = accuracy(model, x, y)
    for label, preset in PRESETS:
        prepared = gradq.calibrate(gradq.prepare(model, QuantConfig.preset(preset)), calib, progress=False).eval()
        converted = gradq.convert(prepared)
        path = f"{tmp}/{name}-{preset}"
        size = gradq.save_quantized(converted, f"{path}.safetensors")
        loaded = gradq.load_quantized(f"{path}.safetensors", copy.deepcopy(model))
        gradq.export_onnx(converted, x[:1], f"{path}.onnx")
        theirs = torch.from_numpy(_ort_session(f"{path}.onnx").run(None, {"input": x.numpy()})[0])
        with torch.no_grad():
            want = torch.cat([prepared(b) for b in x.split(500)])
            ours = torch.cat([converted(b) for b in x.split(500)])
            again = torch.cat([loaded(b) for b in x.split(500)])
        step = float([m for m in converted.modules() if isinstance(m, Dequantize)][-1].scale)
        rows.append({
            "model": name, "config": label, "bit_exact": bool(torch.equal(ours, want) and torch.equal(again, want)),
            "file_bytes": size, "fp32_bytes": fp32_bytes, "size_ratio": fp32_bytes / size,
            "accuracy": 100 * (ours.argmax(1) == y).float().mean().item(), "fp32_accuracy": 100 * fp32_acc,
            "onnx_within_one_step": ((theirs - ours).abs() <= step * 1.001).float().mean().item(),
            "onnx_accuracy": 100 * (theirs.argmax(1) == y).float().mean().item(),
        })
        converted_by[label] = converted
    speed = {}
    ort_int8 = _ort_session(f"{tmp}/{name}-w8a8.onnx")
    ao = _torchao_int8(model)
    for batch in (1, 64):
        xb = x[:batch].contiguous()
        xn = xb.numpy()
        fns = {"fp32 eager": lambda xb=xb: model(xb),
               "onnxruntime int8 (W8A8)": lambda xn=xn: ort_int8.run(None, {"input": xn})}
        for label, converted in converted_by.items():
            fns[f"gradq {label}"] = lambda xb=xb, c=converted: c(xb)
        if ao is not None:
            fns["torchao int8 (Linear only)"] = lambda xb=xb: ao(xb)
        with torch.inference_mode():
            seconds = interleaved(fns, repeats if batch == 64 else 3 * repeats)
        speed[batch] = {k: {"ms": 1e3 * s, "speedup_vs_fp32": seconds["fp32 eager"] / s} for k, s in seconds.items()}
    return rows, speed


def print_tables(gemm: list[dict], rows: list[dict], speed: dict) -> None:
    print(f"\nGEMM, {GEMM_SIZE}x{GEMM_SIZE} weights, one thread, GOPS (medians; native ISA {native_isa()}):")
    kernels = list(dict.fromkeys(r["kernel"] for r in gemm))
    print(f"  {'kernel':24s} {'weight MB':>9s}" + "".join(f" {'M=' + str(m):>8s}" for m in GEMM_ROWS))
    for k in kernels:
        sel = {r["m"]: r for r in gemm if r["kernel"] == k}
        cells = "".join(f" {sel[m]['gops']:8.1f}" for m in GEMM_ROWS)
        print(f"  {k:24s} {sel[1]['weight_bytes'] / 2**20:9.1f}{cells}")
    print("\nInteger models (convert == eval() bit for bit; file against the fp32 state dict; onnxruntime):")
    print(f"  {'model':12s} {'config':6s} {'exact':>5s} {'file bytes':>11s} {'smaller':>8s} {'acc %':>6s} "
          f"{'fp32 %':>6s} {'ORT acc':>7s} {'ORT <=1 step':>12s}")
    for r in rows:
        print(f"  {r['model']:12s} {r['config']:6s} {'yes' if r['bit_exact'] else 'NO':>5s} {r['file_bytes']:11,d} "
              f"{r['size_ratio']:7.2f}x {r['accuracy']:6.2f} {r['fp32_accuracy']:6.2f} {r['onnx_accuracy']:7.2f} "
              f"{100 * r['onnx_within_one_step']:11.3f}%")
    print("\nSpeed, one thread, ms per batch (speed-up against fp32 eager):")
    for model, per_batch in speed.items():
        for batch, entries in per_batch.items():
            cells = "  ".join(f"{k} {v['ms']:.3f} ({v['speedup_vs_fp32']:.2f}x)" for k, v in entries.items())
            print(f"  {model:12s} batch {batch:2d}: {cells}")


def targets(gemm: list[dict], rows: list[dict], speed: dict) -> list[tuple[str, bool, str]]:
    out = []
    exact = all(r["bit_exact"] for r in rows)
    out.append(("converted == eval() bit for bit, every model and config", exact,
                ", ".join(f"{r['model']} {r['config']}" for r in rows if not r["bit_exact"]) or "all"))
    worst = min(rows, key=lambda r: r["onnx_within_one_step"])
    out.append(("onnxruntime within one step on >= 99.9% of values", worst["onnx_within_one_step"] >= 0.999,
                f"lowest {100 * worst['onnx_within_one_step']:.3f}% ({worst['model']} {worst['config']})"))
    gap = max(rows, key=lambda r: abs(r["onnx_accuracy"] - r["accuracy"]))
    out.append(("onnxruntime accuracy within 0.1 point of gradq's", abs(gap["onnx_accuracy"] - gap["accuracy"]) <= 0.1,
                f"largest gap {gap['onnx_accuracy'] - gap['accuracy']:+.2f} ({gap['model']} {gap['config']})"))
    for model, per_batch in speed.items():
        b64 = per_batch[64]
        w8 = b64["gradq W8A8"]
        out.append((f"{model}: W8A8 >= 2x fp32 eager at batch 64", w8["speedup_vs_fp32"] >= 2,
                    f"{w8['speedup_vs_fp32']:.2f}x"))
        ort = b64["onnxruntime int8 (W8A8)"]["ms"] / w8["ms"]
        out.append((f"{model}: W8A8 at least as fast as onnxruntime int8 at batch 64", ort >= 1,
                    f"onnxruntime / gradq time {ort:.2f}"))
        b1 = per_batch[1]
        ort1 = b1["onnxruntime int8 (W8A8)"]["ms"] / b1["gradq W8A8"]["ms"]
        out.append((f"{model}: W8A8 at least as fast as onnxruntime int8 at batch 1", ort1 >= 1,
                    f"onnxruntime / gradq time {ort1:.2f}"))
        w4 = w8["ms"] / b64["gradq W4A8"]["ms"]
        out.append((f"{model}: W4A8 >= 0.8x the speed of W8A8 at batch 64", w4 >= 0.8, f"{w4:.2f}x"))
    at1 = {r["kernel"]: r["gops"] for r in gemm if r["m"] == 1}
    int8 = max(at1["torch._int_mm (int8)"], at1["gradq W8"])
    out.append(("packed 4-bit GEMM >= the int8 GEMM at M = 1", at1["gradq W4"] >= int8,
                f"{at1['gradq W4']:.1f} vs {int8:.1f} GOPS (best of torch._int_mm and gradq W8)"))
    for r in rows:  # the residual CNN (7,000 parameters) is too small: safetensors' header alone is 2 KB
        if r["config"] in ("W4A8", "W2A8") and r["model"] != "ResidualNet":
            bound = 7 if r["config"] == "W4A8" else 12
            out.append((f"{r['model']} {r['config']} file <= 1/{bound} of the fp32 state dict",
                        r["size_ratio"] >= bound, f"{r['size_ratio']:.2f}x smaller"))
    return out


def plot(speed: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, batch in zip(axes, (1, 64), strict=True):
        models = list(speed)
        kinds = list(next(iter(speed.values()))[batch])
        width = 0.8 / len(kinds)
        for i, kind in enumerate(kinds):
            values = [speed[m][batch].get(kind, {}).get("speedup_vs_fp32", 0) for m in models]
            ax.bar([j + i * width for j in range(len(models))], values, width, label=kind)
        ax.axhline(1, color="black", lw=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(models))], models)
        ax.set_title(f"batch {batch}, one thread")
        ax.set_ylabel("speed-up against fp32 eager PyTorch")
        ax.grid(axis="y", alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", type=Path, default=Path("benchmarks/results/integer"))
    p.add_argument("--repeats", type=int, default=15, help="timed calls per function (batch 1: three times as many)")
    p.add_argument("--train", type=int, default=60000, help="Fashion-MNIST images to train the two CNNs on")
    p.add_argument("--train-epochs", type=int, default=1)
    args = p.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    if not os.access(args.output, os.W_OK):
        p.error(f"--output {args.output} is not writable")
    warnings.filterwarnings("ignore", module="torchao")
    torch.set_num_threads(1)
    start = time.perf_counter()
    _log("Part 1: GEMM kernels")
    gemm = gemm_table(args.repeats)
    _log("Part 2: integer models")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    fashion = _fashion_models(args.train, args.train_epochs)
    torch.set_num_threads(1)
    mx, my = load_mnist5k()
    cal, ev = mnist5k_split(my)
    fx, fy = load_fashion_mnist(train=False)
    fx, fy = fx[:4500], fy[:4500]
    tx, _ = load_fashion_mnist(train=True)
    fashion_calib = [tx[-500:][i:i + 100] for i in range(0, 500, 100)]
    mnist_calib = [mx[cal][i:i + 100] for i in range(0, len(cal), 100)]
    cases = [("LeNet-5", load_lenet5().eval(), mnist_calib, mx[ev], my[ev]),
             ("FashionCNN", fashion["FashionCNN"], fashion_calib, fx, fy),
             ("ResidualNet", fashion["ResidualNet"], fashion_calib, fx, fy)]
    rows, speed = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, model, calib, x, y in tqdm(cases, desc="models", leave=False):
            model_rows_, speed[name] = model_rows(name, model, calib, x, y, args.repeats, tmp)
            rows += model_rows_
    print_tables(gemm, rows, speed)
    checks = targets(gemm, rows, speed)
    print("\nTargets:")
    for name, ok, detail in checks:
        print(f"  {'PASS' if ok else 'FAIL'}  {name}: {detail}")
    elapsed = time.perf_counter() - start
    print(f"\n{elapsed / 60:.1f} min; JSON and plot in {args.output}/")
    result = {"gemm": gemm, "models": rows, "speed": speed,
              "targets": [{"name": n, "pass": ok, "detail": d} for n, ok, d in checks],
              "settings": vars(args) | {"output": str(args.output)}, "seconds": elapsed, "isa": native_isa(),
              "versions": {"torch": torch.__version__, "python": platform.python_version(), "gradq": gradq.__version__},
              "command": " ".join(sys.argv)}
    (args.output / "integer.json").write_text(json.dumps(result, indent=1, default=str))
    plot(speed, args.output / "integer.png")


if __name__ == "__main__":
    main()
