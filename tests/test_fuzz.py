"""Fuzzing the loaders: a mutated real checkpoint loads, or fails with an NpllamaError.

Each test starts from a small real checkpoint written by tests/tiny.py -- a Hugging Face folder
(config.json + model.safetensors), a Meta folder (params.json + a torch.save .pth) and a GGUF
file -- and Hypothesis mutates it:

* bytes: flips, overwrites, truncation, deleted or inserted runs (biased towards the header);
* header fields a loader trusts, rewritten with hostile values: the safetensors header length,
  dtypes, shapes and data_offsets; every GGUF count, length, value type, tensor dimension, tensor
  type and data offset; the integers, names, globals and memo indices inside the .pth pickle,
  its storage entries, and the sizes and offsets in its zip headers; the model options,
  vocabulary, merges and added tokens of tokenizer.json; values of config.json,
  generation_config.json, tokenizer_config.json and params.json.

Loading runs in a worker process bounded in time (TIMEOUT_S per checkpoint) and memory
(RLIMIT_AS: HEADROOM bytes above what loading the pristine checkpoints needed, where the
checkpoints are ~60 kB), so a hang, a runaway allocation or a dying interpreter is a failing
example, not a lost test run. Every mutated checkpoint must end in one of two ways:

* a model, which also computes the logits of one token and encodes and decodes a text, or
* an NpllamaError whose message names the checkpoint (and does not hide a MemoryError).

Anything else (another exception, a hang, a dead worker) fails with the worker's traceback.
Hypothesis runs derandomized with a fixed number of examples and no shrinking, so CI runs the same
examples every time in a bounded time (about 40 s of worker time). To look further, locally:

    NPLLAMA_FUZZ_EXPLORE=1 NPLLAMA_FUZZ_EXAMPLES=2000 NPLLAMA_FUZZ_LOG=/tmp/fuzz.jsonl \
        python -m pytest tests/test_fuzz.py -n 2

(fresh random examples, shrinking on, every outcome logged).
"""

from __future__ import annotations

import io
import json
import os
import pickletools
import queue
import shutil
import struct
import subprocess
import sys
import threading
import warnings
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 20.0            # per checkpoint; a pristine one loads in ~20 ms
HEADROOM = 384 << 20        # bytes of address space beyond the warm worker's
EXAMPLES = int(os.environ.get("NPLLAMA_FUZZ_EXAMPLES", "200"))   # per fuzz test (there are 8)
EXPLORE = os.environ.get("NPLLAMA_FUZZ_EXPLORE") == "1"   # fresh random examples (locally); CI is derandomized
LOG = os.environ.get("NPLLAMA_FUZZ_LOG")                   # append every outcome to this file (JSON lines)

# No shrinking in CI: each example is already one described edit, and shrinking an example that hangs
# would cost TIMEOUT_S per attempt; the run stays bounded by EXAMPLES x (load time or TIMEOUT_S).
FUZZ = settings(max_examples=EXAMPLES, derandomize=not EXPLORE, database=None, deadline=None,
                phases=list(Phase) if EXPLORE else [Phase.explicit, Phase.generate],
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])

# ----------------------------------------------------------------------------------- the worker
WORKER = r"""
import json, os, resource, sys, traceback

import npllama
from npllama.errors import NpllamaError


def vm_size():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def attempt(path):
    try:
        model = npllama.load(path, progress=False)
        logits = model([[0]])
        assert logits.shape == (1, 1, model.config.vocab_size), logits.shape
        if model.tokenizer is not None:   # the tokenizer that came with it works too
            ids = model.tokenizer.encode("Hello, world 12 <|im_end|> é")
            model.tokenizer.decode(ids)
        return {"outcome": "model"}
    except NpllamaError as e:
        return {"outcome": "npllama", "type": type(e).__name__, "message": str(e)[:4000]}
    except BaseException as e:   # BaseException: tokenizers' PanicException is not an Exception
        return {"outcome": "crash", "type": type(e).__name__, "message": str(e)[:2000],
                "traceback": traceback.format_exc()[-8000:]}


warm = [attempt(p) for p in json.loads(sys.argv[1])]   # imports, lazy set-up, first allocations
if any(w["outcome"] != "model" for w in warm):
    print(json.dumps({"ready": False, "warm": warm}), flush=True)
    sys.exit(1)
headroom = int(sys.argv[2])
if hasattr(resource, "RLIMIT_AS") and vm_size():
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = vm_size() + headroom
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    request = json.loads(line)
    if isinstance(request, dict):   # {"allocate": n}: show that the memory limit bites
        try:
            bytearray(request["allocate"])
            print(json.dumps({"outcome": "allocated"}), flush=True)
        except MemoryError:
            print(json.dumps({"outcome": "MemoryError"}), flush=True)
        continue
    print(json.dumps(attempt(request)), flush=True)
"""


class Worker:
    """A process that loads checkpoints on request, restarted after a hang or a death."""

    def __init__(self, pristine: list[Path], tmp: Path):
        self.pristine, self.tmp = [str(p) for p in pristine], tmp
        self.proc = None

    def _start(self) -> None:
        env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   RAYON_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", MALLOC_ARENA_MAX="2",
                   PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        self.stderr = open(self.tmp / "worker.stderr", "w+b")
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(self.pristine), str(HEADROOM)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     text=True, bufsize=1, cwd=self.tmp, env=env)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, args=(self.proc, self.lines), daemon=True).start()
        ready = self._reply(120.0)
        assert ready is not None and ready.get("ready"), f"the fuzz worker did not start: {ready} {self._stderr()}"

    @staticmethod
    def _pump(proc, lines):
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    def _reply(self, timeout: float):
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            return "timeout"
        return None if line is None else json.loads(line)

    def _stderr(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()[-4000:].decode("utf-8", "replace")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc.stdout.close()
            self.proc.stdin.close()
            self.stderr.close()
            self.proc = None

    def load(self, path: Path | dict) -> dict:
        if self.proc is None:
            self._start()
        self.proc.stdin.write(json.dumps(path if isinstance(path, dict) else str(path)) + "\n")
        self.proc.stdin.flush()
        reply = self._reply(TIMEOUT_S)
        if reply == "timeout":
            self.stop()
            return {"outcome": "hang", "message": f"no answer within {TIMEOUT_S} s"}
        if reply is None:
            self.proc.wait()
            err = self._stderr()
            code = self.proc.returncode
            self.stop()
            return {"outcome": "died", "message": f"exit status {code}", "traceback": err}
        return reply


def check(result: dict, name: str) -> None:
    """A model, or an NpllamaError naming the checkpoint that is not a disguised MemoryError."""
    if LOG:
        with open(LOG, "a") as f:
            f.write(json.dumps({"test": name, **result}) + "\n")
    if result["outcome"] == "model":
        return
    detail = f"{result['outcome']}: {result.get('type')}: {result.get('message')}\n{result.get('traceback', '')}"
    assert result["outcome"] == "npllama", detail
    message = result["message"]
    assert "MemoryError" not in message and "Unable to allocate" not in message, \
        f"the loader tried to allocate far more memory than the file holds: {detail}"
    assert name in message, f"the message does not name the checkpoint {name!r}: {detail}"


# ----------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """One tiny model (GQA, 1 layer) saved in the three formats."""
    from tiny import gguf_vocab_from_bpe, random_llama, save_gguf, save_hf, save_meta, tiny_config, train_bpe

    root = tmp_path_factory.mktemp("pristine")
    cfg = tiny_config(vocab_size=300, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=42, max_seq_len=32)
    model = random_llama(cfg, seed=3)
    tok = train_bpe(300)
    save_hf(model, root / "hf", tokenizer=tok)
    save_gguf(model, root / "tiny.gguf", vocab=gguf_vocab_from_bpe(tok))
    save_meta(model, root / "meta", sp_model=None, multiple_of=2, write_vocab_size=True)
    return {"hf": root / "hf", "gguf": root / "tiny.gguf", "meta": root / "meta"}


@pytest.fixture(scope="module")
def worker(pristine, tmp_path_factory):
    w = Worker(list(pristine.values()), tmp_path_factory.mktemp("worker"))
    yield w
    w.stop()


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, pristine):
    """Per-format working copies that each example overwrites (names the messages must carry)."""
    root = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(pristine["hf"], root / "fuzzhf")
    shutil.copytree(pristine["meta"], root / "fuzzmeta")
    return root


# ----------------------------------------------------------------------------------- mutations
class Mutant(bytes):
    """Mutated file contents that show, in a failure report, what was done rather than 60 kB of bytes."""

    def __new__(cls, data: bytes, what: str):
        self = super().__new__(cls, data)
        self.what = what
        return self

    def __repr__(self) -> str:
        return f"<{len(self)} bytes: {self.what}>"


def interesting_uint(width: int, original: int | None = None) -> st.SearchStrategy[int]:
    top = (1 << (8 * width)) - 1
    values = [0, 1, 2, 3, 7, 8, 255, 256, 1 << 16, (1 << 31) - 1, 1 << 31, 1 << 32, 1 << 40, 1 << 62,
              1 << 63, top, top - 1]
    if original is not None:
        values += [original + 1, original - 1, original * 2, original // 2, original + 8, original * 1000]
    values = sorted({v for v in values if 0 <= v <= top})
    return st.one_of(st.sampled_from(values), st.integers(0, min(top, 1 << 16)), st.integers(0, top))


@st.composite
def byte_edit(draw, data: bytes, hot: int) -> Mutant:
    """One byte-level edit; positions mostly in the first ``hot`` bytes (the header)."""
    n = len(data)
    pos = draw(st.one_of(st.integers(0, max(min(hot, n) - 1, 0)), st.integers(0, max(n - 1, 0))))
    kind = draw(st.sampled_from(["flip", "set", "truncate", "delete", "insert", "fill"]))
    b = bytearray(data)
    if kind == "flip" and n:
        bit = draw(st.integers(0, 7))
        b[pos] ^= 1 << bit
        what = f"flip bit {bit} of byte {pos}"
    elif kind == "set" and n:
        b[pos] = draw(st.integers(0, 255))
        what = f"byte {pos} := {b[pos]}"
    elif kind == "truncate":
        del b[pos:]
        what = f"truncate to {pos} bytes"
    elif kind == "delete":
        k = draw(st.integers(1, 64))
        del b[pos:pos + k]
        what = f"delete {k} bytes at {pos}"
    elif kind == "insert":
        extra = draw(st.binary(min_size=1, max_size=32))
        b[pos:pos] = extra
        what = f"insert {extra!r} at {pos}"
    else:
        k, fill = draw(st.integers(1, 16)), draw(st.sampled_from([0x00, 0xFF]))
        b[pos:pos + k] = bytes([fill]) * len(b[pos:pos + k])
        what = f"{k} bytes at {pos} := {fill:#04x}"
    return Mutant(bytes(b), what if n else "empty")


def write_uint(data: bytes, offset: int, width: int, value: int, what: str = "") -> Mutant:
    return Mutant(data[:offset] + value.to_bytes(width, "little") + data[offset + width:],
                  f"{what or 'field'} at byte {offset} ({width} bytes) := {value}")


JSON_VALUES = st.one_of(
    st.none(), st.booleans(),
    st.sampled_from([0, 1, -1, 2, 3, 5, 7, 64, 2 ** 31, 2 ** 63, 10 ** 30, -(10 ** 9), 0.5, 1.5, -0.5,
                     1e308, 1e-320, float("nan"), float("inf"), float("-inf")]),
    st.text(max_size=6), st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.sampled_from(["rope_type", "type", "factor", "rope_theta", "original_max_position_embeddings",
                                     "low_freq_factor", "high_freq_factor", "beta_fast"]),
                    st.one_of(st.sampled_from(["default", "linear", "dynamic", "yarn", "llama3", "longrope",
                                               "bogus", ""]),
                              st.floats(allow_nan=True), st.integers(-2, 10 ** 6)), max_size=4))


@st.composite
def json_edit(draw, text: str) -> str:
    """Set one key of a JSON object to a hostile value, or delete it."""
    obj = json.loads(text)
    keys = sorted(obj) + ["rope_scaling", "rope_parameters", "head_dim", "num_key_value_heads", "n_kv_heads",
                          "chat_template", "ffn_dim_multiplier", "use_scaled_rope", "vocab_size"]
    key = draw(st.sampled_from(keys))
    if draw(st.integers(0, 5)) == 0:
        obj.pop(key, None)
    else:
        obj[key] = draw(JSON_VALUES)
    return json.dumps(obj)


# --- safetensors
def st_header(data: bytes) -> tuple[dict, int]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), n


def st_with_header(header: dict, body: bytes, what: str) -> Mutant:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return Mutant(struct.pack("<Q", len(raw)) + raw + body, what)


SHAPE_DIMS = st.sampled_from([0, 1, 2, 3, 16, 300, -1, 2 ** 31, 2 ** 32, 2 ** 62, 2 ** 63, 2 ** 64, 10 ** 30])


@st.composite
def safetensors_edit(draw, data: bytes) -> Mutant:
    header, n = st_header(data)
    body = data[8 + n:]
    names = sorted(k for k in header if k != "__metadata__")
    kind = draw(st.sampled_from(["bytes", "header-length", "dtype", "shape", "offsets", "entry", "rename"]))
    if kind == "bytes":
        return draw(byte_edit(data, 8 + n))
    if kind == "header-length":
        return write_uint(data, 0, 8, draw(interesting_uint(8, n)), "header length")
    name = draw(st.sampled_from(names))
    entry = header[name]
    if kind == "dtype":
        entry["dtype"] = draw(st.sampled_from(["F32", "F16", "BF16", "F64", "I8", "I32", "I64", "U8", "BOOL",
                                               "F8_E4M3", "Q4_0", "", 4, None]))
        what = f"{name}.dtype := {entry['dtype']!r}"
    elif kind == "shape":
        shape = list(entry["shape"])
        choice = draw(st.integers(0, 3))
        if choice == 0 and shape:
            shape[draw(st.integers(0, len(shape) - 1))] = draw(SHAPE_DIMS)
        elif choice == 1:
            shape = draw(st.lists(SHAPE_DIMS, max_size=4))
        elif choice == 2:
            shape = list(reversed(shape))
        else:
            shape = draw(st.sampled_from([None, 7, "16", [1.5], [True]]))
        entry["shape"] = shape
        what = f"{name}.shape := {shape!r}"
    elif kind == "offsets":
        begin, end = entry["data_offsets"]
        total = len(body)
        values = st.one_of(st.sampled_from([0, 1, -1, begin, end, begin + 1, end - 1, end + 4, total, total + 1,
                                            2 ** 31, 2 ** 63, 2 ** 64, 10 ** 30]), st.integers(0, total + 8))
        if draw(st.booleans()):
            entry["data_offsets"] = [draw(values), draw(values)]
        else:
            entry["data_offsets"] = draw(st.sampled_from([[begin], [begin, end, end], None, "0,4", [end, begin]]))
        what = f"{name}.data_offsets := {entry['data_offsets']!r}"
    elif kind == "entry":
        if draw(st.booleans()):
            del header[name]
            what = f"delete entry {name}"
        else:
            field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
            entry.pop(field)
            what = f"delete {name}.{field}"
    else:
        new = draw(st.sampled_from(names + ["model.layers.7.mlp.up_proj.weight", "lm_head.bias", "x"]))
        header[new] = header.pop(name)
        what = f"rename {name} -> {new}"
    return st_with_header(header, body, what)


# --- GGUF
def gguf_slots(path: Path) -> dict[str, list[tuple[int, int]]]:
    """(byte offset, width) of every integer field in the GGUF header, by what the field says."""
    import gguf
    from gguf import GGUFValueType

    r = gguf.GGUFReader(path, "r")
    base = r.data.__array_interface__["data"][0]

    def at(part) -> int:
        return part.__array_interface__["data"][0] - base

    slots: dict[str, list[tuple[int, int]]] = {k: [] for k in (
        "key_len", "value_type", "scalar", "string_len", "array_type", "array_len",
        "tensor_name_len", "tensor_ndims", "tensor_dim", "tensor_type", "tensor_offset")}
    slots["header"] = [(4, 4), (8, 8), (16, 8)]   # version, tensor count, key/value count
    for key, field in r.fields.items():
        if key.startswith("GGUF."):
            continue
        parts = field.parts
        slots["key_len"].append((at(parts[0]), 8))
        slots["value_type"].append((at(parts[2]), 4))
        kind = field.types[0]
        if kind == GGUFValueType.STRING:
            slots["string_len"].append((at(parts[3]), 8))
        elif kind == GGUFValueType.ARRAY:
            slots["array_type"].append((at(parts[3]), 4))
            slots["array_len"].append((at(parts[4]), 8))
            if field.types[1] == GGUFValueType.STRING:
                slots["string_len"] += [(at(p), 8) for p in parts[5::2][:50]]
        else:
            slots["scalar"].append((at(parts[3]), parts[3].nbytes))
    for t in r.tensors:
        name_len, _, n_dims, dims, ttype, offset = t.field.parts
        slots["tensor_name_len"].append((at(name_len), 8))
        slots["tensor_ndims"].append((at(n_dims), 4))
        slots["tensor_dim"] += [(at(dims) + 8 * i, 8) for i in range(len(dims))]
        slots["tensor_type"].append((at(ttype), 4))
        slots["tensor_offset"].append((at(offset), 8))
    slots["data_offset"] = [(r.data_offset, 0)]
    return slots


@st.composite
def gguf_edit(draw, data: bytes, slots: dict) -> Mutant:
    hot = slots["data_offset"][0][0]
    kinds = sorted(k for k in slots if k != "data_offset") + ["bytes", "bytes", "float"]
    kind = draw(st.sampled_from(kinds))
    if kind == "bytes":
        return draw(byte_edit(data, hot))
    if kind == "float":   # a float32 metadata value (eps, rope base) -> nan, inf, 0, negative, huge
        offset, width = draw(st.sampled_from([s for s in slots["scalar"] if s[1] == 4]))
        value = draw(st.sampled_from([0.0, -1.0, float("nan"), float("inf"), 1e38, 1e-45, 3.0]))
        return Mutant(data[:offset] + struct.pack("<f", value) + data[offset + 4:], f"float at {offset} := {value}")
    offset, width = draw(st.sampled_from(slots[kind]))
    original = int.from_bytes(data[offset:offset + width], "little")
    if kind in ("value_type", "array_type", "tensor_type"):
        value = draw(st.one_of(st.integers(0, 41), interesting_uint(width)))
    else:
        value = draw(interesting_uint(width, original))
    return write_uint(data, offset, width, value, kind)


# --- torch.save zip
def zip_entries(data: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return [(i.filename, z.read(i)) for i in z.infolist()]


def make_zip(entries: list[tuple[str, bytes]], what: str, deflate: frozenset = frozenset()) -> Mutant:
    buf = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w") as z:
        warnings.simplefilter("ignore")   # "Duplicate name": wanted
        for name, content in entries:
            z.writestr(name, content, compress_type=zipfile.ZIP_DEFLATED if name in deflate else zipfile.ZIP_STORED)
    return Mutant(buf.getvalue(), what)


def pickle_int(value: int) -> bytes:
    """The shortest protocol-2 opcode that pushes ``value``."""
    if 0 <= value < 256:
        return b"K" + bytes([value])
    if 0 <= value < 65536:
        return b"M" + struct.pack("<H", value)
    if -(2 ** 31) <= value < 2 ** 31:
        return b"J" + struct.pack("<i", value)
    raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


GLOBALS = ["torch._utils\n_rebuild_tensor_v2", "torch._utils\n_rebuild_parameter", "collections\nOrderedDict",
           "torch\nFloatStorage", "torch\nHalfStorage", "torch\nBFloat16Storage", "torch\nLongStorage",
           "torch\nBoolStorage", "torch\nByteStorage", "os\nsystem", "posix\nsystem", "builtins\neval",
           "builtins\ngetattr", "builtins\n__import__", "torch\nload", "numpy.core.multiarray\n_reconstruct",
           "torch._utils\n_rebuild_qtensor", "subprocess\nPopen", "torch\nFakeStorage"]
STRINGS = ["0", "1", "7", "99", "", "../0", "data/0", "cpu", "cuda:0", "storage", "x", "tok_embeddings.weight",
           "layers.0.attention.wq.weight", "layers.9.attention.wq.weight", "output.weight", "norm.weight"]


@st.composite
def pickle_edit(draw, pkl: bytes) -> Mutant:
    """Rewrite one integer, string, global or memo index of a protocol-2 pickle (no frames: splicing is safe)."""
    ops = list(pickletools.genops(pkl))
    ends = [pos for _, _, pos in ops[1:]] + [len(pkl)]
    spans = [(op.name, arg, pos, end) for (op, arg, pos), end in zip(ops, ends)]
    kind = draw(st.sampled_from(["int", "int", "string", "global", "memo", "bytes"]))
    if kind == "bytes":
        edit = draw(byte_edit(pkl, len(pkl)))
        return Mutant(edit, f"data.pkl: {edit.what}")
    if kind == "int":
        ints = [s for s in spans if s[0] in ("BININT", "BININT1", "BININT2", "LONG1")]
        name, arg, pos, end = draw(st.sampled_from(ints))
        value = draw(st.one_of(st.sampled_from([0, 1, -1, 2, 15, 16, 17, 299, 300, 301, 4800, 2 ** 31, 2 ** 32,
                                                2 ** 62, 2 ** 63, -(2 ** 63), 10 ** 20]),
                               st.integers(-5, 5000), st.just(arg * 2), st.just(arg + 1)))
        new = pickle_int(value)
    elif kind == "string":
        name, arg, pos, end = draw(st.sampled_from([s for s in spans if s[0] in ("BINUNICODE", "SHORT_BINUNICODE")]))
        value = draw(st.sampled_from(STRINGS))
        new = b"X" + struct.pack("<I", len(value.encode())) + value.encode()
    elif kind == "global":
        name, arg, pos, end = draw(st.sampled_from([s for s in spans if s[0] == "GLOBAL"]))
        value = draw(st.sampled_from(GLOBALS))
        new = b"c" + value.encode() + b"\n"
    else:   # memo indices: the unpickler sizes its memo table by the largest index it sees
        name, arg, pos, end = draw(st.sampled_from([s for s in spans if s[0] in ("BINPUT", "BINGET")]))
        value = draw(st.sampled_from([0, 1, 255, 1 << 16, 1 << 20, 1 << 27, (1 << 32) - 1]))
        new = (b"r" if name == "BINPUT" else b"j") + struct.pack("<I", value)
    return Mutant(pkl[:pos] + new + pkl[end:], f"data.pkl: {name} {arg!r} at {pos} := {value!r}")


def zip_slots(data: bytes) -> list[tuple[int, int]]:
    """(offset, width) of the sizes, offsets, counts and name lengths in a zip's headers."""
    slots = []
    for sig, fields in ((b"PK\x03\x04", [(18, 4), (22, 4), (26, 2), (28, 2)]),
                        (b"PK\x01\x02", [(20, 4), (24, 4), (28, 2), (30, 2), (42, 4)]),
                        (b"PK\x05\x06", [(8, 2), (10, 2), (12, 4), (16, 4)])):
        start = 0
        while (i := data.find(sig, start)) >= 0:
            slots += [(i + off, w) for off, w in fields if i + off + w <= len(data)]
            start = i + 4
    return slots


@st.composite
def pth_edit(draw, data: bytes) -> Mutant:
    entries = zip_entries(data)
    names = [n for n, _ in entries]
    pkl_index = next(i for i, n in enumerate(names) if n.endswith("/data.pkl"))
    storages = [i for i, n in enumerate(names) if "/data/" in n]
    kind = draw(st.sampled_from(["pickle", "pickle", "pickle", "storage", "zip-field", "zip-bytes", "deflate"]))
    if kind == "pickle":
        edit = draw(pickle_edit(entries[pkl_index][1]))
        entries[pkl_index] = (names[pkl_index], edit)
        return make_zip(entries, edit.what)
    if kind == "storage":
        i = draw(st.sampled_from(storages))
        content = entries[i][1]
        how = draw(st.sampled_from(["truncate", "drop", "extend", "rename"]))
        if how == "truncate":
            entries[i] = (names[i], content[:draw(st.integers(0, max(len(content) - 1, 0)))])
        elif how == "drop":
            del entries[i]
        elif how == "extend":
            entries[i] = (names[i], content + bytes(draw(st.integers(1, 4096))))
        else:
            entries[i] = (names[i].rsplit("/", 1)[0] + "/" + draw(st.sampled_from(["99", "x", "0"])), content)
        return make_zip(entries, f"{how} {names[i]}")
    if kind == "deflate":   # valid, but compressed (torch.save stores entries uncompressed)
        chosen = frozenset(draw(st.lists(st.sampled_from(names), min_size=1, max_size=4)))
        return make_zip(entries, f"deflate {sorted(chosen)}", deflate=chosen)
    if kind == "zip-field":
        offset, width = draw(st.sampled_from(zip_slots(data)))
        original = int.from_bytes(data[offset:offset + width], "little")
        return write_uint(data, offset, width, draw(interesting_uint(width, original)), "zip header field")
    first_storage = min(data.find(b"PK\x03\x04", 1), len(data))
    return draw(byte_edit(data, first_storage))


# ----------------------------------------------------------------------------------- the tests
@FUZZ
@given(data=st.data())
def test_mutated_safetensors_loads_or_raises_npllama_error(worker, pristine, scratch, data):
    target = scratch / "fuzzhf"
    original = (pristine["hf"] / "model.safetensors").read_bytes()
    mutated = data.draw(safetensors_edit(original), label="model.safetensors")
    (target / "model.safetensors").write_bytes(mutated)
    check(worker.load(target), "fuzzhf")


@FUZZ
@given(data=st.data())
def test_mutated_hf_config_loads_or_raises_npllama_error(worker, pristine, scratch, data):
    target = scratch / "fuzzhf"
    (target / "model.safetensors").write_bytes((pristine["hf"] / "model.safetensors").read_bytes())
    files = ["config.json", "config.json", "generation_config.json", "tokenizer_config.json"]
    name = data.draw(st.sampled_from(files), label="file")
    original = (pristine["hf"] / name).read_text()
    (target / name).write_text(data.draw(json_edit(original), label=name))
    try:
        check(worker.load(target), "fuzzhf")
    finally:
        (target / name).write_text(original)


@st.composite
def tokenizer_json_edit(draw, text: str) -> Mutant:
    """Rewrite one field of a tokenizer.json (model options, vocabulary ids, merges, added tokens), or bytes."""
    d = json.loads(text)
    kind = draw(st.sampled_from(["model", "vocab", "merges", "added", "section", "bytes"]))
    if kind == "bytes":
        return draw(byte_edit(text.encode(), len(text)))
    if kind == "model":
        key = draw(st.sampled_from(["type", "dropout", "unk_token", "continuing_subword_prefix", "end_of_word_suffix",
                                    "fuse_unk", "byte_fallback", "ignore_merges", "vocab", "merges"]))
        value = draw(st.one_of(JSON_VALUES, st.sampled_from(["BPE", "WordPiece", "Unigram", "WordLevel", "##", "</w>",
                                                             "Ġ", "x", "<|im_end|>"])))
        d["model"][key] = value
    elif kind == "vocab":
        token = draw(st.sampled_from(sorted(d["model"]["vocab"])))
        value = draw(st.sampled_from([-1, 0, 1, 299, 300, 10 ** 6, 2 ** 32, 2 ** 63, None, "x"]))
        d["model"]["vocab"][token] = value
        key = f"vocab[{token!r}]"
    elif kind == "merges":
        merges = d["model"]["merges"]
        i = draw(st.integers(0, len(merges) - 1))
        value = draw(st.sampled_from(["a b", "zz qq", "", "a", "a b c", ["x"], ["Ġ", "Ġ"], ["a", 5], 5, None]))
        merges[i] = value
        key = f"merges[{i}]"
    elif kind == "added":
        i = draw(st.integers(0, len(d["added_tokens"]) - 1))
        key = draw(st.sampled_from(["id", "content", "special", "normalized"]))
        value = draw(st.sampled_from([-1, 0, 299, 300, 10 ** 6, 2 ** 40, "", "a", "Ġ", None, True]))
        d["added_tokens"][i][key] = value
        key = f"added_tokens[{i}].{key}"
    else:
        key = draw(st.sampled_from(["normalizer", "pre_tokenizer", "post_processor", "decoder", "truncation",
                                    "padding"]))
        value = draw(st.one_of(st.none(), st.fixed_dictionaries({"type": st.sampled_from(
            ["ByteLevel", "Metaspace", "Sequence", "Split", "Digits", "NFC", "Replace", "Strip", "TemplateProcessing",
             "Bogus"])}), JSON_VALUES))
        d[key] = value
    return Mutant(json.dumps(d).encode(), f"{key if kind != 'model' else 'model.' + key} := {value!r}")


@FUZZ
@given(data=st.data())
def test_mutated_tokenizer_json_loads_or_raises_npllama_error(worker, pristine, scratch, data):
    target = scratch / "fuzzhf"
    (target / "model.safetensors").write_bytes((pristine["hf"] / "model.safetensors").read_bytes())
    original = (pristine["hf"] / "tokenizer.json").read_text()
    (target / "tokenizer.json").write_bytes(data.draw(tokenizer_json_edit(original), label="tokenizer.json"))
    try:
        check(worker.load(target), "fuzzhf")
    finally:
        (target / "tokenizer.json").write_text(original)


@pytest.fixture(scope="module")
def gguf_layout(pristine):
    return gguf_slots(pristine["gguf"])


@FUZZ
@given(data=st.data())
def test_mutated_gguf_loads_or_raises_npllama_error(worker, pristine, scratch, gguf_layout, data):
    mutated = data.draw(gguf_edit(pristine["gguf"].read_bytes(), gguf_layout), label="tiny.gguf")
    target = scratch / "fuzzgguf.gguf"
    target.write_bytes(mutated)
    check(worker.load(target), "fuzzgguf")


@FUZZ
@given(data=st.data())
def test_gguf_with_several_edits_loads_or_raises_npllama_error(worker, pristine, scratch, gguf_layout, data):
    mutated = pristine["gguf"].read_bytes()
    for _ in range(data.draw(st.integers(2, 4), label="edits")):
        mutated = data.draw(gguf_edit(mutated, gguf_layout), label="edit")
    target = scratch / "fuzzgguf2.gguf"
    target.write_bytes(mutated)
    check(worker.load(target), "fuzzgguf2")


@FUZZ
@given(data=st.data())
def test_mutated_pth_loads_or_raises_npllama_error(worker, pristine, scratch, data):
    target = scratch / "fuzzmeta"
    original = (pristine["meta"] / "consolidated.00.pth").read_bytes()
    (target / "consolidated.00.pth").write_bytes(data.draw(pth_edit(original), label="consolidated.00.pth"))
    check(worker.load(target), "fuzzmeta")


@FUZZ
@given(data=st.data())
def test_mutated_meta_params_loads_or_raises_npllama_error(worker, pristine, scratch, data):
    target = scratch / "fuzzmeta"
    (target / "consolidated.00.pth").write_bytes((pristine["meta"] / "consolidated.00.pth").read_bytes())
    original = (pristine["meta"] / "params.json").read_text()
    (target / "params.json").write_text(data.draw(json_edit(original), label="params.json"))
    try:
        check(worker.load(target), "fuzzmeta")
    finally:
        (target / "params.json").write_text(original)


@FUZZ
@given(data=st.data())
def test_pth_with_several_edits_loads_or_raises_npllama_error(worker, pristine, scratch, data):
    target = scratch / "fuzzmeta"
    mutated = (pristine["meta"] / "consolidated.00.pth").read_bytes()
    for _ in range(data.draw(st.integers(2, 3), label="edits")):
        try:
            mutated = data.draw(pth_edit(mutated), label="edit")
        except (zipfile.BadZipFile, ValueError, StopIteration, EOFError, KeyError, struct.error):
            break   # an earlier edit broke the structure the next one parses: load what we have
    (target / "consolidated.00.pth").write_bytes(mutated)
    check(worker.load(target), "fuzzmeta")


def test_the_harness_catches_what_it_should(worker, tmp_path):
    """The memory limit bites; anything but a model or a clean NpllamaError fails; the memo bomb is refused."""
    assert worker.load({"allocate": 2 * HEADROOM})["outcome"] == "MemoryError"
    assert worker.load({"allocate": 1 << 20})["outcome"] == "allocated"
    result = worker.load(tmp_path / "missing")
    assert result["outcome"] == "npllama"
    check(result, "missing")
    for bad in ({"outcome": "crash", "type": "IndexError", "message": "x"}, {"outcome": "hang", "message": "x"},
                {"outcome": "died", "message": "exit status -9"},
                {"outcome": "npllama", "type": "CheckpointError", "message": "missing: corrupt (MemoryError: )"},
                {"outcome": "npllama", "type": "CheckpointError", "message": "does not name the file"}):
        with pytest.raises(AssertionError):
            check(bad, "missing")
    # A pickle that asks the unpickler for a memo of 2**27 entries (1 GiB): refused or bounded.
    folder = tmp_path / "memo"
    shutil.copytree(Path(worker.pristine[2]), folder)
    data = (folder / "consolidated.00.pth").read_bytes()
    entries = zip_entries(data)
    i = next(i for i, (n, _) in enumerate(entries) if n.endswith("/data.pkl"))
    entries[i] = (entries[i][0], b"\x80\x02N" + b"r" + struct.pack("<I", 1 << 27) + b".")
    (folder / "consolidated.00.pth").write_bytes(make_zip(entries, "memo index 2**27"))
    check(worker.load(folder), "memo")
