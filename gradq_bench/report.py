"""gradq-bench's derived figures, the table it prints and the plots it writes."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from gradq_bench.methods import FLOOR

MB = 1e6


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarize(runs: list[dict]) -> list[dict]:
    """Per method, the figures relative to fp32 allreduce and to the floor (None where a baseline is missing).

    ``speedup_vs_fp32`` = fp32's median step time / this one's; ``x_floor`` = this / the floor's;
    ``compression_ratio`` = fp32 bytes per step / this run's payload bytes per step (both per rank);
    ``wire_ratio`` = fp32's measured wire bytes / this run's; ``codec_share_of_floor`` = (de)compression
    seconds per step / the floor's step; ``accuracy_delta_vs_fp32`` in points; ``perplexity_vs_fp32`` = this
    run's final test perplexity / fp32's.

    Runs of several seeds (their ``"seed"``) are compared with fp32 and the floor of the same seed, then
    combined per method (:func:`combine_seeds`).
    """
    seeds = sorted({r.get("seed", 0) for r in runs})
    per_seed = [_summarize_seed([r for r in runs if r.get("seed", 0) == seed]) for seed in seeds]
    if len(per_seed) == 1:
        return per_seed[0]
    return [combine_seeds([rows[i] for rows in per_seed], seeds) for i in range(len(per_seed[0]))]


MODEL_FIGURES = ("final_loss", "final_accuracy", "accuracy_delta_vs_fp32", "final_perplexity", "perplexity_vs_fp32")


def _mean(values: list) -> float | None:
    return None if any(v is None for v in values) else statistics.fmean(values)


def _median_reached(values: list) -> float | None:
    """Median time to target over seeds, a seed that never reached it counting as infinite (None if the median
    is)."""
    middle = statistics.median(math.inf if v is None else v for v in values)
    return None if math.isinf(middle) else middle


def _spread(values: list) -> float | None:
    """Sample standard deviation; None if a value is missing, inf if one is infinite (a diverged run)."""
    if any(v is None for v in values):
        return None
    if not all(math.isfinite(v) for v in values):
        return math.inf if not any(math.isnan(v) for v in values) else math.nan
    return statistics.stdev(values)


def combine_seeds(rows: list[dict], seeds: list[int]) -> dict:
    """One method's rows from several seeds as one: the model's figures (:data:`MODEL_FIGURES`) are the mean
    over seeds, each seed's kept in ``<figure>_per_seed`` and the sample standard deviation of the deltas in
    ``accuracy_delta_sd`` / ``perplexity_vs_fp32_sd``; times and byte counts are the median over seeds (time to
    target: a seed that never reached it counts as infinite)."""
    combined = dict(rows[0], seeds=seeds)
    for key, value in rows[0].items():
        values = [r[key] for r in rows]
        if key in MODEL_FIGURES:
            combined[key] = _mean(values)
            combined[f"{key}_per_seed"] = values
        elif key == "time_to_target_s":
            combined[key] = _median_reached(values)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            combined[key] = None if any(v is None for v in values) else statistics.median(values)
    for key, sd in (("accuracy_delta_vs_fp32", "accuracy_delta_sd"), ("perplexity_vs_fp32", "perplexity_vs_fp32_sd")):
        values = combined[f"{key}_per_seed"]
        combined[sd] = _spread(values)
    return combined


def _summarize_seed(runs: list[dict]) -> list[dict]:
    """:func:`summarize` of the runs of one seed."""
    by_method = {r["method"]: r for r in runs}
    fp32, floor = by_method.get("fp32"), by_method.get(FLOOR)
    rows = []
    for r in runs:
        delta = None
        if fp32 and r["final_accuracy"] is not None and fp32["final_accuracy"] is not None and r is not floor:
            delta = 100 * (r["final_accuracy"] - fp32["final_accuracy"])
        perplexity = r.get("final_perplexity") if r is not floor else None
        rows.append({
            "method": r["method"],
            "label": r["label"],
            "median_step_s": r["median_step_s"],
            "x_floor": _ratio(r["median_step_s"], floor and floor["median_step_s"]),
            "speedup_vs_fp32": _ratio(fp32 and fp32["median_step_s"], r["median_step_s"]),
            "payload_bytes_per_step": r["payload_bytes_per_step"],
            "wire_bytes_per_step": r["wire_bytes_per_step"],
            "compression_ratio": _ratio(r["fp32_bytes_per_step"], r["payload_bytes_per_step"]),
            "wire_ratio": _ratio(fp32 and fp32["wire_bytes_per_step"], r["wire_bytes_per_step"]),
            "codec_s_per_step": r["codec_s_per_step"],
            "codec_share_of_floor": _ratio(r["codec_s_per_step"], floor and floor["median_step_s"]),
            "final_loss": r["final_loss"] if r is not floor else None,
            "final_accuracy": r["final_accuracy"] if r is not floor else None,
            "accuracy_delta_vs_fp32": delta,
            "final_perplexity": perplexity,
            "perplexity_vs_fp32": _ratio(perplexity, fp32 and fp32.get("final_perplexity")),
            "time_to_target_s": r["time_to_target_s"] if r is not floor else None,
        })  # fmt: skip
    return rows


def _cell(value: float | None, fmt: str) -> str:
    if value is None:
        return "-"
    if fmt == "mb":  # 3 significant digits; under 500 bytes reads as 0
        return "0" if abs(value) < 5e-4 else format(value, ".3g")
    return format(value, fmt)


COLUMNS = (
    ("method", "method", 20, "s"),
    ("step s", "median_step_s", 9, ".4g"),
    ("x floor", "x_floor", 8, ".2f"),
    ("vs fp32", "speedup_vs_fp32", 8, ".2f"),
    ("MB/step", "payload_bytes_per_step", 9, "mb"),
    ("ratio", "compression_ratio", 7, ".1f"),
    ("wire MB", "wire_bytes_per_step", 9, "mb"),
    ("codec s", "codec_s_per_step", 9, ".3g"),
    ("loss", "final_loss", 7, ".3f"),
    ("acc %", "final_accuracy", 7, ".1f"),
    ("ppl", "final_perplexity", 7, ".3f"),
    ("to target s", "time_to_target_s", 12, ".1f"),
)


def table(rows: list[dict], perplexity: bool = False) -> str:
    """The summary rows as an aligned text table; the perplexity column only with ``perplexity``."""
    scale = {"payload_bytes_per_step": 1 / MB, "wire_bytes_per_step": 1 / MB, "final_accuracy": 100}
    columns = [c for c in COLUMNS if perplexity or c[1] != "final_perplexity"]
    lines = ["".join(f"{title:<{w}}" if i == 0 else f"{title:>{w}}" for i, (title, _, w, _) in enumerate(columns))]
    lines.append("-" * len(lines[0]))
    for row in rows:
        cells = []
        for i, (_, key, width, fmt) in enumerate(columns):
            value = row[key]
            if isinstance(value, float | int) and key in scale:
                value = value * scale[key]
            text = value if fmt == "s" else _cell(value, fmt)
            cells.append(f"{text:<{width}}" if i == 0 else f"{text:>{width}}")
        lines.append("".join(cells))
    return "\n".join(lines)


def seed_table(rows: list[dict], perplexity: bool = False) -> str:
    """Each seed's final accuracy in % (perplexity) and its difference from fp32 of that seed in points (%),
    then their mean and the standard deviation of the differences: rows of :func:`combine_seeds`."""
    figure, delta = "final_accuracy", "accuracy_delta_vs_fp32"
    if perplexity:
        figure, delta = "final_perplexity", "perplexity_vs_fp32"

    def cell(value: float | None, diff: float | None) -> str:
        if value is None:
            return "-"
        if perplexity:
            return f"{value:.3f} ({100 * (diff - 1):+.1f}%)" if diff is not None else f"{value:.3f}"
        return f"{100 * value:.1f} ({diff:+.1f})" if diff is not None else f"{100 * value:.1f}"

    seeds = rows[0]["seeds"]
    sd_key = "perplexity_vs_fp32_sd" if perplexity else "accuracy_delta_sd"
    titles = ["method", *(f"seed {s}" for s in seeds), "mean", "sd"]
    widths = [max(20, *(len(r["method"]) + 2 for r in rows)), *([17] * (len(seeds) + 1)), 7]
    lines = [f"{titles[0]:<{widths[0]}}" + "".join(f"{t:>{w}}" for t, w in zip(titles[1:], widths[1:], strict=True))]
    lines.append("-" * len(lines[0]))
    for row in rows:
        if row[figure] is None:
            continue
        sd = row[sd_key]
        sd_text = "-" if sd is None else format(100 * sd if perplexity else sd, ".2f")
        cells = [cell(v, d) for v, d in zip(row[f"{figure}_per_seed"], row[f"{delta}_per_seed"], strict=True)]
        cells += [cell(row[figure], row[delta]), sd_text]
        cells = [f"{row['method']:<{widths[0]}}", *(f"{c:>{w}}" for c, w in zip(cells, widths[1:], strict=True))]
        lines.append("".join(cells))
    return "\n".join(lines)


LEGEND = """\
step s: median step time after warm-up (rank 0); x floor: / the no-communication step (noop hook);
vs fp32: speedup over fp32 allreduce; MB/step: payload bytes each rank sends per step (gradq: its hook
statistics; PyTorch's hooks: a ring allreduce of what they reduce); ratio: fp32 bytes / MB/step;
wire MB: bytes each rank's network interface sent per step (kernel counter; on loopback all ranks'
traffic / ranks, headers and other local traffic included); codec s: gradq's (de)compression wall time
per step (on the hook's thread, sharing the core with backward, unless the method ends in :sync);
loss, acc %, ppl: on the test set after the last step (acc: of every predicted position; ppl: perplexity,
exp of the loss); to target s: training time until the test accuracy (perplexity workloads: perplexity)
first reached the workload's target (checked every --eval-every steps)."""


def plot(runs: list[dict], output: Path, title: str) -> list[Path]:
    """curves.png (train loss vs step and vs bytes sent, test accuracy vs step) and step_time.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [r for r in runs if r["method"] != FLOOR]
    fig, (loss_ax, bytes_ax, acc_ax) = plt.subplots(1, 3, figsize=(16, 4.5))
    for r in trained:
        steps = range(1, len(r["train_loss"]) + 1)
        sent, total = [], 0
        for b in r["bytes_per_step"]:
            total += b
            sent.append(total / MB)
        loss_ax.plot(steps, r["train_loss"], label=r["label"], linewidth=1)
        bytes_ax.plot(sent, r["train_loss"], label=r["label"], linewidth=1)
        if r["evals"]:
            acc_ax.plot([e["step"] for e in r["evals"]], [100 * e["accuracy"] for e in r["evals"]], marker=".")
    loss_ax.set(xlabel="step", ylabel="train loss (mean over ranks)", title="loss vs step", yscale="log")
    bytes_ax.set(xlabel="MB sent per rank (cumulative)", ylabel="train loss", title="loss vs bytes sent",
                 xscale="log", yscale="log")  # fmt: skip
    acc_ax.set(xlabel="step", ylabel="test accuracy %", title="test accuracy (per position)")
    loss_ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    curves = output / "curves.png"
    fig.savefig(curves, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 0.5 * len(runs) + 1.5))
    labels = [r["label"] for r in runs]
    ax.barh(labels, [r["median_step_s"] for r in runs], color="tab:blue")
    floor = next((r for r in runs if r["method"] == FLOOR), None)
    if floor is not None:
        ax.axvline(floor["median_step_s"], color="black", linestyle="--", label="no-communication floor")
        ax.legend()
    ax.invert_yaxis()
    ax.set(xlabel="median step time (s)", title=title)
    fig.tight_layout()
    step_time = output / "step_time.png"
    fig.savefig(step_time, dpi=110)
    plt.close(fig)
    return [curves, step_time]
