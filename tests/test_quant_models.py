"""Quantized models: the NumPy model on a GGUF file's own blocks, the Torch backend on int8 / int4 kernels.

* QuantizedMatrix (npllama.quant.matrix): products, row lookups, slices, permutations and stacks
  of drawn blocks of every type equal the same operations on the dequantized floats (bit for bit
  where no sum is involved).
* npllama.load(path, weights="gguf") on tiny GGUF files whose tensors are stored in drawn types:
  the same weights as weights="float32" (bit for bit, through state_dict: one decoder, no sums)
  and the same logits to GGUF_BLOCKS_VS_FLOAT32_RTOL, full sequence and cached decoding (other
  orders of float32 sums: never bit for bit, which holds on one host's BLAS and not another's);
  types outside the spec load through gguf with one line on stderr.
* parity.load(path, weights="int8" | "int4" | "gguf"): every op within the kernel tolerance of
  npllama on the kernels' own weights (the parity report's first table), a broken kernel named
  by layer, "gguf" holding the file's Q4_0 / Q4_1 values, the fast decoder on the same kernels.
* The command line's --weights, and its errors.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import npllama
import parity
from npllama.errors import InputError
from npllama.quant import BLOCK_TYPES, QuantizedMatrix, dequantize
from npllama.quant import matrix as matrix_module
from npllama.tolerances import GGUF_BLOCKS_VS_FLOAT32_RTOL, INT4_TWO_ROUNDINGS_RTOL, parity_rtol
from parity.quant import Int4Weight, Int8Weight
from parity.quant_report import cost_report, kernel_report
from tiny import gguf_vocab_from_bpe, random_llama, save_gguf, save_hf, tiny_config, train_bpe

QUANT_NAMES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
GGUF_QUANTIZES = {"Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"}      # types gguf.quants.quantize writes
# Byte offsets of each block's float16 fields (llama.cpp's ggml-common.h), as in test_quant.py.
FLOAT16_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2),
                  "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
SLOW = settings(deadline=None, max_examples=8, suppress_health_check=[HealthCheck.too_slow,
                                                                     HealthCheck.function_scoped_fixture])


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def random_blocks(rng: np.random.Generator, name: str, n_blocks: int, scale: float = 0.01) -> np.ndarray:
    """n_blocks random blocks of a type with its float16 fields (scales, minimums) ~ scale: (n, bytes) uint8."""
    kind = BLOCK_TYPES[name]
    if name in ("F32", "F16", "BF16"):
        w = (rng.standard_normal(n_blocks) * scale).astype(np.float32)
        raw = {"F32": w, "F16": w.astype(np.float16), "BF16": (w.view(np.uint32) >> 16).astype(np.uint16)}[name]
        return raw.view(np.uint8).reshape(n_blocks, kind.bytes_per_block)
    blocks = rng.integers(0, 256, (n_blocks, kind.bytes_per_block), dtype=np.uint8)
    for offset in FLOAT16_FIELDS[name]:
        halves = (rng.uniform(0.2, 1.0, n_blocks) * scale).astype(np.float16)
        blocks[:, offset:offset + 2] = halves.view(np.uint8).reshape(n_blocks, 2)
    return blocks


def encode_with(types: dict[str, str], seed: int = 0):
    """tiny.save_gguf's encode: each tensor named in types stored as that block type (gguf's own
    quantizer where it has one, drawn blocks otherwise), the rest F32."""
    rng = np.random.default_rng(seed)

    def encode(name: str, data: np.ndarray):
        kind = types.get(name)
        if kind is None or kind == "F32":
            return None
        qtype = gguf.GGMLQuantizationType[kind]
        if kind in GGUF_QUANTIZES or kind in ("F16", "BF16"):
            return gguf.quants.quantize(data, qtype), qtype
        per_row = data.shape[1] // BLOCK_TYPES[kind].block_size
        blocks = random_blocks(rng, kind, data.shape[0] * per_row, scale=float(np.abs(data).max()) / 40)
        return blocks.reshape(data.shape[0], -1), qtype
    return encode


# ============================================================================ QuantizedMatrix
@st.composite
def stacks(draw):
    """(QuantizedMatrix of 1-3 parts of drawn types, its float32 values (out, in))."""
    n_in = draw(st.sampled_from([256, 512]))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    parts, floats = [], []
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(QUANT_NAMES + ["F16", "BF16", "F32"]))
        rows = draw(st.integers(1, 5))
        kind = BLOCK_TYPES[name]
        blocks = random_blocks(rng, name, rows * n_in // kind.block_size).reshape(rows, -1)
        parts.append((name, blocks))
        floats.append(dequantize(blocks, name, (rows, n_in)))
    return QuantizedMatrix(parts, n_in), np.concatenate(floats)


@settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stacks(), st.integers(1, 4), st.integers(0, 2 ** 32 - 1), st.sampled_from([1 << 20, 300, 1]))
def test_quantized_matrix_is_its_dequantized_floats(monkeypatch_pieces, mw, batch, seed, per_piece):
    m, w = mw
    monkeypatch_pieces(per_piece)                      # pieces of one row ... the whole matrix
    rng = np.random.default_rng(seed)
    # Bit for bit on every host: both sides decode the same blocks through npllama.quant's block spec,
    # elementwise (float16 -> float32 widening, products and sums of scalars in a fixed order per
    # weight): no dot product or reduction whose order a BLAS kernel or a SIMD width could change.
    same = lambda a, b: a.dtype == b.dtype and np.array_equal(a.view(np.uint32), b.view(np.uint32))  # noqa: E731
    assert m.shape == w.shape and m.T.shape == w.T.shape and m.nbytes == sum(b.nbytes for _, b in m.parts)
    assert same(m.dequantize(), w) and same(np.asarray(m), w) and same(m.T.dequantize(), w.T)
    ids = rng.integers(0, len(w), (batch, 3))
    assert same(m[ids], w[ids])                                              # the embedding lookup
    perm = rng.permutation(len(w))
    assert same(m.take_rows(perm).dequantize(), w[perm])                    # the rotary row order
    assert same(m[1:].dequantize(), w[1:]) and same(m[::2].dequantize(), w[::2])
    stacked = QuantizedMatrix.concat([m, w[:2], m[:1]])
    assert same(stacked.dequantize(), np.concatenate([w, w[:2], w[:1]]))
    x = rng.standard_normal((batch, 2, w.shape[1])).astype(np.float32)
    y = x @ m.T                                                              # the product the model takes
    assert y.shape == (batch, 2, len(w)) and y.dtype == np.float32
    assert rel(y, x @ w.T) <= GGUF_BLOCKS_VS_FLOAT32_RTOL
    assert (x.astype(np.float64) @ m.T.astype(np.float64)).dtype == np.float64


@pytest.fixture
def monkeypatch_pieces(monkeypatch):
    return lambda n: monkeypatch.setattr(matrix_module, "WEIGHTS_PER_PIECE", n)


def test_quantized_matrix_refuses_misuse():
    m = QuantizedMatrix([("Q8_0", np.zeros((2, 34), np.uint8))], 32)
    with pytest.raises(InputError, match="in, out"):
        np.ones((1, 32), np.float32) @ m                       # the (out, in) weight, not its (in, out) view
    with pytest.raises(InputError, match="features"):
        np.ones((1, 31), np.float32) @ m.T
    with pytest.raises(InputError, match="outside"):
        m[np.array([2])]
    with pytest.raises(InputError, match="integer"):
        m[np.array([0.5])]
    with pytest.raises(npllama.CheckpointError, match="bytes each"):
        QuantizedMatrix([("Q8_0", np.zeros((2, 33), np.uint8))], 32)


# ============================================================================ the NumPy model on blocks
@st.composite
def gguf_models(draw, dim_choices=(256,), allow_k=True):
    """(config, {gguf tensor name: type}) for a tiny model whose matrices take drawn block types."""
    n_heads = draw(st.sampled_from([2, 4]))
    cfg = tiny_config(dim=draw(st.sampled_from(dim_choices)), n_layers=draw(st.integers(1, 2)), n_heads=n_heads,
                      n_kv_heads=draw(st.sampled_from([1, n_heads])), hidden_dim=256,
                      tied=draw(st.booleans()), vocab_size=300)
    names = ["token_embd.weight", "output.weight"] + [
        f"blk.{i}.{t}.weight" for i in range(cfg.num_hidden_layers)
        for t in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")]
    pool = QUANT_NAMES + ["F16", "BF16", "F32"] if allow_k else sorted(GGUF_QUANTIZES) + ["F16", "F32"]
    types = {n: draw(st.sampled_from(pool)) for n in names}
    return cfg, types


def _write(tmp_path: Path, cfg, types: dict, seed: int = 0) -> Path:
    hf = random_llama(cfg, seed=seed)
    return save_gguf(hf, tmp_path / f"m{seed}.gguf", encode=encode_with(types, seed))


@SLOW
@given(gguf_models(), st.integers(0, 1000))
def test_gguf_blocks_model_equals_float32_model(tmp_path, model_types, seed):
    cfg, types = model_types
    path = _write(tmp_path, cfg, types, seed)
    floats = npllama.load(path, progress=False)
    blocks = npllama.load(path, progress=False, weights="gguf")
    kept = {n for n, t in types.items() if t != "F32" and not (n == "output.weight" and cfg.tie_word_embeddings)}
    held = [w for w in blocks.state_dict().values() if isinstance(w, QuantizedMatrix) and w.types != ["F32"]]
    assert len(held) == len(kept)                               # every non-F32 matrix stays blocks
    # The same weights bit for bit on every host: both loaders decode the file's blocks through
    # npllama.quant's block spec (elementwise arithmetic on the same bytes, no sums). The logits
    # below are not: the two models multiply in different pieces, so BLAS sums in other orders.
    for name, w in floats.state_dict().items():
        got = np.asarray(blocks.state_dict()[name], dtype=np.float32)
        assert np.array_equal(got.view(np.uint32), np.asarray(w, np.float32).view(np.uint32)), name
    ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, (2, 7))
    assert rel(blocks(ids), floats(ids)) <= GGUF_BLOCKS_VS_FLOAT32_RTOL
    cb, cf = blocks.new_cache(2, 16), floats.new_cache(2, 16)
    blocks(ids[:, :5], cache=cb), floats(ids[:, :5], cache=cf)
    assert rel(blocks(ids[:, 5:], cache=cb), floats(ids[:, 5:], cache=cf)) <= GGUF_BLOCKS_VS_FLOAT32_RTOL


def test_types_outside_the_spec_load_as_float32_with_one_line(tmp_path, capfd):
    cfg = tiny_config(dim=64, n_layers=1, hidden_dim=96)
    rng = np.random.default_rng(0)

    def encode(name, data):
        if name.endswith(("attn_q.weight", "ffn_up.weight")):
            blocks = rng.integers(0, 256, (data.size // 32, 18), dtype=np.uint8)
            blocks[:, 0:2] = np.full((len(blocks), 1), 0.01, np.float16).view(np.uint8)
            return blocks.reshape(data.shape[0], -1), gguf.GGMLQuantizationType.IQ4_NL
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    path = save_gguf(random_llama(cfg), tmp_path / "iq.gguf", encode=encode)
    capfd.readouterr()
    model = npllama.load(path, progress=False, weights="gguf")
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "IQ4_NL (2)" in err[0] and "float32" in err[0]
    assert isinstance(model.state_dict()["layers.0.attention.wq.weight"], np.ndarray)     # float32
    assert isinstance(model.state_dict()["layers.0.attention.wk.weight"], QuantizedMatrix)
    assert np.isfinite(model([[1, 2, 3]])).all()
    floats = npllama.load(path, progress=False)                   # the default path says the same
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "IQ4_NL (2)" in err[0]
    # float32 weights through another order of float32 sums (pieces of rows, not the whole matrix)
    assert rel(model([[1, 2, 3]]), floats([[1, 2, 3]])) <= GGUF_BLOCKS_VS_FLOAT32_RTOL


def test_weights_that_do_not_apply_say_what_would(tmp_path):
    hf_folder = tmp_path / "hf"
    save_hf(random_llama(tiny_config(n_layers=1)), hf_folder)
    with pytest.raises(InputError, match="Hugging Face checkpoint; load it with weights='float32'"):
        npllama.load(hf_folder, progress=False, weights="gguf")
    with pytest.raises(InputError, match="Torch backend.*--backend torch --weights int8"):
        npllama.load(hf_folder, progress=False, weights="int8")
    with pytest.raises(InputError, match="unknown weights"):
        npllama.load(hf_folder, progress=False, weights="q4")
    with pytest.raises(InputError, match="Hugging Face checkpoint"):
        parity.load(hf_folder, weights="gguf", progress=False)    # npllama refuses first
    model = npllama.load(hf_folder, progress=False)
    with pytest.raises(InputError, match="is not quantized"):
        parity.from_numpy(model, weights="gguf")
    with pytest.raises(InputError, match="unknown weights"):
        parity.from_numpy(model, weights="int2")


# ============================================================================ the Torch backend's kernels
TORCH_SCHEMES = st.sampled_from(["int8", "int4"])
KERNEL_DTYPES = st.sampled_from(["float32", "bfloat16"])


@SLOW
@given(TORCH_SCHEMES, KERNEL_DTYPES, st.booleans(), st.integers(0, 1000))
def test_quantized_kernels_within_tolerance_of_their_own_weights(tmp_path, scheme, dtype, tied, seed):
    cfg = tiny_config(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=96, tied=tied)
    folder = tmp_path / f"hf{seed}{tied}"
    save_hf(random_llama(cfg, seed=seed), folder)
    model = parity.load(folder, weights=scheme, dtype=dtype, progress=False)
    kind = Int8Weight if scheme == "int8" else Int4Weight
    assert isinstance(model.output.weight, kind) and isinstance(model.layers[0].attention.wq.weight, kind)
    ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, (1, 9))
    report = kernel_report(model, ids)
    assert report.ok, report.first_break
    cost = cost_report(model, ids, npllama.load(folder, progress=False, dtype=np.float64))
    assert [r.op for r in cost.rows][-1] == "logits" and "agrees" in cost.notes[0]


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_a_broken_kernel_is_named_by_layer(tmp_path, scheme):
    cfg = tiny_config(dim=64, n_layers=3, hidden_dim=96)
    save_hf(random_llama(cfg), tmp_path / "hf")
    model = parity.load(tmp_path / "hf", weights=scheme, progress=False)
    w2 = model.layers[1].feed_forward.w2.weight
    kernel = w2.linear
    w2.linear = lambda x, b=None: kernel(x, b) * 1.001        # a kernel one part in a thousand off
    reference = kernel_report(model, [[1, 2, 3, 4]])
    assert reference.first_break is not None and reference.first_break.layer == 1
    assert reference.first_break.op in ("feed_forward", "ffn_residual")


def test_gguf_keeps_the_files_q4_values_and_says_what_it_requantized(tmp_path, capfd):
    cfg = tiny_config(dim=64, n_layers=1, hidden_dim=96, tied=True)
    types = {"token_embd.weight": "Q8_0", "blk.0.attn_q.weight": "Q4_0", "blk.0.attn_k.weight": "Q4_1",
             "blk.0.attn_v.weight": "Q4_1", "blk.0.attn_output.weight": "Q4_1", "blk.0.ffn_gate.weight": "Q4_0",
             "blk.0.ffn_up.weight": "Q4_0", "blk.0.ffn_down.weight": "Q5_0"}
    path = _write(tmp_path, cfg, types)
    capfd.readouterr()
    model = parity.load(path, weights="gguf", progress=False)                # float32 scales: exact
    err = capfd.readouterr().err
    assert "Q4_0 kept as int4 groups of 32" in err and "Q4_1 kept as int4 groups of 32" in err
    assert "re-quantized to int8" in err
    file = npllama.load(path, progress=False).state_dict()
    assert isinstance(model.layers[0].feed_forward.w2.weight, Int8Weight)
    for name in ("wq", "wk", "wv"):          # Q4_0, Q4_1, Q4_1: the file's codes on the int4 kernel
        weight = getattr(model.layers[0].attention, name).weight
        expect = file[f"layers.0.attention.{name}.weight"]
        assert isinstance(weight, Int4Weight)
        # Q4_1's offset is re-expressed as int4's zero point in float32 (q4_1_as_int4_error_bound):
        # the same weights up to float32 rounding of that offset
        assert np.abs(weight.dequantized() - expect).max() <= 1e-6 * np.abs(expect).max(), name
    assert any("kept" in n for n in model.quant_notes)


@settings(deadline=None, max_examples=10)
@given(TORCH_SCHEMES, KERNEL_DTYPES, st.integers(0, 2 ** 32 - 1))
def test_long_inputs_go_dense_on_the_kernels_weights(scheme, dtype, seed):
    from parity.quant import DENSE_FROM_ROWS, int4_weight, int8_weight
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((48, 64)).astype(np.float32)
    m = (int8_weight if scheme == "int8" else int4_weight)(w, getattr(torch, dtype), torch.device("cpu"))
    dense, spec = m.dense(torch.float32).numpy(), m.dequantized()             # the kernel's own weights
    if scheme == "int8":          # q * scale: one float32 product on both sides, the same bits on every host
        assert np.array_equal(dense, spec)
    else:                         # torch.addcmul fuses the multiply-add on some CPUs (AVX-512), not on all
        bound = INT4_TWO_ROUNDINGS_RTOL * (np.abs(spec) + int4_terms(m))
        assert (np.abs(dense - spec) <= bound).all()
    x = torch.from_numpy(rng.standard_normal((DENSE_FROM_ROWS + 3, 64)).astype(np.float32)).to(getattr(torch, dtype))
    exact = x.double().numpy() @ m.dequantized().T.astype(np.float64)
    by_rows = torch.cat([m.linear(x[i:i + 1]) for i in range(len(x))])       # the kernel, a row at a time
    for y in (m.linear(x), by_rows):
        assert rel(y.double().numpy(), exact) <= parity_rtol(dtype, "op")


def int4_terms(m) -> np.ndarray:
    """|zero| + 8 |scale| of every weight of an Int4Weight: with |w|, what (q - 8) * scale + zero
    rounded twice (product, then sum) may move by, times 2**-23."""
    return np.repeat(np.abs(m._zeros) + 8.0 * np.abs(m._scales), m.group_size, axis=1)


def test_int4_refuses_a_shape_it_cannot_group(tmp_path):
    save_hf(random_llama(tiny_config(dim=48, n_heads=4, hidden_dim=96, n_layers=1)), tmp_path / "hf")
    with pytest.raises(InputError, match="int4 groups 32 inputs.*48.*use int8"):
        parity.load(tmp_path / "hf", weights="int4", progress=False)
    assert parity.load(tmp_path / "hf", weights="int8", progress=False) is not None


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_fast_decoder_runs_the_same_kernels(tmp_path, scheme):
    from parity.fast import FastDecoder
    from parity.generate import generate as torch_generate
    cfg = tiny_config(dim=64, n_layers=2, hidden_dim=96, tied=True)
    save_hf(random_llama(cfg, std=0.3), tmp_path / "hf")
    model = parity.load(tmp_path / "hf", weights=scheme, progress=False)
    prompt = [5, 9, 11, 3]
    fd = FastDecoder(model, 1, 32)
    assert isinstance(fd.weights.output, Int8Weight if scheme == "int8" else Int4Weight)
    with torch.no_grad():
        assert rel(fd.prefill([prompt]).numpy(), model([prompt])[:, -1].numpy()) <= parity_rtol("float32")
    assert fd.generate([prompt], 12)[0] == list(torch_generate(model, prompt, 12))
    assert fd.weights.decode_bytes() < sum(p.numel() * 4 for p in parity.load(tmp_path / "hf").parameters())


# ============================================================================ the command line
def _cli(*args):
    return subprocess.run([sys.executable, "-m", "npllama", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_weights(tmp_path):
    cfg = tiny_config(dim=64, n_layers=1, hidden_dim=96)
    types = {n: "Q4_1" for n in ("output.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight",
                                 "blk.0.attn_v.weight", "blk.0.attn_output.weight", "blk.0.ffn_gate.weight",
                                 "blk.0.ffn_up.weight", "blk.0.ffn_down.weight")}
    path = save_gguf(random_llama(cfg), tmp_path / "q.gguf", vocab=gguf_vocab_from_bpe(train_bpe()),
                     encode=encode_with(types))
    ids = ["--raw", "-n", "4", "-q"]
    for backend, weights in (("torch", "gguf"), ("torch", "int4"), ("numpy", "gguf")):
        r = _cli("generate", "--model", str(path), "--prompt", "x", "--backend", backend, "--weights", weights, *ids)
        assert r.returncode == 0 and r.stdout.strip(), r.stderr
    bad = _cli("generate", "--model", str(path), "--prompt", "x", "--weights", "int4", *ids)
    assert bad.returncode == 2 and "--backend torch" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    r = _cli("parity", "--model", str(path), "--weights", "gguf", "--ids", "1,2,3")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "quantized kernels (gguf weights" in r.stdout and "what quantization costs" in r.stdout


# ============================================================================ the default model
@pytest.mark.slow
def test_default_model_stays_quantized_and_equals_float32():
    from npllama.weights import default_model_path
    default_model_path = default_model_path()
    blocks = npllama.load(default_model_path, progress=False, weights="gguf")
    held = sum(w.nbytes for w in blocks.state_dict().values())
    assert held <= Path(default_model_path).stat().st_size                  # about the file, not 4x it
    ids = np.array([blocks.tokenizer.encode("The capital of France is")])
    floats = npllama.load(default_model_path, progress=False)
    assert rel(blocks(ids), floats(ids)) <= GGUF_BLOCKS_VS_FLOAT32_RTOL
    model = parity.from_numpy(blocks, weights="gguf", dtype="bfloat16")
    report = kernel_report(model, ids)
    assert report.ok, report.first_break
