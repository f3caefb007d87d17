"""`npllama parity`: the per-op table, its verdict and exit status, and that a bug planted in one op
of one layer is named there (layer and op), on tiny models and on the default model."""

import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings, strategies as st

import npllama
import parity
import parity.model
from npllama.cli import main
from npllama.config import ModelArgs
from parity.model import Transformer
from parity.report import (NotComparable, compare, errors, format_table, parity_report, plot_errors,
                           split_name, transformers_report, transformers_twin)
from test_parity_model import default_pair, random_params

ARGS = ModelArgs(dim=32, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=48, max_seq_len=64,
                 attention_bias=True, attention_out_bias=True,
                 rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})
IDS = np.random.default_rng(0).integers(0, 64, (2, 11))
OPS = ["attention_norm", "attention.q", "attention.k", "attention.v", "attention.scores_v", "attention",
       "attention_residual", "ffn_norm", "feed_forward", "ffn_residual"]


def tiny(dtype=torch.float32, args=ARGS, seed=0):
    return Transformer(args, random_params(args, seed), dtype=dtype)


def test_rows_name_every_op_of_every_layer_in_forward_order():
    report = parity_report(tiny(), IDS)
    want = ["tok_embeddings"] + [f"layers.{i}.{op}" for i in range(4) for op in OPS] + ["norm", "logits"]
    assert [r.name for r in report.rows] == want
    assert [(r.layer, r.op) for r in report.rows[1:3]] == [(0, "attention_norm"), (0, "attention.q")]
    assert report.ok and report.first_break is None
    table = format_table(report)
    assert table.splitlines()[1].split() == ["layer", "op", "max", "abs", "rel", "rtol", "ok"]
    assert "    3  ffn_residual" in table and table.endswith(table.splitlines()[-1])
    assert table.splitlines()[-1].startswith("all 43 ops within tolerance")


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_every_dtype_passes_end_to_end_and_isolated(dtype):
    model = tiny(dtype)
    for isolate in (False, True):
        report = parity_report(model, IDS, isolate=isolate)
        assert report.ok, format_table(report)


# ------------------------------------------------------------------------------ planted bugs
def plant(monkeypatch, model, where: str, layer: int, n_layers: int = ARGS.n_layers) -> str:
    """Plant one bug in one layer; return the op the report must name first.

    The patched functions count their calls: each forward calls them once per layer, in order."""
    if where == "attention_norm eps":
        model.layers[layer].attention_norm.eps = 1e-2            # Llama's 1e-5 typed wrong
        return "attention_norm"
    if where == "ffn_norm eps":
        model.layers[layer].ffn_norm.eps = 1e-2
        return "ffn_norm"
    calls = {"n": 0}
    if where == "attention scale":                               # softmax(q k / sqrt(d)) with d off
        real = parity.model.scaled_dot_product_attention

        def wrong(q, k, v, impl, kv_mask=None):
            calls["n"] += 1
            return real(q * (1.02 if (calls["n"] - 1) % n_layers == layer else 1.0), k, v, impl, kv_mask)
        monkeypatch.setattr(parity.model, "scaled_dot_product_attention", wrong)
        return "attention.scores_v"
    if where == "mlp":                                           # a slightly wrong SwiGLU
        real = parity.model.feed_forward

        def wrong(x, *weights):
            calls["n"] += 1
            out = real(x, *weights)
            return out * (1.002 if (calls["n"] - 1) % n_layers == layer else 1.0)
        monkeypatch.setattr(parity.model, "feed_forward", wrong)
        return "feed_forward"
    raise ValueError(where)


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(["attention_norm eps", "ffn_norm eps", "attention scale", "mlp"]), st.integers(0, 3))
def test_a_planted_bug_is_named_by_layer_and_op(where, layer):
    with pytest.MonkeyPatch.context() as monkeypatch:
        model = tiny()
        op = plant(monkeypatch, model, where, layer)
        report = parity_report(model, IDS)
        first = report.first_break
        assert (first.layer, first.op) == (layer, op), format_table(report)
        before = report.rows[:report.rows.index(first)]
        assert before and all(r.ok for r in before)
        assert f"first break: layer {layer} op {op}" in format_table(report)

        # isolated, the layers after the planted one start from the reference again: only its
        # layer breaks (and the final norm and logits, which read no layer's output)
        isolated = parity_report(model, IDS, isolate=True)
        broken = {(r.layer, r.op) for r in isolated.rows if not r.ok}
        assert (layer, op) in broken and {l for l, _ in broken} <= {layer, None}


@pytest.mark.slow
def test_default_model_report_passes_and_names_a_planted_bug(default_parity_model):
    np_model, model = default_parity_model
    ids = np_model.tokenizer.encode("The capital of France is")
    assert parity_report(model, [ids]).ok
    model.layers[7].ffn_norm.eps = 5e-2                          # one layer's eps wrong
    try:
        report = parity_report(model, [ids])
    finally:
        model.layers[7].ffn_norm.eps = np_model.config.norm_eps
    assert (report.first_break.layer, report.first_break.op) == (7, "ffn_norm")
    assert "first break: layer 7 op ffn_norm" in format_table(report)


@pytest.fixture
def default_parity_model():
    return default_pair()


# ------------------------------------------------------------------------------ the command
@pytest.mark.slow
def test_cli_on_the_default_model_passes_in_float32():
    result = CliRunner().invoke(main, ["parity"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "5 tokens"
    assert any(line.split()[:2] == ["29", "ffn_residual"] for line in lines)
    assert lines[-1].startswith("all 303 ops within tolerance")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from tiny import random_llama, save_hf, tiny_config, train_bpe

    folder = tmp_path_factory.mktemp("tiny_hf")
    save_hf(random_llama(tiny_config(n_layers=3, n_heads=4, n_kv_heads=2, bias=True), seed=1), folder,
            tokenizer=train_bpe())
    return folder


def test_cli_exits_1_and_names_the_break(tiny_checkpoint, monkeypatch):
    plant(monkeypatch, None, "mlp", 1, n_layers=3)
    result = CliRunner().invoke(main, ["parity", "--model", str(tiny_checkpoint), "--ids", "1,5,9,200,7"])
    assert result.exit_code == 1, result.output
    assert result.output.splitlines()[-1].startswith("first break: layer 1 op feed_forward")


def test_cli_transformers_table_and_plot(tiny_checkpoint, tmp_path):
    png = tmp_path / "errors.png"
    result = CliRunner().invoke(main, ["parity", "--model", str(tiny_checkpoint), "--prompt", "the capital of France",
                                       "--transformers", "--attention", "flash", "--plot", str(png)])
    assert result.exit_code == 0, result.output
    assert "transformers" in result.output and "LlamaForCausalLM" in result.output
    assert result.output.count("all 33 ops within tolerance") == 2     # ours, and transformers'
    assert "not captured" not in result.output                           # q/k after rope included
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["errors.png"]   # no temporary left behind


def test_cli_refuses_what_it_cannot_do(tiny_checkpoint):
    runner = CliRunner()
    if not torch.cuda.is_available():
        result = runner.invoke(main, ["parity", "--model", str(tiny_checkpoint), "--device", "cuda"])
        assert result.exit_code == 2 and "sees no CUDA GPU" in result.output
    result = runner.invoke(main, ["parity", "--model", str(tiny_checkpoint), "--ids", "1,x"])
    assert result.exit_code == 2 and "--ids must be comma-separated integers" in result.output
    result = runner.invoke(main, ["parity", "--model", str(tiny_checkpoint), "--ids", "1,100000"])
    assert result.exit_code == 2 and "outside the vocabulary" in result.output
    result = runner.invoke(main, ["parity", "--dtype", "int8"])
    assert result.exit_code == 2 and "int8" in result.output


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cli_on_cuda_in_bfloat16(tiny_checkpoint):
    result = CliRunner().invoke(main, ["parity", "--model", str(tiny_checkpoint), "--device", "cuda",
                                       "--dtype", "bfloat16", "--ids", "1,2,3,4"])
    assert result.exit_code == 0, result.output


# ------------------------------------------------------------------------------ pieces
def test_transformers_table_on_a_tiny_model_in_bfloat16():
    model = tiny(torch.bfloat16)
    report = transformers_report(model, IDS)
    assert report.ok and not report.notes and len(report.rows) == 43, format_table(report)


def test_transformers_cannot_express_partial_rotary():
    with pytest.raises(NotComparable, match="partial rotary"):
        transformers_twin(tiny(args=ARGS.replace(partial_rotary_factor=0.5)))


def test_errors_and_names():
    assert errors(np.array([1.0, 2.5]), np.array([1.0, 2.0])) == (0.5, 0.25)
    assert errors(np.zeros(2), np.zeros(2)) == (0.0, 0.0)
    assert errors(np.ones(2), np.zeros(2)) == (1.0, math.inf)
    nan_row = compare({"x": np.ones(3)}, {"x": np.array([1.0, np.nan, 1.0])}, lambda n: 1e-3)[0]
    assert math.isnan(nan_row.rel) and not nan_row.ok                      # nan is a break, not a pass
    with pytest.raises(npllama.InputError, match="did not trace"):
        compare({"x": np.ones(1), "y": np.ones(1)}, {"x": np.ones(1)}, lambda n: 1e-3)
    assert split_name("layers.12.attention.q") == (12, "attention.q")
    assert split_name("logits") == (None, "logits")


def test_plot_draws_every_report(tmp_path):
    reports = [parity_report(tiny(), IDS), parity_report(tiny(torch.bfloat16), IDS, isolate=True)]
    plot_errors(reports, str(tmp_path / "a.png"))
    assert (tmp_path / "a.png").stat().st_size > 10_000
