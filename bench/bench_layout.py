"""Which memory order makes each of the default model's matrix-vector products fastest on this CPU.

npllama computes every projection as ``linear(x, w) = x @ w.T`` with w an (out, in) array, as the
files hold it; the product's (in, out) operand may lie in memory as (in, out) rows (C order) or as
nn.Linear's (out, in) rows seen through a transposed view (F order). The arithmetic is the same; the speed of OpenBLAS's matrix-vector product is not.
This script times one decode step's products alone (every layer's wq, wk, wv, wo, w1, w3, w2 and the LM
head, float32, batch 1) with all matrices C order, then with one kind at a time in F order, and
with npllama's choice (npllama.layout.IN_OUT_IN_MEMORY). Rounds are interleaved so that a drift in
the machine's speed hits every variant alike; the median of the rounds' best times is reported.

    .venv/bin/python bench/bench_layout.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KINDS = ("wq", "wk", "wv", "wo", "w1", "w3", "w2", "output")


def c_order(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a)


def f_order(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a.T).T


def matrices(model, f_kinds) -> list[np.ndarray]:
    """The step's matrices in call order, each (in, out), those of f_kinds in F order."""
    out = []
    for layer in model.layers:
        out += [(f_order if k in f_kinds else c_order)(getattr(layer, k).T) for k in KINDS[:-1]]
    out.append((f_order if "output" in f_kinds else c_order)(model.output.T))
    return out


def step_seconds(mats: list[np.ndarray], repeats: int = 6) -> float:
    xs = {n: np.ones((1, 1, n), np.float32) for n in {m.shape[0] for m in mats}}
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for m in mats:
            xs[m.shape[0]] @ m
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()

    import npllama
    from npllama.layout import IN_OUT_IN_MEMORY
    from npllama.weights import default_model_path
    model = npllama.load(default_model_path(), progress=False)
    chosen = tuple(k for k in KINDS if k not in IN_OUT_IN_MEMORY)
    variants = {"all (in, out) C order": ()}
    variants.update({f"{k} F order": (k,) for k in KINDS})
    variants["wq, wk, wv, wo, w2 F order"] = ("wq", "wk", "wv", "wo", "w2")
    variants[f"npllama's choice: {', '.join(chosen)} F order"] = chosen
    built = {name: matrices(model, kinds) for name, kinds in variants.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, mats in built.items():
            times[name].append(step_seconds(mats))

    base = statistics.median(times["all (in, out) C order"])
    nbytes = sum(m.nbytes for m in next(iter(built.values())))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"date: {datetime.date.today()}; numpy {np.__version__}")
    print(f"command: .venv/bin/python bench/bench_layout.py --rounds {args.rounds}\n")
    print("| memory order | matmuls of one decode step, ms | effective GB/s | vs all C order |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"| {name} | {t * 1e3:.1f} | {nbytes / t / 1e9:.1f} | {base / t:.2f}x |")


if __name__ == "__main__":
    main()
