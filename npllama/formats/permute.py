"""The two rotary layouts of q and k, and the row permutations between them.

Rotary embeddings (Su et al. 2021, "RoFormer") rotate each head's channels in pairs, and the
pairing is a convention:

* **interleaved** (Meta's llama/model.py, llama.cpp, GGUF files): channels (2i, 2i+1) form a pair,
  the real and imaginary parts of one complex number, ``torch.view_as_complex(x.reshape(..., -1, 2))``
  multiplied by ``exp(i m theta_i)``.

      head channels:  [r0 i0 r1 i1 r2 i2 r3 i3]

* **half** (Hugging Face's ``rotate_half``, and npllama): channel i pairs with channel i + d/2,
  so the real parts fill the first half of the head and the imaginary parts the second.

      head channels:  [r0 r1 r2 r3 i0 i1 i2 i3]

The channels of q and k are rows of wq and wk (nn.Linear's (out, in) layout), so moving between the
layouts is a permutation of the rows within each head. It does not change any attention score: the
dot product q.k sums over the same pairs, each rotated by the same angle. v and o are never permuted.

Which number of heads: wq has n_heads heads, wk has n_kv_heads heads. Permuting wk with n_heads is a
classic bug (llama.cpp #2376 / #3364, llama2.c #431) that only shows on GQA models, where the two differ.

Source: transformers' convert_llama_weights_to_hf.py (``permute``) and llama.cpp's
convert_hf_to_gguf.py (``LlamaModel.permute``, its inverse).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from ..config import ModelArgs
from ..errors import CheckpointError


def _split_heads(w: np.ndarray, n_heads: int, name: str) -> tuple[int, int]:
    """(rows, head_dim) of a (rows, cols) weight or (rows,) bias holding n_heads heads."""
    if w.ndim not in (1, 2):
        raise CheckpointError(f"{name}: expected a (rows, cols) weight or (rows,) bias, got shape {w.shape}")
    rows = w.shape[0]
    if n_heads <= 0 or rows % n_heads or (rows // n_heads) % 2:
        raise CheckpointError(f"{name}: {rows} rows do not split into {n_heads} heads of even width; "
                              f"check n_heads / n_kv_heads in the config")
    return rows, rows // n_heads


def permute_to_half(w: np.ndarray, n_heads: int, name: str = "tensor") -> np.ndarray:
    """Interleaved (Meta, GGUF) rows -> half (Hugging Face, npllama) rows, head by head.

    w: (n_heads * head_dim, cols) or (n_heads * head_dim,) -> the same shape.
    Within each head, rows [r0 i0 r1 i1 ...] become [r0 r1 ... i0 i1 ...].
    """
    rows, hd = _split_heads(w, n_heads, name)
    rest = w.shape[1:]
    x = w.reshape(n_heads, hd // 2, 2, *rest)       # (heads, pair, re/im, ...)
    x = np.swapaxes(x, 1, 2)                         # (heads, re/im, pair, ...)
    return np.ascontiguousarray(x.reshape(rows, *rest))


def permute_to_interleaved(w: np.ndarray, n_heads: int, name: str = "tensor") -> np.ndarray:
    """Half (Hugging Face, npllama) rows -> interleaved (Meta, GGUF) rows: the inverse of permute_to_half.

    w: (n_heads * head_dim, cols) or (n_heads * head_dim,) -> the same shape.
    Within each head, rows [r0 r1 ... i0 i1 ...] become [r0 i0 r1 i1 ...].
    """
    rows, hd = _split_heads(w, n_heads, name)
    rest = w.shape[1:]
    x = w.reshape(n_heads, 2, hd // 2, *rest)       # (heads, re/im, pair, ...)
    x = np.swapaxes(x, 1, 2)                         # (heads, pair, re/im, ...)
    return np.ascontiguousarray(x.reshape(rows, *rest))


def to_half_layout(params: Mapping[str, Any], args: ModelArgs, source: str) -> dict[str, Any]:
    """A checkpoint in the interleaved layout (Meta, GGUF) -> the half layout: the rows of every
    wq (n_heads heads) and wk (n_kv_heads heads), weights and biases, permuted; the rest as is.

    A matrix kept as stored (npllama.quant.matrix.QuantizedMatrix: GGUF blocks, or rows left in a
    mapped file) takes the same permutation of whole rows (take_rows): no value changes, and
    mapped rows stay in the file."""
    from ..quant.matrix import QuantizedMatrix

    heads = {"attention.wq": args.n_heads, "attention.wk": args.n_kv_heads}
    out = {}
    for name, w in params.items():
        module = name.rpartition(".")[0].split(".", 2)[-1]          # "layers.3.attention.wq.weight" -> "attention.wq"
        if module not in heads:
            out[name] = w
        elif isinstance(w, QuantizedMatrix):
            out[name] = w.take_rows(permute_to_half(np.arange(w.shape[0]), heads[module], f"{source}: {name}"))
        else:
            out[name] = permute_to_half(w, heads[module], f"{source}: {name}")
    return out
