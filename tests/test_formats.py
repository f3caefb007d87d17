"""Checkpoint formats: real files written by transformers / torch / gguf load into the same function.

Oracle: transformers' LlamaForCausalLM in float32. Every comparison is norm-relative,
max|a - b| / max|b| < FORMAT_VS_TRANSFORMERS_RTOL (see npllama/tolerances.py).
"""

import json
import os
import pickle
import struct
import zipfile

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import npllama
from npllama.formats.meta import meta_hidden_dim
from npllama.errors import CheckpointError, ConfigError, NpllamaError
from npllama.formats import detect_format
from npllama.formats.torch_save import read_torch_zip
from npllama.formats.permute import permute_to_half, permute_to_interleaved
from npllama.rope import apply_rotary_emb, default_inv_freq, rope_cos_sin
from npllama.tolerances import FORMAT_VS_TRANSFORMERS_RTOL as RTOL
from tiny import (gguf_vocab_from_bpe, hf_logits, random_llama, save_gguf, save_hf, save_meta, tiny_config,
                  to_interleaved, train_bpe, train_sentencepiece)


def rel_err(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def stepped_logits(model, ids, first=3):
    """Logits from a prefill of `first` tokens, then one token at a time through the cache."""
    cache = model.new_cache(ids.shape[0])
    out = [model(ids[:, :first], cache=cache)]
    out += [model(ids[:, t:t + 1], cache=cache) for t in range(first, ids.shape[1])]
    return np.concatenate(out, axis=1)


def assert_matches(model, ref_model, vocab, seed=0):
    ids = np.random.default_rng(seed).integers(0, vocab, (2, 11))
    ref = hf_logits(ref_model, ids)
    assert np.abs(ref).max() > 1.0                     # the random model is not flat
    assert rel_err(model(ids), ref) < RTOL
    assert rel_err(stepped_logits(model, ids), ref) < RTOL


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(300)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("sp"), 400)


# --------------------------------------------------------------------------------------- permute
@settings(deadline=None, max_examples=30)
@given(st.integers(1, 6), st.integers(1, 8), st.integers(1, 5), st.booleans())
def test_permutations_are_inverse(n_heads, half, cols, bias):
    shape = (n_heads * 2 * half,) if bias else (n_heads * 2 * half, cols)
    w = np.random.default_rng(0).standard_normal(shape)
    assert np.array_equal(permute_to_interleaved(permute_to_half(w, n_heads), n_heads), w)
    assert np.array_equal(permute_to_half(permute_to_interleaved(w, n_heads), n_heads), w)
    # npllama's permutation is transformers' conversion formula, and tiny.py's writer its inverse.
    assert np.array_equal(permute_to_interleaved(w, n_heads), to_interleaved(torch.from_numpy(w), n_heads).numpy())


@settings(deadline=None, max_examples=20)
@given(st.sampled_from([(4, 4), (4, 2), (6, 3), (4, 1)]), st.sampled_from([4, 8, 16]), st.integers(0, 50))
def test_half_layout_after_permute_gives_metas_attention_scores(heads, head_dim, pos):
    """Meta rotates interleaved pairs as complex numbers (llama/model.py apply_rotary_emb); npllama
    rotates halves of the permuted rows. Every query-key score agrees, for GQA too (wk uses n_kv_heads)."""
    n_heads, n_kv = heads
    rng = np.random.default_rng(pos)
    dim, seq = 12, 5
    wq = rng.standard_normal((n_heads * head_dim, dim))
    wk = rng.standard_normal((n_kv * head_dim, dim))
    x = rng.standard_normal((seq, dim))
    positions = np.arange(pos, pos + seq)
    inv = default_inv_freq(10000.0, head_dim)

    def meta_rotate(w, n):   # Meta: view_as_complex over (2i, 2i+1), times exp(i m theta)
        t = torch.from_numpy(x @ w.T).reshape(seq, n, head_dim // 2, 2)
        freqs = torch.polar(torch.ones(seq, head_dim // 2, dtype=torch.float64),
                            torch.from_numpy(np.outer(positions, inv)))
        return torch.view_as_real(torch.view_as_complex(t.contiguous()) * freqs[:, None]).reshape(seq, n, head_dim)

    q, k = meta_rotate(wq, n_heads), meta_rotate(wk, n_kv)
    ref = torch.einsum("shd,thd->hst", q, k.repeat_interleave(n_heads // n_kv, dim=1)).numpy()

    cos, sin = rope_cos_sin(inv, positions, dtype=np.float64)
    qh = (x @ permute_to_half(wq, n_heads).T).reshape(seq, n_heads, head_dim).transpose(1, 0, 2)
    kh = (x @ permute_to_half(wk, n_kv).T).reshape(seq, n_kv, head_dim).transpose(1, 0, 2)
    qh, kh = apply_rotary_emb(qh[None], cos, sin)[0], apply_rotary_emb(kh[None], cos, sin)[0]
    ours = qh @ np.repeat(kh, n_heads // n_kv, axis=0).transpose(0, 2, 1)
    assert np.allclose(ours, ref, rtol=1e-10, atol=1e-10)


def test_permute_refuses_rows_that_do_not_split_into_heads():
    with pytest.raises(CheckpointError, match="heads"):
        permute_to_half(np.zeros((10, 3)), 4)


# --------------------------------------------------------------------------------------- Hugging Face
HF_CASES = {
    "mha": dict(),
    "gqa": dict(n_kv_heads=2),
    "mqa": dict(n_kv_heads=1),
    "gqa_tied": dict(n_kv_heads=2, tied=True),
    "mqa_tied_head_dim_24": dict(n_kv_heads=1, head_dim=24, tied=True),
    "head_dim_8_of_64_8_heads": dict(n_heads=8, n_kv_heads=4, head_dim=8),
    "biases_head_dim_24": dict(n_kv_heads=2, head_dim=24, bias=True, mlp_bias=True),
}


@pytest.mark.parametrize("case", HF_CASES)
def test_hf_checkpoint_matches_transformers(tmp_path, bpe, case):
    ref = random_llama(tiny_config(**HF_CASES[case]), seed=len(case))
    model = npllama.load(save_hf(ref, tmp_path, tokenizer=bpe), progress=False)
    assert model.config.tie_word_embeddings == ref.config.tie_word_embeddings
    assert model.config.head_dim == ref.config.head_dim
    assert_matches(model, ref, 300)
    assert model.tokenizer.encode("the model<|im_end|>") == bpe.encode("the model<|im_end|>").ids
    assert model.tokenizer.eos_ids == (2,) and model.tokenizer.chat_template


@settings(deadline=None, max_examples=6)
@given(n_kv=st.sampled_from([1, 2, 4]), n_rep=st.sampled_from([1, 2, 3]), head_dim=st.sampled_from([8, 16, 20]),
       tied=st.booleans(), bias=st.booleans(), layers=st.integers(1, 3), seed=st.integers(0, 1000))
def test_any_drawn_hf_config_matches_transformers(tmp_path_factory, n_kv, n_rep, head_dim, tied, bias, layers, seed):
    cfg = tiny_config(dim=48, n_heads=n_kv * n_rep, n_kv_heads=n_kv, head_dim=head_dim, tied=tied, bias=bias,
                      mlp_bias=bias, n_layers=layers, vocab_size=120)
    ref = random_llama(cfg, seed=seed)
    model = npllama.load(save_hf(ref, tmp_path_factory.mktemp("drawn")), progress=False)
    assert model.tokenizer is None
    assert_matches(model, ref, 120, seed)


def test_sharded_safetensors(tmp_path):
    ref = random_llama(tiny_config(n_kv_heads=2), seed=3)
    folder = save_hf(ref, tmp_path, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file() and len(list(folder.glob("*.safetensors"))) > 2
    assert_matches(npllama.load(folder, progress=False), ref, 300)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_safetensors_widen_exactly(tmp_path, dtype):
    from transformers import LlamaForCausalLM

    ref = random_llama(tiny_config(n_kv_heads=2), seed=4)
    folder = save_hf(ref, tmp_path, dtype=dtype)
    model = npllama.load(folder, progress=False)
    rounded = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    want = rounded.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    assert np.array_equal(model.state_dict()["layers.0.attention.wq.weight"], want)   # bf16 -> f32 is exact
    assert_matches(model, rounded, 300)


def test_pytorch_model_bin_is_read_without_torch_pickle(tmp_path):
    ref = random_llama(tiny_config(n_kv_heads=1), seed=5)
    save_hf(ref, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
    assert_matches(npllama.load(tmp_path, progress=False), ref, 300)


# --------------------------------------------------------------------------------------- Meta
@pytest.mark.parametrize("n_kv,n_shards", [(4, 1), (2, 1), (2, 2), (1, 1)])
def test_meta_checkpoint_equals_the_hf_copy(tmp_path, sp_model, n_kv, n_shards):
    vocab = 400
    ref = random_llama(tiny_config(vocab_size=vocab, n_kv_heads=n_kv, hidden_dim=meta_hidden_dim(64, 32, None)),
                       seed=n_kv + 10 * n_shards)
    meta = npllama.load(save_meta(ref, tmp_path / "meta", sp_model, n_shards=n_shards), progress=False)
    hf = npllama.load(save_hf(ref, tmp_path / "hf"), progress=False)
    assert meta.config.vocab_size == vocab and meta.config.hidden_dim == ref.config.intermediate_size
    assert_matches(meta, ref, vocab)
    ids = np.random.default_rng(1).integers(0, vocab, (1, 9))
    assert rel_err(meta(ids), hf(ids)) < RTOL
    tok = meta.tokenizer
    assert (tok.bos_id, tok.eos_ids, tok.add_bos) == (1, (2,), True)
    assert tok.encode("the model")[0] == 1 and tok.decode(tok.encode("the model"), skip_special=True) == "the model"


def test_meta_bf16_with_ffn_multiplier(tmp_path, sp_model):
    hidden = meta_hidden_dim(64, 16, 1.3)
    ref = random_llama(tiny_config(vocab_size=400, n_kv_heads=2, hidden_dim=hidden), seed=7)
    folder = save_meta(ref, tmp_path, sp_model, multiple_of=16, ffn_dim_multiplier=1.3, dtype=torch.bfloat16)
    with torch.no_grad():                              # the oracle sees the same rounded weights
        for p in ref.parameters():                     # (not ref.to(): that would round inv_freq too)
            p.copy_(p.to(torch.bfloat16).float())
    assert_matches(npllama.load(folder, progress=False), ref, 400)


def test_torch_zip_reader_handles_dtypes_views_and_strides(tmp_path):
    base = torch.randn(6, 8)
    sd = {"bf16": base.to(torch.bfloat16), "f16": base.half(), "f64": base.double(),
          "transposed": base.t(), "slice": base[2:5, 1:7], "shared": base[1], "i64": torch.arange(5)}
    torch.save(sd, tmp_path / "x.pth")
    got = read_torch_zip(tmp_path / "x.pth")
    for name, t in sd.items():
        want = t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
        assert got[name].shape == want.shape and np.array_equal(got[name], want), name


def test_torch_zip_reader_maps_float_tensors_in_place(tmp_path):
    """mapped=True: float tensors of the uncompressed members are views of the file (the same
    values once read), anything else (integers, a transposed view) comes back read as before."""
    from npllama.formats.mapped import Stored, as_mapped_weight, read_into_memory
    base = torch.randn(6, 8)
    sd = {"bf16": base.to(torch.bfloat16), "f16": base.half(), "f32": torch.randn(4, 8), "slice": base[2:5, 1:7],
          "transposed": base.t(), "i64": torch.arange(5)}
    torch.save(sd, tmp_path / "x.pth")
    got = read_torch_zip(tmp_path / "x.pth", mapped=True)
    assert all(isinstance(got[n], Stored) for n in ("bf16", "f16", "f32", "slice"))     # rows contiguous
    assert isinstance(got["i64"], np.ndarray) and isinstance(got["transposed"], np.ndarray)
    for name, t in sd.items():
        want = t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
        value = got[name] if isinstance(got[name], np.ndarray) else read_into_memory(got[name])
        assert np.array_equal(value, want), name
        if isinstance(got[name], Stored) and t.ndim == 2:         # as a mapped model holds it
            assert np.array_equal(np.asarray(as_mapped_weight(got[name]), np.float32), want.astype(np.float32)), name


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_hostile_pickle_is_refused_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"w": torch.zeros(2), "evil": _Boom()}, tmp_path / "consolidated.00.pth")
    with pytest.raises(CheckpointError, match=r"posix\.system|os\.system|nt\.system"):
        read_torch_zip(tmp_path / "consolidated.00.pth")
    assert not (tmp_path / "pwned").exists()


# --------------------------------------------------------------------------------------- GGUF
@pytest.mark.parametrize("case", ["gqa", "mqa_tied_head_dim_24", "biases_head_dim_24"])
def test_gguf_f32_round_trip(tmp_path, bpe, case):
    ref = random_llama(tiny_config(**HF_CASES[case]), seed=11)
    path = save_gguf(ref, tmp_path / "tiny.gguf", vocab=gguf_vocab_from_bpe(bpe))
    model = npllama.load(path, progress=False)
    assert model.config.tie_word_embeddings == ref.config.tie_word_embeddings
    assert_matches(model, ref, 300)
    text = "the 42 models<|im_start|>ÄÖÜ"
    assert model.tokenizer.encode(text) == bpe.encode(text).ids
    assert npllama.load(tmp_path, progress=False).config == model.config    # a folder with one .gguf


def test_transformers_reads_our_tiny_gguf_the_same_way(tmp_path, bpe):
    """tiny.py's GGUF writer (llama.cpp's q/k layout) agrees with transformers' GGUF reader."""
    from transformers import AutoModelForCausalLM

    ref = random_llama(tiny_config(n_kv_heads=2), seed=12)
    save_gguf(ref, tmp_path / "tiny.gguf", vocab=gguf_vocab_from_bpe(bpe))
    other = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32).eval()
    ids = np.random.default_rng(0).integers(0, 300, (1, 8))
    assert rel_err(hf_logits(other, ids), hf_logits(ref, ids)) < RTOL


# --------------------------------------------------------------------------------------- the default model
@pytest.mark.slow
def test_default_gguf_logits_match_transformers():
    from transformers import AutoModelForCausalLM

    from npllama.weights import default_model_path

    path = default_model_path()
    model = npllama.load(path, progress=False)
    assert (model.config.n_layers, model.config.n_heads, model.config.n_kv_heads) == (30, 9, 3)
    assert model.config.tie_word_embeddings and model.config.eos_token_ids == (2,)
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ids = np.array([model.tokenizer.encode("<|im_start|>user\nThe 3 largest cities in France are")])
    want = hf_logits(ref, ids)
    assert rel_err(model(ids), want) < RTOL
    assert rel_err(stepped_logits(model, ids), want) < RTOL


# --------------------------------------------------------------------------------------- progress, dtype
def test_progress_bar_goes_to_stderr_only_when_asked(tmp_path, capfd):
    ref = random_llama(tiny_config(), seed=1)
    save_hf(ref, tmp_path)
    capfd.readouterr()
    npllama.load(tmp_path, progress=False)
    assert capfd.readouterr() == ("", "")
    npllama.load(tmp_path, progress=True)
    out, err = capfd.readouterr()
    assert out == "" and "tensor" in err
    assert npllama.load(tmp_path, progress=False, dtype=np.float64).tok_embeddings.dtype == np.float64


# --------------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def good_hf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good")
    save_hf(random_llama(tiny_config(n_kv_heads=2), seed=2), folder)
    return folder


def _copy(src, dst):
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_paths_that_are_not_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        npllama.load(tmp_path / "missing", progress=False)
    with pytest.raises(CheckpointError, match="config.json, params.json or .gguf"):
        npllama.load(tmp_path, progress=False)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="not GGUF"):
        npllama.load(tmp_path / "notes.txt", progress=False)
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    (tmp_path / "b.gguf").write_bytes(b"GGUF")
    with pytest.raises(CheckpointError, match="2 .gguf files"):
        detect_format(tmp_path)


def test_truncated_or_lying_safetensors(tmp_path, good_hf):
    folder = _copy(good_hf, tmp_path / "cut")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*(past the end|truncated)"):
        npllama.load(folder, progress=False)
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", 10 ** 12) + data[8:])
    with pytest.raises(CheckpointError, match="header length"):
        npllama.load(folder, progress=False)
    (folder / "model.safetensors").write_bytes(b"\x01")
    with pytest.raises(CheckpointError, match="too short"):
        npllama.load(folder, progress=False)


def test_shapes_that_do_not_fit_the_config(tmp_path, good_hf):
    folder = _copy(good_hf, tmp_path / "shape")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["intermediate_size"] = 100
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="feed_forward.w1.weight"):
        npllama.load(folder, progress=False)
    cfg["intermediate_size"], cfg["num_hidden_layers"] = 96, 3
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="layers.2"):
        npllama.load(folder, progress=False)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        npllama.load(folder, progress=False)
    (folder / "config.json").write_text(json.dumps({"hidden_size": 64}))
    with pytest.raises(ConfigError, match="num_attention_heads"):
        npllama.load(folder, progress=False)


def test_sharded_index_naming_a_missing_shard(tmp_path):
    folder = save_hf(random_llama(tiny_config(), seed=0), tmp_path, max_shard_size="20KB")
    next(folder.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="model-00002"):
        npllama.load(folder, progress=False)


def test_truncated_gguf_and_garbage_torch_files(tmp_path, bpe):
    path = save_gguf(random_llama(tiny_config(), seed=0), tmp_path / "t.gguf", vocab=gguf_vocab_from_bpe(bpe))
    data = path.read_bytes()
    for cut in (10, 2000, len(data) - 100):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="t.gguf"):
            npllama.load(path, progress=False)
    bad = tmp_path / "x.pth"
    bad.write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="not a zip"):
        read_torch_zip(bad)
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"w": 1}, protocol=2)[:-3])
    with pytest.raises(CheckpointError, match="corrupt|state dict"):
        read_torch_zip(bad)


def test_meta_folder_without_tokenizer_or_vocab(tmp_path):
    ref = random_llama(tiny_config(hidden_dim=meta_hidden_dim(64, 32, None)), seed=0)
    save_meta(ref, tmp_path, None)
    assert npllama.load(tmp_path, progress=False).tokenizer is None
    params = json.loads((tmp_path / "params.json").read_text())
    params["vocab_size"] = -1
    (tmp_path / "params.json").write_text(json.dumps(params))
    with pytest.raises(NpllamaError, match="vocab_size"):
        npllama.load(tmp_path, progress=False)


def test_hf_folder_with_a_sentencepiece_tokenizer(tmp_path, sp_model):
    ref = random_llama(tiny_config(vocab_size=400, eos_token_id=None), seed=8)
    save_hf(ref, tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(sp_model.read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"add_bos_token": False, "chat_template": [{"name": "default", "template": "{{ messages }}"}]}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 3]}))
    tok = npllama.load(tmp_path, progress=False).tokenizer
    assert (tok.bos_id, tok.eos_ids, tok.add_bos, tok.chat_template) == (1, (2, 3), False, "{{ messages }}")
    assert tok.encode("the model") == tok.encode("the model", add_bos=False) and tok.encode("x", add_bos=True)[0] == 1


def test_other_architectures_are_refused_by_name(tmp_path, good_hf):
    folder = _copy(good_hf, tmp_path / "qwen")
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen2"}))
    with pytest.raises(ConfigError, match="qwen2"):
        npllama.load(folder, progress=False)
    (folder / "config.json").write_text(json.dumps({**cfg, "num_key_value_heads": "three"}))
    with pytest.raises(ConfigError, match="config.json"):
        npllama.load(folder, progress=False)
