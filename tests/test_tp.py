"""Tensor parallelism (parity.tp): the model split over the ranks of a gloo process group on the
CPU computes the single-process model's function, through prefill and decode (the fast path's
too, fused per rank after the split); a bug in one rank's
part is named with its rank, in the split Torch model and in anyone's per-rank dumps.

One process group per test session: the ``ranks`` fixture starts 3 worker processes once and
sends them work (parity.tp.LocalRanks); the tests of 2 ranks run on ranks 0 and 1 through their
own group (tp.first_ranks(2)), made with the session's. The workers are forked from the test
process (0.1 s, against 13 s for 3 fresh interpreters importing torch on 2 busy cores), so under
pytest-xdist each xdist worker that runs a test here can afford its own 3. Every call to the ranks
is bounded (RANK_TIMEOUT): a rank that hangs fails its test instead of the run.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings, strategies as st

import npllama
import parity
from npllama.config import ModelArgs
from npllama.dump import dump_metadata, gather_ranks, read_dump, write_steps
from npllama.errors import InputError
from npllama.model import Transformer as NumpyTransformer
from npllama.oracle import check_dump, reference_model, trace
from npllama.tolerances import TENSOR_PARALLEL_RTOL, parity_rtol
from parity import tp
from parity.fast import FastDecoder
from parity.generate import generate as torch_generate
from parity.model import Transformer
from test_parity_model import random_params

REPO = Path(__file__).resolve().parent.parent
RANK_TIMEOUT = 240.0          # seconds any one call to the ranks may take (the default model's load included)
RTOL = TENSOR_PARALLEL_RTOL[np.dtype(np.float32)]
SMOLLM2 = ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152, hidden_dim=1536, head_dim=64)


@pytest.fixture(scope="session")
def ranks():
    with tp.LocalRanks(3, timeout=RANK_TIMEOUT, start_method="fork") as workers:
        yield workers


# ------------------------------------------------------------------------------ the split, without a group
def test_a_head_count_that_does_not_divide_is_one_line_naming_the_sizes_that_do():
    with pytest.raises(InputError) as e:
        tp.check_tp(SMOLLM2, 2)
    message = str(e.value)
    assert "\n" not in message and "tp=2" in message and "3 key/value heads" in message
    assert message.endswith("tp=1 or tp=3 would")
    tp.check_tp(SMOLLM2, 3)
    assert tp.sizes_that_work(SMOLLM2) == [1, 3]
    with pytest.raises(InputError, match="SwiGLU width 60 does not divide by 8"):
        tp.check_tp(ModelArgs(dim=64, n_layers=1, n_heads=8, n_kv_heads=8, vocab_size=10, hidden_dim=60), 8)


def test_each_rank_holds_whole_heads_and_the_slices_make_the_whole():
    args = ModelArgs(dim=24, n_layers=1, n_heads=6, n_kv_heads=3, vocab_size=20, hidden_dim=18, head_dim=4,
                     attention_bias=True, attention_out_bias=True, mlp_bias=True)
    params = random_params(args, 0)
    parts = [tp.shard_params(params, r, 3) for r in range(3)]
    local = tp.rank_config(args, 3)
    assert (local.n_heads, local.n_kv_heads, local.hidden_dim, local.head_dim) == (2, 1, 6, 4)
    for name, whole in params.items():
        split = tp.param_split(name)
        pieces = [p[name] for p in parts]
        if split.kind == "shard":
            np.testing.assert_array_equal(np.concatenate(pieces, axis=split.axis), whole)
        else:
            assert all(p is whole for p in pieces)
    assert tp.param_split("layers.0.attention.wk.weight").axis == 0      # rows: kv head 0 | 1 | 2
    assert tp.param_split("layers.0.feed_forward.w2.weight").axis == 1   # columns of the hidden slice
    assert tp.param_split("layers.0.attention.wo.bias").kind == "replicated"  # added once, after the sum


def test_outside_a_process_group_tp_is_one_line_about_how_to_start_one():
    with pytest.raises(InputError, match="torchrun --nproc-per-node N"):
        parity.load("no-such-model", tp=2)


def test_forked_ranks_refuse_a_process_that_already_has_a_group():
    """Forked ranks would inherit the parent's group and fail deep in init_process_group."""
    import torch.distributed as dist
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError, match="already has a process group.*destroy_process_group"):
            tp.LocalRanks(2, start_method="fork")
    finally:
        dist.destroy_process_group()


def test_a_rank_slices_a_model_left_mapped_in_its_file(monkeypatch):
    """A GGUF file (or Meta's .pth, a .bin) large enough to stay mapped: each matrix is cut into the
    rank's slice a block of rows at a time. The slices are those of the model read into memory,
    bit for bit: the same blocks dequantized by the same code, element by element, no sums."""
    from npllama.formats import mapped as mapped_module
    from npllama.quant.matrix import QuantizedMatrix
    from npllama.weights import default_model_path
    path = default_model_path()
    _, whole, _, _ = tp.load_slices(path, 1, 3, progress=False)
    monkeypatch.setattr(mapped_module, "MAPPED_ABOVE", 0)                    # every model counts as large
    assert isinstance(npllama.load(path, progress=False).layers[0].wo, QuantizedMatrix)
    monkeypatch.setattr(tp, "WEIGHTS_PER_PIECE", 576 * 100)                   # blocks of 100 rows: several per matrix
    _, sliced, _, _ = tp.load_slices(path, 1, 3, progress=False)
    assert sliced.keys() == whole.keys()
    for name in ("layers.0.attention.wq.weight", "layers.0.attention.wo.weight", "layers.29.feed_forward.w2.weight",
                 "tok_embeddings.weight"):
        assert sliced[name].shape == whole[name].shape and np.array_equal(sliced[name], whole[name]), name


def test_a_hugging_face_rank_reads_its_slices(tmp_path):
    """safetensors' get_slice: rank r's tensors are rows / columns r of the whole, in any stored dtype."""
    from npllama.formats.hf import save_checkpoint
    args = ModelArgs(dim=16, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=30, hidden_dim=24, head_dim=4,
                     mlp_bias=True)
    params = {k: v.astype(np.float32) for k, v in random_params(args, 1).items()}
    save_checkpoint(tmp_path, args, params)
    whole = npllama.load(tmp_path, progress=False).state_dict()
    for rank in range(2):
        got_args, got, _, _ = tp.load_slices(tmp_path, rank, 2, progress=False)
        assert (got_args.n_heads, got_args.n_kv_heads, got_args.hidden_dim) == (4, 2, 24)
        want = tp.shard_params(whole, rank, 2)
        assert set(got) == set(want)
        for name in want:
            np.testing.assert_array_equal(got[name].numpy(), want[name], err_msg=name)


# ------------------------------------------------------------------------------ what the ranks run
def run_steps(model, prompt, tokens) -> list[np.ndarray]:
    """Logits of a prefill of prompt (seq,) and of each token fed after it (teacher forcing), with
    the model's KV cache: [(seq, vocab), (1, vocab), ...]."""
    cache = model.new_cache(1, len(prompt) + len(tokens) + 1)
    with torch.no_grad():
        out = [model(np.asarray(prompt)[None], cache=cache)[0]]
        out += [model(np.array([[t]]), cache=cache)[0] for t in tokens]
    return [o.numpy() for o in out]


def greedy_steps(model, prompt, n: int) -> tuple[list[int], list[np.ndarray]]:
    """The model's own n greedy tokens and the logits of every step, as run_steps gives them."""
    cache = model.new_cache(1, len(prompt) + n + 1)
    tokens: list[int] = []
    with torch.no_grad():
        logits = [model(np.asarray(prompt)[None], cache=cache)[0].numpy()]
        for _ in range(n):
            tokens.append(int(np.argmax(logits[-1][-1])))
            logits.append(model(np.array([[tokens[-1]]]), cache=cache)[0].numpy())
    return tokens, logits


def split_model(args, params, k: int, plant=None):
    """On a rank of the first k: its part of the model, with the planted bug if any."""
    group = tp.first_ranks(k)
    rank, n = tp.group_rank(group)
    model = tp.build(args, tp.shard_params(params, rank, n), rank=rank, world_size=n, group=group)
    if plant is not None:
        plant(model, args, params)
    return model


def split_steps(args, params, prompt, tokens, batch, mask, k, n_generate):
    """Rank side of the equality test: teacher-forced logits, a padded batch, its own greedy tokens."""
    model = split_model(args, params, k)
    with torch.no_grad():
        batch_logits = model(batch, attention_mask=mask).numpy()
    own = list(torch_generate(model, prompt, n_generate, stop_ids=()))
    return run_steps(model, prompt, tokens), batch_logits, own


def assert_same_function(single, split, tokens):
    """Logits within the tolerance at every step; the same greedy token wherever the single
    process's top-2 margin is wider than the logits may move (near ties are fed, not compared)."""
    for step, (a, b) in enumerate(zip(single, split)):
        scale = np.abs(a).max()
        assert np.abs(a - b).max() <= RTOL * scale, f"step {step}: rel {np.abs(a - b).max() / scale:.2e}"
        top2 = np.sort(a[-1])[-2:]
        if step < len(tokens) and top2[1] - top2[0] > 2 * RTOL * scale:
            assert int(np.argmax(b[-1])) == tokens[step], f"step {step}"


def first_near_tie(logits, tokens) -> int:
    """How many greedy tokens lie before the first step whose top-2 margin is within the tolerance."""
    for step, a in enumerate(logits[: len(tokens)]):
        top2 = np.sort(a[-1])[-2:]
        if top2[1] - top2[0] <= 2 * RTOL * np.abs(a).max():
            return step
    return len(tokens)


# ------------------------------------------------------------------------------ 2 ranks, tiny models
@st.composite
def split_configs(draw) -> ModelArgs:
    """Head counts that divide by 2: kv heads 2 or 4, 1-3 query heads each; hidden width even."""
    n_kv = draw(st.sampled_from([2, 4]))
    return ModelArgs(dim=draw(st.sampled_from([16, 32])), n_layers=draw(st.integers(1, 2)),
                     n_heads=n_kv * draw(st.integers(1, 3)), n_kv_heads=n_kv,
                     vocab_size=draw(st.integers(16, 64)), hidden_dim=2 * draw(st.integers(4, 24)),
                     head_dim=draw(st.sampled_from([4, 8])), max_seq_len=64,
                     tie_word_embeddings=draw(st.booleans()), attention_bias=draw(st.booleans()),
                     attention_out_bias=draw(st.booleans()), mlp_bias=draw(st.booleans()))


@settings(max_examples=10, deadline=None)
@given(split_configs(), st.integers(0, 2**16), st.integers(1, 9), st.integers(1, 6))
def test_two_ranks_compute_the_single_process_function(ranks, args, seed, prompt_len, n_new):
    params = {k: v.astype(np.float32) for k, v in random_params(args, seed).items()}
    single = Transformer(args, params)
    rng = np.random.default_rng(seed)
    prompt = rng.integers(0, args.vocab_size, prompt_len)
    tokens, logits = greedy_steps(single, prompt, n_new)
    batch = rng.integers(0, args.vocab_size, (2, prompt_len + 2))
    mask = np.ones(batch.shape, dtype=bool)
    mask[1, :2] = False                                             # row 1 left padded
    with torch.no_grad():
        batch_logits = single(batch, attention_mask=mask).numpy()
    (split, split_batch, own), _ = ranks.run(split_steps, args, params, prompt, tokens, batch, mask, 2, n_new,
                                             ranks=2)
    assert_same_function(logits, split, tokens)
    assert np.abs(split_batch - batch_logits)[mask].max() <= RTOL * np.abs(batch_logits).max()
    agree = first_near_tie(logits, tokens)
    assert own[:agree] == tokens[:agree]


def split_fast(args, params, prompts, n_generate):
    model = split_model(args, params, 2)
    fast = FastDecoder(tp.fast_weights(model), len(prompts), max(map(len, prompts)) + n_generate + 1)
    return fast.generate(prompts, n_generate, stop_ids=())


def test_the_fast_path_fused_per_rank_after_the_split_generates_the_same_tokens(ranks):
    """parity.fast on 2 ranks (wq|wk|wv and w1|w3 fused per rank, a batch of two left-padded
    prompts) against the single process's greedy tokens, up to a near tie."""
    args = BUG_ARGS.replace(attention_bias=True, attention_out_bias=True, mlp_bias=True)
    params = {k: v.astype(np.float32) for k, v in random_params(args, 11).items()}
    single = Transformer(args, params)
    prompts = [[3, 1, 4, 1, 5, 9], [2, 7, 1]]
    fast, _ = ranks.run(split_fast, args, params, prompts, 8, ranks=2)
    for prompt, got in zip(prompts, fast):
        tokens, logits = greedy_steps(single, prompt, 8)
        agree = first_near_tie(logits, tokens)
        assert agree >= 4 and got[:agree] == tokens[:agree]


# ------------------------------------------------------------------------------ 3 ranks, the default model
def default_split(folder, prompt, tokens, n_generate):
    model = parity.load(folder, tp=3, progress=False)
    return run_steps(model, prompt, tokens), list(torch_generate(model, prompt, n_generate, stop_ids=()))


@pytest.mark.slow
def test_three_ranks_run_the_default_model_as_one_process(ranks, tmp_path):
    """The default model's weights, written once as safetensors, so that each rank reads only
    its slices (a GGUF file is read whole by every rank, then sliced: the CLI tests do that)."""
    from npllama.formats.hf import hf_files
    base = npllama.load(progress=False)
    single = parity.from_numpy(base)
    folder = tmp_path / "default"
    folder.mkdir()
    for name, data in hf_files(base.config, base.state_dict()).items():     # config.json, model.safetensors
        (folder / name).write_bytes(data)
    prompt = base.tokenizer.encode("The capital of France is")
    del base
    tokens, logits = greedy_steps(single, prompt, 6)
    (split, own), *others = ranks.run(default_split, str(folder), prompt, tokens, 6)
    assert_same_function(logits, split, tokens)
    agree = first_near_tie(logits, tokens)
    assert agree >= 4 and own[:agree] == tokens[:agree]
    for other_split, other_own in others:           # the all-reduce leaves every rank the same sums
        assert other_own == own
        for a, b in zip(split, other_split):
            np.testing.assert_allclose(b, a, rtol=0, atol=RTOL * np.abs(a).max())


# ------------------------------------------------------------------------------ a bug in one rank's part
BUG_ARGS = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=40, hidden_dim=48, head_dim=8)


def wrong_wk_slice(model, args, params):
    """Rank 1 takes rank 0's rows of layer 0's wk (kv head 0 instead of 1)."""
    if model.parallel.rank == 1:
        whole = torch.from_numpy(params["layers.0.attention.wk.weight"])
        model.layers[0].attention.wk.weight.data.copy_(whole[: args.head_dim])


def dropped_all_reduce(model, args, params):
    """Rank 1 joins layer 1's all-reduce after wo but keeps its own partial sum (the result of a
    functional all_reduce dropped): the other rank is right, rank 1 is not."""
    if model.parallel.rank == 1:
        row = model.layers[1].attention.wo.weight

        def linear(x, bias=None):
            y = torch.nn.functional.linear(x, row.shard)
            torch.distributed.all_reduce(y.clone(), group=row.group)
            return y if bias is None else y + bias
        row.linear = linear


def split_report(args, params, ids, k, plant, isolate=False):
    model = split_model(args, params, k, plant)
    base = NumpyTransformer(args, params) if model.parallel.rank == 0 else None
    return tp.parity_report(model, ids, "auto", base, isolate)


BUG_PARAMS = {k: v.astype(np.float32) for k, v in random_params(BUG_ARGS, 7).items()}
BUG_IDS = np.array([[3, 1, 4, 1, 5, 9, 2, 6]])


@pytest.mark.parametrize("plant, where", [
    (None, None),
    (wrong_wk_slice, "layer 0 op attention.k parts on rank 1 of 2: its shard (axis 1) departs"),
    (dropped_all_reduce, "layer 1 op attention parts on rank 1 of 2: its copy departs"),
])
def test_a_bug_in_one_ranks_part_is_named_with_its_rank(ranks, plant, where):
    report, _ = ranks.run(split_report, BUG_ARGS, BUG_PARAMS, BUG_IDS, 2, plant, ranks=2)
    if where is None:
        assert report.ok and len(report.rows) == 3 + 10 * BUG_ARGS.n_layers
        return
    assert not report.ok
    assert any(where in note for note in report.notes), report.notes
    assert report.first_break.name == ("layers.0.attention.k" if plant is wrong_wk_slice else "layers.1.attention")


def test_isolated_layers_hold_the_layer_tolerance(ranks):
    report, _ = ranks.run(split_report, BUG_ARGS, BUG_PARAMS, BUG_IDS, 2, None, True, ranks=2)
    assert report.ok and "each layer from the reference input" in report.title
    assert report.rows[0].rtol == parity_rtol("float32", "layer")


# ------------------------------------------------------------------------------ anyone's per-rank dumps
def port_dumps(args, params, ids, k, plant, folder, partial):
    """A 'foreign' tensor-parallel port: each rank writes its own dump of two steps (a prefill and
    one decode step) with rank, world size and splits, as parity.capture(..., rank=, world_size=,
    splits=) records them. partial: record wo's output before its all-reduce ("partial-sum")."""
    from parity.report import capture
    model = split_model(args, params, k, plant)
    rank, n = model.parallel.rank, model.parallel.world_size
    cache = model.new_cache(1, ids.shape[1] + 2)
    steps = []
    for step_ids in (ids, np.array([[7]])):
        acts, _ = capture(model, step_ids, cache=cache)
        if partial:           # rank r's own product of its heads with its columns of wo (bias on rank 0)
            for i, layer in enumerate(model.layers):
                out = torch.from_numpy(acts[f"layers.{i}.attention.scores_v"]).float()
                b, h, s, d = out.shape
                a = layer.attention
                part = out.transpose(1, 2).reshape(b, s, h * d) @ a.wo.weight.shard.T
                if a.wo.bias is not None and rank == 0:
                    part = part + a.wo.bias
                acts[f"layers.{i}.attention"] = part.double().numpy()
        steps.append(({name: x.astype(np.float32) for name, x in acts.items()}, step_ids))
    splits = {**{op: str(s) for op, s in tp.SPLITS.items()}, **({"attention": "partial-sum"} if partial else {})}
    path = Path(folder) / f"dump.rank{rank}.safetensors"
    write_steps(path, steps, dump_metadata("float32", "a tensor-parallel port", steps=len(steps), rank=rank,
                                           world_size=n, splits=splits))
    return str(path)


@pytest.mark.parametrize("plant, partial, first, rank", [
    (None, True, None, None),
    (wrong_wk_slice, False, "layers.0.attention.k", 1),
    (dropped_all_reduce, False, "layers.1.attention", 1),
])
def test_a_ports_rank_dumps_are_gathered_checked_and_the_rank_named(ranks, tmp_path, plant, partial, first, rank):
    paths = ranks.run(port_dumps, BUG_ARGS, BUG_PARAMS, BUG_IDS, 2, plant, str(tmp_path), partial, ranks=2)
    dumps = [read_dump(p) for p in reversed(paths)]                     # any order: the ranks sort them
    assert [d.rank for d in dumps] == [1, 0] and len(dumps[0].steps) == 2
    gathered = gather_ranks(dumps)
    base = NumpyTransformer(BUG_ARGS, BUG_PARAMS)
    report = check_dump(gathered, model=base)
    reference = trace(reference_model(base, "float32"), gathered.input_ids)
    found = tp.first_rank_break({name: gathered.pieces[(0, name)] for name in gathered.tensors},
                                dumps[0].split_of, reference, lambda name: parity_rtol("float32"))
    if first is None:
        assert report.ok and found is None
        return
    assert found == (first, [rank])
    if plant is wrong_wk_slice:     # a shard: the gathered whole breaks there too
        assert report.first_break.name == first
    else:                           # a replicated copy: the gathered dump keeps rank 0's, which is right;
        assert not report.ok and report.first_break.layer == 1   # rank 1's error shows only downstream


# ------------------------------------------------------------------------------ the command line
def tiny_hf(folder: Path, n_kv_heads: int = 2) -> Path:
    """A small Hugging Face checkpoint with a byte-level BPE tokenizer (no transformers needed)."""
    from npllama.formats.hf import save_checkpoint
    from npllama.tokenizer import Tokenizer
    from tiny import train_bpe
    folder.mkdir(parents=True)
    bpe = folder.parent / "tokenizer.json"
    train_bpe(vocab_size=300).save(str(bpe))
    tokenizer = Tokenizer.from_tokenizer_json(bpe, eos_ids=[2])
    args = ModelArgs(dim=48, n_layers=2, n_heads=2 * n_kv_heads, n_kv_heads=n_kv_heads, vocab_size=300,
                     hidden_dim=96, head_dim=8, eos_token_ids=(2,))
    params = {k: v.astype(np.float32) for k, v in random_params(args, 3).items()}
    return save_checkpoint(folder, args, params, tokenizer=tokenizer, overwrite=True)


def test_generate_tp_refuses_a_split_the_model_does_not_allow_before_starting_anything(tmp_path):
    from npllama.cli import main
    folder = tiny_hf(tmp_path / "m", n_kv_heads=3)
    result = CliRunner().invoke(main, ["generate", "-m", str(folder), "--backend", "torch", "--tp", "2",
                                       "-p", "hi"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "tp=2 does not split this model" in lines[0] and lines[0].endswith("tp=1 or tp=3 would")
    result = CliRunner().invoke(main, ["generate", "-m", str(folder), "--tp", "3", "-p", "hi"])
    assert result.exit_code == 2 and "add --backend torch" in result.output


@pytest.mark.slow
def test_generate_tp_starts_its_ranks_and_prints_what_one_process_prints(tmp_path):
    """`npllama generate --tp 2` from a plain command line: 2 processes, rank 0's text only."""
    from npllama.cli import main
    folder = tiny_hf(tmp_path / "m")
    argv = ["generate", "-m", str(folder), "--backend", "torch", "-p", "the capital of France", "--raw",
            "-n", "12", "-q"]
    one = CliRunner().invoke(main, argv)
    assert one.exit_code == 0, one.output
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    split = subprocess.run([sys.executable, "-m", "npllama", *argv, "--tp", "2"], capture_output=True, text=True,
                           timeout=RANK_TIMEOUT, env=env, cwd=REPO)
    assert split.returncode == 0, split.stderr
    assert split.stdout == one.output


@pytest.mark.slow
def test_parity_tp_prints_the_split_models_table_and_exits_by_its_verdict(tmp_path):
    """`npllama parity --tp 1` (a group of one in the command's own process; the ranks' side is
    test_a_bug_in_one_ranks_part_is_named_with_its_rank): the table, its title, exit 0."""
    folder = tiny_hf(tmp_path / "m")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "npllama", "parity", "-m", str(folder), "--tp", "1", "--ids",
                           "1,5,9,13,2"], capture_output=True, text=True, timeout=RANK_TIMEOUT, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "tensor parallel, 1 rank (gloo)" in done.stdout and "all 23 ops within tolerance" in done.stdout
