"""parity.capture, step by step: each call of the captured module is one step of the dump (a prefill,
then decode steps through the model's own cache); the ready-made maps are picked by name and sized
from the model; a map that matches nothing names the nearest submodules; `npllama capture` does it
from the command line.

The steps a capture writes are checked here against npllama's own cached run of the same ids
(first_break_by_step), independently of how `npllama parity --against` judges steps."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

import npllama
import parity
from npllama.cli import main
from npllama.dump import read_dump
from npllama.errors import InputError
from npllama.oracle import dump_dtype, interleaved_to_half, reference_model
from npllama.report import compare
from npllama.tolerances import parity_rtol
from parity.hooks import capture, ready_map
from parity.port import run_steps
from tiny import random_llama, save_hf, tiny_config

IDS = [[1, 17, 42, 99, 7, 3]]


def first_break_by_step(model, dump) -> tuple[int, str] | None:
    """The first (step, name) where a dump parts from npllama's cached run of its steps' ids, each
    held to the end-to-end bar of its dtype; None when every step of it is within.

    The reference runs in float64 on the weights rounded to the dump's dtype, through its KV cache,
    one call per step (naive attention). Its logits are float32 by contract, so theirs are held to
    float32's bar at least. q and k of an interleaved dump are read as rotate-half first.
    """
    dt = dump_dtype(dump)
    ref = reference_model(model, dt)
    cache = ref.new_cache(dump.steps[0].input_ids.shape[0], 256)
    interleaved = dump.metadata.get("rotary_layout") == "interleaved"
    for s, step in enumerate(dump.steps):
        out = {}
        ref(step.input_ids, cache, attention="naive", trace=lambda n, x: out.__setitem__(n, np.asarray(x, np.float64)))
        theirs = {n: interleaved_to_half(x, x.shape[-1]) if interleaved and n.endswith((".q", ".k")) else x
                  for n, x in step.tensors.items()}
        bar = lambda n: parity_rtol(dt, "model", "float32" if n == "logits" else step.dtypes[n])  # noqa: E731
        rows = compare(out, theirs, bar, require_all=False)
        bad = next((r for r in rows if not r.ok), None)
        if bad is not None:
            return s, bad.name
    return None


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hooks_llama")
    save_hf(random_llama(tiny_config(n_layers=2, n_heads=4, n_kv_heads=2), seed=3), path)
    return path


@pytest.fixture(scope="module")
def model(folder):
    return npllama.load(folder, progress=False)


def hf_model(folder):
    from transformers import LlamaForCausalLM
    return LlamaForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()


# ------------------------------------------------------------------------------ steps
def test_each_call_is_one_step_and_every_step_matches_the_cached_reference(folder, model, tmp_path):
    hf = hf_model(folder)
    with capture(hf, "transformers") as captured:
        fed = run_steps(hf, "transformers", IDS, decode=3)
    assert len(captured.steps) == 4 and [ids.shape for ids in captured.step_ids] == [(1, 6), (1, 1), (1, 1), (1, 1)]
    path = captured.save(tmp_path / "steps.safetensors")
    dump = read_dump(path)
    assert dump.metadata["steps"] == "4" and dump.metadata["rotary_layout"] == "half"
    assert "transformers map" in dump.metadata["producer"]
    for s, step in enumerate(dump.steps):
        assert np.array_equal(step.input_ids, fed[s].numpy())
        assert step.tensors["logits"].shape == (1, 6 if s == 0 else 1, 300)
        assert step.tensors["layers.1.attention.k"].shape == (1, 2, 6 if s == 0 else 1, 16)   # this step's keys only
    assert first_break_by_step(model, dump) is None

    # the same decode with a position one too far at step 2: that step breaks first, at rotary q
    with capture(hf, "transformers") as captured, torch.no_grad():
        cache = None
        for s, ids in enumerate(fed):
            start = sum(f.shape[1] for f in fed[:s]) + (s == 2)
            positions = torch.arange(start, start + ids.shape[1])[None]
            cache = hf(input_ids=ids, cache=cache, position_ids=positions, use_cache=True).cache
    bad = read_dump(captured.save(tmp_path / "bad.safetensors"))
    assert first_break_by_step(model, bad) == (2, "layers.0.attention.q")


def test_the_ids_of_each_step_can_be_given_at_save(folder, tmp_path):
    hf = hf_model(folder)
    with capture(hf, {"layers.{i}.ffn_norm": "model.layers.{i}.post_attention_layernorm"}) as captured:
        fed = run_steps(hf, "transformers", IDS, decode=2)
    whole = torch.cat(fed, dim=1)                                          # (1, 8): all steps side by side
    for given in (whole, list(fed), [f.numpy() for f in fed]):
        dump = read_dump(captured.save(tmp_path / "given.safetensors", given))
        assert [s.input_ids.tolist() for s in dump.steps] == [f.tolist() for f in fed]
    with pytest.raises(InputError, match=r"input_ids has 7 positions; the 3 steps ran 6\+1\+1 = 8"):
        captured.save(tmp_path / "x.safetensors", whole[:, :7])
    with pytest.raises(InputError, match="2 arrays for 3 recorded step"):
        captured.save(tmp_path / "x.safetensors", list(fed[:2]))


class Twice(nn.Module):
    """A model whose forward calls one submodule twice."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(self.lin(x))


def test_a_name_read_twice_within_one_call_is_refused_two_calls_are_two_steps(tmp_path):
    twice, x = Twice(), torch.ones(1, 3, 4)
    with pytest.raises(InputError, match=r"norm was recorded twice within one call of Twice \(step 0\)"):
        with capture(twice, {"norm": "lin"}), torch.no_grad():
            twice(x)
    with capture(twice.lin, {"norm": ""}) as captured, torch.no_grad():
        twice(x)                                         # the captured module is lin: two calls, two steps
    assert len(captured.steps) == 2
    with pytest.raises(InputError, match="step 0: the call's token ids were not found"):
        captured.save(tmp_path / "x.safetensors")
    dump = read_dump(captured.save(tmp_path / "x.safetensors", [np.array([[5, 6, 7]]), np.array([[8, 9, 10]])],
                                   rank=1, world_size=2, splits={"norm": "shard(2)", "attention.q": "shard(1)"}))
    assert (dump.rank, dump.world_size, len(dump.steps)) == (1, 2, 2)
    assert {k: str(v) for k, v in dump.splits.items()} == {"norm": "shard(2)", "attention.q": "shard(1)"}
    assert dump.steps[1].input_ids.tolist() == [[8, 9, 10]]


# ------------------------------------------------------------------------------ maps
def test_ready_maps_are_picked_by_name_and_a_wrong_one_names_the_nearest_submodules(folder):
    hf = hf_model(folder)
    assert ready_map("transformers", hf)["layers.{i}.ffn_norm"] == "model.layers.{i}.post_attention_layernorm"
    with pytest.raises(InputError, match=r"no ready-made map 'gptfast' \(did you mean 'gpt-fast'\?\)"):
        capture(hf, "gptfast")
    with pytest.raises(InputError, match=r"'meta' reads Meta's model.py module names, and LlamaForCausalLM has no "
                                         r"'layers.0.attention'; nearest: .*'model.layers.\{i\}.self_attn'"):
        capture(hf, "meta")
    with pytest.raises(InputError, match=r"-> 'model.layers.\{i\}.post_norm' matches no submodule of LlamaForCausalLM; "
                                         r"nearest: 'model.layers.\{i\}.post_attention_layernorm'"):
        with capture(hf, {"layers.{i}.ffn_norm": "model.layers.{i}.post_norm"}):
            pass
    with pytest.raises(InputError, match="ready-made map 'transformers': Twice has no LlamaConfig"):
        capture(Twice(), "transformers")
    assert parity.capture is capture


# ------------------------------------------------------------------------------ the command line
PORT = '''
from transformers import LlamaForCausalLM

def build(folder):
    return LlamaForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
'''


def test_npllama_capture_runs_a_port_step_by_step(folder, model, tmp_path):
    port = tmp_path / "hf_port.py"
    port.write_text(textwrap.dedent(PORT))
    out = tmp_path / "cli.safetensors"
    result = CliRunner().invoke(main, ["capture", "--port", f"{port}:build", "--weights", str(folder), "--map",
                                       "transformers", "--ids", "1,17,42,99", "--decode", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "3 step(s) (a prefill of 4 positions and 2 decode steps), 23 activations each" in result.output
    dump = read_dump(out)
    assert dump.steps[0].input_ids.tolist() == [[1, 17, 42, 99]] and first_break_by_step(model, dump) is None
    for args, message in ((["--port", f"{port}:nothing"], "has no function 'nothing'"),
                          (["--port", "nowhere.py:build"], "no file nowhere.py"),
                          (["--port", f"{port}"], "write FILE.py:FUNCTION")):
        result = CliRunner().invoke(main, ["capture", *args, "--map", "meta", "--ids", "1,2", "--out", str(out)])
        assert result.exit_code == 2 and message in result.output, result.output
