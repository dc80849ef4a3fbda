"""Medians over repeated gradq-bench runs of the same command: one table from several results.json.

A shared machine's load changes during a run, and gradq-bench runs its methods one after another, so a
burst of load lands on one method of one run. Repeating the run and taking, per method, the median over
the runs of each figure (step time, its ratio to that run's floor, speedup over that run's fp32) damps it.

    .venv/bin/python benchmarks/combine_runs.py benchmarks/results/cluster benchmarks/results/cluster-repeat2 ...
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

FIGURES = (("median_step_s", "step s", ".3f"), ("x_floor", "x floor", ".2f"), ("speedup_vs_fp32", "vs fp32", ".2f"))


def combine(summaries: list[list[dict]]) -> list[dict]:
    """Per method (in the first run's order): every run's figures and their median."""
    rows = []
    for method in [row["method"] for row in summaries[0]]:
        runs = [next(row for row in summary if row["method"] == method) for summary in summaries]
        row = {"method": method}
        for key, _, _ in FIGURES:
            values = [run[key] for run in runs if run[key] is not None]
            row[key] = {"runs": values, "median": statistics.median(values) if values else None}
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="gradq-bench output directories (results.json)")
    args = parser.parse_args()
    summaries = [json.loads((run / "results.json").read_text())["summary"] for run in args.runs]
    rows = combine(summaries)
    print(f"medians over {len(summaries)} runs ({', '.join(str(r) for r in args.runs)})")
    print(f"{'method':<16}" + "".join(f"{title:>9}" for _, title, _ in FIGURES) + "   step s of each run")
    for row in rows:
        medians = [(row[key]["median"], fmt) for key, _, fmt in FIGURES]
        cells = "".join(f"{m:>9{fmt}}" if m is not None else f"{'-':>9}" for m, fmt in medians)
        each = " ".join(f"{v:.3f}" for v in row["median_step_s"]["runs"])
        print(f"{row['method']:<16}{cells}   {each}")


if __name__ == "__main__":
    main()
