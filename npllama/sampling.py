"""Choosing the next token: a pure function of (logits, settings, u).

Order (as transformers' generate applies its warpers): temperature, then top-k, then top-p, each
on what the one before left; temperature 0 means greedy (argmax). Meta's reference has temperature
and top-p only (``sample_top_p`` in llama's generation.py). The random number ``u`` in [0, 1) is an
argument, as in llama2.c's sampler (its ``coin``): the draw happens outside, so two backends that
compute the same probabilities pick the same token. ``uniforms(seed, steps, batch)`` makes those
numbers.

Top-p follows Meta's convention: sort descending and keep the smallest prefix whose mass reaches p,
including the token that crosses p (drop token i when cumsum_before_i > p). After top-k the mass
is that of the k tokens left, renormalised (as transformers and llama.cpp measure it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .checks import is_int, is_number
from .errors import InputError


@dataclass(frozen=True)
class SamplingSettings:
    temperature: float = 0.0   # 0: greedy
    top_k: int = 0             # 0: off
    top_p: float = 1.0         # 1: off

    def __post_init__(self) -> None:
        t, k, p = self.temperature, self.top_k, self.top_p
        if not (is_number(t) and math.isfinite(t) and t >= 0):
            raise InputError(f"temperature must be a number >= 0 (0 means greedy), got {t!r}")
        if not is_int(k) or k < 0:
            raise InputError(f"top_k must be an integer >= 0 (0 turns it off), got {k!r}")
        if not (is_number(p) and 0 < p <= 1):
            raise InputError(f"top_p must lie in (0, 1] (1 turns it off), got {p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def uniforms(seed: int | None, steps: int, batch: int = 1) -> np.ndarray:
    """The random numbers for a whole generation, drawn up front: (steps, batch) in [0, 1).

    NumPy's PCG64 seeded with ``seed`` is the one source of randomness for both backends.
    seed: None (fresh randomness) or an integer >= 0.
    """
    if seed is not None and (not is_int(seed) or seed < 0):
        raise InputError(f"seed must be an integer >= 0 (or none for fresh randomness), got {seed!r:.40}")
    return np.random.default_rng(seed).random((steps, batch))


def softmax_probs(logits: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / temperature) in float64. logits: (vocab,) -> (vocab,)"""
    z = logits.astype(np.float64) / temperature
    e = np.exp(z - z.max())
    return e / e.sum()


def top_k_top_p(probs_sorted: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """Zero the tail of probabilities sorted in descending order: past the top_k first, then past
    the smallest prefix of what is left whose mass reaches top_p of it. (vocab,) -> (vocab,)"""
    kept = probs_sorted.copy()
    if top_k:
        kept[top_k:] = 0.0
    if top_p < 1.0:
        mass = kept.sum() if top_k else 1.0       # top-p reads the distribution top-k left
        mass_before = np.cumsum(kept) - kept      # mass of the tokens ranked above each one
        kept[mass_before > top_p * mass] = 0.0
    return kept


def sample(logits: np.ndarray, settings: SamplingSettings, u: float) -> int:
    """The next token for one sequence. logits: (vocab,); u in [0, 1) -> token id.

    Inverse-CDF draw over the kept tokens in descending-probability order (ties keep the lower id
    first), so the result is a deterministic function of its arguments.
    """
    if settings.greedy:
        return int(np.argmax(logits))
    probs = softmax_probs(logits, settings.temperature)
    order = np.argsort(-probs, kind="stable")               # token ids, most probable first
    kept = top_k_top_p(probs[order], settings.top_k, settings.top_p)
    cdf = np.cumsum(kept)
    i = int(np.searchsorted(cdf, u * cdf[-1], side="right"))
    return int(order[min(i, len(order) - 1)])


def sample_batch(logits: np.ndarray, settings: SamplingSettings, u: np.ndarray) -> np.ndarray:
    """logits: (batch, vocab); u: (batch,) -> (batch,) token ids."""
    return np.array([sample(row, settings, float(ui)) for row, ui in zip(logits, u)], dtype=np.int64)
