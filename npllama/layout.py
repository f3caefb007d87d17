"""How the weights are laid out for compute, and which attention runs: the speed choices made
after loading, in one place.

Nothing here changes the function the model computes; each choice decides in which order the same
arithmetic touches memory, and so, for the memory order and the attention tiles, in which order
sums are taken: results may move by rounding (a decode product by an ulp or so), within the
tolerances of tolerances.py, never by more. The spec (model.py) holds every matrix as its file
does, (out, in), and applies it as ``x @ w.T``; these choices are applied after loading, so the
maths reads as the equations. Two speed choices live with what they concern: the KV cache grows
by doubling (cache.py) and attention views the queries in groups rather than copying k and v
(attention.py). Why each was chosen, with the measurements, is in bench/RESULTS.md.

1. Fused projections. Projections of the same input can be placed side by side, so that each pair
   or triple is one matrix product: wq|wk|wv -> ``attention.wqkv`` and w1|w3 -> ``feed_forward.w13``.
   The NumPy model does not fuse: a decode step reads the same bytes either way and the two extra
   products per layer cost nothing measurable (bench/RESULTS.md, "Unfused"). The Torch fast path
   (parity/fast.py) fuses after loading, per rank under tensor parallelism; ``fuse_params`` (and
   its inverse ``split_params``) is the one place that knows how. ``concat_rows`` also stacks a Meta
   checkpoint's row-split shards into one matrix.
2. Memory order. A decode step is one matrix-vector product per matrix, and which memory order
   OpenBLAS streams faster depends on the shape. ``IN_OUT_IN_MEMORY`` names the matrices whose
   (out, in) array is a view of (in, out) row-major memory; the others keep the file's (out, in)
   rows (``compute_matrix``).
3. Quantized and mapped weights. A model loaded with ``weights="gguf"`` keeps each matrix as GGUF
   blocks, and a mapped one (``mapped=True``, formats/mapped.py) leaves each matrix's rows in its
   file (npllama.quant.matrix.QuantizedMatrix, both): the memory order does not apply (each product
   makes row pieces float), nothing is copied, and the embedding table is the stored rows too
   (``embedding_table``), looked up row by row; tied, the LM head is the same rows.
4. Attention. ``attention="auto"`` runs blockwise (flash) attention from FLASH_MIN_LEN keys on
   (when more than one query is computed), naive attention below; BLOCK_Q x BLOCK_K is the tile.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .config import ModelArgs
from .quant.matrix import QuantizedMatrix

# ------------------------------------------------------------------------------ 1. fused projections
# fused name -> the checkpoint modules stacked along "out", in this order
FUSED = {"attention.wqkv": ("attention.wq", "attention.wk", "attention.wv"),
         "feed_forward.w13": ("feed_forward.w1", "feed_forward.w3")}


def fused_sizes(args: ModelArgs) -> dict[str, list[int]]:
    """Rows each part contributes to a fused matrix: wqkv [n_heads, n_kv_heads, n_kv_heads] * head_dim."""
    kv = args.n_kv_heads * args.head_dim
    return {"attention.wqkv": [args.n_heads * args.head_dim, kv, kv],
            "feed_forward.w13": [args.hidden_dim, args.hidden_dim]}


def concat_rows(parts: Sequence[Any]) -> Any:
    """Join (out_i, ...) arrays along "out": np.concatenate, or, when any part is a QuantizedMatrix,
    one QuantizedMatrix stacking the parts' blocks (no weight is dequantized)."""
    if any(isinstance(p, QuantizedMatrix) for p in parts):
        return QuantizedMatrix.concat(parts)
    return np.concatenate(parts)


def fuse_params(args: ModelArgs, params: Mapping[str, Any], concat: Callable[[Sequence[Any]], Any] = concat_rows,
                prefix: str = "") -> dict[str, Any]:
    """Checkpoint names -> fused names: wq|wk|wv -> attention.wqkv, w1|w3 -> feed_forward.w13.

    params: name -> (out, in) weight or (out,) bias; concat: joins a list along axis 0
    (concat_rows, or torch.cat for tensors). Other names, and names already fused, pass through.
    """
    out = dict(params)
    for i in range(args.n_layers):
        p = f"{prefix}layers.{i}."
        for fused, parts in FUSED.items():
            for kind in ("weight", "bias"):
                names = [f"{p}{part}.{kind}" for part in parts]
                if all(n in out for n in names):
                    out[f"{p}{fused}.{kind}"] = concat([out.pop(n) for n in names])
    return out


def split_params(args: ModelArgs, params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """The inverse of fuse_params: views (slices along axis 0) of each fused tensor under its
    checkpoint names, in checkpoint order. Works for NumPy arrays and torch tensors alike."""
    sizes = fused_sizes(args)
    out: dict[str, Any] = {}
    for name, value in params.items():
        layer, module, kind = _parse(name[len(prefix):]) if name.startswith(prefix) else (None, None, None)
        if module not in FUSED:
            out[name] = value
            continue
        start = 0
        for part, rows in zip(FUSED[module], sizes[module]):
            out[f"{prefix}layers.{layer}.{part}.{kind}"] = value[start: start + rows]
            start += rows
    return out


def _parse(name: str) -> tuple[str | None, str | None, str | None]:
    """'layers.3.attention.wqkv.weight' -> ('3', 'attention.wqkv', 'weight')."""
    parts = name.split(".", 2)
    if len(parts) != 3 or parts[0] != "layers":
        return None, None, None
    module, _, kind = parts[2].rpartition(".")
    return parts[1], module, kind


# ------------------------------------------------------------------------------ 2. memory order
# Matrices whose (out, in) array views (in, out) row-major memory; every other one keeps the
# file's (out, in) rows (the faster order for each, measured by bench/bench_layout.py;
# bench/RESULTS.md has the figures).
IN_OUT_IN_MEMORY = frozenset({"wo", "w1", "w3", "output"})


def compute_matrix(name: str, weight: np.ndarray, dtype) -> np.ndarray:
    """A weight (out, in) in dtype, in the memory order chosen for it; still (out, in) to the maths.

    name: the matrix's short name ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output"). The numbers
    are the same either way; only the order they lie in memory differs. A QuantizedMatrix stays as
    stored (blocks in memory, or rows left in a mapped file), made dtype a piece at a time when used.
    """
    if isinstance(weight, QuantizedMatrix):
        return weight.astype(dtype)
    if name in IN_OUT_IN_MEMORY:
        return np.ascontiguousarray(np.asarray(weight).T, dtype=dtype).T    # (out, in), F order
    return np.ascontiguousarray(weight, dtype=dtype)                      # (out, in), C order


def embedding_table(weight: Any, dtype) -> Any:
    """The token embedding (vocab, dim) as ``tok_embeddings[ids]`` reads it: a contiguous array in
    dtype, or a QuantizedMatrix that dequantizes the looked-up rows only."""
    if isinstance(weight, QuantizedMatrix):
        return weight.astype(dtype)
    return np.ascontiguousarray(weight, dtype=dtype)


# ------------------------------------------------------------------------------ 4. attention
# Blockwise attention pays for its Python loop over tiles; from 256 keys on it is the faster one
# on the project's CPU (bench/RESULTS.md, "Crossover"), and it never allocates seq x seq.
FLASH_MIN_LEN = 256
# A tile of 128 queries by 512 keys for every head at once stays near the CPU's caches while
# leaving few tiles for the loop (bench/RESULTS.md, section 2).
BLOCK_Q = 128
BLOCK_K = 512


def choose_attention(impl: str, q_len: int, kv_len: int) -> str:
    """"auto" -> "flash" for a long prefill (FLASH_MIN_LEN keys or more, several queries), else "naive"."""
    if impl == "auto":
        return "flash" if kv_len >= FLASH_MIN_LEN and q_len > 1 else "naive"
    return impl
