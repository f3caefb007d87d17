"""The dump: one safetensors file of a model's activations under npllama's trace names, schema 2.

A dump is what ``npllama trace`` writes for the reference and what a port writes for the oracle to
judge (``parity.capture``, ``npllama.oracle.Recorder``, the C writer of docs/porting.md). One
file holds the *steps* of one run (step 0 is the first forward call, a prefill; each later step is
one call that continues the same sequences through the KV cache) as seen by one *rank* of a
tensor-parallel run (rank 0 of 1 when there is none).

Tensors. Step 0's under their trace names; step s >= 1's under ``step.{s}.`` + the name:

    input_ids                 int64  (batch, seq)        the ids the step was fed (every step has its own)
    tok_embeddings            float  (batch, seq, dim)
    layers.{i}.attention_norm        (batch, seq, dim)
    layers.{i}.attention.q           (batch, n_heads, seq, head_dim)      after rotary
    layers.{i}.attention.k           (batch, n_kv_heads, seq, head_dim)   after rotary, this step's keys only
    layers.{i}.attention.v           (batch, n_kv_heads, seq, head_dim)   this step's values only
    layers.{i}.attention.scores_v    (batch, n_heads, seq, head_dim)      softmax(q k^T / sqrt(d)) v, before wo
    layers.{i}.attention             (batch, seq, dim)                    after wo
    layers.{i}.attention_residual    (batch, seq, dim)
    layers.{i}.ffn_norm              (batch, seq, dim)
    layers.{i}.feed_forward          (batch, seq, dim)
    layers.{i}.ffn_residual          (batch, seq, dim)                    the layer's output
    norm                             (batch, seq, dim)
    logits                           (batch, seq, vocab_size), or (batch, 1, vocab_size) with
                                     ``logits_positions: last``

seq is the step's number of new positions; step s's positions follow every earlier step's.
Activations are F64, F32, F16 or BF16, any mix; a dump may hold any subset of the names (what
the verdict then covers is its business: npllama.oracle).

Metadata (safetensors' ``__metadata__``, strings, all optional):

    format           "npllama-trace"                 schema_version   "2" (a file without one is 1)
    dtype            the dtype the port computed in (the oracle decides whether to believe it)
    rotary_layout    "half" (rotate-half: Hugging Face, npllama) or "interleaved" (Meta, llama.cpp,
                     gpt-fast): the channel order of q and k within each head
    steps            "N", the number of steps (default "1")
    rank, world_size "r", "w": which rank of a tensor-parallel run wrote the file (default "0", "1")
    splits           JSON: trace op ("attention.q") or full name -> how the rank's tensor relates
                     to the whole: "replicated" (the whole, the default), "shard(D)" (the rank's
                     slice of axis D; the ranks' slices in rank order make the whole) or
                     "partial-sum" (the whole is the sum over ranks: wo's and w2's outputs before
                     their all-reduce)
    logits_positions "all" (default) or "last": logits of every position or of the last only
    producer, npllama_version, prompt, model, model_sha256, layout (JSON: op -> its axes),
    rotary_dim (the channels of each head that rotate)

Schema 1 (one step, one rank, whole tensors) is read as a schema 2 dump with those defaults.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .errors import CheckpointError, InputError
from .io import atomic_write, parse_json
from .model import LAYER_TRACE_NAMES
from .tolerances import dtype_name

FORMAT = "npllama-trace"
SCHEMA_VERSION = "2"
READABLE_VERSIONS = ("1", "2")
ROTARY_LAYOUTS = ("half", "interleaved")
LOGITS_POSITIONS = ("all", "last")
IDS = "input_ids"
STEP_PREFIX = "step."

# The axes of each traced op (the same for every layer).
LAYOUT = {
    "tok_embeddings": "batch seq dim",
    "attention_norm": "batch seq dim",
    "attention.q": "batch n_heads seq head_dim",
    "attention.k": "batch n_kv_heads seq head_dim",
    "attention.v": "batch n_kv_heads seq head_dim",
    "attention.scores_v": "batch n_heads seq head_dim",
    "attention": "batch seq dim",
    "attention_residual": "batch seq dim",
    "ffn_norm": "batch seq dim",
    "feed_forward": "batch seq dim",
    "ffn_residual": "batch seq dim",
    "norm": "batch seq dim",
    "logits": "batch seq vocab_size",
}
assert set(LAYOUT) == {"tok_embeddings", "norm", "logits", *LAYER_TRACE_NAMES}
RESIDUAL_STREAM = ("tok_embeddings", "attention_residual", "ffn_residual")

# safetensors dtype <-> numpy; BF16 is read as its bits (numpy has no bfloat16) and widened.
_FLOATS = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
_INTS = {"I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "U32": np.dtype("<u4"),
         "U16": np.dtype("<u2"), "U8": np.dtype("u1"), "I8": np.dtype("i1")}
_DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}

MAX_STEPS = 4096           # a dump's steps are decode steps of one run; more is a corrupt header
MAX_WORLD_SIZE = 4096


# ---------------------------------------------------------------------------- splits
@dataclass(frozen=True)
class Split:
    """How one rank's tensor relates to the whole: "replicated", "shard" (along axis) or "partial-sum"."""
    kind: str
    axis: int | None = None

    def __str__(self) -> str:
        return f"shard({self.axis})" if self.kind == "shard" else self.kind

    def cut(self, whole: np.ndarray, shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray] | None:
        """What each rank's piece (of the given shapes, rank 0 first) should equal, as parts of the
        whole tensor: the whole for each replicated copy, consecutive slices along the axis for a
        shard, None for a partial sum (each rank's piece is a term of the whole, not a part of it)."""
        if self.kind == "replicated":
            return [whole] * len(shapes)
        if self.kind == "partial-sum":
            return None
        edges = np.cumsum([0, *(shape[self.axis] for shape in shapes)])
        return [np.take(whole, np.arange(edges[r], edges[r + 1]), axis=self.axis) for r in range(len(shapes))]


REPLICATED = Split("replicated")
PARTIAL_SUM = Split("partial-sum")


def shard(axis: int) -> Split:
    return Split("shard", int(axis))


def parse_split(text: str, where: str) -> Split:
    """ "replicated" | "partial-sum" | "shard(D)" -> Split, or an InputError naming where."""
    text = str(text).strip()
    if text in ("replicated", "partial-sum"):
        return Split(text)
    m = re.fullmatch(r"shard\(([0-9])\)", text)      # ASCII digits only: an axis of at most 9
    if m is None:
        raise InputError(f"{where}: split {text[:40]!r} is not one of 'replicated', 'partial-sum', "
                         f"'shard(D)' (D the axis, 0-9)")
    return shard(int(m.group(1)))


# ---------------------------------------------------------------------------- names
def step_name(step: int, name: str) -> str:
    """The stored name of a step's tensor: the name itself for step 0, ``step.{s}.name`` after."""
    return name if step == 0 else f"{STEP_PREFIX}{step}.{name}"


def parse_step(stored: str) -> tuple[int, str]:
    """'step.3.layers.0.attention.q' -> (3, 'layers.0.attention.q'); a bare name is step 0."""
    if stored.startswith(STEP_PREFIX):
        number, _, rest = stored[len(STEP_PREFIX):].partition(".")
        if number.isascii() and number.isdigit() and rest and len(number) <= 4:
            return int(number), rest
    return 0, stored


# ---------------------------------------------------------------------------- the dump
@dataclass
class Step:
    """One forward call's activations (widened to float64, exactly), how they were stored, and its ids."""
    tensors: dict[str, np.ndarray] = field(default_factory=dict)   # name -> float64 array
    dtypes: dict[str, str] = field(default_factory=dict)           # name -> "float32", "bfloat16", ...
    input_ids: np.ndarray | None = None                            # (batch, seq) int64


@dataclass
class Dump:
    """A dump read back (or gathered from its ranks' files): its steps, rank and splits."""
    path: str
    steps: list[Step]
    metadata: dict[str, str] = field(default_factory=dict)
    rank: int = 0
    world_size: int = 1
    splits: dict[str, Split] = field(default_factory=dict)          # op or full name -> Split
    pieces: dict[tuple[int, str], list[np.ndarray]] = field(default_factory=dict)  # gathered: each rank's
    piece_splits: dict[str, Split] = field(default_factory=dict)   # gathered: how each name's pieces were cut

    @property
    def name(self) -> str:
        return Path(self.path).name

    # step 0, the common case of a one-pass dump
    @property
    def tensors(self) -> dict[str, np.ndarray]:
        return self.steps[0].tensors

    @property
    def dtypes(self) -> dict[str, str]:
        return self.steps[0].dtypes

    @property
    def input_ids(self) -> np.ndarray | None:
        return self.steps[0].input_ids

    @property
    def logits_positions(self) -> str:
        return self.metadata.get("logits_positions", "all")

    def split_of(self, name: str) -> Split:
        """How this rank's tensor under name relates to the whole (the full name wins over the op)."""
        from .report import split_name
        if name in self.splits:
            return self.splits[name]
        return self.splits.get(split_name(name)[1], REPLICATED)


# ---------------------------------------------------------------------------- writing
def dump_metadata(dtype, producer: str, rotary_layout: str = "half", *, steps: int = 1, rank: int = 0,
                  world_size: int = 1, splits: Mapping[str, "Split | str"] | None = None,
                  logits_positions: str = "all", **extra: str | None) -> dict[str, str]:
    """The string metadata of a dump (see the module docstring); extra keys whose value is None are left out."""
    from . import __version__
    if rotary_layout not in ROTARY_LAYOUTS:
        raise InputError(f"rotary_layout {rotary_layout!r}: choose one of {', '.join(ROTARY_LAYOUTS)}")
    if logits_positions not in LOGITS_POSITIONS:
        raise InputError(f"logits_positions {logits_positions!r}: choose one of {', '.join(LOGITS_POSITIONS)}")
    if not 0 <= rank < world_size:
        raise InputError(f"rank {rank} of world size {world_size}: a rank counts from 0 to world_size - 1")
    meta = {"format": FORMAT, "schema_version": SCHEMA_VERSION, "producer": producer,
            "npllama_version": __version__, "dtype": dtype_name(dtype), "rotary_layout": rotary_layout,
            "layout": json.dumps(LAYOUT), "steps": str(int(steps)), "rank": str(int(rank)),
            "world_size": str(int(world_size)), "logits_positions": logits_positions}
    if splits:
        meta["splits"] = json.dumps({k: str(parse_split(str(v), "splits")) for k, v in splits.items()})
    meta.update({k: str(v) for k, v in extra.items() if v is not None})
    return meta


def write_dump(path: str | os.PathLike, activations: Mapping[str, np.ndarray], input_ids,
               metadata: Mapping[str, str]) -> Path:
    """Write a one-step dump (NumPy arrays: float64, float32 or float16) atomically; returns the path."""
    return write_steps(path, [(activations, input_ids)], metadata)


def write_steps(path: str | os.PathLike, steps: Sequence[tuple[Mapping[str, np.ndarray], object]],
                metadata: Mapping[str, str]) -> Path:
    """Write a dump of several steps, each (activations, input_ids), atomically; returns the path.
    metadata's ``steps`` is set to their number."""
    from safetensors.numpy import save

    if not steps:
        raise InputError("a dump needs at least one step")
    tensors: dict[str, np.ndarray] = {}
    for s, (activations, input_ids) in enumerate(steps):
        tensors[step_name(s, IDS)] = check_input_ids(np.asarray(input_ids), f"{path} step {s}")
        for name, x in activations.items():
            x = np.asarray(x)
            if x.dtype not in (np.float64, np.float32, np.float16):
                raise InputError(f"{name}: a dump holds float64, float32 or float16 arrays from NumPy, got {x.dtype}")
            tensors[step_name(s, name)] = np.ascontiguousarray(x)
    data = save(tensors, metadata={**dict(metadata), "steps": str(len(steps))})
    with atomic_write(path) as f:
        f.write(data)
    return Path(path)


# ---------------------------------------------------------------------------- reading
def read_dump(path: str | os.PathLike) -> Dump:
    """A dump read back; CheckpointError / InputError naming what is wrong with the file."""
    from safetensors import safe_open

    from .formats.hf import read_safetensors_header
    from .quant.gguf_blocks import bf16_to_float32

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file; a dump is one .safetensors file (npllama trace --out writes one)")
    header, start = read_safetensors_header(path)        # every offset checked against the file size
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = dict(f.metadata() or {})
    except Exception as e:   # safetensors raises its own error types on a malformed file
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    version = metadata.get("schema_version", "1")
    if version not in READABLE_VERSIONS:
        raise InputError(f"{path}: dump schema version {version[:20]!r}; this npllama reads versions "
                         f"{', '.join(READABLE_VERSIONS)} (upgrade npllama, or write the dump again)")
    n_steps = _int_field(metadata, "steps", 1, 1, MAX_STEPS, path)
    world = _int_field(metadata, "world_size", 1, 1, MAX_WORLD_SIZE, path)
    rank = _int_field(metadata, "rank", 0, 0, world - 1, path)
    steps = [Step() for _ in range(n_steps)]
    for stored, entry in header.items():
        s, name = parse_step(stored)
        if s >= n_steps:
            raise InputError(f"{path}: tensor {stored[:80]!r} belongs to step {s}, but the metadata says "
                             f"{n_steps} step(s); set metadata steps to the number of forward calls recorded")
        st, (begin, end), shape = entry["dtype"], entry["data_offsets"], entry["shape"]
        raw_dtype = {**_FLOATS, **_INTS}.get(st)
        if raw_dtype is None:
            raise InputError(f"{path}: tensor {stored[:80]!r} is {st}; activations are F64, F32, F16 or BF16, "
                             f"{IDS} is I64")
        raw = np.fromfile(path, dtype=raw_dtype, count=(end - begin) // raw_dtype.itemsize,
                          offset=start + begin).reshape(shape)
        if name == IDS:
            if st not in _INTS:
                raise InputError(f"{path}: {stored} is {st}; token ids are integers (I64)")
            steps[s].input_ids = check_input_ids(raw.astype(np.int64), f"{path} step {s}")
        elif st not in _FLOATS:
            raise InputError(f"{path}: tensor {stored[:80]!r} is {st}; activations are F64, F32, F16 or BF16")
        else:
            steps[s].tensors[name] = (bf16_to_float32(raw) if st == "BF16" else raw).astype(np.float64)
            steps[s].dtypes[name] = _DTYPE_NAMES[st]
    layout = metadata.get("rotary_layout", "half")
    if layout not in ROTARY_LAYOUTS:
        raise InputError(f"{path}: metadata rotary_layout is {layout[:40]!r}; write 'half' (rotate-half, as "
                         f"Hugging Face) or 'interleaved' (Meta, llama.cpp, gpt-fast)")
    if metadata.get("logits_positions", "all") not in LOGITS_POSITIONS:
        raise InputError(f"{path}: metadata logits_positions is {metadata['logits_positions'][:40]!r}; "
                         f"write 'all' or 'last'")
    return Dump(str(path), steps, metadata, rank, world, _splits(metadata, path))


def _int_field(metadata: Mapping[str, str], key: str, default: int, low: int, high: int, path) -> int:
    """A small non-negative integer from the metadata (ASCII digits only), or an InputError."""
    text = metadata.get(key)
    if text is None:
        return default
    if not (text.isascii() and text.isdigit() and len(text) <= 6) or not low <= int(text) <= high:
        raise InputError(f"{path}: metadata {key} is {text[:20]!r}; it must be a whole number from {low} to {high}")
    return int(text)


def _splits(metadata: Mapping[str, str], path) -> dict[str, Split]:
    text = metadata.get("splits")
    if not text:
        return {}
    try:
        raw = parse_json(text, f"{path}: metadata splits", InputError)   # nesting, huge numbers: one line
    except InputError:
        raw = None
    if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
        raise InputError(f"{path}: metadata splits must be a JSON object of name -> 'replicated', "
                         f"'partial-sum' or 'shard(D)'")
    return {k: parse_split(v, f"{path}: splits[{k[:40]!r}]") for k, v in raw.items()}


def check_input_ids(ids: np.ndarray, where: str) -> np.ndarray:
    """input_ids as int64 (batch, seq), or an InputError naming the dump."""
    if not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"{where}: {IDS} must be integer token ids, got {ids.dtype}")
    if ids.ndim != 2 or 0 in ids.shape:
        raise InputError(f"{where}: {IDS} must be a (batch, seq) array of token ids, got shape {ids.shape}")
    return ids.astype(np.int64, copy=False)


# ---------------------------------------------------------------------------- ranks
def gather_ranks(dumps: Sequence[Dump]) -> Dump:
    """The dumps of every rank of one tensor-parallel run as one dump of whole tensors.

    Each name is rebuilt by its split: shards concatenated in rank order along their axis,
    partial sums added, replicated tensors taken from rank 0. Each rank's own piece is kept in
    ``pieces`` (step, name) -> [rank 0's, rank 1's, ...], so that a break can be traced to a rank.
    """
    if not dumps:
        raise InputError("no dump to gather")
    world = dumps[0].world_size
    ranks = sorted(d.rank for d in dumps)
    if any(d.world_size != world for d in dumps) or ranks != list(range(world)):
        have = ", ".join(f"{d.name} (rank {d.rank} of {d.world_size})" for d in dumps[:8])
        raise InputError(f"a tensor-parallel run of world size {world} needs one dump per rank 0..{world - 1}; "
                         f"got {have}")
    dumps = sorted(dumps, key=lambda d: d.rank)
    first = dumps[0]
    for d in dumps[1:]:
        if len(d.steps) != len(first.steps):
            raise InputError(f"{d.name} holds {len(d.steps)} steps, {first.name} {len(first.steps)}: "
                             f"the ranks of one run record the same steps")
    steps, pieces, piece_splits = [], {}, {}
    for s, step0 in enumerate(first.steps):
        out = Step(input_ids=step0.input_ids)
        for d in dumps[1:]:
            other = d.steps[s]
            if set(other.tensors) != set(step0.tensors):
                extra = sorted(set(other.tensors) ^ set(step0.tensors))
                raise InputError(f"{d.name} and {first.name} hold different names at step {s} "
                                 f"({', '.join(extra[:4])}); every rank records the same names")
            if other.input_ids is not None and step0.input_ids is not None and \
                    not np.array_equal(other.input_ids, step0.input_ids):
                raise InputError(f"{d.name} and {first.name} ran on different input_ids at step {s}")
        for name in step0.tensors:
            split = first.split_of(name)
            parts = [d.steps[s].tensors[name] for d in dumps]
            out.tensors[name] = _join(parts, split, name, first)
            out.dtypes[name] = step0.dtypes[name]
            pieces[(s, name)] = parts
            piece_splits[name] = split
        steps.append(out)
    meta = {**first.metadata, "rank": "0", "world_size": "1", "gathered_from": str(world)}
    meta.pop("splits", None)
    return Dump(first.path, steps, meta, 0, 1, {}, pieces, piece_splits)


def read_dumps(pattern: str | os.PathLike) -> Dump:
    """One dump, or every rank's dump of a tensor-parallel run gathered (gather_ranks): a path, or
    a glob such as 'dump.rank*.safetensors' (quoted on the command line). The gathered dump is
    named by the pattern."""
    import dataclasses
    import glob

    text = str(pattern)
    if Path(text).is_file() or not any(c in text for c in "*?["):
        return _whole(read_dump(text))
    paths = sorted(glob.glob(text))
    if not paths:
        raise InputError(f"{text}: matches no file")
    if len(paths) > MAX_WORLD_SIZE:
        raise InputError(f"{text}: matches {len(paths)} files, more than any world size ({MAX_WORLD_SIZE})")
    dumps = [read_dump(p) for p in paths]
    if len(dumps) == 1:
        return _whole(dumps[0])
    return dataclasses.replace(gather_ranks(dumps), path=text)


def _whole(dump: Dump) -> Dump:
    """A single dump, refused if it is one rank's of several."""
    if dump.world_size > 1:
        raise InputError(f"{dump.path} is rank {dump.rank} of {dump.world_size}: pass every rank's dump, "
                         f"e.g. --against '{_rank_glob(dump.path)}' (quoted)")
    return dump


def _rank_glob(path: str) -> str:
    name = Path(path).name
    return re.sub(r"rank[0-9]+", "rank*", name) if re.search(r"rank[0-9]+", name) else "*.safetensors"


def _join(parts: list[np.ndarray], split: Split, name: str, first: Dump) -> np.ndarray:
    if split.kind == "replicated":
        return parts[0]
    shapes = {p.shape for p in parts}
    if split.kind == "partial-sum":
        if len(shapes) != 1:
            raise InputError(f"{name}: partial sums of different shapes {sorted(shapes)} across ranks")
        return np.sum(parts, axis=0)
    axis = split.axis
    if any(p.ndim <= axis for p in parts):
        raise InputError(f"{first.name}: {name} is split along axis {axis}, but has only {parts[0].ndim} axes")
    rest = {p.shape[:axis] + p.shape[axis + 1:] for p in parts}
    if len(rest) != 1:
        raise InputError(f"{name}: the ranks' shards differ outside axis {axis}: {[p.shape for p in parts]}")
    return np.concatenate(parts, axis=axis)
