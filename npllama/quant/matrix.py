"""A weight matrix kept as its file stores it, and made float a piece at a time when used: GGUF blocks
held in memory, or any stored rows (GGUF blocks, float32, float16, bfloat16) left in a memory-mapped file.

    w = QuantizedMatrix.from_blocks("Q4_1", blocks, n_in)   # an nn.Linear weight (out, in), as GGUF stores it
    y = x @ w.T                                              # x: (..., in) -> (..., out); w.T is (in, out)
    e = w[ids]                                               # rows: an embedding lookup, (*ids.shape, in)

The model (npllama.model) uses every matrix as ``linear(x, w) = x @ w.T`` with w (out, in) and
looks tokens up as ``tok_embeddings[ids]``; a QuantizedMatrix answers both, so the maths reads the
same whether the weights are float arrays or blocks. What it costs is time, not memory: each
product dequantizes the matrix's rows WEIGHTS_PER_PIECE weights at a time (npllama.quant.gguf_blocks,
bit for bit the file's float32 values) and multiplies that piece, so at most one piece of float32
per thread (PRODUCT_THREADS) exists at once besides the blocks themselves. The numbers are those of the float32 model; only the order in which
the products are summed across pieces differs (each output element is one dot product over the
whole row either way: the pieces split the outputs, never the inputs).

A matrix may be a stack of parts of different block types along "out" (the row-split shards of
a Meta checkpoint merged into one matrix, npllama.layout.concat_rows): each part keeps its own
type and its own bytes (stacking copies nothing). A float array joins a stack as an "F32" part.

Mapped rows (MappedRows): a part's bytes may stay in the file, viewed through a read-only memory
map, so that a model larger than memory runs: the operating system's page cache holds the file,
and only the piece being multiplied exists as floats. Taking rows of mapped bytes (the rotary row
permutation of wq / wk) records which rows, and copies none; a matrix split along "in" across
model-parallel shards (Meta's wo, w2) is joined side by side, piece by piece (``join_columns``).
The float types (F32, F16, BF16) convert to the compute dtype in one pass per piece: bfloat16 is
the top half of a float32, so its bits shifted left by 16 are the float32 (exact), and a float32
part used in float32 is multiplied where it lies.

Legend: out, in are the nn.Linear dimensions; rows are "out" (a GGUF row is one output's weights).
"""

from __future__ import annotations

import os
from typing import Callable, Iterator, Sequence

import numpy as np

from ..errors import CheckpointError, InputError
from .gguf_blocks import _dequantize_blocks, bf16_to_float32, block_type

# Weights dequantized at once by a product or a lookup: 1M float32 weights = 4 MiB of temporaries
# per thread (the LM head of SmolLM2-135M, 49152 x 576, is used in 28 pieces).
WEIGHTS_PER_PIECE = 1 << 20

# Called with the bytes of each piece of mapped rows a product reads (formats/mapped.py's
# reading_progress shows a long pass over a large model this way); empty unless a bar is shown.
READ_HOOKS: list[Callable[[int], None]] = []


# A product's pieces run on PRODUCT_THREADS threads, each piece made float and multiplied by
# single-threaded BLAS: NumPy's conversions and BLAS both release the GIL, and on the shared 2-core
# host this made a whole forward pass 4x (one large matrix 6-8x) faster than BLAS's own two threads
# woken for each of many small products (bench/RESULTS.md, section 11, "How a mapped product is run").
PRODUCT_THREADS = min(2, os.cpu_count() or 1)
_POOL: list = []


def in_parallel(work: Callable[[tuple], None], pieces: Sequence[tuple]) -> None:
    """work(piece) for every piece, on PRODUCT_THREADS threads with BLAS on one thread each (in
    order, on this thread, when there is one piece or one thread)."""
    if len(pieces) < 2 or PRODUCT_THREADS < 2:
        for piece in pieces:
            work(piece)
        return
    if not _POOL or _POOL[2] != os.getpid():       # a forked child has the pool but not its threads
        from concurrent.futures import ThreadPoolExecutor
        from threadpoolctl import ThreadpoolController
        _POOL[:] = [ThreadPoolExecutor(PRODUCT_THREADS, thread_name_prefix="npllama-piece"), ThreadpoolController(),
                    os.getpid()]
    pool, blas, _ = _POOL
    with blas.limit(limits=1, user_api="blas"):
        for _ in pool.map(work, pieces):
            pass


class MappedRows:
    """Rows of a matrix's stored bytes left where a file holds them (read-only memory maps), and
    which of them, in which order: ``rows[k]`` of the matrix is row ``order[k]`` of the columns.

    columns: (n_rows, bytes_i) uint8 views of the same rows side by side: one, or one per
    model-parallel shard of a matrix split along "in". order: (n,) int64 row indices, or None for
    every row in file order. Taking rows (``take``) composes orders and copies nothing; indexing
    (``rows[a:b]``, ``rows[ids]``) reads those rows into memory: (k, sum of bytes_i) uint8, a view
    of the map itself where one column is sliced in order.
    """

    dtype = np.dtype(np.uint8)
    ndim = 2

    def __init__(self, columns: Sequence[np.ndarray], order: np.ndarray | None = None):
        self.columns = tuple(columns)
        if not self.columns or any(c.dtype != np.uint8 or c.ndim != 2 or len(c) != len(self.columns[0])
                                   for c in self.columns):
            raise CheckpointError(f"mapped rows need (rows, bytes) uint8 views of equal rows, got "
                                  f"{[(c.shape, str(c.dtype)) for c in self.columns]}")
        self.order = None if order is None else np.asarray(order, dtype=np.int64)

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), sum(c.shape[1] for c in self.columns))

    @property
    def nbytes(self) -> int:
        return len(self) * self.shape[1]

    def __len__(self) -> int:
        return len(self.columns[0]) if self.order is None else len(self.order)

    def take(self, index: np.ndarray) -> "MappedRows":
        """The rows index[0], index[1], ... (of these rows), still mapped: no byte is read."""
        index = np.asarray(index, dtype=np.int64)
        return MappedRows(self.columns, index if self.order is None else self.order[index])

    def __getitem__(self, key) -> np.ndarray:
        if isinstance(key, slice) and self.order is not None:
            key = self.order[key]
        elif not isinstance(key, slice):
            key = np.asarray(key, dtype=np.int64)
            key = key if self.order is None else self.order[key]
        if len(self.columns) == 1:
            return self.columns[0][key]
        return np.concatenate([c[key] for c in self.columns], axis=1)

    def __repr__(self) -> str:
        return f"MappedRows({self.shape[0]} x {self.shape[1]} bytes, {len(self.columns)} column(s))"


def is_mapped(blocks) -> bool:
    """Whether a part's bytes are left in a file (MappedRows) rather than held in memory."""
    return isinstance(blocks, MappedRows)


# Float part types converted in one pass (to_float), each as the element dtype of its stored bytes
# (a file's map is viewed in these: formats/mapped.py); the block types go through gguf_blocks.
FLOAT_STORAGE = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}


def to_float(type_name: str, rows: np.ndarray, n_in: int, dtype: np.dtype) -> np.ndarray:
    """Stored rows (k, bytes_per_row) uint8 of any part type -> (k, n_in) in dtype (float32 or float64).

    F32 rows in float32 are the stored floats themselves (a view, no copy); BF16 is one pass (the
    16 bits shifted to the top of a float32), F16 one conversion; block types dequantize through
    gguf_blocks. Every value is exact: the stored values are float32 values, and widen exactly.
    """
    k = len(rows)
    if type_name in FLOAT_STORAGE:
        raw = np.ascontiguousarray(rows).view(FLOAT_STORAGE[type_name]).reshape(k, n_in)
        if type_name == "BF16":
            as32 = bf16_to_float32(raw)
            return as32 if dtype == np.float32 else as32.astype(dtype)
        return raw.astype(dtype, copy=False)
    kind = block_type(type_name)
    flat = rows.reshape(-1, kind.bytes_per_block) if rows.flags.c_contiguous else \
        np.ascontiguousarray(rows).reshape(-1, kind.bytes_per_block)
    return _dequantize_blocks(kind, flat).reshape(k, n_in).astype(dtype, copy=False)


class QuantizedMatrix:
    """An (out, in) weight kept as stored; ``.T`` is the (in, out) matrix that ``x @ w`` uses.

    parts: ((type_name, blocks), ...) stacked along "out"; blocks: (rows_i, bytes_per_row) uint8
    held in memory, or MappedRows left in a file, each row the stored values (GGUF blocks, or
    F32 / F16 / BF16 numbers) of one output's in weights. dtype: what the pieces are computed in
    (float32, or float64 for a float64 model: the stored values widen exactly).
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
        """Stack (out_i, in) matrices along "out" (layout.concat_rows): the parts side by side, no
        bytes copied; float arrays become F32 parts."""
        mats = [m if isinstance(m, QuantizedMatrix) else cls.from_float(m) for m in mats]
        if len({m.n_in for m in mats}) != 1 or any(m.transposed for m in mats):
            raise InputError(f"cannot stack matrices of shapes {[m.shape for m in mats]} along 'out'")
        return cls([part for m in mats for part in m.parts], mats[0].n_in, mats[0].dtype)

    @classmethod
    def from_mapped(cls, type_name: str, stored: np.ndarray, dtype=np.float32) -> "QuantizedMatrix":
        """A matrix whose stored values stay in a memory-mapped file: stored is the (out, in) view
        of the map in the stored element type (float32, float16, or uint16 bit patterns for
        bfloat16) or the (out, bytes_per_row) uint8 rows of GGUF blocks; no byte is read here."""
        if stored.ndim != 2:
            raise CheckpointError(f"a mapped matrix is (out, in), got shape {stored.shape}")
        n_in = stored.shape[1] if stored.dtype != np.uint8 else \
            stored.shape[1] // block_type(type_name).bytes_per_block * block_type(type_name).block_size
        rows = stored.view(np.uint8).reshape(len(stored), -1) if stored.size else \
            np.zeros((len(stored), 0), np.uint8)
        return cls([(type_name, MappedRows([rows]))], n_in, dtype)

    @classmethod
    def join_columns(cls, mats: Sequence["QuantizedMatrix"]) -> "QuantizedMatrix":
        """Matrices (out, in_i) side by side along "in" -> (out, sum in_i), each row read piecewise
        from every one: Meta's row-parallel wo and w2 (and a Llama 2 embedding), split along "in"
        across model-parallel shards. Each must be one mapped part of the same float type."""
        ok = all(len(m.parts) == 1 and is_mapped(m.parts[0][1]) and m.parts[0][1].order is None
                 and m.parts[0][0] in FLOAT_STORAGE and not m.transposed for m in mats)
        if not ok or len({m.parts[0][0] for m in mats}) != 1 or len({m.n_out for m in mats}) != 1:
            raise InputError(f"join_columns takes mapped float matrices of one type and equal rows, got "
                             f"{[(m.types, m.shape) for m in mats]}")
        columns = [c for m in mats for c in m.parts[0][1].columns]
        return cls([(mats[0].parts[0][0], MappedRows(columns))], sum(m.n_in for m in mats), mats[0].dtype)

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
    def mapped(self) -> bool:
        """Whether every part's bytes stay in a memory-mapped file (nothing of the matrix is in memory)."""
        return all(is_mapped(b) for _, b in self.parts)

    def held_exactly_in(self, dtype_name: str) -> bool:
        """Whether a dtype ("float64", "float32", "bfloat16", "float16") holds every stored value
        exactly, known from the part types alone (nothing is read): float32 and float64 hold every
        type's values (blocks decode to float32 numbers); bfloat16 and float16 hold their own."""
        if dtype_name in ("float64", "float32"):
            return True
        return all(name == {"bfloat16": "BF16", "float16": "F16"}.get(dtype_name) for name, _ in self.parts)

    @property
    def types(self) -> list[str]:
        """The block type of each part, top to bottom."""
        return [name for name, _ in self.parts]

    @property
    def T(self) -> "QuantizedMatrix":
        return QuantizedMatrix(self.parts, self.n_in, self.dtype, not self.transposed)

    def __repr__(self) -> str:
        return (f"QuantizedMatrix({'+'.join(self.types)}, shape={self.shape}{', transposed' * self.transposed}, "
                f"{self.nbytes / 2**20:.1f} MiB{', mapped' * self.mapped})")

    # -------------------------------------------------------------- dequantizing
    def piece_ranges(self, max_weights: int | None = None) -> list[tuple[int, int, int, int]]:
        """(first row of the matrix, part, first row of the part, rows) of each piece of at most
        max_weights weights (WEIGHTS_PER_PIECE by default; at least one row), top to bottom."""
        step = max(1, (WEIGHTS_PER_PIECE if max_weights is None else max_weights) // max(self.n_in, 1))
        out, first = [], 0
        for p, (_, blocks) in enumerate(self.parts):
            out += [(first + start, p, start, min(step, len(blocks) - start)) for start in range(0, len(blocks), step)]
            first += len(blocks)
        return out

    def piece(self, part: int, start: int, rows: int, dtype=None) -> np.ndarray:
        """Rows start .. start+rows of one part, made float: (rows, in) in dtype (default self.dtype)."""
        name, blocks = self.parts[part]
        chunk = blocks[start:start + rows]
        if READ_HOOKS and is_mapped(blocks):
            for hook in READ_HOOKS:
                hook(chunk.nbytes)
        return to_float(name, chunk, self.n_in, self.dtype if dtype is None else np.dtype(dtype))

    def pieces(self, max_weights: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, rows (k, in) in self.dtype) for consecutive pieces of at most max_weights
        weights (WEIGHTS_PER_PIECE by default; at least one row), top to bottom."""
        for first, part, start, rows in self.piece_ranges(max_weights):
            yield first, self.piece(part, start, rows)

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
        dtype = np.result_type(x.dtype, self.dtype)
        xt = np.ascontiguousarray(x.reshape(-1, self.n_in).T, dtype=dtype)      # (in, tokens)
        yt = np.empty((self.n_out, xt.shape[1]), dtype=dtype)                   # (out, tokens)

        def multiply(piece: tuple[int, int, int, int]) -> None:   # outputs first .. first+rows
            first, part, start, rows = piece
            np.matmul(self.piece(part, start, rows), xt, out=yt[first:first + rows])   # contiguous rows of yt
        in_parallel(multiply, self.piece_ranges())
        return yt.T.reshape(*x.shape[:-1], self.n_out)            # (..., out)

    def __getitem__(self, key):
        """Rows of the (out, in) weight: a slice gives a QuantizedMatrix of those rows,
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
                out[here] = to_float(name, blocks[flat[here] - first], self.n_in, self.dtype)
            first += len(blocks)
        return out.reshape(*ids.shape, self.n_in)

    def take_rows(self, index: np.ndarray) -> "QuantizedMatrix":
        """The (out, in) matrix with rows index[0], index[1], ...: blocks move whole, values exactly.

        Used for the rotary row permutation of wq / wk (formats/permute.py) and for slices. Runs of
        consecutive picks from one part stay one part. Mapped rows stay mapped (MappedRows.take).
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
            picked = index[run] - starts[p]
            parts.append((name, blocks.take(picked) if is_mapped(blocks) else blocks[picked]))
        if not parts:
            name, blocks = self.parts[0]
            parts = [(name, blocks.take(np.zeros(0, np.int64)) if is_mapped(blocks) else blocks[:0])]
        return QuantizedMatrix(parts, self.n_in, self.dtype, self.transposed)

