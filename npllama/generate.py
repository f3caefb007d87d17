"""Autoregressive generation: prefill the prompts, then feed back one sampled token at a time.

    logits = model(prompts, cache)          # prefill: every prompt position at once (left padded)
    repeat:
        tokens = sample_batch(logits[:, -1], settings, u[step])     # one per row
        a row stops on its own end-of-sequence token or budget
        logits = model(tokens, cache)       # decode: one position per row, reusing the cache

Several prompts of different lengths run as one batch: they are left padded into one prefill
(the model's attention_mask hides the padding and counts each row's positions from its first
token), then every step decodes all rows at once; a row that has stopped is fed padding until the
last row stops. Each row draws its own random numbers, ``uniforms(seed, steps, 1)`` for that row,
exactly as it would alone, so a row's tokens never depend on its neighbours.
"""

from __future__ import annotations

import time
from typing import Iterable, Iterator, Sequence

import numpy as np

from .cache import KVCache
from .checks import is_int
from .errors import InputError
from .inputs import check_budget, check_text_fits
from .numerics import bad_logits, check_finite_logits, non_finite_error
from .rope_scaling import context_window
from .sampling import SamplingSettings, sample_batch, uniforms
from .tokenizer import StreamDecoder

PAD_ID = 0   # the id padding columns carry: any valid id does, since padding is never attended

# Why a row stopped, in the words of both generate (Generation.stopped) and the chat session
# (TurnStats.stopped): its stop token, its max_new_tokens, the end of the context window, or a
# reader that stopped iterating (chat only: a generator cannot see its own close).
STOP_TOKEN = "stop token"
MAX_NEW_TOKENS = "max_new_tokens"
CONTEXT_FULL = "context window full"
INTERRUPTED = "interrupted"


def left_pad(prompts: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Prompts of different lengths as one batch: ids (batch, L) and attention mask (batch, L),
    each row right-aligned (its padding first), L the longest prompt."""
    length = max(len(p) for p in prompts)
    ids = np.full((len(prompts), length), PAD_ID, dtype=np.int64)
    mask = np.zeros((len(prompts), length), dtype=bool)
    for r, p in enumerate(prompts):
        ids[r, length - len(p):] = p
        mask[r, length - len(p):] = True
    return ids, mask


def is_batch(prompts) -> bool:
    """Several prompts (a sequence of sequences of ids) rather than one (a sequence of ids)?"""
    if isinstance(prompts, np.ndarray):
        return prompts.ndim == 2
    return isinstance(prompts, Sequence) and not isinstance(prompts, (str, bytes)) and len(prompts) > 0 \
        and all(isinstance(p, (Sequence, np.ndarray)) and not isinstance(p, (str, bytes)) for p in prompts)


def row_seeds(seed, rows: int) -> list:
    """One seed per row: the same seed for every row (each draws as it would alone), or one each."""
    if seed is None or is_int(seed):
        return [seed] * rows
    seeds = list(seed) if isinstance(seed, Sequence) else None
    if seeds is None or len(seeds) != rows:
        raise InputError(f"seed must be an integer, None, or one per prompt ({rows}), got {seed!r}")
    return seeds


class Generation:
    """The new tokens of one ``generate`` call, as an iterator, and why each row stopped.

    Iterating yields, for one prompt, each new token id; for several prompts, one list per step
    with each row's new id, or None for a row that has already stopped. ``stopped[r]`` is then
    STOP_TOKEN, MAX_NEW_TOKENS or CONTEXT_FULL (the window had no room for more); ``budgets[r]``
    how many tokens row r could have had; ``window`` the positions a row may hold, and
    ``prompt_lengths[r]`` how many of them row r held before generating (its prompt and cache).

    Timing (time.perf_counter): ``started`` when the Generation was made; ``first_at`` when the
    first step came back (the prompts' forward pass and the first sample), ``last_at`` the latest.
    """

    def __init__(self, steps: Iterator[list[int | None]], budgets: list[int], stops: set[int],
                 max_new_tokens: int, batched: bool, window: int, prompt_lengths: list[int]):
        self._steps, self.budgets, self._stops = steps, budgets, stops
        self.max_new_tokens, self._batched = max_new_tokens, batched
        self.window, self.prompt_lengths = window, prompt_lengths
        self.tokens: list[list[int]] = [[] for _ in budgets]
        self.started = time.perf_counter()
        self.first_at: float | None = None
        self.last_at: float | None = None

    def __iter__(self) -> "Generation":
        return self

    def __next__(self):
        step = next(self._steps)
        self.last_at = time.perf_counter()
        if self.first_at is None:
            self.first_at = self.last_at
        for row, token in zip(self.tokens, step):
            if token is not None:
                row.append(token)
        return step if self._batched else step[0]

    def close(self) -> None:
        self._steps.close()

    @property
    def stopped(self) -> list[str | None]:
        """Why each row stopped (None while it may still go on)."""
        reasons = []
        for tokens, budget in zip(self.tokens, self.budgets):
            if tokens and tokens[-1] in self._stops:
                reasons.append(STOP_TOKEN)
            elif len(tokens) < budget:
                reasons.append(None)
            else:
                reasons.append(CONTEXT_FULL if budget < self.max_new_tokens else MAX_NEW_TOKENS)
        return reasons


def generate(model, prompt_ids, max_new_tokens: int = 128, settings: SamplingSettings = SamplingSettings(),
             seed: int | Sequence[int | None] | None = None, stop_ids: Iterable[int] | None = None,
             cache: KVCache | None = None) -> Generation:
    """Generate up to max_new_tokens for each prompt, each row stopping at its own stop token
    (yielded too) or at the end of the context window.

    prompt_ids: one prompt, (seq,) token ids, or several, a list of them (any lengths). With a
    cache, the prompts continue the sequences it holds (one row each). seed: one integer for
    every row (each draws ``uniforms(seed, steps, 1)``, as alone), or one per prompt.
    Returns a Generation: iterate it for the tokens (see its docstring).
    """
    batched = is_batch(prompt_ids)
    prompts = [model.check_ids(np.asarray(p, dtype=np.int64))[0] for p in (prompt_ids if batched else [prompt_ids])]
    rows = len(prompts)
    cache = cache if cache is not None else model.new_cache(rows)
    if cache.batch_size != rows:
        raise InputError(f"{rows} prompt{'s' * (rows != 1)} for a cache of {cache.batch_size} rows")
    budgets = [check_budget(len(p), int(cache.positions[r]), cache.max_seq_len, max_new_tokens)
               for r, p in enumerate(prompts)]
    stops = set(model.config.eos_token_ids if stop_ids is None else stop_ids)
    draws = [uniforms(s, budget, 1)[:, 0] for s, budget in zip(row_seeds(seed, rows), budgets)]   # (budget,) each
    steps = _decode(model, prompts, cache, settings, draws, budgets, stops)
    prompt_lengths = [int(cache.positions[r]) + len(p) for r, p in enumerate(prompts)]
    return Generation(steps, budgets, stops, int(max_new_tokens), batched, cache.max_seq_len, prompt_lengths)


class DecodeRows:
    """The decode loop's bookkeeping, one entry per row (both backends' loops keep it so).

    active: (batch,) bool, the rows still generating; produced[r]: how many tokens row r has made;
    read[r]: the ids row r has fed the model (its prompt, then each token fed back), which an
    overflow error runs again.
    """

    def __init__(self, prompts: Sequence[Sequence[int]], budgets: Sequence[int], stops: set[int]):
        self.budgets, self.stops = budgets, stops
        self.active = np.array([budget > 0 for budget in budgets])            # (batch,)
        self.produced = [0] * len(prompts)
        self.read = [list(p) for p in prompts]

    def record(self, rows: Sequence[int], tokens: Sequence[int]) -> list[int | None]:
        """The step's tokens, ``tokens[i]`` made by row ``rows[i]``, as the step yields them (None
        for a row that made none). A row stops on a stop token or at its budget (the budget counts
        the last token, which is never fed back)."""
        step: list[int | None] = [None] * len(self.produced)
        for r, token in zip(rows, tokens):
            self.produced[r] += 1
            step[r] = int(token)
            self.active[r] = token not in self.stops and self.produced[r] < self.budgets[r]
        return step

    def feed_back(self, step: Sequence[int | None]) -> None:
        """The step's tokens of the rows still active were fed to the model (a row's last token never is)."""
        for r in np.flatnonzero(self.active):
            self.read[r].append(step[r])


def _decode(model, prompts, cache, settings, draws, budgets, stops) -> Iterator[list[int | None]]:
    """The loop itself: one padded prefill, then one decode step for every row still active."""
    rows = DecodeRows(prompts, budgets, stops)
    if not rows.active.any():
        return
    ids, mask = left_pad(prompts)                                            # (batch, L)
    logits = model(ids, cache=cache, attention_mask=None if mask.all() else mask)  # (batch, L, vocab)
    for r, p in enumerate(prompts):                                          # every prompt position
        where = "the prompt" if len(prompts) == 1 else f"prompt {r + 1}"
        check_finite_logits(logits[r, -len(p):], model, p[None], where)
    logits = logits[:, -1]                                                   # (batch, vocab)
    while True:
        active = np.flatnonzero(rows.active)                                 # (n_active,) row numbers
        u = np.array([draws[r][rows.produced[r]] for r in active])           # (n_active,)
        step = rows.record(active, sample_batch(logits[active], settings, u))
        yield step
        if not rows.active.any():
            return
        feed = np.array([[t if t is not None and a else PAD_ID] for t, a in zip(step, rows.active)])   # (batch, 1)
        logits = model(feed, cache=cache, attention_mask=None if rows.active.all() else rows.active[:, None])[:, -1]
        rows.feed_back(step)
        active = np.flatnonzero(rows.active)
        if bad_logits(logits[active]):                                       # one check for the batch
            r = next(r for r in active if bad_logits(logits[r]))
            raise non_finite_error(model, [rows.read[r]], f"generated token {rows.produced[r]}")


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


class TextStream:
    """The text of one ``generate_text`` call, as an iterator of pieces, and why it stopped.

    One prompt: yields text pieces. Several: yields one list per step, a piece (often "") per row.
    ``generation`` is the underlying Generation (stop reasons, budgets, token ids).
    """

    def __init__(self, generation: Generation, tokenizer, stops: set[int], batched: bool):
        self.generation = generation
        self._batched = batched
        if batched:
            self._decoders = [StreamDecoder(tokenizer) for _ in generation.budgets]
            self._stops, self._done = stops, False
            self._pieces = self._batch_pieces()
        else:
            single = (step for step in generation)
            self._pieces = stream_text(tokenizer, single, skip_ids=stops)

    def _batch_pieces(self) -> Iterator[list[str]]:
        for step in self.generation:
            yield [self._decoders[r].push(t) if t is not None and t not in self._stops else ""
                   for r, t in enumerate(step)]
        tails = [d.flush() for d in self._decoders]
        if any(tails):
            yield tails

    def __iter__(self) -> "TextStream":
        return self

    def __next__(self):
        return next(self._pieces)

    def close(self) -> None:
        self._pieces.close()
        self.generation.close()

    @property
    def stopped(self) -> str | list[str | None] | None:
        reasons = self.generation.stopped
        return reasons if self._batched else reasons[0]


def generate_text(model, prompt: str | Sequence[str], max_new_tokens: int = 128,
                  settings: SamplingSettings = SamplingSettings(), seed=None,
                  stop_ids: Iterable[int] | None = None, *, generate_fn=generate) -> TextStream:
    """Encode the prompt (or each of several prompts), generate, and stream the text (stop tokens
    not shown); see TextStream.

    generate_fn: the token generator (this module's ``generate``, or the Torch backend's twin).
    """
    batched = not isinstance(prompt, str)
    texts = list(prompt) if batched else [prompt]
    if not texts or not all(isinstance(t, str) and t for t in texts):
        raise InputError("the prompt is empty: give some text to continue")
    tok = model.tokenizer
    if tok is None:
        raise InputError(f"{getattr(model, 'source', None) or 'this model'}: has no tokenizer, so text cannot be "
                         f"turned into tokens; give token ids to generate(), or load a checkpoint with its tokenizer")
    stops = set(tok.eos_ids if stop_ids is None else stop_ids) | set(model.config.eos_token_ids if stop_ids is None else ())
    window = context_window(model.config)
    for r, t in enumerate(texts):
        check_text_fits(tok, t, window, "the prompt" if len(texts) == 1 else f"prompt {r + 1}")
    ids = [tok.encode(t) for t in texts]
    generation = generate_fn(model, ids if batched else ids[0], max_new_tokens, settings, seed, stops)
    return TextStream(generation, tok, stops, batched)
