"""Throughput of every gradq kernel, pure-PyTorch reference and native, next to memory-copy bandwidth.

For each size the script first times ``y.copy_(x)`` on fp32 tensors (the copy bandwidth, read + write
counted), then every kernel on both paths: the median wall time of ``--repeats`` runs after one
warm-up. It reports throughput of fp32 input elements (numel * 4 / time), throughput of the kernel's
essential memory traffic ("moved" bytes / time), that traffic as a fraction of the copy bandwidth, and
the native speedup, then checks the two targets of the fused 1-bit error-feedback kernel (native
``sign_compress`` with a residual): moved bytes at >= 50% of copy bandwidth, and >= 10x the reference.

    .venv/bin/python benchmarks/kernels.py [--sizes 1M,16M,64M] [--repeats 5] [--threads 1]
                                           [--output benchmarks/out/kernels.json]

The reference path is slow, so above ``--reference-once-above`` elements it runs once, without a
warm-up (marked ``*`` in the table), and above ``--skip-reference-above`` not at all.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from types import ModuleType

import torch
from tqdm import tqdm

import gradq
from gradq import _C, _reference, packed_nbytes

PATHS: dict[str, ModuleType] = {"reference": _reference, "native": _C}
SIGN_BLOCK = 65536
SERVER_ROWS = 4  # codes the server steps average: one per rank of a 4-rank run
SEED, OFFSET = 1234, 5678
COPY_TARGET = 0.5  # native sign_compress with residual: moved bytes >= 50% of copy bandwidth
SPEEDUP_TARGET = 10.0  # ... and >= 10x faster than the reference
GB = 1e9
_SUFFIXES = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}

Runner = Callable[[], object]


@dataclass(frozen=True)
class Kernel:
    """One benchmarked kernel call: how to set it up for an input and how many bytes it must move."""

    name: str
    params: dict[str, object]
    moved: str  # the traffic counted, in words
    moved_bytes: Callable[[int], int]
    setup: Callable[[torch.Tensor], Callable[[ModuleType], Runner]]


@dataclass(frozen=True)
class Codec:
    """Parameters of a sign-magnitude code (``signmag_compress``)."""

    name: str
    levels: int
    block: int
    l2: bool
    clip: float
    escape: bool = False

    @property
    def bits(self) -> int:
        """Code width: bit_length(levels) + 1 sign bit."""
        return self.levels.bit_length() + 1

    @property
    def escapes(self) -> int:
        """Escape entries per block (0: the plain code)."""
        return gradq.signmag_escapes(self.levels, self.block) if self.escape else 0

    def packed_len(self, n: int) -> int:
        """Bytes of the packed codes of n values."""
        return gradq.signmag_packed_nbytes(n, self.levels, self.block, escape=self.escape)


CODECS = (
    Codec("terngrad", levels=1, block=SIGN_BLOCK, l2=False, clip=2.5),
    Codec("qsgd", levels=4, block=512, l2=True, clip=0.0, escape=True),
    Codec("qsgd-plain", levels=4, block=512, l2=True, clip=0.0),
)


@dataclass
class Result:
    """Timings of one kernel on one path at one size, and the figures derived from them."""

    kernel: str
    params: dict[str, object]
    path: str
    numel: int
    warmup: int
    times_s: list[float]
    moved: str
    moved_bytes: int
    copy_gbps: float
    median_s: float = field(init=False)
    input_gbps: float = field(init=False)
    moved_gbps: float = field(init=False)
    copy_fraction: float = field(init=False)

    def __post_init__(self) -> None:
        self.median_s = statistics.median(self.times_s)
        self.input_gbps = self.numel * 4 / self.median_s / GB
        self.moved_gbps = self.moved_bytes / self.median_s / GB
        self.copy_fraction = self.moved_gbps / self.copy_gbps


def random_codes(n: int, bits: int) -> torch.Tensor:
    """``n`` uniformly random uint8 codes below 2**bits."""
    return torch.randint(0, 1 << bits, (n,), dtype=torch.uint8)


def pack_kernel(bits: int) -> Kernel:
    """``pack_bits`` of random ``bits``-wide codes."""

    def setup(x: torch.Tensor) -> Callable[[ModuleType], Runner]:
        codes = random_codes(x.numel(), bits)
        return lambda mod: partial(mod.pack_bits, codes, bits)

    return Kernel("pack_bits", {"bits": bits}, "read n + write packed", lambda n: n + packed_nbytes(n, bits), setup)


def unpack_kernel(bits: int) -> Kernel:
    """``unpack_bits`` of random ``bits``-wide codes."""

    def setup(x: torch.Tensor) -> Callable[[ModuleType], Runner]:
        packed = _C.pack_bits(random_codes(x.numel(), bits), bits)
        return lambda mod: partial(mod.unpack_bits, packed, bits, x.numel())

    return Kernel("unpack_bits", {"bits": bits}, "read packed + write n", lambda n: packed_nbytes(n, bits) + n, setup)


def philox_kernel() -> Kernel:
    """``philox_uniform`` of as many fp32 uniforms as the input has elements."""

    def setup(x: torch.Tensor) -> Callable[[ModuleType], Runner]:
        return lambda mod: partial(mod.philox_uniform, x.numel(), SEED, OFFSET)

    return Kernel("philox_uniform", {}, "write n*4", lambda n: n * 4, setup)


def sign_compress_kernel(residual: bool, rms: bool = True) -> Kernel:
    """``sign_compress``, with error feedback (a fresh residual per path) or without; the scale rms (capped,
    onebit's default) or mean |x|."""

    def setup(x: torch.Tensor) -> Callable[[ModuleType], Runner]:
        return lambda mod: partial(mod.sign_compress, x, torch.zeros_like(x) if residual else None, SIGN_BLOCK, rms)

    params = {"block": SIGN_BLOCK, "residual": residual, "rms": rms}
    if residual:
        moved = "read x + read/write residual + write packed"
        return Kernel("sign_compress", params, moved, lambda n: n * 12 + packed_nbytes(n, 1), setup)
    return Kernel("sign_compress", params, "read x + write packed", lambda n: n * 4 + packed_nbytes(n, 1), setup)


def sign_decompress_kernel() -> Kernel:
    """``sign_decompress`` of the sign code of the input."""

    def setup(x: torch.Tensor) -> Callable[[ModuleType], Runner]:
        packed, scales = _C.sign_compress(x, None, SIGN_BLOCK, False)
        return lambda mod: partial(mod.sign_decompress, packed, scales, SIGN_BLOCK, x.numel(), None, False)

    return Kernel(
        "sign_decompress",
        {"block": SIGN_BLOCK},
        "read packed + write n*4",
        lambda n: packed_nbytes(n, 1) + n * 4,
        setup,
    )


def signmag_args(codec: Codec) -> tuple[int, int, bool, float, int, int, int]:
    """Positional arguments of ``signmag_compress`` after the input, for ``codec``."""
    return codec.levels, codec.block, codec.l2, codec.clip, SEED, OFFSET, codec.escapes


def signmag_compress_kernel(codec: Codec) -> Kernel:
    """``signmag_compress`` with the parameters of ``codec``."""

    def setup(x: torch.Tensor) -> Callable[[ModuleType], Runner]:
        return lambda mod: partial(mod.signmag_compress, x, *signmag_args(codec))

    return Kernel(
        f"signmag_compress:{codec.name}",
        asdict(codec) | {"bits": codec.bits},
        "read x + write packed",
        lambda n: n * 4 + codec.packed_len(n),
        setup,
    )


def signmag_decompress_kernel(codec: Codec) -> Kernel:
    """``signmag_decompress`` of the ``codec`` code of the input."""

    def setup(x: torch.Tensor) -> Callable[[ModuleType], Runner]:
        packed, scales = _C.signmag_compress(x, *signmag_args(codec))
        args = packed, scales, codec.levels, codec.block, x.numel(), None, False, codec.escapes
        return lambda mod: partial(mod.signmag_decompress, *args)

    return Kernel(
        f"signmag_decompress:{codec.name}",
        asdict(codec) | {"bits": codec.bits},
        "read packed + write n*4",
        lambda n: codec.packed_len(n) + n * 4,
        setup,
    )


def server_rows(x: torch.Tensor, compress: Callable[[torch.Tensor], list[torch.Tensor]]) -> list[torch.Tensor]:
    """The codes of SERVER_ROWS different inputs derived from ``x``, stacked: (packed rows, scale rows)."""
    inputs = (x, -x, x.flip(0), x.roll(1))[:SERVER_ROWS]
    codes = [compress(v) for v in inputs]
    return [torch.stack([c[0] for c in codes]), torch.stack([c[1] for c in codes])]


def sign_mean_compress_kernel() -> Kernel:
    """The onebit server step ``sign_mean_compress``: SERVER_ROWS sign codes of n values, with a residual."""

    def setup(x: torch.Tensor) -> Callable[[ModuleType], Runner]:
        rows = server_rows(x, lambda v: _C.sign_compress(v, None, SIGN_BLOCK, False))
        return lambda mod: partial(mod.sign_mean_compress, *rows, torch.zeros_like(x), SIGN_BLOCK, x.numel(), False)

    return Kernel(
        "sign_mean_compress",
        {"block": SIGN_BLOCK, "rows": SERVER_ROWS},
        "read rows + read/write residual + write packed",
        lambda n: (SERVER_ROWS + 1) * packed_nbytes(n, 1) + n * 8,
        setup,
    )


def signmag_mean_compress_kernel(codec: Codec) -> Kernel:
    """The server step ``signmag_mean_compress`` of ``codec``: SERVER_ROWS codes of n values."""

    def setup(x: torch.Tensor) -> Callable[[ModuleType], Runner]:
        rows = server_rows(x, lambda v: _C.signmag_compress(v, *signmag_args(codec)))
        levels, block, l2, clip, seed, offset, escapes = signmag_args(codec)
        args = *rows, levels, block, x.numel(), l2, clip, seed, offset, escapes
        return lambda mod: partial(mod.signmag_mean_compress, *args)

    return Kernel(
        f"signmag_mean_compress:{codec.name}",
        asdict(codec) | {"bits": codec.bits, "rows": SERVER_ROWS},
        "read rows + write packed",
        lambda n: (SERVER_ROWS + 1) * codec.packed_len(n),
        setup,
    )


def all_kernels(bits: list[int]) -> list[Kernel]:
    """Every kernel to benchmark; pack/unpack at each width in ``bits``."""
    return [
        *(pack_kernel(b) for b in bits),
        *(unpack_kernel(b) for b in bits),
        philox_kernel(),
        sign_compress_kernel(residual=True),
        sign_compress_kernel(residual=True, rms=False),
        sign_compress_kernel(residual=False),
        sign_decompress_kernel(),
        sign_mean_compress_kernel(),
        *(signmag_compress_kernel(c) for c in CODECS),
        *(signmag_decompress_kernel(c) for c in CODECS),
        *(signmag_mean_compress_kernel(c) for c in CODECS),
    ]


def label(kernel: Kernel) -> str:
    """Short row label of a kernel for the table."""
    if "residual" in kernel.params:
        scale = "" if kernel.params["rms"] else " mean"
        return f"sign_compress {'+residual' if kernel.params['residual'] else 'no residual'}{scale}"
    if kernel.name in ("pack_bits", "unpack_bits"):
        return f"{kernel.name} bits={kernel.params['bits']}"
    return kernel.name


def time_runs(fn: Runner, repeats: int, warmup: int) -> list[float]:
    """Wall times (s) of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def copy_bandwidth(n: int, repeats: int) -> dict[str, object]:
    """Bandwidth (GB/s, read + write counted) of ``y.copy_(x)`` for ``n``-element fp32 tensors."""
    x, y = torch.randn(n), torch.empty(n)
    times = time_runs(partial(y.copy_, x), repeats, warmup=1)
    median = statistics.median(times)
    return {"times_s": times, "median_s": median, "gbps": 2 * 4 * n / median / GB}


def parse_size(text: str) -> int:
    """Element count from ``text``: an integer with an optional K/M/G (binary) suffix, e.g. ``16M``."""
    text = text.strip().upper()
    scale = _SUFFIXES.get(text[-1:], 1)
    return int(text[:-1] if scale > 1 else text) * scale


def format_size(n: int) -> str:
    """Inverse of :func:`parse_size` where exact: 16777216 -> ``16M``."""
    for suffix, scale in reversed(_SUFFIXES.items()):
        if n % scale == 0:
            return f"{n // scale}{suffix}"
    return str(n)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--sizes",
        type=lambda s: [parse_size(t) for t in s.split(",")],
        default="1M,16M,64M",
        help="fp32 element counts, comma-separated (default 1M,16M,64M)",
    )
    p.add_argument("--repeats", type=int, default=5, help="timed runs after 1 warm-up (default 5)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument(
        "--bits",
        type=lambda s: [int(t) for t in s.split(",")],
        default="1,2,3,4,5,6,7,8",
        help="pack/unpack widths (default 1..8)",
    )
    p.add_argument(
        "--reference-once-above",
        type=parse_size,
        default="16M",
        help="above this many elements run the reference once, no warm-up (default 16M)",
    )
    p.add_argument(
        "--skip-reference-above",
        type=parse_size,
        default=None,
        help="above this many elements do not run the reference (default: always run it)",
    )
    p.add_argument("--output", type=Path, default=Path("benchmarks/out/kernels.json"), help="JSON file")
    return p.parse_args(argv)


def reference_plan(n: int, args: argparse.Namespace) -> tuple[int, int] | None:
    """(repeats, warm-ups) of the reference path at ``n`` elements, or None to skip it."""
    if args.skip_reference_above is not None and n > args.skip_reference_above:
        return None
    if n > args.reference_once_above:
        return 1, 0
    return args.repeats, 1


def measure(kernel: Kernel, path: str, fn: Runner, n: int, plan: tuple[int, int], copy_gbps: float) -> Result:
    """Time ``fn`` (``kernel`` on ``path`` at ``n`` elements) with ``plan`` = (repeats, warm-ups)."""
    repeats, warmup = plan
    times = time_runs(fn, repeats, warmup)
    return Result(kernel.name, kernel.params, path, n, warmup, times, kernel.moved, kernel.moved_bytes(n), copy_gbps)


def bench_size(n: int, kernels: list[Kernel], args: argparse.Namespace, bar: tqdm) -> dict[str, object]:
    """Copy bandwidth, then every kernel on both paths, at ``n`` elements."""
    bar.set_description(f"{format_size(n)} copy")
    copy = copy_bandwidth(n, args.repeats)
    bar.update()
    plans = {"reference": reference_plan(n, args), "native": (args.repeats, 1)}
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    results = []
    for kernel in kernels:
        make = kernel.setup(x)
        for path, plan in plans.items():
            bar.set_description(f"{format_size(n)} {label(kernel)} [{path}]")
            if plan is not None:
                results.append(measure(kernel, path, make(PATHS[path]), n, plan, copy["gbps"]))
            bar.update()
    return {"numel": n, "copy": copy, "results": [asdict(r) for r in results]}


def find(results: list[dict], name: str, params: dict[str, object], path: str) -> dict | None:
    """The result of kernel ``name`` with ``params`` on ``path``, if it ran."""
    for r in results:
        if r["kernel"] == name and r["params"] == params and r["path"] == path:
            return r
    return None


def add_speedups(size: dict[str, object]) -> None:
    """Store on each native result its speedup over the reference (None where that did not run)."""
    for r in size["results"]:
        if r["path"] == "native":
            ref = find(size["results"], r["kernel"], r["params"], "reference")
            r["speedup_vs_reference"] = ref["median_s"] / r["median_s"] if ref else None


def target_checks(size: dict[str, object]) -> dict[str, object]:
    """The two targets of native sign_compress with a residual at one size, with PASS/FAIL verdicts."""
    ef = sign_compress_kernel(residual=True)
    native = find(size["results"], ef.name, ef.params, "native")
    speedup = native["speedup_vs_reference"]
    return {
        "numel": size["numel"],
        "copy_fraction": native["copy_fraction"],
        "copy_fraction_target": COPY_TARGET,
        "copy_fraction_pass": native["copy_fraction"] >= COPY_TARGET,
        "speedup": speedup,
        "speedup_target": SPEEDUP_TARGET,
        "speedup_pass": None if speedup is None else speedup >= SPEEDUP_TARGET,
    }


def verdict(ok: bool | None) -> str:
    """PASS / FAIL / n/a."""
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (or the platform's processor string)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def metadata(args: argparse.Namespace) -> dict[str, object]:
    """Run conditions stored with the results."""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "warmup": 1,
        "reference_once_above": args.reference_once_above,
        "skip_reference_above": args.skip_reference_above,
        "gb": GB,
        "notes": {
            "input_gbps": "numel * 4 / median time: fp32-equivalent elements, also for pack/unpack/philox",
            "moved_gbps": "essential memory traffic / median time; per-block scales (< 1%) not counted",
            "copy_gbps": "2 * 4 * numel / median time of fp32 y.copy_(x), timed before the size's kernels",
            "copy_fraction": "moved_gbps / copy_gbps",
        },
    }


def _fmt(value: float | None, spec: str) -> str:
    """``value`` formatted with ``spec``, or a dash as wide when there is none."""
    return "-".rjust(len(format(0.0, spec))) if value is None else format(value, spec)


HEADER = (
    f"{'kernel':<30} {'ref ms':>10} {'nat ms':>9} {'ref GB/s':>9} {'nat GB/s':>9} "
    f"{'ref mvd':>8} {'nat mvd':>8} {'ref %cp':>8} {'nat %cp':>8} {'speedup':>8}"
)


def table_row(kernel: Kernel, results: list[dict]) -> str:
    """One table row: ``kernel`` on both paths (dashes where the reference did not run)."""
    ref = find(results, kernel.name, kernel.params, "reference")
    nat = find(results, kernel.name, kernel.params, "native")

    def cell(r: dict | None, key: str, spec: str, scale: float = 1.0) -> str:
        return _fmt(None if r is None else r[key] * scale, spec)

    once = "*" if ref and ref["warmup"] == 0 else " "
    return (
        f"{label(kernel):<30} {cell(ref, 'median_s', '9.2f', 1e3)}{once} {cell(nat, 'median_s', '9.3f', 1e3)} "
        f"{cell(ref, 'input_gbps', '9.3f')} {cell(nat, 'input_gbps', '9.2f')} "
        f"{cell(ref, 'moved_gbps', '8.3f')} {cell(nat, 'moved_gbps', '8.2f')} "
        f"{cell(ref, 'copy_fraction', '8.1%')} {cell(nat, 'copy_fraction', '8.1%')} "
        f"{_fmt(nat['speedup_vs_reference'], '7.1f')}x"
    )


def table(sizes: list[dict[str, object]], kernels: list[Kernel]) -> str:
    """Fixed-width table: per size, the copy bandwidth then one row per kernel."""
    lines = []
    for size in sizes:
        n, copy = size["numel"], size["copy"]
        lines += [
            "",
            f"n = {format_size(n)} ({n:,} fp32 elements); copy {copy['gbps']:.2f} GB/s "
            f"(read + write, median {copy['median_s'] * 1e3:.3f} ms)",
            HEADER,
            "-" * len(HEADER),
            *(table_row(k, size["results"]) for k in kernels),
        ]
    lines += [
        "",
        "GB/s: numel * 4 bytes / median time (fp32-equivalent elements, also for pack/unpack/philox).",
        "mvd: essential bytes moved / median time (GB/s); %cp: mvd as a percentage of copy bandwidth.",
        "speedup: reference time / native time.  * reference run once, without warm-up.",
    ]
    return "\n".join(lines)


def checks_report(checks: list[dict[str, object]]) -> str:
    """PASS/FAIL lines of the fused 1-bit error-feedback kernel's targets."""
    lines = ["", "Targets of native sign_compress with residual (fused 1-bit error feedback):"]
    for c in checks:
        lines.append(
            f"  n = {format_size(c['numel']):>4}: moved bytes at {c['copy_fraction']:6.1%} of copy bandwidth "
            f"(>= {COPY_TARGET:.0%}) {verdict(c['copy_fraction_pass'])};  "
            f"speedup {_fmt(c['speedup'], '.1f')}x (>= {SPEEDUP_TARGET:.0f}x) {verdict(c['speedup_pass'])}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark, print the table and the target checks, write the JSON file."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    kernels = all_kernels(args.bits)
    sizes = []
    with tqdm(total=len(args.sizes) * (1 + 2 * len(kernels)), file=sys.stderr, mininterval=1.0) as bar:
        for n in args.sizes:
            size = bench_size(n, kernels, args, bar)
            add_speedups(size)
            sizes.append(size)
    checks = [target_checks(s) for s in sizes]
    print(table(sizes, kernels))
    print(checks_report(checks))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    report = {"metadata": metadata(args), "sizes": sizes, "checks": checks}
    args.output.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
