"""The oracle: the reference's every activation out, anyone's activations in.

``npllama trace`` writes the reference's dump (dump.py: the schema, reading and writing);
``npllama parity --against`` and ``npllama trace --against`` check anyone's (check_dump): the
reference recomputes on the dump's own input_ids, in float64 on the same weights, and every name
the dump holds becomes a row of the parity table (npllama/report.py). docs/parity.md holds the
schema for readers; docs/porting.md walks through a port.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Mapping

import numpy as np

from .dump import (IDS, LAYOUT, RESIDUAL_STREAM, ROTARY_LAYOUTS, Dump, check_input_ids,  # noqa: F401
                   dump_metadata, read_dump, write_dump)
from .errors import InputError
from .model import Transformer, trace_names
from .report import Report, compare, errors, split_name
from .tolerances import PARITY_RTOL, dtype_name, parity_rtol

DEFAULT_PROMPT = "The capital of France is"


# ---------------------------------------------------------------------------- writing
def trace(model: Transformer, ids) -> dict[str, np.ndarray]:
    """Every activation npllama traces on ids, in forward order, in the model's dtype (logits float32).

    ids: (batch, seq) token ids. Naive attention: the reference implementation.
    """
    out: dict[str, np.ndarray] = {}

    def keep(name: str, x: np.ndarray) -> None:
        out[name] = np.array(x, copy=True)

    model(model.check_ids(ids), attention="naive", trace=keep)
    return out


# ---------------------------------------------------------------------------- the reference
def round_to(x: np.ndarray, dtype) -> np.ndarray:
    """x rounded to dtype (round to nearest even) and back to float64: what a model in that dtype holds.

    bfloat16 is the top half of a float32, so it is rounded on the float32's bits (x holds
    float32 values, as checkpoints do; finite ones).
    """
    name = dtype_name(dtype)
    if name == "float64":
        return np.asarray(x, dtype=np.float64)
    if name in ("float32", "float16"):
        return np.asarray(x).astype(name).astype(np.float64)
    if name == "bfloat16":
        bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000   # nearest, ties to even
        return bits.astype(np.uint32).view(np.float32).astype(np.float64)
    raise InputError(f"cannot round to {name!r}; known: {', '.join(PARITY_RTOL)}")


def reference_model(model: Transformer, dtype="float64") -> Transformer:
    """npllama in float64 holding the model's weights rounded to dtype: the weights a port running
    in that dtype holds. The model itself when it is float64 and rounding changes nothing (float32
    and float64 dumps of a checkpoint stored in float32 or narrower)."""
    from .quant.matrix import QuantizedMatrix
    params = model.state_dict()

    def exact(v) -> bool:      # a matrix kept as stored (a mapped file) is known exact or not without reading it
        return v.held_exactly_in(dtype_name(dtype)) if isinstance(v, QuantizedMatrix) else \
            np.array_equal(round_to(v, dtype), v)
    if model.dtype == np.float64 and all(exact(v) for v in params.values()):
        return model
    return Transformer(model.config, {k: v if isinstance(v, QuantizedMatrix) and exact(v) else round_to(v, dtype)
                                      for k, v in params.items()}, model.tokenizer, dtype=np.float64)


def isolated_trace(model: Transformer, ids: np.ndarray, given: Mapping[str, np.ndarray]
                   ) -> tuple[dict[str, np.ndarray], list[int]]:
    """The reference's activations with every layer started from given's input to it.

    Layer i runs from given["layers.{i-1}.ffn_residual"] (layer 0 from given["tok_embeddings"]),
    the final norm from the last layer's output, the LM head from given["norm"], where given holds
    them; where it does not, from the reference's own value. So each layer's error is what that
    layer adds, not what it inherits. It is the model's own forward pass (Transformer.__call__'s
    ``given``), with naive attention.
    -> (name -> array, the layers that had no input in given).
    """
    n = model.config.n_layers
    stream = ["tok_embeddings", *(f"layers.{i}.ffn_residual" for i in range(n)), "norm"]
    inputs = {name: np.asarray(given[name], dtype=model.dtype) for name in stream if name in given}
    out: dict[str, np.ndarray] = {}
    model(ids, attention="naive", trace=lambda name, x: out.__setitem__(name, np.array(x, copy=True)),
          given=inputs)
    own = [i for i in range(n) if stream[i] not in inputs]
    return out, own


def interleaved_to_half(x: np.ndarray, rotary_dim: int) -> np.ndarray:
    """q or k from the interleaved rotary layout to rotate-half, channel by channel within each head.

    x: (..., head_dim) whose first rotary_dim channels are pairs [r0 i0 r1 i1 ...] -> the same
    shape with them as [r0 r1 ... i0 i1 ...] (npllama.formats.permute does this to the rows of wq
    and wk; q and k are their outputs).
    """
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    pairs = rot.reshape(*rot.shape[:-1], rotary_dim // 2, 2)
    half = np.swapaxes(pairs, -1, -2).reshape(rot.shape)
    return np.concatenate([half, rest], axis=-1)


# ---------------------------------------------------------------------------- checking a dump
def dump_dtype(dump: Dump, override=None) -> str:
    """The dtype whose tolerances judge a dump: override (--dtype), else the dtype its metadata
    declares, else the coarsest dtype its activations are stored in."""
    for given, where in ((override, "--dtype"), (dump.metadata.get("dtype"), f"{dump.name}: metadata dtype")):
        if given is not None:
            name = dtype_name(given)
            if name not in PARITY_RTOL:
                raise InputError(f"{where} is {name!r}; tolerances exist for {', '.join(PARITY_RTOL)}")
            return name
    stored = set(dump.dtypes.values()) or {"float64"}
    return max(stored, key=lambda d: PARITY_RTOL[d][0])


def check_dump(theirs: Dump, model: Transformer | None = None, reference: Dump | None = None,
               isolate: bool = False, dtype=None, model_sha256: str | None = None) -> Report:
    """Compare a dump with the reference, op by op: the parity table of anyone's implementation.

    model: the npllama model whose weights the dump's implementation ran (any dtype: the
    reference is recomputed in float64 on its weights rounded to the dump's dtype, on the dump's
    input_ids). reference: a dump written by ``npllama trace`` to compare against instead.
    isolate: each layer of the reference starts from the dump's own input to it (isolated_trace),
    and is held to the "layer" tolerance; otherwise the "model" tolerance of an end-to-end run.
    dtype: the dtype whose tolerances apply (default: dump_dtype). model_sha256: the model file's,
    to note a dump made from another file.
    """
    if model is None and reference is None:
        raise InputError("checking a dump needs a model (--model) or a reference dump (--reference)")
    if isolate and model is None:
        raise InputError("--isolate recomputes each layer from the dump's own inputs, so it needs the "
                         "model (--model), not a --reference dump")
    notes: list[str] = []
    ids = their_ids(theirs, reference)
    dt = dump_dtype(theirs, dtype)
    own: list[int] = []
    if model is not None:
        ref_model = reference_model(model, dt)
        try:
            ids = ref_model.check_ids(ids)
        except InputError as e:
            raise InputError(f"{theirs.path}: {IDS}: {e}") from None
        ref = trace(ref_model, ids)
        n_layers, source, known = model.config.n_layers, "npllama float64", model_sha256
    else:
        ref, n_layers = reference.tensors, 1 + max((split_name(n)[0] for n in reference.tensors
                                                   if split_name(n)[0] is not None), default=-1)
        source, known = f"{reference.name} ({dump_dtype(reference)})", reference.metadata.get("model_sha256")
        if dump_dtype(reference) != "float64":
            notes.append(f"the reference dump is {dump_dtype(reference)}; a float64 one (npllama trace, the "
                         f"default) is exact to ~1e-16")
    theirs_known = theirs.metadata.get("model_sha256")
    if known and theirs_known and known != theirs_known:
        notes.append(f"{theirs.name} was made from a model file with sha256 {theirs_known[:12]}..., the "
                     f"reference's has {known[:12]}...: other weights differ by more than rounding")
    declared = reference.metadata.get("rotary_dim", "") if reference is not None else ""
    rotary_dim = model.config.rotary_dim if model is not None else (int(declared) if declared.isdigit() else None)
    candidate = their_activations(theirs, ref, rotary_dim, notes)
    if isolate:      # shapes are checked: now run each layer from the dump's own input to it
        ref, own = isolated_trace(ref_model, ids, theirs.tensors)
    ref = {k: np.asarray(v, dtype=np.float64) for k, v in ref.items()}
    kind = "layer" if isolate else "model"
    rows = compare(ref, candidate, lambda name: parity_rtol(dt, kind, theirs.dtypes[name]), require_all=False)
    if not rows:
        raise InputError(f"{theirs.path}: holds none of npllama's trace names ({', '.join(sorted(theirs.tensors)[:4])} "
                         f"...); name the activations as docs/parity.md lists them, e.g. layers.0.ffn_norm")
    hint = rotary_hint(theirs, ref, rows, rotary_dim)
    if hint:
        notes.append(hint)
    missing = [n for n in trace_names(n_layers) if n in ref and n not in candidate]
    if missing:
        notes.append(f"not compared (not in {theirs.name}): {summarize_names(missing)}")
    if isolate and own:
        notes.append(f"no input in {theirs.name} for layer(s) {ranges(own)}: the reference ran them from its own "
                     f"output of the layer before (write layers.{{i}}.ffn_residual to isolate each layer)")
    producer = theirs.metadata.get("producer")
    title = (f"{theirs.name}{f' ({producer})' if producer else ''}, judged as {dt}, "
             f"{'each layer from its own input' if isolate else 'end to end'}, vs {source}")
    report = Report(title, rows, dt, "dump")
    report.notes = notes
    return report


def their_ids(theirs: Dump, reference: Dump | None) -> np.ndarray:
    """The token ids the dump ran: its own input_ids, or the reference dump's."""
    ids = theirs.input_ids
    if reference is not None and reference.input_ids is not None:
        if ids is not None and not np.array_equal(ids, reference.input_ids):
            raise InputError(f"{theirs.name} and {reference.name} ran on different input_ids "
                             f"({ids.shape} vs {reference.input_ids.shape}); dump both from the same ids")
        ids = reference.input_ids
    if ids is None:
        raise InputError(f"{theirs.path}: has no {IDS}; write the token ids your model ran under {IDS}, int64 "
                         f"(batch, seq), or pass --reference with the npllama trace dump made on them")
    return ids


def their_activations(theirs: Dump, ref: Mapping[str, np.ndarray], rotary_dim: int | None,
                      notes: list[str]) -> dict[str, np.ndarray]:
    """The dump's activations that the reference also has, in the reference's layout; an
    InputError naming the tensor when a shape differs. Names outside the schema become a note."""
    interleaved = theirs.metadata.get("rotary_layout", "half") == "interleaved"
    out, unknown = {}, []
    for name, x in theirs.tensors.items():
        if name not in ref:
            unknown.append(name)
            continue
        op = split_name(name)[1]
        if x.shape != ref[name].shape:
            raise InputError(f"{theirs.path}: tensor {name!r} has shape {tuple(x.shape)}, the reference's is "
                             f"{tuple(ref[name].shape)} ({LAYOUT[op]}){shape_hint(x.shape, ref[name].shape)}")
        if interleaved and op in ("attention.q", "attention.k"):
            x = interleaved_to_half(x, rotary_dim or x.shape[-1])
        out[name] = x
    if interleaved:
        notes.append(f"q and k permuted from the interleaved rotary layout {theirs.name} declares")
    if unknown:
        notes.append(f"ignored (not trace names of this model): {', '.join(sorted(unknown)[:6])}"
                     f"{' ...' if len(unknown) > 6 else ''}")
    return out


def rotary_hint(theirs: Dump, ref: Mapping[str, np.ndarray], rows: list, rotary_dim: int | None) -> str | None:
    """When the first break is q or k and they match once read in the other rotary layout: say so."""
    first = next((r for r in rows if not r.ok), None)
    if first is None or first.op not in ("attention.q", "attention.k"):
        return None
    declared = theirs.metadata.get("rotary_layout", "half")
    x = theirs.tensors[first.name]
    other, alt = (("interleaved", interleaved_to_half(x, rotary_dim or x.shape[-1])) if declared == "half"
                  else ("half", x))
    if errors(alt, ref[first.name])[1] <= first.rtol:
        return (f"{first.name} matches the reference when read in the {other} rotary layout: declare "
                f"rotary_layout={other!r} in the dump's metadata (it says {declared!r})")
    return None


def shape_hint(got: tuple, want: tuple) -> str:
    """A likely fix for a wrong shape: heads and seq swapped, or the heads not split."""
    if len(got) == 4 and len(want) == 4 and (got[0], got[2], got[1], got[3]) == tuple(want):
        return "; heads and seq are swapped: write x.transpose(1, 2)"
    if len(got) == 3 and len(want) == 4 and got == (want[0], want[2], want[1] * want[3]):
        return "; the heads are not split: write x.view(batch, seq, heads, head_dim).transpose(1, 2)"
    return ""


def ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    parts, start = [], None
    for i, n in enumerate(layers):
        if start is None:
            start = n
        if i + 1 == len(layers) or layers[i + 1] != n + 1:
            parts.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ", ".join(parts)


def summarize_names(names: list[str]) -> str:
    """Trace names grouped by op: 'attention.q, attention.k (layers 0-29); logits'."""
    by_op: dict[str, list[int]] = {}
    top = []
    for name in names:
        layer, op = split_name(name)
        if layer is None:
            top.append(op)
        else:
            by_op.setdefault(op, []).append(layer)
    groups: dict[str, list[str]] = {}
    for op, layers in by_op.items():
        groups.setdefault(ranges(layers), []).append(op)
    parts = [f"{', '.join(ops)} (layers {where})" for where, ops in groups.items()]
    return "; ".join(parts + top)


# ---------------------------------------------------------------------------- the model file
def model_sha256(path: str | os.PathLike | None) -> str:
    """The SHA-256 of a checkpoint's weights file (the default model's when None); of several
    files (shards), the SHA-256 of their ``sha256sum``-style listing, "<hex>  <name>\\n" by name."""
    from .formats import detect_format
    from .formats.hf import weight_files
    from .weights import cached_sha256, default_model_path

    path = Path(path) if path is not None else default_model_path()
    fmt, where = detect_format(path)
    if fmt == "gguf":
        files = [where]
    elif fmt == "hf":
        files = weight_files(where)
    else:
        files = sorted(where.glob("consolidated.*.pth"))
    if len(files) == 1:
        return cached_sha256(files[0])
    listing = "".join(f"{cached_sha256(f)}  {f.name}\n" for f in sorted(files, key=lambda f: f.name))
    return hashlib.sha256(listing.encode()).hexdigest()


def describe(dump_path: str | os.PathLike, activations: Mapping[str, np.ndarray], ids: np.ndarray) -> str:
    """One line about a written dump: how many activations, on how many tokens, how big."""
    size = os.path.getsize(dump_path)
    shown = f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 1024:.0f} KiB"
    return (f"wrote {dump_path}: {len(activations)} activations and {IDS} {ids.shape[0]} x {ids.shape[1]} "
            f"({shown})")
