"""Weights left where the file holds them: memory maps of the stored tensors, and where a model lives.

Where a model's weights live is decided once, from its config, before any tensor is read
(``choose_mapped``):

* in memory (``mapped=False``): every tensor is read and widened as it always was (bfloat16 ->
  float32; float32 and float16 kept);
* mapped (``mapped=True``): the loader reads only the files' headers and views every tensor in
  place through a read-only memory map (``view``, ``Stored``: the tensor's element bytes, not a
  copy); each matrix stays in the file as a QuantizedMatrix of mapped rows
  (npllama.quant.matrix.MappedRows), made float a piece at a time when it is used, and only the
  vectors (the norms, the biases) are read into memory (``as_mapped_weight``, ``place``);
* ``mapped=None`` (the default): in memory when the model's float32 form is under MAPPED_ABOVE
  bytes, mapped from there on. The default model (SmolLM2-135M, 540 MB as float32) stays in
  memory and keeps its speed; the Llama-3.2-1B shape (4.9 GB as float32) is mapped.

What can be mapped: safetensors tensors (F32, F16, BF16) at their header offsets, the members of
a torch.save zip that are stored uncompressed (torch.save stores them so) at their data offset,
and GGUF tensors (gguf's reader maps the file itself). A compressed zip member, a float64 tensor
and a tensor whose rows are not contiguous in the file are read into memory.

Safety. Every offset and size is checked against the file's size when it is opened, so that no
mapped read runs past the end (which kills the process with SIGBUS instead of raising).
A mapped file must not change while a model uses it: if it is replaced by a new file (a rename,
as a download or ``npllama convert`` does), the running model keeps reading the old one, which
the operating system keeps until the map is closed; if it is truncated or rewritten in place, the
model reads the new bytes, and a read past a truncated end kills the process (SIGBUS). Load the
model again after changing its files.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from ..errors import CheckpointError
from ..io import open_regular
from ..quant.gguf_blocks import bf16_to_float32
from ..quant.matrix import FLOAT_STORAGE, QuantizedMatrix   # FLOAT_STORAGE: the stored types that can stay mapped

# The float32 form of a model from which mapped=None maps it (bytes): 1 GiB.
MAPPED_ABOVE = 1 << 30


@dataclass(frozen=True)
class Stored:
    """A tensor as its file stores it, viewed in place: kind "F32" | "F16" | "BF16", and array, a
    read-only view of the file's map in the raw element dtype (FLOAT_STORAGE), of the tensor's shape."""
    kind: str
    array: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return self.array.shape

    @property
    def size(self) -> int:
        return self.array.size


def map_file(path: Path) -> np.ndarray:
    """The whole file as a read-only uint8 array backed by a memory map (nothing is read yet).

    An empty file gives an empty array (a map of zero bytes is not possible)."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return np.zeros(0, np.uint8)
        try:
            region = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot be memory-mapped ({e}); load it with mapped=False") from None
    return np.frombuffer(region, dtype=np.uint8)


def view(region: np.ndarray, offset: int, kind: str, shape: tuple[int, ...], where: str) -> Stored:
    """The tensor of ``shape`` and ``kind`` whose bytes start at ``offset`` of a mapped file, checked
    to lie inside it (a mapped read past the end is SIGBUS, not an exception)."""
    dtype = FLOAT_STORAGE[kind]
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    end = offset + n * dtype.itemsize
    if offset < 0 or end > region.size:
        raise CheckpointError(f"{where}: its {n * dtype.itemsize} bytes at offset {offset} run past the end of "
                              f"the {region.size}-byte file (truncated?)")
    array = region[offset:end].view(dtype).reshape(shape)
    return Stored(kind, array)


def read_into_memory(stored: Stored) -> np.ndarray:
    """The tensor read out of the map into an array of its own: bfloat16 widened to float32
    (exactly), float32 and float16 kept as they are."""
    if stored.kind == "BF16":
        return bf16_to_float32(stored.array)
    return np.array(stored.array)


def float32_bytes(args) -> int:
    """Bytes of a model's float32 form: 4 per weight of its config (the figure mapped=None compares)."""
    from ..memory import weight_count
    return 4 * weight_count(args)


def choose_mapped(mapped: bool | None, args) -> bool:
    """mapped as asked; for None, whether the model's float32 form reaches MAPPED_ABOVE. Reading
    into memory weights whose float32 form would not fit is refused before any is read."""
    use_map = float32_bytes(args) >= MAPPED_ABOVE if mapped is None else bool(mapped)
    if not use_map:
        from ..memory import check_fits
        check_fits(float32_bytes(args), "reading the weights into memory", "leave them in their files: --mapped "
                                                                           "(npllama.load(..., mapped=True))")
    return use_map


def as_mapped_weight(stored: Stored) -> Any:
    """A stored tensor as the model holds it mapped: a matrix stays in the file (QuantizedMatrix of
    mapped rows), a vector (norm, bias) is read into memory."""
    if stored.array.ndim == 2 and stored.array.strides[1] == stored.array.itemsize:
        return QuantizedMatrix.from_mapped(stored.kind, stored.array)
    return read_into_memory(stored)


def place(tensors: Mapping[str, Any], mapped: bool, progress: Callable = lambda it, **kw: it,
          desc: str = "Loading") -> dict[str, Any]:
    """Every Stored tensor where the model keeps it (see the module docstring); arrays already in
    memory (compressed members, float64 tensors) pass through."""
    out: dict[str, Any] = {}
    for name in progress(list(tensors), desc=desc, unit="tensor"):
        t = tensors[name]
        if isinstance(t, Stored):
            t = as_mapped_weight(t) if mapped else read_into_memory(t)
        out[name] = t
    return out


# ---------------------------------------------------------------------------- progress of long passes
def mapped_bytes(model) -> int:
    """Bytes of mapped weights one forward pass of the model reads (every mapped matrix once); 0 for
    a model that is not npllama's (the Torch backend's shows no bar here)."""
    from ..model import Transformer
    if not isinstance(model, Transformer):
        return 0
    seen, total = set(), 0
    for layer in getattr(model, "layers", []):
        for w in (layer.wq, layer.wk, layer.wv, layer.wo, layer.w1, layer.w2, layer.w3):
            if isinstance(w, QuantizedMatrix) and w.mapped and id(w) not in seen:
                seen.add(id(w))
                total += w.nbytes
    head = getattr(model, "output", None)
    if isinstance(head, QuantizedMatrix) and head.mapped:
        total += head.nbytes
    return total


@contextlib.contextmanager
def reading_progress(model, desc: str = "forward pass", enabled: bool = True) -> Iterator[Callable[[], None]]:
    """A progress bar on stderr over the mapped weights a long pass reads, while the block runs:
    one forward pass (every mapped matrix once) fills it, and the next pass starts it again.
    Nothing is shown for a model held in memory, or when not enabled. Yields ``close``, to end
    the bar before the block does (generate closes it when the first token arrives)."""
    total = mapped_bytes(model) if enabled else 0
    if total == 0:
        yield lambda: None
        return
    from tqdm.auto import tqdm

    from ..quant import matrix

    bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
               leave=False, dynamic_ncols=True)

    def advance(n: int) -> None:
        if bar.n + n > total:          # a new pass
            bar.reset()
        bar.update(n)

    def close() -> None:
        if advance in matrix.READ_HOOKS:
            matrix.READ_HOOKS.remove(advance)
            bar.close()

    matrix.READ_HOOKS.append(advance)
    try:
        yield close
    finally:
        close()


def say_if_not_cached(model, source) -> None:
    """One line on stderr when a mapped model's weights are more than the memory the page cache can
    take (MemAvailable, the cgroup's limit): then every forward pass reads the part that does not
    fit from the disk again, at the disk's speed (docs/sizes.md)."""
    from ..memory import available_bytes, gib
    need, available = mapped_bytes(model), available_bytes()
    if need and available is not None and need > available:
        print(f"npllama: {source}: {gib(need)} of weights stay in their files and {gib(available)} of memory is "
              f"available to cache them: each forward pass reads the rest from the disk again (docs/sizes.md)",
              file=sys.stderr)
