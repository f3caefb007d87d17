"""Every op of the Torch backend computes npllama's function, in every dtype.

Each test draws inputs in float64, rounds them to the dtype under test, and compares the Torch op
in that dtype against npllama's op in float64 on the *rounded* inputs (exactly representable), so
the error measured is the op's own arithmetic. The bar is npllama.tolerances.parity_rtol(dtype,
"op"), norm-relative: max|a - b| <= rtol * max|b|.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings, strategies as st

import npllama.attention as na
import npllama.cache as nc
import npllama.mlp as nm
import npllama.model as nmodel
import npllama.norm as nn_
import npllama.rope as nr
import npllama.rope_scaling as nrs
import npllama.sampling as ns
import parity.cache as tc
import parity.mlp as tm
import parity.model as tmodel
import parity.norm as tn
import parity.rope as tr
import parity.sampling as ts
from npllama.config import ModelArgs
from npllama.errors import ConfigError, InputError
from npllama.tolerances import parity_rtol

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
dtypes = st.sampled_from(DTYPES)


def rel_err(a, b) -> float:
    """max|a - b| / max|b| in float64 (npllama/tolerances.py)."""
    a = a.detach().to(torch.float64).numpy() if isinstance(a, torch.Tensor) else np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    scale = np.abs(b).max()
    diff = np.abs(a - b).max()
    return float(diff / scale) if scale > 0 else float(diff)


def rounded(x: np.ndarray, dtype: torch.dtype) -> tuple[torch.Tensor, np.ndarray]:
    """x rounded to dtype, as (the torch tensor, its exact float64 value)."""
    t = torch.from_numpy(np.asarray(x, np.float64)).to(dtype)
    return t, t.to(torch.float64).numpy()


def check(out: torch.Tensor, ref: np.ndarray, dtype: torch.dtype, kind: str = "op") -> None:
    assert tuple(out.shape) == ref.shape
    assert out.dtype == dtype or out.dtype == torch.float32
    err = rel_err(out, ref)
    rtol = parity_rtol(dtype, kind, out.dtype)
    assert err <= rtol, f"{dtype}: rel err {err:.3e} > {rtol:.1e}"


arrays_seed = st.integers(0, 2**32 - 1)


# ------------------------------------------------------------------------------ norm and MLP
@settings(max_examples=40, deadline=None)
@given(dtypes, st.integers(1, 3), st.integers(1, 5), st.sampled_from([1, 8, 64, 576]),
       st.sampled_from([1e-6, 1e-5, 1e-2]), st.sampled_from([1e-3, 1.0, 30.0]), arrays_seed)
def test_rms_norm(dtype, b, seq, dim, eps, scale, seed):
    rng = np.random.default_rng(seed)
    x, x64 = rounded(rng.standard_normal((b, seq, dim)) * scale, dtype)
    w, w64 = rounded(1 + 0.2 * rng.standard_normal(dim), dtype)
    out = tn.rms_norm(x, w, eps)
    check(out, nn_.rms_norm(x64, w64, eps), dtype)


def bfloat16_places(v: float) -> float:
    """v in units of the last place of a bfloat16 of its binade (8 significant bits; normal range)."""
    m, e = math.frexp(v)                       # v = m 2**e, 1/2 <= |m| < 1
    return m * 2 ** 8


def to_bfloat16(v: float) -> float:
    """v rounded to the nearest bfloat16, ties to even (Python's round), with Python floats."""
    return 0.0 if v == 0 else round(bfloat16_places(v)) * 2.0 ** (math.frexp(v)[1] - 8)


def test_rms_norm_casts_back_before_the_weight():
    """bfloat16: the normalised x is rounded to bfloat16 before the gain, as npllama and Meta do.

    The reference is the formula on Python floats, rounded to bfloat16 by its own rounding: once
    after x / sqrt(mean(x^2) + eps), once after the gain. It equals torch's output bit for bit
    because no value lies near a rounding tie (checked below: float32 arithmetic, 2**-16 places of
    bfloat16 away from float64's, rounds the same way) and a product of two bfloat16 numbers is
    exact before its rounding. Rounding once, after the gain, gives another answer (checked too).
    """
    x = [1.0, 2.0, 3.0, 4.0]                   # bfloat16 numbers; 1.703125 is 1.7 in bfloat16
    gain, eps = 1.703125, 1e-5
    rms = math.sqrt(sum(v * v for v in x) / len(x) + eps)
    normed = [v / rms for v in x]
    assert all(abs(bfloat16_places(n) % 1 - 0.5) > 0.01 for n in normed)              # far from ties
    want = [to_bfloat16(to_bfloat16(n) * gain) for n in normed]
    assert want != [to_bfloat16(n * gain) for n in normed]                           # the order shows
    got = tn.rms_norm(torch.tensor([x], dtype=torch.bfloat16), torch.full((4,), gain, dtype=torch.bfloat16), eps)
    assert got.dtype == torch.bfloat16 and got[0].tolist() == want


@settings(max_examples=40, deadline=None)
@given(dtypes, st.integers(1, 3), st.integers(1, 4), st.integers(1, 40), st.integers(1, 40),
       st.booleans(), arrays_seed)
def test_linear(dtype, b, seq, n_in, n_out, bias, seed):
    rng = np.random.default_rng(seed)
    x, x64 = rounded(rng.standard_normal((b, seq, n_in)), dtype)
    w, w64 = rounded(rng.standard_normal((n_out, n_in)) / math.sqrt(n_in), dtype)   # (out, in)
    bb, b64 = rounded(rng.standard_normal(n_out), dtype) if bias else (None, None)
    check(tm.linear(x, w, bb), nm.linear(x64, w64, b64), dtype)     # both (out, in), as nn.Linear


@settings(max_examples=30, deadline=None)
@given(dtypes, st.sampled_from([0.1, 3.0, 30.0]), arrays_seed)
def test_silu(dtype, scale, seed):
    x, x64 = rounded(np.random.default_rng(seed).standard_normal(257) * scale, dtype)
    check(tm.silu(x), nm.silu(x64), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_saturates_without_nan(dtype):
    x = torch.tensor([-1e4 if dtype != torch.float16 else -6e4, -100.0, 0.0, 100.0], dtype=dtype)
    out = tm.silu(x)
    assert torch.isfinite(out).all() and out[0] == 0 and out[2] == 0 and out[3] == 100


@settings(max_examples=40, deadline=None)
@given(dtypes, st.integers(1, 2), st.integers(1, 5), st.sampled_from([8, 32, 64]),
       st.sampled_from([8, 48, 128]), st.booleans(), arrays_seed)
def test_feed_forward(dtype, b, seq, dim, hidden, bias, seed):
    rng = np.random.default_rng(seed)
    x, x64 = rounded(rng.standard_normal((b, seq, dim)), dtype)
    (w1, w1_64), (w2, w2_64), (w3, w3_64) = (rounded(rng.standard_normal(s) / math.sqrt(s[1]), dtype)
                                             for s in ((hidden, dim), (dim, hidden), (hidden, dim)))  # (out, in)
    (b1, b1_64), (b2, b2_64), (b3, b3_64) = (rounded(0.1 * rng.standard_normal(n), dtype) if bias else (None, None)
                                             for n in (hidden, dim, hidden))
    out = tm.feed_forward(x, w1, w2, w3, b1, b2, b3)
    check(out, nm.feed_forward(x64, w1_64, w2_64, w3_64, b1_64, b2_64, b3_64), dtype)


# ------------------------------------------------------------------------------ rotary
def rope_scaling_for(name: str, draw) -> dict:
    """Parameters for a registered rope variant (a variant registered elsewhere gets none)."""
    if name == "linear":
        return {"factor": draw(st.sampled_from([1.0, 2.0, 8.0]))}
    if name == "dynamic":
        return {"factor": draw(st.sampled_from([1.5, 4.0]))}
    if name == "llama3":
        return {"factor": draw(st.sampled_from([2.0, 8.0, 32.0])), "low_freq_factor": 1.0,
                "high_freq_factor": draw(st.sampled_from([2.0, 4.0])),
                "original_max_position_embeddings": draw(st.sampled_from([4, 16, 32]))}
    if name == "yarn":
        params = {"factor": draw(st.sampled_from([2.0, 4.0, 16.0])),
                  "original_max_position_embeddings": draw(st.sampled_from([8, 16, 32]))}
        if draw(st.booleans()):
            params.update(beta_fast=draw(st.sampled_from([8.0, 32.0])), beta_slow=draw(st.sampled_from([1.0, 2.0])))
        if draw(st.booleans()):
            params["attention_factor"] = draw(st.sampled_from([0.8, 1.3]))
        return params
    return {}


@st.composite
def rope_scalings(draw):
    """{"rope_type": any registered variant, **its parameters}."""
    name = draw(st.sampled_from(sorted(nrs.ROPE_INIT_FUNCTIONS)))
    return {"rope_type": name, **rope_scaling_for(name, draw)}


def test_every_builtin_variant_is_drawn():
    assert {"default", "linear", "dynamic", "llama3", "yarn"} <= set(nrs.ROPE_INIT_FUNCTIONS)


@settings(max_examples=60, deadline=None)
@given(dtypes, rope_scalings(), st.sampled_from([4, 8, 16, 64]), st.sampled_from([1.0, 0.5]),
       st.integers(0, 300), st.integers(1, 12), st.sampled_from([1e4, 5e5]), arrays_seed)
def test_rope(dtype, scaling, head_dim, partial, start, seq, theta, seed):
    """cos/sin from the shared float64 table and the rotation of q/k, every variant and dtype."""
    assume(int(head_dim * partial) > 2 and int(head_dim * partial) % 2 == 0)
    args = ModelArgs(dim=head_dim * 2, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=8, hidden_dim=8,
                     head_dim=head_dim, rope_theta=theta, rope_scaling=scaling,
                     partial_rotary_factor=partial, max_seq_len=64)
    try:
        inv_np, scale_np = nrs.rope_init(args, start + seq)
    except ConfigError:
        assume(False)                       # a plug-in variant this test cannot parameterise
    inv_t, scale_t = tr.rope_init(args, start + seq)
    assert np.array_equal(inv_t.numpy(), inv_np) and scale_t == scale_np
    pos = np.arange(start, start + seq)
    cos_t, sin_t = tr.rope_cos_sin(inv_t, torch.from_numpy(pos), scale_t, dtype)
    cos64, sin64 = nr.rope_cos_sin(inv_np, pos, scale_np, np.float64)
    check(cos_t, cos64, dtype)
    check(sin_t, sin64, dtype)
    x, x64 = rounded(np.random.default_rng(seed).standard_normal((2, 3, seq, head_dim)), dtype)
    c64, s64 = cos_t.to(torch.float64).numpy(), sin_t.to(torch.float64).numpy()   # the rounded table
    check(tr.apply_rotary_emb(x, cos_t, sin_t), nr.apply_rotary_emb(x64, c64, s64), dtype)


# ------------------------------------------------------------------------------ attention
@settings(max_examples=60, deadline=None)
@given(dtypes, st.sampled_from(["naive", "flash", "sdpa", "auto"]), st.integers(1, 3),
       st.sampled_from([1, 2, 3]), st.integers(1, 24), st.integers(0, 24), st.sampled_from([4, 16, 64]),
       arrays_seed)
def test_attention(dtype, impl, n_kv, n_rep, q_len, extra, head_dim, seed):
    """Causal grouped-query attention, prefill (q_len == kv_len) and after a cache (q_len < kv_len)."""
    rng = np.random.default_rng(seed)
    kv_len = q_len + extra
    q, q64 = rounded(rng.standard_normal((2, n_kv * n_rep, q_len, head_dim)), dtype)
    k, k64 = rounded(rng.standard_normal((2, n_kv, kv_len, head_dim)), dtype)
    v, v64 = rounded(rng.standard_normal((2, n_kv, kv_len, head_dim)), dtype)
    out = tmodel.scaled_dot_product_attention(q, k, v, impl)
    check(out, na.naive_attention(q64, k64, v64, causal=True), dtype)


def test_unknown_attention_is_an_input_error():
    q = torch.zeros(1, 1, 1, 4)
    with pytest.raises(InputError, match="unknown attention implementation 'fast'.*naive, flash, sdpa, auto"):
        tmodel.scaled_dot_product_attention(q, q, q, "fast")


# ------------------------------------------------------------------------------ cache
@settings(max_examples=30, deadline=None)
@given(dtypes, st.lists(st.integers(1, 5), min_size=1, max_size=5), st.integers(1, 3), arrays_seed)
def test_cache_holds_what_npllamas_holds(dtype, chunks, n_kv, seed):
    """Writing chunks returns the same keys/values as npllama's growing cache; truncate rewinds."""
    args = ModelArgs(dim=16, n_layers=2, n_heads=n_kv * 2, n_kv_heads=n_kv, vocab_size=8, hidden_dim=8,
                     head_dim=4, max_seq_len=32)
    rng = np.random.default_rng(seed)
    ours, theirs = tc.KVCache(args, 2, dtype=dtype), nc.KVCache(args, 2, dtype=np.float64, initial_capacity=2)
    assert ours.k[0].shape == (2, n_kv, 32, 4)                 # static: allocated once, full size
    buffers = [t.data_ptr() for t in ours.k + ours.v]
    for n in chunks:
        ours.start(np.ones((2, n), bool))
        theirs.start(np.ones((2, n), bool))
        for layer in range(2):
            k, k64 = rounded(rng.standard_normal((2, n_kv, n, 4)), dtype)
            v, v64 = rounded(rng.standard_normal((2, n_kv, n, 4)), dtype)
            kt, vt = ours.update(layer, k, v)
            kn, vn = theirs.update(layer, k64, v64)
            assert np.array_equal(kt.to(torch.float64).numpy(), kn) and np.array_equal(vt.to(torch.float64).numpy(), vn)
        ours.advance(n)
        theirs.advance(n)
    assert [t.data_ptr() for t in ours.k + ours.v] == buffers  # never reallocated
    assert ours.length == theirs.length == sum(chunks)
    ours.truncate(1)
    assert ours.length == 1
    with pytest.raises(InputError, match="cannot truncate"):
        ours.truncate(5)


def test_cache_refuses_to_overflow_and_bad_batch():
    args = ModelArgs(dim=8, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=8, hidden_dim=8, max_seq_len=16)
    cache = tc.KVCache(args, 1, max_seq_len=4)
    cache.start(np.ones((1, 4), bool))
    with pytest.raises(InputError, match="5 positions exceed the cache's 4"):
        cache.start(np.ones((1, 5), bool))
    with pytest.raises(InputError, match="batch_size must be a positive integer"):
        tc.KVCache(args, 0)


# ------------------------------------------------------------------------------ sampling
settings_strategy = st.builds(ns.SamplingSettings, st.sampled_from([0.0, 0.3, 0.7, 1.0, 1.5]),
                              st.sampled_from([0, 1, 3, 10, 1000]), st.sampled_from([1.0, 0.95, 0.5, 0.1]))


@settings(max_examples=150, deadline=None)
@given(settings_strategy, st.integers(2, 300), st.sampled_from([torch.float64, torch.float32, torch.bfloat16]),
       st.booleans(), arrays_seed)
def test_sample_picks_npllamas_token(sampling, vocab, dtype, ties, seed):
    """The same (logits, settings, u) give the same token in both backends, ties included."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((4, vocab)) * 3
    if ties:
        logits = np.round(logits)                        # many equal logits: the order of ties matters
    t, logits64 = rounded(logits, dtype)
    u = rng.random(4)
    u[0] = 0.0          # (u within ~1e-15 of 1 lands where the cdf is flat to the last ulp, and
                        # NumPy's and torch's float64 sums may round the tail differently there)
    got = ts.sample_batch(t, sampling, torch.from_numpy(u))
    want = [ns.sample(row, sampling, float(ui)) for row, ui in zip(logits64, u)]
    assert got.tolist() == want
    assert ts.sample(t[2], sampling, float(u[2])) == want[2]


def test_sample_stays_on_the_logits_device_and_needs_no_host_u():
    logits = torch.randn(3, 50)
    u = torch.rand(3, dtype=torch.float64)
    out = ts.sample_batch(logits, ns.SamplingSettings(0.9, 5, 0.9), u)
    assert out.dtype == torch.int64 and out.shape == (3,) and out.device == logits.device


# ------------------------------------------------------------------------------ loss
@settings(max_examples=30, deadline=None)
@given(dtypes, st.integers(1, 3), st.integers(2, 8), st.integers(2, 50), st.floats(0, 0.5), arrays_seed)
def test_cross_entropy_loss(dtype, b, seq, vocab, ignored, seed):
    rng = np.random.default_rng(seed)
    logits, logits64 = rounded(rng.standard_normal((b, seq, vocab)) * 2, dtype)
    labels = rng.integers(0, vocab, (b, seq))
    labels[rng.random((b, seq)) < ignored] = -100
    want = nmodel.cross_entropy_loss(logits64, labels)
    got = tmodel.cross_entropy_loss(logits, torch.from_numpy(labels))
    if math.isnan(want):
        assert torch.isnan(got)
    else:
        assert abs(float(got) - want) <= parity_rtol(torch.float32, "op") * max(1.0, abs(want))
