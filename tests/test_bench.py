"""gradq-bench end to end (real processes, Gloo on loopback, real mpirun), its arithmetic and its usage errors."""

import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import gradq
from gradq_bench import cli, report
from gradq_bench.methods import describe
from gradq_bench.report import summarize
from gradq_bench.workloads import digits

ROOT = Path(__file__).resolve().parents[1]
METHODS = [
    "fp32",
    "torch-fp16",
    "powersgd",
    "onebit",
    "terngrad",
    "qsgd",
    "qsgd:levels=1",
    "onebit:allgather",
    "qsgd:sync",
]
STEPS, WARMUP, EVERY, RANKS = 8, 3, 4, 2


def run_bench(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run(
        [sys.executable, "-m", "gradq_bench", "--quiet", "--output", str(tmp_path), *flags],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def chunk_payload(name: str, numel: int, world: int) -> int:
    """Bytes one rank sends per step in two-phase mode: 2 (W-1) chunk payloads (chunks padded to 8 values)."""
    compressor = gradq.get_compressor(name)
    chunk = -(-numel // (world * 8)) * 8
    return 2 * (world - 1) * compressor.payload_nbytes(chunk)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    flags = [
        "--ranks",
        str(RANKS),
        "--steps",
        str(STEPS),
        "--eval-every",
        str(EVERY),
        "--compressors",
        ",".join(METHODS),
    ]
    completed = run_bench(out, *flags)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return out, completed, json.loads((out / "results.json").read_text())


def test_results_json_schema(local_run):
    _, _, results = local_run
    assert results["schema"] == "gradq-bench/1"
    assert results["command"].startswith("gradq-bench ") and "--compressors" in results["command"]
    assert {"cpu", "cores", "platform", "hostname"} <= results["machine"].keys()
    assert results["versions"]["gradq"] == gradq.__version__ and results["versions"]["torch"] == torch.__version__
    settings = results["settings"]
    assert (settings["ranks"], settings["steps"], settings["warmup"], settings["launcher"]) == (2, 8, 3, "local")
    assert settings["methods"] == ["noop", *METHODS]
    assert [r["method"] for r in results["runs"]] == ["noop", *METHODS]
    assert [r["method"] for r in results["summary"]] == ["noop", *METHODS]
    numel = 64 * 256 + 256 + 256 * 10 + 10
    for run in results["runs"]:
        assert run["label"] == describe(run["method"])
        assert run["params"] == numel
        for key in ("step_seconds", "train_loss", "bytes_per_step"):
            assert len(run[key]) == STEPS, key
        assert all(t > 0 for t in run["step_seconds"])
        assert run["median_step_s"] == sorted(run["step_seconds"][WARMUP:])[(STEPS - WARMUP) // 2]
        assert [e["step"] for e in run["evals"]] == [4, 8]
        assert all(0 <= e["accuracy"] <= 1 and e["loss"] > 0 for e in run["evals"])
        assert run["evals"][-1]["bytes_sent"] == sum(run["bytes_per_step"])
        assert run["final_accuracy"] == run["evals"][-1]["accuracy"]
        reached = [e for e in run["evals"] if e["accuracy"] >= digits().target_accuracy]
        assert run["time_to_target_s"] == (reached[0]["train_seconds"] if reached else None)


def test_bytes_match_the_compressors(local_run):
    """Payload bytes per rank and step are exactly what the compressors' sizes give; ratios follow."""
    _, _, results = local_run
    runs = {r["method"]: r for r in results["runs"]}
    summary = {r["method"]: r for r in results["summary"]}
    numel = runs["fp32"]["params"]
    fp32 = 2 * (RANKS - 1) * 4 * numel // RANKS
    assert runs["noop"]["bytes_per_step"] == [0] * STEPS
    assert runs["fp32"]["bytes_per_step"] == [fp32] * STEPS
    assert runs["torch-fp16"]["bytes_per_step"] == [fp32 // 2] * STEPS
    for name, option_free in (("onebit", "onebit"), ("terngrad", "terngrad"), ("qsgd", "qsgd")):
        expected = chunk_payload(option_free, numel, RANKS)
        # steps 0 and 1 are plain fp32 allreduce (start_iter = 2), then the compressed payloads
        assert runs[name]["bytes_per_step"] == [fp32, fp32] + [expected] * (STEPS - 2), name
        assert summary[name]["compression_ratio"] == pytest.approx(fp32 / expected)
    qsgd1 = gradq.QSGD(levels=1)
    chunk = -(-numel // (RANKS * 8)) * 8
    assert runs["qsgd:levels=1"]["payload_bytes_per_step"] == 2 * (RANKS - 1) * qsgd1.payload_nbytes(chunk)
    # allgather sends the whole payload to the W-1 others
    assert runs["onebit:allgather"]["payload_bytes_per_step"] == (RANKS - 1) * gradq.OneBit().payload_nbytes(numel)
    assert summary["onebit"]["compression_ratio"] > 25 and summary["terngrad"]["compression_ratio"] > 12
    assert summary["qsgd"]["compression_ratio"] > 12  # the escape code (1/7.9 with the plain 4-bit code)
    # the hook reducing inside its call instead of on its thread trains identically
    for key in ("bytes_per_step", "train_loss", "evals"):
        sync, overlapped = runs["qsgd:sync"][key], runs["qsgd"][key]
        if key == "evals":
            sync, overlapped = ([(e["loss"], e["accuracy"]) for e in x] for x in (sync, overlapped))
        assert sync == overlapped, key
    assert describe("qsgd:sync") == "gradq qsgd (two-phase, sync)"
    # PowerSGD rank 1 on one bucket: P and Q per matrix, the biases uncompressed
    powersgd = 64 + 256 + 256 + 10 + 256 + 10
    assert runs["powersgd"]["payload_bytes_per_step"] == 2 * (RANKS - 1) * 4 * powersgd // RANKS


def test_wire_counters_agree_with_payloads(local_run):
    """The loopback counter (all ranks' TCP bytes / W) sees the savings: headers and Gloo's small control
    messages add at most a few KB per step, so fp32 lands within 10% + 8 KB of its payload and onebit far below."""
    _, _, results = local_run
    runs = {r["method"]: r for r in results["runs"]}
    fp32 = runs["fp32"]
    assert fp32["payload_bytes_per_step"] <= fp32["wire_bytes_per_step"] <= 1.1 * fp32["payload_bytes_per_step"] + 8e3
    onebit = runs["onebit"]
    assert onebit["payload_bytes_per_step"] <= onebit["wire_bytes_per_step"] <= onebit["payload_bytes_per_step"] + 8e3
    assert onebit["wire_bytes_per_step"] < fp32["wire_bytes_per_step"] / 4


def test_table_and_plots(local_run):
    out, completed, results = local_run
    assert (out / "table.txt").read_text() in completed.stdout
    lines = completed.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("method"))
    rows = lines[header + 2 : header + 3 + len(METHODS)]
    assert [row.split()[0] for row in rows] == ["noop", *METHODS]
    fp32 = rows[1].split()
    assert float(fp32[1]) == pytest.approx(results["runs"][1]["median_step_s"], rel=1e-3) and fp32[3] == "1.00"
    assert "step s" in completed.stdout and "Targets" in completed.stdout
    import matplotlib.image

    for name in ("curves.png", "step_time.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        image = matplotlib.image.imread(out / name)
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400
        assert image[..., :3].std() > 0.05  # not a blank canvas


def test_summary_arithmetic():
    def run(method, step, payload, wire, acc, target_time=None):
        return {"method": method, "label": method, "median_step_s": step, "payload_bytes_per_step": payload,
                "fp32_bytes_per_step": 800, "wire_bytes_per_step": wire, "codec_s_per_step": None,
                "final_loss": 0.5, "final_accuracy": acc, "time_to_target_s": target_time}  # fmt: skip

    rows = summarize(
        [run("noop", 0.5, 0, 0, 0.1), run("fp32", 2.0, 800, 1000, 0.9, 3.0), run("onebit", 0.6, 25, 40, 0.895)]
    )
    noop, fp32, onebit = rows
    assert noop["x_floor"] == 1.0 and noop["final_accuracy"] is None and noop["compression_ratio"] is None
    assert fp32["speedup_vs_fp32"] == 1.0 and fp32["x_floor"] == 4.0 and fp32["compression_ratio"] == 1.0
    assert onebit["speedup_vs_fp32"] == pytest.approx(2.0 / 0.6) and onebit["x_floor"] == pytest.approx(1.2)
    assert onebit["compression_ratio"] == 32.0 and onebit["wire_ratio"] == 25.0
    assert onebit["accuracy_delta_vs_fp32"] == pytest.approx(-0.5)
    checks = cli.check_targets(rows, "mlp25m")
    assert checks["onebit payload <= 1/25 of fp32"] and checks["onebit wire bytes <= 1/25 of fp32"]
    assert checks["onebit step <= 1.3x floor"] and checks["onebit >= 3x faster than fp32"]
    assert cli.check_targets(rows, "digits") == {"onebit accuracy within 1 point of fp32": True}
    assert cli.check_targets(rows, "user-mlp") == {}
    slow = summarize(
        [run("noop", 0.5, 0, 0, 0.1), run("fp32", 1.0, 800, 1000, 0.9), run("terngrad", 0.8, 50, 60, 0.88)]
    )
    checks = cli.check_targets(slow, "mlp25m")
    assert not checks["terngrad step <= 1.5x floor"] and checks["terngrad payload <= 1/12 of fp32"]
    # the codec share is judged on onebit:sync when it ran (overlapped, its wall time includes backward's)
    overlapped, synchronous = run("onebit", 0.6, 25, 40, 0.9), run("onebit:sync", 0.62, 25, 40, 0.9)
    overlapped["codec_s_per_step"], synchronous["codec_s_per_step"] = 0.1, 0.07
    both = summarize([run("noop", 0.5, 0, 0, 0.1), overlapped, synchronous])
    assert both[2]["codec_share_of_floor"] == pytest.approx(0.14)
    checks = cli.check_targets(both, "mlp25m")
    assert checks["onebit:sync codec < 15% of the floor step"] and "onebit codec < 15% of the floor step" not in checks
    assert cli.check_targets(both[:2], "mlp25m")["onebit codec < 15% of the floor step"] is False
    assert cli.check_targets(slow, "digits") == {"terngrad accuracy within 1 point of fp32": False}


def test_seeds_are_compared_pairwise_then_averaged():
    def run(method, seed, step, acc, target_time=None):
        return {"method": method, "seed": seed, "label": method, "median_step_s": step, "payload_bytes_per_step": 10,
                "fp32_bytes_per_step": 800, "wire_bytes_per_step": 12, "codec_s_per_step": None,
                "final_loss": acc / 2, "final_accuracy": acc, "time_to_target_s": target_time}  # fmt: skip

    runs = []
    for seed, (fp32_acc, onebit_acc, reached) in enumerate([(0.90, 0.89, 4.0), (0.86, 0.87, None), (0.88, 0.85, 6.0)]):
        runs += [run("noop", seed, 0.1, 0.1), run("fp32", seed, 0.2 + seed, fp32_acc, 1.0),
                 run("onebit", seed, 0.3, onebit_acc, reached)]  # fmt: skip
    noop, fp32, onebit = summarize(runs)
    assert onebit["seeds"] == [0, 1, 2]
    # each seed against its own fp32: -1, +1, -3 points; their mean -1 and sample sd 2
    assert onebit["accuracy_delta_vs_fp32_per_seed"] == pytest.approx([-1.0, 1.0, -3.0])
    assert onebit["accuracy_delta_vs_fp32"] == pytest.approx(-1.0) and onebit["accuracy_delta_sd"] == pytest.approx(2.0)
    assert onebit["final_accuracy"] == pytest.approx(0.87) and onebit["final_loss"] == pytest.approx(0.435)
    # times are medians: fp32's step 0.2, 1.2, 2.2 -> 1.2, so onebit's speed-ups 0.2/0.3, 1.2/0.3, 2.2/0.3 -> 4
    assert fp32["median_step_s"] == pytest.approx(1.2) and onebit["speedup_vs_fp32"] == pytest.approx(4.0)
    assert onebit["time_to_target_s"] == 6.0  # median of 4, 6 and never (infinite)
    assert noop["final_accuracy"] is None and noop["accuracy_delta_sd"] is None
    assert cli.check_targets([noop, fp32, onebit], "fmnist") == {"onebit accuracy within 0.5 point of fp32": False}
    onebit_twice_late = [dict(r, time_to_target_s=None) if r["method"] == "onebit" and r["seed"] else r for r in runs]
    assert summarize(onebit_twice_late)[2]["time_to_target_s"] is None
    text = report.seed_table([noop, fp32, onebit])
    assert "89.0 (-1.0)" in text and "87.0 (+1.0)" in text and "85.0 (-3.0)" in text and "87.0 (-1.0)" in text
    assert text.splitlines()[-1].endswith("2.00") and "noop" not in text
    # a diverged seed (infinite perplexity) makes the mean and the spread infinite, not the report crash
    lm = [dict(r, final_perplexity=6.0 + r["seed"], final_accuracy=None) for r in runs if r["method"] != "noop"]
    lm[3]["final_perplexity"] = math.inf  # onebit, seed 1
    _, lm_onebit = summarize(lm)
    assert lm_onebit["perplexity_vs_fp32_per_seed"] == [1.0, math.inf, 1.0]
    assert lm_onebit["perplexity_vs_fp32"] == math.inf
    assert lm_onebit["perplexity_vs_fp32_sd"] == math.inf and lm_onebit["accuracy_delta_sd"] is None
    assert "inf" in report.seed_table([lm_onebit], perplexity=True)


def test_seeds_flag_trains_each_seed_as_its_own_run(tmp_path):
    flags = ["--ranks", "2", "--steps", "6", "--eval-every", "6", "--compressors", "fp32,qsgd"]
    both = run_bench(tmp_path / "both", *flags, "--seeds", "2", "--seed", "5")
    assert both.returncode == 0, both.stderr[-3000:]
    second = run_bench(tmp_path / "second", *flags, "--seed", "6")
    assert second.returncode == 0, second.stderr[-3000:]
    results = json.loads((tmp_path / "both" / "results.json").read_text())
    alone = json.loads((tmp_path / "second" / "results.json").read_text())
    assert results["settings"]["seeds"] == [5, 6] and alone["settings"]["seeds"] == [6]
    assert [(r["seed"], r["method"]) for r in results["runs"]] == [
        (s, m) for s in (5, 6) for m in ("noop", "fp32", "qsgd")
    ]
    # seed 6 inside the two-seed run is the same training as seed 6 alone (model, data order, QSGD's dither)
    for inside, single in zip(results["runs"][3:], alone["runs"], strict=True):
        assert inside["train_loss"] == single["train_loss"] and inside["final_accuracy"] == single["final_accuracy"]
    assert results["runs"][1]["train_loss"] != results["runs"][4]["train_loss"]  # and seed 5 is another
    qsgd = results["summary"][2]
    accuracies = [r["final_accuracy"] for r in results["runs"] if r["method"] == "qsgd"]
    assert qsgd["final_accuracy"] == pytest.approx(statistics.fmean(accuracies))
    assert "Per seed, test accuracy % (points vs fp32):" in both.stdout and "seed 5 to 6" in both.stdout


def test_user_model(tmp_path):
    completed = run_bench(tmp_path, "--model", "tests.bench_workload:workload", "--ranks", "2", "--steps", "6",
                          "--compressors", "fp32,onebit")  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert (
        results["settings"]["workload"] == "user-mlp"
        and results["settings"]["model"] == "tests.bench_workload:workload"
    )
    assert results["runs"][1]["params"] == 16 * 32 + 32 + 32 * 4 + 4
    assert results["settings"]["batch_per_rank"] == 16


def test_mpirun_launcher(tmp_path):
    completed = run_bench(tmp_path, "--launcher", "mpirun", "--ranks", "2", "--steps", "5", "--compressors", "onebit")
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["settings"]["launcher"] == "mpirun"
    onebit = results["runs"][1]
    numel = onebit["params"]
    assert onebit["bytes_per_step"][2:] == [chunk_payload("onebit", numel, 2)] * 3


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--compressors", "fp32,zip"], "unknown compressor 'zip'; choose from fp32, torch-fp16, powersgd"),
        (["--compressors", "qsgd:levels=500"], "levels must be"),
        (["--compressors", "onebit:fast"], "'fast' is neither a mode (two_phase, allgather), 'sync', 'momentum' nor"),
        (["--compressors", "onebit,onebit"], "names a method twice"),
        (["--compressors", ","], "--compressors is empty"),
        (["--ranks", "1"], "--ranks must be >= 2"),
        (["--steps", "3"], "--steps must exceed --warmup (3)"),
        (["--warmup", "1"], "--warmup must be >= 3"),
        (["--batch", "0"], "--batch must be >= 1"),
        (["--seed", "-1"], "--seed must be in [0, 2**63)"),
        (["--seeds", "0"], "--seeds must be >= 1"),
        (["--output", str(ROOT / "pyproject.toml")], "pyproject.toml is a file; name a directory"),
        (["--batch", "1000"], "--batch 1000 exceeds the 359 training samples each of 4 ranks holds"),
        (["--link", "1gbit"], "--link shapes the emulated cluster's links; it needs --cluster N"),
        (["--cluster", "4", "--ranks", "2"], "one rank per host; drop --ranks or make it 4"),
        (["--cluster", "1"], "--cluster needs at least 2 hosts"),
        (["--cluster", "4", "--link", "fast"], "the rate must look like 1gbit"),
        (["--cluster", "4", "--launcher", "mpirun"], "drop --launcher"),
        (["--model", "no_such_module_xyz:f"], "cannot import 'no_such_module_xyz'"),
        (["--model", "tests.bench_workload:not_a_workload"], "returned int, not a Workload"),
        (["--model", "tests.bench_workload:raises"], "raises() raised FileNotFoundError: train.csv is missing"),
        (["--output", str(ROOT / "pyproject.toml" / "results")], "cannot create it (Not a directory"),
        (["--model", "justaname"], "unknown workload 'justaname'"),
        (["--workload", "imagenet"], "invalid choice: 'imagenet'"),
        (["--model", "a:b", "--workload", "digits"], "not allowed with argument"),
    ],
)
def test_usage_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: gradq-bench" in err and message in err


def test_output_and_model_problems_are_usage_errors_before_training(tmp_path, monkeypatch, capsys):
    (tmp_path / "out" / "results.json").mkdir(parents=True)  # would only fail after training, at the write
    (tmp_path / "broken_model.py").write_text("def workload(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cases = [
        (["--output", str(tmp_path / "out")], "results.json there is a directory"),
        (["--model", "broken_model:workload"], "importing 'broken_model' failed: SyntaxError"),
    ]
    for flags, message in cases:
        started = time.perf_counter()
        with pytest.raises(SystemExit) as exit_info:
            cli.main(flags)
        assert exit_info.value.code == 2 and time.perf_counter() - started < 5  # no training started
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def test_cluster_without_root_is_a_clear_message(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert cli.main(["--cluster", "4", "--output", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "--cluster needs root" in err and "sudo" in err and "Traceback" not in err
    assert not (tmp_path / "results.json").exists()


def test_a_failing_rank_is_reported(tmp_path):
    """A model that fails to build on rank 1: exit status 1 with that rank's error, not a hang or a traceback."""
    completed = run_bench(tmp_path, "--model", "tests.bench_workload:broken_on_rank_1", "--ranks", "2", "--steps", "4",
                          "--compressors", "fp32")  # fmt: skip
    assert completed.returncode == 1
    assert "gradq-bench: a rank failed" in completed.stderr and "model broken on rank 1" in completed.stderr
    assert not (tmp_path / "results.json").exists()


def test_combining_repeated_runs_takes_each_figures_median_per_method():
    spec = importlib.util.spec_from_file_location("combine_runs", ROOT / "benchmarks" / "combine_runs.py")
    combine_runs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(combine_runs)

    def summary(floor, onebit):
        return [
            {"method": "noop", "median_step_s": floor, "x_floor": 1.0, "speedup_vs_fp32": None},
            {"method": "onebit", "median_step_s": onebit, "x_floor": onebit / floor, "speedup_vs_fp32": 2.0},
        ]

    rows = combine_runs.combine([summary(0.5, 0.6), summary(0.6, 0.9), summary(0.4, 0.6)])
    assert [row["method"] for row in rows] == ["noop", "onebit"]
    assert rows[0]["median_step_s"] == {"runs": [0.5, 0.6, 0.4], "median": 0.5}
    assert rows[0]["speedup_vs_fp32"] == {"runs": [], "median": None}
    assert rows[1]["median_step_s"]["median"] == 0.6
    assert rows[1]["x_floor"]["median"] == pytest.approx(1.5)  # of the ratios 1.2, 1.5, 1.5; not 0.6 / 0.5


def test_every_benchmarked_kernel_gives_the_references_bits(monkeypatch):
    """benchmarks/kernels.py sets up each kernel (server steps included) with arguments both paths accept,
    and they agree bit for bit: the benchmark times the computation that the tests check."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    kernels_ab = importlib.import_module("kernels_ab")
    kernels = kernels_ab.all_kernels([1, 3])
    names = {k.name for k in kernels}
    assert {"sign_mean_compress", "signmag_mean_compress:qsgd", "signmag_mean_compress:terngrad"} <= names
    x = torch.randn(70_001, generator=torch.Generator().manual_seed(3))
    for kernel in kernels:
        kernels_ab.compare(kernel, x, gradq._reference, gradq._C, repeats=1)  # SystemExit on a differing bit


def test_kernel_ab_times_both_builds_and_rejects_different_outputs(monkeypatch):
    """benchmarks/kernels_ab.py: interleaved timings of two builds of a kernel, which must agree bit for bit."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    kernels_ab = importlib.import_module("kernels_ab")
    (terngrad,) = [k for k in kernels_ab.all_kernels([1]) if kernels_ab.label(k) == "signmag_compress:terngrad"]
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    row = kernels_ab.compare(terngrad, x, gradq._C, gradq._C, repeats=4)
    times = row["times_s"]
    assert row["numel"] == 4096 and [len(t) for t in times.values()] == [4, 4]
    assert row["median_s"] == {side: statistics.median(t) for side, t in times.items()}
    pair_ratios = [a / b for a, b in zip(times["revision"], times["tree"], strict=True)]
    assert row["ratio"] == statistics.median(pair_ratios)  # per pair, not the ratio of the medians

    class OneBitOff:
        """The built kernel with the last byte of its packed output changed."""

        @staticmethod
        def signmag_compress(*args):
            packed, scales = gradq._C.signmag_compress(*args)
            packed[-1] ^= 1
            return packed, scales

    with pytest.raises(SystemExit, match="signmag_compress:terngrad: .* different outputs"):
        kernels_ab.compare(terngrad, x, OneBitOff, gradq._C, repeats=4)
    assert kernels_ab.same_bits((torch.tensor([0.0]),), (torch.tensor([0.0]),))
    assert not kernels_ab.same_bits(torch.tensor([0.0]), torch.tensor([-0.0]))  # equal values, other bits


def test_fmnist_workload_is_the_real_dataset_at_momentum_09():
    from gradq_bench.workloads import fmnist

    w = fmnist()
    assert w.train_x.shape == (60000, 1, 28, 28) and w.test_x.shape == (10000, 1, 28, 28)
    assert (w.lr, w.momentum, w.batch_size) == (0.05, 0.9, 64)
    assert sum(p.numel() for p in w.build_model().parameters()) == 206_922
    assert torch.bincount(w.train_y).tolist() == [6000] * 10  # Fashion-MNIST's balanced classes
    rows = [{"method": "fp32", "accuracy_delta_vs_fp32": 0.0}, {"method": "onebit", "accuracy_delta_vs_fp32": -0.6}]
    assert cli.check_targets(rows, "fmnist") == {"onebit accuracy within 0.5 point of fp32": False}


def test_momentum_suffix_moves_sgd_momentum_into_the_hook():
    from gradq_bench.methods import describe, parse_gradq_method

    method = parse_gradq_method("qsgd:allgather:momentum:levels=8")
    assert method.hook_momentum and method.mode == "allgather" and method.options == {"levels": 8}
    assert not parse_gradq_method("qsgd").hook_momentum
    assert describe("terngrad:momentum") == "gradq terngrad (two-phase, momentum)"
    with pytest.raises(ValueError, match="'momentum' nor option=value"):
        parse_gradq_method("qsgd:momentun")
    rms = parse_gradq_method("onebit:momentum:scale=rms:error_feedback=0")
    assert rms.options == {"scale": "rms"} and rms.error_feedback is False
    assert parse_gradq_method("qsgd:error_feedback=1").error_feedback is True and method.error_feedback is None
    assert describe("qsgd:error_feedback=1") == "gradq qsgd (two-phase, error feedback)"
    with pytest.raises(ValueError, match="onebit's scale is one of 'mean', 'rms', got 'l2'"):
        parse_gradq_method("onebit:scale=l2")
    with pytest.raises(ValueError, match="error_feedback is 0 or 1, got 'yes'"):
        parse_gradq_method("qsgd:error_feedback=yes")


def test_charlm_workload_is_next_character_prediction_on_the_plays():
    from gradq_bench.datasets import load_shakespeare_plays
    from gradq_bench.workloads import charlm

    w = charlm()
    plays = load_shakespeare_plays()
    assert len(plays) == 42
    text = "".join(plays.values())
    assert w.train_x.shape[1] == 64 and w.test_x.shape == (512, 64) and w.train_y.shape == w.train_x.shape
    # every label is the next character: windows overlap their labels by all but one position
    assert torch.equal(w.train_x[:, 1:], w.train_y[:, :-1]) and torch.equal(w.test_x[:, 1:], w.test_y[:, :-1])
    # 90% of each play trains, in non-overlapping windows of 65 characters (64 inputs + the last label)
    assert len(w.train_x) == sum((int(0.9 * len(t)) - 1) // 64 for t in plays.values())
    vocab = sorted(set(text))
    decoded = "".join(vocab[i] for i in w.train_x[0].tolist()) + vocab[int(w.train_y[0, -1])]
    assert decoded == next(iter(plays.values()))[:65]
    assert (w.optimizer, w.lr, w.weight_decay, w.metric, w.momentum) == ("adamw", 3e-3, 0.1, "perplexity", 0.0)
    torch.manual_seed(0)
    model = w.build_model()
    assert sum(p.numel() for p in model.parameters()) == 426_580 and len(vocab) == 84
    # causal: changing the character at position 40 leaves the logits of positions 0..39 bit for bit alone
    x = w.test_x[:3].clone()
    before = model(x)
    x[:, 40] = (x[:, 40] + 1) % 84
    after = model(x)
    assert torch.equal(before[:, :40], after[:, :40]) and not torch.equal(before[:, 40:], after[:, 40:])
    assert isinstance(w.make_optimizer(model.parameters(), 0.0), torch.optim.AdamW)


def _sequence_case() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return torch.randn(5, 7, 11, generator=gen), torch.randint(0, 11, (5, 7), generator=gen)


class _FixedLogits(torch.nn.Module):
    """Logits that do not depend on the input: row i of the case's logits for input row i (its label row)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, labels = _sequence_case()
        rows = [next(i for i in range(len(labels)) if torch.equal(labels[i], r)) for r in x]
        return logits[rows]


def _evaluate_rank(rank: int, world: int, workdir: Path) -> tuple[float, float]:
    from gradq_bench.worker import evaluate
    from gradq_bench.workloads import Workload

    _, labels = _sequence_case()
    w = Workload("seq", _FixedLogits, labels, labels, labels, labels, optimizer="adamw", metric="perplexity")
    return evaluate(_FixedLogits(), w, rank, world)


def test_sequence_loss_and_sharded_evaluation_count_every_position_once():
    from gradq_bench.worker import loss_of
    from tests.distributed import run

    logits, labels = _sequence_case()
    expected = -torch.log_softmax(logits.double(), -1).gather(-1, labels[..., None]).mean()
    assert float(loss_of(logits, labels)) == pytest.approx(float(expected), rel=1e-6)
    # 5 sequences on 3 ranks (2, 2 and 1 of them): the all-reduced figures are the whole set's, on every rank
    for loss, accuracy in run(_evaluate_rank, 3):
        assert loss == pytest.approx(float(expected), rel=1e-6)
        assert accuracy == float((logits.argmax(-1) == labels).double().mean())


def test_a_diverged_run_has_infinite_perplexity_instead_of_crashing_the_benchmark():
    from gradq_bench.worker import perplexity

    assert perplexity(1.0) == math.e and perplexity(709.0) == math.exp(709.0)
    assert perplexity(710.0) == math.inf and perplexity(math.inf) == math.inf and math.isnan(perplexity(math.nan))


def test_charlm_targets_and_table_use_perplexity():
    rows = [{"method": m, "perplexity_vs_fp32": r} for m, r in (("fp32", 1.0), ("torch-fp16", 1.5), ("onebit", 1.019),
                                                                 ("qsgd", 1.03))]  # fmt: skip
    assert cli.check_targets(rows, "charlm") == {"onebit perplexity within 2% of fp32": True,
                                                  "qsgd perplexity within 2% of fp32": False}  # fmt: skip
    runs = [{"method": m, "label": m, "median_step_s": 0.1, "payload_bytes_per_step": 10, "wire_bytes_per_step": 10,
             "fp32_bytes_per_step": 10, "codec_s_per_step": None, "final_loss": loss, "final_accuracy": 0.5,
             "final_perplexity": math.exp(loss), "time_to_target_s": None}
            for m, loss in (("fp32", 1.5), ("onebit", 1.6))]  # fmt: skip
    summary = report.summarize(runs)
    assert summary[1]["perplexity_vs_fp32"] == pytest.approx(math.exp(0.1))
    assert "ppl" in report.table(summary, perplexity=True).splitlines()[0]
    assert "ppl" not in report.table(summary).splitlines()[0]


def test_workload_rejects_unknown_optimizer_and_metric():
    from gradq_bench.workloads import Workload

    x, y = torch.zeros(4, 2), torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        Workload("w", torch.nn.Identity, x, y, optimizer="lamb")
    with pytest.raises(ValueError, match="metric"):
        Workload("w", torch.nn.Identity, x, y, metric="bleu")
    with pytest.raises(ValueError, match="AdamW keeps its own"):
        Workload("w", torch.nn.Identity, x, y, optimizer="adamw", momentum=0.9)
