"""Autoregressive generation in Torch, the twin of npllama.generate.

The same loop: one left-padded prefill of every prompt, then one decode step for every row still
active, each row stopping on its own stop token or budget (npllama.generate.DecodeRows keeps the
books of both loops), and each row drawing ``npllama.sampling.uniforms(seed, steps, 1)`` as it
would alone (NumPy PCG64 on the host). Here
the numbers are copied to the device once, and each step samples on the device with
``parity.sampling.sample_batch``, the same inverse-CDF draw as npllama's; so for the same seed the
two backends pick the same tokens whenever their logits agree (to the rounding that cannot move a
draw across a CDF boundary). The tokens stay on the device and are fed back as they are; the one
syncs per step read them to yield them and test them against the stop tokens, and check that
the logits were finite (parity.numerics), which finds the device idle after the first.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from npllama.errors import InputError
from npllama.generate import DecodeRows, Generation, is_batch, left_pad, row_seeds
from npllama.inputs import check_budget
from npllama.generate import generate_text as generate_text_with
from npllama.rope_scaling import context_window

from .cache import KVCache
from .numerics import bad_logits, check_finite_logits, non_finite_error
from .sampling import SamplingSettings, sample_batch, uniforms


def generate(model, prompt_ids, max_new_tokens: int = 128, settings: SamplingSettings = SamplingSettings(),
             seed: int | Sequence[int | None] | None = None, stop_ids: Iterable[int] | None = None,
             cache: KVCache | None = None) -> Generation:
    """Generate up to max_new_tokens for each prompt (npllama.generate.generate's contract).

    Without a cache, a static one just large enough for the prompts and their budgets is allocated.
    """
    batched = is_batch(prompt_ids)
    prompts = [np.asarray(model.check_ids(p)[0].cpu()) for p in (prompt_ids if batched else [prompt_ids])]
    rows = len(prompts)
    window = cache.max_seq_len if cache is not None else context_window(model.config)
    cached = [0] * rows if cache is None else [int(n) for n in cache.positions]
    budgets = [check_budget(len(p), cached[r], window, max_new_tokens) for r, p in enumerate(prompts)]
    if cache is None:
        longest = max(len(p) for p in prompts)
        cache = KVCache(model.config, rows, window, dtype=model.dtype, device=model.device,
                        slots=max(1, longest + max(budgets) - 1))
    if cache.batch_size != rows:
        raise InputError(f"{rows} prompt{'s' * (rows != 1)} for a cache of {cache.batch_size} rows")
    stops = set(model.config.eos_token_ids if stop_ids is None else stop_ids)
    draws = [torch.from_numpy(uniforms(s, b, 1)[:, 0]).to(model.device)                # (budget,) each
             for s, b in zip(row_seeds(seed, rows), budgets)]
    steps = _decode(model, prompts, cache, settings, draws, budgets, stops)
    prompt_lengths = [cached[r] + len(p) for r, p in enumerate(prompts)]
    return Generation(steps, budgets, stops, int(max_new_tokens), batched, cache.max_seq_len, prompt_lengths)


@torch.no_grad()
def _decode(model, prompts, cache, settings, draws, budgets, stops) -> Iterator[list[int | None]]:
    """The loop of npllama.generate._decode, sampling on the device."""
    rows = DecodeRows(prompts, budgets, stops)
    if not rows.active.any():
        return
    ids, mask = left_pad(prompts)                                                 # (batch, L)
    logits = model(ids, cache=cache, attention_mask=None if mask.all() else mask)  # (batch, L, vocab)
    for r, p in enumerate(prompts):                                               # every prompt position
        where = "the prompt" if len(prompts) == 1 else f"prompt {r + 1}"
        check_finite_logits(logits[r, -len(p):], model, p[None], where)
    logits = logits[:, -1]                                                        # (batch, vocab)
    while True:
        active = np.flatnonzero(rows.active)                                      # (n_active,) row numbers
        u = torch.stack([draws[r][rows.produced[r]] for r in active])             # (n_active,)
        chosen = sample_batch(logits[_on_device(active, logits)], settings, u)    # (n_active,) on the device
        step = rows.record(active, chosen.tolist())                               # the host sync
        yield step
        if not rows.active.any():
            return
        feed = torch.zeros((len(prompts), 1), dtype=torch.int64, device=logits.device)   # padding: id 0, never attended
        feed[_on_device(active, logits), 0] = chosen
        logits = model(feed, cache=cache, attention_mask=None if rows.active.all() else rows.active[:, None])[:, -1]
        rows.feed_back(step)
        active = np.flatnonzero(rows.active)
        if bad_logits(logits[_on_device(active, logits)]):                        # one check for the batch
            r = next(r for r in active if bad_logits(logits[r]))
            raise non_finite_error(model, [rows.read[r]], f"generated token {rows.produced[r]}")


def _on_device(rows: np.ndarray, x: torch.Tensor) -> torch.Tensor:
    """Row numbers (a NumPy array) as an index tensor on x's device."""
    return torch.from_numpy(rows).to(x.device)


def generate_text(model, prompt, max_new_tokens: int = 128,
                  settings: SamplingSettings = SamplingSettings(), seed=None,
                  stop_ids: Iterable[int] | None = None):
    """Encode the prompt(s), generate, and stream the text (stop tokens not shown):
    npllama.generate.generate_text with this module's ``generate``."""
    return generate_text_with(model, prompt, max_new_tokens, settings, seed, stop_ids, generate_fn=generate)
