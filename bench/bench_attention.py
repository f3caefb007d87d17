"""Naive vs blockwise (flash) attention in NumPy: time and peak memory, and the model's prefill.

Measures on this machine, float32, batch 1, causal prefill (q_len == kv_len):
  1. attention alone at 1K, 4K and 16K tokens: wall time (best of a few runs) and peak memory
     (what NumPy allocated during the call, traced by tracemalloc in a separate run). The head
     shape is one GQA group of SmolLM2-135M: 3 query heads sharing 1 kv head, head_dim 64
     (the whole layer is 3 such groups; a naive 16K pass over all 9 heads would need ~30 GB);
  2. the crossover: both at short lengths with a full SmolLM2-135M layer (9 heads, 3 kv heads),
     which sets npllama.layout.FLASH_MIN_LEN;
  3. decoding: one query per head against a cache of 128 to 8K keys, a full SmolLM2-135M layer,
     npllama's naive attention (one matrix-vector product per query head, its kv head broadcast
     over the group) against the same maths with each kv head's n_rep queries stacked as the rows
     of one matrix product (how npllama wrote it before 2026-12-02), and flash;
  4. the model's prefill tokens/s both ways: a random-weight model of SmolLM2-135M's shape
     (dim 576, 30 layers, 9 heads, 3 kv heads, hidden 1536, vocab 49152), prompts of 1K and 4K
     tokens into a fresh cache, attention="naive" vs attention="flash"; and how far apart the
     two sets of logits are.

    .venv/bin/python bench/bench_attention.py [--lengths 1024 4096 16384] [--decode 128 512 2048 8192]
                                              [--prefill 1024 4096]

Prints a markdown section for bench/RESULTS.md. Run it on a quiet machine (it takes ~5 minutes on
2 cores); speed is measured here and never asserted in tests.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from npllama.attention import flash_attention, naive_attention  # noqa: E402
from npllama.config import ModelArgs  # noqa: E402
from npllama.layout import BLOCK_K, BLOCK_Q, FLASH_MIN_LEN  # noqa: E402
from npllama.model import Transformer  # noqa: E402
from npllama.params import init_params  # noqa: E402

IMPLS = {"naive": naive_attention, "flash": flash_attention}


def best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def traced_peak(fn) -> int:
    """Peak bytes allocated (NumPy buffers included) while fn runs, above what existed before."""
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        fn()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def available_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def qkv(seq: int, n_heads: int, n_kv_heads: int, head_dim: int = 64, seed: int = 0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((1, n_heads, seq, head_dim), dtype=np.float32),
            rng.standard_normal((1, n_kv_heads, seq, head_dim), dtype=np.float32),
            rng.standard_normal((1, n_kv_heads, seq, head_dim), dtype=np.float32))


def bench_lengths(lengths, n_heads=3, n_kv_heads=1):
    print(f"\n### Attention alone: {n_heads} query heads / {n_kv_heads} kv head, head_dim 64, float32, causal\n")
    print("| tokens | naive time | flash time | speed-up | naive peak memory | flash peak memory | "
          "one head's seq x seq float32 |")
    print("|---|---|---|---|---|---|---|")
    for seq in lengths:
        q, k, v = qkv(seq, n_heads, n_kv_heads)
        row = {}
        repeats = 3 if seq <= 4096 else 1
        for name, fn in IMPLS.items():
            need = 3 * n_heads * seq * seq * 4   # naive holds about three score-sized arrays at once
            if name == "naive" and need > 0.8 * available_bytes():
                row[name] = None
                continue
            fn(q[:, :, :64], k[:, :, :64], v[:, :, :64])            # warm up BLAS
            t = best_time(lambda: fn(q, k, v), repeats)
            peak = traced_peak(lambda: fn(q, k, v))
            row[name] = (t, peak)
            print(f"  {seq} {name}: {t:.3f} s, peak {peak / 2**20:.1f} MiB", file=sys.stderr)
        naive, flash = row["naive"], row["flash"]
        nt = f"{naive[0]:.3f} s" if naive else "skipped (memory)"
        nm = f"{naive[1] / 2**20:,.0f} MiB" if naive else "—"
        speed = f"{naive[0] / flash[0]:.1f}x" if naive else "—"
        print(f"| {seq:,} | {nt} | {flash[0]:.3f} s | {speed} | {nm} | {flash[1] / 2**20:,.1f} MiB | "
              f"{seq * seq * 4 / 2**20:,.0f} MiB |")


def bench_crossover(lengths=(32, 64, 128, 256, 512, 1024)):
    print("\n### Crossover: one SmolLM2-135M layer's attention (9 heads / 3 kv heads, head_dim 64)\n")
    print("| tokens | naive | flash | naive / flash |")
    print("|---|---|---|---|")
    for seq in lengths:
        q, k, v = qkv(seq, 9, 3)
        times = {name: best_time(lambda: fn(q, k, v), 7 if seq <= 256 else 5) for name, fn in IMPLS.items()}
        print(f"| {seq} | {times['naive'] * 1e3:.2f} ms | {times['flash'] * 1e3:.2f} ms | "
              f"{times['naive'] / times['flash']:.2f} |")


def stacked_rows_attention(q, k, v):
    """Decode attention (q_len 1, no mask) with each kv head's n_rep query heads stacked as the
    rows of one (n_rep, head_dim) @ (head_dim, kv_len) product: the formulation npllama's
    naive_attention replaced. Same maths; here only to be timed against it."""
    b, n_heads, q_len, d = q.shape
    n_kv_heads, kv_len = k.shape[1], k.shape[2]
    qg = q.reshape(b, n_kv_heads, -1, d)                                       # (b, n_kv, n_rep, d)
    scores = (qg @ np.swapaxes(k, -1, -2)) * q.dtype.type(1.0 / np.sqrt(d))   # (b, n_kv, n_rep, kv_len)
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return ((e / e.sum(axis=-1, keepdims=True)) @ v).reshape(b, n_heads, q_len, d)


def bench_decode(lengths):
    print("\n### Decoding: one new query per head, one SmolLM2-135M layer (9 heads / 3 kv heads, head_dim 64)\n")
    print("| cached keys | naive (per-head products) | stacked rows (before) | flash | stacked / naive |")
    print("|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for kv_len in lengths:
        q = rng.standard_normal((1, 9, 1, 64), dtype=np.float32)
        cache = rng.standard_normal((2, 1, 3, 2 * kv_len, 64), dtype=np.float32)   # a cache half full,
        k, v = cache[0][:, :, :kv_len], cache[1][:, :, :kv_len]                    # read as views, as decode does
        assert np.allclose(stacked_rows_attention(q, k, v), naive_attention(q, k, v), atol=1e-6)
        n = max(20, 20000 // kv_len)
        t = {name: best_time(lambda: [fn(q, k, v) for _ in range(n)], 5) / n
             for name, fn in (("naive", naive_attention), ("stacked", stacked_rows_attention),
                              ("flash", flash_attention))}
        print(f"| {kv_len:,} | {t['naive'] * 1e6:.1f} us | {t['stacked'] * 1e6:.1f} us | {t['flash'] * 1e6:.1f} us | "
              f"{t['stacked'] / t['naive']:.2f}x |")


def smollm2_135m_shape(max_seq_len: int) -> ModelArgs:
    return ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152, hidden_dim=1536,
                     head_dim=64, norm_eps=1e-5, rope_theta=100000.0, max_seq_len=max_seq_len,
                     tie_word_embeddings=True)


def bench_prefill(lengths):
    args = smollm2_135m_shape(max(lengths))
    model = Transformer(args, init_params(args, seed=0))
    print(f"\n### Model prefill: random-weight model of SmolLM2-135M's shape ({model.num_parameters() / 1e6:.0f}M "
          f"parameters, float32), one prompt into a fresh cache\n")
    print("| prompt tokens | naive tok/s | flash tok/s | flash / naive | logits max rel. diff |")
    print("|---|---|---|---|---|")
    rng = np.random.default_rng(1)
    model(rng.integers(0, args.vocab_size, (1, 16)))            # warm up
    for seq in lengths:
        ids = rng.integers(0, args.vocab_size, (1, seq))
        out, rate = {}, {}
        for impl in IMPLS:
            t = time.perf_counter()
            out[impl] = model(ids, cache=model.new_cache(1, seq), attention=impl)
            rate[impl] = seq / (time.perf_counter() - t)
            print(f"  prefill {seq} {impl}: {rate[impl]:.0f} tok/s", file=sys.stderr)
        diff = np.abs(out["flash"] - out["naive"]).max() / np.abs(out["naive"]).max()
        print(f"| {seq:,} | {rate['naive']:.0f} | {rate['flash']:.0f} | {rate['flash'] / rate['naive']:.2f}x | "
              f"{diff:.1e} |")
        del out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="*", default=[1024, 4096, 16384])
    ap.add_argument("--decode", type=int, nargs="*", default=[128, 512, 2048, 8192])
    ap.add_argument("--prefill", type=int, nargs="*", default=[1024, 4096])
    ap.add_argument("--skip-crossover", action="store_true")
    a = ap.parse_args()

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                   if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    print("## Attention\n")
    print(f"machine: {cpu}, {os.cpu_count()} cores, {available_bytes() / 2**30:.0f} GiB free; "
          f"date: {datetime.date.today()}; numpy {np.__version__}, "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}")
    print(f"command: `.venv/bin/python bench/bench_attention.py{' '.join([''] + sys.argv[1:])}`; "
          f"flash tiles block_q={BLOCK_Q}, block_k={BLOCK_K}; FLASH_MIN_LEN={FLASH_MIN_LEN}")
    if a.lengths:
        bench_lengths(a.lengths)
    if not a.skip_crossover:
        bench_crossover()
    if a.decode:
        bench_decode(a.decode)
    if a.prefill:
        bench_prefill(a.prefill)
    print(f"\n(bench wall time {time.perf_counter() - t0:.0f} s; load average before/after: "
          f"{load0:.2f} / {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
