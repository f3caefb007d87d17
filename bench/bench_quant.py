"""Quantized weights on the CPU: llama.cpp, the NumPy reference and the Torch backend on one GGUF file.

Measures, in one run on this machine, on the default model's GGUF (SmolLM2-135M-Instruct, Q4_1
layers and a Q8_0 embedding that is also the LM head):
  - prefill tokens/s over a 128-token prompt and decode tokens/s (greedy, 64 steps, KV cache),
  - each system against its own memory bound: the bytes of weights it reads per decoded token
    (its own format: float32, bfloat16, int8 codes + scales, int4 codes + scales and zeros, the
    file's blocks) over the read bandwidth measured in the same round (bench_cpu.measure_bandwidth),
  - the peak memory of generating with the NumPy reference on weights="gguf" against float32,
    each in a fresh process (resource.getrusage's ru_maxrss), beside the file's size.

Systems:
  llama.cpp               llama-cpp-python (the "bench" extra), the file as it is, all threads
  NumPy float32           npllama.load(path): every tensor dequantized up front
  NumPy "gguf"            npllama.load(path, weights="gguf"): the blocks kept, dequantized a piece at a time
  Torch float32 / bf16    parity.fast.FastDecoder on float weights
  Torch int8 / int4 / gguf  FastDecoder on torch's weight-only kernels (parity.quant), bfloat16
                          activations: on this CPU they are the kernels' fast path (in float32 the
                          same kernels run 10-50x slower, a reference loop)
  --compile adds the Torch int4 row compiled with torch.compile (minutes on 2 cores).

The llama-cpp-python wheel must be built for the CPU; on this project's VM a native build crashed
in decode on an Intel host, and this works on every host it has landed on:
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=ON -DGGML_FMA=ON -DGGML_F16C=ON" \\
        .venv/bin/pip install 'npllama[bench]'          (drop -DGGML_AVX512=ON where lscpu lacks avx512f)

    .venv/bin/python bench/bench_quant.py [--tokens 64] [--repeats 3] [--threads N] [--skip-llama-cpp] [--compile] [--skip-memory]
    .venv/bin/python bench/bench_quant.py --cuda       # on a GPU: the 1B shape, int8 and int4 vs bfloat16

Run it on a quiet machine: two cores shared with another busy process halve every figure.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_cpu import (PROMPT_LEN, cpu_description, decode_bytes, measure_bandwidth, system_numpy,  # noqa: E402
                       system_parity, timed)


def gguf_bytes(path: Path) -> int:
    """Bytes llama.cpp reads per decoded token: every tensor of the file once (the tied Q8_0
    embedding is the LM head, read whole; its lookup row is in it)."""
    import gguf
    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors)


def blocks_bytes(model) -> int:
    """Bytes the NumPy "gguf" model reads per decoded token: the blocks of every matrix, the norms,
    one embedding row's blocks (the tied head's blocks are read whole)."""
    total = model.output.nbytes + model.norm.nbytes
    for layer in model.layers:
        total += sum(a.nbytes for a in vars(layer).values() if hasattr(a, "nbytes"))
    return total


def system_llama_cpp(path: Path, prompt: np.ndarray, n_tokens: int):
    """llama.cpp through llama-cpp-python: eval the prompt, then one token at a time, greedy on its logits."""
    from llama_cpp import Llama
    import torch
    threads = torch.get_num_threads()                 # --threads, as the Torch rows
    llm = Llama(model_path=str(path), n_ctx=PROMPT_LEN + n_tokens + 8, n_batch=PROMPT_LEN, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    import llama_cpp
    ids = [int(t) for t in prompt]
    vocab = llm.n_vocab()

    def last_logits() -> np.ndarray:             # the last evaluated position's logits (llama.cpp's own buffer)
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(vocab,))

    def prefill():
        llm.reset()
        llm.eval(ids)

    def decode():
        prefill()
        t = time.perf_counter()
        for _ in range(n_tokens):
            llm.eval([int(np.argmax(last_logits()))])
        return time.perf_counter() - t

    return prefill, decode, gguf_bytes(path), llama_cpp.__version__


PEAK_SCRIPT = """
import sys
import npllama
from npllama.generate import generate
model = npllama.load(sys.argv[1], progress=False, weights=sys.argv[2])
ids = model.tokenizer.encode("The history of the city of Paris begins ")
for _ in generate(model, ids, 32, stop_ids=()):
    pass
status = open("/proc/self/status").read().split("VmHWM:")[1]
print(int(status.split()[0]) * 1024)
"""


def peak_memory(path: Path, weights: str) -> int:
    """Peak resident bytes of a fresh process that loads the model with these weights and
    generates 32 tokens (the NumPy reference): its VmHWM, the high-water mark of its own memory
    (ru_maxrss would carry the parent's peak over through fork and exec)."""
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path), weights], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    return int(out.stdout.strip().splitlines()[-1])


def cpu_table(args) -> None:
    import npllama
    import torch
    from npllama.weights import default_model_path

    torch.set_num_threads(args.threads)
    path = default_model_path()
    floats = npllama.load(path, progress=False)
    blocks = npllama.load(path, progress=False, weights="gguf")
    prompt = np.array((floats.tokenizer.encode("The history of the city of Paris begins ") * 64)[:PROMPT_LEN])

    systems: dict[str, tuple] = {}
    versions = [f"numpy {np.__version__}", f"torch {torch.__version__}"]
    if not args.skip_llama_cpp:
        pre, dec, nb, version = system_llama_cpp(path, prompt, args.tokens)
        systems[f"llama.cpp (llama-cpp-python {version}), the file's Q4_1 / Q8_0"] = (pre, dec, nb)
        versions.append(f"llama-cpp-python {version}")
    systems["NumPy reference, float32"] = (*system_numpy(floats, prompt, args.tokens), decode_bytes(floats))
    systems["NumPy reference, weights=\"gguf\" (blocks kept)"] = (*system_numpy(blocks, prompt, args.tokens),
                                                                  blocks_bytes(blocks))
    rows = [("float32", "float32", None), ("float32", "bfloat16", None), ("int8", "bfloat16", None),
            ("int4", "bfloat16", None), ("gguf", "bfloat16", None)]
    if args.compile:
        rows.append(("int4", "bfloat16", "default"))
    for weights, dtype, mode in rows:
        source = blocks if weights == "gguf" else floats
        name = f"Torch backend (parity.fast), {weights} weights, {dtype}{', torch.compile' if mode else ''}"
        systems[name] = system_parity(source, prompt, args.tokens, dtype, mode, weights)

    samples = {name: ([], []) for name in systems}
    for prefill, decode, _ in systems.values():                  # warm-up
        prefill()
        decode()
    round_bw = []
    for r in range(args.repeats):
        before = max(measure_bandwidth(repeats=3).values())
        for name, (prefill, decode, _) in systems.items():
            samples[name][0].append(timed(prefill))
            samples[name][1].append(decode())
        round_bw.append((before + max(measure_bandwidth(repeats=3).values())) / 2)
        print(f"(round {r + 1} of {args.repeats} done)", file=sys.stderr)

    flags = "".join(f" --{f.replace('_', '-')}" for f in ("skip_llama_cpp", "compile", "skip_memory")
                    if getattr(args, f))
    print(f"machine: {cpu_description()}, {os.cpu_count()} cores; date: {datetime.date.today()}; "
          f"{', '.join(versions)}")
    print(f"command: .venv/bin/python bench/bench_quant.py --tokens {args.tokens} --repeats {args.repeats} "
          f"--threads {args.threads}{flags}")
    print(f"model: {path.name} ({path.stat().st_size / 1e6:.0f} MB); read bandwidth by round: "
          f"{', '.join(f'{b / 1e9:.1f}' for b in round_bw)} GB/s\n")
    print(f"| system | prefill {PROMPT_LEN} tokens, tok/s | decode, tok/s | bytes / token | its bound, tok/s "
          f"(median round) | decode / its bound: median (range) |")
    print("|---|---|---|---|---|---|")
    decode_rates = {}
    for name, (pre_s, dec_s) in samples.items():
        nb = systems[name][2]
        of_bound = [args.tokens / t / (b / nb) for t, b in zip(dec_s, round_bw)]
        dec = args.tokens / statistics.median(dec_s)
        decode_rates[name] = dec
        print(f"| {name} | {PROMPT_LEN / statistics.median(pre_s):.0f} | {dec:.1f} | {nb / 1e6:.0f} MB | "
              f"{statistics.median(round_bw) / nb:.0f} | {statistics.median(of_bound):.0%} "
              f"({min(of_bound):.0%}-{max(of_bound):.0%}) |")
    llama = next((r for n, r in decode_rates.items() if n.startswith("llama.cpp")), None)
    if llama:
        print()
        for name, dec in decode_rates.items():
            if not name.startswith("llama.cpp"):
                print(f"decode / llama.cpp's: {dec / llama:.2f}x  {name}")

    if not args.skip_memory:
        size = path.stat().st_size
        print(f"\nPeak memory of generating 32 tokens with the NumPy reference (a fresh process each; "
              f"file: {size / 2**20:.0f} MiB):\n")
        print("| weights | peak resident memory | over the file's size |")
        print("|---|---|---|")
        for weights in ("gguf", "float32"):
            peak = peak_memory(path, weights)
            print(f"| {weights} | {peak / 2**20:.0f} MiB | {(peak - size) / 2**20:+.0f} MiB |")


def cuda_table(args) -> None:
    """The 1B shape (Llama 3.2 1B: dim 2048, 16 layers, 32 / 8 heads, hidden 8192, vocab 128256) with
    random weights on CUDA: decode tok/s of bfloat16 weights against int8 and int4, each against its
    bound at the GPU's measured read bandwidth."""
    import torch

    import npllama
    import parity
    from npllama.config import ModelArgs
    from npllama.params import init_params
    from parity.fast import FastDecoder

    args_1b = ModelArgs(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, hidden_dim=8192,
                        max_seq_len=2048, rope_theta=500000.0, tie_word_embeddings=True)
    base = npllama.Transformer(args_1b, init_params(args_1b, std=0.02))
    big = torch.empty(2**30 // 2, dtype=torch.bfloat16, device="cuda")
    big.sum()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        big.sum()
    torch.cuda.synchronize()
    bw = 10 * big.numel() * 2 / (time.perf_counter() - t)
    del big
    print(f"machine: {torch.cuda.get_device_name()}; date: {datetime.date.today()}; torch {torch.__version__}")
    print(f"command: .venv/bin/python bench/bench_quant.py --cuda --tokens {args.tokens}")
    print(f"shape: Llama 3.2 1B (random weights); read bandwidth (bfloat16 sum over 1 GiB): {bw / 1e9:.0f} GB/s\n")
    print("| weights | decode, tok/s (compiled, CUDA graphs) | bytes / token | its bound, tok/s | decode / bound |")
    print("|---|---|---|---|---|")
    prompt = list(range(1, PROMPT_LEN + 1))
    for weights in ("float32", "int8", "int4"):
        model = parity.from_numpy(base, device="cuda", dtype="bfloat16", weights=weights)
        decoder = FastDecoder(model, 1, PROMPT_LEN + args.tokens + 1, compile="reduce-overhead")
        del model
        decoder.generate([prompt], args.tokens, stop_ids=())              # compile and warm up
        best = float("inf")
        for _ in range(args.repeats):
            chunks = decoder.stream([prompt], args.tokens + 1, stop_ids=(), sync_every=args.tokens)
            next(chunks)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in chunks:
                pass
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        nb = decoder.weights.decode_bytes()
        rate = args.tokens / best
        label = "bfloat16" if weights == "float32" else f"{weights} (bfloat16 activations)"
        print(f"| {label} | {rate:.0f} | {nb / 1e6:.0f} MB | {bw / nb:.0f} | {rate / (bw / nb):.0%} |")
        del decoder
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64, help="decode steps per measurement")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds (medians are reported)")
    ap.add_argument("--skip-llama-cpp", action="store_true", help="without the llama.cpp row (no bench extra)")
    ap.add_argument("--compile", action="store_true", help="add the Torch int4 row compiled with torch.compile")
    ap.add_argument("--skip-memory", action="store_true", help="no peak-memory table")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="threads for torch and llama.cpp (default: every core)")
    ap.add_argument("--cuda", action="store_true", help="the CUDA table on the 1B shape instead of the CPU table")
    args = ap.parse_args()
    if args.cuda:
        cuda_table(args)
    else:
        cpu_table(args)


if __name__ == "__main__":
    main()
