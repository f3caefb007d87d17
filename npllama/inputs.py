"""What a forward call is given, checked and turned into what the layers need: the guards.

``prepare_call`` is the one call the model's forward makes before the embedding lookup. It checks
the token ids and the attention mask, refuses positions beyond the context window, counts each
token's rotary position (padding-aware, cache-aware) and computes the rotation angles:

    ids            (batch, seq)  int64 token ids, every one inside the vocabulary
    mask           (batch, seq)  True where a column is a real token, False for padding
    positions      (batch, seq)  each real token's count of real tokens before it in its row
    kv_mask        (batch, kv_len) which keys the queries may attend to; None when no key is padding
    cos, sin       (batch, 1, seq, rotary_dim): the angles of each row's positions

Every problem is an InputError that names it and says what to do. Nothing here is maths of the
model; model.py reads as the equations because this module stands apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .cache import KVCache
from .config import ModelArgs
from .errors import InputError
from .memory import batch_bytes
from .rope import rope_cos_sin
from .rope_scaling import context_window, rope_init


@dataclass(frozen=True)
class Call:
    """One forward call's checked inputs and the rotation angles of its positions."""
    ids: np.ndarray                   # (batch, seq) int64
    mask: np.ndarray                  # (batch, seq) bool: True for a real token
    positions: np.ndarray             # (batch, seq) int64: rotary positions
    kv_mask: np.ndarray | None        # (batch, kv_len) bool, None when every key is real
    cos: np.ndarray                   # (batch, 1, seq, rotary_dim)
    sin: np.ndarray                   # (batch, 1, seq, rotary_dim)


def prepare_call(args: ModelArgs, ids, attention_mask=None, cache: KVCache | None = None,
                 dtype=np.float32) -> Call:
    """Check a call's ids and mask, and compute its positions, key mask and rotation angles."""
    ids = check_ids(ids, args.vocab_size)
    mask = check_mask(attention_mask, ids.shape, cache)
    positions, kv_mask = call_positions(args, mask, cache)
    cos, sin = rotary_angles(args, positions, mask, dtype)
    return Call(ids, mask, positions, kv_mask, cos, sin)


def check_ids(ids, vocab_size: int) -> np.ndarray:
    """Token ids as an int64 (batch, seq) array ((seq,) becomes one row), or an InputError."""
    try:
        arr = np.asarray(ids)
    except ValueError:
        raise InputError("ids must be a (batch, seq) array of token ids; rows of different lengths "
                         "are a ragged list: pad them and pass attention_mask") from None
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] == 0 or arr.shape[0] == 0 or arr.dtype == object:
        raise InputError(f"ids must be a non-empty (batch, seq) array of token ids, got shape {arr.shape}")
    return check_token_ids(arr, vocab_size)


def check_token_ids(ids: np.ndarray, vocab_size: int, where: str = "") -> np.ndarray:
    """ids (any shape) as int64, or an InputError (its message prefixed by where, e.g. "prompt 2: ")
    naming the first non-integer or out-of-vocabulary id."""
    if not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"{where}token ids must be integers, got {ids.dtype}")
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        raise InputError(f"{where}token id {int(ids[bad][0])} lies outside the vocabulary (0..{vocab_size - 1})")
    return ids.astype(np.int64, copy=False)


def check_mask(attention_mask, shape: tuple[int, int], cache: KVCache | None = None) -> np.ndarray:
    """The mask of a call's new columns as (batch, seq) bool, or an InputError that says what is wrong.

    None means every token is real. A mask as wide as the cache plus the new columns (what
    transformers' generate passes) is accepted when its first columns equal the cache's mask.
    Without a cache every row needs a real token; with one, a row may be all padding in one call
    (a left-padded prompt prefilled in chunks) and get its tokens later.
    """
    if attention_mask is None:
        return np.ones(shape, dtype=bool)
    try:
        mask = np.asarray(attention_mask)
    except ValueError:
        mask = np.empty(0, dtype=object)
    if mask.dtype == object:
        raise InputError("attention_mask must be a (batch, seq) array of 1 and 0; its rows have different "
                         "lengths (pad every row to the same length)")
    cached = 0 if cache is None else cache.length
    if mask.ndim != 2 or mask.shape[0] != shape[0] or mask.shape[1] not in (shape[1], cached + shape[1]):
        wide = f" (or {(shape[0], cached + shape[1])}, the cache's columns included)" if cached else ""
        raise InputError(f"attention_mask has shape {mask.shape}; the ids have shape {shape}{wide}")
    if mask.dtype != bool and not (np.issubdtype(mask.dtype, np.number) and np.isin(mask, (0, 1)).all()):
        raise InputError("attention_mask must hold 1 for a token and 0 for padding, and nothing else")
    mask = mask.astype(bool)
    if mask.shape[1] != shape[1]:
        if not np.array_equal(mask[:, :cached], cache.mask):
            raise InputError("attention_mask's first columns do not match the padding the cache holds; "
                             "pass the mask of the new columns only, or the whole mask unchanged")
        mask = mask[:, cached:]
    empty = ~mask.any(axis=1)
    if cache is None and empty.any():   # with a cache, a row's real tokens may come in a later call
        raise InputError(f"row {int(np.argmax(empty))} of attention_mask has no real token; every row "
                         f"needs at least one (drop rows that are all padding)")
    return mask


def call_positions(args: ModelArgs, mask: np.ndarray, cache: KVCache | None
                   ) -> tuple[np.ndarray, np.ndarray | None]:
    """The rotary position of each column of a call, and which keys it may attend to.

    mask: (batch, seq), False for padding -> positions (batch, seq): each real token's count of
    real tokens before it in its row (the cache's included); kv_mask (batch, kv_len): the real
    tokens among every key of the call, or None when there is no padding at all. Positions past
    the context window are refused (the cache refuses them when there is one).
    """
    if cache is None:
        window, longest = context_window(args), int(mask.sum(axis=1).max())
        if longest > window:
            raise InputError(f"{longest} tokens exceed the model's context window of {window}; "
                             f"shorten the input to at most {window} tokens")
        return np.cumsum(mask, axis=1) - mask, (None if mask.all() else mask)
    if cache.batch_size != mask.shape[0]:
        raise InputError(f"the cache holds {cache.batch_size} sequences but ids has {mask.shape[0]} rows")
    positions = cache.start(mask)
    return positions, (cache.kv_mask(mask.shape[1]) if cache.padded or not mask.all() else None)


def rotary_angles(args: ModelArgs, positions: np.ndarray, mask: np.ndarray, dtype
                  ) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin for every column of a call: (batch, 1, seq, rotary_dim), broadcast over heads.

    positions, mask: (batch, seq). The variant's length (dynamic NTK) is one past the largest
    position of a real token in the call, as transformers takes max(position_ids) + 1.
    """
    inv_freq, scaling = rope_init(args, int(positions[mask].max(initial=0)) + 1)
    cos, sin = rope_cos_sin(inv_freq, positions, scaling, dtype)                 # (batch, seq, rotary_dim)
    return cos[:, None], sin[:, None]


# ---------------------------------------------------------------------------- prompts
def check_budget(prompt_len: int, cached: int, window: int, max_new_tokens: int) -> int:
    """How many tokens may be generated; an InputError when the prompt itself does not fit.

    cached: positions the cache already holds for this row; window: the positions it may hold.
    """
    # not checks.is_int: a whole float (3.0) has always been taken here
    if isinstance(max_new_tokens, bool) or max_new_tokens < 0 or int(max_new_tokens) != max_new_tokens:
        raise InputError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if prompt_len == 0:
        raise InputError("the prompt is empty: give at least one token to continue from")
    used = cached + prompt_len
    if used > window:
        raise InputError(f"the prompt is {prompt_len} tokens{f' (after {cached} already cached)' if cached else ''}, "
                         f"longer than the context window of {window} tokens; shorten the prompt")
    return min(int(max_new_tokens), window - used + 1)   # the last token is never fed back


def check_text_fits(tokenizer, text: str, window: int, what: str = "the prompt") -> None:
    """An InputError, before the text is tokenized, when it cannot fit ``window`` tokens whatever the
    tokenizer makes of it (Tokenizer.fewest_tokens: its normalized bytes over the longest token's)."""
    if tokenizer.fewest_tokens(text, window) > window:
        raise InputError(f"{what} is {len(text):,} characters: more than the context window of {window} tokens can "
                         f"hold (no token of this vocabulary stands for more than {tokenizer.bytes_per_token} "
                         f"bytes of text); shorten it")


def plan_batches(lengths: Sequence[int], max_new_tokens: int, args: ModelArgs, budget_bytes: int,
                 dtype=np.float32) -> list[range]:
    """Consecutive prompts grouped into batches whose estimated peak memory (npllama.memory.batch_bytes:
    KV cache, logits, activations) stays within budget_bytes; a prompt too large for the budget
    alone runs alone. lengths: each prompt's tokens. Returns ranges of prompt indices, in order."""
    window = context_window(args)
    batches, start, longest = [], 0, 0
    for i, n in enumerate(lengths):
        grown = max(longest, min(n + max_new_tokens, window))       # the positions each row may come to hold
        if i > start and batch_bytes(args, i + 1 - start, grown, dtype) > budget_bytes:
            batches.append(range(start, i))
            start, grown = i, min(n + max_new_tokens, window)
        longest = grown
    if start < len(lengths):
        batches.append(range(start, len(lengths)))
    return batches
