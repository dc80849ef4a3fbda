"""The GPU device check in one command: correctness first, then throughput, written as JSON.

On a machine with an NVIDIA GPU, this repository and the machine's PyTorch + Triton (nothing else):

    python benchmarks/gpu.py [--output benchmarks/results/gpu.json] [--sizes 64M,256M] [--repeats 5]

1. ``tests/test_triton.py`` and ``tests/test_triton_integer.py`` on the GPU: every Triton kernel, compiled
   to CUDA, bit-exact against the CPU reference, converted models (LeNet-5 on MNIST digits) on CUDA equal
   to the native CPU kernels, and the weight-only Linear within its error bound (the same tests CI runs
   through Triton's interpreter).
2. The compressed allreduce on CUDA equals the one on the CPU bit for bit (onebit with error feedback,
   TernGrad, QSGD), at world size 1 over NCCL and with 2 ranks on the one GPU over Gloo (payloads staged
   through host memory); then 5 DDP steps of a small CUDA model with the gradq hook over NCCL.
3. Throughput, medians of ``--repeats`` timed with CUDA events after a warm-up: ``y.copy_(x)`` (read +
   write bytes), then each codec kernel's essential traffic as a fraction of it; the 1-bit compression
   time of a 1B-parameter gradient; the integer GEMMs (W8A8 at M = 4096 with the requantization epilogue,
   weight-only W4A16 and W4A8 at M = 1 and 16; K = N = 8192) against bf16 ``F.linear``.

Prints a table per part and exits non-zero when a correctness check fails. Targets (issue 16): codec
kernels >= 70% of copy bandwidth at 64M and 256M; 1B-parameter compression < 5 ms; W4A16 >= 2.5x bf16
at M = 1 and >= 2x at M = 16; W8A8 with the epilogue >= 1.5x bf16 at M = 4096.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from comm_hooks.ddp import TorchTransport  # noqa: E402
from gradq import kernels  # noqa: E402
from gradq.allreduce import CompressedAllreduce  # noqa: E402
from gradq.fixedpoint import quantize_multiplier  # noqa: E402
from gradq.integer_kernels import integer_linear, plan_integer_gemm, plan_weight_only, weight_only_linear  # noqa: E402

CODECS = ("onebit", "terngrad", "qsgd")


def parse_size(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def run_kernel_tests() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    tests = ["tests/test_triton.py", "tests/test_triton_integer.py"]
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    tail = done.stdout.strip().splitlines()[-1:] or [done.stderr[-300:]]
    print(f"[1/3] Triton kernels on {torch.cuda.get_device_name()}: {tail[0]}", flush=True)
    return {"passed": done.returncode == 0, "summary": tail[0], "output_tail": done.stdout[-4000:]}


def reduce_on(device: str, rank: int, world: int, name: str, seed: int) -> list[torch.Tensor]:
    """Three steps of the compressed allreduce of seeded per-rank gradients on ``device``."""
    reducer = CompressedAllreduce(name, seed=seed)
    transport = TorchTransport(None)
    means = []
    for step in range(3):
        g = torch.Generator().manual_seed(1000 * step + rank)
        x = (torch.randn(100_003, generator=g) * torch.rand(100_003, generator=g).pow(3)).to(device)
        means.append(reducer(x, transport, key="bucket", step=step).mean.cpu())
    return means


def _ranks(rank: int, world: int, backend: str, device: str, store: str, out: str) -> None:
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world)
    if device == "cuda":
        torch.cuda.set_device(0)
    torch.save({name: reduce_on(device, rank, world, name, seed=7) for name in CODECS}, f"{out}.{rank}")
    dist.destroy_process_group()


def check_allreduce() -> dict:
    """CUDA means == CPU means, bit for bit, for each codec; NCCL at world 1 and Gloo with 2 ranks."""
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, world, backend in [("nccl, 1 rank", 1, "nccl"), ("gloo, 2 ranks on one GPU", 2, "gloo")]:
            for device, engine in (("cuda", backend), ("cpu", "gloo")):
                files = f"{tmp}/{backend}.{device}"
                mp.spawn(_ranks, args=(world, engine, device, f"{files}.store", files), nprocs=world)
            gpu = torch.load(f"{tmp}/{backend}.cuda.0")
            cpu = torch.load(f"{tmp}/{backend}.cpu.0")
            for name in CODECS:
                pairs = zip(gpu[name], cpu[name], strict=True)
                same = all(torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in pairs)
                report[f"{name} ({label})"] = same
                print(f"[2/3] compressed allreduce {name:8s} {label:26s} CUDA == CPU: {same}", flush=True)
    return report


def _ddp_rank(rank: int, store: str, out: str) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    import comm_hooks

    dist.init_process_group("nccl", init_method=f"file://{store}", rank=0, world_size=1)
    torch.cuda.set_device(0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10)).cuda()
    ddp = DDP(model, device_ids=[0])
    state = comm_hooks.register(ddp, "onebit", start_iter=1)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    x, y = torch.randn(64, 256, device="cuda"), torch.randint(0, 10, (64,), device="cuda")
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(ddp(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    Path(out).write_text(json.dumps({"losses": losses, "ratio": state.stats.compression_ratio}))
    state.close()
    dist.destroy_process_group()


def check_ddp_hook() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_ddp_rank, args=(f"{tmp}/store", f"{tmp}/out.json"), nprocs=1)
        result = json.loads(Path(f"{tmp}/out.json").read_text())
    ok = all(map(math.isfinite, result["losses"])) and result["losses"][-1] < result["losses"][0]
    print(f"[2/3] DDP hook on CUDA over NCCL: losses {[round(v, 4) for v in result['losses']]}, "
          f"compression {result['ratio']:.1f}x: {'ok' if ok else 'FAILED'}", flush=True)
    return {**result, "passed": ok}


def median_ms(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def throughput_at(n: int, repeats: int) -> list[dict]:
    """Each codec kernel at ``n`` elements against ``y.copy_(x)`` in the same run."""
    x = torch.randn(n, device="cuda")
    y = torch.empty_like(x)
    copy_ms = median_ms(lambda: y.copy_(x), repeats)
    copy_gbs = 8 * n / copy_ms / 1e6
    residual = torch.zeros_like(x)
    codes = torch.randint(0, 2, (n,), dtype=torch.uint8, device="cuda")
    packed, scales = kernels.sign_compress(x, None, block=512)
    tern = dict(levels=1, block=512, rule="absmax", seed=0, clip=2.5)
    tpacked, tscales = kernels.signmag_compress(x, **tern)
    cases = {  # name: (call, essential bytes moved)
        "sign_compress + error feedback": (lambda: kernels.sign_compress(x, residual, block=512), 12 * n + n / 8),
        "pack_bits (1 bit)": (lambda: kernels.pack_bits(codes, 1), n + n / 8),
        "unpack_bits (1 bit)": (lambda: kernels.unpack_bits(packed, 1, n), n / 8 + n),
        "sign_decompress": (lambda: kernels.sign_decompress(packed, scales, block=512, numel=n), n / 8 + 4 * n),
        "signmag_compress (TernGrad)": (lambda: kernels.signmag_compress(x, **tern), 4 * n + n / 4),
        "signmag_decompress (TernGrad)": (
            lambda: kernels.signmag_decompress(tpacked, tscales, levels=1, block=512, numel=n), n / 4 + 4 * n),
    }
    print(f"[3/3] {n / 2**20:.0f}M elements: copy {copy_gbs:.0f} GB/s", flush=True)
    rows = []
    for name, (call, moved) in cases.items():
        ms = median_ms(call, repeats)
        gbs = moved / ms / 1e6
        rows.append({"numel": n, "kernel": name, "ms": ms, "GB/s": gbs, "copy_GB/s": copy_gbs,
                     "of_copy": gbs / copy_gbs, "target_met": gbs / copy_gbs >= 0.7})
        print(f"      {name:32s} {ms:8.3f} ms {gbs:8.0f} GB/s {100 * gbs / copy_gbs:5.1f}% of copy", flush=True)
    return rows


def throughput(sizes: list[int], repeats: int) -> list[dict]:
    rows = []
    for n in sizes:
        rows += throughput_at(n, repeats)
        torch.cuda.empty_cache()
    return rows


def one_billion(repeats: int) -> dict:
    n = 10**9
    x = torch.randn(n, device="cuda")
    residual = torch.zeros_like(x)
    ms = median_ms(lambda: kernels.sign_compress(x, residual, block=512), repeats)
    print(f"[3/3] 1-bit compression of a 1B-parameter gradient (with error feedback): {ms:.2f} ms", flush=True)
    return {"ms": ms, "target_ms": 5.0, "target_met": ms < 5.0}


def _codes(shape: tuple[int, int], bits: int) -> torch.Tensor:
    half = 1 << (bits - 1)
    return torch.randint(-half, half, shape, device="cuda")


def integer_gemms(repeats: int) -> dict:
    """W8A8 at M = 4096, K = N = 8192 (codes in, codes out: torch._int_mm + gradq's Triton epilogue, and
    gradq's fused Triton GEMM) and the weight-only W4A16 GEMV/GEMM at M = 1, 16 (K = N = 8192), each against
    bf16 ``F.linear`` of the same shape."""
    k = n = 8192
    mult, shift = quantize_multiplier(torch.full((n,), 2e-6, dtype=torch.float64, device="cuda"))
    zero = torch.zeros(n, dtype=torch.bool, device="cuda")
    w8 = plan_integer_gemm(_codes((n, k), 8), None, zero, 8, False, 0, torch.zeros(n, device="cuda"), mult, shift,
                           128, 0, -128, 127, False, True)
    report, m = {}, 4096
    x = torch.randint(0, 256, (m, k), dtype=torch.uint8, device="cuda")
    xb, wb = torch.randn(m, k, device="cuda", dtype=torch.bfloat16), torch.randn(n, k, device="cuda",
                                                                                  dtype=torch.bfloat16)
    bf_ms = median_ms(lambda: torch.nn.functional.linear(xb, wb), repeats)
    for engine in ("int_mm", "gradq"):
        ms = median_ms(lambda e=engine: integer_linear(x, w8, engine=e), repeats)
        report[f"W8A8 M={m} ({engine})"] = {"ms": ms, "bf16_ms": bf_ms, "speedup": bf_ms / ms,
                                            "target": 1.5, "target_met": bf_ms / ms >= 1.5}
    w4 = plan_weight_only(_codes((n, k), 4), None, zero, 4, False, 0, torch.full((n,), 1e-3, device="cuda"), None)
    w4a8 = plan_integer_gemm(_codes((n, k), 4), None, zero, 4, False, 0, torch.zeros(n, device="cuda"), mult, shift,
                             128, 0, -128, 127, False, True)
    for m, target in ((1, 2.5), (16, 2.0)):
        xb = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        bf_ms = median_ms(lambda xb=xb: torch.nn.functional.linear(xb, wb), repeats)
        ms = median_ms(lambda xb=xb: weight_only_linear(xb, w4), repeats)
        report[f"W4A16 M={m}"] = {"ms": ms, "bf16_ms": bf_ms, "speedup": bf_ms / ms, "target": target,
                                  "target_met": bf_ms / ms >= target}
        x = torch.randint(0, 256, (m, k), dtype=torch.uint8, device="cuda")
        ms = median_ms(lambda x=x: integer_linear(x, w4a8), repeats)
        report[f"W4A8 M={m}"] = {"ms": ms, "bf16_ms": bf_ms, "speedup": bf_ms / ms}
    for name, row in report.items():
        met = "met" if row.get("target_met") else "MISSED"
        verdict = f" (target {row['target']}x: {met})" if "target" in row else ""
        print(f"[3/3] {name:24s} {row['ms']:8.3f} ms vs bf16 F.linear {row['bf16_ms']:8.3f} ms: "
              f"{row['speedup']:.2f}x{verdict}", flush=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "gpu.json")
    parser.add_argument("--sizes", default="64M,256M")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs an NVIDIA GPU (torch.cuda.is_available() is False): nothing to check")
    if os.environ.get("TRITON_INTERPRET"):
        raise SystemExit("unset TRITON_INTERPRET: it makes Triton interpret kernels on the CPU")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    result["kernel_tests"] = run_kernel_tests()
    result["allreduce_cuda_equals_cpu"] = check_allreduce()
    result["ddp_hook"] = check_ddp_hook()
    result["throughput"] = throughput([parse_size(s) for s in args.sizes.split(",")], args.repeats)
    result["one_billion_compress"] = one_billion(args.repeats)
    result["integer_gemms"] = integer_gemms(args.repeats)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.output}")
    passed = (result["kernel_tests"]["passed"] and all(result["allreduce_cuda_equals_cpu"].values())
              and result["ddp_hook"]["passed"])
    raise SystemExit(0 if passed else 1)


if __name__ == "__main__":
    main()
