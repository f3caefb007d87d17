"""Porting, from a port's first line to its cached decode (docs/porting.md).

Weights out: `npllama export` writes a model's weights in Meta's layout (names, interleaved wq / wk
rows, output.weight even when tied) or Hugging Face's. Then Meta's own reference, llama-models'
llama3/model.py run unmodified through docs/meta_port.py, loads the Meta export strictly and
passes a prefill and 8 greedy decode steps through its own KV cache under the ready-made "meta"
map; a position fed one too far at one decode step is named at that step, layer and op; an eps
bug at a deep layer, invisible in float32, is named in float64 once Meta's float32 casts are
lifted. The gpt-fast-style port of the docs (docs/my_port.py) does the same with its bugs.

Each step's activations are checked against npllama's own cached run (test_hooks.first_break_by_step).
The assertions on `npllama parity --against`'s own step-by-step verdict are marked STEPWISE: they
need the stepwise check_dump (rows that carry their step), and are skipped until it is there.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import load_file

import npllama
from npllama.cli import main
from npllama.dump import read_dump
from npllama.errors import InputError
from npllama.export import export, quantized_types
from npllama.formats.meta import args_from_params
from npllama.formats.permute import permute_to_interleaved
from npllama.oracle import check_dump, round_to
from npllama.report import Row, format_table
from parity.hooks import capture
from parity.port import run_steps
from test_hooks import first_break_by_step
from tiny import random_llama, save_hf, tiny_config

pytest.importorskip("llama_models")          # the test extra: llama-models 0.3.0 and fairscale 0.4.13
pytest.importorskip("fairscale")

ROOT = Path(__file__).resolve().parent.parent
N_LAYERS, N_HEADS, N_KV = 4, 4, 2
PROMPT = [[1, 17, 42, 99, 7, 3, 250, 64]]
DECODE = 8
# The verdict of a multi-step dump names the step of its first break (npllama.oracle.check_dump).
STEPWISE = pytest.mark.skipif("step" not in getattr(Row, "__dataclass_fields__", {}),
                              reason="needs check_dump's step-by-step verdict (rows that carry their step)")


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def load_doc_module(name: str):
    """docs/NAME.py imported as the module NAME (its functions are found by that name)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "docs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A random Llama with grouped-query attention and a tied LM head (Meta never ties), whose
    SwiGLU width Meta's params.json can express (192 = 2*4*64/3 rounded up to a multiple of 64)."""
    path = tmp_path_factory.mktemp("porting_llama")
    save_hf(random_llama(tiny_config(n_layers=N_LAYERS, n_heads=N_HEADS, n_kv_heads=N_KV, hidden_dim=192,
                                     tied=True), seed=2), path)
    return path


@pytest.fixture(scope="module")
def model(folder):
    return npllama.load(folder, progress=False)


@pytest.fixture(scope="module")
def meta_weights(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("meta_export") / "weights"
    result = cli("export", "--model", folder, "--layout", "meta", "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def meta_port():
    module = load_doc_module("meta_port")
    yield module
    module.close_model_parallel()
    del sys.modules["meta_port"]


@pytest.fixture(scope="module")
def my_port():
    yield load_doc_module("my_port")
    del sys.modules["my_port"]


def meta_dump(port, path, ids=PROMPT, decode=DECODE, position_bug_at=None) -> Path:
    """Capture Meta's model on a prefill and greedy decode steps, Meta's way: forward(tokens, start_pos).
    position_bug_at: the decode step fed at start_pos + 1 (the slot and angle one too far)."""
    with capture(port, "meta") as captured:
        tokens = torch.tensor(ids)
        logits, pos = port(tokens, 0), tokens.shape[1]
        for step in range(1, decode + 1):
            token = logits[:, -1].argmax(-1, keepdim=True)
            logits = port(token, pos + 1 if step == position_bug_at else pos)
            pos += 1
    return captured.save(path)


# ------------------------------------------------------------------------------ weights out
def test_the_meta_export_is_metas_layout_and_loads_strictly_into_metas_model(model, meta_weights, meta_port):
    tensors = load_file(meta_weights / "model.safetensors")
    sd = model.state_dict()
    assert np.array_equal(tensors["layers.2.attention.wq.weight"], permute_to_interleaved(sd["layers.2.attention.wq.weight"], N_HEADS))
    assert np.array_equal(tensors["layers.2.attention.wk.weight"], permute_to_interleaved(sd["layers.2.attention.wk.weight"], N_KV))
    assert np.array_equal(tensors["layers.2.attention.wv.weight"], sd["layers.2.attention.wv.weight"])
    assert np.array_equal(tensors["output.weight"], tensors["tok_embeddings.weight"])       # tied, written anyway
    params = json.loads((meta_weights / "params.json").read_text())
    back = args_from_params(params)
    assert (back.hidden_dim, back.n_kv_heads, back.norm_eps, back.rope_theta) == \
           (model.config.hidden_dim, N_KV, model.config.norm_eps, model.config.rope_theta)
    readme = (meta_weights / "README.md").read_text()
    assert "interleaved rotary layout" in readme and "`output.weight` is a copy of `tok_embeddings.weight`" in readme

    port = meta_port.build(str(meta_weights))                   # load_state_dict(strict=True) inside
    theirs = port(torch.tensor(PROMPT), 0).numpy()
    ours = model(np.array(PROMPT))
    assert np.abs(theirs - ours).max() <= 1e-4 * np.abs(ours).max()


def test_the_hf_export_reads_back_as_the_same_model(folder, model, tmp_path):
    out = tmp_path / "hf"
    result = cli("export", "--model", folder, "--layout", "hf", "--out", out, "-q")
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"wrote {out}: model.safetensors (hf layout, float32")
    assert "lm_head.weight" not in load_file(out / "model.safetensors")           # tied, as the config says
    back = npllama.load(out, progress=False)
    # The same float32 values through the same code: the logits are the same bits.
    assert np.array_equal(back(np.array(PROMPT)), model(np.array(PROMPT)))

    result = cli("export", "--model", folder, "--layout", "hf", "--out", out)
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "already holds files; choose a new folder for the export (or pass --force" in result.output
    result = cli("export", "--model", folder, "--layout", "meta", "--out", out, "--force", "--dtype", "bfloat16", "-q")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "model.safetensors", "params.json"]  # hf's files gone
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        bf16 = f.get_tensor("norm.weight")
    assert bf16.dtype == torch.bfloat16
    assert np.array_equal(bf16.double().numpy(), round_to(model.state_dict()["norm.weight"], "bfloat16"))


def test_a_quantized_model_is_written_dequantized_and_says_so(tmp_path, capsys):
    import gguf

    from npllama.config import ModelArgs
    from npllama.model import Transformer
    from npllama.params import init_params
    from npllama.quant.matrix import QuantizedMatrix

    args = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=96, hidden_dim=192)
    params = init_params(args, seed=0)
    w1 = params["layers.0.feed_forward.w1.weight"].astype(np.float32)
    params["layers.0.feed_forward.w1.weight"] = blocks = QuantizedMatrix.from_blocks(
        "Q8_0", gguf.quants.quantize(w1, gguf.GGMLQuantizationType.Q8_0), 64)
    quantized = Transformer(args, params)
    assert quantized_types(quantized) == ["Q8_0"]
    export(quantized, tmp_path / "out", layout="meta", dtype="float16")
    assert "checkpoint holds Q8_0 blocks: written dequantized to float16" in capsys.readouterr().err
    written = load_file(tmp_path / "out" / "model.safetensors")["layers.0.feed_forward.w1.weight"]
    assert np.array_equal(written, blocks.dequantize().astype(np.float16))
    assert "Dequantized from the Q8_0 blocks" in (tmp_path / "out" / "README.md").read_text()

    params["layers.0.feed_forward.w2.weight"] = np.full((64, 192), 7e4, dtype=np.float32)
    with pytest.raises(InputError, match="model.layers.0.mlp.down_proj.weight: values beyond float16's range"):
        export(Transformer(args, params), tmp_path / "big", layout="hf", dtype="float16")
    with pytest.raises(InputError, match="layout 'gguf': choose 'meta'"):
        export(quantized, tmp_path / "x", layout="gguf")


# ------------------------------------------------------------------------------ Meta's reference, step by step
def test_metas_model_from_the_export_passes_the_prefill_and_8_decode_steps(folder, model, meta_weights, tmp_path):
    out = tmp_path / "meta.safetensors"
    result = cli("capture", "--port", ROOT / "docs" / "meta_port.py:build", "--weights", meta_weights, "--map", "meta",
                 "--ids", ",".join(map(str, PROMPT[0])), "--decode", DECODE, "--out", out)
    assert result.exit_code == 0, result.output
    dump = read_dump(out)
    assert len(dump.steps) == 1 + DECODE and dump.metadata["rotary_layout"] == "interleaved"
    assert all(len(step.tensors) == 3 + 10 * N_LAYERS for step in dump.steps)
    assert first_break_by_step(model, dump) is None
    result = cli("parity", "--against", out, "--model", folder)
    assert result.exit_code == 0, result.output


@STEPWISE
def test_the_verdict_covers_every_step_of_metas_decode(model, meta_weights, meta_port, tmp_path):
    report = check_dump(read_dump(meta_dump(meta_port.build(str(meta_weights)), tmp_path / "m.safetensors")), model)
    assert report.ok and {row.step for row in report.rows} == set(range(1 + DECODE)), format_table(report)


def test_a_position_fed_one_too_far_at_decode_step_3_is_named_at_that_step(model, meta_weights, meta_port, tmp_path):
    dump = read_dump(meta_dump(meta_port.build(str(meta_weights)), tmp_path / "pos.safetensors", position_bug_at=3))
    assert first_break_by_step(model, dump) == (3, "layers.0.attention.q")


@STEPWISE
def test_the_verdict_names_the_step_of_a_decode_bug(model, meta_weights, meta_port, tmp_path):
    dump = read_dump(meta_dump(meta_port.build(str(meta_weights)), tmp_path / "pos.safetensors", position_bug_at=3))
    first = check_dump(dump, model).first_break
    assert (first.step, first.layer, first.op) == (3, 0, "attention.q")


def test_an_eps_bug_at_a_deep_layer_is_invisible_in_float32_and_named_in_float64(model, meta_weights, meta_port,
                                                                                 tmp_path):
    port = meta_port.build(str(meta_weights))
    port.layers[N_LAYERS - 1].ffn_norm.eps = 1e-6                      # the checkpoint's is 1e-5
    report32 = check_dump(read_dump(meta_dump(port, tmp_path / "eps32.safetensors", decode=0)), model)
    assert report32.ok, format_table(report32)                       # moves the norm by ~1e-6: under float32's bar
    port64 = meta_port.to_float64(port)
    with meta_port.float64_casts():
        path = meta_dump(port64, tmp_path / "eps64.safetensors", decode=0)
    report64 = check_dump(read_dump(path), model)
    first = report64.first_break
    assert report64.dtype == "float64" and (first.layer, first.op) == (N_LAYERS - 1, "ffn_norm"), format_table(report64)
    assert first.rel < report32.rows[0].rtol                         # a break float32 could not have shown


# ------------------------------------------------------------------------------ the docs' gpt-fast-style port
@pytest.mark.parametrize("bug, step, name", [(None, None, None), ("position", 3, "layers.0.attention.q"),
                                             ("mask", 1, "layers.0.attention.scores_v")])
def test_the_docs_gpt_fast_port_decodes_and_its_decode_bugs_are_named_at_their_step(model, meta_weights, my_port,
                                                                                      tmp_path, bug, step, name):
    port = my_port.load(str(meta_weights), bug=bug)
    my_port.dump(port, torch.tensor(PROMPT), str(tmp_path / "mine.safetensors"), decode=DECODE,
                 position_bug=bug == "position")
    dump = read_dump(tmp_path / "mine.safetensors")
    assert len(dump.steps) == 1 + DECODE
    assert first_break_by_step(model, dump) == (None if bug is None else (step, name))


def test_the_docs_gpt_fast_port_runs_in_float64_with_its_casts_lifted(model, meta_weights, my_port, tmp_path):
    port = my_port.load(str(meta_weights), torch.float64, bug="eps")
    my_port.dump(port, torch.tensor(PROMPT), str(tmp_path / "eps64.safetensors"))
    report = check_dump(read_dump(tmp_path / "eps64.safetensors"), model)
    assert (report.first_break.layer, report.first_break.op) == (N_LAYERS - 1, "ffn_norm"), format_table(report)
    assert all(row.rel < 1e-13 for row in report.rows[:report.rows.index(report.first_break)])   # float64 throughout
