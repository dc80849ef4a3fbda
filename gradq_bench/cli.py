"""``gradq-bench``: how much traffic and time each compressor saves on your links, and whether the model learns.

gradq-bench                                   # quick default: digits, 4 local ranks, every compressor
gradq-bench --workload mlp25m --steps 20      # the communication-bound 25.7M-parameter MLP
sudo gradq-bench --workload mlp25m --cluster 4 --link 1gbit   # 4 emulated hosts on 1 Gbit/s links
gradq-bench --launcher mpirun --ranks 4       # ranks started by Open MPI's mpirun
gradq-bench --model mypkg.models:workload     # your own model and data (a gradq_bench.Workload)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

import gradq
from gradq_bench.launch import LaunchError, Link, require_root_for_cluster, run_cluster, run_local, run_mpirun
from gradq_bench.methods import DEFAULT_METHODS, FLOOR, START_ITER, TORCH_METHODS, check_method
from gradq_bench.report import LEGEND, plot, seed_table, summarize, table
from gradq_bench.workloads import BUILTIN, Workload, load_workload

SCHEMA = "gradq-bench/1"
DEFAULT_STEPS = {"charlm": 600, "digits": 300, "fmnist": 400, "mlp25m": 30}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradq-bench", description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    what = parser.add_mutually_exclusive_group()
    what.add_argument(
        "--workload",
        choices=sorted(BUILTIN),
        help="digits: convergence on scikit-learn's digits; fmnist: convergence of a CNN on Fashion-MNIST at "
        "momentum 0.9; charlm: a character transformer on Shakespeare with AdamW (validation perplexity); "
        "mlp25m: communication-bound (default digits)",
    )
    what.add_argument("--model", metavar="MODULE:FUNCTION", help="a function returning a gradq_bench.Workload")
    parser.add_argument(
        "--compressors",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated methods (default {','.join(DEFAULT_METHODS)}); the floor always runs",
    )
    parser.add_argument("--ranks", type=int, help="data-parallel ranks (default 4; with --cluster: one per host)")
    defaults = ", ".join(f"{name} {steps}" for name, steps in DEFAULT_STEPS.items())
    parser.add_argument("--steps", type=int, help=f"training steps per method (default: {defaults})")
    parser.add_argument("--batch", type=int, help="samples per rank per step (default: the workload's)")
    parser.add_argument(
        "--warmup",
        type=int,
        default=START_ITER + 1,
        help="first steps left out of timings and wire counts (default %(default)s)",
    )
    parser.add_argument("--eval-every", type=int, help="test-set evaluation period in steps (default steps/10)")
    parser.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    parser.add_argument(
        "--seeds",
        type=int,
        default=1,
        metavar="N",
        help="train every method with N seeds (--seed, --seed + 1, ...); the model's figures and the targets "
        "are then the mean over seeds of each seed's difference from fp32, times the median (default 1)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    parser.add_argument(
        "--launcher",
        choices=("local", "mpirun"),
        default="local",
        help="local: spawned processes (default); mpirun: Open MPI's launcher on this machine",
    )
    parser.add_argument("--cluster", type=int, metavar="N", help="N emulated hosts (needs root; uses mpirun)")
    parser.add_argument("--link", metavar="RATE[,DELAY]", help="emulated link, e.g. 1gbit or 1gbit,1ms (default 1gbit)")
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("gradq-bench-results"),
        help="directory for results.json and the plots (default %(default)s)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser  # fmt: skip


OUTPUT_FILES = ("results.json", "table.txt", "curves.png", "step_time.png")


def _check_output(parser: argparse.ArgumentParser, output: Path) -> None:
    """Exit with a usage error unless ``output`` is (or can be made) a writable directory whose result files
    can be written: checked before any training, so a run never fails at its end."""
    if output.exists() and not output.is_dir():
        parser.error(f"--output {output} is a file; name a directory (it is created if missing)")
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        parser.error(f"--output {output}: cannot create it ({exc.strerror}: {exc.filename}); name a writable directory")
    if not os.access(output, os.W_OK | os.X_OK):
        parser.error(f"--output {output} is not writable; name a directory you can write to")
    for name in OUTPUT_FILES:
        if (output / name).is_dir():
            parser.error(f"--output {output}: {name} there is a directory; remove it or name another --output")


def _validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[list[str], Workload, Link | None]:
    """Check the flags; exits with a usage error naming the problem."""
    try:
        methods = [check_method(m.strip()) for m in args.compressors.split(",") if m.strip()]
    except ValueError as exc:
        parser.error(str(exc))
    if not methods:
        parser.error("--compressors is empty; name at least one, e.g. --compressors fp32,onebit")
    if len(set(methods)) != len(methods):
        parser.error(f"--compressors names a method twice: {args.compressors}")
    if args.cluster is not None:
        if args.cluster < 2:
            parser.error(f"--cluster needs at least 2 hosts, got {args.cluster}")
        if args.ranks is not None and args.ranks != args.cluster:
            parser.error(f"--cluster {args.cluster} runs one rank per host; drop --ranks or make it {args.cluster}")
        if args.launcher != "local":
            parser.error("--cluster always launches with mpirun across the hosts; drop --launcher")
        args.ranks = args.cluster
    elif args.link is not None:
        parser.error("--link shapes the emulated cluster's links; it needs --cluster N")
    args.ranks = 4 if args.ranks is None else args.ranks
    if args.ranks < 2:
        parser.error(f"--ranks must be >= 2 (data parallelism needs two ranks), got {args.ranks}")
    if args.batch is not None and args.batch < 1:
        parser.error(f"--batch must be >= 1, got {args.batch}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if not 0 <= args.seed < 2**63:
        parser.error(f"--seed must be in [0, 2**63), got {args.seed}")
    if not 1 <= args.seeds <= 2**63 - args.seed:
        parser.error(f"--seeds must be >= 1 and keep --seed + N - 1 below 2**63, got {args.seeds}")
    if args.warmup < START_ITER + 1:
        parser.error(f"--warmup must be >= {START_ITER + 1}: compression starts at step {START_ITER}")
    if args.model is None and args.workload is None:
        args.workload = "digits"
    if args.steps is None:
        args.steps = DEFAULT_STEPS.get(args.workload, 100)
    if args.steps <= args.warmup:
        parser.error(f"--steps must exceed --warmup ({args.warmup}), got {args.steps}")
    if args.eval_every is None:
        args.eval_every = max(1, args.steps // 10)
    if args.eval_every < 1:
        parser.error(f"--eval-every must be >= 1, got {args.eval_every}")
    link = None
    if args.cluster is not None:
        try:
            link = Link.parse(args.link or "1gbit")
        except ValueError as exc:
            parser.error(str(exc))
    try:
        workload = load_workload(args.model or args.workload)
    except ValueError as exc:
        parser.error(str(exc))
    if args.batch is not None:
        workload = dataclasses.replace(workload, batch_size=args.batch)
    shard = len(workload.train_x) // args.ranks
    if workload.batch_size > shard:
        parser.error(
            f"--batch {workload.batch_size} exceeds the {shard} training samples each of {args.ranks} ranks holds; "
            "use a smaller --batch or fewer --ranks"
        )
    _check_output(parser, args.output)  # last: it creates the directory
    return [FLOOR, *methods], workload, link


def _machine() -> dict[str, object]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"hostname": platform.node(), "platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count()}


def _versions() -> dict[str, object]:
    return {"gradq": gradq.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "native_kernels": gradq.native_available()}  # fmt: skip


def check_targets(rows: list[dict], workload: str) -> dict[str, bool]:
    """The project's targets that these figures allow checking: convergence on digits (within 1 accuracy
    point of fp32 allreduce), on fmnist (within 0.5 point) and on charlm (validation perplexity within 2% of
    fp32's); traffic and step time on mlp25m (set for 4 hosts at 1 Gbit/s). PyTorch's hooks are shown, not
    judged."""
    by = {r["method"]: r for r in rows}
    checks: dict[str, bool] = {}
    judged = [r for r in rows if r["method"] not in TORCH_METHODS]
    if workload in ("digits", "fmnist"):
        points = 1.0 if workload == "digits" else 0.5
        for r in judged:
            if r["accuracy_delta_vs_fp32"] is not None:
                name = f"{r['method']} accuracy within {points:g} point of fp32"
                checks[name] = r["accuracy_delta_vs_fp32"] >= -points
        return checks
    if workload == "charlm":
        for r in judged:
            if r["perplexity_vs_fp32"] is not None:
                checks[f"{r['method']} perplexity within 2% of fp32"] = r["perplexity_vs_fp32"] <= 1.02
        return checks
    if workload != "mlp25m":
        return checks

    def at_most(name: str, value: float | None, limit: float) -> None:
        if value is not None:
            checks[name] = value <= limit

    onebit = by.get("onebit")
    if onebit:
        at_most("onebit payload <= 1/25 of fp32", 1 / onebit["compression_ratio"], 1 / 25)
        if onebit["wire_ratio"]:
            at_most("onebit wire bytes <= 1/25 of fp32", 1 / onebit["wire_ratio"], 1 / 25)
        # On onebit:sync when it ran: overlapped, the codec's wall time includes backward's share of the core.
        codec = by.get("onebit:sync", onebit)
        if codec["codec_share_of_floor"] is not None:
            checks[f"{codec['method']} codec < 15% of the floor step"] = codec["codec_share_of_floor"] < 0.15
        at_most("onebit step <= 1.3x floor", onebit["x_floor"], 1.3)
        if onebit["speedup_vs_fp32"] is not None:
            checks["onebit >= 3x faster than fp32"] = onebit["speedup_vs_fp32"] >= 3
        if "powersgd" in by:
            checks["onebit faster than PowerSGD"] = onebit["median_step_s"] < by["powersgd"]["median_step_s"]
    for name in ("terngrad", "qsgd"):
        if name in by:
            at_most(f"{name} payload <= 1/12 of fp32", 1 / by[name]["compression_ratio"], 1 / 12)
            if by[name]["wire_ratio"]:
                at_most(f"{name} wire bytes <= 1/12 of fp32", 1 / by[name]["wire_ratio"], 1 / 12)
            at_most(f"{name} step <= 1.5x floor", by[name]["x_floor"], 1.5)
    return checks


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0, or 1 when a rank failed)."""
    parser = _parser()
    args = parser.parse_args(argv)
    methods, workload, link = _validate(parser, args)
    launcher = "cluster" if args.cluster is not None else args.launcher
    try:
        if launcher == "cluster":
            require_root_for_cluster()
    except LaunchError as exc:
        print(f"gradq-bench: {exc}", file=sys.stderr)
        return 1
    args.output.mkdir(parents=True, exist_ok=True)
    where = f"{args.ranks} emulated hosts at {link.rate}" if link else f"{args.ranks} {launcher} ranks"
    title = f"{workload.name} on {where}"
    print(f"gradq-bench: {title}, {args.steps} steps per method, methods: {', '.join(methods)}", file=sys.stderr)
    spec = {
        "workload": args.model or args.workload, "methods": methods, "steps": args.steps, "warmup": args.warmup,
        "eval_every": args.eval_every, "seeds": list(range(args.seed, args.seed + args.seeds)), "batch": args.batch,
        "threads": args.threads, "progress": not args.quiet,
        "interface": "eth0" if launcher == "cluster" else "lo",
    }  # fmt: skip
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gradq-bench-") as tmp:
        os.chmod(tmp, 0o755)
        spec_path = Path(tmp) / "spec.json"
        spec["result_path"] = str(Path(tmp) / "result.json")
        spec_path.write_text(json.dumps(spec))
        try:
            if launcher == "local":
                run_local(spec_path, args.ranks)
            elif launcher == "mpirun":
                run_mpirun(spec_path, args.ranks)
            else:
                run_cluster(spec_path, args.ranks, link)
        except LaunchError as exc:
            print(f"gradq-bench: {exc}", file=sys.stderr)
            return 1
        runs = json.loads(Path(spec["result_path"]).read_text())["runs"]
    (args.output / "results.json").write_text(json.dumps({"schema": SCHEMA, "runs": runs}))  # kept if the report fails
    rows = summarize(runs)
    checks = check_targets(rows, workload.name)
    seeds = spec["seeds"]
    perplexity = workload.metric == "perplexity"
    heading = f"{title}: {runs[0]['params']:,} parameters, {args.steps} steps ({args.warmup} warm-up), seed {args.seed}"
    if len(seeds) > 1:
        heading += f" to {seeds[-1]} (model figures: mean over the {len(seeds)} seeds; times and bytes: median)"
    report = [heading, table(rows, perplexity=perplexity), "", LEGEND]
    if len(seeds) > 1:
        what = "validation perplexity (vs fp32 of the same seed)" if perplexity else "test accuracy % (points vs fp32)"
        report += ["", f"Per seed, {what}:", seed_table(rows, perplexity=perplexity)]
    if checks:
        scope = "step times set for 4 hosts at 1 Gbit/s" if workload.name == "mlp25m" else "convergence"
        if len(seeds) > 1 and workload.name != "mlp25m":
            scope += f", judged on the mean over {len(seeds)} seeds"
        report += ["", f"Targets for {workload.name} ({scope}):"]
        report += [f"  {'PASS' if ok else 'FAIL'}  {name}" for name, ok in checks.items()]
    print("\n" + "\n".join(report))
    (args.output / "table.txt").write_text("\n".join(report) + "\n")
    results = {
        "schema": SCHEMA,
        "command": shlex.join(["gradq-bench", *(sys.argv[1:] if argv is None else argv)]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "elapsed_s": time.perf_counter() - started,
        "machine": _machine(),
        "versions": _versions(),
        "settings": {
            "workload": workload.name, "model": args.model, "ranks": args.ranks, "steps": args.steps,
            "warmup": args.warmup, "eval_every": args.eval_every, "seed": args.seed, "seeds": seeds,
            "threads": args.threads, "launcher": launcher,
            "link": None if link is None else {"rate": link.rate, "delay": link.delay},
            "batch_per_rank": workload.batch_size, "optimizer": workload.optimizer, "lr": workload.lr,
            "momentum": workload.momentum, "weight_decay": workload.weight_decay, "metric": workload.metric,
            "target_accuracy": workload.target_accuracy, "target_perplexity": workload.target_perplexity,
            "methods": methods,
        },
        "runs": runs,
        "summary": rows,
        "checks": checks,
    }  # fmt: skip
    (args.output / "results.json").write_text(json.dumps(results, indent=1))
    plots = plot([r for r in runs if r["seed"] == seeds[0]], args.output, f"{title}, seed {seeds[0]}")
    print(f"\nwrote {args.output}/: results.json, table.txt, {', '.join(p.name for p in plots)}")
    return 0


def entry() -> None:
    """Console-script entry: ``gradq-bench``."""
    sys.exit(main())
