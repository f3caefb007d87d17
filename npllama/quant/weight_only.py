"""Weight-only quantization as torch's quantized matrix-vector kernels define it, stated in NumPy.

A linear layer's weight w (out, in) is kept as small integers plus scales; activations stay in
floating point and the layer computes y = x @ dequantize(...).T. Two schemes:

int8, symmetric, one scale per output channel (row):
    scale[o] = max_i |w[o, i]| / 127,   q = round(w / scale) in -127..127,   w ~ q * scale[:, None]

int4, asymmetric, one scale and one zero per group of g consecutive inputs of a row (g = 32, 64, 128, 256):
    scale = (max - min) / 15,   zero = min + 8 * scale,   q = round((w - min) / scale) in 0..15,
    w ~ (q - 8) * scale + zero
  "zero" is the value of the middle code q = 8, not an integer zero point. This is the convention of
  torch's int4pack ("tinygemm") kernels, which evaluate (q - 8) * scale + zero; gpt-fast's
  quantize.py (get_group_qparams, pack_scales_and_zeros) and torchao build their weights this way.

The kernels, in torch 2.13. The CPU entries were checked on an AVX-512 CPU (the weights, products
and refusals by tests/test_quant.py); the CUDA entries are read from torch's source
(aten/src/ATen/native/cuda/int4mm.cu), not run.

int8    y = torch.ops.aten._weight_int8pack_mm(x, q, scale)
          x: (M, K) float32, bfloat16 or float16, 2-D, contiguous; q: (N, K) int8, the matrix itself
          (no packing), contiguous; scale: (N,) in x's dtype (another dtype is refused), contiguous
          (the kernel ignores strides: a strided scale gives wrong numbers, silently);
          y: (M, N) in x's dtype. float32 and float16: no constraint on M, N, K. bfloat16: K % 16 == 0,
          not checked: on an AVX-512 CPU another K gave wrong numbers or a segmentation fault (its
          vector loop reads 16 inputs at a time, aligned).
          Each weight is q * scale rounded to float32 (dequantize_int8; ARM CPUs scale the finished
          sum instead), products summed in float32, y rounded to x's dtype. With bfloat16, CPUs with
          oneDNN's brgemm may round q * scale to bfloat16 before multiplying.
int4    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, inner_k_tiles)
 (CPU)    q: (N, K) int32 holding 0..15 (uint8 is refused); N % 16 == 0; K % 2 == 0; inner_k_tiles
          is ignored on CPU. packed: (N, K / 2) uint8 in an order that depends on the CPU's vector
          width (AVX-512, AVX2, other): pack on the machine that computes, never store packed bytes.
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, g, scales_and_zeros)
          x: (M, K) float32, bfloat16 or float16, contiguous; g in {32, 64, 128, 256}; K % g == 0;
          scales_and_zeros: (K / g, N, 2) in x's dtype, [..., 0] the scale and [..., 1] the zero,
          group-major (int4pack_scales_and_zeros), contiguous (strides are ignored, silently);
          y: (M, N) in x's dtype.
          Each weight is (q - 8) * scale + zero in float32. On AVX-512 that is one fused multiply-add,
          a single rounding: what dequantize_int4 computes, bit for bit. AVX2 and other CPUs round
          twice, at most 2**-23 * (|zero| + 8 |scale| + |weight|) away.
int4    packed = torch.ops.aten._convert_weight_to_int4pack(qq, inner_k_tiles)
 (CUDA)   qq: (N, K / 2) uint8, qq[:, j] = q[:, 2j] << 4 | q[:, 2j + 1] (the even input in the high
          nibble); inner_k_tiles in {2, 4, 8}; K % (16 * inner_k_tiles) == 0; N % 8 == 0.
          packed: (N / 8, K / (16 * inner_k_tiles), 32, inner_k_tiles / 2) int32.
        y = torch.ops.aten._weight_int4pack_mm(x, packed, g, scales_and_zeros)
          x: (M, K) bfloat16 only; scales_and_zeros: (K / g, N, 2) bfloat16; y: bfloat16. Each
          weight is (q - 8) * scale + zero computed by a bfloat16 fused multiply-add, so rounded to
          bfloat16.

Storage of scales. A kernel fed bfloat16 or float16 activations wants scales (and zeros) in that
dtype. The quantizers take scale_dtype = "float32", "bfloat16" or "float16" and return float32
arrays holding values of that dtype (NumPy has no bfloat16; torch's .to(torch.bfloat16) of them is
exact). Rounding scale and zero moves the grid of codes; the error bounds say by how much.

GGUF blocks as int4 groups of 32. A Q4_0 block (w = d * (q - 8)) is the group (q, scale=d, zero=0);
a Q4_1 block (w = d * q + m) is the group (q, scale=d, zero=m + 8d). With float32 scales the weights
are the file's float32 values exactly (a zero weight may turn from -0 to +0) whenever zero is exact
in float32: always for Q4_0; for Q4_1 whenever m or d is 0 or the leading bits of m and 8d are at
most 12 places apart (m + 8d then fits in 24 significant bits), i.e. in all but blocks whose minimum
is tiny, or huge, next to their spread. The Torch backend can then keep the file's 4-bit codes.
A Q8_0 block has its own scale per 32 weights and the int8 kernel one per row, so Q8_0 is not an
int8 matrix unless every block of a row has the same d: it must be requantized (with
quantize_int8's error) or dequantized.
"""

from __future__ import annotations

import numpy as np

from ..errors import CheckpointError, InputError
from .gguf_blocks import q4_0_fields, q4_1_fields

SCALE_DTYPES = ("float32", "bfloat16", "float16")
INT4_GROUP_SIZES = (32, 64, 128, 256)    # the group sizes torch's int4 kernels accept

_U32 = 2.0 ** -24                         # unit roundoff of float32: |fl(v) - v| <= _U32 * |v|


# ------------------------------------------------------------------------------ shared pieces

def _matrix(w: np.ndarray) -> np.ndarray:
    """A weight matrix to quantize: (out, in), in >= 1, finite -> float64 (exact for float16/32/64 input)."""
    w64 = np.asarray(w, dtype=np.float64)
    if w64.ndim != 2 or w64.shape[1] == 0:
        raise InputError(f"expected a weight matrix (out, in) with in >= 1, got shape {w64.shape}")
    if not np.isfinite(w64).all():
        raise CheckpointError("the weight matrix holds NaN or infinity; it cannot be quantized")
    return w64


def _round_bfloat16(x: np.ndarray) -> np.ndarray:
    """float64 -> float32 holding the nearest bfloat16 (8 significant bits, ties to even), rounded once."""
    _, exponent = np.frexp(x)                                   # x = f * 2**exponent, 0.5 <= |f| < 1
    quantum = np.ldexp(1.0, np.maximum(exponent - 8, -133))     # bfloat16's spacing at x (-133: subnormals)
    return (np.rint(x / quantum) * quantum).astype(np.float32)


def round_scales(x: np.ndarray, scale_dtype: str) -> np.ndarray:
    """Scales or zeros as stored: x (any shape) -> float32 of x's shape, the nearest value of scale_dtype.

    scale_dtype: "float32", "bfloat16" or "float16"; round to nearest, ties to even, once from x's
    float64 value. A value beyond the dtype's range is a CheckpointError (the weights are too large
    to quantize with that dtype), an unknown dtype an InputError.
    """
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(over="ignore"):                            # overflow is reported below
        if scale_dtype == "float32":
            stored = x.astype(np.float32)
        elif scale_dtype == "float16":
            stored = x.astype(np.float16).astype(np.float32)
        elif scale_dtype == "bfloat16":
            stored = _round_bfloat16(x)
        else:
            raise InputError(f"scale_dtype must be one of {', '.join(SCALE_DTYPES)}, not {scale_dtype!r}")
    if not np.isfinite(stored).all():
        raise CheckpointError(f"a scale or zero of {np.abs(x).max():.3g} exceeds the range of {scale_dtype}")
    return stored


# ------------------------------------------------------------------------------ int8, per channel

def quantize_int8(w: np.ndarray, scale_dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8: w (out, in) float -> q (out, in) int8 in -127..127, scale (out,) float32.

    scale = max_i |w[o, i]| / 127 rounded to scale_dtype; q = round(w / scale) (ties to even),
    clipped to -127..127 (the clip matters only where rounding made scale slightly small). A row of
    zeros gets scale 0 and q 0. Computed in float64. Error: int8_error_bound.
    """
    w64 = _matrix(w)
    scale = round_scales(np.abs(w64).max(axis=1) / 127, scale_dtype)
    divisor = np.where(scale > 0, scale, 1.0)                   # rows of zeros: q = 0 whatever the divisor
    q = np.clip(np.rint(w64 / divisor[:, None]), -127, 127)
    return q.astype(np.int8), scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """w = q * scale[:, None]: q (out, in) int8, scale (out,) float32 -> (out, in) float32, each product rounded once.

    The weights torch's _weight_int8pack_mm multiplies by (see the module docstring).
    """
    return q.astype(np.float32) * np.asarray(scale, dtype=np.float32)[:, None]


def int8_error_bound(scale: np.ndarray) -> np.ndarray:
    """Largest |w - dequantize_int8(quantize_int8(w))| in each row: scale (out,) -> (out,) float64.

    Holds for every row that is all zeros or whose scale is a normal number of its scale_dtype
    (>= 2**-126 for float32 and bfloat16, >= 2**-14 for float16):

        |w - deq| <= scale * (1/2 + 2**-16)

    Why: an element with |w| <= 127.5 * scale is rounded to the nearest multiple of scale, off by at
    most scale / 2. Rounding scale to its dtype may leave it below max|w| / 127 by a relative 2**-24
    (float32), 2**-11 (float16) or 2**-8 (bfloat16); the row's largest elements then clip to +-127,
    off by at most 127 * 2**-8 * max|w| / 127 = 0.496 * max|w| / 127 < scale / 2. Rounding q * scale
    to float32 adds at most
    127 * scale * 2**-24 (nothing for bfloat16 or float16 scales, whose products are exact), and the
    float64 quotient a relative 2**-52: together under scale * 2**-16.
    """
    return np.asarray(scale, dtype=np.float64) * (0.5 + 2.0 ** -16)


# ------------------------------------------------------------------------------ int4, per group

def _groups(n_in: int, scales: np.ndarray) -> int:
    """The group size that scales (out, n_groups) implies for rows of n_in inputs."""
    n_groups = scales.shape[1]
    if n_groups == 0 or n_in % n_groups:
        raise InputError(f"{n_in} inputs per row do not split into {n_groups} equal groups")
    return n_in // n_groups


def quantize_int4(w: np.ndarray, group_size: int,
                  scale_dtype: str = "float32") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric int4 per group: w (out, in) float -> q (out, in) uint8 in 0..15, scales, zeros (out, in / g) float32.

    g = group_size consecutive inputs of a row share a scale and a zero (the kernels take g in
    INT4_GROUP_SIZES; any g dividing in works here). Per group, with min and max its extremes:
        scale = (max - min) / 15, zero = min + 8 * scale,  both rounded to scale_dtype,
        q = round((w - (zero - 8 * scale)) / scale) clipped to 0..15   (the code nearest w on the stored grid),
    so that w ~ (q - 8) * scale + zero. A group whose scale is 0 (all its weights equal, or a spread
    below the dtype's smallest number) gets q = 8, i.e. the value zero. Computed in float64.
    Error: int4_error_bound.
    """
    w64 = _matrix(w)
    out, n_in = w64.shape
    if group_size < 1 or n_in % group_size:
        raise InputError(f"group_size {group_size} does not divide the {n_in} inputs per row")
    groups = w64.reshape(out, n_in // group_size, group_size)
    low, high = groups.min(axis=2), groups.max(axis=2)                    # (out, n_groups)
    step = (high - low) / 15
    scales = round_scales(step, scale_dtype)
    zeros = round_scales(low + 8 * step, scale_dtype)
    code0 = zeros.astype(np.float64) - 8 * scales                         # the value of code 0, exact
    divisor = np.where(scales > 0, scales, 1.0)
    q = np.clip(np.rint((groups - code0[..., None]) / divisor[..., None]), 0, 15)
    q = np.where(scales[..., None] > 0, q, 8)
    return q.astype(np.uint8).reshape(out, n_in), scales, zeros


def dequantize_int4(q: np.ndarray, scales: np.ndarray, zeros: np.ndarray) -> np.ndarray:
    """w = (q - 8) * scale + zero: q (out, in) codes 0..15, scales and zeros (out, in / g) -> (out, in) float32.

    The group size g is in / scales.shape[1]. The value is evaluated exactly and rounded once to
    float32, as a fused multiply-add does (torch's AVX-512 CPU kernel): float64 holds
    (q - 8) * scale exactly, and the sum too unless zero and the product differ by more than a
    factor of about 2**25 (then float64 rounds first, and the result may be one float32 step from
    a single rounding).
    """
    scales, zeros = np.asarray(scales, np.float64), np.asarray(zeros, np.float64)
    out, n_in = q.shape
    if scales.shape != zeros.shape or scales.shape[0] != out:
        raise InputError(f"scales {scales.shape} and zeros {zeros.shape} do not fit codes of shape {q.shape}")
    g = _groups(n_in, scales)
    codes = q.reshape(out, n_in // g, g).astype(np.float64) - 8
    w = codes * scales[..., None] + zeros[..., None]
    return w.astype(np.float32).reshape(out, n_in)


def int4_error_bound(w: np.ndarray, scales: np.ndarray, zeros: np.ndarray) -> np.ndarray:
    """Largest |w - dequantize_int4(quantize_int4(w, ...))| in each group: -> (out, in / g) float64.

    w: (out, in) the original weights; scales, zeros: (out, in / g) as quantize_int4 stored them.
    The stored codes span the grid zero + (c - 8) * scale, c = 0..15, from lo = zero - 8 * scale to
    hi = zero + 7 * scale. A weight inside [lo, hi] is at most scale / 2 from its code; one outside
    (possible only because scale and zero were rounded to their dtype) is clipped to the end, off by
    its distance to [lo, hi]. The float32 rounding of the result adds at most 2**-24 * max(|lo|, |hi|),
    the float64 quotient less than that again. So per group

        |w - deq| <= max(scale / 2, lo - min(w), max(w) - hi) + 2**-23 * max(|lo|, |hi|).

    With float32 storage the grid moves only by float32's own resolution at the group's values (the
    middle and last terms are a few 2**-24 * max(|lo|, |hi|)): the bound is scale / 2 unless the
    group's spread is that small. With bfloat16 the middle term can reach 2**-8 * |zero| + 8 * 2**-8
    * scale: large when a group's weights sit far from 0 compared with their spread.
    """
    w64 = np.asarray(w, dtype=np.float64)
    scales, zeros = np.asarray(scales, np.float64), np.asarray(zeros, np.float64)
    out, n_in = w64.shape
    g = _groups(n_in, scales)
    groups = w64.reshape(out, n_in // g, g)
    lo, hi = zeros - 8 * scales, zeros + 7 * scales
    outside = np.maximum(lo - groups.min(axis=2), groups.max(axis=2) - hi)
    return np.maximum(scales / 2, outside) + 2 * _U32 * np.maximum(np.abs(lo), np.abs(hi))


def int4pack_scales_and_zeros(scales: np.ndarray, zeros: np.ndarray) -> np.ndarray:
    """The int4 kernels' scales_and_zeros: scales, zeros (out, n_groups) -> (n_groups, out, 2) float32, C-contiguous.

    [k, o, 0] is the scale and [k, o, 1] the zero of group k of row o: group-major, the transpose
    of the (out, n_groups) arrays. The kernels read this memory as contiguous whatever its strides,
    so the copy made here is contiguous.
    """
    pairs = np.stack([np.asarray(scales, np.float32).T, np.asarray(zeros, np.float32).T], axis=-1)
    return np.ascontiguousarray(pairs)


# ------------------------------------------------------------------------------ GGUF blocks as int4 groups

def q4_0_as_int4(blocks: np.ndarray, scale_dtype: str = "float32") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GGUF Q4_0 blocks as int4 groups of 32.

    blocks (n_blocks, 18) uint8 -> q (n_blocks, 32) uint8, scales (n_blocks,) float32, zeros (n_blocks,) float32.

    Q4_0's w = d * (q - 8) is the int4 convention with scale = d and zero = 0, and the same codes.
    With float32 or float16 scales it is exact (dequantize_int4 gives the file's float32 weights; a
    zero weight may turn from -0 to +0); with bfloat16 d is rounded to 8 significant bits
    (q4_0_as_int4_error_bound). For a Q4_0 matrix (out, in): q.reshape(out, in) and
    scales.reshape(out, in // 32) are the kernel's inputs.
    """
    d, q = q4_0_fields(blocks)
    return q, round_scales(d[:, 0], scale_dtype), np.zeros(len(q), dtype=np.float32)


def q4_1_as_int4(blocks: np.ndarray, scale_dtype: str = "float32") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GGUF Q4_1 blocks as int4 groups of 32.

    blocks (n_blocks, 20) uint8 -> q (n_blocks, 32) uint8, scales (n_blocks,) float32, zeros (n_blocks,) float32.

    Q4_1's w = d * q + m = (q - 8) * d + (m + 8d) is the int4 convention with scale = d and
    zero = m + 8d, and the same codes; m + 8d is computed exactly (float64) and then rounded to
    scale_dtype. Exact (the file's float32 weights) when d and zero survive that rounding: in float32
    for every block where m or d is 0 or the leading bits of m and 8d are at most 12 places apart
    (two float16 significands of 11 bits then span at most 24); in bfloat16 rarely. Otherwise the
    weights move by at most q4_1_as_int4_error_bound (0 where exact).
    For a Q4_1 matrix (out, in): q.reshape(out, in) and scales.reshape(out, in // 32).
    """
    d, m, q = q4_1_fields(blocks)
    d64, m64 = d[:, 0].astype(np.float64), m[:, 0].astype(np.float64)
    return q, round_scales(d64, scale_dtype), round_scales(m64 + 8 * d64, scale_dtype)


def _int4_vs_file_bound(d: np.ndarray, file_zero: np.ndarray,
                        scales: np.ndarray, zeros: np.ndarray) -> np.ndarray:
    """Per block, a bound on |file weight - int4 weight| (both float32), from the file's (d, zero) and the stored pair.

    All (n_blocks,) float64 -> (n_blocks,) float64.

    The file's weight is a = (q - 8) d + file_zero exactly before its one float32 rounding, the
    int4 weight b = (q - 8) scale + zero. |a - b| <= delta = 8 |scale - d| + |zero - file_zero|;
    delta = 0 means equal values and equal float32 results. Otherwise the two roundings add at most
    2**-24 (|a| + |b|), with |a| <= A = max(|file_zero - 8d|, |file_zero + 7d|) and |b| <= A + delta.
    """
    delta = 8 * np.abs(scales - d) + np.abs(zeros - file_zero)
    largest = np.maximum(np.abs(file_zero - 8 * d), np.abs(file_zero + 7 * d))
    return np.where(delta == 0, 0.0, delta + 2 * _U32 * (largest + delta))


def q4_0_as_int4_error_bound(blocks: np.ndarray, scale_dtype: str = "float32") -> np.ndarray:
    """How far q4_0_as_int4's weights may be from the file's: (n_blocks, 18) uint8 -> (n_blocks,) float64, 0 = exact."""
    d, _ = q4_0_fields(blocks)
    d64 = d[:, 0].astype(np.float64)
    _, scales, zeros = q4_0_as_int4(blocks, scale_dtype)
    return _int4_vs_file_bound(d64, np.zeros_like(d64), scales.astype(np.float64), zeros.astype(np.float64))


def q4_1_as_int4_error_bound(blocks: np.ndarray, scale_dtype: str = "float32") -> np.ndarray:
    """How far q4_1_as_int4's weights may be from the file's: (n_blocks, 20) uint8 -> (n_blocks,) float64, 0 = exact."""
    d, m, _ = q4_1_fields(blocks)
    d64, m64 = d[:, 0].astype(np.float64), m[:, 0].astype(np.float64)
    _, scales, zeros = q4_1_as_int4(blocks, scale_dtype)
    return _int4_vs_file_bound(d64, m64 + 8 * d64, scales.astype(np.float64), zeros.astype(np.float64))
