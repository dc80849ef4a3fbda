"""What onebit's rms scale costs the native sign kernel: sign_compress with a residual at 16M values, one
thread, the mean |x| scale and the rms scale interleaved with a memory copy, medians of 15 in one process.

    .venv/bin/python benchmarks/sign_scale_timing.py
"""

import statistics
import time

import torch

from gradq import _C

N, REPEATS, BLOCK = 16 << 20, 15, 512


def main() -> None:
    torch.set_num_threads(1)
    x, y = torch.randn(N), torch.empty(N)
    residuals = {rms: torch.zeros(N) for rms in (False, True)}
    times: dict[object, list[float]] = {False: [], True: [], "copy": []}
    for _ in range(REPEATS):
        for rms in (False, True):
            start = time.perf_counter()
            _C.sign_compress(x, residuals[rms], BLOCK, rms)
            times[rms].append(time.perf_counter() - start)
        start = time.perf_counter()
        y.copy_(x)
        times["copy"].append(time.perf_counter() - start)
    mean, rms, copy = (statistics.median(times[k]) for k in (False, True, "copy"))
    print(f"16M values, residual, 1 thread, medians of {REPEATS} interleaved:")
    print(f"  scale mean |x|: {mean * 1e3:.2f} ms ({12 * N / mean / 1e9:.1f} GB/s of x, residual in and out)")
    print(f"  scale rms:      {rms * 1e3:.2f} ms ({12 * N / rms / 1e9:.1f} GB/s), {rms / mean:.2f}x the mean's time")
    print(f"  copy:           {copy * 1e3:.2f} ms ({8 * N / copy / 1e9:.1f} GB/s read + write)")


if __name__ == "__main__":
    main()
