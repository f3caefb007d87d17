"""CPU speed of the default model: NumPy reference vs transformers (vs the Torch backend).

Measures, in one run on this machine, with the same weights (the default GGUF dequantised to
float32 by each library):
  - prefill tokens/s over a 128-token prompt,
  - decode tokens/s (greedy, one token at a time with a KV cache, after that prompt),
  - the memory-bandwidth bound for decode: bytes of weights read per token / measured bandwidth.

    .venv/bin/python bench/bench_cpu.py [--tokens 64] [--repeats 3] [--skip-transformers] [--skip-torch]

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


def measure_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Read bandwidth in bytes/s: the best of several BLAS dot products over a large float32 vector
    (the same kind of streaming read, through the same BLAS and threads, that decode does)."""
    a = np.ones(int(gib * 2**30) // 4, dtype=np.float32)
    np.dot(a, a)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.dot(a, a)
        best = min(best, time.perf_counter() - t)
    return a.nbytes / best


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_numpy(model, prompt, n_tokens, repeats):
    def prefill():
        model(prompt[None], cache=model.new_cache(1))

    prefill()
    t_prefill = timed(prefill, repeats)

    def decode():
        cache = model.new_cache(1)
        logits = model(prompt[None], cache=cache)[0, -1]
        t = time.perf_counter()
        for _ in range(n_tokens):
            logits = model(np.array([[int(np.argmax(logits))]]), cache=cache)[0, -1]
        return time.perf_counter() - t

    decode()
    t_decode = statistics.median(decode() for _ in range(repeats))
    return PROMPT_LEN / t_prefill, n_tokens / t_decode


def bench_transformers(folder, name, prompt, n_tokens, repeats):
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32).eval()
    ids = torch.tensor(prompt[None])

    @torch.inference_mode()
    def prefill():
        model(ids, use_cache=True)

    prefill()
    t_prefill = timed(prefill, repeats)

    @torch.inference_mode()
    def decode():
        out = model(ids, use_cache=True)
        past, logits = out.past_key_values, out.logits[0, -1]
        t = time.perf_counter()
        for _ in range(n_tokens):
            out = model(logits.argmax().view(1, 1), past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[0, -1]
        return time.perf_counter() - t

    decode()
    t_decode = statistics.median(decode() for _ in range(repeats))
    return PROMPT_LEN / t_prefill, n_tokens / t_decode


def bench_parity(np_model, prompt, n_tokens, repeats):
    """The Torch backend's fast path (parity.fast.FastDecoder), float32, eager: q|k|v and w1|w3
    fused, matrices stored (in, out) (MKL's faster layout for a matrix-vector product), a static
    KV cache written in place, argmax on the device, no allocation or host sync per token."""
    import torch
    import parity
    from parity.fast import FastDecoder
    model = parity.from_numpy(np_model, device="cpu", dtype=torch.float32)
    decoder = FastDecoder(model, batch_size=1, max_seq_len=PROMPT_LEN + n_tokens + 1)
    del model                                   # the decoder keeps its own (fused) copy
    ids = prompt.tolist()

    def prefill():
        decoder.prefill([ids])

    prefill()
    t_prefill = timed(prefill, repeats)

    def decode():
        chunks = decoder.stream([ids], n_tokens + 1, stop_ids=(), sync_every=n_tokens)
        next(chunks)                            # prefill and the first token
        t = time.perf_counter()
        for _ in chunks:                        # n_tokens decode steps
            pass
        return time.perf_counter() - t

    decode()
    t_decode = statistics.median(decode() for _ in range(repeats))
    return PROMPT_LEN / t_prefill, n_tokens / t_decode


def decode_bytes(model) -> int:
    """Bytes one decode step must read: every layer's matrices and norms, the final norm, the LM
    head, one embedding row (the KV cache of a short context is negligible and left out)."""
    total = model.output.nbytes + model.norm.nbytes + model.tok_embeddings[0].nbytes
    for layer in model.layers:
        total += sum(a.nbytes for a in layer.values())
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64, help="decode steps per measurement")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--skip-torch", action="store_true")
    args = ap.parse_args()

    import npllama
    from npllama.weights import default_model_path
    path = default_model_path()
    model = npllama.load(path, progress=False)
    prompt = np.array((model.tokenizer.encode("The history of the city of Paris begins ") * 64)[:PROMPT_LEN])

    bw = measure_bandwidth()
    nbytes = decode_bytes(model)
    bound = bw / nbytes
    rows = [("NumPy reference (npllama), float32", *bench_numpy(model, prompt, args.tokens, args.repeats))]
    if not args.skip_torch:
        try:
            import torch
            torch.set_num_threads(os.cpu_count() or 1)
            rows.append(("Torch backend (parity), float32, eager", *bench_parity(model, prompt, args.tokens, args.repeats)))
        except ImportError as e:
            print(f"(Torch backend skipped: {e})", file=sys.stderr)
    if not args.skip_transformers:
        import transformers
        rows.append((f"transformers {transformers.__version__}, float32, eager",
                     *bench_transformers(str(path.parent), path.name, prompt, args.tokens, args.repeats)))

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"date: {datetime.date.today()}; numpy {np.__version__}")
    print(f"command: .venv/bin/python bench/bench_cpu.py --tokens {args.tokens} --repeats {args.repeats}")
    print(f"measured read bandwidth: {bw / 1e9:.1f} GB/s; bytes read per decode token: {nbytes / 1e6:.0f} MB; "
          f"decode bound: {bound:.1f} tok/s\n")
    print("| system | prefill 128 tokens, tok/s | decode, tok/s | decode / bound |")
    print("|---|---|---|---|")
    for name, pre, dec in rows:
        print(f"| {name} | {pre:.0f} | {dec:.1f} | {dec / bound:.0%} |")
    np_dec = rows[0][2]
    for name, _, dec in rows[1:]:
        print(f"\nNumPy decode / {name.split(',')[0]}: {np_dec / dec:.2f}x")


if __name__ == "__main__":
    main()
