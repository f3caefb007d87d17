"""A weight matrix that stays quantized: GGUF blocks in memory, dequantized a piece at a time when used.

    w = QuantizedMatrix.from_blocks("Q4_1", blocks, n_in)   # an nn.Linear weight (out, in), as GGUF stores it
    y = x @ w.T                                              # x: (..., in) -> (..., out); w.T is (in, out)
    e = w[ids]                                               # rows: an embedding lookup, (*ids.shape, in)

The model (npllama.model) uses every matrix as ``x @ w`` with w (in, out) and looks tokens up as
``tok_embeddings[ids]``; a QuantizedMatrix answers both, so the maths reads the same whether the
weights are float arrays or blocks. What it costs is time, not memory: each product dequantizes
the matrix's rows ROWS_PER_PIECE weights at a time (npllama.quant.gguf_blocks, bit for bit the
file's float32 values) and multiplies that piece, so at most one piece of float32 exists at once
besides the blocks themselves. The numbers are those of the float32 model; only the order in which
the products are summed across pieces differs (each output element is one dot product over the
whole row either way: the pieces split the outputs, never the inputs).

A matrix may be a stack of parts of different block types along "out" (wq|wk|wv fused from a
Q4_K wq and a Q6_K wv, npllama.layout.fuse_params): each part keeps its own type and its own
bytes (stacking copies nothing). A float array joins a stack as an "F32" part.

Legend: out, in are the nn.Linear dimensions; rows are "out" (a GGUF row is one output's weights).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from ..errors import CheckpointError, InputError
from .gguf_blocks import _dequantize_blocks, block_type

# Weights dequantized at once by a product or a lookup: 1M float32 weights = 4 MiB of temporaries
# (the LM head of SmolLM2-135M, 49152 x 576, is used in 28 pieces).
WEIGHTS_PER_PIECE = 1 << 20


class QuantizedMatrix:
    """An (out, in) weight kept as GGUF blocks; ``.T`` is the (in, out) matrix that ``x @ w`` uses.

    parts: ((type_name, blocks), ...) stacked along "out"; blocks: (rows_i, bytes_per_row) uint8,
    each row the GGUF blocks of one output's in weights. dtype: what the dequantized pieces are
    computed in (float32, or float64 for a float64 model: the blocks' values widen exactly).
    transposed: this object is the (in, out) view (``x @ w``), not the (out, in) weight.
    """

    __array_ufunc__ = None        # NumPy defers to us: x @ w calls w.__rmatmul__(x)

    def __init__(self, parts: Sequence[tuple[str, np.ndarray]], n_in: int, dtype=np.float32,
                 transposed: bool = False):
        self.n_in = int(n_in)
        self.parts = tuple(parts)
        for name, blocks in self.parts:
            kind = block_type(name)
            if self.n_in % kind.block_size:
                raise CheckpointError(f"rows of {self.n_in} weights are not whole {name} blocks of {kind.block_size}")
            per_row = self.n_in // kind.block_size * kind.bytes_per_block
            if blocks.dtype != np.uint8 or blocks.ndim != 2 or blocks.shape[1] != per_row:
                raise CheckpointError(f"{name} rows of {self.n_in} weights take {per_row} bytes each; "
                                      f"got blocks of shape {blocks.shape} {blocks.dtype}")
        self.n_out = sum(len(b) for _, b in self.parts)
        self.dtype = np.dtype(dtype)
        self.transposed = transposed

    # -------------------------------------------------------------- building
    @classmethod
    def from_blocks(cls, type_name: str, data: np.ndarray, n_in: int, dtype=np.float32) -> "QuantizedMatrix":
        """A matrix of one block type from its raw bytes in file order (any dtype, C-contiguous; held
        as they are, not copied: pass a copy, not a view of a memory-mapped file, to let the file go)
        -> (bytes / bytes_per_row, n_in)."""
        kind = block_type(type_name)
        raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        per_row = n_in // kind.block_size * kind.bytes_per_block if n_in % kind.block_size == 0 else 0
        if per_row == 0 or raw.size % per_row:
            raise CheckpointError(f"{raw.size} bytes are not whole rows of {n_in} {type_name} weights")
        return cls([(type_name, raw.reshape(-1, per_row))], n_in, dtype)

    @classmethod
    def from_float(cls, w: np.ndarray) -> "QuantizedMatrix":
        """A float (out, in) matrix as an "F32" part (its float32 values, exactly when w is float32)."""
        w32 = np.ascontiguousarray(w, dtype=np.float32)
        if w32.ndim != 2:
            raise InputError(f"expected an (out, in) matrix, got shape {w32.shape}")
        return cls([("F32", w32.view(np.uint8).reshape(len(w32), -1))], w32.shape[1])

    @classmethod
    def concat(cls, mats: Sequence["QuantizedMatrix | np.ndarray"]) -> "QuantizedMatrix":
        """Stack (out_i, in) matrices along "out" (layout.fuse_params): the parts side by side, no
        bytes copied; float arrays become F32 parts."""
        mats = [m if isinstance(m, QuantizedMatrix) else cls.from_float(m) for m in mats]
        if len({m.n_in for m in mats}) != 1 or any(m.transposed for m in mats):
            raise InputError(f"cannot stack matrices of shapes {[m.shape for m in mats]} along 'out'")
        return cls([part for m in mats for part in m.parts], mats[0].n_in, mats[0].dtype)

    def astype(self, dtype) -> "QuantizedMatrix":
        """The same blocks, dequantized to dtype (float32 or float64) when used."""
        if np.dtype(dtype) not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise InputError(f"a quantized matrix dequantizes to float32 or float64, not {np.dtype(dtype)}")
        return QuantizedMatrix(self.parts, self.n_in, dtype, self.transposed)

    # -------------------------------------------------------------- what it looks like
    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_in, self.n_out) if self.transposed else (self.n_out, self.n_in)

    ndim = 2

    @property
    def size(self) -> int:
        return self.n_out * self.n_in

    @property
    def nbytes(self) -> int:
        """Bytes of the blocks held (what the matrix costs in memory, and reads per product)."""
        return sum(b.nbytes for _, b in self.parts)

    @property
    def types(self) -> list[str]:
        """The block type of each part, top to bottom."""
        return [name for name, _ in self.parts]

    @property
    def T(self) -> "QuantizedMatrix":
        return QuantizedMatrix(self.parts, self.n_in, self.dtype, not self.transposed)

    def __repr__(self) -> str:
        return (f"QuantizedMatrix({'+'.join(self.types)}, shape={self.shape}{', transposed' * self.transposed}, "
                f"{self.nbytes / 2**20:.1f} MiB)")

    # -------------------------------------------------------------- dequantizing
    def pieces(self, max_weights: int = WEIGHTS_PER_PIECE) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, rows (k, in) in self.dtype) for consecutive pieces of at most max_weights
        weights (at least one row), top to bottom."""
        step = max(1, max_weights // self.n_in)
        first = 0
        for name, blocks in self.parts:
            kind = block_type(name)
            for start in range(0, len(blocks), step):
                chunk = blocks[start:start + step]
                flat = chunk.reshape(-1, kind.bytes_per_block)
                rows = _dequantize_blocks(kind, flat).reshape(len(chunk), self.n_in)
                yield first + start, rows.astype(self.dtype, copy=False)
            first += len(blocks)

    def dequantize(self) -> np.ndarray:
        """The whole matrix as floats in self.dtype, in its own shape ((out, in), or (in, out) when transposed)."""
        out = np.empty((self.n_out, self.n_in), dtype=self.dtype)
        for first, rows in self.pieces():
            out[first:first + len(rows)] = rows
        return out.T if self.transposed else out

    def __array__(self, dtype=None, copy=None):
        w = self.dequantize()
        return w if dtype is None else w.astype(dtype, copy=False)

    def all_finite(self) -> bool:
        """Whether every weight is finite (a NaN or infinite scale is a corrupt file), piece by piece."""
        return all(np.isfinite(rows).all() for _, rows in self.pieces())

    # -------------------------------------------------------------- the model's two uses
    def __rmatmul__(self, x: np.ndarray) -> np.ndarray:
        """x @ self, self the (in, out) view: x (..., in) -> (..., out), one piece of rows at a time."""
        if not self.transposed:
            raise InputError("x @ w needs the (in, out) matrix: use w.T of an (out, in) QuantizedMatrix")
        x = np.asarray(x)
        if x.shape[-1] != self.n_in:
            raise InputError(f"x @ w: x has {x.shape[-1]} features but w takes {self.n_in}")
        y = np.empty((*x.shape[:-1], self.n_out), dtype=np.result_type(x.dtype, self.dtype))
        for first, rows in self.pieces():                        # rows: (k, in), outputs first..first+k
            y[..., first:first + len(rows)] = x @ rows.T
        return y

    def __getitem__(self, key):
        """Rows of the (out, in) weight: a slice gives a QuantizedMatrix of those rows (split_params),
        integer ids (any shape) their dequantized rows (*ids.shape, in), an embedding lookup."""
        if self.transposed:
            raise InputError("index the (out, in) QuantizedMatrix, not its transpose")
        if isinstance(key, slice):
            return self.take_rows(np.arange(self.n_out)[key])
        ids = np.asarray(key)
        if not np.issubdtype(ids.dtype, np.integer):
            raise InputError(f"rows of a QuantizedMatrix are picked by integer ids or a slice, not {ids.dtype}")
        flat = ids.reshape(-1)
        if flat.size and (flat.min() < -self.n_out or flat.max() >= self.n_out):
            raise InputError(f"row {int(flat[(flat < -self.n_out) | (flat >= self.n_out)][0])} is outside "
                             f"0..{self.n_out - 1}")
        flat = flat % self.n_out if self.n_out else flat
        out = np.empty((flat.size, self.n_in), dtype=self.dtype)
        first = 0
        for name, blocks in self.parts:
            here = (flat >= first) & (flat < first + len(blocks))
            if here.any():
                kind = block_type(name)
                picked = blocks[flat[here] - first].reshape(-1, kind.bytes_per_block)
                out[here] = _dequantize_blocks(kind, picked).reshape(-1, self.n_in)
            first += len(blocks)
        return out.reshape(*ids.shape, self.n_in)

    def take_rows(self, index: np.ndarray) -> "QuantizedMatrix":
        """The (out, in) matrix with rows index[0], index[1], ...: blocks move whole, values exactly.

        Used for the rotary row permutation of wq / wk (formats/permute.py) and for slices. Runs of
        consecutive picks from one part stay one part.
        """
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        if index.size and (index.min() < 0 or index.max() >= self.n_out):
            raise InputError(f"row indices must lie in 0..{self.n_out - 1}")
        starts = np.cumsum([0] + [len(b) for _, b in self.parts])
        owner = np.searchsorted(starts, index, side="right") - 1                  # part of each picked row
        parts: list[tuple[str, np.ndarray]] = []
        cut = np.flatnonzero(np.diff(owner)) + 1
        for run in np.split(np.arange(index.size), cut) if index.size else []:
            p = int(owner[run[0]])
            name, blocks = self.parts[p]
            parts.append((name, blocks[index[run] - starts[p]]))
        if not parts:
            parts = [(self.parts[0][0], self.parts[0][1][:0])]
        return QuantizedMatrix(parts, self.n_in, self.dtype, self.transposed)

