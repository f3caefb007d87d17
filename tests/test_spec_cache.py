"""The KV cache against what it promises (npllama/cache.py), NumPy only.

Calls append columns; each column of a row is a real token or padding. The cache promises:

    mask[b, t]      whether slot t of row b holds a real token (the concatenated call masks)
    positions[b]    how many real tokens row b holds
    start(mask)     the rotary position of each new column: the real tokens before it in its row,
                    counting the cache (padding gets the position of the row's next real token)
    update / k, v   every layer's keys and values of the first ``length`` slots, in call order
    truncate(n)     the cache as it was after its first n slots

checked here against a plain list of each row's slots, kept by the test itself, over drawn
sequences of calls (padding anywhere, growth past the first capacity, truncation, overflow).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from npllama.cache import KVCache
from npllama.config import ModelArgs
from npllama.errors import InputError
from spec_formulas import seeds

ARGS = ModelArgs(dim=8, n_layers=2, n_heads=2, n_kv_heads=1, vocab_size=16, hidden_dim=8, max_seq_len=64)


def write(cache: KVCache, new_mask: np.ndarray, rng) -> tuple[np.ndarray, list[np.ndarray]]:
    """One forward call's cache traffic: start, every layer's update, advance. -> positions, keys."""
    positions = cache.start(new_mask)
    keys = []
    for layer in range(ARGS.n_layers):
        shape = (cache.batch_size, ARGS.n_kv_heads, new_mask.shape[1], ARGS.head_dim)
        k = rng.standard_normal(shape).astype(np.float32)                   # the cache's dtype
        all_k, all_v = cache.update(layer, k, -k)
        keys.append(k)
        assert all_k.shape[2] == all_v.shape[2] == cache.length + new_mask.shape[1]
    cache.advance(new_mask.shape[1])
    return positions, keys


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 3), calls=st.lists(st.integers(1, 5), min_size=1, max_size=6),
       padding=st.floats(0, 0.6), cut=st.floats(0, 1), seed=seeds)
def test_mask_positions_keys_and_truncation_are_the_slots_written(batch, calls, padding, cut, seed):
    rng = np.random.default_rng(seed)
    cache = KVCache(ARGS, batch, initial_capacity=2)                  # grows on the way
    slots = [[] for _ in range(batch)]                               # per row: (real?, key per layer)
    for seq in calls:
        new_mask = rng.random((batch, seq)) >= padding
        positions, keys = write(cache, new_mask, rng)
        for r in range(batch):
            real_before = sum(real for real, _ in slots[r])
            for t in range(seq):
                real_so_far = real_before + int(new_mask[r, :t].sum())
                assert positions[r, t] == real_so_far               # padding: the next real token's position
                slots[r].append((bool(new_mask[r, t]), [keys[layer][r, :, t] for layer in range(ARGS.n_layers)]))

    def check():
        assert cache.mask.tolist() == [[real for real, _ in row] for row in slots]
        assert cache.positions.tolist() == [sum(real for real, _ in row) for row in slots]
        for layer in range(ARGS.n_layers):
            for r, row in enumerate(slots):
                for t, (_, k) in enumerate(row):
                    assert np.array_equal(cache.k[layer][r, :, t], k[layer])
                    assert np.array_equal(cache.v[layer][r, :, t], -k[layer])
    check()
    keep = int(cut * cache.length)
    cache.truncate(keep)
    slots = [row[:keep] for row in slots]
    assert cache.length == keep
    check()


def test_a_call_past_the_window_is_refused_and_changes_nothing():
    cache = KVCache(ARGS, 2, max_seq_len=4)
    rng = np.random.default_rng(0)
    write(cache, np.array([[True, True, True], [False, True, True]]), rng)
    before = (cache.length, cache.positions.tolist(), cache.mask.tolist())
    with pytest.raises(InputError, match="exceed the context window of 4"):
        cache.start(np.array([[True, True], [True, True]]))       # row 0 would hold 5 real tokens
    assert (cache.length, cache.positions.tolist(), cache.mask.tolist()) == before
    write(cache, np.array([[True], [True]]), rng)                  # 4 real tokens: allowed
    assert cache.positions.tolist() == [4, 3]


@pytest.mark.parametrize("bad", [dict(batch_size=0), dict(batch_size=True), dict(batch_size=1, max_seq_len=0),
                                 dict(batch_size=1, max_seq_len=2.0)])
def test_impossible_sizes_are_refused(bad):
    with pytest.raises(InputError):
        KVCache(ARGS, **bad)


def test_truncate_outside_the_cache_is_refused():
    cache = KVCache(ARGS, 1)
    write(cache, np.ones((1, 3), bool), np.random.default_rng(0))
    for n in (-1, 4):
        with pytest.raises(InputError):
            cache.truncate(n)
