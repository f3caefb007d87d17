"""GGUF files (llama.cpp): metadata -> ModelArgs, tensors -> dequantised arrays, vocabulary -> Tokenizer.

A GGUF file is a header of key/value metadata (``llama.block_count``, ``tokenizer.ggml.tokens``, ...),
a table of tensors, and their data, each tensor stored as float or in a block-quantised type
(Q4_1: blocks of 32 weights sharing a scale and a minimum). The ``gguf`` package (llama.cpp's own
Python reader) parses it; npllama.quant.gguf_blocks, npllama's own statement of each block type,
turns the blocks back into float32 (gguf's dequantizer only for the types it does not state).

Layout facts a loader must undo:

* Shapes are listed in ggml's ``ne`` order, fastest axis first, i.e. reversed: a (rows, cols) matrix
  is listed as [cols, rows]. The reader's ``tensor.data`` is already in numpy (rows, cols) order.
* llama.cpp's converter permutes q and k into Meta's interleaved rotary layout; npllama rotates
  halves, so wq / wk rows are permuted back (wk with n_kv_heads heads).
* Tied embeddings: the file has no ``output.weight``.

Tensor names: token_embd, output_norm, output, blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output,
ffn_norm, ffn_gate (w1), ffn_up (w3), ffn_down (w2)} (names.py maps them onto npllama's). The
vocabulary in the metadata becomes a Tokenizer in gguf_vocab.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from ..config import ModelArgs
from ..errors import CheckpointError, ConfigError
from .fields import Fields, build_args
from .gguf_reader import open_gguf
from .gguf_vocab import gguf_tokenizer
from .mapped import choose_mapped
from .names import rename
from .permute import to_half_layout


def read_metadata(reader, path: Path) -> dict[str, Any]:
    """The header's key/values that npllama reads (is_used_key) as Python values (strings, numbers, lists)."""
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        try:
            meta[key] = field.contents()
        except Exception as e:
            raise CheckpointError(f"{path}: metadata key {key!r} cannot be read ({type(e).__name__}: {e})") from None
    return meta


def npllama_name(name: str) -> str | None:
    """GGUF tensor name -> npllama's name, or None for a name npllama does not know."""
    return rename(name, "gguf", "meta")


def args_from_metadata(meta: Mapping[str, Any], vocab_size: int, tied: bool, source: str = "GGUF metadata") -> ModelArgs:
    """ModelArgs from GGUF key/value metadata (``{arch}.block_count`` and friends).

    vocab_size: the vocabulary's length, used when ``{arch}.vocab_size`` is absent; tied: the
    file has no output.weight (the LM head is the embedding).
    """
    arch = meta.get("general.architecture", "llama")
    if arch != "llama":
        raise ConfigError(f"{source}: architecture {arch!r} is not a Llama-family model npllama can run")
    f = Fields({k[len(arch) + 1:]: v for k, v in meta.items() if k.startswith(arch + ".")},
               f"{source}: metadata {arch}.*")
    n_heads = f.integer("attention.head_count")
    dim = f.integer("embedding_length")
    scaling: dict[str, Any] = {"rope_type": "default"}
    kind = meta.get(f"{arch}.rope.scaling.type")
    if kind is not None and not isinstance(kind, str):
        raise ConfigError(f"{source}: {arch}.rope.scaling.type must be a string, got {kind!r:.80}")
    if kind and kind != "none":
        scaling = {"rope_type": kind, "factor": f.number("rope.scaling.factor", 1.0)}
        orig = f.integer("rope.scaling.original_context_length", None)
        if orig:
            scaling["original_max_position_embeddings"] = orig
        for key in ("beta_fast", "beta_slow"):   # YaRN ramp ends, when the converter wrote them
            if meta.get(f"{arch}.rope.scaling.yarn_{key}") is not None:
                scaling[key] = f.number(f"rope.scaling.yarn_{key}")
    head_dim = f.integer("attention.key_length", 0, minimum=0)
    if head_dim == 0 and dim % n_heads:
        raise ConfigError(f"{source}: {arch}.embedding_length ({dim}) is not a multiple of "
                          f"{arch}.attention.head_count ({n_heads}), and {arch}.attention.key_length does not give "
                          f"the head size")
    rot = f.integer("rope.dimension_count", None)
    eos = Fields(meta, source).integer("tokenizer.ggml.eos_token_id", None, minimum=0)
    return ModelArgs(
        dim=dim,
        n_layers=f.integer("block_count"),
        n_heads=n_heads,
        n_kv_heads=f.integer("attention.head_count_kv", n_heads),
        vocab_size=f.integer("vocab_size", vocab_size),
        hidden_dim=f.integer("feed_forward_length"),
        head_dim=head_dim,
        norm_eps=f.number("attention.layer_norm_rms_epsilon"),
        rope_theta=f.number("rope.freq_base", 10000.0),
        rope_scaling=scaling,
        partial_rotary_factor=(rot / (head_dim or dim // n_heads)) if rot else 1.0,
        max_seq_len=f.integer("context_length", 2048),
        tie_word_embeddings=tied,
        bos_token_id=Fields(meta, source).integer("tokenizer.ggml.bos_token_id", None, minimum=0),
        eos_token_ids=() if eos is None else (eos,),
    )


def check_vocabulary(tokenizer, embedding, path: Path) -> None:
    """The vocabulary must have a token for every row of the embedding, and no more (llama.cpp
    refuses such a file too): otherwise the model can pick an id the tokenizer cannot spell."""
    rows = int(embedding.shape[-1])                  # ne order: (dim, vocab)
    if tokenizer is not None and tokenizer.vocab_size != rows:
        raise CheckpointError(f"{path}: the vocabulary (tokenizer.ggml.tokens) has {tokenizer.vocab_size} tokens "
                              f"but token_embd.weight has {rows} rows; they must match (the vocabulary and the "
                              f"weights come from different models?)")


def dequantize(tensor, path: Path) -> np.ndarray:
    """One tensor as a float array in (rows, cols) order (float16/32/64 kept, blocks -> float32).

    Block types go through npllama's own statement of them (npllama.quant.gguf_blocks); the few
    it does not cover (the IQ and ternary families: spec_covers) through the gguf package's
    dequantizer, bit for bit the same arithmetic where both exist.
    """
    import gguf

    from ..quant import gguf_blocks

    kind = gguf.GGMLQuantizationType(tensor.tensor_type)
    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))   # ne order -> numpy order
    if tensor.data.nbytes != int(tensor.n_bytes):
        raise CheckpointError(f"{path}: tensor {tensor.name!r} needs {int(tensor.n_bytes)} bytes but the file "
                              f"holds {tensor.data.nbytes}; the file is truncated")
    try:
        if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
                    gguf.GGMLQuantizationType.F64):
            array = np.array(tensor.data)          # a copy: do not keep the file mapped
        elif kind.name.startswith("I") and kind.name[1:].isdigit():
            raise CheckpointError(f"{path}: tensor {tensor.name!r} holds integers ({kind.name}), not weights")
        elif spec_covers(kind.name):
            array = gguf_blocks.dequantize(tensor.data, kind.name, shape)
        else:
            array = gguf.quants.dequantize(tensor.data, kind)
    except NotImplementedError:
        raise CheckpointError(f"{path}: tensor {tensor.name!r} is stored as {kind.name}, which the gguf "
                              f"package cannot dequantise; re-quantise the model to another type "
                              f"(Q8_0, Q4_K, F16, ...)") from None
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: tensor {tensor.name!r} ({kind.name}) cannot be decoded "
                              f"({type(e).__name__}: {e})") from None
    if array.shape != shape:
        raise CheckpointError(f"{path}: tensor {tensor.name!r} decodes to shape {array.shape}, "
                              f"but its header says {shape}")
    return array


def load_gguf(path: Path, progress: Callable = lambda it, **kw: it, weights: str = "float32",
              mapped: bool | None = None):
    """``path`` -> (ModelArgs, params in npllama names and half rotary layout, Tokenizer or None).

    weights: "float32" dequantizes every tensor; "gguf" keeps each matrix's blocks (keep_blocks).
    mapped: leave the matrices in the file (the reader's memory map), their blocks dequantized a
    piece at a time when used, for either weights; None: when the model's float32 form is large
    (formats/mapped.py). Mapped "float32" weights are the same numbers as in memory: the blocks
    decode through the same functions.
    """
    reader = open_gguf(path)
    meta = read_metadata(reader, path)
    tensors = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in tensors:
        raise CheckpointError(f"{path}: holds rope_freqs (llama.cpp's encoding of Llama 3.1 rope scaling), "
                              f"which npllama does not read yet; load the Hugging Face checkpoint instead")
    unknown = [n for n in tensors if npllama_name(n) is None]
    if unknown:
        raise CheckpointError(f"{path}: tensors {unknown[:5]} are not part of a Llama model npllama knows")
    if "token_embd.weight" not in tensors:
        raise CheckpointError(f"{path}: has no token_embd.weight; is it a Llama-family model?")

    tokenizer = gguf_tokenizer(meta, path)
    check_vocabulary(tokenizer, tensors["token_embd.weight"], path)
    vocab = tokenizer.vocab_size if tokenizer is not None else int(tensors["token_embd.weight"].shape[-1])
    args = build_args(args_from_metadata, path, meta, vocab_size=vocab, tied="output.weight" not in tensors,
                      source=str(path))
    # llama.cpp's Llama graph takes biases when the tensors exist; say so in the config.
    args = args.replace(attention_bias="blk.0.attn_q.bias" in tensors,
                        attention_out_bias="blk.0.attn_output.bias" in tensors,
                        mlp_bias="blk.0.ffn_gate.bias" in tensors)
    if tokenizer is not None and tokenizer.eos_ids:
        args = args.replace(eos_token_ids=tokenizer.eos_ids)
    if args.rotary_dim != args.head_dim:
        raise CheckpointError(f"{path}: rotary embeddings cover {args.rotary_dim} of {args.head_dim} channels "
                              f"per head; undoing llama.cpp's q/k permutation for partial rotary is not supported")

    use_map = choose_mapped(mapped, args)
    if weights == "gguf" or use_map:
        listed = list(reader.tensors)
        del reader, meta, tensors    # the parsed header (the vocabulary: ~150 MB of small arrays) goes first
        params = keep_blocks(listed, path, progress, mapped=use_map)
        return args, to_half_layout(params, args, str(path)), tokenizer
    params = {npllama_name(t.name): dequantize(t, path)
              for t in progress(reader.tensors, desc=f"Loading {path.name}", unit="tensor")}
    say_outside_the_spec(reader.tensors, path)
    return args, to_half_layout(params, args, str(path)), tokenizer


# ---------------------------------------------------------------------------- weights="gguf": blocks kept
def keep_blocks(tensors, path: Path, progress: Callable = lambda it, **kw: it, mapped: bool = False) -> dict[str, Any]:
    """npllama name -> weight, every matrix kept as its GGUF blocks (a QuantizedMatrix) when
    npllama.quant.gguf_blocks states its type, float32 otherwise. mapped: the blocks stay in the
    file (views of the reader's memory map), else they are read into memory of their own.

    F32 tensors (the norms; F32 matrices) stay float arrays. A matrix of a type the spec does not
    cover (the IQ and ternary families) is dequantized by the gguf package into float32, and one
    line on stderr says which types and how many tensors.
    """
    from ..quant.matrix import QuantizedMatrix

    params: dict[str, Any] = {}
    for t in progress(tensors, desc=f"Loading {path.name}", unit="tensor"):
        kind = _type_name(t)
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))             # ne order -> numpy order
        name = npllama_name(t.name)
        if len(shape) == 2 and spec_covers(kind) and (kind != "F32" or mapped):
            if t.data.nbytes != int(t.n_bytes):
                raise CheckpointError(f"{path}: tensor {t.name!r} needs {int(t.n_bytes)} bytes but the file "
                                      f"holds {t.data.nbytes}; the file is truncated")
            try:
                if mapped:
                    rows = np.asarray(t.data).reshape(-1).view(np.uint8).reshape(shape[0], -1)
                    params[name] = QuantizedMatrix.from_mapped(kind, rows)
                else:
                    params[name] = QuantizedMatrix.from_blocks(kind, _read_bytes(path, t), shape[1])
            except CheckpointError as e:
                raise CheckpointError(f"{path}: tensor {t.name!r}: {e}") from None
            if params[name].shape != shape:
                raise CheckpointError(f"{path}: tensor {t.name!r} holds {params[name].shape} weights, "
                                      f"but its header says {shape}")
        else:
            params[name] = dequantize(t, path)
    say_outside_the_spec(tensors, path)
    return params


def spec_covers(type_name: str) -> bool:
    """Whether npllama.quant.gguf_blocks states this block type (the F32 / F16 / BF16 floats, the
    Q4 / Q5 / Q8 and K-quant families); the IQ and ternary families it does not."""
    from ..quant.gguf_blocks import BLOCK_TYPES
    return type_name in BLOCK_TYPES


def say_outside_the_spec(tensors, path: Path) -> None:
    """One line on stderr naming the block types that loaded through gguf's dequantizer, if any."""
    import sys
    outside: dict[str, int] = {}
    for t in tensors:
        kind = _type_name(t)
        if len(t.shape) == 2 and not spec_covers(kind) and kind not in ("F64", "I8", "I16", "I32", "I64"):
            outside[kind] = outside.get(kind, 0) + 1
    if outside:
        listed = ", ".join(f"{k} ({n})" for k, n in sorted(outside.items()))
        print(f"{path.name}: tensors of types {listed} are not in npllama's block spec; "
              f"loaded through gguf's dequantizer into float32", file=sys.stderr)


def _read_bytes(path: Path, tensor) -> np.ndarray:
    """A tensor's bytes read from the file into memory of its own: (n_bytes,) uint8. Read, not
    copied out of the reader's memory map, so that the map's pages never count against the
    process's memory beside the copy."""
    n = int(tensor.n_bytes)
    out = np.empty(n, dtype=np.uint8)
    try:
        with open(path, "rb") as f:
            f.seek(int(tensor.data_offset))
            got = f.readinto(memoryview(out))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read tensor {tensor.name!r} ({e.strerror})") from None
    if got != n:
        raise CheckpointError(f"{path}: tensor {tensor.name!r} needs {n} bytes but the file holds {got}; "
                              f"the file is truncated")
    return out


def _type_name(tensor) -> str:
    """The GGML type name of a reader tensor ("Q4_1", "F32", "IQ4_XS", ...)."""
    import gguf
    return gguf.GGMLQuantizationType(tensor.tensor_type).name
