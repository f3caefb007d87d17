"""Weights left in their files, in Torch: the twin of npllama's mapped matrices (npllama/formats/mapped.py).

A model loaded by npllama with ``mapped=True`` (the default for a large one) keeps each matrix in
its file behind a read-only memory map. Its Torch twin keeps the same bytes where they are, as
transformers does with a safetensors file: ``MappedWeight`` holds a tensor that views the map in
the stored dtype (bfloat16, float16 or float32), nothing copied. A product converts the rows to
the twin's dtype a piece at a time (none at all when the dtypes agree, as for a bfloat16 twin of a
bfloat16 file), so a model larger than memory runs; the embedding converts only the looked-up
rows. The twin is for inference: a mapped weight is read-only and holds no gradient.

Only a matrix stored in one piece, rows in file order, can be viewed (a Hugging Face folder's
safetensors and pytorch_model.bin, a GGUF file's float tensors); a Meta checkpoint's model-parallel
slices and permuted q / k rows, and GGUF blocks, have no such view, and are made float in memory
as before (``torch_view`` says None).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from npllama.quant.matrix import MappedRows, QuantizedMatrix

# stored kind -> the torch dtype of its elements (bfloat16 read from its uint16 bit patterns)
TORCH_KINDS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# Weights converted at once by a product: 16M (64 MiB of float32; the 8B shape's LM head in 32).
WEIGHTS_PER_PIECE = 1 << 24


def torch_view(w) -> torch.Tensor | None:
    """An (out, in) tensor viewing a mapped npllama matrix's bytes in its stored dtype, or None
    when it has no single view (see the module docstring)."""
    if not (isinstance(w, QuantizedMatrix) and w.mapped and len(w.parts) == 1 and not w.transposed):
        return None
    kind, rows = w.parts[0]
    if kind not in TORCH_KINDS or not isinstance(rows, MappedRows) or rows.order is not None or len(rows.columns) != 1:
        return None
    raw = rows.columns[0]                                     # (out, bytes per row) uint8, a view of the map
    if raw.size == 0 or not raw.flags.c_contiguous:
        return None
    with warnings.catch_warnings():                           # the map is read-only; torch warns, never writes
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.from_numpy(raw.reshape(-1))
    return flat.view(TORCH_KINDS[kind]).view(w.n_out, w.n_in)


class MappedWeight(nn.Module):
    """An (out, in) weight left in its file: ``stored`` views the map in the file's dtype; products
    and lookups give ``dtype``. ``source`` is the npllama matrix it views (the float64 reference
    of the parity report computes with the same bytes)."""

    def __init__(self, stored: torch.Tensor, dtype: torch.dtype, source: QuantizedMatrix | None = None):
        super().__init__()
        self.stored, self.dtype, self.source = stored, dtype, source
        self.n_out, self.n_in = stored.shape

    @property
    def device(self) -> torch.device:
        return self.stored.device

    @property
    def shape(self) -> torch.Size:
        return self.stored.shape

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., in) -> (..., out): F.linear on the stored rows, converted to x's dtype a piece
        at a time (each output is one product over its whole row, as npllama's pieces)."""
        if self.stored.dtype == x.dtype:
            return F.linear(x, self.stored, bias)
        step = max(1, WEIGHTS_PER_PIECE // self.n_in)
        y = torch.empty((*x.shape[:-1], self.n_out), dtype=x.dtype, device=x.device)
        for first in range(0, self.n_out, step):
            rows = self.stored[first:first + step].to(x.dtype)
            y[..., first:first + len(rows)] = F.linear(x, rows)
        return y if bias is None else y + bias

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The embedding lookup: the rows of ids, (*ids.shape, in), in dtype."""
        return F.embedding(ids, self.stored).to(self.dtype)

    def extra_repr(self) -> str:
        return f"mapped {self.stored.dtype} -> {self.dtype}, {self.n_out} x {self.n_in}"


# The twin dtypes that hold every value of a stored dtype exactly (the reference then has the twin's weights).
EXACT_IN = {torch.bfloat16: (torch.bfloat16, torch.float32, torch.float64),
            torch.float16: (torch.float16, torch.float32, torch.float64),
            torch.float32: (torch.float32, torch.float64)}


def mapped_weight(w, dtype: torch.dtype, device: torch.device) -> MappedWeight | None:
    """A MappedWeight over an npllama matrix's map, for a twin on the CPU whose dtype holds the
    stored values exactly; None otherwise (no view, another device, or a narrower dtype: the
    weights are then rounded into memory as before)."""
    if torch.device(device).type != "cpu":
        return None
    stored = torch_view(w)
    if stored is None or dtype not in EXACT_IN[stored.dtype]:
        return None
    return MappedWeight(stored, dtype, w)


def mapped_params(model: nn.Module) -> dict[str, QuantizedMatrix]:
    """Checkpoint name -> the npllama matrix each MappedWeight of a twin views."""
    return {name: m.source for name, m in model.named_modules() if isinstance(m, MappedWeight)}


def has_mapped(model) -> bool:
    """Whether a twin (or anything with ``modules()``; a rank's weight view has none) maps any weight."""
    modules = getattr(model, "modules", None)
    return modules is not None and any(isinstance(m, MappedWeight) for m in modules())
