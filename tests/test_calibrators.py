"""Activation-range calibrators (docs/model_quantization.md, "Calibrators") against naive plain-Python oracles.

The oracles below are written with lists, floats, ``round`` and ``math.log`` straight from the doc, with the
same float operations per value as the vectorized code, so the tests assert exact equality of the chosen range.
One caveat: torch sums the MSE errors and KL terms in another order than a sequential loop (and torch.log may
differ from math.log by an ulp). Both sides therefore apply the doc's tie rule (scores within 1e-12 of the
minimum are ties), and a mismatch is accepted only if the oracle's scores of the two choices agree within
1e-12. With these seeds no case needs that: all 198 oracle comparisons are exactly equal.
"""

import math

import pytest
import torch

import gradq
from gradq import QuantScheme
from gradq.modelquant import calibrators as cal
from gradq.modelquant.calibrators import CalibrationStats, get_calibrator, histogram

UINT8 = QuantScheme.uniform(8, signed=False, symmetric=False)
INT8 = QuantScheme.uniform(8)  # signed symmetric
SCHEMES = {
    "uint8": UINT8,
    "int8_sym": INT8,
    "uint4": QuantScheme.uniform(4, signed=False, symmetric=False),
    "uint2": QuantScheme.uniform(2, signed=False, symmetric=False),
    "int4_affine": QuantScheme.uniform(4, symmetric=False),
    "uint4_sym": QuantScheme.uniform(4, signed=False),
}
NAMES = ["entropy", "minmax", "moving_average", "mse", "percentile"]


def data(kind: str, seed: int, n: int = 4000) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(n, generator=g)
    if kind == "normal":
        return normal
    if kind == "exponential":  # lo >= 0
        return torch.empty(n).exponential_(generator=g)
    if kind == "outlier":
        return torch.cat((normal, torch.tensor([40.0])))
    if kind == "negative":  # hi < 0
        return -1.0 - torch.empty(n).exponential_(generator=g)
    if kind == "shifted":  # lo > 0
        return 3.0 + normal.abs()
    if kind == "relu":  # a spike of zeros
        return normal.clamp(min=0)
    raise ValueError(kind)


KINDS = ["normal", "exponential", "outlier", "negative", "shifted", "relu"]


def stats_of(x: torch.Tensor, bins: int, batches: int = 4) -> CalibrationStats:
    """What an observer collects from ``x`` in ``batches`` batches (EMA momentum 0.01, histograms summed)."""
    lo, hi = x.min().item(), x.max().item()
    ema_lo = ema_hi = None
    counts = torch.zeros(bins, dtype=torch.float64)
    for batch in x.chunk(batches):
        b_lo, b_hi = batch.min().item(), batch.max().item()
        if ema_lo is None:
            ema_lo, ema_hi = b_lo, b_hi
        else:
            ema_lo, ema_hi = ema_lo + 0.01 * (b_lo - ema_lo), ema_hi + 0.01 * (b_hi - ema_hi)
        counts += histogram(batch, lo, hi, bins)
    return CalibrationStats(lo, hi, ema_lo, ema_hi, counts)


def clamp_into(new_lo: float, new_hi: float, lo: float, hi: float) -> tuple[float, float]:
    """The documented final clamp: lo' = clamp(lo', lo, hi), hi' = clamp(hi', lo', hi)."""
    new_lo = min(max(new_lo, lo), hi)
    return new_lo, min(max(new_hi, new_lo), hi)


# ---------------------------------------------------------------- oracles


def histogram_oracle(values: list[float], lo: float, hi: float, bins: int) -> list[float]:
    counts = [0.0] * bins
    w = (hi - lo) / bins
    for v in values:
        b = 0
        if lo != hi:
            while b < bins - 1 and not v < lo + (b + 1) * w:  # first bin whose upper edge is above v
                b += 1
        counts[b] += 1
    return counts


def percentile_oracle(counts: list[float], lo: float, hi: float, p: float) -> tuple[float, float]:
    if lo == hi or p == 100:
        return lo, hi
    w = (hi - lo) / len(counts)
    total = sum(counts)

    def quantile(t: float) -> float:
        cum = 0.0
        for b, c in enumerate(counts):
            if cum + c >= t:
                return lo + w * (b + (t - cum) / c)
            cum += c
        raise AssertionError("target beyond the total")

    upper = quantile(p / 100 * total)
    lower = lo if lo >= 0 else quantile((100 - p) / 100 * total)
    return clamp_into(lower, upper, lo, hi)


def qparams_oracle(lo: float, hi: float, scheme: QuantScheme) -> tuple[float, int]:
    if scheme.symmetric:
        top = max(abs(lo), abs(hi)) if scheme.signed else max(hi, 0.0)
        return (top / scheme.qmax) or 1.0, 0
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / (scheme.qmax - scheme.qmin) or 1.0
    return scale, min(max(scheme.qmin - round(lo / scale), scheme.qmin), scheme.qmax)


def mse_oracle(counts, lo, hi, scheme, candidates):
    """(chosen range, {range: error}) by brute force over k."""
    if lo == hi:
        return (lo, hi), {}
    w = (hi - lo) / len(counts)
    centers = [lo + (b + 0.5) * w for b in range(len(counts))]
    errors = {}
    for k in range(1, candidates + 1):
        a = k / candidates
        c_lo, c_hi = a * lo, a * hi
        if c_hi < lo or c_lo > hi:
            continue
        scale, zp = qparams_oracle(c_lo, c_hi, scheme)
        error = 0.0
        for c, n in zip(centers, counts, strict=True):
            q = min(max(round(c / scale) + zp, scheme.qmin), scheme.qmax)
            d = c - scale * (q - zp)
            error += n * (d * d)
        errors[k] = (error, clamp_into(c_lo, c_hi, lo, hi))
    best = min(e for e, _ in errors.values())
    k = max(k for k, (e, _) in errors.items() if e <= best * (1 + 1e-12))  # ties: the largest k
    return errors[k][1], {rng: e for e, rng in errors.values()}


def entropy_oracle(counts, lo, hi, scheme, target_bins=None):
    """(chosen range, {range: KL}) by the TensorRT procedure written out with lists."""
    if lo == hi:
        return (lo, hi), {}
    w = (hi - lo) / len(counts)
    levels = scheme.qmax - scheme.qmin + 1
    n_q = target_bins if target_bins is not None else (levels if lo >= 0 else levels // 2)
    if lo >= 0:
        h, a = list(counts), lo
        if lo == 0 and len(h) > 1:
            h[0] = h[1]
    else:
        a, top = max(0.0, -hi), max(-lo, hi)
        nb = min(len(counts), math.ceil((top - a) / w))
        h = [0.0] * nb
        for b, c in enumerate(counts):
            center = lo + (b + 0.5) * w
            h[min(max(math.floor((abs(center) - a) / w), 0), nb - 1)] += c
    nb = len(h)
    if nb <= n_q:
        return (lo, hi), {}
    divergences = {}
    for i in range(n_q, nb + 1):
        p_counts = h[:i]
        p_counts[i - 1] += sum(h[i:])
        m = i // n_q
        q_counts = [0.0] * i
        for j in range(n_q):
            start, stop = j * m, (i if j == n_q - 1 else j * m + m)
            nonzero = [b for b in range(start, stop) if h[b] != 0]
            for b in nonzero:
                q_counts[b] = sum(h[start:stop]) / len(nonzero)
        p_total, q_total = sum(p_counts), sum(q_counts)
        kl = 0.0
        for pc, qc in zip(p_counts, q_counts, strict=True):
            if pc > 0:
                p = pc / p_total
                q = qc / q_total if q_total > 0 else 0.0
                kl += p * math.log(p / (q if q > 0 else 1e-10))
        threshold = a + i * w
        rng = (lo, hi) if i == nb else clamp_into(max(lo, -threshold), min(hi, threshold), lo, hi)
        divergences[rng] = kl
    best = min(divergences.values())
    return next(rng for rng, kl in divergences.items() if kl <= best + 1e-12), divergences  # ties: the smallest i


def assert_same_choice(got, want, scores):
    """Exact equality, or a tie of the oracle's scores at rounding level (see the module docstring)."""
    assert isinstance(got[0], float) and isinstance(got[1], float)
    if got != want:
        assert got in scores, (got, want)
        assert math.isclose(scores[got], scores[want], rel_tol=1e-12, abs_tol=1e-12), (got, want, scores)


# ---------------------------------------------------------------- histogram


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_histogram_matches_naive_loop(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(300, generator=g) * 3).to(dtype)
    lo, hi = x.min().item(), x.max().item()
    bins = 37
    w = (hi - lo) / bins
    edges = torch.tensor([lo + i * w for i in range(bins)], dtype=torch.float64)  # values exactly on edges
    exact = torch.cat((x.double(), edges, torch.tensor([hi, lo], dtype=torch.float64)))
    values = exact.tolist()
    counts = histogram(exact, lo, hi, bins)
    assert counts.dtype == torch.float64 and counts.shape == (bins,)
    assert counts.tolist() == histogram_oracle(values, lo, hi, bins)
    assert counts.sum().item() == len(values)
    # the input dtype's own tensor, in any shape
    assert histogram(x.view(30, 10), lo, hi, bins).tolist() == histogram_oracle(x.double().tolist(), lo, hi, bins)
    # a narrower range: values outside are clamped into the end bins
    n_lo, n_hi = lo / 2, hi / 3
    clamped = histogram(x, n_lo, n_hi, bins)
    assert clamped.tolist() == histogram_oracle(x.double().tolist(), n_lo, n_hi, bins)
    assert clamped[0].item() >= sum(v < n_lo for v in x.double().tolist()) > 0
    assert clamped[-1].item() >= sum(v >= n_hi for v in x.double().tolist()) > 0


def test_histogram_in_chunks_counts_the_same(monkeypatch):
    x = data("normal", 7, n=1000)
    want = histogram_oracle(x.double().tolist(), -2.0, 2.5, 50)
    monkeypatch.setattr(cal, "_HISTOGRAM_CHUNK", 7)  # 143 chunks, the last one short
    assert histogram(x, -2.0, 2.5, 50).tolist() == want


def test_histogram_bin_rule_and_edge_cases():
    # lo=0, hi=4, 4 bins: edges 0, 1, 2, 3, (4)
    x = torch.tensor([-5.0, 0.0, 0.5, 1.0, 2.999, 3.0, 4.0, 9.0])
    assert histogram(x, 0.0, 4.0, 4).tolist() == [3.0, 1.0, 1.0, 3.0]  # v == edge goes up; v == hi in the last
    assert histogram(x, 2.0, 2.0, 5).tolist() == [8.0, 0.0, 0.0, 0.0, 0.0]  # lo == hi: all in bin 0
    assert histogram(x, 0.0, 4.0, 1).tolist() == [8.0]
    assert histogram(torch.empty(0), 0.0, 1.0, 3).tolist() == [0.0, 0.0, 0.0]
    # histograms of parts add up to the histogram of the whole, exactly
    y = data("normal", 5)
    parts = sum(histogram(p, -4.0, 4.0, 64) for p in y.chunk(7))
    assert torch.equal(parts, histogram(y, -4.0, 4.0, 64))
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError, match="calibration data contained NaN or Inf"):
            histogram(torch.tensor([1.0, bad]), 0.0, 1.0, 8)
    with pytest.raises(ValueError, match="calibration data contained NaN or Inf"):
        histogram(x, 0.0, float("nan"), 8)
    with pytest.raises(ValueError, match="lo must be <= hi"):
        histogram(x, 1.0, 0.0, 8)
    with pytest.raises(ValueError, match="bins must be >= 1"):
        histogram(x, 0.0, 1.0, 0)
    with pytest.raises(TypeError, match="x must have dtype"):
        histogram(torch.arange(4), 0.0, 1.0, 8)


# ---------------------------------------------------------------- calibrators vs oracles


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("p", [99.99, 99.0, 90.0, 100.0])
def test_percentile_matches_naive_cumulative_loop(seed, kind, p):
    stats = stats_of(data(kind, seed), bins=97)
    got = get_calibrator("percentile", percentile=p).range(stats, UINT8)
    want = percentile_oracle(stats.counts.tolist(), stats.lo, stats.hi, p)
    assert got == want and all(type(v) is float for v in got)
    if p < 100:
        assert got[1] < stats.hi and (stats.lo >= 0) == (got[0] == stats.lo)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scheme", ["uint8", "int8_sym", "uint4", "uint2", "int4_affine", "uint4_sym"])
def test_mse_matches_exhaustive_loop(seed, kind, scheme):
    stats = stats_of(data(kind, seed), bins=64)
    candidates = 40
    got = get_calibrator("mse", candidates=candidates).range(stats, SCHEMES[scheme])
    want, errors = mse_oracle(stats.counts.tolist(), stats.lo, stats.hi, SCHEMES[scheme], candidates)
    assert_same_choice(got, want, errors)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    ("scheme", "bins", "target_bins"),
    [("uint4", 120, None), ("uint2", 64, None), ("int8_sym", 300, None), ("uint8", 300, None), ("uint8", 90, 10)],
)
def test_entropy_matches_naive_tensorrt_procedure(seed, kind, scheme, bins, target_bins):
    stats = stats_of(data(kind, seed, n=3000), bins=bins)
    got = get_calibrator("entropy", target_bins=target_bins).range(stats, SCHEMES[scheme])
    want, divergences = entropy_oracle(stats.counts.tolist(), stats.lo, stats.hi, SCHEMES[scheme], target_bins)
    assert_same_choice(got, want, divergences)


def test_oracles_are_not_trivial():
    """The oracle comparisons above exercise real choices: interior candidates win for these inputs."""
    stats = stats_of(data("normal", 0), bins=64)
    mse, _ = mse_oracle(stats.counts.tolist(), stats.lo, stats.hi, SCHEMES["uint2"], 40)
    ent, divergences = entropy_oracle(stats.counts.tolist(), stats.lo, stats.hi, SCHEMES["uint4"])
    assert stats.lo < mse[0] and mse[1] < stats.hi
    assert stats.lo < ent[0] and ent[1] < stats.hi and len(divergences) > 10
    # the fold of an all-negative histogram is its mirror image: entropy clips the far (negative) end only
    neg = stats_of(data("negative", 0), bins=120)
    got = get_calibrator("entropy").range(neg, SCHEMES["uint4"])
    assert got[0] > neg.lo and got[1] == neg.hi


def test_mse_ties_go_to_the_widest_range_and_ranges_missing_the_data_are_skipped():
    # all the mass at the center 0 of the middle bin: every candidate quantizes it exactly (error 0)
    zero_center = CalibrationStats(-1.0, 1.0, -1.0, 1.0, torch.tensor([0.0, 5.0, 0.0], dtype=torch.float64))
    for scheme in SCHEMES.values():
        assert get_calibrator("mse").range(zero_center, scheme) == (-1.0, 1.0)
    # lo > 0 and 1 bit: the candidate (0.1 lo, 0.1 hi) lies below lo and would have the least error (everything
    # clipped to 1.0 costs less than rounding to {0, 2}); it is skipped, as its range misses the data
    one_bit = QuantScheme.uniform(1, signed=False, symmetric=False)
    stats = stats_of(torch.tensor([1.05] * 1000 + [10.0] * 2), bins=64)
    assert qparams_oracle(0.1 * stats.lo, 0.1 * stats.hi, one_bit) == (1.0, 0)  # the grid {0, 1}, below lo
    w = (stats.hi - stats.lo) / 64
    missing = 0.0
    for b, n in enumerate(stats.counts.tolist()):
        c = stats.lo + (b + 0.5) * w
        missing += n * (c - min(round(c), 1)) ** 2
    want, errors = mse_oracle(stats.counts.tolist(), stats.lo, stats.hi, one_bit, 10)
    assert missing < errors[want]
    assert get_calibrator("mse", candidates=10).range(stats, one_bit) == want == (stats.lo, 2.0)


def test_oracle_qparams_match_choose_qparams():
    """The MSE oracle's qparams formula is the one of gradq.choose_qparams (up to its fp32 arithmetic)."""
    g = torch.Generator().manual_seed(3)
    for scheme in SCHEMES.values():
        for lo, hi in (torch.randn(20, 2, generator=g) * 5).tolist() + [[0.0, 0.0], [-1.0, 0.0], [2.0, 3.0]]:
            lo, hi = min(lo, hi), max(lo, hi)
            scale, zp = gradq.choose_qparams(torch.tensor([lo, hi]), scheme)
            want_scale, want_zp = qparams_oracle(lo, hi, scheme)
            assert math.isclose(scale.item(), want_scale, rel_tol=1e-6)
            assert (zp.item() if zp is not None else 0) == want_zp


# ---------------------------------------------------------------- contract and edge cases


@pytest.mark.parametrize("kind", KINDS)
def test_every_calibrator_stays_inside_the_data_range(kind):
    for seed in range(3):
        stats = stats_of(data(kind, seed), bins=256)
        for scheme in SCHEMES.values():
            for name in NAMES:
                lo2, hi2 = get_calibrator(name).range(stats, scheme)
                assert type(lo2) is float and type(hi2) is float
                assert stats.lo <= lo2 <= hi2 <= stats.hi, (name, scheme, lo2, hi2)


def test_minmax_and_moving_average():
    stats = stats_of(data("normal", 0), bins=16)
    assert get_calibrator("minmax").range(stats, UINT8) == (stats.lo, stats.hi)
    assert get_calibrator("moving_average").range(stats, UINT8) == (stats.ema_lo, stats.ema_hi)
    assert stats.lo < stats.ema_lo and stats.ema_hi < stats.hi  # the batches' extremes differ
    # an EMA an ulp outside [lo, hi], or lo above hi by rounding, is clamped
    odd = CalibrationStats(lo=-1.0, hi=1.0, ema_lo=-1.0000000000000002, ema_hi=-1.0000000000000004)
    assert get_calibrator("moving_average").range(odd, UINT8) == (-1.0, -1.0)
    assert get_calibrator("percentile", percentile=100).range(stats, UINT8) == (stats.lo, stats.hi)
    assert get_calibrator("mse", candidates=1).range(stats, UINT8) == (stats.lo, stats.hi)


@pytest.mark.parametrize("value", [7.5, -2.25, 0.0])
def test_constant_input_gives_its_value(value):
    x = torch.full((1000,), value)
    stats = stats_of(x, bins=2048)
    assert stats.counts[0] == 1000 and stats.counts[1:].sum() == 0
    for scheme in SCHEMES.values():
        for name in NAMES:
            assert get_calibrator(name).range(stats, scheme) == (value, value)
    if value == 0.0:  # all zeros: choose_qparams falls back to scale 1 and zeros stay zeros
        scale, zp = gradq.choose_qparams(torch.tensor([0.0, 0.0]), UINT8)
        assert scale.item() == 1.0 and zp.item() == 0
        assert torch.equal(gradq.fake_quantize(x, UINT8, scale=scale, zero_point=zp), x)


def test_one_outlier_is_clipped_by_percentile_mse_and_entropy():
    uint4 = SCHEMES["uint4"]
    x = torch.cat((torch.randn(100_000, generator=torch.Generator().manual_seed(0)), torch.tensor([100.0])))
    stats = stats_of(x, bins=2048)
    assert get_calibrator("minmax").range(stats, uint4)[1] == 100.0
    assert get_calibrator("percentile").range(stats, uint4)[1] < 5  # 99.99%: 10 values per tail
    assert get_calibrator("mse").range(stats, uint4)[1] <= 20
    assert get_calibrator("entropy").range(stats, uint4)[1] < 10
    # 8 bits: clipping pays off for MSE only with enough values (the doc's edge-case table)
    big = torch.cat((torch.randn(2**21, generator=torch.Generator().manual_seed(1)), torch.tensor([100.0])))
    big_stats = stats_of(big, bins=2048)
    assert get_calibrator("mse").range(big_stats, UINT8)[1] < 60
    assert get_calibrator("percentile").range(big_stats, UINT8)[1] < 5
    assert get_calibrator("entropy").range(big_stats, UINT8)[1] < 10
    small = stats_of(x[-10_001:], bins=2048)  # 10k values and the outlier: keeping it is MSE-optimal
    assert get_calibrator("mse").range(small, UINT8)[1] > 90


def test_non_finite_statistics_are_rejected():
    good = torch.ones(4, dtype=torch.float64)
    for bad in (float("nan"), float("inf")):
        for field in ("lo", "hi", "ema_lo", "ema_hi"):
            kwargs = {"lo": -1.0, "hi": 1.0, "ema_lo": -1.0, "ema_hi": 1.0, field: bad}
            with pytest.raises(ValueError, match="calibration data contained NaN or Inf"):
                CalibrationStats(**kwargs)
        with pytest.raises(ValueError, match="calibration data contained NaN or Inf"):
            CalibrationStats(-1.0, 1.0, -1.0, 1.0, torch.tensor([1.0, bad], dtype=torch.float64))
    with pytest.raises(ValueError, match="lo must be <= hi"):
        CalibrationStats(1.0, -1.0, 0.0, 0.0)
    with pytest.raises(TypeError, match="counts must have dtype torch.float64"):
        CalibrationStats(-1.0, 1.0, -1.0, 1.0, good.float())
    with pytest.raises(ValueError, match="counts must be 1-D"):
        CalibrationStats(-1.0, 1.0, -1.0, 1.0, good.view(2, 2))
    for counts in (torch.zeros(4, dtype=torch.float64), torch.tensor([2.0, -1.0], dtype=torch.float64)):
        with pytest.raises(ValueError, match="positive total"):
            CalibrationStats(-1.0, 1.0, -1.0, 1.0, counts)
    with pytest.raises(TypeError, match="lo must be a float"):
        CalibrationStats(True, 1.0, 0.0, 0.0)


@pytest.mark.parametrize("name", ["percentile", "mse", "entropy"])
def test_histogram_calibrators_need_a_histogram(name):
    calibrator = get_calibrator(name)
    assert calibrator.needs_histogram
    with pytest.raises(ValueError, match=f"calibrator '{name}' needs a histogram"):
        calibrator.range(CalibrationStats(-1.0, 1.0, -1.0, 1.0), UINT8)
    with pytest.raises(ValueError, match="needs a histogram"):  # also for constant data
        calibrator.range(CalibrationStats(1.0, 1.0, 1.0, 1.0), UINT8)


def test_schemes_and_stats_are_checked():
    stats = stats_of(data("normal", 0), bins=16)
    for name in NAMES:
        with pytest.raises(ValueError, match="uniform schemes with scale_from='minmax'"):
            get_calibrator(name).range(stats, QuantScheme.sign())
        with pytest.raises(ValueError, match="uniform schemes with scale_from='minmax'"):
            get_calibrator(name).range(stats, QuantScheme.uniform(8, scale_from="norm"))
        with pytest.raises(TypeError, match="stats must be CalibrationStats"):
            get_calibrator(name).range((stats.lo, stats.hi), UINT8)
    assert not get_calibrator("minmax").needs_histogram and not get_calibrator("moving_average").needs_histogram


# ---------------------------------------------------------------- registry


def test_registry(monkeypatch):
    assert cal.available_calibrators() == NAMES
    with pytest.raises(ValueError, match=r"unknown calibrator 'kl'; available: entropy, minmax, moving_average, mse"):
        get_calibrator("kl")
    with pytest.raises(ValueError, match="register a Calibrator subclass with @register_calibrator"):
        get_calibrator("kl")
    with pytest.raises(TypeError, match="bad options for calibrator 'mse': .*'bins'"):
        get_calibrator("mse", bins=10)
    with pytest.raises(TypeError, match="bad options for calibrator 'percentile': percentile must be a number"):
        get_calibrator("percentile", percentile=True)
    for value in (50, 100.5, float("nan")):
        with pytest.raises(ValueError, match=r"percentile must be in \(50, 100\]"):
            get_calibrator("percentile", percentile=value)
    with pytest.raises(ValueError, match="candidates must be >= 1"):
        get_calibrator("mse", candidates=0)
    with pytest.raises(TypeError, match="candidates must be an int"):
        get_calibrator("mse", candidates=2.0)
    with pytest.raises(ValueError, match="target_bins must be >= 1"):
        get_calibrator("entropy", target_bins=0)
    with pytest.raises(ValueError, match="already registered"):
        cal.register_calibrator(cal.MSE)
    instance = cal.Percentile(99.9)
    assert get_calibrator(instance) is instance and repr(instance) == "Percentile(percentile=99.9)"
    with pytest.raises(ValueError, match="already an instance"):
        get_calibrator(instance, percentile=99.0)

    monkeypatch.setattr(cal._REGISTRY, "_classes", dict(cal._REGISTRY._classes))

    @cal.register_calibrator
    class Half(cal.Calibrator):
        name = "half"
        needs_histogram = False

        def range(self, stats, scheme):
            return stats.lo / 2, stats.hi / 2

    assert "half" in cal.available_calibrators()
    assert get_calibrator("half").range(CalibrationStats(-2.0, 4.0, 0.0, 0.0), UINT8) == (-1.0, 2.0)
