"""GGUF block quantization (llama.cpp's ggml types): each block type's bytes, and how they turn back into float32.

A block quantization cuts each row of a weight matrix into blocks of consecutive weights and stores
every block as a few shared numbers followed by one small integer per weight. The simple types keep
32 weights per block with a float16 scale d (and, for the "_1" types, a float16 minimum m):

    weight = d * q            Q4_0, Q5_0, Q8_0   (q signed: Q8_0 stores int8, Q4_0 / Q5_0 subtract
                                                  8 / 16 from unsigned 4- / 5-bit codes)
    weight = d * q + m        Q4_1, Q5_1         (q unsigned)

The K-quants (Q2_K ... Q6_K) keep 256 weights per super-block, split into 16 sub-blocks of 16 or 8
of 32 weights. Each sub-block has its own scale sc (and minimum mn), stored as a 4-, 6- or 8-bit
integer relative to the super-block's float16 d (and dmin):

    weight = (d * sc) * q - (dmin * mn)      two levels of scales (Q3_K, Q6_K: signed q, no minimum)

so a sub-block's scale costs 4-8 bits instead of 16, and a super-block needs only one or two float16
numbers. A block depends on its own bytes alone: any range of blocks (a few rows of a matrix) can be
dequantized without reading the rest, which is what ``dequantize_rows`` does.

Layout conventions. A block is a packed C struct: its fields follow each other in the order listed
in each function's docstring, without padding; float16 fields are little-endian IEEE half floats.
Where bytes hold several small integers the docstrings say which bits go to which weight. A GGUF
tensor of NumPy shape (rows, n) stores each row as n / block_size blocks, rows one after another
(GGUF lists dimensions the other way round: ne[0] = n is the row length).

Arithmetic. Every product below (a float16 scale, times a sub-block scale of at most 8 bits, times
a quant of at most 6 bits) has at most 24 significant bits and so is exact in float32; only the
final "+ m" or "- dmin * mn" rounds, once. The results are bit for bit those of the gguf package's
``gguf.quants.dequantize``, which uses the same float32 operations in the same order.

Sources: llama.cpp, ggml/src/ggml-common.h (the block structs block_q4_0 ... block_q6_K) and
ggml/src/ggml-quants.c (dequantize_row_q4_0 ... dequantize_row_q6_K); the gguf Python package,
gguf/quants.py (its NumPy dequantizers, the oracle of the tests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import CheckpointError

QK = 32      # weights per block of the simple types (Q4_0 ... Q8_0)
QK_K = 256   # weights per super-block of the K-quants (Q2_K ... Q6_K)

# Rows are dequantized this many weights at a time, so the temporaries stay small (a few MB)
# whatever the size of the matrix.
_CHUNK_WEIGHTS = 1 << 20


# ------------------------------------------------------------------------------ bit helpers

def _check_blocks(blocks: np.ndarray, bytes_per_block: int) -> np.ndarray:
    """blocks: (n_blocks, bytes_per_block) uint8 -> the same, C-contiguous (fields are viewed in place)."""
    if blocks.dtype != np.uint8 or blocks.ndim != 2 or blocks.shape[1] != bytes_per_block:
        raise CheckpointError(f"expected blocks of shape (n_blocks, {bytes_per_block}) uint8, "
                              f"got {blocks.shape} {blocks.dtype}")
    return np.ascontiguousarray(blocks)


def _f16(field: np.ndarray) -> np.ndarray:
    """field: (n_blocks, 2) uint8, one little-endian float16 -> (n_blocks, 1) float32 (exact)."""
    return field.view(np.float16).astype(np.float32)


def _unpack_fields(packed: np.ndarray, bits: int) -> np.ndarray:
    """Split every byte into 8 / bits small unsigned integers: (..., L) uint8 -> (..., 8 / bits * L) uint8.

    Field j of a byte is its bits j*bits ... j*bits + bits - 1, counted from the least significant.
    Field j of byte l lands at position j * L + l: all the bytes' first fields, then all their
    second fields, and so on. With bits=4 over 16 bytes: the low nibbles are weights 0..15, the high
    nibbles weights 16..31. This is how ggml spreads nibbles, 2-bit fields and single bits over
    consecutive weights.
    """
    mask = np.uint8((1 << bits) - 1)
    fields = [(packed >> np.uint8(j * bits)) & mask for j in range(8 // bits)]
    return np.concatenate(fields, axis=-1)


def unpack_q3_k_scales(packed: np.ndarray) -> np.ndarray:
    """Q3_K's 16 sub-block scales, 6 bits each, from 12 bytes: (n_blocks, 12) uint8 -> (n_blocks, 16) int8 in -32..31.

    Scale i (0..15) is a 6-bit unsigned number u_i, stored as 4 low bits and 2 high bits, and means
    u_i - 32. Bit layout, with A..P the scales 0..15 and bit 7 written first:

        byte  0.. 7:   IIIIAAAA  JJJJBBBB  ...  PPPPHHHH    low 4 bits: scale i in byte i (i < 8),
                                                             scale i+8 in the high nibble of byte i
        byte  8..11:   MMIIEEAA  NNJJFFBB  OOKKGGCC  PPLLHHDD
                                                             high 2 bits: scale i in byte 8 + i % 4,
                                                             bits 2 * (i // 4) and above
    """
    low = _unpack_fields(packed[:, 0:8], 4)      # (n, 16): element i = low 4 bits of scale i
    high = _unpack_fields(packed[:, 8:12], 2)    # (n, 16): element 4j + l = bits 2j..2j+1 of byte 8+l
    return (low | (high << np.uint8(4))).astype(np.int8) - np.int8(32)


def unpack_k_scales_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K: 8 sub-block scales and 8 minimums, 6 bits each, from 12 bytes.

    packed: (n_blocks, 12) uint8 -> (scales, mins), each (n_blocks, 8) uint8 in 0..63.
    Bit layout, for j = 0..3 (bit 7 written first; sc_j, mn_j the scale and minimum of sub-block j):

        byte  j      : [sc_{j+4} bits 4-5][sc_j, 6 bits]
        byte  4 + j  : [mn_{j+4} bits 4-5][mn_j, 6 bits]
        byte  8 + j  : [mn_{j+4} bits 0-3][sc_{j+4} bits 0-3]

    The first four scales and minimums sit whole in the low 6 bits of bytes 0..7; the last four are
    pieced together from a nibble of bytes 8..11 and the two spare top bits of bytes 0..7.
    """
    sc_lo, mn_lo, rest = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate([sc_lo & np.uint8(0x3F),
                             (rest & np.uint8(0x0F)) | ((sc_lo >> np.uint8(6)) << np.uint8(4))], axis=1)
    mins = np.concatenate([mn_lo & np.uint8(0x3F),
                           (rest >> np.uint8(4)) | ((mn_lo >> np.uint8(6)) << np.uint8(4))], axis=1)
    return scales, mins


# ------------------------------------------------------------------------------ plain floats

def dequantize_f32(blocks: np.ndarray) -> np.ndarray:
    """F32: one weight per 4 bytes, a little-endian float32. blocks: (n, 4) uint8 -> (n, 1) float32."""
    return _check_blocks(blocks, 4).view(np.float32).copy()


def dequantize_f16(blocks: np.ndarray) -> np.ndarray:
    """F16: one weight per 2 bytes, a little-endian float16. blocks: (n, 2) uint8 -> (n, 1) float32 (exact)."""
    return _f16(_check_blocks(blocks, 2))


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16, any shape) -> float32 of the same shape (exact): a bfloat16 is
    the top half of a float32, so its 16 bits shifted left by 16 are the float32's bits."""
    top = np.empty(bits.shape, dtype=np.uint32)
    np.left_shift(bits, 16, out=top, dtype=np.uint32)
    return top.view(np.float32)


def dequantize_bf16(blocks: np.ndarray) -> np.ndarray:
    """BF16: one weight per 2 bytes, a little-endian bfloat16. blocks: (n, 2) uint8 -> (n, 1) float32 (exact)."""
    return bf16_to_float32(_check_blocks(blocks, 2).view(np.uint16))


# ------------------------------------------------------------------------------ 32-weight blocks

def dequantize_q8_0(blocks: np.ndarray) -> np.ndarray:
    """Q8_0: 32 weights in 34 bytes. blocks: (n_blocks, 34) uint8 -> (n_blocks, 32) float32.

    d:  float16 scale                                   bytes 0..1
    qs: 32 int8 quants, weight i in byte 2 + i          bytes 2..33

    w = d * q,  q in -128..127.
    """
    blocks = _check_blocks(blocks, 34)
    d = _f16(blocks[:, 0:2])
    q = blocks[:, 2:34].view(np.int8).astype(np.float32)
    return q * d


def dequantize_q4_0(blocks: np.ndarray) -> np.ndarray:
    """Q4_0: 32 weights in 18 bytes. blocks: (n_blocks, 18) uint8 -> (n_blocks, 32) float32.

    d:  float16 scale                                   bytes 0..1
    qs: 16 bytes of 4-bit quants: low nibbles are       bytes 2..17
        weights 0..15, high nibbles weights 16..31

    w = d * (q - 8),  q in 0..15.
    """
    d, q = q4_0_fields(blocks)
    return d * (q.astype(np.int8) - np.int8(8)).astype(np.float32)


def q4_0_fields(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0's fields: blocks (n_blocks, 18) uint8 -> d (n_blocks, 1) float32, q (n_blocks, 32) uint8 in 0..15."""
    blocks = _check_blocks(blocks, 18)
    return _f16(blocks[:, 0:2]), _unpack_fields(blocks[:, 2:18], 4)


def dequantize_q4_1(blocks: np.ndarray) -> np.ndarray:
    """Q4_1: 32 weights in 20 bytes. blocks: (n_blocks, 20) uint8 -> (n_blocks, 32) float32.

    d:  float16 scale                                   bytes 0..1
    m:  float16 minimum                                 bytes 2..3
    qs: 16 bytes of 4-bit quants: low nibbles are       bytes 4..19
        weights 0..15, high nibbles weights 16..31

    w = d * q + m,  q in 0..15 (d * q exact in float32, one rounding in "+ m").
    """
    d, m, q = q4_1_fields(blocks)
    return d * q.astype(np.float32) + m


def q4_1_fields(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_1's fields: blocks (n_blocks, 20) uint8 -> d, m (n_blocks, 1) float32, q (n_blocks, 32) uint8 in 0..15."""
    blocks = _check_blocks(blocks, 20)
    return _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4]), _unpack_fields(blocks[:, 4:20], 4)


def _q5_high_bits(qh: np.ndarray) -> np.ndarray:
    """Q5_0 / Q5_1 qh: (n_blocks, 4) uint8, a little-endian uint32 -> (n_blocks, 32) uint8, its bit i in element i."""
    return np.unpackbits(qh, axis=1, bitorder="little")


def dequantize_q5_0(blocks: np.ndarray) -> np.ndarray:
    """Q5_0: 32 weights in 22 bytes. blocks: (n_blocks, 22) uint8 -> (n_blocks, 32) float32.

    d:  float16 scale                                   bytes 0..1
    qh: uint32, little-endian: bit i is bit 4 (the      bytes 2..5
        fifth bit) of weight i's quant
    qs: 16 bytes of low 4 bits: low nibbles are         bytes 6..21
        weights 0..15, high nibbles weights 16..31

    w = d * (q - 16),  q = low | high << 4 in 0..31.
    """
    blocks = _check_blocks(blocks, 22)
    d = _f16(blocks[:, 0:2])
    high = _q5_high_bits(blocks[:, 2:6])
    low = _unpack_fields(blocks[:, 6:22], 4)
    q = (low | (high << np.uint8(4))).astype(np.int8) - np.int8(16)
    return d * q.astype(np.float32)


def dequantize_q5_1(blocks: np.ndarray) -> np.ndarray:
    """Q5_1: 32 weights in 24 bytes. blocks: (n_blocks, 24) uint8 -> (n_blocks, 32) float32.

    d:  float16 scale                                   bytes 0..1
    m:  float16 minimum                                 bytes 2..3
    qh: uint32, little-endian: bit i is bit 4 of        bytes 4..7
        weight i's quant
    qs: 16 bytes of low 4 bits: low nibbles are         bytes 8..23
        weights 0..15, high nibbles weights 16..31

    w = d * q + m,  q = low | high << 4 in 0..31.
    """
    blocks = _check_blocks(blocks, 24)
    d = _f16(blocks[:, 0:2])
    m = _f16(blocks[:, 2:4])
    high = _q5_high_bits(blocks[:, 4:8])
    low = _unpack_fields(blocks[:, 8:24], 4)
    q = (low | (high << np.uint8(4))).astype(np.float32)
    return d * q + m


# ------------------------------------------------------------------------------ 256-weight super-blocks

def dequantize_q2_k(blocks: np.ndarray) -> np.ndarray:
    """Q2_K: 256 weights in 84 bytes, 16 sub-blocks of 16. blocks: (n_blocks, 84) uint8 -> (n_blocks, 256) float32.

    scales: 16 bytes, one per sub-block i: low nibble its        bytes  0..15
            scale sc_i, high nibble its minimum mn_i (0..15)
    qs:     64 bytes of 2-bit quants, in two halves of 32        bytes 16..79
            bytes; in half h, bits 2j..2j+1 of byte l are
            weight 128h + 32j + l
    d:      float16 super-block scale                            bytes 80..81
    dmin:   float16 super-block scale of the minimums            bytes 82..83

    w = (d * sc_i) * q - (dmin * mn_i),  q in 0..3, i = weight // 16.
    """
    blocks = _check_blocks(blocks, 84)
    n = len(blocks)
    scales, qs = blocks[:, 0:16], blocks[:, 16:80]
    d, dmin = _f16(blocks[:, 80:82]), _f16(blocks[:, 82:84])
    dl = d * (scales & np.uint8(0x0F)).astype(np.float32)          # (n, 16) sub-block scales
    ml = dmin * (scales >> np.uint8(4)).astype(np.float32)          # (n, 16) sub-block minimums
    q = _unpack_fields(qs.reshape(n, 2, 32), 2).reshape(n, 16, 16).astype(np.float32)
    return (dl[:, :, None] * q - ml[:, :, None]).reshape(n, QK_K)


def dequantize_q3_k(blocks: np.ndarray) -> np.ndarray:
    """Q3_K: 256 weights in 110 bytes, 16 sub-blocks of 16. blocks: (n_blocks, 110) uint8 -> (n_blocks, 256) float32.

    hmask:  32 bytes: bit j of byte l is the high (third)        bytes   0..31
            bit of weight 32j + l
    qs:     64 bytes of low 2 bits, in two halves of 32          bytes  32..95
            bytes; in half h, bits 2j..2j+1 of byte l are
            weight 128h + 32j + l
    scales: 12 bytes packing 16 signed 6-bit sub-block           bytes  96..107
            scales sc_i (see unpack_q3_k_scales)
    d:      float16 super-block scale                            bytes 108..109

    w = (d * sc_i) * q,  q = low - (0 if the high bit is set else 4) in -4..3, i = weight // 16.
    (The high bit is stored inverted: set means "no offset".)
    """
    blocks = _check_blocks(blocks, 110)
    n = len(blocks)
    hmask, qs, d = blocks[:, 0:32], blocks[:, 32:96], _f16(blocks[:, 108:110])
    dl = d * unpack_q3_k_scales(blocks[:, 96:108]).astype(np.float32)    # (n, 16)
    low = _unpack_fields(qs.reshape(n, 2, 32), 2).reshape(n, QK_K).astype(np.int8)
    high = _unpack_fields(hmask, 1).astype(np.int8)                      # (n, 256)
    q = (low - np.int8(4) * (np.int8(1) - high)).reshape(n, 16, 16).astype(np.float32)
    return (dl[:, :, None] * q).reshape(n, QK_K)


def dequantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    """Q4_K: 256 weights in 144 bytes, 8 sub-blocks of 32. blocks: (n_blocks, 144) uint8 -> (n_blocks, 256) float32.

    d:      float16 super-block scale                            bytes  0..1
    dmin:   float16 super-block scale of the minimums            bytes  2..3
    scales: 12 bytes packing 8 scales sc_i and 8 minimums        bytes  4..15
            mn_i, 6 bits each (see unpack_k_scales_mins)
    qs:     128 bytes of 4-bit quants in four chunks of 32       bytes 16..143
            bytes; in chunk c the low nibbles are weights
            64c..64c+31, the high nibbles 64c+32..64c+63

    w = (d * sc_i) * q - (dmin * mn_i),  q in 0..15, i = weight // 32.
    """
    blocks = _check_blocks(blocks, 144)
    n = len(blocks)
    d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    sc, mn = unpack_k_scales_mins(blocks[:, 4:16])
    dl = d * sc.astype(np.float32)                                       # (n, 8)
    ml = dmin * mn.astype(np.float32)                                    # (n, 8)
    q = _unpack_fields(blocks[:, 16:144].reshape(n, 4, 32), 4).reshape(n, 8, 32).astype(np.float32)
    return (dl[:, :, None] * q - ml[:, :, None]).reshape(n, QK_K)


def dequantize_q5_k(blocks: np.ndarray) -> np.ndarray:
    """Q5_K: 256 weights in 176 bytes, 8 sub-blocks of 32. blocks: (n_blocks, 176) uint8 -> (n_blocks, 256) float32.

    d:      float16 super-block scale                            bytes  0..1
    dmin:   float16 super-block scale of the minimums            bytes  2..3
    scales: 12 bytes packing 8 scales sc_i and 8 minimums        bytes  4..15
            mn_i, 6 bits each (see unpack_k_scales_mins)
    qh:     32 bytes: bit j of byte l is bit 4 (the fifth        bytes 16..47
            bit) of weight 32j + l
    qs:     128 bytes of low 4 bits in four chunks of 32         bytes 48..175
            bytes; in chunk c the low nibbles are weights
            64c..64c+31, the high nibbles 64c+32..64c+63

    w = (d * sc_i) * q - (dmin * mn_i),  q = low | high << 4 in 0..31, i = weight // 32.
    """
    blocks = _check_blocks(blocks, 176)
    n = len(blocks)
    d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    sc, mn = unpack_k_scales_mins(blocks[:, 4:16])
    dl = d * sc.astype(np.float32)
    ml = dmin * mn.astype(np.float32)
    high = _unpack_fields(blocks[:, 16:48], 1)                                    # (n, 256)
    low = _unpack_fields(blocks[:, 48:176].reshape(n, 4, 32), 4).reshape(n, QK_K)
    q = (low | (high << np.uint8(4))).reshape(n, 8, 32).astype(np.float32)
    return (dl[:, :, None] * q - ml[:, :, None]).reshape(n, QK_K)


def dequantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    """Q6_K: 256 weights in 210 bytes, 16 sub-blocks of 16. blocks: (n_blocks, 210) uint8 -> (n_blocks, 256) float32.

    ql:     128 bytes of low 4 bits, in two halves of 64         bytes   0..127
            bytes; in half h the low nibbles are weights
            128h + 0..63, the high nibbles 128h + 64..127
    qh:     64 bytes of high 2 bits, in two halves of 32         bytes 128..191
            bytes; in half h, bits 2j..2j+1 of byte l are
            the top bits of weight 128h + 32j + l
    scales: 16 int8 sub-block scales sc_i                        bytes 192..207
    d:      float16 super-block scale                            bytes 208..209

    w = (d * sc_i) * (q - 32),  q = low | high << 4 in 0..63, i = weight // 16.
    """
    blocks = _check_blocks(blocks, 210)
    n = len(blocks)
    low = _unpack_fields(blocks[:, 0:128].reshape(n, 2, 64), 4)          # (n, 2, 128)
    high = _unpack_fields(blocks[:, 128:192].reshape(n, 2, 32), 2)       # (n, 2, 128)
    sc = blocks[:, 192:208].view(np.int8).astype(np.float32)             # (n, 16)
    d = _f16(blocks[:, 208:210])
    dl = d * sc
    q = ((low | (high << np.uint8(4))).astype(np.int8) - np.int8(32)).reshape(n, 16, 16).astype(np.float32)
    return (dl[:, :, None] * q).reshape(n, QK_K)


# ------------------------------------------------------------------------------ the table and tensors

@dataclass(frozen=True)
class BlockType:
    """One GGUF storage type: weights per block, bytes per block, and its dequantization."""
    name: str
    block_size: int
    bytes_per_block: int
    dequantize: Callable[[np.ndarray], np.ndarray]   # (n_blocks, bytes_per_block) uint8 -> (n_blocks, block_size)


BLOCK_TYPES: dict[str, BlockType] = {t.name: t for t in (
    BlockType("F32", 1, 4, dequantize_f32),
    BlockType("F16", 1, 2, dequantize_f16),
    BlockType("BF16", 1, 2, dequantize_bf16),
    BlockType("Q8_0", QK, 34, dequantize_q8_0),
    BlockType("Q4_0", QK, 18, dequantize_q4_0),
    BlockType("Q4_1", QK, 20, dequantize_q4_1),
    BlockType("Q5_0", QK, 22, dequantize_q5_0),
    BlockType("Q5_1", QK, 24, dequantize_q5_1),
    BlockType("Q2_K", QK_K, 84, dequantize_q2_k),
    BlockType("Q3_K", QK_K, 110, dequantize_q3_k),
    BlockType("Q4_K", QK_K, 144, dequantize_q4_k),
    BlockType("Q5_K", QK_K, 176, dequantize_q5_k),
    BlockType("Q6_K", QK_K, 210, dequantize_q6_k),
)}


def block_type(type_name: str) -> BlockType:
    """The BlockType called type_name (a GGML type name such as "Q4_K"), or a CheckpointError naming those known."""
    kind = BLOCK_TYPES.get(type_name)
    if kind is None:
        raise CheckpointError(f"GGUF tensor type {type_name!r} is not one npllama can dequantize; it reads "
                              f"{', '.join(BLOCK_TYPES)}. Re-quantize the model to one of those types")
    return kind


def _tensor_bytes(data: np.ndarray, kind: BlockType, shape: tuple[int, ...]) -> np.ndarray:
    """The raw bytes of a tensor of this shape and type, checked: -> (n_bytes,) uint8, a view where data allows."""
    row = shape[-1] if shape else 1
    if row % kind.block_size:
        raise CheckpointError(f"a {kind.name} tensor of shape {shape} has rows of {row} weights, not a whole "
                              f"number of {kind.name} blocks of {kind.block_size}; the file is corrupt")
    raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    expected = math.prod(shape) // kind.block_size * kind.bytes_per_block
    if raw.size != expected:
        raise CheckpointError(f"a {kind.name} tensor of shape {shape} takes {expected} bytes "
                              f"({kind.bytes_per_block} per {kind.block_size} weights), but {raw.size} "
                              f"were given; the file is truncated or its header is wrong")
    return raw


def _dequantize_blocks(kind: BlockType, blocks: np.ndarray) -> np.ndarray:
    """(n_blocks, bytes_per_block) uint8 -> (n_blocks * block_size,) float32, a chunk of blocks at a time."""
    out = np.empty(len(blocks) * kind.block_size, dtype=np.float32)
    step = max(1, _CHUNK_WEIGHTS // kind.block_size)
    for start in range(0, len(blocks), step):
        stop = min(start + step, len(blocks))
        out[start * kind.block_size:stop * kind.block_size] = kind.dequantize(blocks[start:stop]).reshape(-1)
    return out


def dequantize(data: np.ndarray, type_name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A whole GGUF tensor as float32: data (its raw bytes as stored) -> array of `shape`, float32.

    data: the tensor's bytes in file order, any dtype and shape (a memory map of the file, the gguf
    reader's array); only its bytes are read. type_name: a key of BLOCK_TYPES. shape: the NumPy
    shape (rows ..., row length), the reverse of GGUF's dimension order; the row length must be a
    multiple of the type's block size and data must hold exactly the bytes the shape needs
    (CheckpointError otherwise).
    """
    kind = block_type(type_name)
    shape = tuple(int(n) for n in shape)
    raw = _tensor_bytes(data, kind, shape)
    return _dequantize_blocks(kind, raw.reshape(-1, kind.bytes_per_block)).reshape(shape)


def dequantize_rows(data: np.ndarray, type_name: str, shape: tuple[int, ...], rows: slice) -> np.ndarray:
    """A range of rows of a GGUF tensor as float32, without expanding the rest: -> (len(rows), *shape[1:]) float32.

    data, type_name, shape: as for ``dequantize`` (shape has at least 2 dimensions). rows: a slice
    of the first axis, any start, stop and step. Only the selected rows' bytes are read, so a large
    matrix (the LM head) kept quantized in memory can be used a piece at a time. Equal to
    ``dequantize(data, type_name, shape)[rows]``, bit for bit.
    """
    kind = block_type(type_name)
    shape = tuple(int(n) for n in shape)
    if len(shape) < 2:
        raise CheckpointError(f"dequantize_rows needs a tensor of at least 2 dimensions, got shape {shape}")
    raw = _tensor_bytes(data, kind, shape)
    per_row = math.prod(shape[1:]) // kind.block_size * kind.bytes_per_block
    picked = raw.reshape(shape[0], per_row)[rows]                          # (k, per_row), a view
    blocks = picked.reshape(-1, kind.bytes_per_block)
    return _dequantize_blocks(kind, blocks).reshape(len(picked), *shape[1:])
