"""Blockwise (flash) attention computes exactly naive attention, in NumPy and in Torch, in memory
that grows with the sequence, not with its square (docs/flash_attention.md)."""

import functools
import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import npllama.layout
import npllama.model
from npllama.attention import causal_mask, flash_attention, naive_attention, repeat_kv
from npllama.config import ModelArgs
from npllama.errors import InputError
from npllama.model import Transformer
from npllama.params import init_params
from npllama.tolerances import (ATTENTION_CUDA_FLOAT16_RTOL, ATTENTION_FLASH_RTOL, ATTENTION_LSE_RTOL,
                                ATTENTION_PARITY_RTOL)
from parity import attention as tatt

DTYPES = [np.dtype(np.float64), np.dtype(np.float32)]


def rel_err(a, b) -> float:
    """Norm-relative error max|a - b| / max|b| (npllama/tolerances.py)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@st.composite
def attention_cases(draw, max_len=40):
    """Shapes, grouping, lengths (q_len <= kv_len), block sizes, causality, dtype and data."""
    n_kv = draw(st.integers(1, 3))
    n_rep = draw(st.sampled_from([1, 2, 3, 4]))           # 1: MHA; n_kv == 1: MQA
    q_len = draw(st.integers(1, max_len))
    kv_len = q_len + draw(st.one_of(st.just(0), st.integers(0, max_len)))   # q_len < kv_len: after a cache
    block = st.one_of(st.just(1), st.integers(1, max_len + 8))              # 1, and sizes that do not divide
    case = dict(batch=draw(st.integers(1, 2)), n_heads=n_kv * n_rep, n_kv_heads=n_kv, q_len=q_len,
                kv_len=kv_len, head_dim=draw(st.sampled_from([1, 3, 8, 16, 64])),
                block_q=draw(block), block_k=draw(block), causal=draw(st.booleans()),
                dtype=draw(st.sampled_from(DTYPES)),
                spread=draw(st.sampled_from([0.1, 1.0, 3.0])),   # sharp or flat softmax rows
                seed=draw(st.integers(0, 2**32 - 1)))
    return case


def make_qkv(c):
    rng = np.random.default_rng(c["seed"])
    b, hd = c["batch"], c["head_dim"]
    q = rng.standard_normal((b, c["n_heads"], c["q_len"], hd)) * c["spread"]
    k = rng.standard_normal((b, c["n_kv_heads"], c["kv_len"], hd))
    v = rng.standard_normal((b, c["n_kv_heads"], c["kv_len"], hd))
    return (x.astype(c["dtype"]) for x in (q, k, v))


# ------------------------------------------------------------------ NumPy: flash == naive
@settings(max_examples=100, deadline=None)
@given(attention_cases())
def test_flash_equals_naive(c):
    q, k, v = make_qkv(c)
    out = flash_attention(q, k, v, causal=c["causal"], block_q=c["block_q"], block_k=c["block_k"])
    ref = naive_attention(q, k, v, causal=c["causal"])
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert rel_err(out, ref) <= ATTENTION_FLASH_RTOL[c["dtype"]]


@settings(max_examples=40, deadline=None)
@given(attention_cases())
def test_flash_lse_is_log_sum_exp_of_scores(c):
    q, k, v = make_qkv(c)
    _, lse = flash_attention(q, k, v, causal=c["causal"], block_q=c["block_q"], block_k=c["block_k"],
                             return_lse=True)
    # log sum_j exp(s_ij) over visible keys, from the whole score matrix, in float64
    n_rep = c["n_heads"] // c["n_kv_heads"]
    s = (q.astype(np.float64) @ np.swapaxes(repeat_kv(k, n_rep), -1, -2).astype(np.float64)) / np.sqrt(c["head_dim"])
    if c["causal"]:
        s = np.where(causal_mask(c["q_len"], c["kv_len"]), s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    ref = (m + np.log(np.exp(s - m).sum(axis=-1, keepdims=True)))[..., 0]
    assert lse.shape == (c["batch"], c["n_heads"], c["q_len"])
    tol = ATTENTION_LSE_RTOL[c["dtype"]] * max(1.0, float(np.abs(ref).max()))
    assert float(np.abs(lse - ref).max()) <= tol


def test_grouped_heads_are_not_copied_and_equal_repeated_kv():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 6, 9, 8))
    k, v = rng.standard_normal((2, 2, 2, 14, 8))
    grouped = flash_attention(q, k, v, block_q=4, block_k=5)
    repeated = flash_attention(q, repeat_kv(k, 3), repeat_kv(v, 3), block_q=4, block_k=5)
    assert rel_err(grouped, repeated) <= ATTENTION_FLASH_RTOL[np.dtype(np.float64)]


def test_rows_that_see_no_key_are_zero_not_nan():
    """Causal with q_len > kv_len: the first q_len - kv_len queries precede every key."""
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 4, 7, 8))
    k, v = rng.standard_normal((2, 1, 2, 3, 8))
    out, lse = flash_attention(q, k, v, block_q=2, block_k=2, return_lse=True)
    ref = naive_attention(q, k, v)
    assert not np.isnan(out).any() and not np.isnan(ref).any()
    assert (out[:, :, :4] == 0).all() and (ref[:, :, :4] == 0).all() and (lse[:, :, :4] == -np.inf).all()
    assert rel_err(out, ref) <= ATTENTION_FLASH_RTOL[np.dtype(np.float64)]
    for impl in (tatt.naive_attention, tatt.flash_attention, tatt.sdpa_attention):
        t = impl(*(torch.from_numpy(x) for x in (q, k, v)), causal=True).numpy()
        assert not np.isnan(t).any() and rel_err(t, ref) <= ATTENTION_PARITY_RTOL[np.dtype(np.float64)]


@pytest.mark.parametrize("block", [0, -3, 2.5, True])
def test_bad_block_size_is_an_input_error(block):
    x = np.zeros((1, 1, 4, 2))
    with pytest.raises(InputError, match="block_q must be a positive integer"):
        flash_attention(x, x, x, block_q=block)
    with pytest.raises(InputError, match="block_k must be a positive integer"):
        flash_attention(x, x, x, block_k=block)


def test_heads_not_a_multiple_of_kv_heads_is_an_input_error():
    with pytest.raises(InputError, match="multiple of n_kv_heads"):
        flash_attention(np.zeros((1, 3, 4, 2)), np.zeros((1, 2, 4, 2)), np.zeros((1, 2, 4, 2)))


# ------------------------------------------------------------------ memory: linear, not quadratic
def traced_peak(fn, *args, **kwargs) -> int:
    """Peak bytes allocated while fn runs (NumPy reports its array buffers to tracemalloc)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        fn(*args, **kwargs)
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def test_flash_never_allocates_seq_by_seq():
    rng = np.random.default_rng(2)
    hd = 64

    def qkv(seq):
        return (rng.standard_normal((1, 2, seq, hd), dtype=np.float32),
                rng.standard_normal((1, 1, seq, hd), dtype=np.float32),
                rng.standard_normal((1, 1, seq, hd), dtype=np.float32))

    # the instrument works: naive attention's scores show up at a length where naive fits ...
    short = 1024
    q, k, v = qkv(short)
    assert traced_peak(naive_attention, q, k, v) >= short * short * 4
    # ... where flash gives the same result as naive
    assert rel_err(flash_attention(q, k, v), naive_attention(q, k, v)) <= ATTENTION_FLASH_RTOL[np.dtype(np.float32)]

    # 8192 tokens: one head's score matrix would be 256 MiB; flash stays far below an eighth of it
    seq = 8192
    q, k, v = qkv(seq)
    peak = traced_peak(flash_attention, q, k, v)
    assert peak < seq * seq * 4 / 8, f"flash attention peaked at {peak / 2**20:.1f} MiB"
    # what it does hold: its output and accumulators, O(seq * head_dim), plus one score tile per head
    assert peak < 8 * q.nbytes + 4 * 2 * 128 * 512 * 4


# ------------------------------------------------------------------ Torch mirrors NumPy
@settings(max_examples=60, deadline=None)
@given(attention_cases())
def test_torch_attention_equals_numpy(c):
    q, k, v = make_qkv(c)
    tq, tk, tv = (torch.from_numpy(np.ascontiguousarray(x)) for x in (q, k, v))
    tol = ATTENTION_PARITY_RTOL[c["dtype"]]
    blocks = dict(block_q=c["block_q"], block_k=c["block_k"])
    ref = naive_attention(q, k, v, causal=c["causal"])
    ref_flash, ref_lse = flash_attention(q, k, v, causal=c["causal"], return_lse=True, **blocks)

    t_naive = tatt.naive_attention(tq, tk, tv, causal=c["causal"])
    t_flash, t_lse = tatt.flash_attention(tq, tk, tv, causal=c["causal"], return_lse=True, **blocks)
    t_sdpa = tatt.sdpa_attention(tq, tk, tv, causal=c["causal"])
    for t in (t_naive, t_flash, t_sdpa):
        assert t.dtype == tq.dtype and tuple(t.shape) == ref.shape
    assert rel_err(t_naive.numpy(), ref) <= tol
    assert rel_err(t_flash.numpy(), ref_flash) <= tol
    assert rel_err(t_sdpa.numpy(), ref) <= tol
    assert float(np.abs(t_lse.numpy() - ref_lse).max()) <= tol * max(1.0, float(np.abs(ref_lse).max()))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("q_len, kv_len", [(300, 300), (1, 300), (37, 300)])
def test_sdpa_on_cuda_equals_numpy(q_len, kv_len):
    """The fast path on a GPU: float16, grouped heads; prefill must run torch's flash kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    rng = np.random.default_rng(7)
    q = rng.standard_normal((2, 8, q_len, 64)).astype(np.float16)
    k, v = rng.standard_normal((2, 2, 2, kv_len, 64)).astype(np.float16)
    ref = naive_attention(*(x.astype(np.float64) for x in (q, k, v)))
    tq, tk, tv = (torch.from_numpy(x).cuda() for x in (q, k, v))
    if q_len == kv_len:                      # prefill: only the flash kernel is allowed to run
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            out = tatt.sdpa_attention(tq, tk, tv, causal=True)
    else:
        out = tatt.sdpa_attention(tq, tk, tv, causal=True)
    assert out.dtype == torch.float16
    assert rel_err(out.float().cpu().numpy(), ref) <= ATTENTION_CUDA_FLOAT16_RTOL


def test_torch_helpers_equal_numpy():
    x = np.random.default_rng(3).standard_normal((2, 3, 5, 4))
    assert np.array_equal(tatt.repeat_kv(torch.from_numpy(x), 2).numpy(), repeat_kv(x, 2))
    for q_len, kv_len in [(1, 1), (3, 3), (2, 7), (5, 3)]:
        assert np.array_equal(tatt.causal_mask(q_len, kv_len).numpy(), causal_mask(q_len, kv_len))


# ------------------------------------------------------------------ the model: same logits both ways
def tiny_model(n_heads=4, n_kv_heads=2):
    args = ModelArgs(dim=32, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=50,
                     hidden_dim=48, max_seq_len=128)
    return Transformer(args, init_params(args, seed=4, std=0.3))


@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)])
def test_model_logits_same_with_flash_and_naive(monkeypatch, heads):
    # small tiles, so that a short prompt crosses many of them (and lengths do not divide)
    monkeypatch.setattr(npllama.model, "flash_attention", functools.partial(flash_attention, block_q=3, block_k=5))
    model = tiny_model(*heads)
    ids = np.random.default_rng(5).integers(0, 50, (2, 23))
    naive = model(ids, attention="naive")
    flash = model(ids, attention="flash")
    assert rel_err(flash, naive) <= ATTENTION_FLASH_RTOL[np.dtype(np.float32)]
    # after a cache: chunks of 9 + 7 + 7 queries against 9, 16, 23 keys (q_len < kv_len)
    cache = model.new_cache(2)
    chunks = [model(ids[:, a:b], cache=cache, attention="flash") for a, b in [(0, 9), (9, 16), (16, 23)]]
    assert rel_err(np.concatenate(chunks, axis=1), naive) <= ATTENTION_FLASH_RTOL[np.dtype(np.float32)]


def test_model_auto_switches_to_flash_at_the_threshold(monkeypatch):
    calls = []
    monkeypatch.setattr(npllama.layout, "FLASH_MIN_LEN", 10)
    monkeypatch.setattr(npllama.model, "flash_attention",
                        lambda *a, **kw: calls.append("flash") or flash_attention(*a, **kw))
    model = tiny_model()
    ids = np.random.default_rng(6).integers(0, 50, (1, 12))
    model(ids[:, :9])
    assert calls == []
    auto = model(ids)
    assert calls == ["flash"] * model.config.n_layers
    assert rel_err(auto, model(ids, attention="naive")) <= ATTENTION_FLASH_RTOL[np.dtype(np.float32)]


def test_model_unknown_attention_is_an_input_error():
    with pytest.raises(InputError, match="unknown attention implementation"):
        tiny_model()(np.array([[1, 2, 3]]), attention="fast")
