"""Quantized weights in the Torch backend: the weight-only int8 and int4 kernels, the twin of npllama.quant.

    model = parity.load(path, weights="int8" | "int4" | "gguf")     # parity/__init__.py
    y = linear(x, model.layers[0].attention.wq.weight)               # an Int8Weight / Int4Weight module

A quantized projection keeps its weight as small integers and scales (npllama.quant.weight_only
states the schemes, their error bounds and the kernels' constraints) and computes
y = x @ dequantize(...).T with torch's aten kernels, activations in floating point:

    Int8Weight   symmetric, one scale per output channel      aten._weight_int8pack_mm
    Int4Weight   a scale and a zero per group of g inputs      aten._weight_int4pack_mm_for_cpu (CPU),
                                                               aten._weight_int4pack_mm (CUDA, bfloat16)

Where the weights come from (``weight_quantizer``):

* "int8", "int4": the checkpoint's floats quantized (quantize_int8 / quantize_int4, group 32);
* "gguf": a GGUF file's own values wherever a kernel's format holds them exactly: a Q4_0 or Q4_1
  block is an int4 group of 32 with the same 4-bit codes (q4_0_as_int4 / q4_1_as_int4); every other
  type (Q8_0: one scale per 32 weights, not per row; the K-quants; floats) is dequantized and
  re-quantized, to int4 for types of 4 bits or fewer and to int8 otherwise, and ``Quantizer.notes``
  says which (the loaders print them on stderr).

On a CPU, a call with DENSE_FROM_ROWS rows or more (a prefill) multiplies the dequantized
weights densely instead: the kernels loop over rows, a dense product does not.

Each weight module knows the exact float values its kernel multiplies by (``dequantized()``), so
the parity report can evaluate the NumPy reference on those values and show the kernel's
arithmetic error alone (parity/quant_report.py).

Legend: N = out (rows of the nn.Linear weight), K = in, g = the int4 group size, M = the
activations' rows (batch * seq).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from npllama.errors import InputError
from npllama.quant import (dequantize_int4, dequantize_int8, q4_0_as_int4, q4_1_as_int4, quantize_int4,
                           quantize_int8)
from npllama.quant.gguf_blocks import block_type
from npllama.quant.matrix import QuantizedMatrix

SCHEMES = ("int8", "int4", "gguf")
WEIGHTS = ("float32", *SCHEMES)
GROUP_SIZE = 32                          # int4 inputs per scale and zero (GGUF's Q4_0 / Q4_1 block)
INT4_ROW_MULTIPLE = {"cpu": 16, "cuda": 8}  # the packers' N % ... == 0 (rows are padded up to it)
FOUR_BIT_OR_LESS = {"Q4_0", "Q4_1", "Q2_K", "Q3_K", "Q4_K"}   # GGUF types re-quantized to int4
# On a CPU the int8 / int4 kernels loop over the rows of x (256 rows cost 256 times one; 3.5x a
# dense bfloat16 product of the same matrix on this project's CPU). From this many rows on (a
# prefill, never a decode step) a CPU call dequantizes the weights (``dense``) and multiplies densely.
DENSE_FROM_ROWS = 64


def _scale_dtype(dtype: torch.dtype) -> str:
    """The kernels want scales in the activations' dtype: its name for npllama.quant's quantizers."""
    name = str(dtype).removeprefix("torch.")
    if name not in ("float32", "bfloat16", "float16"):
        raise InputError(f"quantized weights compute in float32, bfloat16 or float16, not {name}")
    return name


# ---------------------------------------------------------------------------- the weights
class Int8Weight(nn.Module):
    """An (N, K) weight as int8 codes q and one scale per row: w = q * scale (dequantize_int8).

    q: (N, K) int8; scale: (N,) float32 holding values of the compute dtype. Buffers on ``device``:
    q as is (the kernel takes the matrix unpacked) and scale in ``dtype``.
    """

    def __init__(self, q: np.ndarray, scale: np.ndarray, dtype: torch.dtype, device: torch.device):
        super().__init__()
        n, k = q.shape
        if dtype == torch.bfloat16 and k % 16:
            raise InputError(f"the int8 kernel in bfloat16 needs rows of a multiple of 16 inputs, not {k}; "
                             f"use float32 or float16, or int4")
        self.n_out, self.n_in = n, k
        self.register_buffer("q", torch.from_numpy(np.ascontiguousarray(q)).to(device))
        self.register_buffer("scale", torch.from_numpy(np.ascontiguousarray(scale, np.float32)).to(device, dtype))

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., K) -> (..., N) in x's dtype: aten._weight_int8pack_mm on x as (M, K) (dense from
        DENSE_FROM_ROWS rows on a CPU)."""
        x2 = x.reshape(-1, self.n_in).contiguous()
        if x2.device.type == "cpu" and len(x2) >= DENSE_FROM_ROWS:
            y = F.linear(x2, self.dense(x2.dtype))
        else:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.q, self.scale)
        y = y.reshape(*x.shape[:-1], self.n_out)
        return y if bias is None else y + bias

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """The weights as an (N, K) tensor in dtype: q * scale in float32 (the kernel's values), rounded to dtype."""
        return (self.q.float() * self.scale.float()[:, None]).to(dtype)

    def dequantized(self) -> np.ndarray:
        """The (N, K) float32 weights the kernel multiplies by (dequantize_int8)."""
        return dequantize_int8(self.q.cpu().numpy(), self.scale.float().cpu().numpy())

    def extra_repr(self) -> str:
        return f"int8, {self.n_out} x {self.n_in}"


class Int4Weight(nn.Module):
    """An (N, K) weight as 4-bit codes q in 0..15 with a scale and a zero per group of g inputs of a
    row: w = (q - 8) * scale + zero (dequantize_int4).

    q: (N, K) uint8 codes; scales, zeros: (N, K / g) float32 holding values of the compute dtype.
    The codes are packed for the device's kernel at build time (the packed order depends on the
    CPU's vector width: never stored); rows are padded with zeros up to the packer's multiple
    (INT4_ROW_MULTIPLE) and the padding's outputs dropped. A copy of the codes, two per byte, stays
    on the host for ``dequantized``.
    """

    def __init__(self, q: np.ndarray, scales: np.ndarray, zeros: np.ndarray, dtype: torch.dtype,
                 device: torch.device):
        super().__init__()
        n, k = q.shape
        g = k // scales.shape[1]
        self.n_out, self.n_in, self.group_size = n, k, g
        cuda = device.type == "cuda"
        if cuda and dtype != torch.bfloat16:
            raise InputError("the int4 kernel on CUDA computes in bfloat16: pass dtype=bfloat16 (or use int8)")
        if k % 2 or g not in (32, 64, 128, 256) or (cuda and k % 32):
            raise InputError(f"the int4 kernel needs rows of a multiple of {32 if cuda else 2} inputs in groups "
                             f"of 32, 64, 128 or 256; this matrix has {k} inputs per row: use int8")
        rows = -(-n // INT4_ROW_MULTIPLE[device.type]) * INT4_ROW_MULTIPLE[device.type]
        pad = rows - n
        codes = np.pad(q, ((0, pad), (0, 0)), constant_values=8)               # padding weights: zero
        sz = np.stack([np.pad(scales, ((0, pad), (0, 0))).T, np.pad(zeros, ((0, pad), (0, 0))).T], axis=-1)
        self.register_buffer("scales_and_zeros", torch.from_numpy(np.ascontiguousarray(sz, np.float32))
                             .to(device, dtype).contiguous())                  # (K / g, rows, 2)
        if cuda:
            qq = torch.from_numpy((codes[:, 0::2] << 4) | codes[:, 1::2]).to(device)   # (rows, K / 2) uint8
            tiles = 8 if k % 256 == 0 else 4 if k % 128 == 0 else 2
            packed = torch.ops.aten._convert_weight_to_int4pack(qq, tiles)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                torch.from_numpy(codes.astype(np.int32)), 1).to(device)
        self.register_buffer("packed", packed)
        self._codes = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)       # (N, K / 2), host only
        self._scales = np.asarray(scales, np.float32)
        self._zeros = np.asarray(zeros, np.float32)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., K) -> (..., N) in x's dtype."""
        x2 = x.reshape(-1, self.n_in).contiguous()
        if x2.device.type == "cpu" and len(x2) >= DENSE_FROM_ROWS:
            y = F.linear(x2, self.dense(x2.dtype))
        elif self.packed.device.type == "cuda":
            y = torch.ops.aten._weight_int4pack_mm(x2, self.packed, self.group_size, self.scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_and_zeros)
        y = y[:, : self.n_out].reshape(*x.shape[:-1], self.n_out)
        return y if bias is None else y + bias

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """The weights as an (N, K) tensor in dtype, from the host codes: (q - 8) * scale + zero in
        float32, rounded to dtype."""
        codes = torch.from_numpy(self._codes)
        q = torch.stack([codes & 0x0F, codes >> 4], dim=-1).reshape(self.n_out, self.n_in).float() - 8
        scales = torch.from_numpy(self._scales).repeat_interleave(self.group_size, dim=1)
        zeros = torch.from_numpy(self._zeros).repeat_interleave(self.group_size, dim=1)
        return torch.addcmul(zeros, q, scales).to(dtype)

    def dequantized(self) -> np.ndarray:
        """The (N, K) float32 weights the kernel multiplies by (dequantize_int4; on AVX-512 CPUs bit
        for bit, npllama.quant.weight_only)."""
        q = np.empty((self.n_out, self.n_in), dtype=np.uint8)
        q[:, 0::2], q[:, 1::2] = self._codes & 0x0F, self._codes >> 4
        return dequantize_int4(q, self._scales, self._zeros)

    def extra_repr(self) -> str:
        return f"int4 group {self.group_size}, {self.n_out} x {self.n_in}"


QuantizedWeight = (Int8Weight, Int4Weight)


def is_quantized(w) -> bool:
    return isinstance(w, QuantizedWeight)


# ---------------------------------------------------------------------------- from a checkpoint
def int8_weight(w: np.ndarray, dtype: torch.dtype, device: torch.device) -> Int8Weight:
    """Float weights (N, K) quantized to int8 per channel (quantize_int8, scales in dtype)."""
    q, scale = quantize_int8(w, _scale_dtype(dtype))
    return Int8Weight(q, scale, dtype, device)


def int4_weight(w: np.ndarray, dtype: torch.dtype, device: torch.device, group_size: int = GROUP_SIZE) -> Int4Weight:
    """Float weights (N, K) quantized to int4 in groups (quantize_int4, scales and zeros in dtype)."""
    k = w.shape[1]
    if k % group_size:
        raise InputError(f"int4 groups {group_size} inputs, but this matrix has {k} per row; use int8")
    q, scales, zeros = quantize_int4(w, group_size, _scale_dtype(dtype))
    return Int4Weight(q, scales, zeros, dtype, device)


def gguf_int4_codes(m: QuantizedMatrix, scale_dtype: str):
    """A matrix of Q4_0 / Q4_1 parts as int4 groups of 32 with the file's codes: -> q (N, K) uint8,
    scales, zeros (N, K / 32) float32, and the number of blocks whose weights move (0: exact)."""
    from npllama.quant import q4_0_as_int4_error_bound, q4_1_as_int4_error_bound
    qs, ss, zs, moved = [], [], [], 0
    for name, blocks in m.parts:
        flat = blocks.reshape(-1, block_type(name).bytes_per_block)
        convert, bound = ((q4_0_as_int4, q4_0_as_int4_error_bound) if name == "Q4_0"
                          else (q4_1_as_int4, q4_1_as_int4_error_bound))
        q, s, z = convert(flat, scale_dtype)
        moved += int((bound(flat, scale_dtype) > 0).sum())
        rows = len(blocks)
        qs.append(q.reshape(rows, m.n_in))
        ss.append(s.reshape(rows, m.n_in // 32))
        zs.append(z.reshape(rows, m.n_in // 32))
    return np.concatenate(qs), np.concatenate(ss), np.concatenate(zs), moved


@dataclass
class Quantizer:
    """Turns each (N, K) matrix of a checkpoint into a quantized weight module, by scheme.

    scheme: "int8", "int4" or "gguf" (see the module docstring); dtype, device: the model's.
    notes: what "gguf" kept and what it re-quantized, one line per kind (for stderr).
    """
    scheme: str
    dtype: torch.dtype
    device: torch.device
    group_size: int = GROUP_SIZE
    notes: list[str] = field(default_factory=list)
    _kept: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise InputError(f"unknown quantized weights {self.scheme!r}; choose one of {', '.join(SCHEMES)}")
        _scale_dtype(self.dtype)

    def __call__(self, name: str, w) -> "Int8Weight | Int4Weight":
        """name: the fused checkpoint name (for the notes); w: (N, K) float array or QuantizedMatrix."""
        if self.scheme == "gguf":
            return self._from_gguf(name, w)
        floats = np.asarray(w, dtype=np.float32)
        if self.scheme == "int8":
            return int8_weight(floats, self.dtype, self.device)
        return int4_weight(floats, self.dtype, self.device, self.group_size)

    def _from_gguf(self, name: str, w) -> "Int8Weight | Int4Weight":
        if not isinstance(w, QuantizedMatrix):
            raise InputError(f"weights='gguf' keeps a GGUF file's blocks, but {name} is not quantized: "
                             f"load a .gguf file with npllama.load(path, weights='gguf') (or use int8 / int4)")
        types = set(w.types)
        sd = _scale_dtype(self.dtype)
        if types <= {"Q4_0", "Q4_1"} and w.n_in % 32 == 0:
            q, scales, zeros, moved = gguf_int4_codes(w, sd)
            self._note(f"{'+'.join(sorted(types))} kept as int4 groups of 32 (the file's codes)",
                       name, moved)
            return Int4Weight(q, scales, zeros, self.dtype, self.device)
        floats = np.asarray(w, dtype=np.float32)
        if types <= FOUR_BIT_OR_LESS and w.n_in % self.group_size == 0:
            self._note(f"{'+'.join(sorted(types))} re-quantized to int4 (group {self.group_size})", name, 0)
            return int4_weight(floats, self.dtype, self.device, self.group_size)
        self._note(f"{'+'.join(sorted(types))} re-quantized to int8 (per channel)", name, 0)
        return int8_weight(floats, self.dtype, self.device)

    def _note(self, what: str, name: str, moved: int) -> None:
        count, names, total_moved = self._kept.get(what, (0, [], 0))
        self._kept[what] = (count + 1, names + [name], total_moved + moved)
        self.notes = []
        for kind, (n, names, m) in self._kept.items():
            exact = "" if "kept" not in kind else (
                "; exact: the file's weights" if m == 0 else
                f"; {m} blocks' weights moved by rounding their scale or zero to {_scale_dtype(self.dtype)}")
            shown = ", ".join(names[:3]) + (" ..." if len(names) > 3 else "")
            self.notes.append(f"gguf: {n} matri{'ces' if n != 1 else 'x'} {kind} ({shown}){exact}")


def check_weights(weights: str) -> str:
    """weights as given when it names a scheme the Torch backend computes with (WEIGHTS), else an InputError."""
    if weights not in WEIGHTS:
        raise InputError(f"unknown weights {weights!r}; choose one of {', '.join(WEIGHTS)}")
    return weights

