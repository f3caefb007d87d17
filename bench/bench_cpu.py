"""CPU speed of the default model: NumPy reference vs transformers vs the Torch backend.

Measures, in one run on this machine, with the same weights (the default GGUF dequantised to
float32 by each library):
  - prefill tokens/s over a 128-token prompt,
  - decode tokens/s (greedy, one token at a time with a KV cache, after that prompt),
  - the memory-bandwidth bound for decode: bytes of weights read per token / measured bandwidth.

The bandwidth is the best of two streaming reads of 1 GiB (far past every cache): a BLAS dot
product (one thread) and a matrix-vector product over a (65536, 4096) float32 matrix (every
thread: the operation decode is made of). The host is shared and its bandwidth drifts by tens of
percent over minutes, so it is read before and after every round of timings, and each system's
decode rate in a round is set against the bound of that same round (the mean of the best read
just before it and the best read just after it); the median over rounds is reported, with the
range, and beside it the stricter ratio to the best bandwidth seen anywhere in the run.

The "matmuls alone" row runs just the model's own matrix-vector products (every weight once, in
the model's memory order, nothing else): what this BLAS reaches on matrices of these sizes, the
floor under the NumPy decode step. Beside the speed-ups over transformers, the largest one any
float32 decoder could reach here: the bound over transformers' own rate. Last, a table of where
the NumPy decode step's time goes, part by part, timed in place (npllama.model's functions
wrapped with a timer for the run).

Torch rows use the backend's fast path (parity.fast.FastDecoder): float32 eager, and bfloat16
weights eager and compiled with torch.compile (inductor; the first call compiles, ~2 minutes on 2
cores, and is not timed). A bfloat16 row reads half the bytes, so its bound is twice as high.

    .venv/bin/python bench/bench_cpu.py [--tokens 64] [--repeats 5] [--skip-transformers] [--skip-torch] [--skip-compile]

Run it on a quiet machine: two cores shared with another busy process halve every figure.
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

PROMPT_LEN = 128


def measure_bandwidth(gib: float = 1.0, repeats: int = 5) -> dict[str, float]:
    """Read bandwidth in bytes/s of two streaming reads over gib GiB of float32, best of repeats:
    a BLAS dot product (one thread) and a matrix-vector product (BLAS's threads)."""
    a = np.ones(int(gib * 2**30) // 4, dtype=np.float32)
    w = a.reshape(-1, 4096)                          # (65536, 4096) for gib = 1
    x = np.ones(w.shape[0], dtype=np.float32)
    out = {}
    for name, fn in (("dot", lambda: np.dot(a, a)), ("gemv", lambda: x @ w)):
        fn()
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t)
        out[name] = a.nbytes / best
    return out


# Each system is a pair of callables: prefill() and decode() -> seconds of its n_tokens decode steps.
# They are all built first, then timed in interleaved rounds (numpy, torch, ..., transformers, numpy,
# ...): on a shared machine the speed drifts by tens of percent over minutes, and interleaving
# makes the drift hit every system alike, so that the ratios of one run hold.

def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def system_matmuls(model, prompt, n_tokens):
    """The decode step's matrix-vector products alone, in the model's order and memory layout."""
    args = model.config
    x = np.ones((1, 1, args.dim), np.float32)
    xo = np.ones((1, 1, args.n_heads * args.head_dim), np.float32)
    xh = np.ones((1, 1, args.hidden_dim), np.float32)

    def step():
        for layer in model.layers:
            x @ layer.wq.T, x @ layer.wk.T, x @ layer.wv.T
            xo @ layer.wo.T
            x @ layer.w1.T, x @ layer.w3.T
            xh @ layer.w2.T
        x @ model.output.T

    def decode():                               # n_tokens steps, timed as the NumPy decode is
        t = time.perf_counter()
        for _ in range(n_tokens):
            step()
        return time.perf_counter() - t

    return None, decode


def system_numpy(model, prompt, n_tokens):
    def prefill():
        model(prompt[None], cache=model.new_cache(1))

    def decode():
        cache = model.new_cache(1)
        logits = model(prompt[None], cache=cache)[0, -1]
        t = time.perf_counter()
        for _ in range(n_tokens):
            logits = model(np.array([[int(np.argmax(logits))]]), cache=cache)[0, -1]
        return time.perf_counter() - t

    return prefill, decode


def system_transformers(folder, name, prompt, n_tokens):
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    ids = torch.tensor(prompt[None])

    @torch.inference_mode()
    def prefill():
        model(ids, use_cache=True)

    @torch.inference_mode()
    def decode():
        out = model(ids, use_cache=True)
        past, logits = out.past_key_values, out.logits[0, -1]
        t = time.perf_counter()
        for _ in range(n_tokens):
            out = model(logits.argmax().view(1, 1), past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[0, -1]
        return time.perf_counter() - t

    return prefill, decode


def system_parity(np_model, prompt, n_tokens, dtype="float32", compile=None, weights="float32"):
    """The Torch backend's fast path (parity.fast.FastDecoder) on the CPU: q|k|v and w1|w3 fused,
    a static KV cache written in place, argmax on the device, no allocation or host sync per token.
    Weights in MKL's faster layout for the dtype (float32: (in, out); bfloat16: (out, in)), or on
    the weight-only kernels (weights "int8", "int4", "gguf": parity.quant)."""
    import parity
    from parity.fast import FastDecoder
    model = parity.from_numpy(np_model, device="cpu", dtype=dtype, weights=weights)
    decoder = FastDecoder(model, batch_size=1, max_seq_len=PROMPT_LEN + n_tokens + 1, compile=compile)
    del model                                   # the decoder keeps its own (fused) copy
    ids = prompt.tolist()

    def prefill():
        decoder.prefill([ids])

    def decode():
        chunks = decoder.stream([ids], n_tokens + 1, stop_ids=(), sync_every=n_tokens)
        next(chunks)                            # prefill and the first token
        t = time.perf_counter()
        for _ in chunks:                        # n_tokens decode steps
            pass
        return time.perf_counter() - t

    t = time.perf_counter()
    decode()                                    # warm-up (compiles, when asked to)
    print(f"(Torch {weights} {dtype} {compile or 'eager'}: first decode run {time.perf_counter() - t:.0f} s)",
          file=sys.stderr)
    return prefill, decode, decoder.weights.decode_bytes()


# The parts of a decode step: npllama.model's functions, timed in place by wrapping them for the
# run (the wrapper costs a clock read per call); "the rest" is what the step spends outside them.
STEP_PARTS = {
    "rms_norm": "RMSNorm (two per layer, and the final one)",
    "wqkv": "the q, k, v products",
    "rotary": "rotary embedding of q and k",
    "cache": "cache write",
    "attention": "attention over the cache (scores, softmax, @ v)",
    "wo": "wo product",
    "feed_forward": "the SwiGLU MLP: gate and up products, SiLU gate, down product",
    "logits": "LM head product",
    "rest": "the rest: id check, rotary table, embedding row, reshapes, residual adds, argmax",
}


def decode_breakdown(model, prompt, n_tokens) -> dict[str, float]:
    """Seconds per decode token spent in each part of the step (STEP_PARTS), measured in place:
    npllama.model's functions are wrapped with a timer for the run and restored afterwards."""
    import npllama.model as spec

    spent = dict.fromkeys(STEP_PARTS, 0.0)
    wqkv = {id(w) for layer in model.layers for w in (layer.wq, layer.wk, layer.wv)}

    def timed(fn, part_of):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            spent[part_of(args)] += time.perf_counter() - t
            return out
        return wrapper

    originals = {name: getattr(spec, name) for name in
                 ("rms_norm", "linear", "apply_rotary_emb", "scaled_dot_product_attention", "feed_forward")}
    parts = {"rms_norm": lambda a: "rms_norm", "linear": lambda a: "wqkv" if id(a[1]) in wqkv else "wo",
             "apply_rotary_emb": lambda a: "rotary", "scaled_dot_product_attention": lambda a: "attention",
             "feed_forward": lambda a: "feed_forward"}
    cache = model.new_cache(1)
    logits = model(prompt[None], cache=cache)[0, -1]
    real_update = cache.update
    cache.update = timed(real_update, lambda a: "cache")
    for name, fn in originals.items():
        setattr(spec, name, timed(fn, parts[name]))
    try:
        head = model.output
        start = time.perf_counter()
        for _ in range(n_tokens):
            logits = model(np.array([[int(np.argmax(logits))]]), cache=cache)[0, -1]
        total = time.perf_counter() - start
    finally:
        for name, fn in originals.items():
            setattr(spec, name, fn)
    # the LM head is one product in Transformer.__call__; time it alone, as the step runs it
    h = np.random.default_rng(0).standard_normal((1, 1, head.shape[0])).astype(model.dtype)
    t = time.perf_counter()
    for _ in range(n_tokens):
        h @ head
    spent["logits"] = time.perf_counter() - t
    spent["rest"] = max(0.0, total - sum(spent.values()))
    return {part: t / n_tokens for part, t in spent.items()}


def cpu_description() -> str:
    """The CPU's model name and widest vector units, from /proc/cpuinfo (the VM lands on different hosts)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    fields = {}                                  # the first CPU's "key : value" lines
    for line in info.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name", platform.machine())
    flags = set(fields.get("flags", "").split())
    units = [u for u, f in (("AVX2", "avx2"), ("AVX-512", "avx512f"), ("AVX512-BF16", "avx512_bf16"),
                            ("AMX", "amx_tile")) if f in flags]
    return f"{name} ({', '.join(units) or 'no AVX2'})"


def decode_bytes(model) -> int:
    """Bytes one decode step must read: every layer's matrices and norms, the final norm, the LM
    head, one embedding row (the KV cache of a short context is negligible and left out)."""
    total = model.output.nbytes + model.norm.nbytes + model.tok_embeddings[0].nbytes
    for layer in model.layers:
        total += sum(a.nbytes for a in vars(layer).values() if isinstance(a, np.ndarray))
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64, help="decode steps per measurement")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds (medians are reported)")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--skip-compile", action="store_true", help="no torch.compile row (saves ~2 minutes)")
    args = ap.parse_args()

    import npllama
    from npllama.weights import default_model_path
    path = default_model_path()
    model = npllama.load(path, progress=False)
    prompt = np.array((model.tokenizer.encode("The history of the city of Paris begins ") * 64)[:PROMPT_LEN])

    bws = measure_bandwidth()
    nbytes = decode_bytes(model)
    # name -> (prefill or None, decode, bytes read per decode token)
    systems = {"NumPy reference (npllama), float32": (*system_numpy(model, prompt, args.tokens), nbytes),
               "NumPy matmuls alone (the BLAS floor of the step above)":
                   (*system_matmuls(model, prompt, args.tokens), nbytes)}
    if not args.skip_torch:
        import torch
        torch.set_num_threads(os.cpu_count() or 1)
        torch_rows = [("float32", None), ("bfloat16", None)] + ([] if args.skip_compile else [("bfloat16", "default")])
        for dtype, mode in torch_rows:
            how = "eager" if mode is None else "torch.compile"
            systems[f"Torch backend (parity.fast), {dtype}, {how}"] = system_parity(model, prompt, args.tokens, dtype, mode)
    if not args.skip_transformers:
        import transformers
        systems[f"transformers {transformers.__version__}, float32, eager"] = (
            *system_transformers(str(path.parent), path.name, prompt, args.tokens), nbytes)

    samples = {name: ([], []) for name in systems}               # prefill seconds, decode seconds
    for name, (prefill, decode, _) in systems.items():           # warm-up
        if prefill is not None:
            prefill()
        decode()
    round_bw = []             # each round's bandwidth: the mean of the best reads just before and just after it
    for r in range(args.repeats):
        bw_before = max(measure_bandwidth(repeats=3).values())
        for name, (prefill, decode, _) in systems.items():
            if prefill is not None:
                samples[name][0].append(timed(prefill))
            samples[name][1].append(decode())
        round_bw.append((bw_before + max(measure_bandwidth(repeats=3).values())) / 2)
        print(f"(round {r + 1} of {args.repeats} done)", file=sys.stderr)
    rows = []
    for name, (pre_s, dec_s) in samples.items():
        pre = PROMPT_LEN / statistics.median(pre_s) if pre_s else None
        nb = systems[name][2]
        # each round's decode rate against the bound of the same round (bandwidth read just before and after it)
        of_bound = [args.tokens / t / (b / nb) for t, b in zip(dec_s, round_bw)]
        rows.append((name, pre, args.tokens / statistics.median(dec_s), nb, statistics.median(of_bound),
                     min(of_bound), max(of_bound)))

    breakdowns = [decode_breakdown(model, prompt, args.tokens) for _ in range(args.repeats)]
    breakdown = {part: statistics.median(b[part] for b in breakdowns) for part in STEP_PARTS}

    # Bandwidth again at the end: on a shared machine it drifts, and the bound is the best seen.
    bws = {k: max(v, bws_end) for (k, v), bws_end in zip(bws.items(), measure_bandwidth().values())}
    bw = max(max(bws.values()), *round_bw)
    try:
        import torch
        versions = f"numpy {np.__version__}, torch {torch.__version__}"
    except ImportError:
        versions = f"numpy {np.__version__}"
    flags = "".join(f" --{f.replace('_', '-')}" for f in ("skip_transformers", "skip_torch", "skip_compile")
                    if getattr(args, f))
    print(f"machine: {cpu_description()}, {os.cpu_count()} cores; "
          f"date: {datetime.date.today()}; {versions}")
    print(f"command: .venv/bin/python bench/bench_cpu.py --tokens {args.tokens} --repeats {args.repeats}{flags}")
    print(f"measured read bandwidth at the start and end: {bws['dot'] / 1e9:.1f} GB/s (dot, one thread), "
          f"{bws['gemv'] / 1e9:.1f} GB/s (matrix-vector, all threads); in each round (the best of both read "
          f"before and after it, averaged): {', '.join(f'{b / 1e9:.1f}' for b in round_bw)} GB/s; best of all: {bw / 1e9:.1f} GB/s")
    print(f"bytes read per decode token: {nbytes / 1e6:.0f} MB float32; decode bound: "
          f"{min(round_bw) / nbytes:.1f}-{max(round_bw) / nbytes:.1f} tok/s by round, {bw / nbytes:.1f} at the best bandwidth\n")
    print("| system | prefill 128 tokens, tok/s | decode, tok/s | bytes / token | decode / its bound, same round: median (range) | decode / bound at the run's best bandwidth |")
    print("|---|---|---|---|---|---|")
    for name, pre, dec, nb, of_bound, lo, hi in rows:
        pre_s = "-" if pre is None else f"{pre:.0f}"
        print(f"| {name} | {pre_s} | {dec:.1f} | {nb / 1e6:.0f} MB | {of_bound:.0%} ({lo:.0%}-{hi:.0%}) | "
              f"{dec / (bw / nb):.0%} |")
    np_dec = rows[0][2]
    print()
    for name, _, dec, nb, of_bound, *_ in rows[2:]:
        print(f"NumPy decode / {name}: {np_dec / dec:.2f}x")
        if name.startswith("transformers"):
            # No decoder that reads these float32 weights once per token can beat the bound, so the bound
            # over transformers' rate is the largest speed-up over it that this machine allows.
            print(f"The most any float32 decoder can reach over {name} on this machine: its bound over its "
                  f"rate, {1 / of_bound:.2f}x in the same rounds ({bw / nb / dec:.2f}x at the run's best bandwidth)")

    total = sum(breakdown.values())
    print(f"\nWhere the NumPy decode step's time goes (npllama.model's functions timed in place, "
          f"median of {args.repeats} runs of {args.tokens} tokens; {total * 1e3:.1f} ms per token with the timers):\n")
    print(f"| part of the step (all {model.config.n_layers} layers together) | ms / token | share |")
    print("|---|---|---|")
    for part, what in STEP_PARTS.items():
        print(f"| {what} | {breakdown[part] * 1e3:.2f} | {breakdown[part] / total:.0%} |")


if __name__ == "__main__":
    main()
