"""The oracle: `npllama trace` writes the reference's every activation; `npllama parity --against`
(and `npllama trace --against`, without torch) judges anyone's; parity.capture records them from
any PyTorch module. Bugs planted in transformers' Llama and in a hand-written gpt-fast-style port
(docs/my_port.py) are named by layer and op, in float32 and bfloat16."""

import hashlib
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings, strategies as st
from safetensors import safe_open
from safetensors.numpy import save_file

import npllama
import parity
from npllama.cli import main
from npllama.errors import InputError
from npllama.model import trace_names
from npllama.oracle import (LAYOUT, RESIDUAL_STREAM, check_dump, interleaved_to_half, read_dump, round_to,
                            summarize_names)
from npllama.report import Report, Row, format_compact, format_table, split_name
from parity.hooks import Tap, capture, transformers_llama
from test_structure import run_without_torch
from tiny import random_llama, save_hf, tiny_config, train_bpe

ROOT = Path(__file__).resolve().parent.parent
N_LAYERS, N_HEADS, N_KV, HEAD_DIM, VOCAB = 4, 4, 2, 16, 300


def config():
    return tiny_config(n_layers=N_LAYERS, n_heads=N_HEADS, n_kv_heads=N_KV)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A random transformers Llama (4 layers, 4 query heads, 2 kv heads) as a Hugging Face folder."""
    path = tmp_path_factory.mktemp("tiny_llama")
    save_hf(random_llama(config(), seed=1), path, tokenizer=train_bpe())
    return path


@pytest.fixture(scope="module")
def model(folder):
    return npllama.load(folder, progress=False)


def cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def hf_model(dtype: str):
    hf = random_llama(config(), seed=1).to(getattr(torch, dtype))
    hf.config._attn_implementation = "eager"
    return hf


# ------------------------------------------------------------------------------ planted bugs
def plant(hf, bug: str, layer: int) -> str:
    """Plant one bug in one layer of transformers' Llama; return the op the verdict must name."""
    if bug == "norm eps":                  # one layer's eps of another scale than Llama's 1e-5
        hf.model.layers[layer].post_attention_layernorm.variance_epsilon = 1.0
        return "ffn_norm"
    if bug == "rotary frequency":          # one layer rotates its first channel pair 1.5x too fast
        def wrong_angles(module, args, kwargs):
            cos, sin = (t.clone() for t in kwargs["position_embeddings"])
            angle = torch.arange(cos.shape[-2], dtype=torch.float64) * 1.5     # theta_0 is 1
            for channel in (0, HEAD_DIM // 2):          # rotate-half: channel 0 pairs with head_dim / 2
                cos[..., channel], sin[..., channel] = torch.cos(angle), torch.sin(angle)
            kwargs["position_embeddings"] = (cos, sin)
            return args, kwargs
        hf.model.layers[layer].self_attn.register_forward_pre_hook(wrong_angles, with_kwargs=True)
        return "attention.q"
    raise ValueError(bug)


def dump_transformers(path, ids, dtype="float32", bug=None, layer=0, name_map=None) -> str | None:
    """Capture transformers' Llama (with a planted bug, if any) on ids and write the dump."""
    hf = hf_model(dtype)
    op = plant(hf, bug, layer) if bug else None
    ids = torch.as_tensor(ids)
    with capture(hf, name_map or transformers_llama(hf.config)) as captured, torch.no_grad():
        hf(input_ids=ids, use_cache=False)
    captured.save(path, ids, producer="transformers LlamaForCausalLM")
    return op


token_ids = st.integers(1, 2).flatmap(
    lambda b: st.integers(4, 12).flatmap(
        lambda s: st.lists(st.lists(st.integers(0, VOCAB - 1), min_size=s, max_size=s), min_size=b, max_size=b)))


@settings(max_examples=12, deadline=None)
@given(bug=st.sampled_from(["norm eps", "rotary frequency"]), layer=st.integers(0, N_LAYERS - 1),
       dtype=st.sampled_from(["float32", "bfloat16"]), ids=token_ids)
def test_a_bug_planted_in_transformers_is_named_by_layer_and_op(folder, model, bug, layer, dtype, ids):
    with tempfile.TemporaryDirectory() as tmp:
        mine = Path(tmp) / "mine.safetensors"
        op = dump_transformers(mine, ids, dtype, bug, layer)
        # bfloat16 rounding compounds over the layers: isolate each layer from the dump's own input
        isolate = ["--isolate"] if dtype == "bfloat16" else []
        result = cli("parity", "--against", mine, "--model", folder, *isolate)
        assert result.exit_code == 1, result.output
        assert result.output.splitlines()[-1].startswith(f"first break: layer {layer} op {op}"), result.output

        # isolated, only the planted layer breaks (and the final norm and logits, which read no layer)
        report = check_dump(read_dump(mine), model, isolate=True)
        assert {r.layer for r in report.rows if not r.ok} <= {layer, None}, format_table(report)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_transformers_without_a_bug_passes_end_to_end_and_isolated(folder, model, tmp_path, dtype):
    ids = np.random.default_rng(2).integers(0, VOCAB, (2, 9))
    dump_transformers(tmp_path / "mine.safetensors", ids, dtype)
    theirs = read_dump(tmp_path / "mine.safetensors")
    assert theirs.dtypes["layers.0.ffn_norm"] == dtype and theirs.metadata["dtype"] == dtype
    for isolate in (False, True):
        report = check_dump(theirs, model, isolate=isolate)
        assert report.exit_code == 0 and len(report.rows) == len(trace_names(N_LAYERS)), format_table(report)
        # the only notes say what a pass in this dtype cannot see
        assert all("cannot exclude" in n or "--isolate" in n for n in report.notes), report.notes


def test_a_port_that_writes_only_the_residual_stream_is_compared_on_it_alone(folder, model, tmp_path):
    keep = {*RESIDUAL_STREAM, "norm", "logits"}
    name_map = {n: tap for n, tap in transformers_llama(config()).items() if n.split(".", 2)[-1] in keep}
    ids = np.random.default_rng(3).integers(0, VOCAB, (1, 10))
    dump_transformers(tmp_path / "residual.safetensors", ids, name_map=name_map)
    theirs = read_dump(tmp_path / "residual.safetensors")
    report = check_dump(theirs, model)
    assert report.ok, format_table(report)
    assert {r.op for r in report.rows} == keep and len(report.rows) == 3 + 2 * N_LAYERS
    assert report.exit_code == 0       # the residual stream and the logits are what a pass needs
    assert report.notes[0] == (f"not compared (not in residual.safetensors): attention_norm, attention.q, "
                               f"attention.k, attention.v, attention.scores_v, attention, ffn_norm, "
                               f"feed_forward (layers 0-{N_LAYERS - 1})")

    # a bug in layer 2's ffn_norm shows in the first residual it reaches, and isolation keeps it there
    dump_transformers(tmp_path / "residual.safetensors", ids, bug="norm eps", layer=2, name_map=name_map)
    report = check_dump(read_dump(tmp_path / "residual.safetensors"), model, isolate=True)
    assert (report.first_break.layer, report.first_break.op) == (2, "ffn_residual"), format_table(report)
    assert {r.layer for r in report.rows if not r.ok} <= {2, None}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_bug_planted_in_transformers_on_cuda_is_named(model, tmp_path):
    hf = hf_model("bfloat16").to("cuda")
    op = plant(hf, "norm eps", 2)
    ids = torch.tensor([[1, 5, 9, 200, 7, 3, 42, 8]], device="cuda")
    with capture(hf, transformers_llama(hf.config)) as captured, torch.no_grad():
        hf(input_ids=ids, use_cache=False)
    captured.save(tmp_path / "cuda.safetensors", ids)
    report = check_dump(read_dump(tmp_path / "cuda.safetensors"), model, isolate=True)
    assert (report.first_break.layer, report.first_break.op) == (2, op), format_table(report)


# ------------------------------------------------------------------------------ npllama trace
def test_trace_writes_every_activation_under_its_name_with_ids_and_metadata(folder, tmp_path):
    ids_file = tmp_path / "ids.json"
    ids_file.write_text(json.dumps([[1, 5, 9, 200, 7, 3], [4, 4, 8, 0, 299, 12]]))
    ref = tmp_path / "ref.safetensors"
    result = cli("trace", "--model", folder, "--ids", ids_file, "--out", ref)
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"wrote {ref}: {len(trace_names(N_LAYERS))} activations")
    with safe_open(str(ref), framework="numpy") as f:
        meta, names = f.metadata(), list(f.keys())
        tensors = {n: f.get_tensor(n) for n in names}
    assert sorted(names) == sorted(["input_ids", *trace_names(N_LAYERS)])
    assert tensors["input_ids"].dtype == np.int64 and tensors["input_ids"].tolist() == json.loads(ids_file.read_text())
    b, s, dim = 2, 6, 64
    sizes = {"batch": b, "seq": s, "dim": dim, "n_heads": N_HEADS, "n_kv_heads": N_KV, "head_dim": HEAD_DIM,
             "vocab_size": VOCAB}
    for name in trace_names(N_LAYERS):
        axes = LAYOUT[split_name(name)[1]].split()
        assert tensors[name].shape == tuple(sizes[a] for a in axes), name
        assert tensors[name].dtype == (np.float32 if name == "logits" else np.float64), name
    assert meta["format"] == "npllama-trace" and meta["schema_version"] == "2" and meta["steps"] == "1"
    assert meta["dtype"] == "float64" and meta["rotary_layout"] == "half" and json.loads(meta["layout"]) == LAYOUT
    assert meta["npllama_version"] == npllama.__version__ and "prompt" not in meta and meta["rotary_dim"] == "16"
    assert meta["model_sha256"] == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ids.json", "ref.safetensors"]   # no temporary left

    result = cli("trace", "--model", folder, "--prompt", "the capital of France", "--out", ref, "--dtype", "float32")
    assert result.exit_code == 0, result.output
    theirs = read_dump(ref)
    assert theirs.metadata["prompt"] == "the capital of France" and set(theirs.dtypes.values()) == {"float32"}


def test_a_trace_checked_against_itself_shows_zero_error(folder, model, tmp_path):
    ref = tmp_path / "ref.safetensors"
    assert cli("trace", "--model", folder, "--ids", "1,5,9,200,7", "--out", ref).exit_code == 0
    for args in (["trace", "--against", ref, "--model", folder], ["parity", "--against", ref, "--model", folder],
                 ["parity", "--against", ref, "--reference", ref], ["trace", "--against", ref, "--reference", ref]):
        result = cli(*args, "--all")
        assert result.exit_code == 0, result.output
        rows = [line.split() for line in result.output.splitlines() if line.endswith("  ok") and "rtol" not in line]
        assert len(rows) == len(trace_names(N_LAYERS)) and {r[-4] for r in rows} == {"0.000e+00"}, result.output
    for isolate in (False, True):
        report = check_dump(read_dump(ref), model, isolate=isolate)
        assert report.ok and max(r.max_abs for r in report.rows) == 0.0

    # the reference in float32 against the float64 one: within float32's bars, not equal
    assert cli("trace", "--model", folder, "--ids", "1,5,9,200,7", "--out", ref, "--dtype", "float32").exit_code == 0
    report = check_dump(read_dump(ref), model)
    assert report.ok and report.dtype == "float32" and max(r.rel for r in report.rows) > 0


def test_the_oracle_runs_where_torch_is_absent(folder, tmp_path):
    ref = tmp_path / "ref.safetensors"
    mine = tmp_path / "mine.safetensors"
    dump_transformers(mine, [[1, 5, 9, 200, 7, 3]], "bfloat16", "norm eps", 1)       # BF16, read with NumPy
    out = run_without_torch("trace", "--model", str(folder), "--ids", "1,5,9,200,7,3", "--out", str(ref))
    assert out.returncode == 0, out.stderr
    out = run_without_torch("trace", "--against", str(mine), "--reference", str(ref), "--all")
    assert out.returncode == 1, out.stderr
    assert "judged as bfloat16" in out.stdout and out.stdout.splitlines()[-1].startswith("first break: layer 1 op ffn_norm")


# ------------------------------------------------------------------------------ a hand-written port
@pytest.fixture(scope="module")
def my_port():
    """docs/my_port.py, imported as the module `my_port` (its rotary function is found by that name)."""
    spec = importlib.util.spec_from_file_location("my_port", ROOT / "docs" / "my_port.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["my_port"] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules["my_port"]


def test_the_gpt_fast_style_port_passes_and_its_planted_bug_is_found(my_port, folder, model, tmp_path):
    ids = torch.tensor([[1, 17, 42, 99, 7, 3, 250, 64]])
    mine = tmp_path / "mine.safetensors"
    my_port.dump(my_port.load(str(folder)), ids, str(mine))
    theirs = read_dump(mine)
    assert theirs.metadata["rotary_layout"] == "interleaved"
    report = check_dump(theirs, model)
    assert report.ok and len(report.rows) == len(trace_names(N_LAYERS)), format_table(report)
    ref = tmp_path / "ref.safetensors"
    assert cli("trace", "--model", folder, "--ids", "1,17,42,99,7,3,250,64", "--out", ref).exit_code == 0
    assert check_dump(theirs, reference=read_dump(ref)).ok

    # the same dump read as rotate-half: q breaks first, and the note says which layout fits
    meta = {**theirs.metadata, "rotary_layout": "half"}
    save_file({"input_ids": theirs.input_ids, **{k: v.astype(np.float32) for k, v in theirs.tensors.items()}},
              str(tmp_path / "half.safetensors"), metadata=meta)
    report = check_dump(read_dump(tmp_path / "half.safetensors"), model)
    assert (report.first_break.layer, report.first_break.op) == (0, "attention.q")
    assert any("rotary_layout='interleaved'" in n for n in report.notes), report.notes

    # key/value heads expanded with repeat instead of repeat_interleave: q, k, v fine, attention not
    my_port.dump(my_port.load(str(folder), kv_repeat_bug=True), ids, str(mine))
    result = cli("parity", "--against", mine, "--model", folder, "--compact")
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert lines[3].startswith("first break: layer 0 op attention.scores_v"), result.output   # the verdict first
    assert "worst op of each layer:" in lines and lines[-1].endswith("--all prints every one)")


# ------------------------------------------------------------------------------ bad input
def test_bad_dumps_and_options_get_one_clear_error(folder, tmp_path):
    ref = tmp_path / "ref.safetensors"
    assert cli("trace", "--model", folder, "--ids", "1,5,9,200,7", "--out", ref).exit_code == 0
    good = read_dump(ref)
    tensors = {"input_ids": good.input_ids, **good.tensors}

    def write(name, metadata=None, **changes):
        path = tmp_path / name
        save_file({k: v for k, v in {**tensors, **changes}.items() if v is not None}, str(path), metadata=metadata)
        return path

    def error(*args):
        result = cli(*args)
        assert result.exit_code == 2, result.output
        return result.output

    q = tensors["layers.0.attention.q"]
    out = error("trace", "--against", write("t.safetensors", **{"layers.0.attention.q": q.transpose(0, 2, 1, 3).copy()}),
                "--model", folder)
    assert "'layers.0.attention.q' has shape (1, 5, 4, 16), the reference's is (1, 4, 5, 16)" in out
    assert "(batch n_heads seq head_dim); heads and seq are swapped" in out
    assert "has no input_ids" in error("trace", "--against", write("n.safetensors", input_ids=None), "--model", folder)
    assert "outside the vocabulary" in error("trace", "--against", write("v.safetensors", input_ids=good.input_ids * 100),
                                             "--model", folder)
    assert "holds none of npllama's trace names" in error(
        "trace", "--against", write("x.safetensors", **{n: None for n in good.tensors}, mine=np.ones(3)), "--model", folder)
    assert "rotary_layout is 'sideways'" in error("trace", "--against", write("r.safetensors", {"rotary_layout": "sideways"}),
                                                  "--model", folder)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    assert "junk.safetensors" in error("trace", "--against", tmp_path / "junk.safetensors", "--model", folder)
    assert "--reference replaces --model" in error("trace", "--against", ref, "--reference", ref, "--model", folder)
    assert "--device belong to the Torch comparison" in error("parity", "--against", ref, "--device", "cpu")
    assert "--json goes with --against" in error("parity", "--model", folder, "--json")
    assert "one of the two" in error("trace", "--model", folder)
    assert "float64 or float32" in error("trace", "--model", folder, "--ids", "1,2", "--out", ref, "--dtype", "bfloat16")

    report = check_dump(read_dump(write("u.safetensors", extra=np.ones(2), **{"layers.9.ffn_norm": np.ones(2)})),
                        reference=good)
    assert report.ok and "ignored (not trace names of this model): extra, layers.9.ffn_norm" in report.notes


def test_a_name_map_that_names_nothing_is_refused():
    hf = hf_model("float32")
    with pytest.raises(InputError, match="'layers.{i}.ffn_norm' -> 'model.layers.{i}.post_norm' matches no submodule"):
        with capture(hf, {"layers.{i}.ffn_norm": "model.layers.{i}.post_norm"}):
            pass
    with pytest.raises(InputError, match="function 'transformers.nowhere.rope' not found"):
        with capture(hf, {"layers.{i}.attention.q": Tap(function="transformers.nowhere.rope"),
                          "layers.{i}.ffn_norm": "model.layers.{i}.post_attention_layernorm"}):
            pass
    assert parity.capture is capture


# ------------------------------------------------------------------------------ pieces
@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=1, max_size=64),
       st.integers(0, 0xFFFF))
def test_bfloat16_rounding_is_torchs(values, low_bits):
    x = np.array(values, dtype=np.float32)
    x = (x.view(np.uint32) & 0xFFFF0000 | low_bits).view(np.float32)     # ties and near-ties included
    x = x[np.isfinite(x) & (np.abs(x) < 3.3e38)]
    want = torch.from_numpy(x).to(torch.bfloat16).to(torch.float64).numpy()
    assert np.array_equal(round_to(x, "bfloat16"), want)


def test_interleaved_to_half_undoes_the_weight_permutation():
    from npllama.formats.permute import permute_to_interleaved
    x = np.random.default_rng(0).standard_normal((2, 3, 5, 8))
    # an interleaved port's q is x with its channels in the order permute_to_interleaved gives the rows
    order = permute_to_interleaved(np.arange(8.0), 1).astype(int)
    assert np.array_equal(interleaved_to_half(x[..., order], 8), x)
    # partial rotary: only the first rotary_dim channels are pairs; the rest pass through
    partial = permute_to_interleaved(np.arange(4.0), 1).astype(int)
    assert np.array_equal(interleaved_to_half(x[..., [*partial, 4, 5, 6, 7]], 4), x)


def test_the_compact_view_puts_the_verdict_first():
    broken = {(1, "attention"), (1, "ffn_residual"), (2, "attention_norm"), (2, "attention"), (2, "ffn_residual")}
    rows = [Row("tok_embeddings", None, "tok_embeddings", 0, 0, 1e-4)]
    for i in range(3):
        for op in ("attention_norm", "attention", "ffn_residual"):
            rel = 5e-2 if (i, op) in broken else 1e-6
            rows.append(Row(f"layers.{i}.{op}", i, op, rel, rel, 1e-4))
    report = Report("title", rows, "float32", "cpu")
    lines = format_compact(report, around=1).splitlines()
    assert lines[:2] == ["title", "first break: layer 1 op attention (rel 5.00e-02 > rtol 1e-04); 5 of 10 ops over"]
    around = lines[5:8]
    assert [line.split()[:2] for line in around] == [["1", "attention_norm"], ["1", "attention"], ["1", "ffn_residual"]]
    worst = lines[lines.index("worst op of each layer:") + 2:-1]
    assert [line.split()[0] for line in worst] == ["-", "0", "1", "2"]
    assert len(format_table(report).splitlines()) == 2 + len(rows) + 1


def test_names_are_summarised_by_op_and_layer_ranges():
    names = [n for n in trace_names(30) if split_name(n)[1] in ("attention.q", "attention.k") or n == "logits"]
    assert summarize_names(names) == "attention.q, attention.k (layers 0-29); logits"
    assert summarize_names(["layers.0.attention.v", "layers.1.attention.v", "layers.5.attention.v"]) == \
        "attention.v (layers 0-1, 5)"


# ------------------------------------------------------------------------------ the default model
@pytest.mark.slow
def test_default_model_trace_and_a_bug_planted_in_transformers(tmp_path):
    from parity.report import transformers_twin
    from test_parity_model import default_pair

    ref = tmp_path / "ref.safetensors"
    result = cli("trace", "--out", ref)
    assert result.exit_code == 0, result.output
    result = cli("parity", "--against", ref, "--reference", ref)
    assert result.exit_code == 0 and result.output.splitlines()[-1].startswith("all 303 ops within tolerance")

    _, torch_model = default_pair()
    hf = transformers_twin(torch_model)
    ids = read_dump(ref).input_ids
    for planted in (False, True):
        if planted:
            hf.model.layers[7].post_attention_layernorm.variance_epsilon = 5e-2    # one layer's eps wrong
        with capture(hf, transformers_llama(hf.config)) as captured, torch.no_grad():
            hf(input_ids=torch.from_numpy(ids), use_cache=False)
        captured.save(tmp_path / "hf.safetensors", ids)
        report = check_dump(read_dump(tmp_path / "hf.safetensors"), reference=read_dump(ref))
        if planted:
            assert (report.first_break.layer, report.first_break.op) == (7, "ffn_norm"), format_table(report)
        else:
            assert report.ok and len(report.rows) == 303, format_table(report)
