"""The quantized-weight spec (npllama.quant) against its oracles.

* GGUF blocks: every block type's dequantization equals the gguf package's bit for bit, on drawn
  blocks (random quant bytes with drawn finite float16 scales; whole random blocks whose scales
  happen to be finite) and on gguf's own quantization of drawn weights, where gguf can quantize
  the type. dequantize_rows equals the matching rows of dequantize; bad input is a CheckpointError.
* Weight-only int8 / int4: quantize -> dequantize stays within the stated error bound, for drawn
  matrices, magnitudes, group sizes and scale dtypes; GGUF Q4_0 / Q4_1 blocks as int4 groups give
  the file's weights, exactly where the bound says 0.
* Where torch is installed, its aten kernels compute with the spec's weights: an identity matrix as
  activations reads the kernel's dequantized weights back (1 * w + 0 * ... is exact), bit for bit
  where the spec says so; and x @ w.T agrees with float64 NumPy within float32 accumulation error.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from npllama.errors import CheckpointError, InputError
from npllama.quant import gguf_blocks
from npllama.quant import (BLOCK_TYPES, INT4_GROUP_SIZES, SCALE_DTYPES, dequantize, dequantize_int4,
                           dequantize_int8, dequantize_q4_0, dequantize_q4_1, dequantize_rows, int4_error_bound,
                           int4pack_scales_and_zeros, int8_error_bound, q4_0_as_int4, q4_0_as_int4_error_bound,
                           q4_1_as_int4, q4_1_as_int4_error_bound, quantize_int4, quantize_int8, round_scales)

QUANT_NAMES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
FLOAT_NAMES = ["F32", "F16", "BF16"]

# Byte offsets of each block's float16 fields (scales d, minimums m / dmin), read off the block
# structs of llama.cpp's ggml-common.h: an independent statement of the layouts under test.
FLOAT16_FIELDS = {
    "Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
}

# ---------------------------------------------------------------------------- tolerances, each once
# A kernel sums in float32 and rounds the sum to its output dtype (the activations'): that moves y
# by at most OUTPUT_ROUNDING * |y|, the dtype's unit roundoff 2**-precision (bfloat16 keeps 8
# significant bits, float16 11); a float32 output is the float32 sum itself.
BFLOAT16_UNIT_ROUNDOFF = 2.0 ** -8
OUTPUT_ROUNDING = {"float32": 0.0, "bfloat16": BFLOAT16_UNIT_ROUNDOFF, "float16": 2.0 ** -11}
# Below the dtype's smallest normal number the spacing stops shrinking: a subnormal output (float16
# below 6.1e-5, tiny products of small weights) may move by half the smallest subnormal, absolutely.
OUTPUT_ROUNDING_FLOOR = {"float32": 0.0, "bfloat16": float(2.0 ** -134), "float16": float(2.0 ** -25)}

# A float32 sum of K products, in any order, fused or not, is within gamma_K * sum_k |x_k w_k| of
# the exact sum (Higham, "Accuracy and Stability of Numerical Algorithms", section 3.1), where
# gamma_K = K u / (1 - K u) < 1.01 * K * u for the K <= 1024 used here (u = 2**-24).
FLOAT32_DOT_GAMMA_PER_TERM = 1.01 * 2.0 ** -24

# torch's int4 CPU kernel off AVX-512 evaluates (q - 8) * scale + zero with two roundings (zero - 8
# scale first on AVX2, the product first elsewhere); each moves it by at most 2**-24 of a term no
# larger than |zero| + 8 |scale| + |w|. On AVX-512 it is one fused multiply-add: the spec, exactly.
INT4_TWO_ROUNDINGS_RTOL = 2.0 ** -23


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """float32 arrays equal bit for bit (NaNs, the sign of zero and all)."""
    return a.dtype == b.dtype == np.float32 and a.shape == b.shape and np.array_equal(a.view(np.uint32),
                                                                                     b.view(np.uint32))


def _qtype(name: str) -> gguf.GGMLQuantizationType:
    return gguf.GGMLQuantizationType[name]


def _write_float16_fields(blocks: np.ndarray, name: str, values: list[float]) -> np.ndarray:
    """Blocks (n, bytes) with their float16 fields replaced by values, in block order."""
    blocks = blocks.copy()
    fields = FLOAT16_FIELDS[name]
    halves = np.array(values, dtype=np.float16).reshape(len(blocks), len(fields)).view(np.uint8)
    for i, offset in enumerate(fields):
        blocks[:, offset:offset + 2] = halves[:, 2 * i:2 * i + 2]
    return blocks


def _finite_fields(blocks: np.ndarray, name: str) -> bool:
    """Whether every float16 field (scale, minimum) of the blocks is finite."""
    return all(np.isfinite(blocks[:, o:o + 2].view(np.float16)).all() for o in FLOAT16_FIELDS[name])


@st.composite
def quant_blocks(draw, name: str) -> np.ndarray:
    """1-4 blocks of a quantized type: random bytes, float16 fields drawn finite (any finite half)."""
    kind = BLOCK_TYPES[name]
    n = draw(st.integers(1, 4))
    raw = np.frombuffer(draw(st.binary(min_size=n * kind.bytes_per_block, max_size=n * kind.bytes_per_block)),
                        dtype=np.uint8).reshape(n, kind.bytes_per_block)
    halves = st.floats(width=16, allow_nan=False, allow_infinity=False)
    values = draw(st.lists(halves, min_size=n * len(FLOAT16_FIELDS[name]), max_size=n * len(FLOAT16_FIELDS[name])))
    return _write_float16_fields(raw, name, values)


def _random_blocks(data_bytes: bytes, name: str) -> np.ndarray:
    kind = BLOCK_TYPES[name]
    n = len(data_bytes) // kind.bytes_per_block
    return np.frombuffer(data_bytes[:n * kind.bytes_per_block], dtype=np.uint8).reshape(n, kind.bytes_per_block)


def _weights(seed: int, shape: tuple[int, ...], exponent: int, pattern: str) -> np.ndarray:
    """Drawn float32 weights of magnitude ~10**exponent, in one of a few shapes of distribution."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape)
    if pattern == "offset":        # far from 0 compared with the spread: stresses stored zeros
        w = w + rng.choice([-1.0, 1.0]) * 10.0 ** rng.integers(1, 4)
    elif pattern == "positive":    # minimum near 0: Q4_1's m tiny next to d
        w = np.abs(w)
    elif pattern == "constant":    # equal weights along each row: scale 0
        w = np.broadcast_to(w[..., :1], shape).copy()
    elif pattern == "zero_rows":
        w[::2] = 0.0
    elif pattern == "outlier":
        w.flat[rng.integers(w.size)] *= 100.0
    return (w * 10.0 ** exponent).astype(np.float32)


PATTERNS = st.sampled_from(["normal", "offset", "positive", "constant", "zero_rows", "outlier"])
SEEDS = st.integers(0, 2 ** 32 - 1)
# Magnitudes (10**e) of weights given to gguf's quantizer: the "offset" pattern adds up to 10**3,
# and a float16 minimum must stay below 65504.
GGUF_EXPONENTS = st.integers(-6, 1)


# ============================================================================ GGUF blocks

def test_block_table_matches_gguf():
    for name, kind in BLOCK_TYPES.items():
        assert gguf.GGML_QUANT_SIZES[_qtype(name)] == (kind.block_size, kind.bytes_per_block), name
        assert kind.name == name


@pytest.mark.parametrize("name", QUANT_NAMES)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_blocks_with_drawn_scales_match_gguf(name, data):
    blocks = data.draw(quant_blocks(name))
    ours = BLOCK_TYPES[name].dequantize(blocks)
    assert _same_bits(ours, gguf.quants.dequantize(blocks, _qtype(name)))
    assert np.isfinite(ours).all()       # finite scales always give finite weights (docstring's arithmetic)


@pytest.mark.parametrize("name", QUANT_NAMES + FLOAT_NAMES)
# Random bytes make a non-finite float16 scale about once in 32 fields, and a few blocks hold
# several: for some seeds most draws are left out, which is expected here, not a slow strategy.
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(raw=st.binary(min_size=210, max_size=4 * 210))
def test_random_blocks_match_gguf(name, raw):
    """Whole random blocks. Non-finite scales are left out (inf * 0 is a NaN whose payload is not the
    spec's business); the plain float types keep them: both sides convert the same bits the same way."""
    blocks = _random_blocks(raw, name)
    assume(name in FLOAT_NAMES or _finite_fields(blocks, name))
    assert _same_bits(BLOCK_TYPES[name].dequantize(blocks), gguf.quants.dequantize(blocks, _qtype(name)))


def _gguf_quantizes(name: str) -> bool:
    """Whether this gguf package can quantize the type (it cannot quantize most K-quants)."""
    try:
        gguf.quants.quantize(np.zeros((1, BLOCK_TYPES[name].block_size), np.float32), _qtype(name))
    except NotImplementedError:
        return False
    return True


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=pytest.mark.skipif(not _gguf_quantizes(name), reason=f"gguf cannot quantize {name}"))
    for name in QUANT_NAMES + FLOAT_NAMES])
@settings(max_examples=25, deadline=None)
@given(seed=SEEDS, rows=st.integers(1, 5), blocks=st.integers(1, 3), exponent=GGUF_EXPONENTS, pattern=PATTERNS)
def test_gguf_quantized_weights_round_trip(name, seed, rows, blocks, exponent, pattern):
    kind = BLOCK_TYPES[name]
    shape = (rows, blocks * max(kind.block_size, 32))
    raw = gguf.quants.quantize(_weights(seed, shape, exponent, pattern), _qtype(name))
    ours = dequantize(raw, name, shape)
    assert ours.shape == shape
    assert _same_bits(ours, gguf.quants.dequantize(raw, _qtype(name)).reshape(shape))


def _tensor_bytes(data, name: str, n_rows: int, row_blocks: int) -> np.ndarray:
    """Raw bytes of a tensor of n_rows rows of row_blocks blocks, float16 fields finite."""
    kind = BLOCK_TYPES[name]
    n = n_rows * row_blocks
    blocks = np.frombuffer(data.draw(st.binary(min_size=n * kind.bytes_per_block,
                                               max_size=n * kind.bytes_per_block)), np.uint8)
    blocks = blocks.reshape(n, kind.bytes_per_block)
    if name in FLOAT16_FIELDS:
        values = data.draw(st.lists(st.floats(width=16, allow_nan=False, allow_infinity=False),
                                    min_size=n * len(FLOAT16_FIELDS[name]), max_size=n * len(FLOAT16_FIELDS[name])))
        blocks = _write_float16_fields(blocks, name, values)
    return blocks.reshape(-1)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), name=st.sampled_from(QUANT_NAMES + FLOAT_NAMES), n_rows=st.integers(1, 7),
       inner=st.sampled_from([(), (2,), (3,)]), start=st.none() | st.integers(-9, 9),
       stop=st.none() | st.integers(-9, 9), step=st.none() | st.sampled_from([1, 2, 3, -1, -2]))
def test_dequantize_rows_is_a_slice_of_dequantize(data, name, n_rows, inner, start, stop, step):
    kind = BLOCK_TYPES[name]
    row_blocks = data.draw(st.integers(1, 3))
    shape = (n_rows, *inner, row_blocks * kind.block_size)
    raw = _tensor_bytes(data, name, int(np.prod(shape[:-1])), row_blocks)
    rows = slice(start, stop, step)
    piece = dequantize_rows(raw, name, shape, rows)
    whole = dequantize(raw, name, shape)
    assert _same_bits(piece, np.ascontiguousarray(whole[rows]))


def test_dequantize_in_chunks_matches_gguf(monkeypatch):
    """A tensor larger than one chunk of work is put together in the right order."""
    monkeypatch.setattr(gguf_blocks, "_CHUNK_WEIGHTS", 3 * 256)
    rng = np.random.default_rng(7)
    for name in QUANT_NAMES:
        shape = (5, 4 * 256)
        kind = BLOCK_TYPES[name]
        n = shape[0] * shape[1] // kind.block_size
        blocks = rng.integers(0, 256, (n, kind.bytes_per_block), dtype=np.uint8)
        blocks = _write_float16_fields(blocks, name, rng.standard_normal(n * len(FLOAT16_FIELDS[name])).tolist())
        raw = blocks.reshape(shape[0], -1)
        assert _same_bits(dequantize(raw, name, shape), gguf.quants.dequantize(raw, _qtype(name)))


def test_dequantize_reads_any_dtype_as_bytes():
    """The gguf reader hands F16 tensors over as float16 arrays, quantized ones as uint8 rows."""
    w = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float16)
    assert _same_bits(dequantize(w, "F16", (3, 8)), w.astype(np.float32))
    assert _same_bits(dequantize_rows(w, "F16", (3, 8), slice(1, 3)), w[1:3].astype(np.float32))


def test_bad_tensors_are_checkpoint_errors():
    raw = np.zeros(2 * 18, np.uint8)
    with pytest.raises(CheckpointError, match="IQ2_XXS"):
        dequantize(raw, "IQ2_XXS", (1, 64))
    with pytest.raises(CheckpointError, match="truncated"):
        dequantize(raw[:-1], "Q4_0", (1, 64))
    with pytest.raises(CheckpointError, match="truncated"):
        dequantize_rows(np.zeros(3 * 18, np.uint8), "Q4_0", (1, 64), slice(0, 1))
    with pytest.raises(CheckpointError, match="whole number"):
        dequantize(raw, "Q4_0", (2, 36))
    with pytest.raises(CheckpointError, match="at least 2 dimensions"):
        dequantize_rows(raw, "Q4_0", (64,), slice(0, 1))
    with pytest.raises(CheckpointError, match="n_blocks, 18"):
        dequantize_q4_0(np.zeros((2, 20), np.uint8))
    assert issubclass(CheckpointError, ValueError)


# ============================================================================ int8 and int4, NumPy only

def _is_normal_scale(scale: np.ndarray, w: np.ndarray, scale_dtype: str) -> bool:
    """The int8 bound's domain: every row all zeros or with a normal scale in its dtype."""
    smallest_normal = 2.0 ** -14 if scale_dtype == "float16" else 2.0 ** -126
    return bool(np.all((scale >= smallest_normal) | ~np.any(w, axis=1)))


def _exponents(scale_dtype: str):
    # float16 holds scales of ~6e-5 .. 6e4: keep weights (the "offset" pattern adds up to 10**3) inside it
    return st.integers(-3, 1) if scale_dtype == "float16" else st.integers(-30, 30)


@settings(max_examples=80, deadline=None)
@given(data=st.data(), seed=SEEDS, out=st.integers(1, 6), n_in=st.integers(1, 48),
       scale_dtype=st.sampled_from(SCALE_DTYPES), pattern=PATTERNS)
def test_int8_error_within_bound(data, seed, out, n_in, scale_dtype, pattern):
    w = _weights(seed, (out, n_in), data.draw(_exponents(scale_dtype)), pattern)
    q, scale = quantize_int8(w, scale_dtype)
    assume(_is_normal_scale(scale, w, scale_dtype))
    assert q.dtype == np.int8 and q.shape == w.shape and np.abs(q.astype(int)).max() <= 127
    assert scale.dtype == np.float32 and scale.shape == (out,)
    assert np.array_equal(round_scales(scale, scale_dtype), scale)       # stored exactly in its dtype
    err = np.abs(w.astype(np.float64) - dequantize_int8(q, scale))
    assert (err <= int8_error_bound(scale)[:, None]).all()


@settings(max_examples=80, deadline=None)
@given(data=st.data(), seed=SEEDS, out=st.integers(1, 4), n_groups=st.integers(1, 3),
       group_size=st.sampled_from(INT4_GROUP_SIZES), scale_dtype=st.sampled_from(SCALE_DTYPES), pattern=PATTERNS)
def test_int4_error_within_bound(data, seed, out, n_groups, group_size, scale_dtype, pattern):
    w = _weights(seed, (out, n_groups * group_size), data.draw(_exponents(scale_dtype)), pattern)
    q, scales, zeros = quantize_int4(w, group_size, scale_dtype)
    assert q.dtype == np.uint8 and q.shape == w.shape and q.max() <= 15
    assert scales.shape == zeros.shape == (out, n_groups)
    assert np.array_equal(round_scales(scales, scale_dtype), scales)
    assert np.array_equal(round_scales(zeros, scale_dtype), zeros)
    err = np.abs(w.astype(np.float64) - dequantize_int4(q, scales, zeros)).reshape(out, n_groups, group_size)
    bound = int4_error_bound(w, scales, zeros)
    assert (err <= bound[..., None]).all()
    if scale_dtype == "float32":     # the docstring's claim: the grid moves by float32 resolution only
        lo, hi = zeros - 8.0 * scales, zeros + 7.0 * scales
        assert (bound <= scales / 2 + 2.0 ** -21 * np.maximum(np.abs(lo), np.abs(hi))).all()


def test_int4pack_scales_and_zeros_layout():
    scales = np.arange(6, dtype=np.float32).reshape(2, 3)
    zeros = -scales
    pairs = int4pack_scales_and_zeros(scales, zeros)
    assert pairs.shape == (3, 2, 2) and pairs.flags.c_contiguous
    assert pairs[2, 1, 0] == scales[1, 2] and pairs[2, 1, 1] == zeros[1, 2]


def test_bad_quantizer_input():
    with pytest.raises(InputError, match="group_size"):
        quantize_int4(np.ones((2, 48), np.float32), 32)
    with pytest.raises(InputError, match="scale_dtype"):
        quantize_int8(np.ones((2, 4), np.float32), "int8")
    with pytest.raises(CheckpointError, match="NaN or infinity"):
        quantize_int8(np.array([[1.0, np.nan]]))
    with pytest.raises(CheckpointError, match="float16"):
        quantize_int8(np.full((1, 4), 1e9, np.float32), "float16")


@st.composite
def q4_blocks(draw, name: str) -> np.ndarray:
    """Q4_0 / Q4_1 blocks with finite float16 fields, half of them from gguf's quantizer (realistic d and m)."""
    if draw(st.booleans()):
        return draw(quant_blocks(name))
    w = _weights(draw(SEEDS), (draw(st.integers(1, 4)), 32), draw(GGUF_EXPONENTS), draw(PATTERNS))
    return gguf.quants.quantize(w, _qtype(name))


@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_q4_0_and_q4_1_as_int4_groups(scale_dtype, data):
    for name, as_int4, bound_of, file_weights in [
            ("Q4_0", q4_0_as_int4, q4_0_as_int4_error_bound, dequantize_q4_0),
            ("Q4_1", q4_1_as_int4, q4_1_as_int4_error_bound, dequantize_q4_1)]:
        blocks = data.draw(q4_blocks(name))
        try:
            q, scales, zeros = as_int4(blocks, scale_dtype)
        except CheckpointError:                  # m + 8d beyond float16's range: refused, not rounded
            assert scale_dtype == "float16" and name == "Q4_1"
            continue
        ours = dequantize_int4(q, scales[:, None], zeros[:, None])
        theirs = file_weights(blocks)
        bound = bound_of(blocks, scale_dtype)
        exact = bound == 0
        assert np.array_equal(ours[exact], theirs[exact])       # as numbers: -0 may come out +0
        assert (np.abs(ours.astype(np.float64) - theirs) <= bound[:, None]).all()
        if name == "Q4_0" and scale_dtype != "bfloat16":
            assert exact.all()                   # d is a float16, zero is 0


@settings(max_examples=200, deadline=None)
@given(d=st.floats(width=16, allow_nan=False, allow_infinity=False),
       m=st.floats(width=16, allow_nan=False, allow_infinity=False))
def test_q4_1_as_int4_exact_when_m_and_8d_are_close(d, m):
    """q4_1_as_int4's docstring: float32 zero is exact when |m|, 8|d| have leading bits <= 12 places apart."""
    block = _write_float16_fields(np.zeros((1, 20), np.uint8), "Q4_1", [d, m])
    apart = abs(np.frexp(np.float64(m))[1] - np.frexp(8.0 * d)[1])
    assume(d == 0 or m == 0 or apart <= 12)                     # the claim's premise (1 draw in 100 misses it)
    assert q4_1_as_int4_error_bound(block)[0] == 0


# ============================================================================ torch's kernels

@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


TORCH_DTYPES = ("float32", "bfloat16", "float16")


def _tdtype(torch, name: str):
    return getattr(torch, name)


def _round_to(values: np.ndarray, name: str) -> np.ndarray:
    """float32 values rounded to a kernel's output dtype (round to nearest even), back in float32."""
    return values if name == "float32" else round_scales(values, name)


def _kernel_fma_is_single(torch) -> bool:
    """Whether torch's int4 CPU kernel evaluates (q - 8) * scale + zero as one fused multiply-add."""
    return "AVX512" in torch.backends.cpu.get_cpu_capability()


def _int8_mm(torch, x: np.ndarray, q: np.ndarray, scale: np.ndarray, act: str) -> np.ndarray:
    dt = _tdtype(torch, act)
    y = torch.ops.aten._weight_int8pack_mm(torch.from_numpy(x).to(dt), torch.from_numpy(q),
                                           torch.from_numpy(scale).to(dt))
    return y.float().numpy()


def _int4_mm(torch, x: np.ndarray, q: np.ndarray, scales: np.ndarray, zeros: np.ndarray, act: str) -> np.ndarray:
    dt = _tdtype(torch, act)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.from_numpy(q.astype(np.int32)), 1)
    pairs = torch.from_numpy(int4pack_scales_and_zeros(scales, zeros)).to(dt)
    group_size = q.shape[1] // scales.shape[1]
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(torch.from_numpy(x).to(dt), packed, group_size, pairs)
    return y.float().numpy()


def _dot_tolerance(x: np.ndarray, w: np.ndarray, ref: np.ndarray, act: str, w_deviation: np.ndarray) -> np.ndarray:
    """How far a kernel's x @ w.T may be from float64's: float32 accumulation over K terms, the output
    rounded to the activations' dtype, and weights the kernel may hold off the spec's by w_deviation
    (a bfloat16 rounding of each weight on oneDNN's int8 path; two roundings in int4 off AVX-512)."""
    abs_x = np.abs(x).astype(np.float64)
    moved = abs_x @ w_deviation.T                                               # |x @ (w' - w).T|
    summed = x.shape[1] * FLOAT32_DOT_GAMMA_PER_TERM * (abs_x @ (np.abs(w) + w_deviation).T)
    u = OUTPUT_ROUNDING[act]
    return u * np.abs(ref) + OUTPUT_ROUNDING_FLOOR[act] + (1 + u) * (moved + summed)


@pytest.mark.parametrize("act", TORCH_DTYPES)
@settings(max_examples=25, deadline=None)
@given(seed=SEEDS, out=st.integers(1, 9), n_in=st.integers(1, 70), m=st.integers(1, 5), pattern=PATTERNS)
def test_int8_kernel_uses_the_spec_weights(torch, act, seed, out, n_in, m, pattern):
    if act == "bfloat16":          # the bfloat16 kernel needs K % 16 == 0 (module docstring)
        n_in = 16 * (1 + n_in // 16)
    w = _weights(seed, (out, n_in), 0, pattern)
    q, scale = quantize_int8(w, act)
    spec = dequantize_int8(q, scale)
    # Reading the weights back: y = eye @ w.T = w.T exactly, then rounded to the output dtype.
    # q * scale is exact in float32 for bfloat16/float16 scales, so even a kernel that rounds the
    # weight to bfloat16 before multiplying reads back the same number.
    read = _int8_mm(torch, np.eye(n_in, dtype=np.float32), q, scale, act).T
    assert _same_bits(read, _round_to(spec, act))
    x = _round_to(np.random.default_rng(seed).standard_normal((m, n_in)).astype(np.float32), act)
    ref = x.astype(np.float64) @ spec.T.astype(np.float64)
    y = _int8_mm(torch, x, q, scale, act)
    w_deviation = BFLOAT16_UNIT_ROUNDOFF * np.abs(spec) if act == "bfloat16" else np.zeros_like(spec)
    assert (np.abs(y - ref) <= _dot_tolerance(x, spec, ref, act, w_deviation)).all()


def _int4_deviation(torch, spec: np.ndarray, scales: np.ndarray, zeros: np.ndarray) -> np.ndarray:
    """How far the kernel's dequantized weights may lie from the spec's (0 where it is a single fma)."""
    if _kernel_fma_is_single(torch):
        return np.zeros(spec.shape)
    g = spec.shape[1] // scales.shape[1]
    terms = np.repeat(np.abs(zeros) + 8.0 * np.abs(scales), g, axis=1) + np.abs(spec)
    return INT4_TWO_ROUNDINGS_RTOL * terms


def _check_int4_read_back(torch, q, scales, zeros, act: str, spec: np.ndarray) -> None:
    read = _int4_mm(torch, np.eye(q.shape[1], dtype=np.float32), q, scales, zeros, act).T
    deviation = _int4_deviation(torch, spec, scales, zeros)
    if not deviation.any():
        assert _same_bits(read, _round_to(spec, act))
    else:     # |round(a) - round(b)| <= |a - b| + u (|a| + |b|)
        u = OUTPUT_ROUNDING[act]
        assert (np.abs(read - spec) <= deviation + u * (2 * np.abs(spec) + deviation)).all()


@pytest.mark.parametrize("act", TORCH_DTYPES)
@settings(max_examples=20, deadline=None)
@given(seed=SEEDS, n_tiles=st.integers(1, 5), n_groups=st.integers(1, 3), group_size=st.sampled_from(INT4_GROUP_SIZES),
       m=st.integers(1, 5), pattern=PATTERNS)
def test_int4_kernel_uses_the_spec_weights(torch, act, seed, n_tiles, n_groups, group_size, m, pattern):
    out, n_in = 16 * n_tiles, n_groups * group_size          # the CPU kernel's N % 16 == 0, K % g == 0
    w = _weights(seed, (out, n_in), 0, pattern)
    q, scales, zeros = quantize_int4(w, group_size, act)     # scales and zeros in the activations' dtype
    spec = dequantize_int4(q, scales, zeros)
    _check_int4_read_back(torch, q, scales, zeros, act, spec)
    x = _round_to(np.random.default_rng(seed).standard_normal((m, n_in)).astype(np.float32), act)
    ref = x.astype(np.float64) @ spec.T.astype(np.float64)
    y = _int4_mm(torch, x, q, scales, zeros, act)
    assert (np.abs(y - ref) <= _dot_tolerance(x, spec, ref, act, _int4_deviation(torch, spec, scales, zeros))).all()


@settings(max_examples=25, deadline=None)
@given(seed=SEEDS, n_tiles=st.integers(1, 3), row_blocks=st.integers(1, 4), exponent=GGUF_EXPONENTS,
       pattern=PATTERNS, random_share=st.sampled_from([0.0, 0.3, 1.0]))
def test_q4_1_file_through_the_int4_kernel(torch, seed, n_tiles, row_blocks, exponent, pattern, random_share):
    """A Q4_1 matrix as a GGUF file holds it, through the float32 int4 kernel: the file's weights.

    Blocks from gguf's quantizer (realistic d and m), a share of them replaced by random bytes with
    random finite float16 d and m (where zero = m + 8d may not be exact in float32)."""
    rng = np.random.default_rng(seed)
    out, n_in = 16 * n_tiles, 32 * row_blocks
    blocks = gguf.quants.quantize(_weights(seed, (out, n_in), exponent, pattern), _qtype("Q4_1")).reshape(-1, 20)
    noise = rng.integers(0, 256, blocks.shape, dtype=np.uint8)
    halves = rng.integers(0, 2 ** 16, (len(blocks), 2), dtype=np.uint16).view(np.float16)
    noise[:, 0:4] = np.where(np.isfinite(halves), halves, np.float16(1)).view(np.uint8)
    picked = rng.random(len(blocks)) < random_share
    blocks[picked] = noise[picked]

    q, scales, zeros = q4_1_as_int4(blocks)
    q, scales, zeros = q.reshape(out, n_in), scales.reshape(out, row_blocks), zeros.reshape(out, row_blocks)
    read = _int4_mm(torch, np.eye(n_in, dtype=np.float32), q, scales, zeros, "float32").T
    file = gguf.quants.dequantize(blocks.reshape(out, -1), _qtype("Q4_1"))
    bound = np.repeat(q4_1_as_int4_error_bound(blocks).reshape(out, row_blocks), 32, axis=1)
    deviation = _int4_deviation(torch, dequantize_int4(q, scales, zeros), scales, zeros)
    exact = (bound == 0) & (deviation == 0)
    assert np.array_equal(read[exact], file[exact])           # as numbers: -0 may come out +0
    assert (np.abs(read.astype(np.float64) - file) <= bound + deviation).all()


def test_kernel_constraints_recorded_in_the_docstring(torch):
    """The constraints weight_only's docstring states, as torch 2.13 enforces them on CPU."""
    q = torch.zeros((16, 64), dtype=torch.int32)
    with pytest.raises(RuntimeError):                          # N % 16
        torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.zeros((8, 64), dtype=torch.int32), 1)
    with pytest.raises(RuntimeError):                          # int32 codes, not uint8
        torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.uint8), 1)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    assert packed.shape == (16, 32) and packed.dtype == torch.uint8
    pairs = torch.zeros((2, 16, 2))
    with pytest.raises(RuntimeError):                          # group size 16
        torch.ops.aten._weight_int4pack_mm_for_cpu(torch.zeros((1, 64)), packed, 16, torch.zeros((4, 16, 2)))
    with pytest.raises(RuntimeError):                          # scales in another dtype than x
        torch.ops.aten._weight_int4pack_mm_for_cpu(torch.zeros((1, 64)), packed, 32, pairs.to(torch.bfloat16))
    with pytest.raises(RuntimeError):                          # int8 scales in another dtype than x
        torch.ops.aten._weight_int8pack_mm(torch.zeros((1, 4)), torch.zeros((3, 4), dtype=torch.int8),
                                           torch.ones(3, dtype=torch.bfloat16))
