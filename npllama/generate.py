"""Autoregressive generation: prefill the prompt, then feed back one sampled token at a time.

    logits = model(prompt, cache)          # prefill: every prompt position at once
    repeat:
        token = sample(logits[-1], settings, u[step])
        stop on an end-of-sequence token
        logits = model([token], cache)     # decode: one position, reusing the cached keys/values
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import numpy as np

from .cache import KVCache
from .errors import InputError
from .numerics import check_finite_logits
from .sampling import SamplingSettings, sample, uniforms
from .tokenizer import StreamDecoder


def check_budget(prompt_len: int, cached: int, window: int, max_new_tokens: int) -> int:
    """How many tokens may be generated; an InputError when the prompt itself does not fit."""
    if max_new_tokens < 0 or int(max_new_tokens) != max_new_tokens:
        raise InputError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if prompt_len == 0:
        raise InputError("the prompt is empty: give at least one token to continue from")
    used = cached + prompt_len
    if used > window:
        raise InputError(f"the prompt is {prompt_len} tokens{f' (after {cached} already cached)' if cached else ''}, "
                         f"longer than the context window of {window} tokens; shorten the prompt")
    return min(int(max_new_tokens), window - used + 1)   # the last token is never fed back


def generate(model, prompt_ids: Sequence[int], max_new_tokens: int = 128,
             settings: SamplingSettings = SamplingSettings(), seed: int | None = None,
             stop_ids: Iterable[int] | None = None, cache: KVCache | None = None) -> Iterator[int]:
    """Yield new token ids as they are chosen, up to max_new_tokens or a stop token (yielded too).

    prompt_ids: (seq,) token ids; with a cache, they continue the sequence it already holds.
    The random numbers come from ``uniforms(seed, ...)``, one per step.
    """
    prompt = model.check_ids(np.asarray(prompt_ids, dtype=np.int64))      # (1, seq)
    cache = cache if cache is not None else model.new_cache(1)
    budget = check_budget(prompt.shape[1], cache.length, cache.max_seq_len, max_new_tokens)
    stops = set(model.config.eos_token_ids if stop_ids is None else stop_ids)
    u = uniforms(seed, budget, 1)[:, 0]                                    # (budget,)
    if budget == 0:
        return
    logits = model(prompt, cache=cache)                                    # (1, seq, vocab)
    check_finite_logits(logits, model, prompt)                             # every prompt position
    logits = logits[0, -1]                                                 # (vocab,)
    for step in range(budget):
        token = sample(logits, settings, float(u[step]))
        yield token
        if token in stops or step == budget - 1:
            return
        logits = model(np.array([[token]]), cache=cache)[0, -1]
        check_finite_logits(logits, model, [[token]], f"generated token {step + 1}")


def stream_text(tokenizer, tokens: Iterable[int], skip_ids: Iterable[int] = ()) -> Iterator[str]:
    """Turn a stream of token ids into a stream of text pieces (tokenizer.StreamDecoder).

    A token that ends inside a UTF-8 character is held back until the next one completes it;
    ids in skip_ids (stop tokens) are not shown.
    """
    skip = set(skip_ids)
    decoder = StreamDecoder(tokenizer)
    for t in tokens:
        if t not in skip and (piece := decoder.push(t)):
            yield piece
    if tail := decoder.flush():
        yield tail


def generate_text(model, prompt: str, max_new_tokens: int = 128,
                  settings: SamplingSettings = SamplingSettings(), seed: int | None = None,
                  stop_ids: Iterable[int] | None = None, *, generate_fn=generate) -> Iterator[str]:
    """Encode prompt, generate, and stream the continuation as text (stop tokens not shown).

    generate_fn: the token generator (this module's ``generate``, or the Torch backend's twin).
    """
    if not prompt:
        raise InputError("the prompt is empty: give some text to continue")
    tok = model.tokenizer
    if tok is None:
        raise InputError(f"{getattr(model, 'source', None) or 'this model'}: has no tokenizer, so text cannot be "
                         f"turned into tokens; give token ids to generate(), or load a checkpoint with its tokenizer")
    stops = set(tok.eos_ids if stop_ids is None else stop_ids) | set(model.config.eos_token_ids if stop_ids is None else ())
    ids = tok.encode(prompt)
    return stream_text(tok, generate_fn(model, ids, max_new_tokens, settings, seed, stops), skip_ids=stops)
