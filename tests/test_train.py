"""npllama train / npllama eval: the Torch trainer, its checkpoints, and perplexity.

What is held: the loss the trainer reports is npllama's Transformer.loss of the same batch; a run
interrupted and resumed ends with the same parameters (bit for bit) as one that was not; a write
that is killed or fails mid-way never damages the latest checkpoint; the command line trains,
samples, plots and writes checkpoints npllama loads; perplexity agrees across the two backends.
Models here are tiny (a few thousand parameters) so that every test runs in seconds.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from click.testing import CliRunner
from safetensors.numpy import load_file

import npllama
from npllama.cli import main
from npllama.tolerances import TRAIN_LOSS_RTOL
from npllama.evaluate import eval_windows as ppl_windows
from npllama.evaluate import perplexity
from parity.train import (TrainConfig, get_batch, latest_checkpoint, learning_rate, load_tokenizer, setup, train,
                          train_tokenizer)

ROOT = Path(__file__).resolve().parents[1]
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "max_position_embeddings": 64}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A 30 KB slice of the training text, a held-out slice, a tokenizer trained on them, a config."""
    d = tmp_path_factory.mktemp("corpus")
    text = (ROOT / "data" / "shakespeare_train.txt").read_text()
    (d / "train.txt").write_text(text[:30000])
    (d / "valid.txt").write_text(text[-6000:])
    train_tokenizer(d / "train.txt", 400, d / "tokenizer.model")
    (d / "tiny.json").write_text(json.dumps(TINY))
    return d


def quiet(*args):
    return None


def new_run(corpus, out, dtype="float32", **cfg):
    cfg = TrainConfig(**{"steps": 6, "batch_size": 4, "seq_len": 32, "warmup": 2, "eval_every": 3,
                         "eval_batches": 2, "save_every": 3, "dtype": dtype, **cfg})
    return setup(out, corpus / "train.txt", corpus / "valid.txt", config=corpus / "tiny.json",
                 tokenizer=corpus / "tokenizer.model", cfg=cfg, log=quiet)


def params_of(run) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in run.model.state_dict().items()}


# ---------------------------------------------------------------------------- the loss
@pytest.mark.parametrize("dtype,grad_accum", [("float64", 1), ("float32", 2)])
def test_reported_loss_is_the_numpy_reference_loss_of_the_batch(corpus, tmp_path, dtype, grad_accum):
    run = new_run(corpus, tmp_path / "run", dtype=dtype, grad_accum=grad_accum, steps=2, save_every=0, eval_every=0)
    before = params_of(run)
    train(run, stop_after=1, progress=False)
    reported = run.state["history"][0]["loss"]
    reference = npllama.Transformer(run.args, before, dtype=np.dtype(dtype))
    losses = [reference.loss(get_batch(run.train_tokens, 0, m, run.cfg, run.bos)) for m in range(grad_accum)]
    expected = float(np.mean(losses))
    assert abs(reported - expected) <= TRAIN_LOSS_RTOL * abs(expected)
    # the evaluation loss is the same function of the held-out windows
    ev = run.evaluate()
    after = npllama.Transformer(run.args, params_of(run), dtype=np.dtype(dtype))
    ref_ev = sum(after.loss(b) * len(b) for b in run.eval_batches) / sum(len(b) for b in run.eval_batches)
    assert abs(ev - ref_ev) <= TRAIN_LOSS_RTOL * abs(ref_ev)


def test_bfloat16_autocast_trains_with_float32_master_weights(corpus, tmp_path):
    """The CUDA recipe (bfloat16 autocast) runs here on the CPU too: same loss to bfloat16's precision."""
    plain = new_run(corpus, tmp_path / "plain", steps=2, save_every=0, eval_every=0)
    mixed = new_run(corpus, tmp_path / "mixed", steps=2, save_every=0, eval_every=0, autocast="bfloat16")
    train(plain, progress=False)
    train(mixed, progress=False)
    assert all(p.dtype == torch.float32 for p in mixed.model.parameters())
    for a, b in zip(plain.state["history"], mixed.state["history"]):
        assert math.isfinite(b["loss"]) and abs(a["loss"] - b["loss"]) < 0.02 * a["loss"]


def test_batches_start_from_bos_and_depend_only_on_seed_step_and_micro_batch(corpus, tmp_path):
    run = new_run(corpus, tmp_path / "run")
    a = get_batch(run.train_tokens, 5, 1, run.cfg, run.bos)
    assert a.shape == (4, 32) and (a[:, 0] == run.bos).all()
    np.testing.assert_array_equal(a, get_batch(run.train_tokens, 5, 1, run.cfg, run.bos))
    assert not np.array_equal(a, get_batch(run.train_tokens, 5, 0, run.cfg, run.bos))
    other = dataclasses.replace(run.cfg, seed=1)
    assert not np.array_equal(a, get_batch(run.train_tokens, 5, 1, other, run.bos))


def test_learning_rate_warms_up_then_follows_a_cosine_to_min_lr():
    cfg = TrainConfig(steps=110, warmup=10, lr=1e-3, min_lr=1e-4)
    lrs = [learning_rate(s, cfg) for s in range(cfg.steps + 1)]
    np.testing.assert_allclose(lrs[:10], [1e-3 * (s + 1) / 10 for s in range(10)])
    assert lrs[10] == pytest.approx(1e-3) and lrs[60] == pytest.approx(5.5e-4) and lrs[110] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


# ---------------------------------------------------------------------------- resume
def test_resume_gives_the_parameters_of_an_uninterrupted_run(corpus, tmp_path):
    whole = new_run(corpus, tmp_path / "whole")
    train(whole, progress=False)
    expected = params_of(whole)

    first = new_run(corpus, tmp_path / "parts")
    train(first, stop_after=3, progress=False)                 # stops after the step-3 checkpoint
    del first
    result = CliRunner().invoke(main, ["train", "--resume", "--out", str(tmp_path / "parts"), "-q",
                                       "--keep", "1", "--sample-tokens", "5"])     # step-000003 is pruned
    assert result.exit_code == 0, result.output
    assert "resuming" in result.output and "step 6/6" in result.output
    assert not (tmp_path / "parts" / "step-000003").exists()

    # bit for bit: both runs do the same float operations on the same values in the same order, in
    # one process on the CPU (the resumed one reads back exactly what was saved, seeded batches)
    resumed = load_file(str(tmp_path / "parts" / "step-000006" / "model.safetensors"))
    uninterrupted = load_file(str(tmp_path / "whole" / "step-000006" / "model.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    for name in resumed:
        np.testing.assert_array_equal(resumed[name], uninterrupted[name], err_msg=name)
    opt_a = load_file(str(tmp_path / "parts" / "step-000006" / "trainer" / "optimizer.safetensors"))
    opt_b = load_file(str(tmp_path / "whole" / "step-000006" / "trainer" / "optimizer.safetensors"))
    for name in opt_b:
        np.testing.assert_array_equal(opt_a[name], opt_b[name], err_msg=name)
    loaded = npllama.load(tmp_path / "parts" / "latest", progress=False).state_dict()
    for name, value in expected.items():
        np.testing.assert_array_equal(loaded[name], value, err_msg=name)
    hist = lambda p: [h["loss"] for h in json.loads((p / "latest" / "trainer" / "state.json").read_text())["history"]]  # noqa: E731
    assert hist(tmp_path / "parts") == hist(tmp_path / "whole")


# ---------------------------------------------------------------------------- crash safety
KILLED_WRITER = textwrap.dedent("""
    import sys, time, pathlib
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    import npllama.io as nio
    from test_train import new_run
    from parity.train import train
    real = nio.atomic_write
    class Stall:
        def __init__(self, path, *a, **k):
            self.inner, self.path = real(path, *a, **k), pathlib.Path(path)
        def __enter__(self):
            self.f = self.inner.__enter__()
            return self
        def write(self, data):
            if ".step-000004.tmp-" in str(self.path) and self.path.name == "model.safetensors":
                self.f.write(data[: len(data) // 2]); self.f.flush()
                pathlib.Path({marker!r}).write_text("mid-write")
                time.sleep(120)
            return self.f.write(data)
        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)
    nio.atomic_write = Stall
    train(new_run(pathlib.Path({corpus!r}), pathlib.Path({out!r}), steps=4, save_every=2, eval_every=0),
          progress=False)
""")


def test_a_ctrl_c_that_python_drops_still_stops_training_before_the_next_step(corpus, tmp_path):
    """Python drops a KeyboardInterrupt raised inside a weakref callback (printing "Exception
    ignored" and a traceback), and torch runs such callbacks all through a step: npllama train
    remembers the press, prints no traceback, and the loop stops before the next step."""
    import weakref

    from parity.cli import ctrl_c_remembered

    def press_inside(_):
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(10_000):     # the handler runs here, at a loop's check: its exception is dropped
            pass

    class Thing:
        pass
    run = new_run(corpus, tmp_path / "run")
    old, hook, dropped = signal.signal(signal.SIGINT, signal.default_int_handler), sys.unraisablehook, []
    sys.unraisablehook = dropped.append            # what would print "Exception ignored"
    try:
        with ctrl_c_remembered() as pressed:
            thing = Thing()
            ref = weakref.ref(thing, press_inside)
            del thing
            assert ref() is None and pressed() and not dropped
            with pytest.raises(KeyboardInterrupt):
                train(run, progress=False, interrupted=pressed)
    finally:
        signal.signal(signal.SIGINT, old)
        sys.unraisablehook = hook
    assert run.step == 0


def test_a_write_killed_midway_leaves_the_latest_checkpoint_intact(corpus, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "marker"
    script = KILLED_WRITER.format(root=str(ROOT), tests=str(ROOT / "tests"), marker=str(marker),
                                  corpus=str(corpus), out=str(out))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 90
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline, "the writer never reached the middle of its checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    leftovers = [p.name for p in out.iterdir() if ".tmp-" in p.name]
    assert leftovers, "the kill should have left a half-written temporary folder"
    assert latest_checkpoint(out).name == "step-000002"
    assert os.readlink(out / "latest") == "step-000002"
    model = npllama.load(out / "latest", progress=False)                  # the last good one loads
    state = json.loads((out / "latest" / "trainer" / "state.json").read_text())
    assert state["step"] == 2 and model.config.n_layers == 2

    run = setup(out, resume=True, log=quiet)                              # and the run goes on
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    train(run, progress=False)
    assert latest_checkpoint(out).name == "step-000004"


def test_a_failure_inside_the_write_keeps_the_previous_checkpoint(corpus, tmp_path, monkeypatch):
    import npllama.io as nio

    run = new_run(corpus, tmp_path / "run", steps=4, save_every=2, eval_every=0)
    train(run, stop_after=2, progress=False)
    good = load_file(str(tmp_path / "run" / "step-000002" / "model.safetensors"))
    real = nio.atomic_write

    def failing(path, *a, **k):
        if Path(path).name == "state.json":
            raise OSError(28, "No space left on device")
        return real(path, *a, **k)

    monkeypatch.setattr(nio, "atomic_write", failing)
    with pytest.raises(OSError, match="No space left"):
        train(run, progress=False)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["latest", "loss.png", "step-000002",
                                                                     "tokenizer.model"]
    again = load_file(str(tmp_path / "run" / "latest" / "model.safetensors"))
    for name in good:
        np.testing.assert_array_equal(again[name], good[name])


# ---------------------------------------------------------------------------- the --minutes budget
class Clock:
    """A wall clock that only the run's work moves: each step, evaluation and checkpoint costs the
    seconds the test gives it (the work itself is real); steps cost `slowdown` times more once
    the budget has been fitted, as on a machine that gets busier."""

    def __init__(self, now, step_s, eval_s, save_s, slowdown):
        self.now, self.step_s, self.eval_s, self.save_s, self.slowdown = now, step_s, eval_s, save_s, slowdown
        self.fitted = False

    def perf_counter(self):
        return self.now

    def wrap(self, run):
        step, evaluate, save = run.optimizer.step, run.evaluate, run.save

        def timed(f, seconds):
            def g(*a, **k):
                self.now += seconds() if callable(seconds) else seconds
                return f(*a, **k)
            return g
        run.optimizer.step = timed(step, lambda: self.step_s * (self.slowdown if "fitted" in run.state else 1))
        run.evaluate = timed(evaluate, self.eval_s)
        run.save = timed(save, self.save_s)


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(budget=st.floats(60, 600), setup_share=st.floats(0, 0.2), step_share=st.floats(0.02, 0.08),
       eval_share=st.floats(0, 0.08), save_share=st.floats(0, 0.08), slowdown=st.floats(1, 2))
def test_minutes_holds_steps_evaluations_and_checkpoints_within_the_budget(
        corpus, tmp_path_factory, monkeypatch, budget, setup_share, step_share, eval_share, save_share, slowdown):
    import parity.train as trainer
    run = new_run(corpus, tmp_path_factory.mktemp("budget") / "run", steps=10**6, warmup=20, eval_every=50,
                  save_every=0, eval_batches=1)
    clock = Clock(budget * setup_share, budget * step_share, budget * eval_share, budget * save_share, slowdown)
    clock.wrap(run)
    monkeypatch.setattr(trainer, "time", clock)
    train(run, minutes=budget / 60, started=0.0, progress=False, log=quiet)
    fitted = run.state["fitted"]
    # done by the budget less the reserve for the sample, give or take the one step that ran slower than planned
    assert clock.now <= budget - fitted["reserve_s"] + (slowdown - 1) * clock.step_s + 1e-9
    assert fitted["at_step"] <= 20                       # within the warm-up: the schedule so far is the same
    assert run.state["evals"][-1]["step"] == run.step and latest_checkpoint(run.out).name.endswith(f"{run.step:06d}")
    if slowdown == 1:    # a steady machine: the fitted count is what runs (to the rounding of the seconds)
        assert fitted["steps"] - 1 <= run.step <= fitted["steps"]


# ---------------------------------------------------------------------------- the command line
def test_train_command_trains_plots_samples_and_its_checkpoints_load(corpus, tmp_path):
    out = tmp_path / "cli"
    args = ["train", "--config", str(corpus / "tiny.json"), "--data", str(corpus / "train.txt"),
            "--out", str(out), "--vocab-size", "400", "--steps", "8", "--batch-size", "4", "--seq-len", "32",
            "--warmup", "2", "--eval-every", "4", "--eval-batches", "2", "--save-every", "4", "-q",
            "--sample-tokens", "20", "--sample-prompt", "Ham."]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "unigram baseline" in result.output and "step 8/8" in result.output
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "samples.txt").read_text().startswith("Ham.")
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("step-")) == ["step-000004", "step-000008"]
    state = json.loads((out / "latest" / "trainer" / "state.json").read_text())
    assert [e["step"] for e in state["evals"]] == [4, 8] and len(state["history"]) == 8
    assert state["data"]["valid"] is None                      # held out: the last 5% of --data

    model = npllama.load(out / "latest", progress=False)
    assert model.tokenizer.decode(model.tokenizer.encode("Ham.\nTo be,", add_bos=False)) == "Ham.\nTo be,"
    text = "".join(npllama.generate_text(model, "Ham.", max_new_tokens=5))
    assert isinstance(text, str)

    again = CliRunner().invoke(main, args)                     # the run exists: refuse, name --resume
    assert again.exit_code == 2 and "--resume" in again.output

    # uptraining a converted (MQA) model from the checkpoint: the GQA recipe end to end
    conv = CliRunner().invoke(main, ["convert", "-m", str(out / "latest"), "-g", "1", "-o", str(tmp_path / "mqa")])
    assert conv.exit_code == 0, conv.output
    up = CliRunner().invoke(main, ["train", "--init", str(tmp_path / "mqa"), "--data", str(corpus / "train.txt"),
                                   "--valid", str(corpus / "valid.txt"), "--out", str(tmp_path / "up"), "--steps", "2",
                                   "--batch-size", "2", "--seq-len", "16", "--warmup", "1", "-q", "--sample-tokens", "0"])
    assert up.exit_code == 0, up.output
    assert npllama.load(tmp_path / "up" / "latest", progress=False).config.n_kv_heads == 1
    more = CliRunner().invoke(main, ["train", "--init", str(tmp_path / "up"), "--data", str(corpus / "train.txt"),
                                     "--valid", str(corpus / "valid.txt"), "--out", str(tmp_path / "more"), "--steps",
                                     "1", "--batch-size", "2", "--seq-len", "16", "--warmup", "1", "-q",
                                     "--sample-tokens", "0"])                 # a run's folder: its newest checkpoint
    assert more.exit_code == 0, more.output


def test_bad_requests_get_clear_errors(corpus, tmp_path):
    r = CliRunner().invoke(main, ["train", "--resume", "--out", str(tmp_path / "none")])
    assert r.exit_code == 2 and "no checkpoint to resume from" in r.output
    (tmp_path / "bad.json").write_text(json.dumps({**TINY, "vocab_size": 999}))
    r = CliRunner().invoke(main, ["train", "--config", str(tmp_path / "bad.json"), "--data", str(corpus / "train.txt"),
                                  "--tokenizer", str(corpus / "tokenizer.model"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "vocab_size 999 differs from the tokenizer's 400" in r.output
    r = CliRunner().invoke(main, ["train", "--data", str(corpus / "train.txt"), "--out", str(tmp_path / "o2")])
    assert r.exit_code == 2 and "exactly one of --config" in r.output
    r = CliRunner().invoke(main, ["train", "--config", str(corpus / "tiny.json"), "--data", str(corpus / "train.txt"),
                                  "--tokenizer", str(corpus / "tokenizer.model"), "--out", str(tmp_path / "o3"),
                                  "--seq-len", "65"])
    assert r.exit_code == 2 and "context window (64)" in r.output


# ---------------------------------------------------------------------------- tokenizer and perplexity
def test_trained_tokenizer_keeps_text_exactly(corpus):
    sp = load_tokenizer(corpus / "tokenizer.model")
    text = "Ham.\nTo be, or not to be,--that is the question:\n\n  [Exit.]  Zürich 123\n"
    assert sp.decode(sp.encode(text)) == text
    assert sp.get_piece_size() == 400 and (sp.bos_id(), sp.eos_id(), sp.unk_id()) == (1, 2, 0)


def test_perplexity_scores_every_token_once_and_agrees_across_backends(corpus, tmp_path):
    ids = np.arange(10, 30)
    windows = ppl_windows(ids, 8, bos=1)
    assert all(w[0] == 1 for w in windows) and np.array_equal(np.concatenate([w[1:] for w in windows]), ids)
    plain = ppl_windows(ids, 8, bos=None)
    assert np.array_equal(np.concatenate([plain[0]] + [w[1:] for w in plain[1:]]), ids)

    run = new_run(corpus, tmp_path / "run", steps=2, save_every=2)
    train(run, progress=False)
    text = (corpus / "valid.txt").read_text()[:3000]
    result = {}
    for backend in ("numpy", "torch"):
        r = CliRunner().invoke(main, ["eval", "-m", str(tmp_path / "run" / "latest"), "--data",
                                      str(corpus / "valid.txt"), "--backend", backend, "--max-tokens", "600",
                                      "--seq-len", "32", "--json"])
        assert r.exit_code == 0, r.output
        result[backend] = json.loads(r.output)
    assert result["numpy"]["tokens"] == result["torch"]["tokens"] == 600
    assert abs(result["numpy"]["nll"] - result["torch"]["nll"]) <= TRAIN_LOSS_RTOL * result["numpy"]["nll"]
    model = npllama.load(tmp_path / "run" / "latest", progress=False)
    direct = perplexity(model, text, seq_len=32)
    assert math.isclose(direct["perplexity"], math.exp(direct["nll"]))
    assert 1 < direct["perplexity"] < 400 * 2
