"""GPU speed of the Torch fast path (parity.fast) against transformers, and the decode roofline.

In one run, on whatever GPU is present, for each model and batch size (default: batch 1 and 16,
a 128-token prompt, 256 new tokens, greedy, bfloat16):

  - npllama's Torch fast path: FastDecoder, the decode step compiled with
    torch.compile(mode="reduce-overhead") (one CUDA graph per token), and the same step eager;
  - transformers eager: model.generate with its default (dynamic) cache and sdpa attention;
  - transformers with its static cache and torch.compile: generate(cache_implementation="static"),
    which compiles the decoding forward (mode="reduce-overhead") on a GPU;

prefill tokens/s (prompt tokens of the whole batch over the time to the first token) and decode
tokens/s (new tokens of the whole batch over the time after the first one), and the roofline:
bytes one decode step reads (every weight once, the LM head, and the KV cache at the mean context)
over the bandwidth of a large device-to-device copy measured in the same run.

Models: "1b": Llama 3.2 1B's shape (hidden 2048, 16 layers, 32 heads, 8 kv heads, head_dim 64,
intermediate 8192, vocab 128256, tied, rope llama3 factor 32) with random weights; "default": the
default model (SmolLM2-135M-Instruct) from its GGUF when the file and the gguf package are present,
else its shape with random weights (speed does not depend on the weights' values); "tiny": a small
random model for smoke tests. Both libraries run the *same* weights: the transformers model is
built first and the fast path is built from its state dict.

    python bench/bench_gpu.py                                    # the full run, on a GPU (~8 min on an H100)
    python bench/bench_gpu.py --models 1b --batches 1            # the targets only
    python bench/bench_gpu.py --device cpu --models tiny --new-tokens 16 --prompt-len 32   # smoke test

Every row is printed as soon as it is measured, so a run cut short still reports what it did.

Tensor-parallel rows (parity.tp; on CUDA, or on the CPU when --tp is given): the plain Torch model
(parity.model, eager, not the fast path, which runs on one device) on 1 device without a process
group; at world size 1 through NCCL (the all-reduces after wo and w2 run, over one GPU); and with
the model split over 2 or 3 ranks sharing the one GPU through gloo (NCCL refuses two ranks on one
device, so gloo carries the all-reduces through the host). Each rank builds its own slices with
random weights. Multi-GPU is not measured here.

    python bench/bench_gpu.py --models 1b,default --tp 1,2,3 --systems none   # the TP rows alone
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

T_START = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T_START:6.0f}s] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- models
def llama_32_1b_config():
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                       rms_norm_eps=1e-5, tie_word_embeddings=True, rope_theta=500000.0,
                       rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                       bos_token_id=128000, eos_token_id=128001)


def smollm2_135m_config():
    """SmolLM2-135M-Instruct's shape (its config.json), for when its GGUF cannot be read here."""
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                       rms_norm_eps=1e-5, tie_word_embeddings=True, rope_theta=100000.0,
                       bos_token_id=1, eos_token_id=2)


def tiny_config():
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=2, head_dim=32, max_position_embeddings=2048,
                       rms_norm_eps=1e-5, tie_word_embeddings=False, rope_theta=10000.0)


def random_hf_model(config, device, dtype):
    """LlamaForCausalLM(config) with transformers' own random init, on device, in dtype."""
    from transformers import LlamaForCausalLM
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(device=device, dtype=dtype).eval()


def load_model(name: str, device, dtype):
    """-> (label, transformers model). 'default' reads the GGUF when it can, else its shape at random."""
    if name == "1b":
        return "Llama-3.2-1B shape, random weights", random_hf_model(llama_32_1b_config(), device, dtype)
    if name == "tiny":
        return "tiny Llama, random weights", random_hf_model(tiny_config(), device, dtype)
    if name != "default":
        raise SystemExit(f"unknown model {name!r}; choose from default, 1b, tiny")
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF)
        from npllama.weights import default_model_path
        path = default_model_path(fetch=False)
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
        return "SmolLM2-135M-Instruct (default GGUF)", model.to(device).eval()
    except Exception as e:   # no file, or no gguf package: the same shape with random weights
        log(f"default model: GGUF not usable here ({type(e).__name__}: {e}); random weights of its shape")
        return "SmolLM2-135M shape, random weights", random_hf_model(smollm2_135m_config(), device, dtype)


def fast_weights(hf_model, dtype):
    """The fast path's weights from the transformers model's own tensors (the same values)."""
    import parity
    from npllama.formats.hf import args_from_config, npllama_name
    from parity.fast import FastWeights
    args = args_from_config(hf_model.config.to_dict())
    params = {}
    for hf_name, t in hf_model.state_dict().items():
        name = npllama_name(hf_name)
        if name is not None:
            params[name] = t
    if args.tie_word_embeddings:
        params.pop("output.weight", None)
    model = parity.Transformer(args, params, dtype=dtype, device=hf_model.device)
    weights = FastWeights(model)
    del model, params
    return weights


# ---------------------------------------------------------------------------- timing
def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device, nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """Bytes moved per second (read + written) by a large device-to-device copy."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        best = min(best, time.perf_counter() - t)
    del src, dst
    return 2 * nbytes / best


def bench_fast(weights, prompts, new_tokens, repeats, compile_mode, device):
    """-> (prefill tok/s, decode tok/s, tokens of row 0) for the fast path."""
    from parity.fast import FastDecoder
    batch, plen = len(prompts), len(prompts[0])
    decoder = FastDecoder(weights, batch_size=batch, max_seq_len=plen + new_tokens, compile=compile_mode)

    def run():
        chunks = decoder.stream(prompts, new_tokens, stop_ids=(), sync_every=new_tokens)
        t0 = time.perf_counter()
        first = next(chunks)                        # prefill + first token, synchronised
        t1 = time.perf_counter()
        rest = [c for c in chunks]                  # the decode steps, one sync at the end
        t2 = time.perf_counter()
        row0 = first[0] + sum((c[0] for c in rest), [])
        return t1 - t0, t2 - t1, row0

    t = time.perf_counter()
    for _ in range(3 if compile_mode else 1):       # compile, CUDA graph recording, a replay
        run()
    log(f"  fast path ({compile_mode or 'eager'}) warm-up {time.perf_counter() - t:.0f}s")
    runs = [run() for _ in range(repeats)]
    prefill = statistics.median(r[0] for r in runs)
    decode = statistics.median(r[1] for r in runs)
    del decoder
    return batch * plen / prefill, batch * (new_tokens - 1) / decode, runs[-1][2]


def bench_hf(model, prompts, new_tokens, repeats, static: bool, device):
    """-> (prefill tok/s, decode tok/s, tokens of row 0) for transformers' generate.

    A logits processor marks the first token: it synchronises once, when generate hands it the
    prefill's logits; what follows is the decode loop.
    """
    from transformers import LogitsProcessor, LogitsProcessorList

    class FirstToken(LogitsProcessor):
        def __init__(self):
            self.t = None

        def __call__(self, input_ids, scores):
            if self.t is None:
                synchronize(device)
                self.t = time.perf_counter()
            return scores

    ids = torch.tensor(prompts, device=device)
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0,
                  eos_token_id=None, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    if static:
        kwargs["cache_implementation"] = "static"

    def run(n=new_tokens):
        mark = FirstToken()
        synchronize(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, logits_processor=LogitsProcessorList([mark]),
                                 **{**kwargs, "max_new_tokens": n, "min_new_tokens": n})
        synchronize(device)
        t2 = time.perf_counter()
        return mark.t - t0, t2 - mark.t, out[0, ids.shape[1]:].tolist()

    t = time.perf_counter()
    for _ in range(2 if static else 1):             # static: compile, then record the CUDA graph
        run(new_tokens if static else 8)
    log(f"  transformers ({'static cache' if static else 'eager'}) warm-up {time.perf_counter() - t:.0f}s")
    runs = [run() for _ in range(repeats)]
    prefill = statistics.median(r[0] for r in runs)
    decode = statistics.median(r[1] for r in runs)
    batch, plen = ids.shape
    return batch * plen / prefill, batch * (new_tokens - 1) / decode, runs[-1][2]


# ---------------------------------------------------------------------------- tensor parallel rows
def tp_measure(config: dict, device: str, dtype_name: str, prompt_len: int, new_tokens: int, repeats: int,
               split: bool) -> dict:
    """On every rank: its slices of a random model of this config, prefill and decode timed.

    split False: no process group is used (the single-device peer); else the model is split over
    the group (world size 1: wo and w2 still end in the all-reduce, through NCCL)."""
    import torch.distributed as dist

    from npllama.formats.hf import args_from_config
    from npllama.params import param_shapes
    from parity import tp
    from parity.model import Transformer

    args = args_from_config(config)
    rank, n = (dist.get_rank(), dist.get_world_size()) if split else (0, 1)
    dev, dtype = tp.rank_device(torch.device(device)), getattr(torch, dtype_name)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    torch.manual_seed(rank)
    local = tp.rank_config(args, n)
    params = {name: (torch.ones(s) if name.endswith("norm.weight") else 0.02 * torch.randn(s)).to(dev, dtype)
              for name, s in param_shapes(local).items()}
    if split:
        model = tp.build(args, params, rank=rank, world_size=n, dtype=dtype, device=dev)
        if n == 1:
            tp.row_parallel(model)
    else:
        model = Transformer(args, params, dtype=dtype, device=dev)
    del params
    rng = np.random.default_rng(0)
    prompt = torch.from_numpy(rng.integers(0, args.vocab_size, (1, prompt_len))).to(dev)
    feed = torch.from_numpy(rng.integers(0, args.vocab_size, (new_tokens, 1, 1))).to(dev)

    def run():
        cache = model.new_cache(1, prompt_len + new_tokens + 1)
        synchronize(dev)
        t0 = time.perf_counter()
        with torch.no_grad():
            model(prompt, cache=cache)
            synchronize(dev)
            t1 = time.perf_counter()
            for ids in feed:
                model(ids, cache=cache)
        synchronize(dev)
        return t1 - t0, time.perf_counter() - t1

    run()
    runs = []
    for _ in range(repeats):
        if split:
            dist.barrier()
        runs.append(run())
    prefill = statistics.median(r[0] for r in runs)
    decode = statistics.median(r[1] for r in runs)
    return {"prefill": prompt_len / prefill, "decode": new_tokens / decode,
            "backend": dist.get_backend() if split else "-"}


def tp_rows(model_name: str, device, dtype_name: str, sizes: list[int], prompt_len: int, new_tokens: int,
            repeats: int) -> None:
    """The tensor-parallel rows of one model: one device, then each world size in sizes."""
    from npllama.errors import InputError
    from npllama.formats.hf import args_from_config
    from parity import tp
    from parity.tp import LocalRanks

    config = {"default": smollm2_135m_config, "1b": llama_32_1b_config, "tiny": tiny_config}[model_name]().to_dict()
    args = args_from_config(config)
    label = f"{model_name} shape, random weights"
    cuda = torch.device(device).type == "cuda"
    runs = [("one device, no process group", 1, "gloo", False)]
    for n in sizes:
        backend = "nccl" if cuda and n == 1 else "gloo"
        where = "the one GPU" if cuda else "the CPU"
        runs.append((f"{n} rank{'s' * (n > 1)} ({backend}) on {where}", n, backend, True))
    for title, n, backend, split in runs:
        try:
            tp.check_tp(args, n)
        except InputError as e:
            print(f"| {label} | {title} | refused: {e} | | |", flush=True)
            continue
        log(f"{model_name}: tensor parallel, {title}")
        try:
            with LocalRanks(n, backend=backend, timeout=1200) as ranks:
                r = ranks.run(tp_measure, config, str(device), dtype_name, prompt_len, new_tokens, repeats, split)[0]
        except Exception as e:   # report and go on
            log(f"  failed: {type(e).__name__}: {str(e)[-400:]}")
            print(f"| {label} | {title} | failed | | |", flush=True)
            continue
        print(f"| {label} | {title} | {r['backend']} | {r['prefill']:,.0f} | {r['decode']:,.1f} |", flush=True)


def kv_bytes_per_token(weights) -> int:
    a = weights.config
    return 2 * a.n_layers * a.n_kv_heads * a.head_dim * weights.tok_embeddings.element_size()


def agreement(a: list[int], b: list[int]) -> str:
    n = min(len(a), len(b))
    same = next((i for i in range(n) if a[i] != b[i]), n)
    return f"{same}/{n}"


# ---------------------------------------------------------------------------- main
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", default="1b,default", help="comma-separated: 1b, default, tiny")
    ap.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each compiled system (eager: 1)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--systems", default="fast,fast-eager,hf-eager,hf-static",
                    help="comma-separated: fast (compiled), fast-eager, hf-eager, hf-static")
    ap.add_argument("--compile-mode", default=None,
                    help="torch.compile mode of the fast path (default: reduce-overhead on CUDA, none on CPU)")
    ap.add_argument("--tp", default=None,
                    help="tensor-parallel rows: comma-separated world sizes, e.g. 1,2,3 (default on CUDA: 1,2,3; "
                         "on the CPU: none unless given)")
    ap.add_argument("--no-tune", action="store_true",
                    help="leave inductor's coordinate-descent tuning off (it applies to every compiled system)")
    args = ap.parse_args()

    import transformers
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    cuda = dev.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no CUDA GPU; use --device cpu for a smoke test")
    compile_mode = args.compile_mode or ("reduce-overhead" if cuda else None)
    if compile_mode == "none":
        compile_mode = None
    systems = [] if args.systems == "none" else args.systems.split(",")
    if compile_mode is None and "fast" in systems and "fast-eager" in systems:
        systems.remove("fast-eager")                  # the same thing twice
    if not cuda:
        torch.set_num_threads(os.cpu_count() or 1)
    if not args.no_tune:
        import torch._inductor.config as inductor
        inductor.coordinate_descent_tuning = True      # as gpt-fast: tune each generated kernel's blocks
        inductor.triton.unique_kernel_names = True
    torch.manual_seed(0)

    name = torch.cuda.get_device_name(dev) if cuda else (platform.processor() or platform.machine())
    bw = copy_bandwidth(dev)
    print(f"device: {name}; torch {torch.__version__}; transformers {transformers.__version__}; "
          f"{args.dtype}; date {datetime.date.today()}")
    print(f"command: python bench/bench_gpu.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"device-to-device copy: {bw / 1e9:.0f} GB/s (bytes read + written); prompt {args.prompt_len} "
          f"tokens, {args.new_tokens} new tokens, greedy; fast path compile mode: {compile_mode}\n", flush=True)
    header = ("| model | batch | system | prefill tok/s | decode tok/s | decode / roofline "
              "| vs HF eager | vs HF static+compile | greedy = HF eager (row 0) |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1), flush=True)

    rng = np.random.default_rng(0)
    summary = []
    for model_name in args.models.split(","):
        log(f"building {model_name}")
        label, hf = load_model(model_name, dev, dtype)
        weights = fast_weights(hf, dtype)
        vocab = weights.config.vocab_size
        for batch in (int(b) for b in args.batches.split(",")):
            prompts = rng.integers(0, vocab, (batch, args.prompt_len)).tolist()
            mean_ctx = args.prompt_len + args.new_tokens / 2
            step_bytes = weights.decode_bytes() + batch * kv_bytes_per_token(weights) * mean_ctx
            roofline = batch * bw / step_bytes
            results = {}
            for system in systems:
                log(f"{model_name} batch {batch}: {system}")
                try:
                    if system == "fast":
                        r = bench_fast(weights, prompts, args.new_tokens, args.repeats, compile_mode, dev)
                    elif system == "fast-eager":
                        r = bench_fast(weights, prompts, args.new_tokens, 1, None, dev)
                    elif system == "hf-eager":
                        r = bench_hf(hf, prompts, args.new_tokens, 1, False, dev)
                    elif system == "hf-static":
                        r = bench_hf(hf, prompts, args.new_tokens, max(1, args.repeats - 1), True, dev)
                    else:
                        raise SystemExit(f"unknown system {system!r}")
                except SystemExit:
                    raise
                except Exception as e:   # report and go on: one system's failure is a finding, not the end
                    log(f"  {system} failed: {type(e).__name__}: {e}")
                    r = None
                results[system] = r
                if system in ("fast", "hf-static"):
                    torch._dynamo.reset()             # drop compiled graphs and their CUDA graph pools
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
            ref_eager = results.get("hf-eager")
            ref_static = results.get("hf-static")
            titles = {"fast": f"npllama fast path, compiled ({compile_mode})" if compile_mode else "npllama fast path",
                      "fast-eager": "npllama fast path, eager", "hf-eager": "transformers eager",
                      "hf-static": "transformers static cache + compile" if cuda else "transformers static cache"}
            for system in systems:
                r = results[system]
                if r is None:
                    print(f"| {label} | {batch} | {titles[system]} | failed | failed | | | | |", flush=True)
                    continue
                pre, dec, toks = r
                vs_e = f"{dec / ref_eager[1]:.2f}x" if ref_eager else "-"
                vs_s = f"{dec / ref_static[1]:.2f}x" if ref_static else "-"
                agree = agreement(toks, ref_eager[2]) if ref_eager and batch == 1 else "-"
                print(f"| {label} | {batch} | {titles[system]} | {pre:,.0f} | {dec:,.1f} | {dec / roofline:.0%} "
                      f"| {vs_e} | {vs_s} | {agree} |", flush=True)
            print(f"|  | {batch} | roofline: {step_bytes / 1e9:.3f} GB per step (weights "
                  f"{weights.decode_bytes() / 1e9:.3f} + KV at {mean_ctx:.0f} tokens) | | {roofline:,.0f} | 100% | | | |",
                  flush=True)
            if model_name == "1b" and batch == 1 and results.get("fast"):
                summary.append((results, roofline))
        del hf, weights
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    sizes = args.tp if args.tp is not None else ("1,2,3" if cuda else "")
    if sizes:
        print("\nTensor parallel (parity.model eager; random weights of each shape; batch 1, "
              f"prompt {args.prompt_len}, {args.new_tokens} new tokens; multi-GPU not measured):\n")
        print("| model | ranks | process group | prefill tok/s | decode tok/s |")
        print("|---|---|---|---|---|", flush=True)
        for model_name in args.models.split(","):
            tp_rows(model_name, dev, args.dtype, [int(n) for n in sizes.split(",")], args.prompt_len,
                    args.new_tokens, args.repeats)

    for results, roofline in summary:
        dec = results["fast"][1]
        print("\nTargets (1B shape, batch 1, decode):")
        for what, ref, want in (("3x transformers eager", results.get("hf-eager"), 3.0),
                                ("1.2x transformers static cache + compile", results.get("hf-static"), 1.2)):
            if ref:
                print(f"  {what}: {dec / ref[1]:.2f}x -> {'PASS' if dec / ref[1] >= want else 'FAIL'}")
        print(f"  50% of the roofline: {dec / roofline:.0%} -> {'PASS' if dec / roofline >= 0.5 else 'FAIL'}")
    log("done")


if __name__ == "__main__":
    main()
