"""The command line checks every option before it loads a model.

Each bad value goes with a --model that does not exist: were the option checked only after the
load, the error would be about the missing model. So an error that names the option, and not the
model, shows the check came first. Good values with the same missing model reach the load.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings, strategies as st

from npllama.cli import main

REPO = Path(__file__).resolve().parent.parent
TEXT = str(REPO / "README.md")
NOWHERE = "no-such-model-folder"
MISSING_MODEL = "no such file or folder"

negative_int = st.integers(max_value=-1)
# (command and arguments before the bad option, the option, a strategy of bad values, words of the error)
BAD = [
    (["generate", "-p", "hi"], "--max-new-tokens", negative_int, "max_new_tokens must be an integer >= 0"),
    (["generate", "-p", "hi"], "--temperature", st.floats(max_value=-1e-9, allow_nan=False), "temperature must be"),
    (["generate", "-p", "hi"], "--temperature", st.sampled_from(["nan", "inf"]), "temperature must be"),
    (["generate", "-p", "hi"], "--top-k", negative_int, "top_k must be an integer >= 0"),
    (["generate", "-p", "hi"], "--top-p", st.floats(min_value=1.0, exclude_min=True, allow_infinity=False),
     r"top_p must lie in (0, 1]"),
    (["generate", "-p", "hi"], "--top-p", st.floats(max_value=0.0, allow_infinity=False), r"top_p must lie in (0, 1]"),
    (["generate", "-p", "hi"], "--seed", negative_int, "--seed: seed must be an integer >= 0"),
    (["generate", "-p", "hi"], "--device", st.sampled_from(["cuda", "cuda:1", "mps"]), "the numpy backend runs on the CPU"),
    (["chat"], "--max-new-tokens", negative_int, "max_new_tokens must be an integer >= 0"),
    (["chat"], "--top-p", st.floats(min_value=1.0, exclude_min=True, allow_infinity=False), r"top_p must lie in (0, 1]"),
    (["chat"], "--context", st.integers(max_value=0), "--context"),
    (["chat"], "--template", st.just("no-such-template.jinja"), "not a built-in"),
    (["eval", "--data", TEXT], "--batch-size", st.integers(max_value=0), "--batch-size"),
    (["eval", "--data", TEXT], "--seq-len", st.integers(max_value=1), "--seq-len"),
    (["eval", "--data", TEXT], "--max-tokens", st.integers(max_value=0), "--max-tokens"),
    (["eval", "--data", TEXT], "--dtype", st.sampled_from(["bfloat16", "float16", "int8"]),
     "the numpy backend computes in float32 or float64"),
    (["eval", "--data", TEXT], "--device", st.just("cuda"), "the numpy backend runs on the CPU"),
    (["convert", "--out", "never-written"], "--kv-heads", st.integers(max_value=0), "--kv-heads"),
]


def run(args: list[str]):
    return CliRunner().invoke(main, args)


@pytest.mark.parametrize("before, option, values, words", BAD, ids=[f"{b[0]} {o}" for b, o, _, _ in BAD])
def test_every_option_is_checked_before_the_model_loads(before, option, values, words):
    @settings(max_examples=8, deadline=None)
    @given(value=values)
    def check(value):
        text = value if isinstance(value, str) else repr(value) if isinstance(value, float) else str(value)
        result = run([*before, "--model", NOWHERE, f"{option}={text}"])
        assert result.exit_code == 2, result.output
        assert words in result.output, result.output
        assert MISSING_MODEL not in result.output, result.output
        assert "Traceback" not in result.output
    check()


@pytest.mark.parametrize("args", [
    ["generate", "-p", "hi", "-n", "0", "-t", "0.7", "--top-k", "40", "--top-p", "0.95", "--seed", "1"],
    ["generate", "-p", "hi", "--raw"],
    ["chat", "--context", "64", "--template", "chatml", "-n", "16"],
    ["eval", "--data", TEXT, "--seq-len", "2", "--batch-size", "1", "--max-tokens", "1", "--dtype", "float64"],
    ["convert", "--out", "never-written", "--kv-heads", "1"],
], ids=lambda a: " ".join(a[:1]))
def test_good_options_reach_the_load(args):
    result = run([*args, "--model", NOWHERE])
    assert result.exit_code == 2, result.output
    assert MISSING_MODEL in result.output, result.output


def test_system_without_the_chat_template_is_refused_first():
    result = run(["generate", "--model", NOWHERE, "-p", "hi", "--raw", "--system", "Be brief."])
    assert result.exit_code == 2 and "--system goes with --chat" in result.output, result.output


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="the Torch backend needs torch")
@pytest.mark.parametrize("args, words", [
    (["generate", "-p", "hi", "--backend", "torch", "--device", "gpu"], "unknown device 'gpu'"),
    (["eval", "--data", TEXT, "--backend", "torch", "--dtype", "int8"], "unsupported dtype 'int8'"),
], ids=["device", "dtype"])
def test_the_torch_backend_checks_its_device_and_dtype_first(args, words):
    result = run([*args, "--model", NOWHERE])
    assert result.exit_code == 2 and words in result.output, result.output
    assert MISSING_MODEL not in result.output, result.output


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="the Torch backend needs torch")
def test_cuda_is_refused_before_the_load_where_torch_sees_no_gpu():
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = run(["generate", "--model", NOWHERE, "-p", "hi", "--backend", "torch", "--device", "cuda"])
    assert result.exit_code == 2 and "sees no CUDA GPU" in result.output, result.output


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="train is a Torch command")
@pytest.mark.parametrize("option, value", [("--minutes", "0"), ("--minutes", "-1"), ("--time-limit", "0"),
                                           ("--sample-tokens", "-1")])
def test_train_refuses_a_bad_budget_before_it_starts(tmp_path, option, value):
    result = run(["train", "--config", str(REPO / "configs" / "tiny.json"), "--data", TEXT,
                  "--out", str(tmp_path / "run"), option, value])
    assert result.exit_code == 2 and option in result.output, result.output
    assert not (tmp_path / "run").exists()


def test_eval_and_convert_name_the_default_model_in_their_help():
    for command in ("eval", "convert", "generate", "chat"):
        result = run([command, "--help"])
        assert result.exit_code == 0
        assert "default: SmolLM2-135M-Instruct" in " ".join(result.output.split()), (command, result.output)


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="parity is a Torch command")
def test_parity_refuses_a_plot_it_could_not_write_before_the_run(tmp_path):
    result = run(["parity", "--model", NOWHERE, "--plot", str(tmp_path / "missing-folder" / "err.png")])
    assert result.exit_code == 2 and "--plot" in result.output, result.output
    assert MISSING_MODEL not in result.output, result.output
