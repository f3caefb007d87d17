"""The scaled rotary variants against their papers' formulas (npllama/rope_scaling.py), NumPy only.

Each variant gives the inverse frequencies theta_i' (i in [0, d/2), d = rotary_dim) from the
default theta_i = base ** (-2i / d); the formulas are written here on Python floats, one
frequency at a time, from their sources:

    linear    theta_i / s                                     Chen et al. 2023 (position interpolation)
    dynamic   theta_i with base' = base (s L / L0 - (s - 1)) ** (d / (d - 2)) once L > L0
                                                              emozilla and bloc97 (dynamic NTK), 2023
    llama3    Meta's apply_scaling, by wavelength 2 pi / theta_i against the original context
    yarn      NTK-by-parts (Peng et al. 2023, sec. 3.2): theta_i kept where the wavelength turns
              more than beta_fast times in the original context, theta_i / s where it turns fewer
              than beta_slow times, a linear ramp over i between (the authors' code); attention
              factor 0.1 ln s + 1 (eq. 22)
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from npllama.config import ModelArgs
from npllama.rope_scaling import context_window, rope_init
from npllama.tolerances import SPEC_VS_FORMULA_RTOL
from spec_formulas import assert_close

RTOL = SPEC_VS_FORMULA_RTOL[np.dtype(np.float64)]

dims = st.integers(2, 64).map(lambda n: 2 * n)                 # rotary_dim, above 2 for dynamic NTK
bases = st.sampled_from([1e4, 5e5])
factors = st.sampled_from([1.5, 2.0, 4.0, 8.0, 32.0])
contexts = st.sampled_from([256, 2048, 8192])


def args(d: int, base: float, rope: dict, max_seq_len: int = 2048) -> ModelArgs:
    return ModelArgs(dim=d, n_layers=1, n_heads=1, n_kv_heads=1, vocab_size=8, hidden_dim=8, rope_theta=base,
                     rope_scaling=rope, max_seq_len=max_seq_len)


def theta(base: float, d: int) -> list[float]:
    return [base ** (-2 * i / d) for i in range(d // 2)]


@settings(max_examples=25, deadline=None)
@given(d=dims, base=bases, s=factors, seq_len=st.integers(1, 10**5))
def test_linear_divides_every_frequency_by_the_factor(d, base, s, seq_len):
    inv_freq, scaling = rope_init(args(d, base, {"rope_type": "linear", "factor": s}), seq_len)
    assert_close(inv_freq, [t / s for t in theta(base, d)], np.float64)
    assert scaling == 1.0


@settings(max_examples=40, deadline=None)
@given(d=dims, base=bases, s=factors, trained=contexts, seq_len=st.integers(1, 40000))
def test_dynamic_ntk_grows_the_base_once_past_the_trained_length(d, base, s, trained, seq_len):
    inv_freq, scaling = rope_init(args(d, base, {"rope_type": "dynamic", "factor": s}, trained), seq_len)
    new_base = base * (s * seq_len / trained - (s - 1)) ** (d / (d - 2)) if seq_len > trained else base
    assert_close(inv_freq, theta(new_base, d), np.float64)
    assert scaling == 1.0


def meta_apply_scaling(freqs: list[float], factor: float, low: float, high: float, old_ctx: float) -> list[float]:
    """Meta's Llama 3.1 ``apply_scaling`` (llama-models), one frequency at a time."""
    low_freq_wavelen, high_freq_wavelen = old_ctx / low, old_ctx / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            out.append(freq)
        elif wavelen > low_freq_wavelen:
            out.append(freq / factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return out


@settings(max_examples=40, deadline=None)
@given(d=dims, base=st.sampled_from([1e4, 5e5]), s=factors, low=st.sampled_from([0.5, 1.0, 2.0]),
       band=st.sampled_from([1.0, 3.0, 8.0]), old_ctx=contexts)
def test_llama3_is_metas_apply_scaling(d, base, s, low, band, old_ctx):
    high = low + band
    rope = {"rope_type": "llama3", "factor": s, "low_freq_factor": low, "high_freq_factor": high,
            "original_max_position_embeddings": old_ctx}
    inv_freq, scaling = rope_init(args(d, base, rope, old_ctx * 8), 1)
    assert_close(inv_freq, meta_apply_scaling(theta(base, d), s, low, high, old_ctx), np.float64)
    assert scaling == 1.0


def turns(freq: float, old_ctx: float) -> float:
    """r = L / lambda: how many times a wavelength 2 pi / theta turns in the original context L."""
    return old_ctx * freq / (2 * math.pi)


def yarn_index(rotations: float, d: int, base: float, old_ctx: float) -> float:
    """The (fractional) frequency index i at which L / lambda_i = rotations (lambda_i = 2 pi base^(2i/d))."""
    return d * math.log(old_ctx / (rotations * 2 * math.pi)) / (2 * math.log(base))


@settings(max_examples=40, deadline=None)
@given(d=dims, base=bases, s=factors, old_ctx=contexts, fast=st.sampled_from([16.0, 32.0]),
       slow=st.sampled_from([1.0, 2.0]), truncate=st.booleans())
def test_yarn_keeps_fast_dimensions_interpolates_slow_ones_and_ramps_between(d, base, s, old_ctx, fast, slow,
                                                                            truncate):
    rope = {"rope_type": "yarn", "factor": s, "original_max_position_embeddings": old_ctx,
            "beta_fast": fast, "beta_slow": slow, "truncate": truncate}
    inv_freq, scaling = rope_init(args(d, base, rope, old_ctx * int(s)), 1)
    lo, hi = yarn_index(fast, d, base, old_ctx), yarn_index(slow, d, base, old_ctx)
    if truncate:
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, d - 1)
    want = []
    for i, t in enumerate(theta(base, d)):
        if turns(t, old_ctx) >= fast:                  # the paper: r > beta, keep theta_i
            assert inv_freq[i] == pytest.approx(t, rel=RTOL)
        if turns(t, old_ctx) <= slow:                  # the paper: r < alpha, theta_i / s
            assert inv_freq[i] == pytest.approx(t / s, rel=RTOL)
        ramp = min(max((i - lo) / ((hi - lo) or 0.001), 0.0), 1.0)      # 0 keeps, 1 interpolates
        want.append(t * (1 - ramp) + t / s * ramp)
    assert_close(inv_freq, want, np.float64)
    assert scaling == pytest.approx(0.1 * math.log(s) + 1, rel=RTOL)


@pytest.mark.parametrize("rope, want", [
    ({"attention_factor": 0.75}, 0.75),                                        # given: as it is
    ({"mscale": 0.707, "mscale_all_dim": 0.707}, 1.0),                         # DeepSeek: the ratio
    ({"mscale": 1.0, "mscale_all_dim": 0.5}, (0.1 * math.log(4) + 1) / (0.05 * math.log(4) + 1)),
    ({}, 0.1 * math.log(4) + 1)])                                              # eq. 22
def test_yarn_attention_factor(rope, want):
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024, **rope}
    assert rope_init(args(16, 1e4, rope, 4096), 1)[1] == pytest.approx(want, rel=RTOL)


def test_yarn_factor_defaults_to_the_ratio_of_the_contexts():
    rope = {"rope_type": "yarn", "original_max_position_embeddings": 1024}
    explicit = {**rope, "factor": 4.0}
    assert np.array_equal(rope_init(args(16, 1e4, rope, 4096), 1)[0], rope_init(args(16, 1e4, explicit, 4096), 1)[0])


@pytest.mark.parametrize("rope, window", [({"rope_type": "default"}, 2048),
                                          ({"rope_type": "linear", "factor": 4.0}, 2048),
                                          ({"rope_type": "dynamic", "factor": 4.0}, 8192)])
def test_only_dynamic_ntk_runs_past_the_trained_context(rope, window):
    assert context_window(args(16, 1e4, rope, 2048)) == window
