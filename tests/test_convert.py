"""npllama convert: mean-pooling key/value heads into groups (GQA, Ainslie et al. 2023, section 2.1).

The checks: pooling averages consecutive heads (against a loop written out); G = n_kv_heads changes
nothing (the logits are bit-identical); a model whose heads are already equal within each group
keeps its function under pooling (which catches a wrong grouping order); the written folder is a
Hugging Face checkpoint that npllama, parity and transformers all read and agree on; bad requests
get a clear error.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file

import npllama
import parity
from npllama.cli import main
from npllama.convert import convert_kv_heads, mean_pool_heads
from npllama.formats.hf import hf_config, save_checkpoint
from npllama.errors import CheckpointError, ConfigError
from npllama.params import init_params
from npllama.tolerances import parity_rtol
from npllama.formats.hf import args_from_config
from tiny import hf_logits, random_llama, save_hf, tiny_config

IDS = np.array([[1, 5, 17, 42, 99, 3, 250, 7, 7, 64, 128, 2]])


def rel_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


@settings(deadline=None, max_examples=25)
@given(n_kv=st.sampled_from([1, 2, 4, 6, 8]), head_dim=st.sampled_from([2, 4, 8]),
       cols=st.integers(1, 5), bias=st.booleans(), data=st.data())
def test_mean_pool_heads_averages_consecutive_heads(n_kv, head_dim, cols, bias, data):
    groups = data.draw(st.sampled_from([g for g in range(1, n_kv + 1) if n_kv % g == 0]))
    rng = np.random.default_rng(n_kv * 100 + head_dim * 10 + cols)
    shape = (n_kv * head_dim,) if bias else (n_kv * head_dim, cols)
    w = rng.standard_normal(shape).astype(np.float32)
    pooled = mean_pool_heads(w, n_kv, groups)
    r = n_kv // groups
    for g in range(groups):
        heads = [w[h * head_dim:(h + 1) * head_dim] for h in range(g * r, (g + 1) * r)]
        expected = np.mean(np.stack(heads).astype(np.float64), axis=0)
        np.testing.assert_allclose(pooled[g * head_dim:(g + 1) * head_dim], expected, rtol=1e-6, atol=1e-7)
    assert pooled.dtype == w.dtype and pooled.shape == (groups * head_dim, *shape[1:])


def hf_checkpoint(tmp_path, n_heads=4, n_kv_heads=None, bias=False, tied=False):
    cfg = tiny_config(n_heads=n_heads, n_kv_heads=n_kv_heads, dim=32, hidden_dim=48, bias=bias, tied=tied)
    model = random_llama(cfg, seed=n_heads)
    folder = save_hf(model, tmp_path / f"src-{n_heads}-{n_kv_heads}-{bias}-{tied}")
    return model, folder


@pytest.mark.parametrize("bias,tied", [(False, False), (True, True)])
def test_convert_to_own_head_count_keeps_outputs_unchanged(tmp_path, bias, tied):
    _, src = hf_checkpoint(tmp_path, n_heads=4, bias=bias, tied=tied)
    before = npllama.load(src, progress=False)
    result = CliRunner().invoke(main, ["convert", "-m", str(src), "--kv-heads", "4", "-o", str(tmp_path / "same")])
    assert result.exit_code == 0, result.output
    after = npllama.load(tmp_path / "same", progress=False)
    assert after.config == before.config
    # bit for bit: converting to its own head count writes the same weights, and the same code runs
    # on the same arrays in the same process (in each backend)
    np.testing.assert_array_equal(after(IDS), before(IDS))
    torch_after = parity.load(tmp_path / "same", progress=False)
    np.testing.assert_array_equal(torch_after(IDS).numpy(), parity.from_numpy(before)(IDS).numpy())


@pytest.mark.parametrize("n_heads,n_kv,groups", [(4, 4, 2), (4, 4, 1), (8, 4, 2), (6, 6, 3)])
def test_pooling_heads_that_are_equal_within_groups_keeps_the_function(n_heads, n_kv, groups):
    """If every kv head already equals the others of its group, pooling changes no attention score:
    a wrong grouping (e.g. strided instead of consecutive heads) would change the logits."""
    args = npllama.ModelArgs(dim=48, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv, vocab_size=300,
                             hidden_dim=64, head_dim=8)
    params = init_params(args, seed=3, std=0.3)
    r = n_kv // groups
    for i in range(args.n_layers):
        for name in ("wk", "wv"):
            key = f"layers.{i}.attention.{name}.weight"
            w = params[key].reshape(groups, r, args.head_dim, args.dim)
            params[key] = np.repeat(w[:, :1], r, axis=1).reshape(n_kv * args.head_dim, args.dim)
    before = npllama.Transformer(args, params)
    new_args, new_params = convert_kv_heads(args, params, groups)
    after = npllama.Transformer(new_args, new_params)
    assert new_args.n_kv_heads == groups
    assert rel_err(after(IDS), before(IDS)) <= parity_rtol("float32", "op")
    # and a real change of function when the heads differ
    _, pooled = convert_kv_heads(args, init_params(args, seed=4, std=0.3), groups)
    assert rel_err(npllama.Transformer(new_args, pooled)(IDS),
                   npllama.Transformer(args, init_params(args, seed=4, std=0.3))(IDS)) > 1e-3


@pytest.mark.parametrize("groups", [2, 1])
def test_converted_checkpoint_is_read_alike_by_npllama_parity_and_transformers(tmp_path, groups):
    from transformers import LlamaForCausalLM

    hf_model, src = hf_checkpoint(tmp_path, n_heads=4, bias=True)
    out = tmp_path / f"gqa{groups}"
    result = CliRunner().invoke(main, ["convert", "-m", str(src), "-g", str(groups), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert ("MQA" if groups == 1 else f"GQA-{groups}") in result.output

    # the pooled tensors, against torch's own mean over the source model's heads
    tensors = load_file(str(out / "model.safetensors"))
    hd = hf_model.config.head_dim
    for i in range(2):
        for proj in ("k_proj", "v_proj"):
            mod = getattr(hf_model.model.layers[i].self_attn, proj)
            for kind in ("weight", "bias"):
                src_t = getattr(mod, kind).detach()
                expected = src_t.reshape(groups, 4 // groups, hd, *src_t.shape[1:]).mean(1).reshape(groups * hd, *src_t.shape[1:])
                np.testing.assert_allclose(tensors[f"model.layers.{i}.self_attn.{proj}.{kind}"],
                                           expected.numpy(), rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(tensors[f"model.layers.{i}.self_attn.q_proj.weight"],
                                      hf_model.model.layers[i].self_attn.q_proj.weight.detach().numpy())
    assert json.loads((out / "config.json").read_text())["num_key_value_heads"] == groups

    reference = npllama.load(out, progress=False)
    assert reference.config.n_kv_heads == groups
    ref = reference(IDS)
    assert rel_err(parity.load(out, progress=False)(IDS).numpy(), ref) <= parity_rtol("float32")
    oracle = LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    assert rel_err(hf_logits(oracle, IDS), ref) <= parity_rtol("float32")


def test_hf_config_round_trips_through_model_args():
    args = npllama.ModelArgs(dim=64, n_layers=3, n_heads=8, n_kv_heads=2, vocab_size=500, hidden_dim=96,
                             head_dim=16, norm_eps=1e-6, rope_theta=5e5, max_seq_len=333, tie_word_embeddings=True,
                             attention_bias=True, attention_out_bias=True, mlp_bias=True, bos_token_id=1,
                             eos_token_ids=(2, 3),
                             rope_scaling={"rope_type": "linear", "factor": 2.0})
    assert args_from_config(hf_config(args)) == args


def test_convert_refuses_a_group_count_that_does_not_divide(tmp_path):
    args = npllama.ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=4, vocab_size=50, hidden_dim=32)
    params = init_params(args)
    with pytest.raises(ConfigError, match=r"do not split into 3 equal groups; choose one of \[1, 2, 4\]"):
        convert_kv_heads(args, params, 3)
    with pytest.raises(ConfigError, match="positive"):
        convert_kv_heads(args, params, 0)
    _, src = hf_checkpoint(tmp_path)
    result = CliRunner().invoke(main, ["convert", "-m", str(src), "-g", "3", "-o", str(tmp_path / "x")])
    assert result.exit_code == 2 and "choose one of [1, 2, 4]" in result.output
    assert not (tmp_path / "x").exists()


def test_convert_will_not_overwrite_without_being_told(tmp_path):
    args = npllama.ModelArgs(dim=32, n_layers=1, n_heads=4, n_kv_heads=4, vocab_size=50, hidden_dim=32)
    out = save_checkpoint(tmp_path / "ckpt", args, init_params(args, seed=1))
    with pytest.raises(CheckpointError, match="already exists"):
        save_checkpoint(out, args, init_params(args, seed=2))
    emb = "tok_embeddings.weight"
    np.testing.assert_array_equal(npllama.load(out, progress=False).state_dict()[emb], init_params(args, seed=1)[emb])
    save_checkpoint(out, args, init_params(args, seed=2), overwrite=True)
    np.testing.assert_array_equal(npllama.load(out, progress=False).state_dict()[emb], init_params(args, seed=2)[emb])
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]       # no temporary folder left behind
