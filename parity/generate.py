"""Autoregressive generation in Torch, the twin of npllama.generate.

Where the random draw happens (the same for both backends): every uniform number of a generation
is drawn up front on the host by ``npllama.sampling.uniforms(seed, steps, batch)`` (NumPy PCG64),
one per step. Here they are copied to the device once, and step t samples on the device with
``parity.sampling.sample_batch(logits, settings, u[t])``, the same inverse-CDF draw as npllama's.
So for the same seed the two backends pick the same tokens whenever their logits agree (to the
rounding that cannot move a draw across a CDF boundary), and the decode loop needs no host
random numbers. The token stays on the device and is fed back as is; the syncs per step are
``int(token)`` to yield it and test it against the stop tokens, and the check that the logits were
finite (parity.numerics), which finds the device idle after the first.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import torch

from npllama.errors import InputError
from npllama.generate import check_budget
from npllama.generate import generate_text as generate_text_with

from .cache import KVCache
from .numerics import check_finite_logits
from .sampling import SamplingSettings, sample_batch, uniforms


@torch.no_grad()
def generate(model, prompt_ids: Sequence[int], max_new_tokens: int = 128,
             settings: SamplingSettings = SamplingSettings(), seed: int | None = None,
             stop_ids: Iterable[int] | None = None, cache: KVCache | None = None) -> Iterator[int]:
    """Yield new token ids as they are chosen, up to max_new_tokens or a stop token (yielded too).

    prompt_ids: (seq,) token ids; with a cache, they continue the sequence it already holds.
    Without one, a static cache just large enough for the prompt and the budget is allocated.
    """
    prompt = model.check_ids(prompt_ids)                                   # (1, seq) on the device
    if prompt.shape[0] != 1:
        raise InputError(f"generate continues one sequence; got {prompt.shape[0]} rows")
    seq = prompt.shape[1]
    if cache is None:
        budget = check_budget(seq, 0, model.config.max_seq_len, max_new_tokens)
        cache = model.new_cache(1, max_seq_len=max(1, min(model.config.max_seq_len, seq + budget)))
    else:
        budget = check_budget(seq, cache.length, cache.max_seq_len, max_new_tokens)
    stops = set(model.config.eos_token_ids if stop_ids is None else stop_ids)
    u = torch.from_numpy(uniforms(seed, budget, 1)).to(model.device)      # (budget, 1) float64
    if budget == 0:
        return
    logits = model(prompt, cache=cache)                                    # (1, seq, vocab)
    check_finite_logits(logits, model, prompt)                             # every prompt position
    logits = logits[:, -1]                                                 # (1, vocab)
    for step in range(budget):
        token = sample_batch(logits, settings, u[step])                    # (1,) on the device
        t = int(token)
        yield t
        if t in stops or step == budget - 1:
            return
        logits = model(token[:, None], cache=cache)[:, -1]
        check_finite_logits(logits, model, token[:, None], f"generated token {step + 1}")


def generate_text(model, prompt: str, max_new_tokens: int = 128,
                  settings: SamplingSettings = SamplingSettings(), seed: int | None = None,
                  stop_ids: Iterable[int] | None = None) -> Iterator[str]:
    """Encode prompt, generate, and stream the continuation as text (stop tokens not shown):
    npllama.generate.generate_text with this module's ``generate``."""
    return generate_text_with(model, prompt, max_new_tokens, settings, seed, stop_ids, generate_fn=generate)
