"""The verdict of `npllama trace/parity --against`: what it covers, where its bar comes from, its
exit status (0 pass, 1 break, 2 bad input, 3 not enough compared), its JSON, decode steps, ranks,
and a --reference dump checked as any input is. Tiny NumPy models, no torch."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors.numpy import save_file

import npllama.model
from npllama.cli import main
from npllama.config import ModelArgs
from npllama.dump import IDS, PARTIAL_SUM, REPLICATED, Dump, Step, dump_metadata, read_dump, shard, write_steps
from npllama.errors import InputError
from npllama.formats import load
from npllama.formats.hf import save_checkpoint
from npllama.layout import FLASH_MIN_LEN
from npllama.mlp import feed_forward, linear
from npllama.model import Transformer, merge_heads
from npllama.oracle import check_dump, judge_bar, round_to, trace_steps
from npllama.params import init_params
from npllama.report import EXIT_NOT_COVERED, format_table

ARGS = ModelArgs(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=48, max_seq_len=64)
IDS_ = np.array([[3, 17, 42, 9, 5, 60, 1, 33, 8, 21]])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("verdict") / "tiny"
    save_checkpoint(path, ARGS, init_params(ARGS, seed=7, std=0.3))
    return path


@pytest.fixture(scope="module")
def model(folder):
    return load(folder, progress=False, dtype=np.float64)


@pytest.fixture(scope="module")
def ref_steps(model):
    """The float64 reference: the prefill of 10 ids and 3 greedy decode steps."""
    return trace_steps(model, IDS_, decode=3)


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def write(path, steps, dtype="float32", keep=lambda s, name: True, change=None, **meta) -> Dump:
    """A port's dump from the reference's steps: rounded to float32 (a float32 port, near enough),
    the names keep() keeps, change(s, name, x) -> x applied (a planted bug)."""
    out = []
    for s, (acts, ids) in enumerate(steps):
        kept = {}
        for name, x in acts.items():
            if keep(s, name):
                x = change(s, name, x) if change else x
                kept[name] = np.asarray(x, dtype=np.float32)
        out.append((kept, ids))
    write_steps(path, out, dump_metadata(dtype, "test port", steps=len(out), **meta))
    return read_dump(path)


def verdict_line(result) -> str:
    return result.output.strip().splitlines()[-1]


# ------------------------------------------------------------------------------ coverage and exit codes
def test_exit_0_only_when_the_residual_stream_and_the_logits_of_every_step_are_compared(model, ref_steps, tmp_path):
    whole = write(tmp_path / "whole.safetensors", ref_steps)
    report = check_dump(whole, model)
    assert report.exit_code == 0, format_table(report)
    line = format_table(report).splitlines()[-1]
    assert "covers the residual stream of every layer and the logits, at each of the 4 steps" in line
    assert "bar: float32 end to end, 1e-04, from the dtype the dump declares" in line

    residual = write(tmp_path / "r.safetensors", ref_steps,
                     keep=lambda s, n: n == "logits" or n.endswith("ffn_residual"))
    assert check_dump(residual, model).exit_code == 0

    for keep in (lambda s, n: n == "tok_embeddings",                     # the embedding only
                 lambda s, n: n in ("norm", "logits"),                   # no layer
                 lambda s, n: not (s == 2 and n == "logits"),            # one step's logits missing
                 lambda s, n: s == 0):                                   # the prefill only, of 4 steps
        report = check_dump(write(tmp_path / "part.safetensors", ref_steps, keep=keep), model)
        assert report.ok and report.exit_code == EXIT_NOT_COVERED, format_table(report)
        assert format_table(report).splitlines()[-1].startswith("not enough compared:")

    # a break beats missing names: exit 1
    broken = write(tmp_path / "b.safetensors", ref_steps, keep=lambda s, n: n == "tok_embeddings",
                   change=lambda s, n, x: x * 1.01)
    assert check_dump(broken, model).exit_code == 1


def test_only_judges_what_it_names_and_says_so(model, ref_steps, tmp_path):
    dump = write(tmp_path / "l.safetensors", ref_steps, keep=lambda s, n: n in ("norm", "logits"))
    report = check_dump(dump, model, only="logits")
    assert report.exit_code == 0 and {r.name for r in report.rows} == {"logits"}
    assert "covers only what --only names (--only logits)" in format_table(report).splitlines()[-1]
    # what --only names must be there, at every step
    report = check_dump(dump, model, only="logits,layers.0-1.ffn_residual")
    assert report.exit_code == EXIT_NOT_COVERED and len(report.coverage.missing) == 2 * 4
    for bad, words in (("layers.7", "layers 0-2"), ("layers.0.nope", "no op of a layer"), ("q", "name an op"),
                       ("", "empty")):
        with pytest.raises(InputError, match=words):
            check_dump(dump, model, only=bad)


def test_the_cli_exit_status_and_json(ref_steps, tmp_path):
    ref = tmp_path / "ref.safetensors"
    write_steps(ref, ref_steps, dump_metadata("float64", "npllama", steps=4, rotary_dim=ARGS.head_dim))
    write(tmp_path / "mine.safetensors", ref_steps)
    write(tmp_path / "part.safetensors", ref_steps, keep=lambda s, n: n == "norm")
    write(tmp_path / "bug.safetensors", ref_steps, change=lambda s, n, x: x * 1.001 if s == 2 and "1.ffn_norm" in n else x)
    for name, code in (("mine", 0), ("part", EXIT_NOT_COVERED), ("bug", 1)):
        result = cli("trace", "--against", tmp_path / f"{name}.safetensors", "--reference", ref)
        assert result.exit_code == code, result.output
        result = cli("trace", "--against", tmp_path / f"{name}.safetensors", "--reference", ref, "--json")
        assert result.exit_code == code, result.output
        data = json.loads(result.output)
        assert data["exit_code"] == code and data["verdict"] == {0: "pass", 1: "break", 3: "not enough compared"}[code]
        assert data["bar"]["dtype"] == "float32" and data["steps"] == 4 and data["rows"]
    assert data["first_break"]["step"] == 2 and data["first_break"]["name"] == "layers.1.ffn_norm"
    assert verdict_line(cli("trace", "--against", tmp_path / "bug.safetensors", "--reference", ref)).startswith(
        "first break: step 2 (decode step 2), layer 1 op ffn_norm")
    result = cli("trace", "--against", tmp_path / "mine.safetensors", "--reference", ref, "--only", "nonsense")
    assert result.exit_code == 2 and "--only 'nonsense'" in result.output


# ------------------------------------------------------------------------------ the bar
def test_a_declared_dtype_cannot_loosen_the_bar(model, ref_steps, tmp_path):
    # 5% wrong everywhere, stored as float32, declaring bfloat16: held to float32's bar
    wrong = write(tmp_path / "w.safetensors", ref_steps, dtype="bfloat16", change=lambda s, n, x: x * 1.05)
    report = check_dump(wrong, model)
    assert report.exit_code == 1 and report.bar.dtype == "float32" and "not believed" in report.bar.source

    # a bfloat16 run stored as float32 (its .float()): every value a bfloat16 number, so bfloat16's bars
    bf16 = write(tmp_path / "bf.safetensors", ref_steps, dtype="bfloat16",
                 change=lambda s, n, x: round_to(x, "bfloat16"))
    report = check_dump(bf16, model)
    assert report.exit_code == 0 and report.bar.dtype == "bfloat16" and report.bar.rtol == 0.3, format_table(report)
    assert any("--isolate" in n for n in report.notes)      # bfloat16's end-to-end bar is no gate

    # one tensor whose values are no bfloat16 numbers: held to float32's bar, and the note says why
    mixed = write(tmp_path / "m.safetensors", ref_steps, dtype="bfloat16",
                  change=lambda s, n, x: x if n == "logits" else round_to(x, "bfloat16"))
    report = check_dump(mixed, model)
    logits = [r for r in report.rows if r.name == "logits"]
    assert {r.rtol for r in logits} == {1e-4} and any("--dtype bfloat16" in n for n in report.notes)
    # ... unless the person running the check says it was bfloat16
    report = check_dump(mixed, model, dtype="bfloat16")
    assert {r.rtol for r in report.rows} == {0.3} and report.bar.source == "from --dtype"

    # declared finer than stored (a float64 run stored as float32): float32's bar, float64's weights
    finer = write(tmp_path / "f.safetensors", ref_steps, dtype="float64")
    judged = judge_bar(finer)
    assert (judged.dtype, judged.weights) == ("float32", "float64") and "declares float64" in judged.source
    assert check_dump(finer, model).exit_code == 0


dtypes = st.sampled_from(["float64", "float32", "float16", "bfloat16"])


@settings(max_examples=40, deadline=None)
@given(stored=dtypes, declared=st.one_of(st.none(), dtypes), rounded=st.booleans(), override=st.one_of(st.none(), dtypes),
       seed=st.integers(0, 2**16))
def test_no_tensor_is_held_to_a_bar_looser_than_its_values_bear_out(stored, declared, rounded, override, seed):
    """A tensor's bar is never finer than its storage; it is coarser than its storage only when
    the person running the check says so (--dtype) or when its values are all numbers of the
    declared dtype."""
    from npllama.oracle import coarseness, representable

    x = np.random.default_rng(seed).standard_normal((1, 3, 8)) * 3
    if rounded and declared is not None:
        x = round_to(x, declared)
    x = round_to(x, stored)                                 # what the file can hold
    meta = {} if declared is None else {"dtype": declared}
    dump = Dump("d", [Step({"norm": x}, {"norm": stored}, np.array([[1, 2, 3]]))], meta)
    bar = judge_bar(dump, override).tensor[(0, "norm")]
    assert coarseness(bar) >= coarseness(stored)
    if coarseness(bar) > coarseness(stored) and override is None:
        assert bar == declared and representable(x, declared)
    if override is not None:
        assert coarseness(bar) >= coarseness(override)


def test_a_float32_pass_says_what_it_cannot_see(model, ref_steps, tmp_path):
    report = check_dump(write(tmp_path / "f.safetensors", ref_steps), model)
    assert any("cannot exclude a bug that moves an op by less than 1e-04" in n and "float64" in n
               for n in report.notes)
    exact = tmp_path / "f64.safetensors"
    write_steps(exact, ref_steps, dump_metadata("float64", "test", steps=4))
    report = check_dump(read_dump(exact), model)
    assert report.exit_code == 0 and report.bar.rtol == 1e-10 and not any("cannot exclude" in n for n in report.notes)


# ------------------------------------------------------------------------------ steps, last-only, the window
def test_a_decode_bug_is_named_at_its_step_layer_and_op(model, ref_steps, tmp_path):
    dump = write(tmp_path / "d.safetensors", ref_steps,
                 change=lambda s, n, x: x + 1e-2 * (np.abs(x).max()) if (s, n) == (3, "layers.2.attention.k") else x)
    for isolate in (False, True):
        report = check_dump(dump, model, isolate=isolate)
        b = report.first_break
        assert (b.step, b.layer, b.op) == (3, 2, "attention.k"), format_table(report)
    assert "step" in format_table(report).splitlines()[1]       # the table has a step column


def test_last_only(model, ref_steps, tmp_path):
    last = lambda s, n, x: x[:, -1:] if n in ("logits", "norm") else x   # noqa: E731
    dump = write(tmp_path / "l.safetensors", ref_steps, change=last)
    with pytest.raises(InputError, match="--last-only"):
        check_dump(dump, model)
    report = check_dump(dump, model, last_only=True)
    assert report.exit_code == 0 and "the last position's" in report.coverage.what
    declared = write(tmp_path / "d.safetensors", ref_steps, change=last, logits_positions="last")
    assert check_dump(declared, model).exit_code == 0
    wrong = write(tmp_path / "w.safetensors", ref_steps,
                  change=lambda s, n, x: x[:, -2:-1] if n == "logits" and s == 0 else last(s, n, x))
    assert check_dump(wrong, model, last_only=True).first_break.name == "logits"


def test_trace_decode_writes_the_steps_and_a_dump_checked_against_itself_is_exact(folder, model, tmp_path):
    ref = tmp_path / "ref.safetensors"
    result = cli("trace", "--model", folder, "--ids", "3,17,42,9,5", "--decode", "3", "--out", ref)
    assert result.exit_code == 0 and "then 3 decode steps" in result.output, result.output
    dump = read_dump(ref)
    assert dump.metadata["steps"] == "4" and [s.input_ids.shape for s in dump.steps] == [(1, 5), (1, 1), (1, 1), (1, 1)]
    for s in range(3):       # greedy: each step feeds the previous step's most likely token
        assert dump.steps[s + 1].input_ids[0, 0] == np.argmax(dump.steps[s].tensors["logits"][0, -1])
    for args in (["--model", folder], ["--reference", ref]):
        result = cli("trace", "--against", ref, *args, "--json")
        data = json.loads(result.output)
        assert result.exit_code == 0 and data["closest"]["max_abs"] == 0.0 and data["steps"] == 4
    # a shape from another model suggests --model when none was named
    with pytest.raises(InputError, match="no --model was given"):
        check_dump(write(tmp_path / "m.safetensors", [({"norm": np.ones((1, 5, 7))}, np.array([[1, 2, 3, 4, 5]]))]),
                   model, default_model=True)
    for flag in ("--only", "--last-only", "--json"):
        value = ["logits"] if flag == "--only" else []
        result = cli("trace", "--model", folder, "--ids", "1,2", "--out", ref, flag, *value)
        assert result.exit_code == 2 and f"{flag} goes with --against" in result.output


def test_ids_beyond_the_window_are_refused_in_one_line(model, folder, tmp_path):
    path = tmp_path / "long.safetensors"
    save_file({IDS: np.zeros((1, 30000), np.int64), "logits": np.zeros((1, 1, 64), np.float32)}, str(path))
    with pytest.raises(InputError) as e:
        check_dump(read_dump(path), model)
    assert str(e.value).startswith(f"{path}: its input_ids hold 30000 positions, beyond the model's context "
                                   f"window of 64") and "\n" not in str(e.value)
    # over the steps: a prefill of 60 and 5 decode steps
    steps = [({}, np.zeros((1, 60), np.int64)), *(({}, np.zeros((1, 1), np.int64)) for _ in range(5))]
    write_steps(path, steps, dump_metadata("float32", "t", steps=6))
    with pytest.raises(InputError, match="65 positions"):
        check_dump(read_dump(path), model)
    result = cli("trace", "--model", folder, "--ids", ",".join(["1"] * 60), "--decode", "5", "--out", path)
    assert result.exit_code == 2 and "--ids and --decode 5 hold 65 positions" in result.output


def test_a_dump_of_more_rows_than_memory_holds_is_refused_before_the_reference_runs(model, tmp_path, monkeypatch):
    """The window bounds a dump's positions; its rows are bounded by the memory check."""
    from npllama import memory
    path = tmp_path / "wide.safetensors"
    save_file({IDS: np.ones((200_000, 8), np.int64)}, str(path))            # ids alone: the size is the point
    monkeypatch.setattr(memory, "available_bytes", lambda: 2 << 30)
    with pytest.raises(InputError) as e:
        check_dump(read_dump(path), model)
    message = str(e.value)
    assert message.startswith(f"{path}: recomputing the reference for 200000 rows x 8 positions in float64 needs about")
    assert "\n" not in message and message.endswith("dump fewer rows")


def test_the_reference_runs_long_sequences_blockwise(monkeypatch):
    args = ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=32, hidden_dim=16, max_seq_len=512)
    model = Transformer(args, init_params(args, seed=1, std=0.3), dtype=np.float64)
    seen = []
    naive = npllama.model.naive_attention
    monkeypatch.setattr(npllama.model, "naive_attention",
                        lambda q, k, v, **kw: seen.append(k.shape[2]) or naive(q, k, v, **kw))
    trace_steps(model, np.arange(FLASH_MIN_LEN + 40)[None] % 32, decode=2)
    assert seen == [FLASH_MIN_LEN + 41, FLASH_MIN_LEN + 42]     # only the one-query decode steps ran naive


# ------------------------------------------------------------------------------ a --reference dump is input
def reference_with(tmp_path, ref_steps, change=None, meta=None, extra=None):
    tensors = {IDS: ref_steps[0][1], **ref_steps[0][0]}
    if change:
        tensors = change(tensors)
    tensors.update(extra or {})
    path = tmp_path / "ref.safetensors"
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata=meta or {})
    return path


@pytest.mark.parametrize("case, words", [
    (dict(extra={"layers.400000000.ffn_norm": np.ones((1, 10, 32))}), "layer indices are not 0..3"),
    (dict(extra={"layers.400000000.norm": np.ones((1, 10, 32))}), "no trace name"),
    (dict(extra={"layers.².ffn_norm": np.ones((1, 10, 32))}), "no trace name"),
    (dict(extra={"mine": np.ones((2, 2))}), "no trace name"),
    (dict(change=lambda t: {IDS: t[IDS], "mine": np.ones(3)}), "no trace name"),
    (dict(change=lambda t: {k: v for k, v in t.items() if k != "layers.1.attention.v"}), "lacks layers.1.attention.v"),
    (dict(change=lambda t: {k: (v * 0 if k != IDS else v) for k, v in t.items()}), "all zeros"),
    (dict(change=lambda t: {**t, "norm": t["norm"] * np.nan}), "not finite"),
    (dict(change=lambda t: {**t, "layers.0.ffn_norm": t["layers.0.ffn_norm"][:, :, :16]}), "dim is 32"),
    (dict(meta={"rotary_dim": "7"}), "rotary_dim is '7'"),
    (dict(meta={"rotary_dim": "99999999999"}), "rotary_dim"),
    (dict(meta={"rotary_dim": "²"}), "rotary_dim"),
    (dict(meta={"dtype": "float8"}), "metadata dtype"),
])
def test_a_bad_reference_is_one_line(ref_steps, tmp_path, case, words, no_hang):
    ref = reference_with(tmp_path, ref_steps, **case)
    mine = tmp_path / "mine.safetensors"
    write(mine, ref_steps[:1])
    result = cli("trace", "--against", mine, "--reference", ref)
    assert result.exit_code == 2, result.output
    assert words in result.output and len(result.output.strip().splitlines()) == 1, result.output


def test_a_shared_extra_name_with_two_shapes_is_ignored_in_the_port_and_refused_in_the_reference(ref_steps, tmp_path):
    ref = reference_with(tmp_path, ref_steps, extra={"extra": np.ones((2, 3))})
    mine = tmp_path / "mine.safetensors"
    write_steps(mine, [({**ref_steps[0][0], "extra": np.ones(5), "layers.².x": np.ones(1)}, ref_steps[0][1])],
                dump_metadata("float64", "t"))
    result = cli("trace", "--against", mine, "--reference", ref)
    assert result.exit_code == 2 and "'extra', which is no trace name" in result.output
    good = reference_with(tmp_path, ref_steps)
    report = check_dump(read_dump(mine), reference=read_dump(good))
    assert report.exit_code == 0 and any("ignored" in n and "extra" in n and "layers.².x" in n for n in report.notes)


names = st.one_of(st.text(min_size=1, max_size=12),
                  st.builds(lambda i, op: f"layers.{i}.{op}",
                            st.one_of(st.integers(0, 10**12).map(str),
                                      st.text("0123456789²³١٣", min_size=1, max_size=12)),
                            st.sampled_from(["ffn_norm", "norm", "attention.q", "x", ""])))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=names)
def test_any_extra_name_in_either_dump_is_one_line_or_ignored(ref_steps, tmp_path, name):
    if name == IDS or name.startswith("step.") or name.startswith("__"):
        return
    acts, ids = ref_steps[0]
    extra = np.ones((1, 10, 32), np.float64)
    path = tmp_path / "x.safetensors"
    save_file({IDS: ids, **acts, name: extra}, str(path))
    clean = tmp_path / "clean.safetensors"
    save_file({IDS: ids, **acts}, str(clean))
    # in the port's dump: ignored, or compared (a real name of shape (1, 10, 32)), or one line about its shape
    try:
        report = check_dump(read_dump(path), reference=read_dump(clean))
        assert report.rows
    except InputError as e:
        assert "\n" not in str(e) and "has shape" in str(e)
    # in the reference: one line, unless it is one of its own names
    try:
        check_dump(read_dump(clean), reference=read_dump(path))
        assert name in acts
    except InputError as e:
        assert "\n" not in str(e)


# ------------------------------------------------------------------------------ ranks
def rank_dumps(model, ref_steps, world, tmp_path, bug=None) -> str:
    """Cut the reference as a tensor-parallel port writes it: q, k, v, scores_v sharded by heads,
    wo's and w2's outputs as each rank's partial sum (its heads / hidden units and its slice of the
    weight), everything else replicated; bug = (rank, name, delta) planted in one rank's piece."""
    splits = {"attention.q": "shard(1)", "attention.k": "shard(1)", "attention.v": "shard(1)",
              "attention.scores_v": "shard(1)", "attention": "partial-sum", "feed_forward": "partial-sum"}
    per_rank = [[] for _ in range(world)]
    for acts, ids in ref_steps:
        pieces = [{} for _ in range(world)]
        for name, x in acts.items():
            layer, op = (name.split(".", 2)[1:] if name.startswith("layers.") else (None, name))
            if op in ("attention.q", "attention.k", "attention.v", "attention.scores_v"):
                parts = np.split(x, world, axis=1)
            elif op == "attention":
                L = model.layers[int(layer)]
                sv = acts[f"layers.{layer}.attention.scores_v"]
                hd = sv.shape[-1]
                h = sv.shape[1] // world
                parts = [linear(merge_heads(sv[:, r * h:(r + 1) * h]), L.wo[:, r * h * hd:(r + 1) * h * hd])
                         for r in range(world)]
            elif op == "feed_forward":
                L = model.layers[int(layer)]
                y = acts[f"layers.{layer}.ffn_norm"]
                k = L.w1.shape[0] // world
                parts = [feed_forward(y, L.w1[r * k:(r + 1) * k], L.w2[:, r * k:(r + 1) * k], L.w3[r * k:(r + 1) * k])
                         for r in range(world)]
            else:
                parts = [x] * world
            for r in range(world):
                pieces[r][name] = parts[r].copy()
        if bug is not None:
            r, name, delta = bug
            if name in pieces[r]:
                pieces[r][name] = pieces[r][name] + delta * np.abs(pieces[r][name]).max()
        for r in range(world):
            per_rank[r].append((pieces[r], ids))
    for r in range(world):
        write_steps(tmp_path / f"d.rank{r}.safetensors", per_rank[r],
                    dump_metadata("float64", "tp port", steps=len(ref_steps), rank=r, world_size=world, splits=splits))
    return str(tmp_path / "d.rank*.safetensors")


@pytest.mark.parametrize("name", ["layers.1.attention.q", "layers.0.attention", "layers.2.feed_forward",
                                  "layers.1.ffn_norm"])
def test_a_bug_in_one_ranks_piece_names_the_rank(model, folder, ref_steps, tmp_path, name):
    from npllama.dump import read_dumps

    pattern = rank_dumps(model, ref_steps[:2], 2, tmp_path)
    clean = read_dumps(pattern)
    assert clean.piece_splits["layers.0.attention"] == PARTIAL_SUM and clean.piece_splits["norm"] == REPLICATED
    assert clean.piece_splits["layers.0.attention.q"] == shard(1)
    report = check_dump(clean, model)
    assert report.exit_code == 0 and report.bar.dtype == "float64", format_table(report)

    pattern = rank_dumps(model, ref_steps[:2], 2, tmp_path, bug=(1, name, 1e-6))
    report = check_dump(read_dumps(pattern), model)
    assert report.first_break.name == name and report.break_ranks == [1], format_table(report)
    assert ", in rank 1's piece" in format_table(report).splitlines()[-1]

    result = cli("trace", "--against", pattern, "--model", folder)       # a quoted glob on the command line
    assert result.exit_code == 1 and verdict_line(result).startswith("first break: step 0 (prefill), "), result.output
    assert "rank 1's piece" in verdict_line(result)


def test_rank_dumps_need_every_rank(model, ref_steps, tmp_path):
    rank_dumps(model, ref_steps[:1], 2, tmp_path)
    result = cli("trace", "--against", tmp_path / "d.rank1.safetensors", "--reference", tmp_path / "d.rank0.safetensors")
    assert result.exit_code == 2 and "--against 'd.rank*.safetensors'" in result.output
    result = cli("trace", "--against", tmp_path / "nothing*.safetensors", "--reference", tmp_path / "d.rank0.safetensors")
    assert result.exit_code == 2 and "matches no file" in result.output
