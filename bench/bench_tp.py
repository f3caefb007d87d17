"""Tensor parallelism on the CPU: one process against the model split over 2 or 3 (gloo).

On a machine of 2 cores this measures what the split costs, not what it gains: 3 ranks share 2
cores, and each all-reduce is a round trip through the kernel's loopback sockets. What it shows:
the split runs (the same logits as one process, within TENSOR_PARALLEL_RTOL), what each rank
holds, and what the all-reduces cost per token.

Configurations, each in its own set of worker processes (parity.tp.LocalRanks), in this order:

  - tp=1, one process with all the cores, and with one core (the per-core peer of a rank);
  - the default model (SmolLM2-135M-Instruct: 9 query heads, 3 key/value heads) on 3 ranks;
    tp=2 does not split it (the refusal is printed);
  - a random model of the default's size with 8 query heads and 2 key/value heads ("even"), so
    that tp=2 has a row: tp=1 and tp=2.

For each: prefill of a PROMPT-token prompt (ms), decode (ms per token, a KV cache, batch 1),
and the all-reduces alone in the same process group (2 per layer: after wo and after w2),
timed on the decode shape (1, 1, dim) and the prefill shape (1, PROMPT, dim), with their share
of the decode step; and one all-reduce done the DTensor way (Partial -> Replicate, what
RowwiseParallel does) against torch.distributed.all_reduce. Each rank loads from a
safetensors copy of the weights (only its slices); the load from the GGUF file (read whole by
every rank) is timed separately. Medians of --repeats rounds.

    .venv/bin/python bench/bench_tp.py                  # ~5 min on 2 cores
    .venv/bin/python bench/bench_tp.py --quick          # smoke test (tiny model)
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cpu_name() -> str:
    """lscpu's model name (the VM lands on different hosts)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    import platform
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------- what each rank runs
def measure(folder: str, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    """On every rank of the group: load, then time prefill, decode and the all-reduces alone."""
    import torch.distributed as dist

    import parity

    split = dist.is_initialized() and dist.get_world_size() > 1
    t = time.perf_counter()
    model = parity.load(folder, tp=dist.get_world_size(), progress=False) if split else parity.load(folder, progress=False)
    load_s = time.perf_counter() - t
    args = model.parallel.whole if split else model.config
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, args.vocab_size, (1, prompt_len))
    feed = rng.integers(0, args.vocab_size, (new_tokens, 1, 1))

    def prefill():
        cache = model.new_cache(1, prompt_len + new_tokens + 1)
        with torch.no_grad():
            return model(prompt, cache=cache), cache

    def decode(cache):
        with torch.no_grad():
            for ids in feed:
                model(ids, cache=cache)

    logits, _ = prefill()                                   # warm-up, and the logits to compare
    prefill_ms, decode_ms = [], []
    for _ in range(repeats):
        if split:
            dist.barrier()
        t = time.perf_counter()
        _, cache = prefill()
        prefill_ms.append(1e3 * (time.perf_counter() - t))
        if split:
            dist.barrier()
        t = time.perf_counter()
        decode(cache)
        decode_ms.append(1e3 * (time.perf_counter() - t) / new_tokens)
    out = {"load_s": load_s, "prefill_ms": statistics.median(prefill_ms),
           "decode_ms": statistics.median(decode_ms), "logits": logits[0, -1].numpy(),
           "param_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
           "kv_heads": model.config.n_kv_heads, "hidden": model.config.hidden_dim}
    if split:
        calls = 2 * args.n_layers
        for shape, key in (((1, 1, args.dim), "reduce_decode_ms"), ((1, prompt_len, args.dim), "reduce_prefill_ms")):
            y = torch.randn(shape)
            times = []
            for _ in range(repeats):
                dist.barrier()
                t = time.perf_counter()
                for _ in range(calls):
                    dist.all_reduce(y)
                times.append(1e3 * (time.perf_counter() - t))
            out[key] = statistics.median(times)
        out["reduce_us"] = 1e3 * out["reduce_decode_ms"] / calls
        out["dtensor_us"] = dtensor_reduce_us(args.dim, 200)
    return out


def dtensor_reduce_us(dim: int, calls: int) -> float:
    """One (1, 1, dim) partial sum made whole the DTensor way, RowwiseParallel's output step."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    y = torch.randn(1, 1, dim)
    for _ in range(10):
        DTensor.from_local(y, mesh, [Partial()], run_check=False).redistribute(mesh, [Replicate()]).to_local()
    dist.barrier()
    t = time.perf_counter()
    for _ in range(calls):
        DTensor.from_local(y, mesh, [Partial()], run_check=False).redistribute(mesh, [Replicate()]).to_local()
    return 1e6 * (time.perf_counter() - t) / calls


def load_gguf(n: int) -> float:
    """Seconds for this rank to load its part of the default GGUF (read whole, then sliced)."""
    import torch.distributed as dist

    import parity
    dist.barrier()
    t = time.perf_counter()
    parity.load(None, tp=n, progress=False)
    return time.perf_counter() - t


# ---------------------------------------------------------------------------- the run
def run(label: str, folder: str, n: int, threads: int, a) -> dict:
    from parity.tp import LocalRanks
    log(f"{label}: {n} process{'es' * (n > 1)}, {threads} thread{'s' * (threads > 1)} each")
    with LocalRanks(n, threads=threads, timeout=1800) as ranks:
        results = ranks.run(measure, folder, a.prompt_len, a.new_tokens, a.repeats)
        gguf = ranks.run(load_gguf, n) if a.gguf and n > 1 and label.startswith("default") else None
    r = results[0]
    r["label"], r["n"], r["threads"] = label, n, threads
    r["load_gguf_s"] = max(gguf) if gguf else None
    r["load_s"] = max(x["load_s"] for x in results)
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="a tiny random model, 2 repeats: a smoke test")
    a = ap.parse_args()
    a.gguf = not a.quick
    command = "bench/bench_tp.py " + " ".join(sys.argv[1:])
    import npllama
    from npllama.config import ModelArgs
    from npllama.formats.hf import save_checkpoint
    from npllama.params import init_params
    from npllama.tolerances import TENSOR_PARALLEL_RTOL
    from parity import tp

    cores = os.cpu_count() or 1
    print(f"machine: {cpu_name()}, {cores} cores; date: {datetime.date.today()}; torch {torch.__version__}; "
          f"load average at the start {os.getloadavg()[0]:.1f}")
    print(f"command: .venv/bin/python {command}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-tp-") as tmp:
        if a.quick:
            a.repeats, a.new_tokens, a.prompt_len = 2, 4, 8
            odd = ModelArgs(dim=48, n_layers=2, n_heads=6, n_kv_heads=3, vocab_size=64, hidden_dim=96, head_dim=8)
            params = init_params(odd, seed=0)
        else:
            base = npllama.load(progress=False)
            odd, params = base.config, base.state_dict()
        default = str(save_checkpoint(Path(tmp) / "default", odd, params))
        even_args = odd.replace(n_heads=8, n_kv_heads=2, head_dim=64 if not a.quick else 8)
        even = str(save_checkpoint(Path(tmp) / "even", even_args, init_params(even_args, seed=0)))
        del params
        try:
            tp.check_tp(odd, 2, "the default model")
        except npllama.InputError as e:
            print(f"tp=2: refused: {e}")
        print(f"prompt {a.prompt_len} tokens, {a.new_tokens} decode steps, medians of {a.repeats} rounds")
        print()
        print("| model, ranks | threads per rank | weights per rank | kv heads / hidden per rank | load (s) | "
              "prefill (ms) | decode (ms/token) | all-reduces per token (ms) | their share of decode | "
              "all-reduces per prefill (ms) | logits vs tp=1 (rel) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
        first = {}
        for label, folder, n, threads in (("default, tp=1", default, 1, cores), ("default, tp=1, 1 core", default, 1, 1),
                                          ("default, tp=3", default, 3, 1), ("even, tp=1", even, 1, cores),
                                          ("even, tp=1, 1 core", even, 1, 1), ("even, tp=2", even, 2, 1)):
            r = run(label, folder, n, threads, a)
            rows.append(r)
            ref = first.setdefault(label.split(",")[0], r)["logits"]
            rel = float(np.abs(r["logits"] - ref).max() / np.abs(ref).max())
            reduce = r.get("reduce_decode_ms")
            load = f"{r['load_s']:.1f}" + (f" ({r['load_gguf_s']:.1f} from the GGUF)" if r.get("load_gguf_s") else "")
            share = "-" if reduce is None else f"{100 * reduce / r['decode_ms']:.0f}%"
            per_token = "-" if reduce is None else f"{reduce:.2f}"
            per_prefill = "-" if reduce is None else f"{r['reduce_prefill_ms']:.2f}"
            print(f"| {label} | {threads} | {r['param_mib']:.0f} MiB | {r['kv_heads']} / {r['hidden']} | "
                  f"{load} | {r['prefill_ms']:.1f} | {r['decode_ms']:.2f} | {per_token} | {share} | {per_prefill} | "
                  f"{rel:.1e} |", flush=True)
            assert rel <= TENSOR_PARALLEL_RTOL[np.dtype(np.float32)], f"{label}: logits differ by {rel:.1e}"
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")
    print()
    for r in rows:
        if "reduce_us" in r:
            print(f"{r['label']}: one all-reduce of (1, 1, dim): torch.distributed.all_reduce {r['reduce_us']:.0f} us, "
                  f"DTensor Partial -> Replicate {r['dtensor_us']:.0f} us")


if __name__ == "__main__":
    main()
