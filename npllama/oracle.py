"""The oracle: the reference's every activation out, anyone's activations in.

``npllama trace`` writes the reference's dump (dump.py: the schema, reading and writing), one
forward call or a prefill and N greedy decode steps through the KV cache (trace_steps).
``npllama parity --against`` and ``npllama trace --against`` check anyone's (check_dump): the
reference recomputes on the dump's own input_ids, step by step through its own KV cache, in
float64 on the same weights, and every name the dump holds becomes a row of the parity table
(npllama/report.py). A NumPy port reports its activations into a ``Recorder``; a PyTorch one
through parity.capture; any other through the byte layout docs/porting.md gives.

The verdict (check_dump) exits 0 only when every op is within its bar *and* the comparison
covers what a port must match: the residual stream of every layer and the logits, at every step
(or what ``--only`` names). The bar is that of the dtype the values were computed in, and a dump
cannot loosen it: a declared dtype coarser than the stored one holds only for tensors whose
values are all numbers of that dtype (judge_bar). docs/parity.md holds the rules for readers;
docs/porting.md walks through a port.
"""

from __future__ import annotations

import contextvars
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from .dump import (IDS, LAYOUT, RESIDUAL_STREAM, ROTARY_LAYOUTS, Dump, Step, check_input_ids,  # noqa: F401
                   dump_metadata, read_dump, step_name, write_dump, write_steps)
from .errors import InputError
from .model import LAYER_TRACE_NAMES, Transformer, stream_names, trace_names
from .report import Bar, Coverage, Report, compare, errors, forward_position, split_name
from .tolerances import PARITY_RTOL, dtype_name, parity_rtol

DEFAULT_PROMPT = "The capital of France is"      # `npllama parity`'s prompt (parity/report.py)
# `npllama trace`'s: a few dozen tokens, so that a bug that depends on the position (rotary angles,
# the causal mask, an offset in the cache) has positions to show on.
TRACE_PROMPT = ("The capital of France is Paris. It lies on the Seine, in the north of the country, "
                "and more than two million people live in the city itself.")
TOP_NAMES = ("tok_embeddings", "norm", "logits")


# ---------------------------------------------------------------------------- writing
def trace(model: Transformer, ids) -> dict[str, np.ndarray]:
    """Every activation npllama traces on ids, in forward order, in the model's dtype (logits float32).

    ids: (batch, seq) token ids. Naive attention below layout.FLASH_MIN_LEN keys, blockwise above.
    """
    return reference_steps(model, [model.check_ids(ids)])[0]


def trace_steps(model: Transformer, ids, decode: int = 0) -> list[tuple[dict[str, np.ndarray], np.ndarray]]:
    """The prefill on ids and ``decode`` greedy decode steps through the KV cache, each step's
    activations with the ids it was fed: [(activations, ids (batch, seq)), (..., (batch, 1)), ...].

    Greedy: each step feeds every row's most likely next token (the lowest id on a tie).
    """
    ids = model.check_ids(ids)
    check_window(model, ids.shape[1] + decode, "the prompt and the decode steps")
    steps = [ids]
    cache = model.new_cache(ids.shape[0], ids.shape[1] + decode) if decode else None
    out = []
    for s in range(decode + 1):
        acts: dict[str, np.ndarray] = {}
        model(steps[s], cache=cache, attention="auto",
              trace=lambda name, x: acts.__setitem__(name, np.array(x, copy=True)))
        out.append((acts, steps[s]))
        if s < decode:
            steps.append(np.argmax(acts["logits"][:, -1], axis=-1)[:, None].astype(np.int64))
    return out


def check_window(model: Transformer, positions: int, what: str, where: str = "") -> None:
    """Refuse, in one line, more positions than the model's context window (before any work)."""
    from .rope_scaling import context_window

    window = context_window(model.config)
    if positions > window:
        raise InputError(f"{where}{what} hold {positions} positions, beyond the model's context window of "
                         f"{window}; use at most {window}")


# ---------------------------------------------------------------------------- a NumPy port's recorder
_ACTIVE: contextvars.ContextVar[tuple["Recorder", ...]] = contextvars.ContextVar("npllama_recorders", default=())


def record(name: str, x) -> None:
    """Report one activation to the innermost open Recorder (nothing happens when none is open).

    A port's functions call this where the value is computed, ``record("layers.3.attention.q", xq)``,
    and run as usual outside a ``with Recorder()`` block.
    """
    stack = _ACTIVE.get()
    if stack:
        stack[-1].record(name, x)


class Recorder:
    """A NumPy port's activations, step by step, written as a dump.

        with npllama.oracle.Recorder() as rec:
            logits = forward(prompt_ids, cache)      # calls record("layers.0.attention.q", xq), ...
            rec.step()                               # what follows is the next forward call
            logits = forward(next_ids, cache)
        rec.save("mine.safetensors", dtype="float32", rotary_layout="interleaved")

    Each step is one forward call (step 0 the prefill, then each decode step through the cache),
    and each needs the ids it was fed: ``record("input_ids", ids)`` inside it, or
    ``save(..., input_ids=[ids of step 0, ids of step 1, ...])``. A name recorded twice in one step
    is refused: call ``step()`` between forward calls. Values are copied when recorded (a port may
    reuse its buffers); float64, float32 and float16 are kept as they are.
    """

    def __init__(self) -> None:
        self.steps: list[Step] = [Step()]
        self._token: contextvars.Token | None = None

    def __enter__(self) -> "Recorder":
        self._token = _ACTIVE.set((*_ACTIVE.get(), self))
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.reset(self._token)
        self._token = None

    def record(self, name: str, x) -> None:
        """Keep a copy of x under name in the current step."""
        if not isinstance(name, str) or not name:
            raise InputError(f"a recorded name is a trace name such as 'layers.0.ffn_norm', got {name!r}")
        step, s = self.steps[-1], len(self.steps) - 1
        x = np.array(x, copy=True)
        if name == IDS:
            if step.input_ids is not None:
                raise InputError(f"{IDS} was recorded twice in step {s}: call rec.step() between forward calls")
            step.input_ids = check_input_ids(x if x.ndim != 1 else x[None], f"step {s}")
            return
        if x.dtype not in (np.float64, np.float32, np.float16):
            raise InputError(f"{name}: record float64, float32 or float16 arrays (a bfloat16 value as its "
                             f"float32, which is exact), got {x.dtype}")
        if name in step.tensors:
            raise InputError(f"{name} was recorded twice in step {s}: call rec.step() between forward calls")
        step.tensors[name] = x
        step.dtypes[name] = x.dtype.name

    def step(self) -> None:
        """Start the next step (the next forward call); nothing happens while the current one is empty."""
        current = self.steps[-1]
        if current.tensors or current.input_ids is not None:
            self.steps.append(Step())

    def save(self, path, *, input_ids=None, dtype=None, rotary_layout: str = "half",
             logits_positions: str = "all", producer: str | None = None, **metadata: str | None) -> Path:
        """Write every recorded step as one dump, atomically; returns the path.

        input_ids: the ids of each step (a list, one per step; or one array for a one-step dump),
        where the port did not record them. dtype: the dtype the port computed in (default: the
        coarsest it recorded). rotary_layout: "interleaved" for pairs (2i, 2i+1) (Meta, llama.cpp).
        logits_positions: "last" when the port computes the last position's logits only.
        """
        steps = [st for st in self.steps if st.tensors or st.input_ids is not None]
        if not steps:
            raise InputError("nothing was recorded: call npllama.oracle.record inside the `with Recorder()` block")
        if input_ids is not None:
            given = [input_ids] if len(steps) == 1 and np.asarray(input_ids[0]).ndim <= 1 else list(input_ids)
            if len(given) != len(steps):
                raise InputError(f"input_ids has {len(given)} entries for {len(steps)} recorded steps; give one per step")
            for s, (st, ids) in enumerate(zip(steps, given)):
                ids = np.asarray(ids)
                st.input_ids = check_input_ids(ids if ids.ndim != 1 else ids[None], f"step {s}")
        missing = [s for s, st in enumerate(steps) if st.input_ids is None]
        if missing:
            raise InputError(f"step {missing[0]} has no {IDS}: record('{IDS}', ids) in each forward call, or "
                             f"pass save(..., input_ids=[...]) with one entry per step")
        if dtype is None:
            stored = {d for st in steps for d in st.dtypes.values()} or {"float32"}
            dtype = max(stored, key=coarseness)
        meta = dump_metadata(dtype, producer or "npllama.oracle.Recorder", rotary_layout, steps=len(steps),
                             logits_positions=logits_positions, **metadata)
        return write_steps(path, [(st.tensors, st.input_ids) for st in steps], meta)


# ---------------------------------------------------------------------------- the reference
def round_to(x: np.ndarray, dtype) -> np.ndarray:
    """x rounded to dtype (round to nearest even) and back to float64: what a model in that dtype holds.

    bfloat16 is the top half of a float32, so it is rounded on the float32's bits (x holds
    float32 values, as checkpoints do; finite ones). The result keeps x's memory order (a weight
    laid out (in, out) for speed stays so, and a model built from it copies nothing).
    """
    name = dtype_name(dtype)
    x = np.asarray(x)
    if name == "float64":
        return x.astype(np.float64, copy=False)
    if name in ("float32", "float16"):
        return x.astype(name).astype(np.float64)
    if name == "bfloat16":
        bits = x.astype(np.float32).view(np.uint32)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000   # nearest, ties to even
        return bits.astype(np.uint32).view(np.float32).astype(np.float64)
    raise InputError(f"cannot round to {name!r}; known: {', '.join(PARITY_RTOL)}")


def representable(x: np.ndarray, dtype) -> bool:
    """Whether every value of x is a number of dtype (NaN never is): x rounded to it is x."""
    name = dtype_name(dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        if name in ("float32", "float16"):        # one narrowing; the comparison widens it back
            return bool(np.array_equal(np.asarray(x).astype(name), x))
        return bool(np.array_equal(round_to(x, name), x))


def coarseness(dtype) -> float:
    """How coarse a dtype's arithmetic is: its end-to-end bar (float64 < float32 < float16 < bfloat16)."""
    return PARITY_RTOL[dtype_name(dtype)][2]


def coarser(a: str, b: str) -> str:
    return a if coarseness(a) >= coarseness(b) else b


# A GGUF model checked over at most this many forward calls keeps its blocks (load_reference).
BLOCKS_MAX_CALLS = 2


def load_reference(path: str | os.PathLike | None, calls: int, mapped: bool | None = None,
                   dtype=np.float64) -> Transformer:
    """The model the reference computes with, in float64 (or dtype), for a run of ``calls`` forward calls.

    A GGUF file checked over a call or two keeps its quantized blocks, each product dequantizing
    a piece of rows at a time (npllama.quant.matrix): the same float32 weights widened exactly, in
    a tenth of the memory, and no float64 copy of the model to allocate, which is most of a
    check's time. Over more calls (decode steps) that dequantizing would cost more than the copy,
    so every weight is expanded once. path: as npllama.load's (None: the default model; a Hub id);
    mapped: npllama.load's (None: by the model's size).
    """
    from .formats import detect_format, load, resolve

    where = resolve(path)
    blocks = detect_format(where)[0] == "gguf" and calls <= BLOCKS_MAX_CALLS
    return load(where, progress=False, dtype=np.dtype(dtype), weights="gguf" if blocks else "float32", mapped=mapped)


def reference_model(model: Transformer, dtype="float64") -> Transformer:
    """npllama in float64 holding the model's weights rounded to dtype: the weights a port running
    in that dtype holds. The model itself when it is float64 and rounding changes nothing: float32
    and float64 runs of a checkpoint stored in float32 or narrower (every weight is checked; a
    GGUF's blocks dequantize to float32 numbers by construction; a mapped file's matrices are known
    exact or not from their stored type, without reading them)."""
    from .quant.matrix import QuantizedMatrix

    params = model.state_dict()
    name = dtype_name(dtype)

    def exact(v) -> bool:
        return v.held_exactly_in(name) if isinstance(v, QuantizedMatrix) else representable(v, name)
    if model.dtype == np.float64 and (name == "float64" or all(exact(v) for v in params.values())):
        return model
    return Transformer(model.config, {k: v if isinstance(v, QuantizedMatrix) and exact(v) else round_to(v, name)
                                      for k, v in params.items()}, model.tokenizer, dtype=np.float64)


def check_recomputation_fits(theirs: Dump, ref_model: Transformer, ids: Sequence[np.ndarray],
                             model: Transformer, kept: set[str]) -> None:
    """Refuse, before it runs, a recomputation of the reference whose peak would not fit
    (npllama.memory): the activations it keeps (kept: needed_names), for every step's positions
    and the dump's rows (a window bounds the positions, nothing else bounds the rows), beside the
    weights in memory (the model's, and its rounded float64 copy when the reference is one)."""
    from .memory import check_call_fits, model_is_mapped, trace_bytes, weights_in_memory
    rows, positions = max(i.shape[0] for i in ids), sum(i.shape[1] for i in ids)
    copy = weights_in_memory(model) if ref_model is not model else 0
    check_call_fits(ref_model, f"{theirs.path}: recomputing the reference for {rows} row{'s' * (rows != 1)} x "
                               f"{positions} positions in float64",
                    copy + trace_bytes(ref_model.config, rows, positions, np.float64, model_is_mapped(ref_model),
                                       kept),
                    "dump fewer rows")


def reference_steps(model: Transformer, ids_steps: Sequence[np.ndarray],
                    keep: Callable[[int, str], bool] | None = None,
                    given: Sequence[Mapping[str, np.ndarray]] | None = None) -> list[dict[str, np.ndarray]]:
    """The reference's activations of each step: the first call on ids_steps[0], each later one
    continuing the same sequences through the KV cache (decode), as a port's cached run does.

    keep(step, name): which activations to keep (default: all). given: per step, name -> array
    of residual-stream values to continue from instead of the model's own (an isolated trace,
    isolated_trace). Attention is naive below layout.FLASH_MIN_LEN keys and blockwise above it,
    so a long sequence never builds a seq x seq matrix.
    """
    total = sum(ids.shape[1] for ids in ids_steps)
    cache = model.new_cache(ids_steps[0].shape[0], total) if len(ids_steps) > 1 else None
    out = []
    for s, ids in enumerate(ids_steps):
        acts: dict[str, np.ndarray] = {}

        def hold(name: str, x: np.ndarray, s=s, acts=acts) -> None:
            if keep is None or keep(s, name):
                acts[name] = np.array(x, copy=True)

        model(ids, cache=cache, attention="auto", trace=hold, given=None if given is None else given[s])
        out.append(acts)
    return out


def stream_inputs(model: Transformer, tensors: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[int]]:
    """The residual stream a port wrote, as the inputs of each of the reference's layers.

    Layer i runs from layers.{i-1}.ffn_residual (layer 0 from tok_embeddings), the final norm from
    the last layer's output, the LM head from norm, where tensors holds them.
    -> (name -> array in the model's dtype, the layers that had no input there).
    """
    n = model.config.n_layers
    stream = stream_names(n)
    inputs = {name: np.asarray(tensors[name], dtype=model.dtype) for name in stream if name in tensors}
    return inputs, [i for i in range(n) if stream[i] not in inputs]


def isolated_trace(model: Transformer, ids: np.ndarray, given: Mapping[str, np.ndarray]
                   ) -> tuple[dict[str, np.ndarray], list[int]]:
    """The reference's activations with every layer started from given's input to it (one step).

    Where given lacks a layer's input, that layer runs from the reference's own output of the
    layer before. So each layer's error is what that layer adds, not what it inherits.
    -> (name -> array, the layers that had no input in given).
    """
    inputs, own = stream_inputs(model, given)
    return reference_steps(model, [ids], given=[inputs])[0], own


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


def half_to_interleaved(x: np.ndarray, rotary_dim: int) -> np.ndarray:
    """The inverse of interleaved_to_half: [r0 r1 ... i0 i1 ...] -> [r0 i0 r1 i1 ...] in each head."""
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    halves = rot.reshape(*rot.shape[:-1], 2, rotary_dim // 2)
    pairs = np.swapaxes(halves, -1, -2).reshape(rot.shape)
    return np.concatenate([pairs, rest], axis=-1)


# ---------------------------------------------------------------------------- the bar
@dataclass
class Judged:
    """The dtypes a dump is judged by: the bar most of its tensors are held to, the dtype the port's
    weights are taken to be in (the reference rounds to it), each tensor's own bar, where they came
    from, and what to say about it."""
    dtype: str
    weights: str
    source: str
    tensor: dict[tuple[int, str], str] = field(default_factory=dict)   # (step, name) -> dtype of its bar
    notes: list[str] = field(default_factory=list)


def judge_bar(theirs: Dump, override=None) -> Judged:
    """Which dtype's bars judge each tensor of a dump: the dtype the values were computed in.

    override (``--dtype``, said by the person running the check) holds for every tensor. Without
    it, the dump's claim (its metadata dtype, else the coarsest dtype it stores) widens a tensor's
    bar only where the tensor's values are all numbers of that dtype, as the float32 copy of a
    bfloat16 tensor is; any other tensor is held to its stored dtype. A tensor is never held to a
    bar finer than its storage. So a dump cannot loosen its own bar.
    """
    stored = {(s, n): d for s, st in enumerate(theirs.steps) for n, d in st.dtypes.items()}
    if override is not None:
        name = dtype_name(override)
        if name not in PARITY_RTOL:
            raise InputError(f"--dtype is {name!r}; tolerances exist for {', '.join(PARITY_RTOL)}")
        tensor = {k: coarser(name, d) for k, d in stored.items()}
        return Judged(most_common(tensor, name), name, "from --dtype", tensor)
    declared = theirs.metadata.get("dtype")
    if declared is not None:
        claim = dtype_name(declared)
        if claim not in PARITY_RTOL:
            raise InputError(f"{theirs.path}: metadata dtype is {claim[:20]!r}; tolerances exist for "
                             f"{', '.join(PARITY_RTOL)} (or leave it out: the stored dtype is used)")
    else:
        claim = max(set(stored.values()) or {"float64"}, key=coarseness)
    tensor, outside = {}, []
    for (s, n), d in stored.items():
        if d == claim or coarseness(d) >= coarseness(claim) or representable(theirs.steps[s].tensors[n], claim):
            tensor[(s, n)] = coarser(claim, d)
        else:
            tensor[(s, n)] = d
            outside.append(step_name(s, n))
    shown = most_common(tensor, claim)
    if declared is None:
        return Judged(shown, claim, f"from the dtype its tensors are stored in ({claim})", tensor)
    if outside and len(outside) == len(stored):
        run = max(set(stored.values()), key=coarseness)
        return Judged(shown, run, f"from the stored {run} (the declared {claim} is not believed: no tensor holds "
                                  f"only {claim} numbers; --dtype {claim} if the port computed in it)", tensor)
    if shown != claim and not outside:
        return Judged(shown, claim, f"from the stored {shown} (the dump declares {claim}; no tensor is judged "
                                    f"finer than it is stored)", tensor)
    judged = Judged(shown, claim, f"from the dtype the dump declares, its tensors holding {claim} numbers", tensor)
    if outside:
        judged.source = f"from the dtype the dump declares, except {len(outside)} tensor(s) held to their stored dtype"
        judged.notes.append(f"{theirs.name} declares {claim}, but {', '.join(outside[:4])}"
                            f"{' ...' if len(outside) > 4 else ''} hold values that are no {claim} numbers: held "
                            f"to their stored dtype's bar; if the port computed them in {claim}, say so with "
                            f"--dtype {claim}")
    return judged


def most_common(tensor: Mapping[tuple[int, str], str], default: str) -> str:
    """The dtype most tensors are held to (the coarser on a tie): the bar a verdict line shows."""
    counts: dict[str, int] = {}
    for d in tensor.values():
        counts[d] = counts.get(d, 0) + 1
    return max(counts, key=lambda d: (counts[d], coarseness(d))) if counts else default


# ---------------------------------------------------------------------------- what a verdict covers
def parse_only(spec: str, n_layers: int) -> Callable[[str], bool]:
    """--only: comma-separated ops (logits, ffn_residual, attention.q, ...), layer ranges (layers.0-3)
    or both (layers.0-3.ffn_norm) -> whether a trace name is among them."""
    items = [item.strip() for item in str(spec).split(",") if item.strip()]
    if not items:
        raise InputError("--only is empty: name ops (logits, ffn_residual), layers (layers.0-3) or both")
    tests = []
    for item in items:
        m = re.fullmatch(r"layers\.([0-9]{1,6})(?:-([0-9]{1,6}))?(?:\.(.+))?", item)
        if m is not None:
            lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
            op = m.group(3)
            if op is not None and op not in LAYER_TRACE_NAMES:
                raise InputError(f"--only {item!r}: {op!r} is no op of a layer; one of {', '.join(LAYER_TRACE_NAMES)}")
            if lo > hi or hi >= n_layers:
                raise InputError(f"--only {item!r}: the model has layers 0-{n_layers - 1}")
            tests.append(lambda name, lo=lo, hi=hi, op=op: in_layers(name, lo, hi, op))
        elif item in LAYOUT:
            tests.append(lambda name, op=item: split_name(name)[1] == op)
        else:
            raise InputError(f"--only {item[:40]!r}: name an op ({', '.join(LAYOUT)}), a layer range "
                             f"(layers.0-3) or both (layers.0-3.ffn_norm)")
    return lambda name: any(t(name) for t in tests)


def in_layers(name: str, lo: int, hi: int, op: str | None) -> bool:
    layer, name_op = split_name(name)
    return layer is not None and lo <= layer <= hi and (op is None or name_op == op)


def required_names(n_layers: int, select: Callable[[str], bool] | None) -> list[str]:
    """What a pass needs from every step: the residual stream of every layer (each layer's output)
    and the logits; or every trace name --only selects."""
    if select is not None:
        return [n for n in trace_names(n_layers) if select(n)]
    return [*(f"layers.{i}.ffn_residual" for i in range(n_layers)), "logits"]


# ---------------------------------------------------------------------------- the reference dump
def check_reference(ref: Dump) -> tuple[int, dict[str, int], int]:
    """A --reference dump, checked as any input is: every name a trace name, the layers 0..n-1
    each complete, shapes that agree with each other and with the ids, finite values that are not
    all zero, and a rotary_dim that fits the heads. -> (n_layers, the sizes of the axes, rotary_dim).
    """
    where = ref.path
    if ref.world_size != 1:
        raise InputError(f"{where}: a reference is one whole dump; this is rank {ref.rank} of {ref.world_size}")
    if ref.logits_positions != "all":
        raise InputError(f"{where}: a reference holds the logits of every position (logits_positions 'all')")
    if ref.metadata.get("dtype") is not None and dtype_name(ref.metadata["dtype"]) not in PARITY_RTOL:
        raise InputError(f"{where}: metadata dtype is {ref.metadata['dtype'][:20]!r}; one of {', '.join(PARITY_RTOL)}")
    n_layers, sizes = None, {}
    for s, step in enumerate(ref.steps):
        at = f"{where}{'' if s == 0 else f' step {s}'}"
        if step.input_ids is None:
            raise InputError(f"{at}: has no {IDS}; a reference is what `npllama trace` writes (ids included)")
        names = set(step.tensors)
        stray = sorted(n for n in names if not is_trace_name(n))
        if stray:
            raise InputError(f"{at}: holds {stray[0][:60]!r}, which is no trace name; a reference is what "
                             f"`npllama trace` writes, every name of docs/parity.md and nothing else")
        layers = {split_name(n)[0] for n in names} - {None}
        n = len(layers)
        if layers and max(layers) >= n:
            raise InputError(f"{at}: its layer indices are not 0..{n - 1} ({min(layers)}..{max(layers)}, "
                             f"{n} of them); a reference holds every layer")
        if n_layers is not None and n != n_layers:
            raise InputError(f"{at}: holds {n} layers, step 0 {n_layers}")
        n_layers = n
        missing = [x for x in trace_names(n) if x not in names]
        if missing:
            raise InputError(f"{at}: lacks {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}; a "
                             f"reference holds every trace name of its layers")
        here = {**sizes, "batch": step.input_ids.shape[0], "seq": step.input_ids.shape[1]}
        if "batch" in sizes and sizes["batch"] != here["batch"]:
            raise InputError(f"{at}: {IDS} has {here['batch']} rows, step 0 {sizes['batch']}")
        for name in trace_names(n):
            x = step.tensors[name]
            axes = LAYOUT[split_name(name)[1]].split()
            if x.ndim != len(axes):
                raise InputError(f"{at}: {name} has shape {tuple(x.shape)}; the schema's is ({', '.join(axes)})")
            for axis, size in zip(axes, x.shape):
                if here.setdefault(axis, size) != size:
                    raise InputError(f"{at}: {name} has shape {tuple(x.shape)}, but {axis} is {here[axis]} "
                                     f"elsewhere in the reference")
            if not np.isfinite(x).all():
                raise InputError(f"{at}: {name} holds values that are not finite; a reference is finite")
            if not x.any():
                raise InputError(f"{at}: {name} is all zeros, which no model computes; a reference is what "
                                 f"`npllama trace` writes")
        sizes = {k: v for k, v in here.items() if k != "seq"}
    head_dim = sizes["head_dim"]
    text = ref.metadata.get("rotary_dim")
    if text is None:
        rotary_dim = head_dim
    elif not (text.isascii() and text.isdigit() and len(text) <= 6) or not 2 <= int(text) <= head_dim \
            or int(text) % 2:
        raise InputError(f"{where}: metadata rotary_dim is {text[:20]!r}; it is an even number of channels "
                         f"from 2 to the head's {head_dim}")
    else:
        rotary_dim = int(text)
    return n_layers, sizes, rotary_dim


def is_trace_name(name: str) -> bool:
    """A name of the schema, spelled as npllama spells it ('layers.3.ffn_norm', not 'layers.03.ffn_norm')."""
    layer, op = split_name(name)
    if layer is None:
        return op in TOP_NAMES
    return op in LAYER_TRACE_NAMES and name == f"layers.{layer}.{op}"


# ---------------------------------------------------------------------------- checking a dump
def dump_dtype(dump: Dump, override=None) -> str:
    """The dtype a dump is judged as (judge_bar's run dtype)."""
    return judge_bar(dump, override).dtype


def check_dump(theirs: Dump, model: Transformer | None = None, reference: Dump | None = None,
               isolate: bool = False, dtype=None, model_sha256: str | None = None, only: str | None = None,
               last_only: bool = False, default_model: bool = False) -> Report:
    """Compare a dump with the reference, step by step and op by op: the parity table of anyone's
    implementation, with its verdict (Report.exit_code).

    model: the npllama model whose weights the dump's implementation ran (any dtype: the
    reference is recomputed in float64 on its weights rounded to the dtype the dump is judged as,
    on the dump's input_ids, each later step through the KV cache). reference: a dump written by
    ``npllama trace`` to compare against instead (checked as any input: check_reference).
    isolate: each layer of the reference starts from the dump's own input to it, and is held to
    the "layer" bar; otherwise the "model" bar of an end-to-end run. dtype: the dtype whose bars
    apply, said by the person running the check (default: judge_bar). model_sha256: the model
    file's, to note a dump made from another file. only: --only, what the verdict covers instead
    of the residual stream and the logits. last_only: the dump's logits (and norm) are the last
    position's only (also when its metadata says logits_positions "last"). default_model: no
    model was named (a wrong shape then suggests --model).
    """
    if model is None and reference is None:
        raise InputError("checking a dump needs a model (--model) or a reference dump (--reference)")
    if isolate and model is None:
        raise InputError("--isolate recomputes each layer from the dump's own inputs, so it needs the "
                         "model (--model), not a --reference dump")
    notes: list[str] = []
    n_steps = len(theirs.steps)
    if reference is not None:
        n_layers, sizes, rotary_dim = check_reference(reference)
        if len(reference.steps) != n_steps:
            raise InputError(f"{theirs.name} holds {n_steps} step(s), the reference {reference.name} "
                             f"{len(reference.steps)}; trace the reference with as many (--decode)")
    else:
        a = model.config
        n_layers, rotary_dim = a.n_layers, a.rotary_dim
        sizes = {"dim": a.dim, "n_heads": a.n_heads, "n_kv_heads": a.n_kv_heads, "head_dim": a.head_dim,
                 "vocab_size": a.vocab_size}
    ids = their_ids(theirs, reference)
    if model is not None:      # before any work: a window's worth of positions at most
        over = f" over {n_steps} steps" if n_steps > 1 else ""
        check_window(model, sum(i.shape[1] for i in ids), f"its {IDS}{over}", f"{theirs.path}: ")
    judged = judge_bar(theirs, dtype)
    notes += judged.notes
    last = last_only or theirs.logits_positions == "last"
    select = parse_only(only, n_layers) if only is not None else None
    ours = [{n for n in st.tensors if is_trace_name(n) and (split_name(n)[0] or 0) < n_layers} for st in theirs.steps]
    traced = [their_activations(theirs, s, ours[s], {**sizes, "batch": ids[s].shape[0], "seq": ids[s].shape[1]},
                                rotary_dim, last, default_model) for s in range(n_steps)]
    candidate = [{n: x for n, x in t.items() if select is None or select(n)} for t in traced]
    wanted = [set(c) for c in candidate]
    ignored = sorted({step_name(s, n) for s, st in enumerate(theirs.steps) for n in st.tensors
                      if not is_trace_name(n) or (split_name(n)[0] or 0) >= n_layers})
    if ignored:
        notes.append(f"ignored (not trace names of this model): {', '.join(ignored[:6])}"
                     f"{' ...' if len(ignored) > 6 else ''}")
    if theirs.metadata.get("rotary_layout", "half") == "interleaved":
        notes.append(f"q and k permuted from the interleaved rotary layout {theirs.name} declares")

    own: list[int] = []
    ref_model = None
    if model is not None:
        ref_model = reference_model(model, judged.weights)
        for s, step_ids in enumerate(ids):
            try:
                ref_model.check_ids(step_ids)
            except InputError as e:
                raise InputError(f"{theirs.path}: {step_name(s, IDS)}: {e}") from None
        keep = needed_names(theirs, wanted, n_layers)
        check_recomputation_fits(theirs, ref_model, ids, model, set().union(*keep))
        given = None
        if isolate:
            given = []
            for s in range(n_steps):
                inputs, missing = stream_inputs(ref_model, {n: x for n, x in traced[s].items()
                                                            if x.shape[1] == ids[s].shape[1]})
                given.append(inputs)
                own = sorted(set(own) | set(missing))
        refs = reference_steps(ref_model, ids, keep=lambda s, n: n in keep[s], given=given)
        source, known = "npllama float64", model_sha256
    else:
        refs = [st.tensors for st in reference.steps]
        ref_dtype = judge_bar(reference).dtype
        source, known = f"{reference.name} ({ref_dtype})", reference.metadata.get("model_sha256")
        if ref_dtype != "float64":
            notes.append(f"the reference dump is {ref_dtype}; a float64 one (npllama trace, the default) is exact "
                         f"to ~1e-16")
    theirs_known = theirs.metadata.get("model_sha256")
    if known and theirs_known and known != theirs_known:
        notes.append(f"{theirs.name} was made from a model file with sha256 {theirs_known[:12]}..., the "
                     f"reference's has {known[:12]}...: other weights differ by more than rounding")

    kind = "layer" if isolate else "model"
    rows = []
    for s in range(n_steps):
        ref = {n: np.asarray(refs[s][n], dtype=np.float64) for n in candidate[s]}
        for n, x in candidate[s].items():
            if x.shape[1] == 1 and ref[n].shape[1] > 1:          # the last position only (--last-only)
                ref[n] = ref[n][:, -1:]

        def rtol(name: str, s=s) -> float:      # no more exact than their storage, nor than the reference's
            ref_dtype = dtype_name(refs[s][name].dtype) if reference is None else reference.steps[s].dtypes[name]
            return parity_rtol(judged.tensor[(s, name)], kind, ref_dtype)

        rows += compare(ref, candidate[s], rtol, require_all=False, step=s)
        if theirs.pieces:
            rows = worst_of_replicas(theirs, s, rows, ref, rotary_dim)
    if not rows:
        held = sorted(theirs.tensors)
        raise InputError(f"{theirs.path}: holds none of npllama's trace names{' that --only selects' if select else ''} "
                         f"({', '.join(held[:4])}{' ...' if len(held) > 4 else ''}); name the activations as "
                         f"docs/parity.md lists them, e.g. layers.0.ffn_norm")
    required = required_names(n_layers, select)
    missing_required = [(s, n) for s in range(n_steps) for n in required if n not in candidate[s]]
    what = ("what --only names" if select is not None else
            "the residual stream of every layer and the logits" + (" (the last position's)" if last else "")
            + (f", at each of the {n_steps} steps" if n_steps > 1 else ""))
    coverage = Coverage(what, len(required) * n_steps, missing_required, only)
    uncompared = [n for n in trace_names(n_layers) if n not in candidate[0] and (select is None or select(n))]
    if uncompared and coverage.complete:
        notes.append(f"not compared (not in {theirs.name}): {summarize_names(uncompared)}")
    if isolate and own:
        notes.append(f"no input in {theirs.name} for layer(s) {ranges(own)}: the reference ran them from its own "
                     f"output of the layer before (write layers.{{i}}.ffn_residual to isolate each layer)")

    bar = Bar(judged.dtype, kind, parity_rtol(judged.dtype, kind), judged.source)
    producer = theirs.metadata.get("producer")
    title = (f"{theirs.name}{f' ({producer})' if producer else ''}, judged as {judged.dtype}, "
             f"{'each layer from its own input' if isolate else 'end to end'}"
             f"{f', {n_steps} steps (prefill and {n_steps - 1} decode)' if n_steps > 1 else ''}, vs {source}")
    report = Report(title, rows, judged.dtype, "dump", notes, coverage, bar, n_steps)
    first = report.first_break
    if first is not None:
        hint = rotary_hint(theirs, first, candidate, refs, rotary_dim)
        if hint is None and ref_model is not None:
            hint = permutation_hint(theirs, first, candidate, refs, ref_model, ids)
        if hint:
            notes.append(hint)
        if theirs.pieces:
            report.break_ranks, note = break_ranks(theirs, first, refs, ref_model, rotary_dim)
            if note:
                notes.append(note)
    elif coverage.complete:
        notes += precision_notes(judged.dtype, kind, model is not None)
    return report


def their_ids(theirs: Dump, reference: Dump | None) -> list[np.ndarray]:
    """The token ids of each step the dump ran: its own input_ids, or the reference dump's."""
    out = []
    for s, st in enumerate(theirs.steps):
        ids = st.input_ids
        if reference is not None and s < len(reference.steps) and reference.steps[s].input_ids is not None:
            theirs_ref = reference.steps[s].input_ids
            if ids is not None and not np.array_equal(ids, theirs_ref):
                raise InputError(f"{theirs.name} and {reference.name} ran on different {step_name(s, IDS)} "
                                 f"({ids.shape} vs {theirs_ref.shape}); dump both from the same ids")
            ids = theirs_ref
        if ids is None:
            raise InputError(f"{theirs.path}: has no {step_name(s, IDS)}; write the token ids your model ran under "
                             f"{step_name(s, IDS)}, int64 (batch, seq), or pass --reference with the npllama trace "
                             f"dump made on them")
        if out and ids.shape[0] != out[0].shape[0]:
            raise InputError(f"{theirs.path}: {step_name(s, IDS)} has {ids.shape[0]} rows, step 0 {out[0].shape[0]}: "
                             f"the steps of a dump continue the same sequences")
        out.append(ids)
    return out


def their_activations(theirs: Dump, s: int, names: set[str], sizes: Mapping[str, int], rotary_dim: int,
                      last: bool, default_model: bool = False) -> dict[str, np.ndarray]:
    """Step s's activations under names, in the reference's layout (q and k of an interleaved port
    permuted to rotate-half); an InputError naming the tensor when a shape is not the schema's.
    With last, logits and norm may hold the last position only."""
    interleaved = theirs.metadata.get("rotary_layout", "half") == "interleaved"
    out = {}
    for name in sorted(names, key=forward_position):
        x = theirs.steps[s].tensors[name]
        op = split_name(name)[1]
        want = tuple(sizes[a] for a in LAYOUT[op].split())
        if last and op in ("logits", "norm") and x.ndim == 3 and x.shape[1] == 1:
            want = (want[0], 1, want[2])          # the last position only; every position is fine too
        if tuple(x.shape) != want:
            default = ("; no --model was given, so this is the default model: if the dump comes from another "
                       "model, name it with --model") if default_model else ""
            raise InputError(f"{theirs.path}: tensor {step_name(s, name)!r} has shape {tuple(x.shape)}, the "
                             f"reference's is {want} ({LAYOUT[op]}){shape_hint(x.shape, want, op, last)}{default}")
        if interleaved and op in ("attention.q", "attention.k"):
            x = interleaved_to_half(x, rotary_dim)
        out[name] = x
    return out


def needed_names(theirs: Dump, wanted: list[set[str]], n_layers: int) -> list[set[str]]:
    """The reference activations a check keeps, per step: those it compares, and for a break in a
    partial sum, the inputs each rank's piece is recomputed from. Nothing else is held."""
    keep = [set(w) for w in wanted]
    for s, names in enumerate(wanted):
        for name in names:
            layer, op = split_name(name)
            if theirs.piece_splits.get(name) is not None and theirs.piece_splits[name].kind == "partial-sum":
                keep[s].add(f"layers.{layer}.attention.scores_v" if op == "attention" else f"layers.{layer}.ffn_norm")
    return keep


def precision_notes(dt: str, kind: str, have_model: bool) -> list[str]:
    """What a pass in dt cannot see, and how to look closer."""
    rtol = parity_rtol(dt, kind)
    if dt == "float64":
        return []
    notes = []
    if dt == "bfloat16" and kind == "model":
        notes.append(f"bfloat16's end-to-end bar ({rtol:.0e}) lets a bug of several percent through: gate on "
                     f"--isolate{'' if have_model else ' (with --model)'}, each layer from its own input against "
                     f"{parity_rtol(dt, 'layer'):.0e}")
    notes.append(f"a {dt} pass cannot exclude a bug that moves an op by less than {rtol:.0e} of its scale (a norm "
                 f"eps of 1e-6 for 1e-5 moves a norm by ~3e-7): to see one, run the port in float64 on the same "
                 f"ids and check again, against 1e-10 (docs/porting.md, \"Bugs below float32's bar\")")
    return notes


# ---------------------------------------------------------------------------- hints
def rotary_hint(theirs: Dump, first, candidate, refs, rotary_dim: int) -> str | None:
    """When the first break is q or k and they match once read in the other rotary layout: say so."""
    if first.op not in ("attention.q", "attention.k"):
        return None
    declared = theirs.metadata.get("rotary_layout", "half")
    raw = theirs.steps[first.step].tensors[first.name]
    other, alt = (("interleaved", interleaved_to_half(raw, rotary_dim)) if declared == "half" else ("half", raw))
    ref = np.asarray(refs[first.step][first.name], dtype=np.float64)
    if errors(alt, ref)[1] <= first.rtol:
        return (f"{first.name} matches the reference when read in the {other} rotary layout: declare "
                f"rotary_layout={other!r} in the dump's metadata (it says {declared!r})")
    return None


def permutation_hint(theirs: Dump, first, candidate, refs, model: Transformer, ids: list[np.ndarray]) -> str | None:
    """When the first break is q or k and they match what the other permutation of wq / wk rows
    gives (rotate-half rows in an interleaved port, or the other way round), or wk permuted with
    n_heads instead of n_kv_heads: say which."""
    if first.op not in ("attention.q", "attention.k"):
        return None
    from .formats.permute import permute_to_half, permute_to_interleaved
    from .inputs import rotary_angles
    from .rope import apply_rotary_emb, rotate_half

    a = model.config
    rd = a.rotary_dim
    ref = np.asarray(refs[first.step][first.name], dtype=np.float64)         # (batch, heads, seq, head_dim)
    b, heads, seq, hd = ref.shape
    start = sum(i.shape[1] for i in ids[:first.step])
    positions = np.broadcast_to(np.arange(start, start + seq), (b, seq))
    cos, sin = rotary_angles(a, positions, np.ones((b, seq), dtype=bool), np.float64)
    rot, rest = ref[..., :rd], ref[..., rd:]
    pre = np.concatenate([(rot * cos - rotate_half(rot) * sin) / (cos * cos + sin * sin), rest], axis=-1)

    def rows(x, fn, n):       # a permutation of wq / wk rows, applied to the channels they make
        flat = x.transpose(1, 3, 0, 2).reshape(heads * hd, b * seq)
        return fn(flat, n).reshape(heads, hd, b, seq).transpose(2, 0, 3, 1)

    declared = theirs.metadata.get("rotary_layout", "half")
    interleaved = declared == "interleaved"
    to_half = (lambda x: interleaved_to_half(x, rd)) if interleaved else (lambda x: x)
    if interleaved:     # rotate-half rows in a port that rotates interleaved pairs
        other = (pre, f"{first.name} matches what rotate-half rows of wq / wk (Hugging Face's, npllama's "
                      f"state_dict()) give in a port that rotates interleaved pairs: permute them to the "
                      f"interleaved layout on load (npllama export --layout meta writes them so)")
    else:               # interleaved rows in a port that rotates halves
        other = (half_to_interleaved(pre, rd), f"{first.name} matches what interleaved rows of wq / wk (Meta's, "
                                               f"a GGUF file's) give in a rotate-half port: permute them to "
                                               f"rotate-half on load (npllama.load().state_dict() holds them so)")
    hypotheses = [other]
    if first.op == "attention.k" and a.n_kv_heads != a.n_heads and (heads * hd) % a.n_heads == 0 \
            and (heads * hd // a.n_heads) % 2 == 0:
        try:
            wrong = (rows(pre, permute_to_interleaved, a.n_heads) if interleaved else
                     rows(rows(pre, permute_to_interleaved, heads), permute_to_half, a.n_heads))
            hypotheses.append((wrong, f"{first.name} matches wk's rows permuted with n_heads ({a.n_heads}) instead "
                                      f"of n_kv_heads ({heads}): permute wk with the number of key/value heads"))
        except Exception:     # a head count that does not divide the rows: not this bug
            pass
    got = candidate[first.step][first.name]
    for port_pre, message in hypotheses:
        predicted = apply_rotary_emb(to_half(port_pre), cos, sin)
        if errors(got, predicted)[1] <= first.rtol:
            return message
    return None


# ---------------------------------------------------------------------------- ranks
def worst_of_replicas(theirs: Dump, s: int, rows: list, ref: Mapping[str, np.ndarray], rotary_dim: int) -> list:
    """A replicated name's row holds its worst rank's copy (the gathered dump keeps rank 0's)."""
    from .report import Row

    out = []
    for r in rows:
        split = theirs.piece_splits.get(r.name)
        pieces = theirs.pieces.get((s, r.name))
        if r.step == s and split is not None and split.kind == "replicated" and pieces and len(pieces) > 1:
            errs = [errors(their_piece(theirs, r.name, p, rotary_dim, ref[r.name].shape), ref[r.name])
                    for p in pieces]
            max_abs, rel = max(errs, key=lambda e: (np.nan_to_num(e[1], nan=np.inf), e[0]))
            r = Row(r.name, r.layer, r.op, max_abs, rel, r.rtol, r.step)
        out.append(r)
    return out


def their_piece(theirs: Dump, name: str, x: np.ndarray, rotary_dim: int, want_shape) -> np.ndarray:
    """One rank's piece in the reference's rotary layout (a per-head permutation: pieces of heads
    permute alone); the last position only where the whole is."""
    interleaved = theirs.metadata.get("rotary_layout", "half") == "interleaved"
    if interleaved and split_name(name)[1] in ("attention.q", "attention.k"):
        x = interleaved_to_half(x, rotary_dim)
    if x.ndim == 3 and x.shape[1] > 1 and want_shape[1] == 1:
        x = x[:, -1:]
    return x


def break_ranks(theirs: Dump, first, refs, model: Transformer | None,
                rotary_dim: int) -> tuple[list[int] | None, str | None]:
    """Which ranks' pieces carry the first break: the reference cut as the dump's split cuts the
    name (a shard along its axis; a partial sum recomputed from the rank's heads or hidden units
    and its slice of wo or w2), each piece compared with its own. -> (ranks, a note)."""
    split = theirs.piece_splits.get(first.name)
    pieces = theirs.pieces.get((first.step, first.name))
    if split is None or not pieces:
        return None, None
    ref = np.asarray(refs[first.step][first.name], dtype=np.float64)
    wants = split.cut(ref, [p.shape for p in pieces])
    if wants is None:
        wants = partial_sum_pieces(theirs, first, refs, model, len(pieces))
        if wants is None:
            return None, (f"{first.name} is a partial sum: which rank's piece is wrong needs each rank's own sum, "
                          f"recomputed from the model's weights (--model{'' if model is None else ', no biases'})")
    rels = []
    for p, want in zip(pieces, wants):
        p = their_piece(theirs, first.name, p, rotary_dim, want.shape)
        if p.shape != want.shape:
            return None, f"{first.name}: rank pieces of shapes {[q.shape for q in pieces]} do not cut the reference"
        rels.append(errors(p, want)[1])
    over = [r for r, rel in enumerate(rels) if not rel <= first.rtol]
    ranks = over or [int(np.nanargmax(np.nan_to_num(rels, nan=np.inf)))]
    detail = ", ".join(f"rank {r} {rel:.1e}" for r, rel in enumerate(rels))
    return ranks, f"{first.name} compared rank by rank ({split}): {detail} against {first.rtol:.0e}"


def partial_sum_pieces(theirs: Dump, first, refs, model: Transformer | None, world: int) -> list[np.ndarray] | None:
    """Each rank's share of wo's or w2's output, from the reference's input to it and the rank's
    contiguous slice of the heads (as the dump's scores_v pieces cut them, else equal parts) or of
    the hidden units (equal parts): Megatron's and gpt-fast's tensor-parallel cut. None when it
    cannot be told (no model, a bias, another op)."""
    from .mlp import feed_forward, linear
    from .model import merge_heads

    if model is None or first.layer is None:
        return None
    layer = model.layers[first.layer]
    step = refs[first.step]
    if first.op == "attention" and layer.bo is None:
        sv_name = f"layers.{first.layer}.attention.scores_v"
        sv = step.get(sv_name)
        if sv is None:
            return None
        cut = theirs.pieces.get((first.step, sv_name))
        split = theirs.piece_splits.get(sv_name)
        counts = ([p.shape[1] for p in cut] if cut and split is not None and split.kind == "shard" and split.axis == 1
                  else [len(h) for h in np.array_split(np.arange(sv.shape[1]), world)])
        edges = np.cumsum([0, *counts])
        hd, wo = sv.shape[-1], np.asarray(layer.wo)          # a GGUF's blocks: this one matrix dequantized
        return [linear(merge_heads(sv[:, edges[r]:edges[r + 1]]), wo[:, edges[r] * hd:edges[r + 1] * hd])
                for r in range(world)]
    if first.op == "feed_forward" and layer.b2 is None:
        y = step.get(f"layers.{first.layer}.ffn_norm")
        if y is None:
            return None
        out = []
        w1, w2, w3 = (np.asarray(w) for w in (layer.w1, layer.w2, layer.w3))
        for part in np.array_split(np.arange(w1.shape[0]), world):
            lo, hi = part[0], part[-1] + 1
            b1 = None if layer.b1 is None else layer.b1[lo:hi]
            b3 = None if layer.b3 is None else layer.b3[lo:hi]
            out.append(feed_forward(y, w1[lo:hi], w2[:, lo:hi], w3[lo:hi], b1, None, b3))
        return out
    return None


# ---------------------------------------------------------------------------- text
def shape_hint(got: tuple, want: tuple, op: str = "", last: bool = False) -> str:
    """A likely fix for a wrong shape: heads and seq swapped, the heads not split, last position only."""
    if len(got) == 4 and len(want) == 4 and (got[0], got[2], got[1], got[3]) == tuple(want):
        return "; heads and seq are swapped: write x.transpose(1, 2)"
    if len(got) == 3 and len(want) == 4 and got == (want[0], want[2], want[1] * want[3]):
        return "; the heads are not split: write x.view(batch, seq, heads, head_dim).transpose(1, 2)"
    if op in ("logits", "norm") and not last and len(got) == 3 and len(want) == 3 and got[1] == 1 \
            and (got[0], got[2]) == (want[0], want[2]):
        return ("; the last position only: pass --last-only, or write logits_positions 'last' in the dump's "
                "metadata")
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
    from .formats import detect_format, resolve
    from .formats.hf import weight_files
    from .weights import cached_sha256

    fmt, where = detect_format(resolve(path))
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


def describe(dump_path: str | os.PathLike, steps: Sequence[tuple[Mapping[str, np.ndarray], np.ndarray]] | Mapping,
             ids: np.ndarray | None = None) -> str:
    """One line about a written dump: how many activations, on how many tokens, how many steps, how big."""
    if isinstance(steps, Mapping):           # one step's activations, and its ids
        steps = [(steps, ids)]
    size = os.path.getsize(dump_path)
    shown = f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 1024:.0f} KiB"
    acts, first = steps[0]
    more = f", then {len(steps) - 1} decode steps" if len(steps) > 1 else ""
    return (f"wrote {dump_path}: {len(acts)} activations and {IDS} {first.shape[0]} x {first.shape[1]}{more} "
            f"({shown})")
