"""The command line checks every option before it loads a model, and says what it did.

Each bad value goes with a --model that does not exist: were the option checked only after the
load, the error would be about the missing model. So an error that names the option, and not the
model, shows the check came first. Good values with the same missing model reach the load.

Further down: `npllama --help` imports no plug-in; a training run's folder as --model; the timing
line of generate and chat (after Ctrl-C too); Ctrl-C during train names the checkpoint kept.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
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
    (["generate", "-p", "hi"], "--batch-memory", st.integers(max_value=0), "--batch-memory must be at least 1"),
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


# ------------------------------------------------------------------------------------ what the commands say
TIMING = re.compile(r"\[load \d+\.\d\d s \| prompt \d+ tokens in \d+\.\d\d s(, [\d.]+ tok/s)? \| "
                    r"generated \d+ tokens in \d+\.\d\d s(, [\d.]+ tok/s)?\]")
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))


def interruptible(args: list[str], cwd: Path) -> subprocess.Popen:
    """`npllama ARGS` in a process that Ctrl-C (SIGINT) reaches, whatever this test runner ignores."""
    return subprocess.Popen([sys.executable, "-m", "npllama", *args], cwd=cwd, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def ctrl_c(proc: subprocess.Popen, ready) -> tuple[bytes, str]:
    """Wait for ready() to return, press Ctrl-C (SIGINT), and read what the process said: (stdout
    bytes, stderr text); the process is killed if it does not end within a minute."""
    try:
        ready()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return out, err.decode()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A random tiny Llama with a byte-level BPE tokenizer and a window of 4096 positions."""
    pytest.importorskip("torch")
    from tiny import random_llama, save_hf, tiny_config, train_bpe

    folder = tmp_path_factory.mktemp("tiny-cli") / "model"
    save_hf(random_llama(tiny_config(dim=32, n_layers=1, n_heads=2, hidden_dim=48, max_seq_len=4096)), folder,
            tokenizer=train_bpe())
    for name, key in (("config.json", "eos_token_id"), ("generation_config.json", "eos_token_id"),
                      ("tokenizer_config.json", "eos_token")):    # no stop token: it generates all it is asked
        settings_ = json.loads((folder / name).read_text())
        settings_.pop(key, None)
        (folder / name).write_text(json.dumps(settings_))
    return folder


def test_help_lists_the_plugins_without_importing_them():
    code = ("import sys; from npllama.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('imported:', sorted(m for m in ('torch', 'parity') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "imported: []" in done.stdout, done.stdout
    for name in ("generate", "chat", "parity", "train"):
        assert re.search(rf"^  {name} ", done.stdout, re.M), done.stdout


def test_a_training_run_folder_means_its_latest_checkpoint(tiny_model, tmp_path):
    import shutil

    folder = tmp_path / "runs" / "tiny"
    shutil.copytree(tiny_model, folder / "step-000004")
    (folder / "latest").symlink_to("step-000004")
    result = run(["generate", "--model", str(folder), "-p", "hi", "-n", "2", "--raw", "-q"])
    assert result.exit_code == 0, result.output
    result = run(["eval", "--model", str(folder), "--data", TEXT, "--max-tokens", "8", "--json"])
    assert result.exit_code == 0 and '"model": "' + str(folder / "latest") in result.output, result.output
    pytest.importorskip("parity")
    result = run(["parity", "--model", str(folder), "--ids", "1,5,9"])
    assert result.exit_code == 0 and "within tolerance" in result.output, result.output


def test_generate_and_chat_end_with_one_timing_line(tiny_model):
    result = CliRunner().invoke(main, ["generate", "--model", str(tiny_model), "-p", "hi", "-n", "5", "--raw"])
    assert result.exit_code == 0, result.output
    assert TIMING.fullmatch(result.stderr.split("\r")[-1].strip()), result.stderr
    result = CliRunner().invoke(main, ["chat", "--model", str(tiny_model), "-n", "4", "--template", "chatml"],
                                input="hi\nthere\n/quit\n")
    assert result.exit_code == 0, result.output
    assert TIMING.fullmatch(result.stderr.strip().splitlines()[-1]), result.stderr


def test_ctrl_c_during_generate_still_prints_the_timing_line(tiny_model, tmp_path):
    proc = interruptible(["generate", "--model", str(tiny_model), "-p", "hi", "-n", "4000", "--raw", "-t", "1",
                          "--seed", "0"], tmp_path)

    def generating():
        proc.stdout.read(1)                        # the first piece is out
        time.sleep(0.5)
    out, err = ctrl_c(proc, generating)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "[interrupted]" in out.decode(), err
    assert TIMING.fullmatch(err.split("\r")[-1].strip()), err


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="train is a Torch command")
def test_ctrl_c_during_train_names_the_checkpoint_kept_and_how_to_go_on(tmp_path):
    text = (REPO / "data" / "shakespeare_train.txt").read_text(encoding="utf-8")[:20000]
    (tmp_path / "train.txt").write_text(text)
    (tmp_path / "tiny.json").write_text('{"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, '
                                        '"num_attention_heads": 4, "num_key_value_heads": 2, '
                                        '"max_position_embeddings": 32}')
    proc = interruptible(["train", "--config", "tiny.json", "--data", "train.txt", "--out", "runs/tiny",
                          "--vocab-size", "400", "--batch-size", "2", "--seq-len", "16", "--save-every", "2",
                          "--eval-batches", "1", "--minutes", "5", "--sample-tokens", "0"], tmp_path)

    def a_checkpoint_is_saved():
        deadline = time.monotonic() + 120
        while not list((tmp_path / "runs" / "tiny").glob("step-*")) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)
    out, err = ctrl_c(proc, a_checkpoint_is_saved)
    assert proc.returncode == 130, err
    said = re.search(r"interrupted at step (\d+): kept (runs/tiny/step-\d+) \(step (\d+)\), the newest complete "
                     r"checkpoint; `npllama train --resume --out runs/tiny` continues from it", err)
    assert said and (tmp_path / said.group(2) / "model.safetensors").is_file(), err[-2000:]
    assert int(said.group(3)) <= int(said.group(1))
    assert "Traceback" not in err and "Aborted" not in err, err[-2000:]
    bars = [line for line in err.split("\r") if line.startswith("tiny:")]
    assert bars and all(" s of --minutes 5 " in bar for bar in bars), bars[-3:]     # seconds, not 1/1000 steps


@pytest.mark.slow
def test_trace_against_without_a_model_suggests_model_when_the_dump_is_another_models(tiny_model, tmp_path):
    dump = tmp_path / "runs" / "tiny.safetensors"
    result = run(["trace", "--model", str(tiny_model), "--ids", "1,2,3", "--out", str(dump)])   # runs/ is made
    assert result.exit_code == 0, result.output
    result = run(["trace", "--against", str(dump)])                  # checked against the default model
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert "no --model was given, so this is the default model" in result.output, result.output
    assert "name it with --model" in result.output, result.output
