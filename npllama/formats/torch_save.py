"""torch.save files read without torch, and without running any code from the file.

Meta's consolidated.NN.pth and transformers' pytorch_model.bin are ``torch.save`` archives. A
torch.save archive is a zip file:

    <archive>/data.pkl       a pickle of the state dict; each tensor is a call
                             torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)
                             and each storage a persistent id ('storage', torch.BFloat16Storage, key,
                             device, numel) naming the raw bytes in
    <archive>/data/<key>     little-endian element bytes (<archive>/byteorder says "little")

Unpickling normally imports and calls whatever globals the pickle names, which is how a hostile
checkpoint runs code. :class:`RestrictedUnpickler` resolves only the handful of globals a weight
file needs, to harmless numpy stand-ins, and refuses everything else with CheckpointError.

Mapped reading (``read_torch_zip(path, mapped=True)``). torch.save stores its members
uncompressed, each at a fixed offset of the file, so a storage's bytes can be viewed in place
through a memory map instead of read: a float tensor (float32, float16, bfloat16) whose rows are
contiguous comes back as a ``Stored`` view (formats/mapped.py), nothing of it read. A compressed
member is read into memory as before. The whole member must lie inside the file, checked when it
is opened.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import pickletools
import re
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from ..checks import is_int
from ..errors import CheckpointError
from ..io import open_regular
from ..quant.gguf_blocks import bf16_to_float32
from .mapped import Stored, map_file


class _Frozen:
    """A stand-in the pickle may call but never change: no attribute can be set, no state built.

    A pickle's BUILD opcode sets state on whatever object is on its stack, including the objects
    find_class hands out. Every stand-in refuses it (and each load gets fresh ones, see
    RestrictedUnpickler), so a refused file cannot leave a changed stand-in for the next load.
    """
    __slots__ = ()

    def __setattr__(self, name: str, value: Any) -> None:
        raise CheckpointError(f"the pickle tries to set {name!r} on {self!r}; a weight file never does, refusing it")

    def __setstate__(self, state: Any) -> None:
        raise CheckpointError(f"the pickle tries to set the state of {self!r}; a weight file never does, refusing it")

    def __reduce__(self):
        raise TypeError(f"{self!r} is npllama's stand-in for a torch global and cannot be pickled")


class _StorageType(_Frozen):
    """Stands in for torch.FloatStorage & co: only says which dtype the raw bytes hold."""
    __slots__ = ("name", "dtype")

    def __init__(self, name: str, dtype: str):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "dtype", np.dtype(dtype))

    def __call__(self, *args, **kwargs):
        raise CheckpointError(f"the checkpoint tries to construct torch.{self.name} directly; refused")

    def __repr__(self) -> str:
        return f"torch.{self.name}"


_STORAGE_DTYPES = {
    "DoubleStorage": "<f8", "FloatStorage": "<f4", "HalfStorage": "<f2", "BFloat16Storage": "<u2",
    "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1",
    "ByteStorage": "u1", "BoolStorage": "?"}


# Storage types whose tensors can stay mapped, as formats/mapped.py names their kinds.
_MAPPED_KINDS = {"FloatStorage": "F32", "HalfStorage": "F16", "BFloat16Storage": "BF16"}


class _Storage(_Frozen):
    """The bytes of one storage, as a flat array of its element type (in memory, or a view of the
    file's map when ``mapped``), the tensors already rebuilt from it (by view) and how many elements
    they hold together (see _TensorRebuilder)."""
    __slots__ = ("kind", "array", "key", "views", "copied", "mapped")

    def __init__(self, kind: _StorageType, array: np.ndarray, key: str, mapped: bool = False):
        for name, value in (("kind", kind), ("array", array), ("key", key), ("views", {}), ("copied", [0]),
                            ("mapped", mapped)):
            object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        return f"storage {self.key!r}"


class _TensorRebuilder(_Frozen):
    """torch._utils._rebuild_tensor_v2: a strided view of a storage, copied to a fresh numpy array;
    from a mapped storage, a float tensor with contiguous rows is the view itself (a Stored).

    Memory stays bounded by the file: two tensors that are the same view of a storage are one
    array (a tied LM head is stored that way), and the tensors rebuilt from one storage may hold
    at most MAX_STORAGE_REUSE times its elements together (views of a shared tensor, as torch.save
    writes them, stay far below; 3000 tensors viewing one storage, gigabytes from a 4 MB file, are
    refused).
    """
    __slots__ = ("source",)

    def __init__(self, source: str):
        object.__setattr__(self, "source", source)

    def __repr__(self) -> str:
        return "torch._utils._rebuild_tensor_v2"

    def __call__(self, storage: Any, storage_offset: Any, size: Any, stride: Any, *rest: Any) -> np.ndarray | Stored:
        if not isinstance(storage, _Storage):
            raise CheckpointError("a tensor's storage is not a storage record")
        if (not is_int(storage_offset) or not isinstance(size, tuple) or not isinstance(stride, tuple)
                or len(size) != len(stride) or storage_offset < 0
                or not all(is_int(v) and v >= 0 for v in (*size, *stride))):
            raise CheckpointError(f"a tensor has an invalid layout (offset {storage_offset!r:.40}, size {size!r:.80}, "
                                  f"stride {stride!r:.80})")
        flat = storage.array
        key = (storage_offset, size, stride)
        if key in storage.views:
            return storage.views[key]
        if math.prod(size) > flat.size:   # weights never repeat elements
            raise CheckpointError(f"a tensor of size {size} has more elements than its storage ({flat.size})")
        if 0 in size:
            out = np.zeros(size, dtype=flat.dtype)
        else:
            last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
            if last >= flat.size:
                raise CheckpointError(f"a tensor of size {size} (offset {storage_offset}, stride {stride}) reads "
                                      f"past the end of its storage of {flat.size} elements (truncated file?)")
            self._claim(storage, math.prod(size))
            view = np.lib.stride_tricks.as_strided(flat[storage_offset:], shape=size,
                                                   strides=tuple(s * flat.itemsize for s in stride), writeable=False)
            kind = _MAPPED_KINDS.get(storage.kind.name)
            if storage.mapped and kind is not None and (len(size) < 2 or stride[-1] == 1 or size[-1] == 1):
                storage.views[key] = Stored(kind, view)      # left in the file: nothing read
                return storage.views[key]
            out = np.array(view)
        out = bf16_to_float32(out) if storage.kind.name == "BFloat16Storage" else out
        storage.views[key] = out
        return out

    @staticmethod
    def _claim(storage: _Storage, elements: int) -> None:
        """Count a new tensor's elements against its storage's budget."""
        storage.copied[0] += elements
        if storage.copied[0] > MAX_STORAGE_REUSE * storage.array.size:
            raise CheckpointError(f"the tensors viewing {storage!r} hold {storage.copied[0]} elements of its "
                                  f"{storage.array.size}: more than {MAX_STORAGE_REUSE} times over, where a weight "
                                  f"file stores each weight once; refusing it")


class _ParameterRebuilder(_Frozen):
    """torch._utils._rebuild_parameter: an nn.Parameter is its data."""
    __slots__ = ()

    def __repr__(self) -> str:
        return "torch._utils._rebuild_parameter"

    def __call__(self, data: Any, requires_grad: Any = False, backward_hooks: Any = None, *rest: Any):
        if not isinstance(data, (np.ndarray, Stored)):
            raise CheckpointError("a parameter does not wrap a tensor")
        return data


def _ordered_dict(*args: Any, **kwargs: Any) -> collections.OrderedDict:
    """collections.OrderedDict, called; the class itself is never handed to the pickle."""
    return collections.OrderedDict(*args, **kwargs)


class _OrderedDictType(_Frozen):
    __slots__ = ()

    def __repr__(self) -> str:
        return "collections.OrderedDict"

    def __call__(self, *args: Any, **kwargs: Any) -> collections.OrderedDict:
        return _ordered_dict(*args, **kwargs)


def allowed_globals(source: str) -> dict[tuple[str, str], Any]:
    """The globals a weight file may name, as fresh stand-ins (one set per load)."""
    return {
        ("torch._utils", "_rebuild_tensor_v2"): _TensorRebuilder(source),
        ("torch._utils", "_rebuild_parameter"): _ParameterRebuilder(),
        ("collections", "OrderedDict"): _OrderedDictType(),
        **{("torch", name): _StorageType(name, dtype) for name, dtype in _STORAGE_DTYPES.items()},
    }


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles a torch state dict, resolving only the globals of :func:`allowed_globals`.

    Each unpickler gets its own stand-ins, none of which accepts an attribute or a BUILD, so
    nothing a pickle does reaches the next load.
    """

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, source: str, region: np.ndarray | None = None):
        super().__init__(file)
        self.archive, self.prefix, self.source = archive, prefix, source
        self.region = region      # the whole file, memory-mapped: stored members are viewed in it
        self.storages: dict[str, _Storage] = {}
        self.globals = allowed_globals(source)

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.globals[(module, name)]
        except (KeyError, TypeError):
            raise CheckpointError(f"{self.source}: the pickle asks for the global {module}.{name}, which a "
                                  f"weight file never needs; refusing to load it (it could run code)") from None

    def persistent_load(self, pid: Any) -> _Storage:
        if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage"
                or not isinstance(pid[1], _StorageType) or not isinstance(pid[2], str)
                or not is_int(pid[4]) or pid[4] < 0):
            raise CheckpointError(f"{self.source}: unexpected persistent id {pid!r:.80} in the pickle")
        _, kind, key, _device, numel = pid
        if key not in self.storages:
            member = f"{self.prefix}data/{key}"
            need = numel * kind.dtype.itemsize
            try:
                info = self.archive.getinfo(member)
            except KeyError:
                raise CheckpointError(f"{self.source}: storage {member!r} is missing from the archive") from None
            if need > info.file_size:
                raise CheckpointError(f"{self.source}: storage {member!r} has {info.file_size} bytes, needs {need}")
            if self.region is not None and info.compress_type == zipfile.ZIP_STORED:
                start = member_offset(self.region, info, self.source)
                flat = self.region[start:start + need].view(kind.dtype)
                self.storages[key] = _Storage(kind, flat, key, mapped=True)
                return self.storages[key]
            try:
                raw = read_member(self.archive, member, self.source, limit=need)
            except CheckpointError:
                raise
            except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
                raise CheckpointError(f"{self.source}: storage {member!r} cannot be read ({e})") from None
            if len(raw) < need:
                raise CheckpointError(f"{self.source}: storage {member!r} has {len(raw)} bytes, needs {need}")
            self.storages[key] = _Storage(kind, np.frombuffer(raw, dtype=kind.dtype, count=numel), key)
        return self.storages[key]


MAX_INFLATION = 16   # weights barely compress; torch.save stores its members uncompressed
MAX_STORAGE_REUSE = 2   # elements of all tensors rebuilt from one storage, in multiples of its own
MAX_PICKLE_BYTES = 16 << 20   # a state dict pickles in ~200 bytes per tensor: this is 80,000 tensors


def read_member(archive: zipfile.ZipFile, name: str, source: str, limit: int | None = None) -> bytes:
    """The bytes of one archive member (at most ``limit``), refusing a zip bomb before inflating it.

    A compressed member that would inflate to more than MAX_INFLATION times its stored size
    (plus 1 MiB) is refused, so memory stays bounded by the file. KeyError when absent.
    """
    info = archive.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED and info.file_size > MAX_INFLATION * info.compress_size + (1 << 20):
        raise CheckpointError(f"{source}: archive member {name!r} would inflate from {info.compress_size} to "
                              f"{info.file_size} bytes, far more than weights ever compress (a zip bomb?); "
                              f"refusing it. Re-save the checkpoint with torch.save")
    with archive.open(info) as f:
        return f.read(-1 if limit is None else limit)


_MEMO_OPS = {"PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"}


def _opcode_table() -> list:
    """opcode byte -> (argument width, or pickletools' negative code for a variable one; opcode name;
    argument name; whether the argument is a memo index)."""
    table: list = [None] * 256
    for op in pickletools.opcodes:
        arg = op.arg
        table[op.code.encode("latin-1")[0]] = (0 if arg is None else arg.n, op.name, "" if arg is None else arg.name,
                                               op.name in _MEMO_OPS)
    return table


_OPCODES = _opcode_table()
# The whole length of each opcode whose argument has a fixed width and is not a memo index (the
# walk's fast path); 0 for the others.
_FIXED = [0 if e is None or e[0] < 0 or e[3] or e[1] == "STOP" else e[0] + 1 for e in _OPCODES]
_LENGTH_BYTES = {pickletools.TAKEN_FROM_ARGUMENT1: (1, False), pickletools.TAKEN_FROM_ARGUMENT4: (4, True),
                 pickletools.TAKEN_FROM_ARGUMENT4U: (4, False), pickletools.TAKEN_FROM_ARGUMENT8U: (8, False)}


def check_memo(raw: bytes, source: str) -> None:
    """Walk the opcodes of a pickle once, in constant memory, refusing hostile memo indices.

    CPython's unpickler grows its memo table to twice the largest index a PUT names, so nine
    bytes saying LONG_BINPUT 2**27 make it allocate and zero a gigabyte. A real pickle numbers
    its memo entries 0, 1, 2, ... as it goes: every index is below the number of opcodes read so
    far. The walk streams (nothing per opcode is kept) and the pickle is at most
    MAX_PICKLE_BYTES, so a file of no-op opcodes costs a second or two, not gigabytes.
    """
    def corrupt(why: str) -> CheckpointError:
        return CheckpointError(f"{source}: the pickled state dict is corrupt ({why})")

    fixed, n, pos, ops = _FIXED, len(raw), 0, 0
    while pos < n:
        step = fixed[raw[pos]]
        if step:                                   # the common case: skip the opcode and its argument
            pos += step
            ops += 1
            continue
        start = pos
        entry = _OPCODES[raw[pos]]
        pos += 1
        ops += 1
        if entry is None:
            raise corrupt(f"ValueError: unknown opcode {raw[start]:#04x} at byte {start}")
        width, name, arg, memo = entry
        value = None
        if width >= 0:
            if pos + width > n:
                raise corrupt(f"ValueError: not enough data in stream to read {arg or name}")
            if memo:
                value = int.from_bytes(raw[pos:pos + width], "little")
            pos += width
        elif width == pickletools.UP_TO_NEWLINE:
            for _ in range(2 if arg == "stringnl_noescape_pair" else 1):
                end = raw.find(b"\n", pos)
                if end < 0:
                    raise corrupt(f"ValueError: no newline found when trying to read {arg}")
                if memo:
                    try:
                        value = int(raw[pos:end])
                    except ValueError:
                        raise corrupt(f"ValueError: memo index {raw[pos:end][:20]!r} at byte {start} is not "
                                      f"an integer") from None
                pos = end + 1
        else:
            size, signed = _LENGTH_BYTES[width]
            if pos + size > n:
                raise corrupt(f"ValueError: not enough data in stream to read {arg}")
            length = int.from_bytes(raw[pos:pos + size], "little", signed=signed)
            pos += size
            if length < 0 or pos + length > n:
                raise corrupt(f"ValueError: {name} at byte {start} says {length} bytes follow; the pickle has "
                              f"{n - pos}")
            pos += length
        if value is not None and not 0 <= value <= ops:
            raise CheckpointError(f"{source}: the pickle names memo slot {value!r} at byte {start}, beyond the "
                                  f"{ops} opcodes read so far; the file is corrupt or hostile, refusing it")
        if name == "STOP":
            return
    raise corrupt("EOFError: the pickle ends without a STOP opcode")


def member_offset(region: np.ndarray, info: zipfile.ZipInfo, source: str) -> int:
    """Where an uncompressed member's bytes begin in the file: after its local header (30 bytes,
    the name and an extra field whose lengths the local header gives; torch.save pads the extra
    field so that data starts on a 64-byte boundary). The member must end inside the file."""
    at = info.header_offset
    head = bytes(region[at:at + 30])
    if len(head) < 30 or head[:4] != b"PK\x03\x04":
        raise CheckpointError(f"{source}: archive member {info.filename!r} has no local header at byte {at}; "
                              f"the zip is corrupt")
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    start = at + 30 + name_len + extra_len
    if start + info.file_size > region.size:
        raise CheckpointError(f"{source}: archive member {info.filename!r} ({info.file_size} bytes at byte {start}) "
                              f"runs past the end of the {region.size}-byte file (truncated?)")
    return start


def read_torch_zip(path: Path, mapped: bool = False) -> dict[str, np.ndarray | Stored]:
    """A torch.save'd state dict {name: tensor} as {name: numpy array}, without torch.

    mapped: float tensors of uncompressed members come back as Stored views of the file's memory
    map (nothing read); everything else is read into memory as arrays."""
    try:
        with open_regular(path):
            pass
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise CheckpointError(f"{path}: not a zip archive; npllama reads torch.save files written by "
                              f"torch >= 1.6 (re-save it with torch.save, or convert to safetensors)") from None
    except CheckpointError:
        raise
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    except Exception as e:   # zipfile trips over some corrupt headers with ValueError, UnicodeDecodeError ...
        raise CheckpointError(f"{path}: corrupt zip archive ({type(e).__name__}: {e}); re-save it with "
                              f"torch.save") from None
    with archive:
        pickles = [n for n in archive.namelist() if re.fullmatch(r"[^/]+/data\.pkl", n)]
        if len(pickles) != 1:
            raise CheckpointError(f"{path}: expected one <archive>/data.pkl in the zip, found {len(pickles)}")
        prefix = pickles[0][: -len("data.pkl")]
        try:
            if prefix + "byteorder" in archive.namelist():
                order = read_member(archive, prefix + "byteorder", str(path), limit=16)
                order = order.decode("ascii", "replace").strip()
                if order != "little":
                    raise CheckpointError(f"{path}: byte order {order!r}; npllama reads little-endian files only")
            size = archive.getinfo(pickles[0]).file_size
            if size > MAX_PICKLE_BYTES:
                raise CheckpointError(f"{path}: the pickled state dict is {size} bytes, more than the "
                                      f"{MAX_PICKLE_BYTES} any state dict needs (about 200 bytes per tensor); "
                                      f"the file is corrupt or hostile, refusing it")
            raw = read_member(archive, pickles[0], str(path), limit=MAX_PICKLE_BYTES)
            check_memo(raw, str(path))
            region = map_file(path) if mapped else None
            state = RestrictedUnpickler(io.BytesIO(raw), archive, prefix, str(path), region).load()
        except CheckpointError as e:
            if str(path) in str(e):
                raise
            raise CheckpointError(f"{path}: {e}") from None
        except Exception as e:   # pickle.UnpicklingError, EOFError, struct.error, zipfile errors ...
            raise CheckpointError(f"{path}: the pickled state dict is corrupt ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, (np.ndarray, Stored))
                                              for k, v in state.items()):
        raise CheckpointError(f"{path}: does not hold a state dict of named tensors")
    return dict(state)


