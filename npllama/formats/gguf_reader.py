"""A GGUF file's header read with every size, count and offset checked before it is used.

gguf.GGUFReader (llama.cpp's own Python reader) trusts what a file states; ``bounded_reader``
is its subclass that does not (the checks are listed in its docstring), and ``open_gguf`` opens a
file through it, turning every refusal into one CheckpointError. The reader memory-maps the file:
a tensor's ``data`` is a view of the map, read only when used.

Tested with gguf 0.19 (pyproject.toml pins the range): the subclass overrides the reader's
private methods (_get, _build_fields, _build_tensor_info, _get_tensor_info_field, _build_tensors),
whose signatures a new major version of the package may change.
"""

from __future__ import annotations

import functools
import math
import struct
import sys
from pathlib import Path

import numpy as np

from ..errors import CheckpointError
from ..io import open_regular

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
