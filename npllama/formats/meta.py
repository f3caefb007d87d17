"""Meta checkpoints (llama, llama3, llama-models): params.json + consolidated.NN.pth + tokenizer.model.

tokenizer.model is SentencePiece for Llama 1 / 2 and a tiktoken rank file for Llama 3 (told apart
by its first line, see meta_tokenizer); params.json's use_scaled_rope marks Llama 3.1 and later.

The .pth files are ``torch.save`` archives, read without torch and without running any code from
the file (torch_save.py); mapped, their tensors stay in the files (formats/mapped.py).

Model parallelism. A model saved on n GPUs is n files, each holding a slice of every matrix along
Meta's fairscale split: ColumnParallelLinear (wq, wk, wv, w1, w3, output) is split along rows
(dim 0), RowParallelLinear (wo, w2) along columns (dim 1), the embedding along dim 1 (Llama 1/2's
ParallelEmbedding) or dim 0 (Llama 3's VocabParallelEmbedding; told apart by shape); norms are copied.
Mapped, the slices are joined without a copy: along rows as a stack of the shards' rows, along
columns as rows read from every shard side by side, piece by piece (QuantizedMatrix.join_columns).

Rotary layout: Meta rotates interleaved pairs, so wq and wk rows are permuted into the half layout,
wk with n_kv_heads heads (see permute.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..config import ModelArgs
from ..errors import CheckpointError, ConfigError, TokenizerError
from ..tokenizer import Tokenizer, is_tiktoken_file
from .fields import Fields, build_args
from ..layout import concat_rows
from ..quant.matrix import QuantizedMatrix
from .fields import read_json
from .mapped import choose_mapped, place
from .permute import to_half_layout
from .torch_save import read_torch_zip


# ---------------------------------------------------------------------------- params.json
def meta_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's FeedForward width: int(2*4*dim/3), scaled, rounded up to multiple_of.

    The SwiGLU width is not stored in params.json; Meta's FeedForward derives it from dim
    (Llama-2-7B: 11008, Llama-3-8B: 14336).
    """
    if multiple_of <= 0:
        raise ConfigError(f"params.json: multiple_of must be positive, got {multiple_of}")
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def args_from_params(params: Any, vocab_size: int | None = None, source: str = "params.json",
                     llama3: bool = False) -> ModelArgs:
    """ModelArgs from Meta's ``params.json`` (llama, llama3, llama-models).

    vocab_size: the tokenizer's, used when params.json says -1 (Llama 1 / 2 do).
    llama3: the folder holds Llama 3's tiktoken tokenizer, so what params.json leaves out takes
    Llama 3's values (llama-models' ModelArgs): rope_theta 500000 and an 8192-token window (131072
    with use_scaled_rope, Llama 3.1 and later).

    Llama 3.1 and later say ``use_scaled_rope``: the llama3 rope scaling of Meta's
    ``apply_scaling``, with its factor 8 and high-frequency factor 4 unless params.json gives
    ``rope_scaling_factor`` / ``rope_high_freq_factor`` (as later llama-models files do).
    """
    f = Fields(params, source)
    dim = f.integer("dim")
    vocab = f.integer("vocab_size", -1, minimum=None)
    if vocab <= 0:
        if vocab_size is None:
            raise ConfigError(f"{source}: vocab_size is {vocab} and no tokenizer.model gives it")
        vocab = vocab_size
    n_heads = f.integer("n_heads")
    scaled = f.flag("use_scaled_rope", False)
    scaling: dict[str, Any] = {"rope_type": "default"}
    if scaled:
        scaling = {"rope_type": "llama3", "factor": f.number("rope_scaling_factor", 8.0),
                   "low_freq_factor": 1.0, "high_freq_factor": f.number("rope_high_freq_factor", 4.0),
                   "original_max_position_embeddings": 8192}
    multiplier = f.number("ffn_dim_multiplier", None)
    window = 131072 if scaled else 8192 if llama3 else 2048
    return ModelArgs(
        dim=dim,
        n_layers=f.integer("n_layers"),
        n_heads=n_heads,
        n_kv_heads=f.integer("n_kv_heads", n_heads),
        vocab_size=vocab,
        hidden_dim=meta_hidden_dim(dim, f.integer("multiple_of"), multiplier),
        norm_eps=f.number("norm_eps", 1e-5),
        rope_theta=f.number("rope_theta", 500000.0 if llama3 else 10000.0),
        rope_scaling=scaling,
        max_seq_len=f.integer("max_seq_len", window),
        tie_word_embeddings=False,
    )


def meta_tokenizer(folder: Path, params_json: Any) -> Tokenizer | None:
    """The folder's tokenizer.model: SentencePiece (Llama 1 / 2) or tiktoken (Llama 3), told apart by
    its first line. Llama 3's special tokens and built-in chat format follow params.json: Llama 3.1
    and later (``use_scaled_rope``) name more of them and open every conversation with a system header."""
    path = folder / "tokenizer.model"
    if not os.path.lexists(path):
        return None
    if is_tiktoken_file(path):
        scaled = isinstance(params_json, dict) and params_json.get("use_scaled_rope") is True
        return Tokenizer.from_tiktoken(path, version="3.1" if scaled else "3")
    return Tokenizer.from_sentencepiece(path)


# ---------------------------------------------------------------------------- shards
_ROW_SPLIT = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight",
              "feed_forward.w1.weight", "feed_forward.w3.weight", "output.weight")
_COL_SPLIT = ("attention.wo.weight", "feed_forward.w2.weight")


def merge_shards(shards: list[dict[str, Any]], args: ModelArgs, files: list[Path]) -> dict[str, Any]:
    """Join model-parallel slices along Meta's split axes; norms are replicated. Slices are arrays
    (concatenated) or mapped matrices (joined without a copy: join_slices)."""
    names = list(shards[0])
    for f, s in zip(files[1:], shards[1:]):
        if set(s) != set(names):
            raise CheckpointError(f"{f}: holds different tensor names from {files[0].name}")
    merged = {}
    for name in names:
        parts = [s[name] for s in shards]
        if len(parts) == 1 or parts[0].ndim < 2:
            merged[name] = parts[0]
            continue
        if name.endswith(_ROW_SPLIT):
            axis = 0
        elif name.endswith(_COL_SPLIT):
            axis = 1
        elif name == "tok_embeddings.weight":   # Llama 1/2 split dim, Llama 3 split vocab
            axis = 1 if sum(p.shape[1] for p in parts) == args.dim else 0
        else:
            raise CheckpointError(f"{files[0]}: do not know how tensor {name!r} is split across shards")
        try:
            merged[name] = join_slices(parts, axis)
        except ValueError:
            raise CheckpointError(f"{files[0].parent}: shards of {name!r} have shapes "
                                  f"{[p.shape for p in parts]}, which do not join along dim {axis}") from None
    return merged


def join_slices(parts: list[Any], axis: int) -> Any:
    """Slices of one matrix joined along axis 0 ("out") or 1 ("in"): np.concatenate for arrays; for
    mapped matrices a stack of their rows (axis 0) or their rows side by side (axis 1), nothing read."""
    mapped = [isinstance(p, QuantizedMatrix) and p.mapped for p in parts]
    if axis == 0 and any(mapped):
        if len({p.shape[1] for p in parts}) != 1:
            raise ValueError("slices differ in width")
        return concat_rows(parts)
    if axis == 1 and all(mapped) and len({p.types[0] for p in parts}) == 1:
        if len({p.shape[0] for p in parts}) != 1:
            raise ValueError("slices differ in height")
        return QuantizedMatrix.join_columns(parts)
    return np.concatenate([np.asarray(p) for p in parts], axis=axis)


# ---------------------------------------------------------------------------- the loader
def load_meta(folder: Path, progress: Callable, mapped: bool | None = None):
    """A Meta folder -> (ModelArgs, params in npllama names and half rotary layout, Tokenizer or None).

    mapped: leave the matrices in the .pth files (formats/mapped.py); None: when the model is large."""
    params_json = read_json(folder / "params.json")
    tok_path = folder / "tokenizer.model"
    tokenizer = meta_tokenizer(folder, params_json)
    if tokenizer is None and (not isinstance(params_json, dict) or not isinstance(params_json.get("vocab_size"), int)
                              or params_json["vocab_size"] <= 0):
        raise CheckpointError(f"{folder}: has no tokenizer.model, and params.json gives no vocab_size")
    args = build_args(args_from_params, folder / "params.json", params_json,
                      vocab_size=tokenizer.vocab_size if tokenizer else None, source=str(folder / "params.json"),
                      llama3=tokenizer is not None and tokenizer.chat_format in ("llama3", "llama3.1"))
    if tokenizer is not None:
        if tokenizer.vocab_size > args.vocab_size:
            raise TokenizerError(f"{tok_path}: {tokenizer.vocab_size} tokens, but params.json gives the model "
                                 f"only {args.vocab_size}")
        args = args.replace(bos_token_id=tokenizer.bos_id, eos_token_ids=tokenizer.eos_ids)

    files = sorted(folder.glob("consolidated.*.pth"))
    if not files:
        raise CheckpointError(f"{folder}: has params.json but no consolidated.00.pth")
    numbers = [f.name.split(".")[1] for f in files]
    if numbers != [f"{i:02d}" for i in range(len(files))]:
        raise CheckpointError(f"{folder}: shard files {[f.name for f in files]} are not consolidated.00 .. "
                              f"{len(files) - 1:02d} without gaps")
    use_map = choose_mapped(mapped, args)
    shards = [read_torch_zip(f, mapped=use_map) for f in progress(files, desc=f"Reading {folder.name}", unit="shard")]
    if use_map:
        shards = [place(s, True) for s in shards]
    state = merge_shards(shards, args, files)
    state.pop("rope.freqs", None)   # Llama 1/2 store the rotary table; npllama computes it
    if "output.weight" not in state:    # Llama 3.2 1B and 3B: the LM head is the embedding table
        args = args.replace(tie_word_embeddings=True)

    return args, to_half_layout(state, args, str(folder)), tokenizer
