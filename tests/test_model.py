"""Equalities the decoder must satisfy whatever its weights: cached == uncached, batched ==
unbatched, grouped heads == repeated heads, and the loss's conventions."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from npllama.attention import naive_attention, repeat_kv
from npllama.config import ModelArgs
from npllama.errors import CheckpointError, InputError
from npllama.model import Transformer, cross_entropy_loss
from npllama.params import init_params

TOL32 = 1e-5   # float32 re-association across different chunkings: a few ulps of O(1) logits


@st.composite
def tiny_configs(draw):
    n_kv = draw(st.sampled_from([1, 2, 3]))
    n_rep = draw(st.sampled_from([1, 2, 3]))
    return ModelArgs(dim=draw(st.sampled_from([16, 24, 32])), n_layers=draw(st.integers(1, 2)),
                     n_heads=n_kv * n_rep, n_kv_heads=n_kv, vocab_size=draw(st.integers(20, 60)),
                     hidden_dim=draw(st.sampled_from([20, 48])), head_dim=draw(st.sampled_from([4, 8, 12])),
                     max_seq_len=64, tie_word_embeddings=draw(st.booleans()),
                     attention_bias=draw(st.booleans()), mlp_bias=draw(st.booleans()))


def rel_err(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@settings(max_examples=25, deadline=None)
@given(tiny_configs(), st.integers(2, 20), st.data())
def test_cached_chunks_equal_one_full_pass(args, seq, data):
    model = Transformer(args, init_params(args, seed=1, std=0.3))
    ids = np.random.default_rng(0).integers(0, args.vocab_size, (2, seq))
    full = model(ids)
    cuts = sorted(set(data.draw(st.lists(st.integers(1, seq - 1), max_size=4))))
    cache, outs = model.new_cache(2), []
    for a, b in zip([0] + cuts, cuts + [seq]):
        outs.append(model(ids[:, a:b], cache=cache))
    assert cache.length == seq
    assert rel_err(np.concatenate(outs, axis=1), full) < TOL32


@settings(max_examples=10, deadline=None)
@given(tiny_configs())
def test_batched_equals_unbatched(args):
    model = Transformer(args, init_params(args, seed=2, std=0.3))
    ids = np.random.default_rng(1).integers(0, args.vocab_size, (3, 9))
    batched = model(ids)
    for row in range(3):
        assert rel_err(batched[row], model(ids[row:row + 1])[0]) < TOL32


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([(4, 4), (4, 2), (6, 3), (6, 1)]), st.integers(1, 7), st.integers(0, 5))
def test_grouped_heads_equal_repeated_kv(heads, q_len, extra):
    n_heads, n_kv = heads
    rng = np.random.default_rng(3)
    kv_len = q_len + extra
    q = rng.standard_normal((2, n_heads, q_len, 8))
    k, v = rng.standard_normal((2, 2, n_kv, kv_len, 8))
    grouped = naive_attention(q, k, v)
    repeated = naive_attention(q, repeat_kv(k, n_heads // n_kv), repeat_kv(v, n_heads // n_kv))
    assert np.allclose(grouped, repeated, rtol=1e-12, atol=0)


def test_query_head_reads_kv_head_h_div_n_rep():
    q = np.zeros((1, 4, 1, 2)); k = np.zeros((1, 2, 1, 2))
    v = np.array([1.0, 2.0])[None, :, None, None] * np.ones((1, 2, 1, 2))
    assert naive_attention(q, k, v)[0, :, 0, 0].tolist() == [1, 1, 2, 2]


def test_loss_ignores_minus_100_and_shifts():
    logits = np.random.default_rng(0).standard_normal((1, 4, 5)).astype(np.float32)
    labels = np.array([[0, 1, -100, 3]])
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -(logp[0, 0, 1] + logp[0, 2, 3]) / 2
    assert abs(cross_entropy_loss(logits, labels) - expected) < 1e-6


def test_shape_mismatch_names_the_tensor():
    args = ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=10, hidden_dim=8)
    params = init_params(args)
    params["layers.0.attention.wk.weight"] = np.zeros((16, 16), np.float32)
    with pytest.raises(CheckpointError, match=r"layers.0.attention.wk.weight.*\(16, 16\).*\(8, 16\)"):
        Transformer(args, params)


def test_ids_outside_vocab_and_empty_ids():
    args = ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=10, hidden_dim=8, max_seq_len=8)
    model = Transformer(args, init_params(args))
    with pytest.raises(InputError, match="token id 10 lies outside the vocabulary"):
        model([[1, 10]])
    with pytest.raises(InputError, match="non-empty"):
        model(np.zeros((1, 0), np.int64))
    cache = model.new_cache(1)
    model([[1] * 6], cache=cache)
    with pytest.raises(InputError, match="exceed the context window of 8"):
        model([[1] * 3], cache=cache)


def test_no_float64_sneaks_into_float32_inference():
    args = ModelArgs(dim=16, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=10, hidden_dim=8)
    model = Transformer(args, init_params(args))
    seen = []
    model([[1, 2, 3]], trace=lambda name, x: seen.append((name, x.dtype)))
    assert all(dt == np.float32 for _, dt in seen), [s for s in seen if s[1] != np.float32]
