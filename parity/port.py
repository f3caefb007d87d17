"""Running a port step by step under parity.capture: a prefill, then greedy decode steps through
the port's own KV cache, each call one step of the dump; and ``npllama capture``, which does it
from the command line.

    npllama capture --port my_port.py:build --weights runs/meta-weights --map meta \\
        --ids runs/ref.safetensors --decode 8 --out runs/mine.safetensors

Each ready-made map (parity/hooks.py) comes with the calling convention of the code it was made
for; ``step(model, ids, start)`` calls the model on ids (batch, seq) continuing at position start
and returns its logits (batch, seq, vocab):

    meta          model(tokens, start_pos)                     the cache lives in each Attention
    gpt-fast      model(idx, input_pos)                        after model.setup_caches(batch, length)
    transformers  model(input_ids=ids, cache=cache, use_cache=True)   (past_key_values= before 5.0)
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Callable

import click
import torch
from torch import nn

from npllama.errors import InputError

from .hooks import READY_MAPS, capture


# ---------------------------------------------------------------------------- calling conventions
def meta_step(model: nn.Module, ids: torch.Tensor, start: int, state: dict) -> torch.Tensor:
    """Meta's model.py: forward(tokens, start_pos); each Attention keeps its cache_k / cache_v."""
    return model(ids, start)


def gpt_fast_step(model: nn.Module, ids: torch.Tensor, start: int, state: dict) -> torch.Tensor:
    """gpt-fast: setup_caches(max_batch_size, max_seq_length) once, then forward(idx, input_pos)."""
    if start == 0:
        if not callable(getattr(model, "setup_caches", None)):
            raise InputError(f"{type(model).__name__} has no setup_caches(max_batch_size, max_seq_length), which a "
                             f"gpt-fast model calls before its first step")
        model.setup_caches(ids.shape[0], state["length"])
    return model(ids, torch.arange(start, start + ids.shape[1], device=ids.device))


def transformers_step(model: nn.Module, ids: torch.Tensor, start: int, state: dict) -> torch.Tensor:
    """transformers: forward(input_ids=, cache=, use_cache=True) (``past_key_values=`` before
    transformers 5); the cache comes back in the output."""
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=ids, use_cache=True, **{key: state.get("cache")})
    state["cache"] = out.get(key)
    return out.logits


CONVENTIONS: dict[str, Callable] = {"meta": meta_step, "gpt-fast": gpt_fast_step, "transformers": transformers_step}
assert set(CONVENTIONS) == set(READY_MAPS)


def run_steps(model: nn.Module, convention: str, ids, decode: int) -> list[torch.Tensor]:
    """The prefill of ids (batch, seq), then ``decode`` greedy steps of one token each through the
    model's own cache, in the named calling convention; returns each step's ids."""
    if convention not in CONVENTIONS:
        raise InputError(f"unknown calling convention {convention!r}; choose one of {', '.join(CONVENTIONS)}")
    step = CONVENTIONS[convention]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    ids = torch.as_tensor(ids, dtype=torch.long, device=device)
    ids = ids[None] if ids.ndim == 1 else ids
    state = {"length": ids.shape[1] + decode}
    fed, start = [ids], 0
    with torch.no_grad():
        logits = step(model, ids, start, state)
        for _ in range(decode):
            start += fed[-1].shape[1]
            fed.append(logits[:, -1].argmax(-1, keepdim=True))        # greedy: (batch, 1)
            logits = step(model, fed[-1], start, state)
    return fed


# ---------------------------------------------------------------------------- the command
def load_port(spec: str) -> Callable:
    """"path/to/file.py:function" or "package.module:function" -> the function. A file is imported
    under its stem's name and registered in sys.modules, so that function taps can find it."""
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise InputError(f"--port {spec!r}: write FILE.py:FUNCTION or package.module:FUNCTION")
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise InputError(f"--port: no file {where}")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[path.stem] = module
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ImportError as e:
        raise InputError(f"--port {spec}: cannot import {where} ({e})") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise InputError(f"--port {spec}: {where} has no function {name!r}")
    return factory


def read_ids(value: str) -> list:
    """--ids: a dump (its step 0's input_ids), a JSON file of ids, or 1,2,3."""
    if value.endswith(".safetensors"):
        from npllama.dump import read_dump
        return read_dump(value).input_ids.tolist()
    from npllama.cli.trace import parse_ids
    return parse_ids(value)


@click.command(name="capture", help="Run a PyTorch port under parity.capture: a prefill of --ids, then --decode "
               "greedy steps through its own KV cache, and write every step as one dump for `npllama parity "
               "--against` (docs/porting.md).")
@click.option("--port", "port", required=True, metavar="FILE.py:FUNCTION",
              help="A function that returns the port ready to run (weights loaded), called with --weights when given.")
@click.option("--weights", default=None, type=click.Path(exists=True), metavar="DIR",
              help="Passed to the --port function: the weights it loads (npllama export --out DIR).")
@click.option("--map", "map_name", required=True, type=click.Choice(list(READY_MAPS)),
              help="The ready-made name map, and its calling convention: meta (Meta's model.py), gpt-fast, "
                   "transformers (LlamaForCausalLM).")
@click.option("--ids", required=True, metavar="REF.safetensors|IDS.json|1,2,3",
              help="The prompt's token ids: a reference dump's, a JSON list, or comma-separated.")
@click.option("--decode", type=click.IntRange(min=0), default=0, show_default=True,
              help="Greedy decode steps after the prefill.")
@click.option("--out", "-o", "out", required=True, type=click.Path(dir_okay=False), metavar="FILE.safetensors",
              help="Where to write the dump.")
def capture_command(port, weights, map_name, ids, decode, out):
    from npllama.io import check_writable

    token_ids = read_ids(ids)
    check_writable(out)
    factory = load_port(port)
    model = factory(weights) if weights is not None else factory()
    if not isinstance(model, nn.Module):
        raise InputError(f"--port {port} returned a {type(model).__name__}, not a torch.nn.Module")
    with capture(model, map_name) as captured:
        fed = run_steps(model, map_name, token_ids, decode)
    captured.save(out, fed, producer=f"{Path(port.rpartition(':')[0]).name}, {map_name} map")
    names = len(captured.steps[0])
    click.echo(f"wrote {out}: {len(fed)} step(s) (a prefill of {fed[0].shape[1]} positions and {decode} decode "
               f"steps), {names} activations each")
