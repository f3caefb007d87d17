"""The sampler: a pure function of (logits, settings, u), with Meta's top-p convention."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from npllama.errors import InputError
from npllama.sampling import SamplingSettings, sample, uniforms, softmax_probs, top_k_top_p

logit_arrays = st.lists(st.floats(-20, 20, allow_nan=False), min_size=2, max_size=40).map(
    lambda xs: np.array(xs, dtype=np.float32))


@given(logit_arrays, st.floats(0, 0.999999))
def test_greedy_is_argmax_whatever_u(logits, u):
    assert sample(logits, SamplingSettings(), u) == int(np.argmax(logits))


@settings(max_examples=200, deadline=None)
@given(logit_arrays, st.floats(0.1, 3), st.integers(0, 10), st.floats(0.05, 1.0), st.floats(0, 0.999999))
def test_sampled_token_is_within_top_k_and_top_p(logits, t, k, p, u):
    tok = sample(logits, SamplingSettings(t, k, p), u)
    probs = softmax_probs(logits, t)
    order = np.argsort(-probs, kind="stable")
    rank = int(np.where(order == tok)[0][0])
    if k:
        assert rank < k
    mass_before = probs[order][:rank].sum()
    assert mass_before <= p + 1e-12           # Meta: the token that crosses p is kept


def test_top_p_keeps_the_token_that_crosses_p():
    kept = top_k_top_p(np.array([0.5, 0.3, 0.2]), 0, 0.6)
    assert kept.tolist() == [0.5, 0.3, 0.0]


@given(logit_arrays, st.floats(0.2, 2))
def test_u_sweeps_the_distribution_in_order(logits, t):
    """Increasing u walks the kept tokens from most to least probable: inverse CDF."""
    s = SamplingSettings(t)
    probs = softmax_probs(logits, t)
    order = list(np.argsort(-probs, kind="stable"))
    ranks = [order.index(sample(logits, s, u)) for u in np.linspace(0, 0.999999, 50)]
    assert ranks == sorted(ranks)


def test_seeded_uniforms_repeat():
    assert np.array_equal(uniforms(7, 5, 2), uniforms(7, 5, 2))
    assert not np.array_equal(uniforms(7, 5), uniforms(8, 5))


@pytest.mark.parametrize("kwargs, words", [
    ({"temperature": -0.5}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 3}, r"top_p must lie in \(0, 1\]"), ({"top_p": 0}, "top_p"),
    ({"top_k": -1}, "top_k"), ({"top_k": 2.5}, "top_k"),
])
def test_settings_out_of_range(kwargs, words):
    with pytest.raises(InputError, match=words):
        SamplingSettings(**kwargs)
