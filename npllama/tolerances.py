"""Every numerical tolerance the tests use, written once, per dtype, with its reason.

A tolerance here is a claim about where two computations may legitimately differ (rounding,
a different but equivalent order of operations, an oracle that computes in lower precision).
Anything beyond it is a bug. Comparisons are "norm-relative" unless said otherwise:
max|a - b| <= rtol * max|b|.
"""

from __future__ import annotations

import numpy as np

FLOAT32_EPS = float(np.finfo(np.float32).eps)   # 1.19e-7: one unit in the last place at 1.0

# ------------------------------------------------------------------------------ rotary (rope)
# NumPy vs Torch rotary embeddings. Both share npllama's float64 inverse-frequency table (bit for
# bit) and compute float64 angles; only libm's cos/sin (last-ulp differences) and, in float32,
# the cast of cos/sin and the rotation's products/sum in float32 may differ.
ROPE_PARITY_RTOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-6}

# npllama's float64 inv_freq vs transformers' rope init functions. transformers builds the table
# in float32: theta_i = base ** (2i/d) with 2i/d rounded to float32 errs by about
# |ln theta_i| * eps relative, so frequency i may differ by
#     ROPE_TABLE_VS_TRANSFORMERS_RTOL * (1 + |ln theta_i|) * cond      (relative to theta_i)
# where cond is how much the variant's blend amplifies a float32 error: 1 for default, linear and
# dynamic; factor for YaRN (ramp gamma_i errs by ~eps, and d inv / d gamma ~ factor x inv at the
# interpolated end); factor * high_freq_factor / (high_freq_factor - low_freq_factor) for llama3
# (the smoothing s = (old_ctx / wavelength - low) / (high - low) is formed from a float32 wavelength).
ROPE_TABLE_VS_TRANSFORMERS_RTOL = 4 * FLOAT32_EPS

# cos/sin (and rotated q/k) vs transformers' rotary module. transformers forms the angle m * theta
# in float32 from its float32 table, so its angle is off by up to about (table error + one
# rounding) * angle: cos and sin then differ by up to that many radians. The test allows
# ROPE_ANGLE_VS_TRANSFORMERS_RTOL * (largest angle) + ROPE_PARITY_RTOL[float32], times the
# attention scaling and the size of x (about 1e-4 in cos at 2K positions).
ROPE_ANGLE_VS_TRANSFORMERS_RTOL = 16 * FLOAT32_EPS

# Whole tiny models (each rope variant) vs transformers' logits in float32, full sequence and
# cached decoding: float32 matmul/softmax reassociation through a few layers, plus the float32
# angles above at the short positions these models use.
ROPE_MODEL_VS_TRANSFORMERS_RTOL_FLOAT32 = 1e-4

# ------------------------------------------------------------------------------ the spec against its formula
# Each op of npllama (tests/test_spec_*.py) against its formula written apart from it (Python
# floats with math.fsum, float64 loops or einsum, complex numbers for the rotation), norm-relative.
# In float64 the two differ only in the order of sums and in libm's last ulp (exp, tanh, cos,
# sqrt): a few ulps of O(1) values, and 1e-12 leaves three orders of headroom over eps (2.2e-16)
# for the sums of a few hundred terms the tests draw. In float32 the op rounds each step to
# float32 (u = 6e-8) and its sums of up to a few hundred terms err like sqrt(K) u: 1e-5 (~80 eps).
SPEC_VS_FORMULA_RTOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-5}

# ------------------------------------------------------------------------------ attention
# flash_attention vs naive_attention (NumPy), norm-relative on the output. Both compute the same
# scores and the same softmax; they differ only in the order of sums: the tile GEMMs block the
# head_dim dot products differently from one big GEMM, the softmax denominator and p @ v are summed
# tile by tile and rescaled by exp(m - m') (one extra rounding per tile), and naive divides before
# p @ v while flash divides after. Each costs a few ulps of O(1) values: 1e-12 leaves float64 three
# orders of headroom over its eps (2.2e-16); 1e-5 in float32 is ~80 eps, enough for a few hundred
# tiles of re-association at the lengths the tests draw.
ATTENTION_FLASH_RTOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-5}

# Log-sum-exp rows returned by flash_attention vs log(sum(exp(scores))) computed directly. An
# absolute error e in lse is a relative error e in the softmax normaliser exp(lse), so lse is held
# to the same numbers, absolutely, times max(1, |lse|) (the last ulp of lse itself grows with |lse|).
ATTENTION_LSE_RTOL = ATTENTION_FLASH_RTOL

# Torch (parity.attention: naive, flash, and torch's fused scaled_dot_product_attention) vs the
# NumPy reference, norm-relative. Another BLAS (oneDNN/MKL vs OpenBLAS) blocks the dot products
# differently and another exp (SLEEF vs NumPy's SIMD exp) rounds differently in the last ulp; the
# fused kernel also tiles with its own block sizes. Same order of error as flash vs naive.
ATTENTION_PARITY_RTOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-5}

# ------------------------------------------------------------------------------ the Torch backend (parity)
# The Torch backend in each dtype against npllama in float64 evaluating the *same* weights (the
# Torch model's weights, rounded to its dtype, read back exactly in float64). The reference is then
# exact to ~1e-16, so what is measured is the backend's arithmetic alone, not the rounding of the
# weights: a bug that moves a value by one part in a thousand cannot hide under bfloat16's
# quantisation of the checkpoint. Errors are norm-relative, max|a - b| / max|b|, per op output.
#
# "op": one op (rms_norm, linear, silu, feed_forward, rope, attention, loss, ...) on identical
# inputs already rounded to the dtype. A handful of roundings per output element (a dot product
# of length K rounds K times but its error grows like sqrt(K) u, and the norm-relative measure
# divides by the largest element); u is the unit roundoff: 1.1e-16, 6.0e-8, 4.9e-4 (float16,
# 10 mantissa bits), 3.9e-3 (bfloat16, 7 mantissa bits).
#
# "layer": every op of one decoder layer fed the reference's input to that layer (rounded to the
# dtype): `npllama parity --isolate`. Inside a layer the ops chain (norm -> q/k/v -> attention ->
# wo -> residual -> norm -> SwiGLU -> residual), so a few single-op errors add up, and attention
# amplifies its input error by the size of its scores; nothing carries over from earlier layers.
#
# "model": every op of a whole decoder run end to end, as `npllama parity` reports it by default.
# Every op now also sees the rounding its inputs picked up upstream, which the residual stream
# carries and the next norm re-amplifies, so low precision needs a much wider bar over 30 layers.
#
# Worst norm-relative errors measured (npllama/tolerances.py values leave 3-30x room over them):
#                 tiny random models (1-4 layers,      SmolLM2-135M, 30 layers, 5- and 200-token prompts
#                 weights ~ N(0, c^2/fan_in), c<=1.5)  each layer isolated     end to end
#   float64       2e-15                                9e-15                   3e-14
#   float32       2.5e-6                               2.6e-6                  5.9e-6
#   float16       7.7e-3                               7.5e-3                  1.3e-2
#   bfloat16      7.8e-2                               3.3e-2                  1.9e-1
# The end-to-end bfloat16 bar is wide because bfloat16 keeps 8 significant bits through 30
# layers of SmolLM2's outsized residual channels; to find a bug in bfloat16, isolate the layers.
#
# A tensor stored in a coarser dtype than the model's cannot be more exact than that dtype: the
# logits are float32 by contract in both backends, so in a float64 run they are held to float32's
# bar (the rule is parity_rtol(model dtype) maxed with parity_rtol(tensor dtype)).
PARITY_RTOL = {
    #            op      layer   model
    "float64":  (1e-12,  1e-10,  1e-10),   # u = 1.1e-16: last-ulp differences of BLAS and libm
    "float32":  (1e-5,   5e-5,   1e-4),    # u = 6.0e-8: dot products up to 1536 long, re-associated
    "float16":  (4e-3,   2e-2,   5e-2),    # u = 4.9e-4: 8 u per op
    "bfloat16": (3e-2,   8e-2,   3e-1),    # u = 3.9e-3: 8 u per op
}


# ------------------------------------------------------------------------------ tensor parallelism
# The Torch backend split over N ranks (parity.tp) against the same backend in one process, same
# dtype and weights, norm-relative on the logits of every step. The split changes only the order of
# the sums: wo's and w2's dot products become N partial sums that the all-reduce adds, each rank's
# GEMMs are narrower (BLAS blocks them otherwise), and those differences carry through the layers.
# Float32 reassociation, as the backend against the reference. Measured: SmolLM2-135M on 3 ranks,
# 1.5e-6 on the logits of a prefill; tiny random models on 2 ranks (tests/test_tp.py), at most 5.1e-7
# over 60 draws.
TENSOR_PARALLEL_RTOL = {np.dtype(np.float32): 2e-5}


def dtype_name(dtype) -> str:
    """'float32', 'bfloat16', ... from a NumPy dtype, a torch dtype (no torch import) or a name."""
    if isinstance(dtype, (np.dtype, type)):
        return np.dtype(dtype).name
    return str(dtype).removeprefix("torch.")


def parity_rtol(dtype, kind: str = "model", tensor_dtype=None) -> float:
    """The parity bar for a Torch run in ``dtype`` (kind "op", "layer" or "model"), see PARITY_RTOL.

    tensor_dtype: the dtype the compared tensor is stored in, when coarser than the model's.
    """
    index = {"op": 0, "layer": 1, "model": 2}[kind]
    name = dtype_name(dtype)
    if name not in PARITY_RTOL:
        raise KeyError(f"no parity tolerance for dtype {name!r}; known: {', '.join(PARITY_RTOL)}")
    rtol = PARITY_RTOL[name][index]
    if tensor_dtype is not None and dtype_name(tensor_dtype) in PARITY_RTOL:
        rtol = max(rtol, PARITY_RTOL[dtype_name(tensor_dtype)][index])
    return rtol


# ------------------------------------------------------------------------------ quantized weights
# npllama.load(path, weights="gguf") (the blocks kept, npllama.quant.matrix) vs weights="float32"
# (every tensor dequantized up front), float32 logits and every product x @ w, norm-relative. The
# weights are bit for bit the same float32 numbers (the same dequantizer); each output element is
# still one dot product over the whole row, but BLAS multiplies a (k, in) piece of rows where the
# float model multiplies the whole matrix in its own memory order (layout.py), so it blocks and
# vectorises the sums differently: float32 reassociation through the layers, as in
# FORMAT_VS_TRANSFORMERS_RTOL. Measured: 4.5e-7 to 1.1e-6 on SmolLM2-135M's logits; up to 1.9e-5 on
# the tiny models with random blocks the tests draw, some of which are ill-conditioned enough that
# the float32 model alone is 1.7e-5 from the same model in float64 (42 drawn models: median 1e-6).
# So the bar is FORMAT_VS_TRANSFORMERS_RTOL's, 1e-4: a bug (a wrong row, block or scale) is O(1).
GGUF_BLOCKS_VS_FLOAT32_RTOL = 1e-4

# The Torch backend with quantized weights (parity.quant: torch's weight-only int8 / int4 kernels)
# against npllama in float64 on exactly the weights the kernels hold (their dequantized values,
# parity/quant_report.py). Each kernel forms its weights as the spec does (int8: q * scale rounded
# to float32; int4: one fused multiply-add, bit for bit on AVX-512, within 2**-23 relative
# elsewhere) and sums the products in float32, so the error is the backend's float arithmetic in
# its dtype: PARITY_RTOL's. With bfloat16 activations a CPU with oneDNN's brgemm may also round
# each weight to bfloat16 before it multiplies (npllama.quant.weight_only): a relative 2**-9 per
# weight, below bfloat16's per-op rounding that PARITY_RTOL already allows. Measured on SmolLM2-135M
# (12-token prompt, end to end): float32 7.6e-6, bfloat16 5.8e-2 (int8, int4 and the GGUF's Q4_1).
#                  layer (isolated)  model (end to end)
QUANT_KERNEL_PARITY_RTOL = {name: (bars[1], bars[2]) for name, bars in PARITY_RTOL.items()
                            if name in ("float32", "bfloat16", "float16")}

# torch's int4 weights formed by torch (parity.quant.Int4Weight.dense: torch.addcmul, (q - 8) * scale
# + zero) vs npllama.quant.dequantize_int4 (the value rounded once, as one fused multiply-add).
# Bit for bit where torch fuses the multiply-add (its AVX-512 kernels); elsewhere the product is
# rounded before the sum, which moves a weight by at most 2**-23 of |zero| + 8 |scale| + |w|
# (one float32 rounding of each term). Elementwise, per weight, not norm-relative.
INT4_TWO_ROUNDINGS_RTOL = 2.0 ** -23

# torch's fused SDPA on CUDA in float16 (its flash kernel) vs the NumPy float64 reference on the
# same float16-rounded inputs. The kernel accumulates in float32 but rounds P to float16 before
# P @ V and rounds the output to float16: each a half-ulp (4.9e-4) relative error, the second on
# values of size up to max|v|. 5e-3 allows both with a few-fold margin. (Only on a CUDA machine.)
ATTENTION_CUDA_FLOAT16_RTOL = 5e-3

# ------------------------------------------------------------------------------ training (npllama train)
# The loss the Torch trainer reports for a batch vs npllama's Transformer.loss of the same ids on
# the same weights, relative. Logits are float32 by contract in both backends, whatever the weights'
# dtype, and both losses are computed from them in float32: log-sum-exp over the vocabulary and a
# mean over the batch, summed in different orders (torch's logsumexp vs NumPy's max/exp/sum), each
# a few float32 roundings (eps 1.2e-7) of values of size ~1-10, plus the logits' own float32
# parity error. Measured: 3.6e-8 relative on a loss of 6 (float64 weights). 1e-5 leaves ~100x.
# No autocast here: a bfloat16 run is not compared with the reference.
TRAIN_LOSS_RTOL = 1e-5

# ------------------------------------------------------------------------------ checkpoint formats
# A checkpoint loaded by npllama.formats (HF safetensors, Meta .pth, GGUF) vs transformers'
# LlamaForCausalLM on the same weights, float32 logits, full sequence and cached decoding. The
# weights are bit-identical after loading (bf16/f16 widen exactly; dequantisation is the same
# formula), so only float32 reassociation in matmuls/softmax and the float32 rotary angles of
# transformers remain: observed ~1e-6 on tiny models and the 30-layer default model.
FORMAT_VS_TRANSFORMERS_RTOL = 1e-4

# ------------------------------------------------------------------------------ mapped weights
# A model whose matrices stay in their files (npllama.load(..., mapped=True), formats/mapped.py) vs
# the same checkpoint read into memory, logits and every product, norm-relative. The weights are the
# same numbers (the stored values widened exactly, bit for bit, in both); each output element is
# still one dot product over its whole row, but BLAS multiplies a (k, in) piece of rows where the
# in-memory model multiplies the whole matrix in its own memory order (layout.py), so the sums are
# blocked differently: float32 reassociation through the layers, as GGUF_BLOCKS_VS_FLOAT32_RTOL, and
# the same bar for the same reason. Measured: 3e-7 to 1e-6 on the tiny models of
# tests/test_mapped.py; the Llama-3.2-1B shape, mapped, is 3.1e-6 from transformers in float32.
MAPPED_VS_IN_MEMORY_RTOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-4}

# ------------------------------------------------------------------------------ padded batches
# A row of a padded batch vs the same row run alone, in npllama (and the Torch mirror). Padding
# changes no number a real token's computation uses: padded keys get exp(-inf) = 0 exactly, and
# the rotary positions are the row's own. What differs is the order of sums: the softmax
# denominator and p @ v reduce over kv_len slots of which some are exact zeros, and BLAS blocks a
# (batch, seq) product differently from a (1, seq) one, so a few float32 roundings move. Measured:
# below 1e-6 through two layers of the tiny models the tests draw; 1e-5 in float32 (~80 eps) is the
# bar flash vs naive attention uses for the same kind of re-association, and 1e-12 in float64.
PADDED_VS_ALONE_RTOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 1e-5}
