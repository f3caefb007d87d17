"""Padded batches: an attention mask, positions counted per row, batched generation, padded loss.

The property behind all of it (transformers #22861 is the bug it rules out): a row of a padded
batch computes exactly what it computes alone. Hypothesis draws tiny configs (MHA, GQA, MQA; every
rope variant), batch sizes, lengths and left or right padding, and checks:
(a) each padded row equals the row alone in npllama, with and without a cache, naive and blockwise;
(b) npllama equals transformers given the same ids, mask and position ids;
(c) the Torch mirror and the fast path equal npllama;
(d) batched greedy and seeded generation give each row the tokens it gets alone.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import parity
from npllama.attention import flash_attention, naive_attention
from npllama.config import ModelArgs
from npllama.errors import InputError
from npllama.generate import generate, generate_text, left_pad
from npllama.model import Transformer
from npllama.params import init_params
from npllama.rope_scaling import context_window
from npllama.sampling import SamplingSettings
from npllama.tolerances import FORMAT_VS_TRANSFORMERS_RTOL, PADDED_VS_ALONE_RTOL, TRAIN_LOSS_RTOL, parity_rtol
from parity.fast import FastDecoder

F32 = PADDED_VS_ALONE_RTOL[np.dtype(np.float32)]

ROPES = [{"rope_type": "default"},
         {"rope_type": "linear", "factor": 2.0},
         {"rope_type": "dynamic", "factor": 2.0},
         {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8},
         {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}]


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@st.composite
def configs(draw):
    n_kv = draw(st.sampled_from([1, 2]))
    n_rep = draw(st.sampled_from([1, 2, 3]))            # n_rep 1: MHA; n_kv 1 with n_rep > 1: MQA; else GQA
    return ModelArgs(dim=24, n_layers=draw(st.integers(1, 2)), n_heads=n_kv * n_rep, n_kv_heads=n_kv,
                     vocab_size=40, hidden_dim=32, head_dim=8, max_seq_len=32, norm_eps=1e-5,
                     rope_scaling=draw(st.sampled_from(ROPES)), attention_bias=(bias := draw(st.booleans())),
                     attention_out_bias=bias,
                     eos_token_ids=(0,))


@st.composite
def batches(draw, max_len=14):
    """(args, model, rows of ids, 'left' | 'right', seed)."""
    args = draw(configs())
    seed = draw(st.integers(0, 2**16))
    lengths = draw(st.lists(st.integers(1, max_len), min_size=1, max_size=4))
    rng = np.random.default_rng(seed)
    rows = [rng.integers(1, args.vocab_size, n) for n in lengths]
    model = Transformer(args, init_params(args, seed=seed, std=0.3))
    return args, model, rows, draw(st.sampled_from(["left", "right"])), seed


def pad(rows, side):
    """ids and 0/1 mask (int, transformers' convention), each row padded on one side with junk ids."""
    length = max(len(r) for r in rows)
    ids = np.full((len(rows), length), 7, dtype=np.int64)          # padding ids: any id, never attended
    mask = np.zeros((len(rows), length), dtype=np.int64)
    for i, r in enumerate(rows):
        cols = slice(length - len(r), length) if side == "left" else slice(0, len(r))
        ids[i, cols], mask[i, cols] = r, 1
    return ids, mask


def real(x, mask, i):
    """Row i of x at its real columns."""
    return np.asarray(x)[i][np.asarray(mask)[i].astype(bool)]


# ------------------------------------------------------------------------------ (a) the spec
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches(), st.sampled_from(["naive", "flash"]))
def test_each_padded_row_equals_the_row_alone(case, impl):
    args, model, rows, side, _ = case
    ids, mask = pad(rows, side)
    logits = model(ids, attention_mask=mask, attention=impl)
    assert np.isfinite(logits).all()                                 # padding gives finite numbers too
    for i, row in enumerate(rows):
        alone = model(row[None], attention=impl)[0]
        assert rel_err(real(logits, mask, i), alone) <= F32


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches(max_len=10), st.data())
def test_a_cache_keeps_each_rows_padding_and_positions(case, data):
    """Prefill in chunks, then decode a few tokens per row (some rows fed padding): each row's
    logits equal the row alone, fed the same real tokens, with its own cache."""
    args, model, rows, side, seed = case
    ids, mask = pad(rows, side)
    cut = data.draw(st.integers(1, ids.shape[1]))
    cache = model.new_cache(len(rows))
    got = [model(ids[:, :cut], cache=cache, attention_mask=mask[:, :cut])]
    if cut < ids.shape[1]:
        got.append(model(ids[:, cut:], cache=cache, attention_mask=mask[:, cut:]))
    rng = np.random.default_rng(seed + 1)
    steps = [(rng.integers(1, args.vocab_size, (len(rows), 1)), rng.integers(0, 2, (len(rows), 1))) for _ in range(3)]
    for step_ids, step_mask in steps:
        step_mask[cache.positions == 0] = 1                          # a row must have a real token
        got.append(model(step_ids, cache=cache, attention_mask=step_mask))
    got = np.concatenate(got, axis=1)
    all_mask = np.concatenate([mask] + [m for _, m in steps], axis=1)
    all_ids = np.concatenate([ids] + [i for i, _ in steps], axis=1)
    assert np.array_equal(cache.positions, all_mask.sum(axis=1))
    for i in range(len(rows)):
        alone = model(real(all_ids, all_mask, i)[None])[0]
        assert rel_err(real(got, all_mask, i), alone) <= F32


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 40), st.integers(0, 40), st.integers(1, 16),
       st.integers(1, 16), st.integers(0, 2**16))
def test_blockwise_attention_with_padding_equals_naive(batch, n_rep, q_len, extra, block_q, block_k, seed):
    rng = np.random.default_rng(seed)
    kv_len = q_len + extra
    q = rng.standard_normal((batch, 2 * n_rep, q_len, 8), dtype=np.float32)
    k, v = (rng.standard_normal((batch, 2, kv_len, 8), dtype=np.float32) for _ in range(2))
    kv_mask = rng.random((batch, kv_len)) < 0.7
    kv_mask[:, : rng.integers(0, kv_len + 1)] = False                 # a stretch of left padding
    want = naive_attention(q, k, v, kv_mask=kv_mask)
    got = flash_attention(q, k, v, block_q=block_q, block_k=block_k, kv_mask=kv_mask)
    assert np.isfinite(got).all() and rel_err(got, want) <= F32
    seen = np.cumsum(kv_mask, axis=1)[:, -q_len:]                    # (batch, q_len): keys each query sees
    assert (got[np.broadcast_to((seen == 0)[:, None, :, None], got.shape)] == 0).all()


def test_blockwise_attention_skips_tiles_of_padding(monkeypatch):
    """A tile that is padding in every row is never multiplied; the scores are never seq x seq."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 2, 64, 8), dtype=np.float32)
    k, v = (rng.standard_normal((2, 1, 64, 8), dtype=np.float32) for _ in range(2))
    kv_mask = np.zeros((2, 64), bool)
    kv_mask[0, 40:], kv_mask[1, 20:] = True, True                    # tiles 0 and 1 of 16 keys: padding only
    shapes = []
    real_matmul = np.matmul

    class Spy(np.ndarray):
        def __matmul__(self, other):
            shapes.append(np.shape(other))
            return real_matmul(np.asarray(self), other)

    out = flash_attention(q.view(Spy), k, v, block_q=16, block_k=16, kv_mask=kv_mask)
    want = naive_attention(q, k, v, kv_mask=kv_mask)
    assert rel_err(out, want) <= F32
    score_products = [s for s in shapes if s[-2] == 8]               # q @ k^T: k tiles are (.., 8, bk)
    assert all(s[-1] <= 16 for s in score_products)
    # causal + padding: query tile t reads key tiles 1 .. t (tile 0 is padding in every row)
    assert len(score_products) == 0 + 1 + 2 + 3


def test_blockwise_attention_with_padding_never_allocates_seq_by_seq():
    from test_attention import traced_peak

    rng = np.random.default_rng(2)
    seq = 4096
    q = rng.standard_normal((1, 2, seq, 64), dtype=np.float32)
    k, v = (rng.standard_normal((1, 1, seq, 64), dtype=np.float32) for _ in range(2))
    kv_mask = np.ones((1, seq), bool)
    kv_mask[0, :1000] = False                                         # a long stretch of left padding
    peak = traced_peak(flash_attention, q, k, v, kv_mask=kv_mask)
    assert peak < seq * seq * 4 / 8, f"blockwise attention with a mask peaked at {peak / 2**20:.1f} MiB"


def test_every_query_without_a_key_is_zero_not_nan():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 2, 5, 4), dtype=np.float32)
    k, v = (rng.standard_normal((1, 1, 5, 4), dtype=np.float32) for _ in range(2))
    kv_mask = np.array([[False, False, True, True, True]])
    for out in (naive_attention(q, k, v, kv_mask=kv_mask), flash_attention(q, k, v, block_k=2, kv_mask=kv_mask)):
        assert np.isfinite(out).all() and (out[:, :, :2] == 0).all()


# ------------------------------------------------------------------------------ (b) transformers
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches())
def test_npllama_equals_transformers_given_ids_mask_and_positions(case):
    from parity.report import transformers_twin

    args, model, rows, side, _ = case
    ids, mask = pad(rows, side)
    hf = transformers_twin(parity.from_numpy(model))
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)        # transformers' generate does this
    with torch.no_grad():
        theirs = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                    position_ids=torch.from_numpy(positions)).logits.numpy()
    ours = model(ids, attention_mask=mask)
    for i in range(len(rows)):
        assert rel_err(real(ours, mask, i), real(theirs, mask, i)) <= FORMAT_VS_TRANSFORMERS_RTOL


# ------------------------------------------------------------------------------ (c) Torch
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches(), st.sampled_from(["naive", "flash", "sdpa"]))
def test_the_torch_mirror_takes_the_same_mask(case, impl):
    args, model, rows, side, _ = case
    ids, mask = pad(rows, side)
    twin = parity.from_numpy(model)
    with torch.no_grad():
        got = twin(ids, attention_mask=torch.from_numpy(mask), attention=impl).numpy()
        cache = twin.new_cache(len(rows), max_seq_len=32)
        cut = ids.shape[1] // 2 + 1
        chunks = [twin(ids[:, :cut], cache=cache, attention_mask=mask[:, :cut], attention=impl)]
        if cut < ids.shape[1]:
            chunks.append(twin(ids[:, cut:], cache=cache, attention_mask=mask[:, cut:], attention=impl))
    want = model(ids, attention_mask=mask)
    cached = torch.cat(chunks, dim=1).numpy()
    bar = parity_rtol("float32", "model")
    for i in range(len(rows)):
        assert rel_err(real(got, mask, i), real(want, mask, i)) <= bar
        assert rel_err(real(cached, mask, i), real(want, mask, i)) <= bar


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches(), st.booleans())
def test_the_fast_path_equals_the_spec_row_by_row(case, greedy):
    args, model, rows, _, seed = case
    twin = parity.from_numpy(model)
    prompts = [r.tolist() for r in rows]
    ids, mask = left_pad([np.asarray(p) for p in prompts])
    decoder = FastDecoder(twin, batch_size=len(prompts), max_seq_len=32)
    got = decoder.prefill(prompts).numpy()
    want = model(ids, attention_mask=mask)[:, -1]
    assert rel_err(got[: len(prompts)], want) <= parity_rtol("float32", "model")
    settings_ = SamplingSettings() if greedy else SamplingSettings(temperature=0.9, top_p=0.9)
    fast = decoder.generate(prompts, 6, settings_, seed=seed)
    spec = list(generate(model, prompts, 6, settings_, seed=seed))
    spec_rows = [[t for t in col if t is not None] for col in zip(*spec)]
    assert fast == spec_rows


# ------------------------------------------------------------------------------ (d) generation
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches(), st.booleans(), st.sampled_from(["numpy", "torch"]))
def test_batched_generation_gives_each_row_its_tokens_alone(case, greedy, backend):
    args, model, rows, _, seed = case
    gen = generate if backend == "numpy" else parity.generate
    m = model if backend == "numpy" else parity.from_numpy(model)
    settings_ = SamplingSettings() if greedy else SamplingSettings(temperature=0.8, top_k=10)
    prompts = [r.tolist() for r in rows]
    steps = list(gen(m, prompts, 8, settings_, seed=seed, stop_ids={0, 3}))
    for i, prompt in enumerate(prompts):
        mine = [step[i] for step in steps if step[i] is not None]
        alone = list(gen(m, prompt, 8, settings_, seed=seed, stop_ids={0, 3}))
        assert mine == alone
        assert all(step[i] is None for step in steps[len(mine):])    # a stopped row stays stopped


def test_generation_reports_why_each_row_stopped():
    args = ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=20, hidden_dim=16, max_seq_len=12)
    model = Transformer(args, init_params(args, seed=1, std=0.5))
    run = generate(model, [[1, 2, 3], [4] * 10, [5]], 5, stop_ids=set())
    list(run)
    assert run.budgets == [5, 3, 5]
    assert run.stopped == ["max_new_tokens", "context window full", "max_new_tokens"]
    assert [len(t) for t in run.tokens] == [5, 3, 5]


# ------------------------------------------------------------------------------ loss
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches())
def test_padded_loss_scores_each_rows_real_tokens_as_alone(case):
    args, model, rows, side, _ = case
    ids, mask = pad(rows, side)
    scored = [len(r) - 1 for r in rows]
    if sum(scored) == 0:
        return
    want = sum(model.loss(r[None]) * n for r, n in zip(rows, scored) if n) / sum(scored)
    got = model.loss(ids, attention_mask=mask)
    assert abs(got - want) <= F32 * abs(want)
    twin = parity.from_numpy(model)
    assert abs(float(twin.loss(ids, attention_mask=mask)) - got) <= TRAIN_LOSS_RTOL * abs(got)


def test_the_training_step_takes_padded_batches():
    from parity.train import batch_loss

    args = ModelArgs(dim=16, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=30, hidden_dim=24)
    model = Transformer(args, init_params(args, seed=2, std=0.3))
    twin = parity.from_numpy(model, requires_grad=True)
    ids, mask = pad([np.arange(1, 9), np.arange(3, 7), np.arange(5, 16)], "right")
    loss = batch_loss(twin, ids, mask=mask)
    assert abs(float(loss.detach()) - model.loss(ids, attention_mask=mask)) <= TRAIN_LOSS_RTOL * float(loss.detach())
    loss.backward()
    grads = [p.grad.clone() for p in twin.parameters()]
    twin.zero_grad()
    other = np.where(mask == 1, ids, 29)                              # other padding ids: nothing moves
    # bit for bit: the same operations on the same shapes; the padding's values are masked to exact
    # zeros before any sum they could enter, so every sum adds the same numbers in the same order
    batch_loss(twin, other, mask=mask).backward()
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, twin.parameters()))


# ------------------------------------------------------------------------------ bad masks
def test_bad_masks_are_named_before_any_work():
    args = ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=20, hidden_dim=16, max_seq_len=16)
    model = Transformer(args, init_params(args))
    ids = np.ones((2, 3), dtype=np.int64)
    cases = [(np.ones((2, 4)), "attention_mask has shape"), (np.full((2, 3), 2), "1 for a token and 0 for padding"),
             (np.array([[1, 1, 1], [0, 0, 0]]), "row 1 of attention_mask has no real token"),
             (np.array([[0.5, 1, 1], [1, 1, 1]]), "1 for a token and 0")]
    for mask, words in cases:
        with pytest.raises(InputError, match=words):
            model(ids, attention_mask=mask)
    cache = model.new_cache(2)
    model(ids, cache=cache, attention_mask=np.array([[0, 1, 1], [1, 1, 1]]))
    model(ids[:, :1], cache=cache, attention_mask=np.array([[0, 1, 1, 1], [1, 1, 1, 1]]))   # transformers' style
    with pytest.raises(InputError, match="do not match the padding the cache holds"):
        model(ids[:, :1], cache=cache, attention_mask=np.ones((2, 5)))
    with pytest.raises(InputError, match="the cache holds 2 sequences"):
        model(ids[:1], cache=cache)
    with pytest.raises(InputError, match="seed must be"):
        generate(model, [[1], [2]], 2, seed=[1, 2, 3])


# ------------------------------------------------------------------------------ dynamic NTK
def test_dynamic_ntk_decodes_past_max_position_embeddings_as_transformers(tmp_path):
    from test_rope import MODEL_ROPES, TINY, hf_cached_logits, hf_config_dict, save_tiny
    from transformers import LlamaForCausalLM

    import npllama

    rope, max_pos = MODEL_ROPES["dynamic"]
    path = save_tiny(tmp_path, hf_config_dict(rope, max_pos=max_pos, **TINY))
    ours = npllama.load(path, progress=False)
    assert context_window(ours.config) == 4 * max_pos == ours.new_cache().max_seq_len
    ids = np.random.default_rng(3).integers(0, TINY["vocab"], (1, 2 * max_pos))     # twice the trained context
    cache = ours.new_cache(1)                                                          # no max_seq_len asked
    mine = [ours(ids[:, :8], cache=cache)] + [ours(ids[:, t:t + 1], cache=cache) for t in range(8, ids.shape[1])]
    theirs = hf_cached_logits(LlamaForCausalLM.from_pretrained(path, attn_implementation="eager").eval(), ids, 8)
    assert rel_err(np.concatenate(mine, axis=1), theirs) <= FORMAT_VS_TRANSFORMERS_RTOL
    run = generate(ours, ids[0, :max_pos].tolist(), 2 * max_pos, stop_ids=set())
    assert len(list(run)) == 2 * max_pos                                               # on past max_pos
    with pytest.raises(InputError, match="context window of 128"):
        ours(np.zeros((1, 4 * max_pos + 1), dtype=np.int64), cache=ours.new_cache(1))


# ------------------------------------------------------------------------------ the default model
CHAT_PROMPTS = ["What is the capital of France?", "Name a fruit.",
                "Write one short sentence about the sea, and say why you chose it."]


@pytest.mark.slow
def test_default_model_batch_of_three_chat_prompts_answers_each_as_alone():
    import npllama
    from npllama.chat import render_prompt

    model = npllama.load(progress=False)
    rendered = [render_prompt(model, p) for p in CHAT_PROMPTS]
    texts, stops = [t for t, _ in rendered], rendered[0][1]
    lengths = {len(model.tokenizer.encode(t)) for t in texts}
    assert len(lengths) == 3                                          # three different lengths
    for m, gen in ((model, generate), (parity.from_numpy(model), parity.generate)):
        together = list(generate_text(m, texts, 24, stop_ids=stops, generate_fn=gen))
        answers = ["".join(step[i] for step in together) for i in range(3)]
        alone = ["".join(generate_text(m, t, 24, stop_ids=stops, generate_fn=gen)) for t in texts]
        assert answers == alone, gen
    assert "Paris" in answers[0]


# ------------------------------------------------------------------------------ the command line
def test_generate_command_runs_several_prompts_and_says_when_the_window_is_full(tmp_path):
    from click.testing import CliRunner
    from tiny import random_llama, save_hf, tiny_config, train_bpe

    from npllama.cli import main

    folder = save_hf(random_llama(tiny_config(max_seq_len=48, eos_token_id=None)), tmp_path / "tiny",
                     tokenizer=train_bpe())
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the capital of France\n\nthe river and the mountain of the village\n", encoding="utf-8")
    runner = CliRunner()
    out = runner.invoke(main, ["generate", "-m", str(folder), "--raw", "-q", "-n", "6", "--prompt", "a model",
                               "--prompts", str(prompts)])
    assert out.exit_code == 0, out.output
    shown = out.stdout.split(">>> ")[1:]
    assert [s.splitlines()[0] for s in shown] == ["a model", "the capital of France",
                                                  "the river and the mountain of the village"]
    single = runner.invoke(main, ["generate", "-m", str(folder), "--raw", "-q", "-n", "6", "--prompt", "a model"])
    assert single.stdout.strip() == shown[0].split("\n", 1)[1].strip()         # the same answer as alone
    full = runner.invoke(main, ["generate", "-m", str(folder), "--raw", "-q", "-n", "99", "--prompt", "a model"])
    assert full.exit_code == 0 and "the context window of 48 tokens is full" in full.stderr
    missing = runner.invoke(main, ["generate", "-m", str(folder), "--prompts", str(tmp_path / "none.txt")])
    assert missing.exit_code == 2 and "--prompts" in missing.stderr


def test_perplexity_batches_windows_of_different_lengths_with_a_mask():
    from npllama.evaluate import total_nll

    args = ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=30, hidden_dim=16, max_seq_len=16)
    model = Transformer(args, init_params(args, seed=4, std=0.4))
    windows = [np.arange(1, 11), np.arange(2, 12), np.arange(5, 9)]              # the last one shorter
    nll, count = total_nll(lambda ids, mask: model.loss(ids, attention_mask=mask), windows, batch_size=3)
    one_by_one = sum(model.loss(w[None]) * (len(w) - 1) for w in windows)
    assert count == 9 + 9 + 3 and abs(nll - one_by_one) <= F32 * one_by_one
