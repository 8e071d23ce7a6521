"""fp8 pseudo-gradients decoded on CPU: plait's table of the 256 byte values against torch's cast,
side by side on the same bytes (a quarter of the default model: one streaming fragment's chunks
over 2 replicas), one thread. Prints the median of each and checks that they agree bit for bit.

    .venv/bin/python benchmarks/fp8_decode.py [--elements 462000] [--repeats 50]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from plait.parallel.diloco import FP8, decode, encode


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--elements", type=int, default=462_000)
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    payload, scales = encode(torch.randn(2, args.elements // 2), "fp8")
    table = _median_ms(lambda: decode(payload, scales, "fp8"), args.repeats)
    cast = _median_ms(lambda: payload.view(FP8).float() * scales.unsqueeze(1), args.repeats)
    same = torch.equal(decode(payload, scales, "fp8"), payload.view(FP8).float() * scales.unsqueeze(1))
    print(f"{args.elements} elements: table {table:.3f} ms, torch's cast {cast:.3f} ms "
          f"({cast / table:.1f}x); bit for bit the same: {same}")


if __name__ == "__main__":
    main()
