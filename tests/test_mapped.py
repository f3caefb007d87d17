"""Weights left in their files: mapped models compute what in-memory models compute, in bounded memory.

* npllama.load(..., mapped=True) on real files (safetensors F32 / F16 / BF16 and sharded,
  pytorch_model.bin, Meta's .pth split over model-parallel shards, GGUF): every matrix stays a
  view of the file's map, its values are bit for bit those of the in-memory model, and the
  logits agree to MAPPED_VS_IN_MEMORY_RTOL; the default maps from MAPPED_ABOVE up.
* Memory: NumPy's allocations of a mapped model (tracemalloc) do not grow with its number of
  layers; npllama.memory's estimate of a call's peak is within 10% of the peak tracemalloc sees;
  work that would not fit is refused before it starts, with the figures.
* Bad input: a truncated file is refused at open (a mapped read past the end would be SIGBUS).
* The checkpoint hash is remembered; the Torch twin of a mapped model views the same bytes.
"""

from __future__ import annotations

import json
import math
import tracemalloc

import numpy as np
import pytest
import torch

import npllama
import parity
from npllama.config import ModelArgs
from npllama.errors import CheckpointError, InputError
from npllama.formats import mapped as mapped_module
from npllama.formats.meta import meta_hidden_dim
from npllama.memory import (RESERVE_BYTES, check_generation_fits, forward_bytes, generation_peak_bytes,
                            kv_cache_bytes, model_is_mapped, weight_count)
from npllama.model import Transformer
from npllama.params import init_params
from npllama.quant.matrix import QuantizedMatrix
from npllama.tolerances import MAPPED_VS_IN_MEMORY_RTOL
from tiny import (gguf_vocab_from_bpe, meta_state_dict, random_llama, save_gguf, save_hf, save_meta,
                  tiny_config, train_bpe, train_sentencepiece)

RTOL = MAPPED_VS_IN_MEMORY_RTOL[np.dtype(np.float32)]
IDS = np.random.default_rng(0).integers(0, 300, (2, 9))


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def matrices(model) -> list:
    layer = model.layers[0]
    return [model.tok_embeddings, model.output, layer.wq, layer.wk, layer.wv, layer.wo, layer.w1, layer.w2, layer.w3]


def assert_same_model(mapped, in_memory) -> None:
    """Every matrix of ``mapped`` left in the file, the same values as ``in_memory`` (bit for bit: the
    stored numbers widen exactly in both), and the logits within the tolerance."""
    assert all(isinstance(w, QuantizedMatrix) and w.mapped for w in matrices(mapped))
    sd, ref = mapped.state_dict(), in_memory.state_dict()
    assert sd.keys() == ref.keys()
    for name in sd:
        assert np.array_equal(np.asarray(sd[name], np.float32), np.asarray(ref[name], np.float32)), name
    assert rel(mapped(IDS), in_memory(IDS)) < RTOL
    cache = mapped.new_cache(2)                        # cached decoding through the same maps
    steps = np.concatenate([mapped(IDS[:, :4], cache=cache)] + [mapped(IDS[:, t:t + 1], cache=cache)
                                                                for t in range(4, IDS.shape[1])], axis=1)
    assert rel(steps, in_memory(IDS)) < RTOL


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    return train_sentencepiece(tmp_path_factory.mktemp("sp"), 400)


# ---------------------------------------------------------------------------------------- formats
@pytest.mark.parametrize("dtype,shard", [(torch.bfloat16, None), (torch.float16, "40KB"), (torch.float32, "40KB")])
def test_safetensors_stay_in_the_file_and_compute_the_same(tmp_path, dtype, shard):
    folder = save_hf(random_llama(tiny_config(n_kv_heads=2), seed=1), tmp_path, dtype=dtype, max_shard_size=shard)
    assert_same_model(npllama.load(folder, progress=False, mapped=True),
                      npllama.load(folder, progress=False, mapped=False))


def test_pytorch_model_bin_members_are_mapped_in_place(tmp_path):
    ref = random_llama(tiny_config(n_kv_heads=1, tied=True), seed=2)
    save_hf(ref, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save({k: v.to(torch.bfloat16) for k, v in ref.state_dict().items()}, tmp_path / "pytorch_model.bin")
    assert_same_model(npllama.load(tmp_path, progress=False, mapped=True),
                      npllama.load(tmp_path, progress=False, mapped=False))


def split_llama3(sd: dict, n: int) -> list[dict]:
    """Meta's model-parallel split with Llama 3's VocabParallelEmbedding (the vocabulary along dim 0)."""
    shards = [{} for _ in range(n)]
    for name, t in sd.items():
        dim = None if t.ndim < 2 else 1 if name.endswith(("wo.weight", "w2.weight")) else 0
        parts = [t.clone()] * n if dim is None else [p.clone() for p in t.chunk(n, dim=dim)]
        for shard, p in zip(shards, parts):
            shard[name] = p
    return shards


@pytest.mark.parametrize("n_shards,embedding", [(1, "dim"), (2, "dim"), (4, "vocab")])
def test_meta_shards_are_merged_from_their_maps(tmp_path, sp_model, n_shards, embedding):
    """Column-parallel wq, wk, wv, w1, w3 and output stack along "out", row-parallel wo and w2 join
    along "in" piece by piece, the embedding along dim (Llama 2) or vocab (Llama 3); q / k rows
    permuted by index: nothing of a matrix is read into memory."""
    ref = random_llama(tiny_config(vocab_size=400, n_kv_heads=4, hidden_dim=meta_hidden_dim(64, 32, None)), seed=3)
    folder = save_meta(ref, tmp_path, sp_model, n_shards=n_shards, dtype=torch.bfloat16)
    if embedding == "vocab":
        for i, shard in enumerate(split_llama3({k: v.to(torch.bfloat16) for k, v in meta_state_dict(ref).items()},
                                               n_shards)):
            torch.save(shard, folder / f"consolidated.{i:02d}.pth")
    mapped = npllama.load(folder, progress=False, mapped=True)
    wo = mapped.layers[1].wo
    assert len(wo.parts[0][1].columns) == n_shards            # joined along "in", one view per shard
    assert_same_model(mapped, npllama.load(folder, progress=False, mapped=False))


@pytest.mark.parametrize("kind", ["F32", "F16", "Q8_0"])
def test_gguf_tensors_stay_in_the_readers_map(tmp_path, kind):
    import gguf

    ref = random_llama(tiny_config(n_kv_heads=2, tied=True), seed=4)
    path = save_gguf(ref, tmp_path / "m.gguf", gguf_vocab_from_bpe(train_bpe(300)))
    if kind != "F32":                                  # rewrite the matrices in another type
        reader = gguf.GGUFReader(path)
        writer = gguf.GGUFWriter(tmp_path / f"{kind}.gguf", "llama")
        for field in reader.fields.values():
            if field.name.startswith("GGUF.") or field.name == "general.architecture":
                continue
            kind_of = field.types[0]
            value = field.contents()
            if kind_of == gguf.GGUFValueType.ARRAY:
                writer.add_array(field.name, value)
            else:
                writer.add_key_value(field.name, value, kind_of)
        target = gguf.GGMLQuantizationType[kind]
        for t in reader.tensors:
            data = np.array(t.data)
            if data.ndim == 2:
                writer.add_tensor(t.name, gguf.quants.quantize(data, target) if kind == "Q8_0" else
                                  data.astype(np.float16), raw_dtype=target)
            else:
                writer.add_tensor(t.name, data)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        path = tmp_path / f"{kind}.gguf"
    assert_same_model(npllama.load(path, progress=False, mapped=True), npllama.load(path, progress=False, mapped=False))


def test_by_default_a_model_is_mapped_from_a_stated_size(tmp_path, monkeypatch):
    folder = save_hf(random_llama(tiny_config(), seed=5), tmp_path, dtype=torch.bfloat16)
    assert not isinstance(npllama.load(folder, progress=False).layers[0].wq, QuantizedMatrix)   # small: in memory
    args = npllama.load(folder, progress=False).config
    monkeypatch.setattr(mapped_module, "MAPPED_ABOVE", 4 * weight_count(args))                   # as large as it
    assert npllama.load(folder, progress=False).layers[0].wq.mapped
    with pytest.raises(InputError, match="mapped must be None, True or False"):
        npllama.load(folder, progress=False, mapped="yes")


def test_weight_count_is_the_checkpoints():
    from npllama.params import param_shapes
    for args in (ModelArgs(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=100, hidden_dim=96),
                 ModelArgs(dim=48, n_layers=1, n_heads=3, n_kv_heads=3, vocab_size=50, hidden_dim=80, head_dim=24,
                           tie_word_embeddings=True, attention_bias=True, mlp_bias=True)):
        assert weight_count(args) == sum(math.prod(s) for s in param_shapes(args).values())


# ---------------------------------------------------------------------------------------- bad input
def test_a_truncated_file_is_refused_at_open_not_read_past_its_end(tmp_path):
    folder = save_hf(random_llama(tiny_config(), seed=6), tmp_path, dtype=torch.bfloat16)
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        npllama.load(folder, progress=False, mapped=True)


def test_a_torch_member_running_past_the_end_is_refused(tmp_path):
    from npllama.formats.torch_save import member_offset
    torch.save({"w": torch.zeros(64, 64)}, tmp_path / "x.pth")
    import zipfile
    with zipfile.ZipFile(tmp_path / "x.pth") as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data/0"))
    region = np.frombuffer((tmp_path / "x.pth").read_bytes(), np.uint8)
    assert member_offset(region, info, "x.pth") % 64 == 0          # torch.save aligns its members
    with pytest.raises(CheckpointError, match="runs past the end"):
        member_offset(region[: info.header_offset + 100], info, "x.pth")


# ---------------------------------------------------------------------------------------- memory
def traced_peak(fn) -> int:
    """Bytes NumPy (and Python) allocated at the peak of fn(), beyond what was held before it."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        fn()
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


def bf16_mapped(params: dict) -> dict:
    """The matrices of params as mapped bfloat16 (views of arrays standing in for a file's map)."""
    return {k: QuantizedMatrix.from_mapped("BF16", (v.view(np.uint32) >> 16).astype(np.uint16)) if v.ndim == 2 else v
            for k, v in params.items()}


def test_a_mapped_models_allocations_do_not_grow_with_its_layers(tmp_path):
    """Load plus one forward pass: a mapped model allocates the same whatever its depth (one piece of
    one matrix at a time), an in-memory one the whole float32 weights more per layer."""
    peaks, folders = {}, {}
    for layers in (2, 6):
        folders[layers] = save_hf(random_llama(tiny_config(n_layers=layers, dim=128, hidden_dim=512, vocab_size=300),
                                               seed=7), tmp_path / str(layers), dtype=torch.bfloat16)
    npllama.load(folders[2], progress=False, mapped=True)(IDS)     # what the first run allocates once (the pool)
    for layers, folder in folders.items():
        for mapped in (True, False):
            peaks[layers, mapped] = traced_peak(lambda: npllama.load(folder, progress=False, mapped=mapped)(IDS))
    per_layer = 4 * (4 * 128 * 128 + 3 * 128 * 512)                      # float32 bytes of one layer's matrices
    assert abs(peaks[6, True] - peaks[2, True]) < 0.05 * peaks[2, True]
    assert peaks[6, False] - peaks[2, False] > 3 * per_layer


ARGS = dict(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=2000, hidden_dim=384, max_seq_len=4096)
CASES = [({}, 64, 64), ({}, 200, 200), ({}, 300, 300), (dict(vocab_size=200), 600, 600),
         (dict(vocab_size=200, hidden_dim=2048), 64, 64), (dict(vocab_size=32000, dim=256, hidden_dim=768), 16, 16)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mapped", [False, True])
def test_the_estimate_of_a_calls_peak_is_within_10_percent(mapped, dtype, monkeypatch):
    """The LM head, naive and blockwise attention, the feed-forward: each case's largest moment.
    A mapped product's pieces run on one thread here: on two, whether both threads' pieces are
    alive at one moment is the host's scheduling (the estimate counts both: the next test)."""
    from npllama import memory
    from npllama.quant import matrix as matrix_module
    monkeypatch.setattr(matrix_module, "PRODUCT_THREADS", 1)
    monkeypatch.setattr(memory, "PRODUCT_THREADS", 1)
    for kw, tokens, kv_len in CASES:
        args = ModelArgs(**{**ARGS, **kw})
        params = init_params(args)
        model = Transformer(args, bf16_mapped(params) if mapped else params, dtype=dtype)
        ids = np.random.default_rng(0).integers(0, args.vocab_size, (1, tokens))
        peak = traced_peak(lambda: model(ids))
        estimate = forward_bytes(args, 1, tokens, kv_len, dtype, mapped)
        assert abs(estimate - peak) <= 0.1 * peak, (kw, tokens, peak, estimate)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_with_two_piece_threads_the_estimate_is_never_exceeded(dtype):
    """Two threads' pieces, at once or one after the other as the host schedules them: the peak is
    at most the estimate (which counts both), within the same 10%."""
    for kw, tokens, kv_len in CASES:
        args = ModelArgs(**{**ARGS, **kw})
        model = Transformer(args, bf16_mapped(init_params(args)), dtype=dtype)
        ids = np.random.default_rng(0).integers(0, args.vocab_size, (1, tokens))
        peak = traced_peak(lambda: model(ids))
        assert peak <= 1.1 * forward_bytes(args, 1, tokens, kv_len, dtype, mapped=True), (kw, tokens, peak)


def test_the_estimate_of_a_traces_peak_is_an_upper_bound_within_a_third():
    """The trace keeps every activation beside one forward call, blockwise from FLASH_MIN_LEN keys
    (so 1500 tokens are no 1500 x 1500 scores). An upper bound: the kept residual stream and
    logits are also arrays of the call's largest moment, counted twice (measured 6-30% over)."""
    from npllama.memory import trace_bytes
    from npllama.oracle import trace_steps
    for kw, tokens in [({}, 64), ({}, 600), (dict(vocab_size=200), 1500), (dict(vocab_size=32000, dim=256), 16)]:
        args = ModelArgs(**{**ARGS, **kw})
        model = Transformer(args, init_params(args), dtype=np.float64)
        ids = np.random.default_rng(0).integers(0, args.vocab_size, (1, tokens))
        trace_steps(model, ids[:, :8])                                  # what the first trace allocates once
        peak = traced_peak(lambda: trace_steps(model, ids))
        assert peak <= trace_bytes(args, 1, tokens, np.float64) <= 1.35 * peak, (kw, tokens, peak)


@pytest.mark.parametrize("prompt,new", [(40, 300), (300, 3)])
def test_the_estimate_of_a_generations_peak_is_within_10_percent(prompt, new):
    """A long answer (the KV cache grown by doubling) and a long prompt (its prefill)."""
    from npllama.generate import generate
    args = ModelArgs(**{**ARGS, "vocab_size": 500})
    model = Transformer(args, bf16_mapped(init_params(args)))
    ids = np.random.default_rng(1).integers(3, args.vocab_size, prompt)
    peak = traced_peak(lambda: list(generate(model, ids, new, stop_ids=[])))
    estimate = generation_peak_bytes(args, 1, prompt, new, np.float32, mapped=True)
    assert abs(estimate - peak) <= 0.1 * peak, (peak, estimate)


def test_the_estimate_of_a_chat_turns_peak_counts_the_cache_it_reuses():
    """A turn whose conversation is already in the cache feeds only its new tokens: its peak is the
    cache held plus a short prefill, within 10% of what tracemalloc sees (and the cache's bytes)."""
    from npllama.generate import generate
    args = ModelArgs(**{**ARGS, "vocab_size": 500})
    model = Transformer(args, bf16_mapped(init_params(args)))
    ids = np.random.default_rng(2).integers(3, args.vocab_size, 320)
    cache = model.new_cache(1)
    list(generate(model, ids[:300], 1, stop_ids=[], cache=cache))             # the conversation so far
    cache.truncate(300)
    held = sum(a.nbytes for a in cache.k + cache.v)
    peak = held + traced_peak(lambda: list(generate(model, ids[300:], 3, stop_ids=[], cache=cache)))
    estimate = generation_peak_bytes(args, 1, 320, 3, np.float32, mapped=True, reused=300)
    assert abs(estimate - peak) <= 0.1 * peak, (peak, estimate)
    assert estimate < generation_peak_bytes(args, 1, 320, 3, np.float32, mapped=True)   # the prefill of 320


def test_work_that_would_not_fit_is_refused_with_the_figures():
    from types import SimpleNamespace
    llama_8b = ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=128256, hidden_dim=14336,
                         max_seq_len=131072)
    assert kv_cache_bytes(llama_8b, 1, 131072) == 32 * 2**30                    # the KV cache of the 128K window
    mapped_8b = SimpleNamespace(config=llama_8b, dtype=np.dtype(np.float32), state_dict=dict, layers=[])
    check_generation_fits(mapped_8b, 1, 32, 2000, available=20 * 2**30)        # fits: nothing said
    with pytest.raises(InputError) as e:
        check_generation_fits(mapped_8b, 1, 32, 131040, available=20 * 2**30)
    message = str(e.value)
    assert "\n" not in message and "the KV cache alone is 32.0 GiB in float32" in message
    assert "20.0 GiB are available" in message and "positions (prompt + new tokens) would fit" in message
    most = int(message.split("at most ")[1].split()[0])
    assert most == 65536           # decoding doubles the cache: 64K slots (16 GiB) fit in 20 GiB, the next 128K do not


def test_the_command_line_refuses_before_the_prefill(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from npllama import memory
    from npllama.cli import main
    from tiny import train_bpe
    bpe = train_bpe(300)
    folder = save_hf(random_llama(tiny_config(max_seq_len=100000), seed=8), tmp_path, tokenizer=bpe)
    monkeypatch.setattr(memory, "available_bytes", lambda: RESERVE_BYTES + (8 << 20))
    result = CliRunner().invoke(main, ["generate", "-m", str(folder), "-p", "hello", "-n", "90000", "-q", "--raw"])
    assert result.exit_code == 2 and "would fit" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(main, ["generate", "-m", str(folder), "-p", "hello", "-n", "2", "-q", "--raw",
                                       "--mapped"])
    assert result.exit_code == 0, result.output


def test_chat_and_parity_refuse_what_would_not_fit_before_the_work(tmp_path, monkeypatch):
    """A chat turn is refused in brackets and the chat goes on; parity exits 2 before the twin is made."""
    from click.testing import CliRunner

    from npllama import memory
    from npllama.cli import main
    from tiny import train_bpe
    folder = save_hf(random_llama(tiny_config(), seed=8), tmp_path, tokenizer=train_bpe(300))
    held = memory.weights_in_memory(npllama.load(folder, progress=False))     # the load itself fits
    monkeypatch.setattr(memory, "available_bytes", lambda: RESERVE_BYTES + held + (16 << 10))
    result = CliRunner().invoke(main, ["chat", "-m", str(folder), "-n", "5", "-q"], input="hello there\n/quit\n")
    assert result.exit_code == 0, result.output
    assert "needs about" in result.stderr and "/reset to start a new conversation" in result.stderr
    assert "Traceback" not in result.output
    result = CliRunner().invoke(main, ["parity", "-m", str(folder), "--ids", "1,5,9,13"])
    assert result.exit_code == 2 and "comparing 4 tokens x 1" in result.output and "needs about" in result.output
    assert "Traceback" not in result.output
    monkeypatch.setattr(memory, "available_bytes", lambda: None)          # unknown: nothing refused
    assert CliRunner().invoke(main, ["parity", "-m", str(folder), "--ids", "1,5,9,13"]).exit_code == 0


def test_weights_that_would_not_fit_in_memory_are_refused_before_any_is_read(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from npllama import memory
    from npllama.cli import main
    folder = save_hf(random_llama(tiny_config(), seed=8), tmp_path, tokenizer=train_bpe(300))
    monkeypatch.setattr(memory, "available_bytes", lambda: RESERVE_BYTES + (64 << 10))
    with pytest.raises(InputError, match="reading the weights into memory needs about .* --mapped"):
        npllama.load(folder, progress=False, mapped=False)
    assert model_is_mapped(npllama.load(folder, progress=False, mapped=True))          # mapped: nothing to refuse
    # and what no estimate foresaw is one line too, not a traceback
    monkeypatch.setattr(memory, "available_bytes", lambda: None)
    import importlib
    monkeypatch.setattr(importlib.import_module("npllama.generate"), "generate_text", lambda *a, **k: np.zeros(1 << 58))
    result = CliRunner().invoke(main, ["generate", "-m", str(folder), "-p", "hi", "--raw", "-q"])
    assert result.exit_code == 2 and result.output.startswith("npllama: error: out of memory"), result.output
    assert "Traceback" not in result.output and result.output.count("\n") == 1


# ---------------------------------------------------------------------------------------- the rest
def test_the_checkpoint_hash_is_computed_once_per_version_of_the_file(tmp_path, monkeypatch):
    import hashlib
    import os

    from npllama import weights
    monkeypatch.setenv("NPLLAMA_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "w.bin"
    f.write_bytes(b"x" * 1000)
    calls = []
    real = weights.sha256_file
    monkeypatch.setattr(weights, "sha256_file", lambda p: calls.append(p) or real(p))
    assert weights.cached_sha256(f) == hashlib.sha256(b"x" * 1000).hexdigest() == weights.cached_sha256(f)
    assert len(calls) == 1 and json.loads((tmp_path / "cache" / "sha256.json").read_text())
    f.write_bytes(b"y" * 1000)                                            # same size, new time
    os.utime(f, ns=(1, 2))
    assert weights.cached_sha256(f) == hashlib.sha256(b"y" * 1000).hexdigest() and len(calls) == 2
    monkeypatch.setenv("NPLLAMA_CACHE", str(f / "not-a-folder"))         # cannot be written: still right
    assert weights.cached_sha256(f) == hashlib.sha256(b"y" * 1000).hexdigest()


@pytest.mark.parametrize("twin_dtype", [torch.float32, torch.bfloat16])
def test_the_torch_twin_views_the_same_bytes(tmp_path, twin_dtype):
    from parity.mapped import MappedWeight
    from parity.report import parity_report

    folder = save_hf(random_llama(tiny_config(n_kv_heads=2, tied=True), seed=9), tmp_path, dtype=torch.bfloat16)
    base = npllama.load(folder, progress=False, mapped=True)
    twin = parity.from_numpy(base, dtype=twin_dtype)
    weight = twin.layers[0].attention.wq.weight
    assert isinstance(weight, MappedWeight) and isinstance(twin.tok_embeddings.weight, MappedWeight)
    view = base.layers[0].wq.parts[0][1].columns[0]
    assert weight.stored.data_ptr() == view.ctypes.data                  # the file's map itself, not a copy
    assert parity_report(twin, IDS[:1]).ok
    with pytest.raises(InputError, match="cannot be trained"):
        parity.from_numpy(base, requires_grad=True)


def test_a_long_pass_over_a_mapped_model_shows_its_progress(tmp_path, capfd):
    from npllama.formats.mapped import reading_progress
    folder = save_hf(random_llama(tiny_config(), seed=10), tmp_path, dtype=torch.bfloat16)
    for mapped in (False, True):
        model = npllama.load(folder, progress=False, mapped=mapped)
        with reading_progress(model, "trace"):
            model(IDS)
        assert ("trace:" in capfd.readouterr().err) == mapped


def test_the_oracle_judges_a_dump_against_a_mapped_model_without_reading_its_weights(tmp_path):
    """A bfloat16 port's dump is checked against npllama in float64 holding the weights rounded to
    bfloat16: a bfloat16 file's mapped matrices hold them already (known from the stored type)."""
    from npllama.oracle import reference_model
    folder = save_hf(random_llama(tiny_config(), seed=11), tmp_path, dtype=torch.bfloat16)
    model = npllama.load(folder, progress=False, mapped=True, dtype=np.float64)
    assert reference_model(model, "bfloat16") is model and reference_model(model, "float32") is model
    rounded = reference_model(model, "float16")               # not exact: rounded into memory, as before
    assert rounded is not model and not isinstance(rounded.layers[0].wq, QuantizedMatrix)
