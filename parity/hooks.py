"""Capture any PyTorch model's activations under npllama's trace names, and write them as a dump.

    import parity

    with parity.capture(hf_model, "transformers") as captured, torch.no_grad():
        hf_model(input_ids=ids)
    captured.save("mine.safetensors")            # then: npllama parity --against mine.safetensors

A *name map* says where each trace name (npllama/dump.py lists them) is read in the model:
``{"layers.{i}.ffn_norm": "model.layers.{i}.post_attention_layernorm", ...}``. A value is the
dotted name of a submodule, whose output is taken, or a ``Tap`` for anything else: a module's
input, one element of a tuple, a reshape into the schema's layout, or the result of a plain
function the model calls (rotary embeddings are usually one, so q and k after rotary are read by
wrapping that function for the duration of the capture). ``{i}`` stands for the layer index, in
the names and in the module paths alike. Names the map leaves out are simply not in the dump.

Ready-made maps, picked by name (``capture(model, "meta")``; ``npllama capture --map meta``) and
sized from the model itself (ready_map): "transformers" for transformers' LlamaForCausalLM (what
``npllama parity --transformers`` compares), "gpt-fast" for gpt-fast's model.py and ports with its
module names (docs/my_port.py), "meta" for Meta's llama / llama3 / llama-models model.py. The
functions behind them (transformers_llama, gpt_fast, meta_llama) build a map from sizes alone.

Steps. Each call of the captured module inside one ``with`` block is one *step*: the first is the
prefill, each later one a decode step through the model's own KV cache. ``save`` writes them all
as one dump (schema 2: step 0's names bare, step s's under ``step.{s}.``), each with the token ids
of its call, read from the call's first argument or its ``input_ids=`` / ``tokens=`` / ``idx=``.
A name recorded twice within one call is refused.
"""

from __future__ import annotations

import difflib
import importlib
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch
from torch import nn

from npllama.dump import IDS, LAYOUT, dump_metadata, step_name
from npllama.errors import InputError
from npllama.io import atomic_write
from npllama.report import in_forward_order, split_name
from npllama.tolerances import dtype_name


@dataclass(frozen=True)
class Tap:
    """Where one activation is read in someone's model.

    module     dotted submodule name, "{i}" for the layer index: "model.layers.{i}.mlp"
    function   instead of module: "package.module.name" of a module-level function the model
               calls (looked up in that module's namespace at call time, as Python does); it is
               wrapped while the capture is open
    port       "output" (default) or "input" of the module or function
    index      which element of a tuple output, or which argument of the input (an int for a
               positional one, a str for a keyword)
    call       for a function called more than once per layer: which call (0 is the first)
    transform  applied to the tensor, to bring it into the schema's layout (split_heads(n), ...)
    """
    module: str | None = None
    function: str | None = None
    port: str = "output"
    index: int | str = 0
    call: int = 0
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __post_init__(self):
        if (self.module is None) == (self.function is None):
            raise InputError("a Tap reads either a module or a function: give one of module=, function=")
        if self.port not in ("output", "input"):
            raise InputError(f"Tap port {self.port!r}: choose 'output' or 'input'")


def split_heads(n_heads: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """(batch, seq, n_heads * head_dim) -> (batch, n_heads, seq, head_dim): the schema's q/k/v layout."""
    def split(x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        return x.reshape(b, s, n_heads, -1).transpose(1, 2)
    return split


def seq_to_heads(x: torch.Tensor) -> torch.Tensor:
    """(batch, seq, heads, head_dim) -> (batch, heads, seq, head_dim)."""
    return x.transpose(1, 2)


# ---------------------------------------------------------------------------- ready-made maps
def transformers_llama(config) -> dict[str, str | Tap]:
    """The name map of transformers' LlamaForCausalLM (config: its LlamaConfig). q and k after
    rotary are the two results of modeling_llama.apply_rotary_pos_emb."""
    rope = "transformers.models.llama.modeling_llama.apply_rotary_pos_emb"
    layer = "model.layers.{i}"
    return {
        "tok_embeddings": "model.embed_tokens",
        "layers.{i}.attention_norm": f"{layer}.input_layernorm",
        "layers.{i}.attention.q": Tap(function=rope, index=0),
        "layers.{i}.attention.k": Tap(function=rope, index=1),
        "layers.{i}.attention.v": Tap(f"{layer}.self_attn.v_proj", transform=split_heads(config.num_key_value_heads)),
        "layers.{i}.attention.scores_v": Tap(f"{layer}.self_attn.o_proj", port="input",
                                             transform=split_heads(config.num_attention_heads)),
        "layers.{i}.attention": f"{layer}.self_attn.o_proj",
        "layers.{i}.attention_residual": Tap(f"{layer}.post_attention_layernorm", port="input"),
        "layers.{i}.ffn_norm": f"{layer}.post_attention_layernorm",
        "layers.{i}.feed_forward": f"{layer}.mlp",
        "layers.{i}.ffn_residual": layer,
        "norm": "model.norm",
        "logits": "lm_head",
    }


def _meta_names(n_heads: int) -> dict[str, str | Tap]:
    """The names Meta's model.py and gpt-fast share: every module but the q/k/v projections."""
    return {
        "tok_embeddings": "tok_embeddings",
        "layers.{i}.attention_norm": "layers.{i}.attention_norm",
        "layers.{i}.attention.scores_v": Tap("layers.{i}.attention.wo", port="input", transform=split_heads(n_heads)),
        "layers.{i}.attention": "layers.{i}.attention.wo",
        "layers.{i}.attention_residual": Tap("layers.{i}.ffn_norm", port="input"),
        "layers.{i}.ffn_norm": "layers.{i}.ffn_norm",
        "layers.{i}.feed_forward": "layers.{i}.feed_forward",
        "layers.{i}.ffn_residual": "layers.{i}",
        "norm": "norm",
        "logits": "output",
    }


def gpt_fast(n_heads: int, n_kv_heads: int, head_dim: int, rope: str | None = None) -> dict[str, str | Tap]:
    """The name map of a port with gpt-fast's module names: tok_embeddings, layers.{i}.attention_norm,
    .attention.wqkv (q|k|v fused), .attention.wo, .ffn_norm, .feed_forward, norm, output.

    rope: "package.module.function" of the port's rotary function, called on q and then on k as
    (batch, seq, heads, head_dim); without it q and k are not captured. gpt-fast rotates the
    interleaved layout: save the dump with rotary_layout="interleaved" (the ready-made "gpt-fast"
    map does).
    """
    v_from = (n_heads + n_kv_heads) * head_dim     # wqkv's output is q | k | v
    taps = _meta_names(n_heads)
    taps["layers.{i}.attention.v"] = Tap("layers.{i}.attention.wqkv",
                                         transform=lambda x: split_heads(n_kv_heads)(x[..., v_from:]))
    if rope is not None:
        taps["layers.{i}.attention.q"] = Tap(function=rope, call=0, transform=seq_to_heads)
        taps["layers.{i}.attention.k"] = Tap(function=rope, call=1, transform=seq_to_heads)
    return taps


def meta_llama(n_heads: int, n_kv_heads: int, rope: str | None = None) -> dict[str, str | Tap]:
    """The name map of Meta's llama / llama3 / llama-models model.py: tok_embeddings,
    layers.{i}.attention_norm, .attention.wq / wk / wv / wo (separate), .ffn_norm,
    .feed_forward (w1, w2, w3), norm, output.

    n_heads, n_kv_heads: the heads this process computes (Meta's n_local_heads and
    n_local_kv_heads: all of them at model-parallel size 1). rope: "package.module.apply_rotary_emb"
    of the model's module, which Meta calls once per layer as (xq, xk) -> (xq, xk), each
    (batch, seq, heads, head_dim); without it q and k are not captured. Meta rotates the
    interleaved layout: save with rotary_layout="interleaved" (the ready-made "meta" map does).
    """
    taps = _meta_names(n_heads)
    taps["layers.{i}.attention.v"] = Tap("layers.{i}.attention.wv", transform=split_heads(n_kv_heads))
    if rope is not None:
        taps["layers.{i}.attention.q"] = Tap(function=rope, index=0, transform=seq_to_heads)
        taps["layers.{i}.attention.k"] = Tap(function=rope, index=1, transform=seq_to_heads)
    return taps


# name -> the rotary layout its models compute in (what ``save`` declares by default)
READY_MAPS = {"transformers": "half", "gpt-fast": "interleaved", "meta": "interleaved"}


def ready_map(name: str, model: nn.Module) -> dict[str, str | Tap]:
    """The ready-made map called name ("transformers", "gpt-fast", "meta"), sized from the model:
    transformers' from model.config; gpt-fast's and Meta's from layer 0's attention module (gpt-fast:
    n_head, n_local_heads, head_dim; Meta: n_local_heads, n_local_kv_heads), with the
    apply_rotary_emb of the module that defines that attention class."""
    if name not in READY_MAPS:
        near = difflib.get_close_matches(str(name), READY_MAPS, n=1, cutoff=0.3)
        raise InputError(f"no ready-made map {name!r}{f' (did you mean {near[0]!r}?)' if near else ''}; choose one of "
                         f"{', '.join(READY_MAPS)}, or give a dict of trace name -> submodule")
    if name == "transformers":
        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "num_key_value_heads"):
            raise InputError(f"ready-made map 'transformers': {type(model).__name__} has no LlamaConfig as .config; "
                             f"it is for transformers' LlamaForCausalLM")
        return transformers_llama(config)
    modules = dict(model.named_modules())
    attention = modules.get("layers.0.attention")
    if attention is None:
        raise InputError(f"ready-made map {name!r} reads {_ported(name)} module names, and {type(model).__name__} has no "
                         f"'layers.0.attention'; nearest: {', '.join(nearest('layers.{i}.attention', modules))}")
    sizes = ("n_head", "n_local_heads", "head_dim") if name == "gpt-fast" else ("n_local_heads", "n_local_kv_heads")
    missing = [a for a in sizes if not isinstance(getattr(attention, a, None), int)]
    if missing:
        builder = "gpt_fast(n_heads, n_kv_heads, head_dim, rope=...)" if name == "gpt-fast" else \
            "meta_llama(n_heads, n_kv_heads, rope=...)"
        raise InputError(f"ready-made map {name!r}: layers.0.attention ({type(attention).__name__}) has no "
                         f"{', '.join(missing)} ({_ported(name)} names for its sizes); build the map with "
                         f"parity.hooks.{builder}")
    owner = type(attention).__module__
    rope = f"{owner}.apply_rotary_emb" if callable(getattr(sys.modules.get(owner), "apply_rotary_emb", None)) else None
    if name == "gpt-fast":
        return gpt_fast(attention.n_head, attention.n_local_heads, attention.head_dim, rope=rope)
    return meta_llama(attention.n_local_heads, attention.n_local_kv_heads, rope=rope)


def _ported(name: str) -> str:
    return {"gpt-fast": "gpt-fast's", "meta": "Meta's model.py", "transformers": "transformers'"}[name]


def nearest(pattern: str, modules, n: int = 3) -> list[str]:
    """The n submodule names most like pattern, layer indices shown as {i} when pattern has one.

    Alike by difflib's ratio plus the share of pattern that a name starts with, so that
    "model.layers.{i}.post_norm" finds "model.layers.{i}.post_attention_layernorm" before the
    shorter "model.layers.{i}.input_layernorm".
    """
    names = [m for m in modules if m]
    if "{i}" in pattern:
        names = list(dict.fromkeys(re.sub(r"(^|\.)\d+(?=\.|$)", r"\1{i}", m) for m in names))

    def likeness(name: str) -> float:
        prefix = len(os.path.commonprefix([pattern, name]))
        return difflib.SequenceMatcher(None, pattern, name).ratio() + prefix / max(1, len(pattern))

    return [repr(f) for f in sorted(names, key=likeness, reverse=True)[:n]] or ["(it has no submodules)"]


# ---------------------------------------------------------------------------- capturing
ID_KEYWORDS = ("input_ids", "tokens", "idx", "ids")     # transformers', Meta's, gpt-fast's, others'


class Capture:
    """Hooks on a model that record the activations a name map names, while the ``with`` block runs.

    After the block, ``steps`` holds one dict per call of the module (detached copies on the CPU,
    in the model's dtype) and ``step_ids`` each call's token ids (None where none was found);
    ``tensors`` is step 0's, ``numpy(step)`` gives a step's as float64 arrays, and ``save`` writes
    every step as one dump.
    """

    def __init__(self, module: nn.Module, name_map: Mapping[str, str | Tap] | str, layers: str | None = None):
        self.module = module
        self.rotary_layout = "half"
        if isinstance(name_map, str):
            self.rotary_layout = READY_MAPS.get(name_map, "half")
            self.map_name = name_map
            name_map = ready_map(name_map, module)
        else:
            self.map_name = None
        self.taps = {name: tap if isinstance(tap, Tap) else Tap(tap) for name, tap in name_map.items()}
        self.layers = layers if layers is not None else self._layer_pattern()
        self.steps: list[dict[str, torch.Tensor]] = []
        self.step_ids: list[torch.Tensor | None] = []
        self._handles: list = []
        self._patched: list[tuple[object, str, Callable]] = []
        self._layer: int | None = None
        self._calls: dict[str, int] = {}

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """Step 0's activations (the only step of a one-pass capture)."""
        return self.steps[0] if self.steps else {}

    # -------------------------------------------------------------- the hooks
    def __enter__(self) -> "Capture":
        try:
            self._install()
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._remove()

    def _install(self) -> None:
        modules = dict(self.module.named_modules())
        self._handles.append(self.module.register_forward_pre_hook(self._begin_step, with_kwargs=True, prepend=True))
        for name, tap in self.taps.items():
            if tap.module is None:
                continue
            found = matches(tap.module, modules)
            if not found:
                raise InputError(f"name map: {name!r} -> {tap.module!r} matches no submodule of "
                                 f"{type(self.module).__name__}; nearest: {', '.join(nearest(tap.module, modules))}")
            for i, mod in found:
                self._hook(mod, name.replace("{i}", str(i)) if i is not None else name, tap)
        functions = {tap.function for tap in self.taps.values() if tap.function is not None}
        if functions:
            if self.layers is None:
                raise InputError("name map: function taps need to know which module is a layer; pass "
                                 "layers='model.layers.{i}' (the dotted name of layer i)")
            for i, mod in matches(self.layers, modules):
                self._handles.append(mod.register_forward_pre_hook(lambda m, a, i=i: self._enter_layer(i)))
                self._handles.append(mod.register_forward_hook(lambda m, a, o: self._enter_layer(None)))
            for function in functions:
                self._wrap(function)

    def _begin_step(self, module, args, kwargs) -> None:
        """A call of the captured module: a new step, with the token ids it was called on."""
        self.steps.append({})
        self.step_ids.append(root_ids(args, kwargs))

    def _hook(self, mod: nn.Module, name: str, tap: Tap) -> None:
        if tap.port == "input":
            def on_input(m, args, kwargs):
                self._put(name, tap, args, kwargs)
            self._handles.append(mod.register_forward_pre_hook(on_input, with_kwargs=True))
        else:
            def on_output(m, args, output):
                self._put(name, tap, output)
            self._handles.append(mod.register_forward_hook(on_output))

    def _wrap(self, function: str) -> None:
        module_name, _, attr = function.rpartition(".")
        try:
            owner = importlib.import_module(module_name)
            real = getattr(owner, attr)
        except (ImportError, AttributeError, ValueError):
            raise InputError(f"name map: function {function!r} not found; give the module that defines "
                             f"and calls it, e.g. 'mypackage.model.apply_rotary_emb'") from None
        taps = [(name, tap) for name, tap in self.taps.items() if tap.function == function]

        def wrapped(*args, **kwargs):
            output = real(*args, **kwargs)
            call = self._calls.get(function, 0)
            self._calls[function] = call + 1
            for name, tap in taps:
                if tap.call != call:
                    continue
                if "{i}" in name and self._layer is None:
                    raise InputError(f"{function} was called outside a layer ({self.layers}); "
                                     f"{name!r} needs the layer index")
                full = name.replace("{i}", str(self._layer))
                self._put(full, tap, *((args, kwargs) if tap.port == "input" else (output,)))
            return output

        setattr(owner, attr, wrapped)
        self._patched.append((owner, attr, real))

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        for owner, attr, real in reversed(self._patched):
            setattr(owner, attr, real)
        self._handles, self._patched = [], []

    def _enter_layer(self, i: int | None) -> None:
        self._layer = i
        self._calls = {}

    def _put(self, name: str, tap: Tap, value, kwargs=None) -> None:
        if kwargs is not None:                                    # an input: (args, kwargs)
            if isinstance(tap.index, str) and tap.index in kwargs:
                value = kwargs[tap.index]
            elif isinstance(tap.index, int) and tap.index < len(value):
                value = value[tap.index]
            else:
                raise InputError(f"{name}: the call had {len(value)} positional inputs and the keywords "
                                 f"{sorted(kwargs)}; set Tap.index to the position or keyword to read")
        elif isinstance(value, (tuple, list)):
            value = value[tap.index]
        if not isinstance(value, torch.Tensor):
            raise InputError(f"{name}: the tap read a {type(value).__name__}, not a tensor; set Tap.index")
        if tap.transform is not None:
            value = tap.transform(value)
        if not self.steps:                       # a submodule called without the captured module
            self.steps.append({})
            self.step_ids.append(None)
        step = self.steps[-1]
        if name in step:
            raise InputError(f"{name} was recorded twice within one call of {type(self.module).__name__} (step "
                             f"{len(self.steps) - 1}): each call is one step and reads each name once; check the "
                             f"map for two names on one tap, or Tap.call for a function called more than once")
        step[name] = value.detach().to("cpu", copy=True)

    # -------------------------------------------------------------- results
    def _layer_pattern(self) -> str | None:
        """The dotted name of layer {i}, from the module taps: "model.layers.{i}.mlp" -> "model.layers.{i}"."""
        found = {t.module[: t.module.index("{i}") + 3] for t in self.taps.values()
                 if t.module is not None and "{i}" in t.module}
        return found.pop() if len(found) == 1 else None

    def numpy(self, step: int = 0) -> dict[str, np.ndarray]:
        """One step's activations as float64 arrays, in forward order."""
        return in_forward_order({k: v.to(torch.float64).numpy() for k, v in self.steps[step].items()})

    def save(self, path, input_ids=None, *, rotary_layout: str | None = None, dtype=None, producer: str | None = None,
             rank: int = 0, world_size: int = 1, splits: Mapping[str, str] | None = None,
             logits_positions: str = "all", **metadata: str | None) -> Path:
        """Write every step's activations and token ids as one dump (schema 2), atomically.

        input_ids: the ids each step ran on, when the calls' own were not found or are not the
        ones to record: a list of (batch, seq) arrays, one per step, or one (batch, seq) array
        holding all the steps' ids side by side (split by each step's length).
        rotary_layout: "interleaved" when the model rotates pairs (2i, 2i+1) (Meta, gpt-fast; the
        ready-made maps say it themselves), else "half". dtype: the dtype the model computed in
        (default: its parameters'). rank, world_size, splits: which rank of a tensor-parallel run
        wrote this file, and how each name's tensor relates to the whole (npllama/dump.py).
        logits_positions: "last" when the model computes the last position's logits only.
        metadata: more strings (prompt, model, model_sha256, ...). Bfloat16 tensors are stored as BF16.
        """
        from safetensors.torch import save

        if not any(self.steps):
            raise InputError("nothing was recorded: run the model inside the `with` block")
        ids = self._ids(input_ids)
        if dtype is None:
            first = next(self.module.parameters(), None)
            dtype = first.dtype if first is not None else next(iter(self.steps[0].values())).dtype
        name = self.map_name and f", {self.map_name} map"
        meta = dump_metadata(dtype_name(dtype), producer or f"parity.capture of {type(self.module).__name__}{name or ''}",
                             rotary_layout or self.rotary_layout, steps=len(self.steps), rank=rank,
                             world_size=world_size, splits=splits, logits_positions=logits_positions, **metadata)
        tensors = {}
        for s, (step, step_ids) in enumerate(zip(self.steps, ids)):
            tensors[step_name(s, IDS)] = step_ids.to(torch.int64).contiguous()
            tensors.update({step_name(s, k): v.contiguous() for k, v in step.items()})
        data = save(tensors, metadata=meta)
        with atomic_write(path) as f:
            f.write(data)
        return Path(path)

    def _ids(self, given) -> list[torch.Tensor]:
        """Each step's (batch, seq) token ids: given's, or the ones each call was made with."""
        n = len(self.steps)
        if given is None:
            missing = [s for s, ids in enumerate(self.step_ids) if ids is None]
            if missing:
                raise InputError(f"step {missing[0]}: the call's token ids were not found (its first argument, or "
                                 f"{'= / '.join(ID_KEYWORDS)}=); pass input_ids= to save")
            return [as_ids(ids) for ids in self.step_ids]
        if isinstance(given, (list, tuple)) and given and all(isinstance(g, (torch.Tensor, np.ndarray)) for g in given):
            if len(given) != n:
                raise InputError(f"input_ids: {len(given)} arrays for {n} recorded step(s); give one per call")
            return [as_ids(g) for g in given]
        whole = as_ids(given)
        if n == 1:
            return [whole]
        lengths = [self._step_len(s) for s in range(n)]
        if sum(lengths) != whole.shape[1]:
            raise InputError(f"input_ids has {whole.shape[1]} positions; the {n} steps ran {'+'.join(map(str, lengths))}"
                             f" = {sum(lengths)}: give every step's ids, in order")
        return list(torch.split(whole, lengths, dim=1))

    def _step_len(self, s: int) -> int:
        """How many positions step s ran: its ids', or the seq axis of one of its activations."""
        if self.step_ids[s] is not None:
            return as_ids(self.step_ids[s]).shape[1]
        for name, x in self.steps[s].items():
            op = split_name(name)[1]
            if op in LAYOUT and op != "logits":
                return x.shape[LAYOUT[op].split().index("seq")]
        raise InputError(f"step {s}: no activation says how many positions it ran; pass input_ids= one array per step")


def root_ids(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The token ids a model was called on: a keyword in ID_KEYWORDS, or the first positional
    argument, when it is an integer tensor; else None."""
    for key in ID_KEYWORDS:
        value = kwargs.get(key)
        if isinstance(value, torch.Tensor):
            break
    else:
        value = args[0] if args else None
    if isinstance(value, torch.Tensor) and not value.is_floating_point() and not value.is_complex() and value.ndim in (1, 2):
        return value.detach().to("cpu", copy=True)
    return None


def as_ids(ids) -> torch.Tensor:
    """(batch, seq) int64 token ids on the CPU from a tensor, an array or a list (a (seq,) row gains batch 1)."""
    ids = torch.as_tensor(np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids))
    return (ids[None] if ids.ndim == 1 else ids).to(torch.int64)


def capture(module: nn.Module, name_map: Mapping[str, str | Tap] | str, layers: str | None = None) -> Capture:
    """Record module's activations under npllama's names while a ``with`` block runs it.

    name_map: trace name -> submodule name or Tap (see the module docstring), or the name of a
    ready-made map ("transformers", "gpt-fast", "meta"); layers: the dotted name of layer {i},
    needed by function taps (default: read off the module taps).
    """
    return Capture(module, name_map, layers)


def matches(pattern: str, modules: Mapping[str, nn.Module]) -> list[tuple[int | None, nn.Module]]:
    """The submodules a dotted name with an optional {i} names: [(i or None, module)], by i."""
    if "{i}" not in pattern:
        return [(None, modules[pattern])] if pattern in modules else []
    regex = re.compile(re.escape(pattern).replace(re.escape("{i}"), r"(\d+)"))
    found = [(int(m.group(1)), mod) for name, mod in modules.items() if (m := regex.fullmatch(name))]
    return sorted(found, key=lambda pair: pair[0])
