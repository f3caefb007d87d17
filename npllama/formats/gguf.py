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

import functools
import math
import struct
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from ..config import ModelArgs
from ..errors import CheckpointError, ConfigError
from ..io import open_regular
from .fields import Fields, build_args
from .gguf_vocab import gguf_tokenizer
from .names import rename
from .permute import permute_to_half, to_half_layout


class GGUFRefused(ValueError):
    """A GGUF header field that the reader must not follow (raised by bounded_reader's reader)."""


# Metadata npllama reads; every other key is skipped without building anything for its value.
USED_KEYS = ("general.architecture", "general.alignment", "general.name", "general.file_type")
USED_PREFIXES = ("llama.", "tokenizer.")
MAX_STRINGS = 1 << 20      # entries of one string array npllama reads (vocabularies have <= 262,144)
MAX_TENSORS = 1 << 16      # a Llama of 126 layers with biases has ~1,650
MAX_NAME_BYTES = 1 << 10   # ggml's tensor names are at most 63 bytes
MAX_DIMS = 4               # GGML_MAX_DIMS
MAX_NESTING = 4            # arrays of arrays (no Llama key uses them; skipped keys may)


def is_used_key(key: str) -> bool:
    """Whether npllama reads this metadata key (the loaders, the tokenizer, the chat template)."""
    return key in USED_KEYS or key.startswith(USED_PREFIXES)


@functools.lru_cache(maxsize=None)
def bounded_reader():
    """gguf.GGUFReader with every size, count and offset checked, in exact integers, before it is used.

    The reader trusts what a file states. Here:

    * a read that would run past the end of the file raises (an array said to hold 2**60
      integers would make gguf's reader loop for ever, collecting empty views);
    * metadata npllama does not read (is_used_key) is skipped, not materialised: gguf's reader
      builds two numpy views per string, 1.5 kB each, so 5 million empty strings under an unused
      key cost 7.7 GB. Arrays npllama reads become one array (numbers) or one list (strings, at
      most MAX_STRINGS of them);
    * each tensor's type is known, its dimensions at most MAX_DIMS, its size and its data offset
      computed in Python integers (the reader adds offsets in uint64, where a hostile offset
      wraps around 2**64 back into the header) and inside the file, and no two tensors share bytes
      (5000 tensor entries aliasing one block would each be decoded: gigabytes from a 5 MB file).
    """
    import gguf
    from gguf import GGMLQuantizationType, GGUFValueType, ReaderField

    known = {int(t) for t in GGMLQuantizationType}
    fixed = {GGUFValueType.UINT8: 1, GGUFValueType.INT8: 1, GGUFValueType.UINT16: 2, GGUFValueType.INT16: 2,
             GGUFValueType.UINT32: 4, GGUFValueType.INT32: 4, GGUFValueType.FLOAT32: 4, GGUFValueType.BOOL: 1,
             GGUFValueType.UINT64: 8, GGUFValueType.INT64: 8, GGUFValueType.FLOAT64: 8}
    types = {int(t) for t in GGUFValueType}

    class StringArrayField(ReaderField):
        """An array of strings read at once: parts[-1] is an object array of the decoded strings."""
        __slots__ = ()

        def contents(self, index_or_slice=slice(None)):
            values = self.parts[-1]
            return values[index_or_slice] if isinstance(index_or_slice, int) else list(values[index_or_slice])

    class BoundedReader(gguf.GGUFReader):
        # ---------------------------------------------------------------- raw reads
        def _get(self, offset, dtype, count=1, override_order=None):
            size, offset, count = np.dtype(dtype).itemsize, int(offset), int(count)
            self._need(offset, size * count, f"{count} x {np.dtype(dtype).name}")
            return super()._get(offset, dtype, count, override_order)

        def _need(self, offset: int, nbytes: int, what: str) -> None:
            if offset < 0 or nbytes < 0 or offset + nbytes > len(self.data):
                raise GGUFRefused(f"a field at byte {offset} says it holds {what}, which runs past the end of "
                                  f"the {len(self.data)}-byte file (truncated, or a size or offset in the header "
                                  f"is wrong)")

        def _uint(self, offset: int, width: int) -> int:
            self._need(offset, width, f"1 x uint{8 * width}")
            return self._unpack(width)(self._raw(), offset)[0]

        def _raw(self) -> memoryview:
            if getattr(self, "_view", None) is None:
                self._view = memoryview(self.data)
            return self._view

        def _unpack(self, width: int):
            """struct's unpack_from for an unsigned integer of ``width`` bytes in the file's byte order."""
            little = (self.byte_order == "I") == (sys.byteorder == "little")
            return struct.Struct(("<" if little else ">") + {1: "B", 4: "I", 8: "Q"}[width]).unpack_from

        # ---------------------------------------------------------------- metadata
        def _build_fields(self, offs, count):
            for _ in range(int(count)):
                start = offs
                key_len = self._uint(offs, 8)
                if key_len > MAX_NAME_BYTES:
                    raise GGUFRefused(f"a metadata key at byte {offs} says it is {key_len} bytes long; keys are "
                                      f"short names (the file is corrupt)")
                self._need(offs + 8, key_len, f"a {key_len}-byte key")
                key = self._text(offs + 8, key_len, "a metadata key")
                offs += 8 + key_len
                kind = self._uint(offs, 4)
                if kind not in types:
                    raise GGUFRefused(f"metadata key {key!r} has value type {kind}, which GGUF does not define")
                if not is_used_key(key):
                    offs = self._skip(offs + 4, kind, key, depth=0)
                    continue
                if key in self.fields:
                    raise GGUFRefused(f"metadata key {key!r} appears twice")
                key_parts = [self._get(start, np.uint64), self._get(start + 8, np.uint8, key_len),
                             self._get(offs, np.uint32)]
                if kind == GGUFValueType.ARRAY:
                    end, field = self._array_field(start, key, offs + 4, key_parts)
                else:
                    size, parts, idxs, ftypes = self._get_field_parts(offs + 4, kind)
                    field = ReaderField(start, key, key_parts + parts, [i + 3 for i in idxs], ftypes)
                    end = offs + 4 + size
                self.fields[key] = field
                offs = end
            return offs

        def _text(self, offset: int, length: int, what: str) -> str:
            try:
                return self.data[offset:offset + length].tobytes().decode("utf-8")
            except UnicodeDecodeError as e:
                raise GGUFRefused(f"{what} at byte {offset} is not UTF-8 text ({e.reason})") from None

        def _array_field(self, start, key, offs, key_parts):
            """A used array: numbers as one view, strings as one list; nested arrays refused."""
            item = self._uint(offs, 4)
            count = self._uint(offs + 4, 8)
            head = key_parts + [self._get(offs, np.uint32), self._get(offs + 4, np.uint64)]
            offs += 12
            if item in fixed:
                nptype = self.gguf_scalar_to_np[GGUFValueType(item)]
                values = self._get(offs, nptype, count) if count else np.zeros(0, nptype)
                field = ReaderField(start, key, [*head, values], [len(head)], [GGUFValueType.ARRAY, GGUFValueType(item)])
                return offs + fixed[item] * count, field
            if item != GGUFValueType.STRING:
                what = GGUFValueType(item).name if item in types else f"value type {item}"
                raise GGUFRefused(f"metadata key {key!r} holds an array of {what}, which no key npllama reads does")
            if count > MAX_STRINGS:
                raise GGUFRefused(f"metadata key {key!r} says it holds {count} strings; npllama reads at most "
                                  f"{MAX_STRINGS} (the largest vocabularies have ~262,000 tokens)")
            self._need(offs, 8 * count, f"{count} strings")
            strings = np.empty(count, dtype=object)
            raw, end, unpack = self._raw(), len(self.data), self._unpack(8)
            for i in range(count):
                if offs + 8 > end:
                    self._need(offs, 8, "1 x uint64")
                (length,) = unpack(raw, offs)
                self._need(offs + 8, length, f"a {length}-byte string")
                try:
                    strings[i] = str(raw[offs + 8:offs + 8 + length], "utf-8")
                except UnicodeDecodeError as e:
                    raise GGUFRefused(f"string {i} of metadata key {key!r} is not UTF-8 text ({e.reason})") from None
                offs += 8 + length
            return offs, StringArrayField(start, key, [*head, strings], [len(head)],
                                          [GGUFValueType.ARRAY, GGUFValueType.STRING])

        def _skip(self, offs: int, kind: int, key: str, depth: int) -> int:
            """The offset after a value of type ``kind`` at offs, found without building anything."""
            if kind in fixed:
                self._need(offs, fixed[kind], f"1 x {GGUFValueType(kind).name}")
                return offs + fixed[kind]
            if kind == GGUFValueType.STRING:
                length = self._uint(offs, 8)
                self._need(offs + 8, length, f"a {length}-byte string")
                return offs + 8 + length
            if kind != GGUFValueType.ARRAY:
                raise GGUFRefused(f"metadata key {key!r} has value type {kind}, which GGUF does not define")
            if depth >= MAX_NESTING:
                raise GGUFRefused(f"metadata key {key!r} nests arrays more than {MAX_NESTING} deep")
            item, count = self._uint(offs, 4), self._uint(offs + 4, 8)
            offs += 12
            if item in fixed:
                self._need(offs, fixed[item] * count, f"{count} x {GGUFValueType(item).name}")
                return offs + fixed[item] * count
            if item not in types:
                raise GGUFRefused(f"metadata key {key!r} holds an array of value type {item}, which GGUF does "
                                  f"not define")
            self._need(offs, 8 * count, f"{count} values")   # every string or array takes at least 8 bytes
            if item == GGUFValueType.STRING:
                raw, end, unpack = self._raw(), len(self.data), self._unpack(8)
                for _ in range(count):
                    if offs + 8 > end:
                        self._need(offs, 8, "1 x uint64")
                    (length,) = unpack(raw, offs)
                    offs += 8 + length
                    if offs > end:
                        self._need(offs - length, length, f"a {length}-byte string")
                return offs
            for _ in range(count):
                offs = self._skip(offs, item, key, depth + 1)
            return offs

        # ---------------------------------------------------------------- tensors
        def _build_tensor_info(self, offs, count):
            if int(count) > MAX_TENSORS:
                raise GGUFRefused(f"the header says it holds {int(count)} tensors; a Llama model has at most a few "
                                  f"thousand (npllama reads up to {MAX_TENSORS})")
            return super()._build_tensor_info(offs, count)

        def _get_tensor_info_field(self, orig_offs):
            name_len = self._uint(orig_offs, 8)
            if name_len > MAX_NAME_BYTES:
                raise GGUFRefused(f"a tensor name at byte {orig_offs} says it is {name_len} bytes long; tensor "
                                  f"names are short (the file is corrupt)")
            n_dims = self._uint(orig_offs + 8 + name_len, 4)
            if not 1 <= n_dims <= MAX_DIMS:
                name = self._text(orig_offs + 8, name_len, "a tensor name")
                raise GGUFRefused(f"tensor {name!r} has {n_dims} dimensions; GGUF tensors have 1 to {MAX_DIMS}")
            self._text(orig_offs + 8, name_len, "a tensor name")
            return super()._get_tensor_info_field(orig_offs)

        def _build_tensors(self, start_offs, fields):
            extents = []
            for field in fields:
                name = bytes(field.parts[1]).decode("utf-8", "replace")
                kind = int(field.parts[4][0])
                if kind not in known:
                    raise GGUFRefused(f"tensor {name!r} has quantisation type {kind}, which the installed gguf "
                                      f"package does not define; the file is corrupt, or newer than the package "
                                      f"(pip install -U gguf)")
                dims = [int(d) for d in field.parts[3]]
                block, type_size = gguf.GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
                if dims and dims[0] % block:
                    raise GGUFRefused(f"tensor {name!r}: rows of {dims[0]} values do not fill whole "
                                      f"{GGMLQuantizationType(kind).name} blocks of {block}")
                n_bytes = math.prod(dims) // block * type_size          # exact: no uint64 to wrap around
                begin = int(start_offs) + int(field.parts[5][0])
                if begin + n_bytes > len(self.data):
                    raise GGUFRefused(f"a field at byte {begin} says it holds {n_bytes} bytes of tensor {name!r} "
                                      f"({GGMLQuantizationType(kind).name}, shape {dims}), which runs past the end "
                                      f"of the {len(self.data)}-byte file (truncated, or a size or offset in the "
                                      f"header is wrong)")
                if n_bytes:
                    extents.append((begin, begin + n_bytes, name))
            extents.sort()
            for (b0, e0, n0), (b1, e1, n1) in zip(extents, extents[1:]):
                if b1 < e0:
                    raise GGUFRefused(f"tensors {n0!r} (bytes {b0}..{e0}) and {n1!r} (bytes {b1}..{e1}) share "
                                      f"data; GGUF tensors never overlap, refusing the file")
            return super()._build_tensors(start_offs, fields)

    return BoundedReader


def open_gguf(path: Path):
    """A gguf.GGUFReader over ``path``, or CheckpointError saying why the file is not one."""
    with open_regular(path) as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        return bounded_reader()(path, "r")
    except GGUFRefused as e:
        raise CheckpointError(f"{path}: {e}") from None
    except Exception as e:   # the reader raises ValueError, IndexError, struct/numpy errors on bad files
        raise CheckpointError(f"{path}: corrupt or truncated GGUF file ({type(e).__name__}: {e})") from None


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


def load_gguf(path: Path, progress: Callable = lambda it, **kw: it, weights: str = "float32"):
    """``path`` -> (ModelArgs, params in npllama names and half rotary layout, Tokenizer or None).

    weights: "float32" dequantizes every tensor; "gguf" keeps each matrix's blocks (keep_blocks).
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

    if weights == "gguf":
        listed = list(reader.tensors)
        del reader, meta, tensors    # the parsed header (the vocabulary: ~150 MB of small arrays) goes first
        params = keep_blocks(listed, path, progress)
        return args, blocks_to_half_layout(params, args, str(path)), tokenizer
    params = {npllama_name(t.name): dequantize(t, path)
              for t in progress(reader.tensors, desc=f"Loading {path.name}", unit="tensor")}
    say_outside_the_spec(reader.tensors, path)
    return args, to_half_layout(params, args, str(path)), tokenizer


# ---------------------------------------------------------------------------- weights="gguf": blocks kept
def keep_blocks(tensors, path: Path, progress: Callable = lambda it, **kw: it) -> dict[str, Any]:
    """npllama name -> weight, every matrix kept as its GGUF blocks (a QuantizedMatrix) when
    npllama.quant.gguf_blocks states its type, float32 otherwise.

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
        if len(shape) == 2 and spec_covers(kind) and kind != "F32":
            if t.data.nbytes != int(t.n_bytes):
                raise CheckpointError(f"{path}: tensor {t.name!r} needs {int(t.n_bytes)} bytes but the file "
                                      f"holds {t.data.nbytes}; the file is truncated")
            try:
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


def blocks_to_half_layout(params: Mapping[str, Any], args: ModelArgs, source: str) -> dict[str, Any]:
    """to_half_layout for a checkpoint whose matrices may be QuantizedMatrix: the rows of wq / wk
    move whole (each row is its own blocks), by the permutation permute_to_half applies."""
    from ..quant.matrix import QuantizedMatrix

    heads = {"attention.wq": args.n_heads, "attention.wk": args.n_kv_heads}
    out = to_half_layout({n: w for n, w in params.items() if not isinstance(w, QuantizedMatrix)}, args, source)
    for name, w in params.items():
        if isinstance(w, QuantizedMatrix):
            module = name.rpartition(".")[0].split(".", 2)[-1]
            if module in heads:
                order = permute_to_half(np.arange(w.shape[0]), heads[module], f"{source}: {name}")
                w = w.take_rows(order)
            out[name] = w
    return {name: out[name] for name in params}
