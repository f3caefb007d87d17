"""The key/value cache: what decoding remembers of the positions it has already seen.

A cache holds ``length`` slots for each of ``batch`` sequences. Every forward call appends its
columns: slot t of every row is column t of the (padded) batch. A slot holds either a real token
or padding, and the cache keeps both facts a padded batch needs:

    mask[b, t]        True where slot t of row b holds a real token (padding is never attended)
    positions[b]      how many real tokens row b holds: the rotary position its next token gets

so a row's real tokens get positions 0, 1, 2, ... wherever padding sits between them, exactly as
if the row ran alone (the convention transformers' generate uses: positions from the mask's
running count). The caller passes the mask of each call's new columns (or none: all real).
"""

from __future__ import annotations

import numpy as np

from .checks import is_int
from .config import ModelArgs
from .errors import InputError
from .rope_scaling import context_window


INITIAL_CAPACITY = 256      # the slots a cache starts with (at most its max_seq_len)


def grown_capacity(capacity: int, needed: int) -> int:
    """The slots a full cache grows to for ``needed`` positions: twice its size, or more if needed,
    so that decoding one position at a time reallocates only log2(length) times."""
    return max(needed, 2 * capacity)


class KVCache:
    """Keys and values of every layer for the first ``length`` slots of ``batch_size`` sequences.

    k[layer], v[layer]: (batch, n_kv_heads, capacity, head_dim). Keys are stored *after* rotary
    embedding, so each keeps the rotation it was written with. Capacity grows by doubling, so
    decoding does not allocate per token.

    max_seq_len bounds the real tokens of each row (its positions): by default the model's context
    window, as far as its rotary scaling extends it (rope_scaling.context_window: factor x the
    trained length for dynamic NTK); a caller may ask for a longer one.
    """

    def __init__(self, args: ModelArgs, batch_size: int, max_seq_len: int | None = None,
                 dtype=np.float32, initial_capacity: int = INITIAL_CAPACITY):
        if not is_int(batch_size) or batch_size <= 0:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        if max_seq_len is None:
            max_seq_len = context_window(args)
        if not is_int(max_seq_len) or max_seq_len <= 0:
            raise InputError(f"max_seq_len must be a positive integer, got {max_seq_len!r}")
        self.max_seq_len = int(max_seq_len)
        self.batch_size = int(batch_size)
        self.length = 0
        self._shape = (self.batch_size, args.n_kv_heads, 0, args.head_dim)
        self._dtype = dtype
        cap = min(initial_capacity, self.max_seq_len)
        self.k = [self._alloc(cap) for _ in range(args.n_layers)]
        self.v = [self._alloc(cap) for _ in range(args.n_layers)]
        self._mask = np.zeros((self.batch_size, cap), dtype=bool)       # (batch, capacity)
        self.positions = np.zeros(self.batch_size, dtype=np.int64)      # (batch,)
        self.padded = False            # has any slot held padding? (if not, the mask is all True)
        self._pending: tuple[np.ndarray, bool] | None = None           # what advance() commits

    def _alloc(self, capacity: int) -> np.ndarray:
        b, h, _, d = self._shape
        return np.zeros((b, h, capacity, d), dtype=self._dtype)

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    @property
    def mask(self) -> np.ndarray:
        """(batch, length): True where a slot holds a real token."""
        return self._mask[:, : self.length]

    def start(self, new_mask: np.ndarray) -> np.ndarray:
        """Make room for the columns of one forward call and note which are real tokens.

        new_mask: (batch, seq) bool -> the rotary positions of those columns, (batch, seq) int64:
        each real token's count of real tokens before it in its row; padding gets the position
        the row's next real token will take (it is never attended, so any position would do).
        Raises InputError, changing nothing, when a row would exceed max_seq_len real tokens.
        Nothing counts as cached until ``advance``: a call that fails halfway leaves the cache as it was.
        """
        counts = np.cumsum(new_mask, axis=1)                              # (batch, seq)
        total = self.positions + counts[:, -1]
        if (total > self.max_seq_len).any():
            row = int(np.argmax(total > self.max_seq_len))
            raise InputError(f"{int(total[row])} positions exceed the context window of {self.max_seq_len} "
                             f"(row {row}: {int(self.positions[row])} already cached + "
                             f"{int(counts[row, -1])} new)" if self.batch_size > 1 else
                             f"{int(total[row])} positions exceed the context window of {self.max_seq_len} "
                             f"({int(self.positions[row])} already cached + {int(counts[row, -1])} new)")
        seq = new_mask.shape[1]
        if self.length + seq > self.capacity:
            self._grow(grown_capacity(self.capacity, self.length + seq))
        self._mask[:, self.length: self.length + seq] = new_mask
        self._pending = (total, not new_mask.all())
        return self.positions[:, None] + counts - new_mask                # (batch, seq)

    def kv_mask(self, seq: int) -> np.ndarray:
        """(batch, length + seq): which slots the queries of the current call may attend to."""
        return self._mask[:, : self.length + seq]

    def _grow(self, capacity: int) -> None:
        for store in (self.k, self.v):
            for i, old in enumerate(store):
                new = self._alloc(capacity)
                new[:, :, : self.length] = old[:, :, : self.length]
                store[i] = new
        mask = np.zeros((self.batch_size, capacity), dtype=bool)
        mask[:, : self.length] = self._mask[:, : self.length]
        self._mask = mask

    def update(self, layer: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Write this call's keys/values after the cached ones; return all of them.

        k, v: (batch, n_kv_heads, seq, head_dim) -> views (batch, n_kv_heads, length + seq, head_dim).
        ``length`` itself advances in ``advance`` once every layer has written.
        """
        start, end = self.length, self.length + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        """The current call's n columns are written in every layer: count them as cached."""
        if self._pending is not None:
            self.positions, padded = self._pending
            self.padded = self.padded or padded
            self._pending = None
        self.length += n

    def truncate(self, length: int) -> None:
        """Forget every slot from ``length`` on (used by chat to drop or rewind turns)."""
        if not 0 <= length <= self.length:
            raise InputError(f"cannot truncate a cache of {self.length} positions to {length}")
        self.positions -= self._mask[:, length: self.length].sum(axis=1)
        self.length = length
