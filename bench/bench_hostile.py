"""Peak memory and time of loading hostile files that amplify work (docs/errors.md, class 3): small
files that used to cost gigabytes or never finish.

Each case is built at full size in a scratch folder, then loaded by ``npllama.load`` in a fresh
child process whose address space is capped (RLIMIT_AS, --cap-gib) and whose time is bounded
(--timeout), so that the code before the fix can be measured without taking the machine down.
The child reports its outcome (a model, or the error's first words), the wall time of the load,
and its peak resident memory (VmHWM) after the imports and after the load. Run it against another
checkout with --tree to compare:

    .venv/bin/python bench/bench_hostile.py                       # this checkout
    .venv/bin/python bench/bench_hostile.py --tree OTHER_CHECKOUT  # e.g. the commit before the fix

The cases (the reported ones, rebuilt; the file sizes are printed):

    gguf-alias      a GGUF whose 5000 tensor entries all point at one Q4_0 block of 2048 x 2048
    pth-views       a .pth whose 3000 tensors view one storage of 2**20 floats (each a shorter slice)
    gguf-strings    5 million empty strings under a metadata key npllama does not read
    pkl-noops-20M   a data.pkl of 20 million no-op opcodes (NONE, POP), stored in the zip
    pkl-noops-8M    8 million no-op opcodes (16 MB), under the 16 MiB cap: the streaming scan itself
    gguf-long-token a 'llama' (SentencePiece) vocabulary with one token of 1.5 million characters
    spm-runs        a 'llama' vocabulary of every run of 'a' up to 2000 characters (2 MB): each run splits
                    into two shorter runs in every way, so the merges rebuilt from the scores cost
                    sum(len**2) = 2.7e9 characters
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = r"""
import json, resource, sys, time
cap = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

def peak_kib():   # VmHWM: this process's peak RSS (ru_maxrss would include the parent's before exec)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))

import numpy as np
import npllama
from npllama.errors import NpllamaError
assert npllama.__file__.startswith(sys.argv[3]), npllama.__file__
before = peak_kib()
start = time.perf_counter()
try:
    model = npllama.load(sys.argv[1], progress=False)
    outcome = "loaded"
except NpllamaError as e:
    outcome = "refused: " + str(e).split(": ", 1)[-1][:90]
except MemoryError:
    outcome = "MemoryError at the address-space cap"
except Exception as e:
    outcome = f"{type(e).__name__}: {str(e)[:80]}"
seconds = time.perf_counter() - start
print(json.dumps({"outcome": outcome, "seconds": seconds, "rss_before_mib": before / 1024,
                  "rss_peak_mib": peak_kib() / 1024}))
"""


# ---------------------------------------------------------------------------------------- files
def gguf_string(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


def gguf_file(kv: list[tuple[str, int, bytes]], tensors: list[tuple[str, list[int], int, int]], data: bytes) -> bytes:
    """GGUF v3: kv as (key, type, encoded value); tensors as (name, dims, type, offset)."""
    out = [b"GGUF", struct.pack("<IQQ", 3, len(tensors), len(kv))]
    for key, kind, value in kv:
        out += [gguf_string(key.encode()), struct.pack("<I", kind), value]
    for name, dims, kind, offset in tensors:
        out += [gguf_string(name.encode()), struct.pack("<I", len(dims)), struct.pack(f"<{len(dims)}Q", *dims),
                struct.pack("<IQ", kind, offset)]
    head = b"".join(out)
    return head + b"\0" * (-len(head) % 32) + data


def llama_kv(vocab: int = 256, dim: int = 64, layers: int = 1) -> list:
    u32 = lambda v: struct.pack("<I", v)      # noqa: E731
    f32 = lambda v: struct.pack("<f", v)      # noqa: E731
    return [("general.architecture", 8, gguf_string(b"llama")), ("llama.block_count", 4, u32(layers)),
            ("llama.context_length", 4, u32(128)), ("llama.embedding_length", 4, u32(dim)),
            ("llama.feed_forward_length", 4, u32(128)), ("llama.attention.head_count", 4, u32(4)),
            ("llama.attention.layer_norm_rms_epsilon", 6, f32(1e-5)), ("llama.vocab_size", 4, u32(vocab))]


def small_gguf_tensors(dim: int = 64, vocab: int = 256) -> tuple[list, bytes]:
    """A whole one-layer model in F32 (random weights), as GGUF tensor entries and data."""
    from npllama.config import ModelArgs
    from npllama.formats.names import rename
    from npllama.params import init_params

    args = ModelArgs(dim=dim, n_layers=1, n_heads=4, n_kv_heads=4, vocab_size=vocab, hidden_dim=128, max_seq_len=128)
    entries, parts, offset = [], [], 0
    for name, array in init_params(args, seed=0).items():
        raw = np.ascontiguousarray(array, dtype=np.float32).tobytes()
        entries.append((rename(name, "meta", "gguf"), list(reversed(array.shape)), 0, offset))
        parts.append(raw + b"\0" * (-len(raw) % 32))
        offset += len(parts[-1])
    return entries, b"".join(parts)


def case_gguf_alias(folder: Path) -> Path:
    kinds = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    block = np.random.default_rng(0).integers(0, 255, 18 * (2048 * 2048 // 32), dtype=np.uint8).tobytes()  # Q4_0
    entries = [(f"blk.{i // 9}.{kinds[i % 9]}.weight", [2048, 2048], 2, 0) for i in range(5000)]
    entries += [("token_embd.weight", [2048, 2048], 2, 0)]
    path = folder / "alias.gguf"
    path.write_bytes(gguf_file(llama_kv(dim=2048, vocab=2048), entries, block))
    return path


def case_pth_views(folder: Path) -> Path:
    import torch

    out = folder / "views"
    out.mkdir(exist_ok=True)
    base = torch.zeros(1 << 20)
    torch.save({f"layers.{i}.attention_norm.weight": base[i:] for i in range(3000)}, out / "consolidated.00.pth")
    (out / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 1, "n_heads": 4, "vocab_size": 256,
                                                 "multiple_of": 32, "norm_eps": 1e-5}))
    return out


def case_gguf_strings(folder: Path) -> Path:
    entries, data = small_gguf_tensors()
    n = 5_000_000
    kv = llama_kv() + [("hostile.unused.strings", 9, struct.pack("<IQ", 8, n) + bytes(8 * n))]
    path = folder / "strings.gguf"
    path.write_bytes(gguf_file(kv, entries, data))
    return path


def case_pkl_noops(folder: Path, pairs: int, name: str) -> Path:
    import torch

    out = folder / name
    out.mkdir(exist_ok=True)
    torch.save({"w": torch.zeros(4)}, out / "consolidated.00.pth")
    with zipfile.ZipFile(out / "consolidated.00.pth") as z:
        entries = [(i.filename, z.read(i)) for i in z.infolist()]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for member, content in entries:
            if member.endswith("/data.pkl"):
                content = content[:2] + b"N0" * pairs + content[2:]
            z.writestr(member, content)
    (out / "consolidated.00.pth").write_bytes(buf.getvalue())
    (out / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 1, "n_heads": 4, "vocab_size": 256,
                                                 "multiple_of": 32, "norm_eps": 1e-5}))
    return out


def case_gguf_long_token(folder: Path) -> Path:
    entries, data = small_gguf_tensors()
    tokens = [b"<unk>", b"<s>", b"</s>"] + [bytes([c]) for c in range(97, 97 + 26)] + [b"a" * 1_500_000]
    tokens += [f"t{i}".encode() for i in range(256 - len(tokens))]
    strings = struct.pack("<IQ", 8, len(tokens)) + b"".join(gguf_string(t) for t in tokens)
    scores = struct.pack("<IQ", 6, len(tokens)) + struct.pack(f"<{len(tokens)}f", *[-1.0] * len(tokens))
    kv = llama_kv() + [("tokenizer.ggml.model", 8, gguf_string(b"llama")), ("tokenizer.ggml.tokens", 9, strings),
                       ("tokenizer.ggml.scores", 9, scores)]
    path = folder / "longtoken.gguf"
    path.write_bytes(gguf_file(kv, entries, data))
    return path


def case_spm_runs(folder: Path, longest: int = 2000) -> Path:
    entries, data = small_gguf_tensors()
    tokens = [b"<unk>", b"<s>", b"</s>"] + [b"a" * k for k in range(1, longest + 1)]
    strings = struct.pack("<IQ", 8, len(tokens)) + b"".join(gguf_string(t) for t in tokens)
    scores = struct.pack("<IQ", 6, len(tokens)) + struct.pack(f"<{len(tokens)}f", *[-float(len(t)) for t in tokens])
    kv = llama_kv() + [("tokenizer.ggml.model", 8, gguf_string(b"llama")), ("tokenizer.ggml.tokens", 9, strings),
                       ("tokenizer.ggml.scores", 9, scores)]
    path = folder / "runs.gguf"
    path.write_bytes(gguf_file(kv, entries, data))
    return path


CASES = {
    "gguf-alias": case_gguf_alias,
    "pth-views": case_pth_views,
    "gguf-strings": case_gguf_strings,
    "pkl-noops-20M": lambda f: case_pkl_noops(f, 10_000_000, "noops20"),
    "pkl-noops-8M": lambda f: case_pkl_noops(f, 4_000_000, "noops8"),
    "gguf-long-token": case_gguf_long_token,
    "spm-runs": case_spm_runs,
}


def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def measure(path: Path, tree: Path, cap: int, timeout: float) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree), OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    try:
        out = subprocess.run([sys.executable, "-c", CHILD, str(path), str(cap), str(tree.resolve())], capture_output=True, text=True,
                             timeout=timeout, env=env, cwd=path.parent)   # not this checkout's folder: --tree wins
    except subprocess.TimeoutExpired:
        return {"outcome": f"still running after {timeout:.0f} s (killed)", "seconds": timeout}
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if not lines:
        last = out.stderr.strip().splitlines()[-1:] or [""]
        return {"outcome": f"died (exit status {out.returncode}: {last[0][:80]})", "seconds": float("nan")}
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tree", type=Path, default=ROOT, help="the checkout whose npllama loads the files")
    parser.add_argument("--cap-gib", type=float, default=4.0, help="address-space cap of each load")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before a load is killed")
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    a = parser.parse_args()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {cpu}, loads by "
          f"{'this checkout' if a.tree.resolve() == ROOT else a.tree.name}, cap {a.cap_gib:g} GiB, timeout {a.timeout:g} s")
    print("| case | file | outcome | time | peak RSS (after imports) |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="npllama-hostile-") as tmp:
        for name in a.cases:
            path = CASES[name](Path(tmp))
            r = measure(path, a.tree, int(a.cap_gib * (1 << 30)), a.timeout)
            peak = f"{r['rss_peak_mib']:.0f} MiB ({r['rss_before_mib']:.0f} MiB)" if "rss_peak_mib" in r else "-"
            seconds = "-" if r["seconds"] != r["seconds"] else f"{r['seconds']:.2f} s"
            print(f"| {name} | {size_of(path) / 1e6:.1f} MB | {r['outcome']} | {seconds} | {peak} |", flush=True)


if __name__ == "__main__":
    main()
