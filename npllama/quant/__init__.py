"""Quantized weights, stated in NumPy.

gguf_blocks   GGUF's block types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K ... Q6_K, F16, BF16): each one's
              byte layout and its dequantization, bit for bit as llama.cpp's gguf package computes it;
              ``dequantize`` for a whole tensor, ``dequantize_rows`` for a range of rows.
weight_only   the int8 (per channel) and int4 (per group, scale and zero) weight-only schemes of
              torch's quantized matrix-vector kernels, their error bounds, the kernels' constraints,
              and GGUF Q4_0 / Q4_1 blocks expressed as int4 groups.
matrix        QuantizedMatrix: a weight matrix kept as GGUF blocks and dequantized a piece at a time
              when the model uses it (``npllama.load(path, weights="gguf")``).
"""

from .gguf_blocks import (BLOCK_TYPES, BlockType, block_type, dequantize, dequantize_bf16, dequantize_f16,
                          dequantize_f32, dequantize_q2_k, dequantize_q3_k, dequantize_q4_0, dequantize_q4_1,
                          dequantize_q4_k, dequantize_q5_0, dequantize_q5_1, dequantize_q5_k, dequantize_q6_k,
                          dequantize_q8_0, dequantize_rows, q4_0_fields, q4_1_fields, unpack_k_scales_mins,
                          unpack_q3_k_scales)
from .matrix import QuantizedMatrix
from .weight_only import (INT4_GROUP_SIZES, SCALE_DTYPES, dequantize_int4, dequantize_int8, int4_error_bound,
                          int4pack_scales_and_zeros, int8_error_bound, q4_0_as_int4, q4_0_as_int4_error_bound,
                          q4_1_as_int4, q4_1_as_int4_error_bound, quantize_int4, quantize_int8, round_scales)

__all__ = [
    "QuantizedMatrix",
    "BLOCK_TYPES", "BlockType", "block_type", "dequantize", "dequantize_rows",
    "dequantize_f32", "dequantize_f16", "dequantize_bf16", "dequantize_q8_0", "dequantize_q4_0",
    "dequantize_q4_1", "dequantize_q5_0", "dequantize_q5_1", "dequantize_q2_k", "dequantize_q3_k",
    "dequantize_q4_k", "dequantize_q5_k", "dequantize_q6_k", "q4_0_fields", "q4_1_fields",
    "unpack_q3_k_scales", "unpack_k_scales_mins",
    "SCALE_DTYPES", "INT4_GROUP_SIZES", "round_scales", "quantize_int8", "dequantize_int8",
    "int8_error_bound", "quantize_int4", "dequantize_int4", "int4_error_bound",
    "int4pack_scales_and_zeros", "q4_0_as_int4", "q4_1_as_int4", "q4_0_as_int4_error_bound",
    "q4_1_as_int4_error_bound",
]
