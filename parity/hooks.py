"""Capture any PyTorch model's activations under npllama's trace names, and write them as a dump.

    import parity
    from parity.hooks import transformers_llama

    with parity.capture(hf_model, transformers_llama(hf_model.config)) as captured:
        hf_model(input_ids=ids)
    captured.save("mine.safetensors", ids)       # then: npllama parity --against mine.safetensors

A *name map* says where each trace name (npllama/oracle.py lists them) is read in the model:
``{"layers.{i}.ffn_norm": "model.layers.{i}.post_attention_layernorm", ...}``. A value is the
dotted name of a submodule, whose output is taken, or a ``Tap`` for anything else: a module's
input, one element of a tuple, a reshape into the schema's layout, or the result of a plain
function the model calls (rotary embeddings are usually one, so q and k after rotary are read by
wrapping that function for the duration of the capture). ``{i}`` stands for the layer index, in
the names and in the module paths alike. Names the map leaves out are simply not in the dump.

Two ready-made maps: ``transformers_llama(config)`` for transformers' LlamaForCausalLM (what
``npllama parity --transformers`` compares), and ``gpt_fast(...)`` for a hand-written port with
gpt-fast's module names (docs/porting.md builds one).
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch
from torch import nn

from npllama.errors import InputError
from npllama.io import atomic_write
from npllama.oracle import IDS, dump_metadata
from npllama.report import in_forward_order
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


def gpt_fast(n_heads: int, n_kv_heads: int, head_dim: int, rope: str | None = None) -> dict[str, str | Tap]:
    """The name map of a port with gpt-fast's module names: tok_embeddings, layers.{i}.attention_norm,
    .attention.wqkv (q|k|v fused), .attention.wo, .ffn_norm, .feed_forward, norm, output.

    rope: "package.module.function" of the port's rotary function, called on q and then on k as
    (batch, seq, heads, head_dim); without it q and k are not captured. gpt-fast rotates the
    interleaved layout: save the dump with rotary_layout="interleaved".
    """
    v_from = (n_heads + n_kv_heads) * head_dim     # wqkv's output is q | k | v
    taps: dict[str, str | Tap] = {
        "tok_embeddings": "tok_embeddings",
        "layers.{i}.attention_norm": "layers.{i}.attention_norm",
        "layers.{i}.attention.v": Tap("layers.{i}.attention.wqkv",
                                      transform=lambda x: split_heads(n_kv_heads)(x[..., v_from:])),
        "layers.{i}.attention.scores_v": Tap("layers.{i}.attention.wo", port="input", transform=split_heads(n_heads)),
        "layers.{i}.attention": "layers.{i}.attention.wo",
        "layers.{i}.attention_residual": Tap("layers.{i}.ffn_norm", port="input"),
        "layers.{i}.ffn_norm": "layers.{i}.ffn_norm",
        "layers.{i}.feed_forward": "layers.{i}.feed_forward",
        "layers.{i}.ffn_residual": "layers.{i}",
        "norm": "norm",
        "logits": "output",
    }
    if rope is not None:
        taps["layers.{i}.attention.q"] = Tap(function=rope, call=0, transform=seq_to_heads)
        taps["layers.{i}.attention.k"] = Tap(function=rope, call=1, transform=seq_to_heads)
    return taps


# ---------------------------------------------------------------------------- capturing
class Capture:
    """Hooks on a model that record the activations a name map names, while the ``with`` block runs.

    After the block, ``tensors`` holds them (detached copies on the CPU, in the model's dtype),
    ``numpy()`` gives them as float64 arrays, and ``save`` writes them as a dump.
    """

    def __init__(self, module: nn.Module, name_map: Mapping[str, str | Tap], layers: str | None = None):
        self.module = module
        self.taps = {name: tap if isinstance(tap, Tap) else Tap(tap) for name, tap in name_map.items()}
        self.layers = layers if layers is not None else self._layer_pattern()
        self.tensors: dict[str, torch.Tensor] = {}
        self._handles: list = []
        self._patched: list[tuple[object, str, Callable]] = []
        self._layer: int | None = None
        self._calls: dict[str, int] = {}

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
        for name, tap in self.taps.items():
            if tap.module is None:
                continue
            found = matches(tap.module, modules)
            if not found:
                example = next((n for n in modules if n), "")
                raise InputError(f"name map: {name!r} -> {tap.module!r} matches no submodule of "
                                 f"{type(self.module).__name__} (its submodules are named like {example!r})")
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
        if name in self.tensors:
            raise InputError(f"{name} was recorded twice: capture one forward call per `with` block")
        self.tensors[name] = value.detach().to("cpu", copy=True)

    # -------------------------------------------------------------- results
    def _layer_pattern(self) -> str | None:
        """The dotted name of layer {i}, from the module taps: "model.layers.{i}.mlp" -> "model.layers.{i}"."""
        found = {t.module[: t.module.index("{i}") + 3] for t in self.taps.values()
                 if t.module is not None and "{i}" in t.module}
        return found.pop() if len(found) == 1 else None

    def numpy(self) -> dict[str, np.ndarray]:
        """The recorded activations as float64 arrays, in forward order."""
        return in_forward_order({k: v.to(torch.float64).numpy() for k, v in self.tensors.items()})

    def save(self, path, input_ids, *, rotary_layout: str = "half", dtype=None, producer: str | None = None,
             **metadata: str | None) -> Path:
        """Write the recorded activations and input_ids ((batch, seq) token ids) as a dump, atomically.

        rotary_layout: "interleaved" when the model rotates pairs (2i, 2i+1) (Meta, gpt-fast);
        dtype: the dtype the model computed in (default: its parameters'); metadata: more strings
        (prompt, model, model_sha256, ...). Bfloat16 tensors are stored as BF16.
        """
        from safetensors.torch import save

        if not self.tensors:
            raise InputError("nothing was recorded: run the model inside the `with` block")
        ids = torch.as_tensor(np.asarray(input_ids.cpu() if isinstance(input_ids, torch.Tensor) else input_ids))
        if ids.ndim == 1:
            ids = ids[None]
        if dtype is None:
            first = next(self.module.parameters(), None)
            dtype = first.dtype if first is not None else next(iter(self.tensors.values())).dtype
        meta = dump_metadata(dtype_name(dtype), producer or f"parity.capture of {type(self.module).__name__}",
                             rotary_layout, **metadata)
        tensors = {IDS: ids.to(torch.int64).contiguous(), **{k: v.contiguous() for k, v in self.tensors.items()}}
        data = save(tensors, metadata=meta)
        with atomic_write(path) as f:
            f.write(data)
        return Path(path)


def capture(module: nn.Module, name_map: Mapping[str, str | Tap], layers: str | None = None) -> Capture:
    """Record module's activations under npllama's names while a ``with`` block runs it.

    name_map: trace name -> submodule name or Tap (see the module docstring); layers: the dotted
    name of layer {i}, needed by function taps (default: read off the module taps).
    """
    return Capture(module, name_map, layers)


def matches(pattern: str, modules: Mapping[str, nn.Module]) -> list[tuple[int | None, nn.Module]]:
    """The submodules a dotted name with an optional {i} names: [(i or None, module)], by i."""
    if "{i}" not in pattern:
        return [(None, modules[pattern])] if pattern in modules else []
    regex = re.compile(re.escape(pattern).replace(re.escape("{i}"), r"(\d+)"))
    found = [(int(m.group(1)), mod) for name, mod in modules.items() if (m := regex.fullmatch(name))]
    return sorted(found, key=lambda pair: pair[0])
