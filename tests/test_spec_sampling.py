"""Choosing the next token against the definitions (npllama/sampling.py), NumPy only.

    temperature   p_i = exp(z_i / T) / sum_j exp(z_j / T); T = 0 is argmax
    top-k         keep the k most probable tokens (ties: the lower id first)
    top-p         of what is kept, ranked by probability, keep each token whose better-ranked
                  tokens hold at most p of the kept mass (Meta's convention: the token that
                  crosses p stays)
    the draw      inverse CDF: the first kept token, in that rank order, whose cumulative kept
                  mass exceeds u times the kept total

each written here on Python floats, token by token, apart from the implementation.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

from npllama.errors import InputError
from npllama.sampling import SamplingSettings, sample, sample_batch, softmax_probs, top_k_top_p, uniforms
from npllama.tolerances import SPEC_VS_FORMULA_RTOL
from spec_formulas import assert_close, seeds

RTOL = SPEC_VS_FORMULA_RTOL[np.dtype(np.float64)]     # sums of probabilities in float64

logits_lists = st.lists(st.floats(-20, 20, allow_nan=False), min_size=2, max_size=30)


def softmax_formula(logits: list[float], temperature: float) -> list[float]:
    top = max(z / temperature for z in logits)
    e = [math.exp(z / temperature - top) for z in logits]
    total = math.fsum(e)
    return [v / total for v in e]


def ranked(probs: list[float]) -> list[int]:
    """Token ids, most probable first, ties by the lower id."""
    return sorted(range(len(probs)), key=lambda i: (-probs[i], i))


def kept_formula(probs: list[float], k: int, p: float) -> set[int]:
    """The tokens top-k and then top-p keep, by their definitions."""
    order = ranked(probs)
    kept = order[:k] if k else order
    mass = math.fsum(probs[i] for i in kept)
    out, before = [], 0.0
    for i in kept:
        if before <= p * mass:
            out.append(i)
        before += probs[i]
    return set(out)


@settings(max_examples=40, deadline=None)
@given(logits=logits_lists, temperature=st.floats(0.05, 5))
def test_probabilities_are_the_softmax_of_the_logits_over_the_temperature(logits, temperature):
    got = softmax_probs(np.array(logits, np.float32), temperature)
    assert_close(got, softmax_formula(np.float32(logits).tolist(), temperature), np.float64)


def near_a_boundary(probs: list[float], k: int, p: float) -> bool:
    """Whether some token's better-ranked mass lies within rounding (RTOL) of p times the kept
    mass: there the two sums may fall either side, and either answer is right."""
    order = ranked(probs)
    mass = math.fsum(probs[i] for i in order[:k or None])
    return any(abs(math.fsum(probs[j] for j in order[:r]) - p * mass) < RTOL for r in range(len(order)))


@settings(max_examples=60, deadline=None)
@given(logits=logits_lists, k=st.integers(0, 12), p=st.floats(0.05, 1.0))
def test_top_k_then_top_p_keep_the_tokens_their_definitions_keep(logits, k, p):
    probs = softmax_formula(logits, 1.0)
    assume(not near_a_boundary(probs, k, p))
    order = ranked(probs)
    kept = top_k_top_p(np.array([probs[i] for i in order]), k, p)     # sorted in, sorted out
    assert {order[r] for r in np.flatnonzero(kept)} == kept_formula(probs, k, p)
    assert all(kept[r] == probs[order[r]] for r in np.flatnonzero(kept))      # kept as they were


def test_top_p_reads_what_top_k_left():
    """Top-2 leaves 0.5 and 0.3 (0.8 of the mass); top-p 0.6 of that is 0.48: the second token's
    better-ranked mass, 0.5, is more than that, so it goes (measured against the whole
    distribution, 0.5 <= 0.6, it would have stayed)."""
    assert top_k_top_p(np.array([0.5, 0.3, 0.2]), 2, 0.6).tolist() == [0.5, 0.0, 0.0]
    assert top_k_top_p(np.array([0.5, 0.3, 0.2]), 0, 0.6).tolist() == [0.5, 0.3, 0.0]


@settings(max_examples=60, deadline=None)
@given(logits=logits_lists, temperature=st.floats(0.1, 3), k=st.integers(0, 10), p=st.floats(0.05, 1.0),
       u=st.floats(0, 1, exclude_max=True))
def test_the_draw_is_the_inverse_cdf_of_the_kept_tokens(logits, temperature, k, p, u):
    """The chosen token is kept, and u * (kept mass) falls in its interval of the kept CDF, ranked
    most probable first (up to the rounding of the sums, RTOL of the mass)."""
    x = np.array(logits, np.float32)
    probs = softmax_formula(x.tolist(), temperature)
    assume(not near_a_boundary(probs, k, p))
    token = sample(x, SamplingSettings(temperature, k, p), u)
    kept = [i for i in ranked(probs) if i in kept_formula(probs, k, p)]
    assert token in kept
    below = math.fsum(probs[i] for i in kept[: kept.index(token)])
    assert below - RTOL <= u * math.fsum(probs[i] for i in kept) <= below + probs[token] + RTOL


@settings(max_examples=30, deadline=None)
@given(logits=logits_lists, u=st.floats(0, 1, exclude_max=True))
def test_temperature_zero_is_the_argmax_whatever_u(logits, u):
    x = np.array(logits, np.float32)
    best = max(range(len(logits)), key=lambda i: (x[i], -i))          # the first of equal maxima
    assert sample(x, SamplingSettings(0.0, 5, 0.5), u) == best


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 4), vocab=st.integers(2, 20), seed=seeds)
def test_a_batch_samples_each_row_alone(rows, vocab, seed):
    rng = np.random.default_rng(seed)
    logits, u = rng.standard_normal((rows, vocab)).astype(np.float32), rng.random(rows)
    s = SamplingSettings(0.8, 5, 0.9)
    assert sample_batch(logits, s, u).tolist() == [sample(row, s, float(ui)) for row, ui in zip(logits, u)]


def test_uniforms_are_pcg64_draws_of_the_seed():
    assert np.array_equal(uniforms(7, 5, 3), np.random.default_rng(7).random((5, 3)))
    u = uniforms(None, 100, 2)
    assert u.shape == (100, 2) and ((0 <= u) & (u < 1)).all()


@pytest.mark.parametrize("settings_", [dict(temperature=-1), dict(temperature=math.nan), dict(top_k=-1),
                                       dict(top_k=True), dict(top_k=1.5), dict(top_p=0), dict(top_p=1.5),
                                       dict(temperature=True)])
def test_impossible_settings_are_refused(settings_):
    with pytest.raises(InputError):
        SamplingSettings(**settings_)
