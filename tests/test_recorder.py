"""A NumPy port (docs/numpy_port.py) reports into npllama.oracle's Recorder, step by step through
its own KV cache, and the oracle names the step, layer and op of a planted decode bug, an eps bug
that only float64 can see, and weights in the other rotary permutation; a C port writes the same
dump with the writer of docs/porting.md, compiled with the system's cc."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from npllama.cli import main
from npllama.dump import read_dump
from npllama.errors import InputError
from npllama.oracle import Recorder, check_dump, record, reference_steps
from npllama.report import format_table
from test_verdict import ARGS, folder, model  # noqa: F401  (the verdict tests' tiny float64 model and its fixtures)

ROOT = Path(__file__).resolve().parent.parent
PROMPT = np.array([[3, 17, 42, 9, 5, 60, 1, 33, 8, 21, 4, 12]])


# ------------------------------------------------------------------------------ a NumPy port
@pytest.fixture(scope="module")
def numpy_port():
    """docs/numpy_port.py: a llama3.np-style port reporting into npllama.oracle's Recorder."""
    spec = importlib.util.spec_from_file_location("numpy_port", ROOT / "docs" / "numpy_port.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_port(numpy_port, model, path, dtype=np.float32, bugs=(), decode=8, last_only=False, **save):
    """The port's prefill and `decode` greedy steps, written as one dump."""
    port = numpy_port.Llama(model.state_dict(), model.config, dtype, bugs)
    rec = numpy_port.generate(port, PROMPT, decode, last_only)
    save.setdefault("rotary_layout", "interleaved")
    rec.save(path, dtype=np.dtype(dtype).name, producer="a NumPy port", **save)
    return read_dump(path)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_numpy_port_passes_the_prefill_and_8_decode_steps(numpy_port, model, folder, tmp_path, dtype):
    dump = run_port(numpy_port, model, tmp_path / "mine.safetensors", dtype)
    assert len(dump.steps) == 9 and dump.steps[3].input_ids.shape == (1, 1)
    report = check_dump(dump, model)
    assert report.exit_code == 0 and report.steps == 9 and report.bar.dtype == np.dtype(dtype).name, format_table(report)
    if dtype == np.float32:
        result = CliRunner().invoke(main, ["trace", "--against", str(tmp_path / "mine.safetensors"),
                                           "--model", str(folder)])
        assert result.exit_code == 0, result.output
        assert "covers the residual stream of every layer and the logits, at each of the 9 steps" in result.output


@pytest.mark.parametrize("bug, where", [("position", (1, 0, "attention.q")), ("mask", (1, 0, "attention.scores_v"))])
def test_a_decode_bug_is_named_at_its_step_layer_and_op(numpy_port, model, tmp_path, bug, where):
    report = check_dump(run_port(numpy_port, model, tmp_path / "bug.safetensors", bugs=[bug]), model)
    b = report.first_break
    assert (b.step, b.layer, b.op) == where, format_table(report)
    assert format_table(report).splitlines()[-1].startswith(f"first break: step 1 (decode step 1), layer 0 op {where[2]}")


def test_an_eps_bug_at_a_deep_layer_passes_in_float32_and_is_named_in_float64(numpy_port, model, tmp_path):
    report = check_dump(run_port(numpy_port, model, tmp_path / "f32.safetensors", np.float32, ["eps"], 2), model)
    assert report.exit_code == 0 and any("run the port in float64" in n for n in report.notes), format_table(report)
    report = check_dump(run_port(numpy_port, model, tmp_path / "f64.safetensors", np.float64, ["eps"], 2), model)
    b = report.first_break
    assert (b.step, b.layer, b.op) == (0, ARGS.n_layers - 1, "ffn_norm"), format_table(report)


@pytest.mark.parametrize("bug, op, words", [
    ("half-weights", "attention.q", "rotate-half rows of wq / wk (Hugging Face's, npllama's state_dict()) give in a "
                                    "port that rotates interleaved pairs"),
    ("k-heads", "attention.k", "wk's rows permuted with n_heads (4) instead of n_kv_heads (2)"),
])
def test_weights_in_the_other_permutation_are_named(numpy_port, model, tmp_path, bug, op, words):
    report = check_dump(run_port(numpy_port, model, tmp_path / "p.safetensors", bugs=[bug], decode=1), model)
    assert (report.first_break.layer, report.first_break.op) == (0, op), format_table(report)
    assert any(words in n for n in report.notes), report.notes


def test_a_wrongly_declared_rotary_layout_is_named(numpy_port, model, tmp_path):
    report = check_dump(run_port(numpy_port, model, tmp_path / "h.safetensors", decode=1, rotary_layout="half"), model)
    assert report.first_break.op == "attention.q"
    assert any("declare rotary_layout='interleaved'" in n for n in report.notes), report.notes


def test_a_port_that_keeps_the_last_logits_only(numpy_port, model, tmp_path):
    dump = run_port(numpy_port, model, tmp_path / "l.safetensors", decode=2, last_only=True, logits_positions="last")
    assert dump.tensors["logits"].shape == (1, 1, ARGS.vocab_size) and check_dump(dump, model).exit_code == 0
    with pytest.raises(InputError, match="--last-only"):
        check_dump(run_port(numpy_port, model, tmp_path / "l.safetensors", decode=2, last_only=True), model)


def test_the_recorder_keeps_copies_step_by_step_and_refuses_what_it_cannot_write(tmp_path):
    record("norm", np.ones(3))                     # no recorder open: nothing happens
    buf = np.zeros((1, 2, 4), np.float32)
    with Recorder() as outer:
        record("norm", buf)
        with Recorder() as inner:
            record("norm", buf)                    # the innermost one hears it
            buf += 1                               # a port reusing its buffer: the copies stand
            inner.step()
            inner.step()                           # a step with nothing in it is not started twice
            record("norm", buf)
            with pytest.raises(InputError, match="recorded twice in step 1: call rec.step"):
                record("norm", buf)
            with pytest.raises(InputError, match="float64, float32 or float16"):
                record("logits", np.ones(3, np.int32))
    assert len(inner.steps) == 2 and [s.tensors["norm"].max() for s in inner.steps] == [0, 1]
    assert len(outer.steps) == 1 and outer.steps[0].tensors["norm"].max() == 0
    with pytest.raises(InputError, match="step 0 has no input_ids"):
        inner.save(tmp_path / "x.safetensors")
    with pytest.raises(InputError, match="one per step"):
        inner.save(tmp_path / "x.safetensors", input_ids=[[1, 2]])
    inner.save(tmp_path / "x.safetensors", input_ids=[[1, 2], [3]])
    dump = read_dump(tmp_path / "x.safetensors")
    assert [s.input_ids.tolist() for s in dump.steps] == [[[1, 2]], [[3]]] and dump.metadata["dtype"] == "float32"
    with pytest.raises(InputError, match="nothing was recorded"):
        Recorder().save(tmp_path / "y.safetensors")


# ------------------------------------------------------------------------------ a C port
def c_writer() -> str:
    """The C writer of docs/porting.md: the first ```c block after its heading."""
    text = (ROOT / "docs" / "porting.md").read_text(encoding="utf-8")
    section = text.split("From a port that is not Python", 1)[1]
    return section.split("```c\n", 1)[1].split("```", 1)[0]


def c_array(name: str, ctype: str, values) -> str:
    """A C array initialised with values: exact float literals (repr of a float32 widened, with f)."""
    items = [str(int(v)) if ctype == "int64_t" else repr(float(v)) + "f" for v in values]
    return f"static const {ctype} {name}[] = {{{', '.join(items)}}};\n"


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_the_c_writer_of_porting_md_writes_a_dump_the_oracle_passes(model, folder, tmp_path):
    """A C port in llama2.c's way, one token per forward call: each token is a step of the dump,
    holding each layer's output (the residual stream) and the logits, float32 and bfloat16."""
    n_tokens = 4
    steps = reference_steps(model, [PROMPT[:, t:t + 1] for t in range(n_tokens)])
    names = [*(f"layers.{i}.ffn_residual" for i in range(ARGS.n_layers)), "logits"]
    data, tensors = "", []
    for s in range(n_tokens):
        prefix = "" if s == 0 else f"step.{s}."
        data += c_array(f"ids{s}", "int64_t", PROMPT[0, s:s + 1])
        tensors.append(f'{{"{prefix}input_ids", "I64", 2, {{1, 1}}, ids{s}, sizeof ids{s}}}')
        for j, name in enumerate(names):
            values = np.asarray(steps[s][name], np.float32).ravel()
            width = values.size
            if name == "layers.1.ffn_residual":      # one tensor as bfloat16, rounded by the writer's to_bf16
                data += c_array(f"f{s}_{j}", "float", values)
                data += f"static uint16_t b{s}_{j}[{width}];\n"
                tensors.append(f'{{"{prefix}{name}", "BF16", 3, {{1, 1, {width}}}, b{s}_{j}, sizeof b{s}_{j}}}')
            else:
                data += c_array(f"f{s}_{j}", "float", values)
                tensors.append(f'{{"{prefix}{name}", "F32", 3, {{1, 1, {width}}}, f{s}_{j}, sizeof f{s}_{j}}}')
    rounding = "".join(f"    for (int i = 0; i < {ARGS.dim}; i++) b{s}_1[i] = to_bf16(f{s}_1[i]);\n"
                       for s in range(n_tokens))
    main_c = (data + "int main(void) {\n" + rounding +
              f"    Tensor t[] = {{{', '.join(tensors)}}};\n"
              f'    return write_dump("c.safetensors", t, {len(tensors)}, '
              f'"{{\\"format\\":\\"npllama-trace\\",\\"schema_version\\":\\"2\\",\\"steps\\":\\"{n_tokens}\\",'
              f'\\"dtype\\":\\"float32\\",\\"producer\\":\\"a C port\\"}}");\n}}\n')
    (tmp_path / "port.c").write_text(c_writer() + main_c)
    subprocess.run(["cc", "-O1", "-Wall", "-Werror", "-o", "port", "port.c"], cwd=tmp_path, check=True)
    subprocess.run(["./port"], cwd=tmp_path, check=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors", "port", "port.c"]   # no temporary left

    dump = read_dump(tmp_path / "c.safetensors")
    assert len(dump.steps) == n_tokens and dump.steps[2].dtypes["layers.1.ffn_residual"] == "bfloat16"
    result = CliRunner().invoke(main, ["trace", "--against", str(tmp_path / "c.safetensors"), "--model", str(folder)])
    assert result.exit_code == 0, result.output
    assert f"at each of the {n_tokens} steps" in result.output.splitlines()[-1]
