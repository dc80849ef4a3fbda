"""The native kernels against those of an earlier git revision, timed interleaved in one process.

On a shared machine two separate benchmark runs can differ by 2x, so a kernel change is measured here
side by side: the native sources (``csrc/``) as they were at REV and as it is in the working tree are both
built the same way (setup.py's flags, into ``build/kernels-ab/``), and every selected kernel of
``benchmarks/kernels.py`` runs alternately on the two builds (the order flipped every repeat), on the
same input. Each pair of calls must give the same outputs bit for bit. Reported per kernel: the median
time of each side and the median of the per-pair ratios (revision / tree: > 1 means the working tree's
kernel is faster). Kernels that did not change come out near 1.0x, which shows the noise.

    .venv/bin/python benchmarks/kernels_ab.py REV [--sizes 1M,25M] [--repeats 15] [--kernels signmag]
                                                  [--output benchmarks/out/kernels_ab.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import torch
from kernels import Kernel, all_kernels, cpu_model, format_size, label, parse_size
from tqdm import tqdm

from gradq import _native_build

ROOT = Path(__file__).resolve().parents[1]


def build(files: dict[str, str], name: str) -> ModuleType:
    """The native sources ``files`` (path under csrc/ -> text) compiled as setup.py compiles them into
    build/kernels-ab/``name``/, imported."""
    directory = ROOT / "build" / "kernels-ab" / name
    for path, text in files.items():
        source = directory / "csrc" / path
        source.parent.mkdir(parents=True, exist_ok=True)
        if not source.exists() or source.read_text() != text:
            source.write_text(text)
    return _native_build.build(f"gradq_kernels_ab_{name}", directory, directory / "build")


def build_revision(rev: str) -> ModuleType:
    """The kernels of git revision ``rev`` (its csrc/ folder)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout

    commit = git("rev-parse", "--verify", f"{rev}^{{commit}}").strip()
    names = git("ls-tree", "--name-only", f"{commit}:csrc").split()
    return build({n: git("show", f"{commit}:csrc/{n}") for n in names}, commit[:12])


def build_tree() -> ModuleType:
    """The kernels of the working tree, built as build_revision builds a revision's."""
    return build({p.name: p.read_text() for p in (ROOT / "csrc").iterdir() if p.is_file()}, "tree")


def same_bits(a: object, b: object) -> bool:
    """Whether two kernel outputs (tensors, or tuples/lists of them) are equal bit for bit."""
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        )
    return len(a) == len(b) and all(same_bits(x, y) for x, y in zip(a, b, strict=True))


def compare(kernel: Kernel, x: torch.Tensor, old: ModuleType, new: ModuleType, repeats: int) -> dict[str, object]:
    """Interleaved timings of ``kernel`` on ``x``: build ``old`` (the revision) against ``new`` (the tree)."""
    make = kernel.setup(x)
    sides = {"revision": make(old), "tree": make(new)}
    if not same_bits(sides["revision"](), sides["tree"]()):  # also the warm-up
        raise SystemExit(f"{label(kernel)}: the revision's and the working tree's kernels give different outputs")
    times: dict[str, list[float]] = {"revision": [], "tree": []}
    for r in range(repeats):
        for side in ("revision", "tree") if r % 2 == 0 else ("tree", "revision"):
            start = time.perf_counter()
            sides[side]()
            times[side].append(time.perf_counter() - start)
    ratios = [a / b for a, b in zip(times["revision"], times["tree"], strict=True)]
    return {
        "kernel": label(kernel),
        "params": kernel.params,
        "numel": x.numel(),
        "times_s": times,
        "median_s": {side: statistics.median(t) for side, t in times.items()},
        "ratio": statistics.median(ratios),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("rev", help="git revision whose kernels to compare against, e.g. HEAD~1")
    p.add_argument("--sizes", type=lambda s: [parse_size(t) for t in s.split(",")], default="1M,25M",
                   help="fp32 element counts, comma-separated (default 1M,25M)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=15, help="timed calls per side (default 15)")
    p.add_argument("--kernels", default="", help="only kernels whose label contains this text")
    p.add_argument("--output", type=Path, default=Path("benchmarks/out/kernels_ab.json"), help="JSON file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Build the revision, compare, print the table and write the JSON."""
    args = parse_args(argv)
    torch.set_num_threads(1)
    old, new = build_revision(args.rev), build_tree()
    kernels = [k for k in all_kernels([1, 2, 4]) if args.kernels in label(k)]
    if not kernels:
        raise SystemExit(f"no kernel label contains {args.kernels!r}; see benchmarks/kernels.py")
    rows = []
    with tqdm(total=len(kernels) * len(args.sizes), unit="kernel") as bar:
        for n in args.sizes:
            x = torch.randn(n, generator=torch.Generator().manual_seed(n))
            for kernel in kernels:
                bar.set_description(f"{format_size(n)} {label(kernel)}")
                rows.append(compare(kernel, x, old, new, args.repeats))
                bar.update()
    print(f"\n{args.rev} against the working tree's kernels, one thread, median of {args.repeats} interleaved calls")
    print(f"{'size':>5} {'kernel':<34} {'rev ms':>9} {'tree ms':>9} {'rev / tree':>10}")
    for row in rows:
        med = row["median_s"]
        print(f"{format_size(row['numel']):>5} {row['kernel']:<34} {med['revision'] * 1e3:>9.3f} "
              f"{med['tree'] * 1e3:>9.3f} {row['ratio']:>9.2f}x")  # fmt: skip
    args.output.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "revision": args.rev,
        "torch": torch.__version__,
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
    }
    args.output.write_text(json.dumps({"metadata": meta, "results": rows}, indent=1))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
