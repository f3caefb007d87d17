"""The fast decode path (parity/fast.py) computes what npllama computes.

- greedy tokens and logits equal npllama's (float32, tiny random models, both weight layouts);
- a batch of prompts of different lengths, left padded, gives each prompt what it gets alone
  (the property transformers #22861 is about), each row stopping on its own stop token;
- seeded sampling picks npllama.generate's tokens (same pre-drawn uniforms);
- in bfloat16 (CPU, and CUDA where there is one) prefill and decode logits stay within the
  bfloat16 parity bar of npllama in float64 on the same rounded weights;
- the decode step traced by torch.compile equals the eager step (aot_eager on CPU; inductor with
  CUDA graphs, mode="reduce-overhead", on a GPU).
CUDA tests skip where torch sees no GPU.
"""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import parity
from npllama.config import ModelArgs
from npllama.errors import InputError
from npllama.generate import generate
from npllama.model import Transformer
from npllama.params import init_params
from npllama.sampling import SamplingSettings
from npllama.tolerances import parity_rtol
from parity.fast import FastDecoder, FastWeights, fast_generate

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch sees none)")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]

ROPES = [{"rope_type": "default"}, {"rope_type": "linear", "factor": 2.0},
         {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}]


@st.composite
def tiny_configs(draw):
    n_kv = draw(st.sampled_from([1, 2]))
    n_rep = draw(st.sampled_from([1, 2, 3]))
    return ModelArgs(dim=draw(st.sampled_from([16, 24])), n_layers=draw(st.integers(1, 2)),
                     n_heads=n_kv * n_rep, n_kv_heads=n_kv, vocab_size=draw(st.integers(20, 60)),
                     hidden_dim=draw(st.sampled_from([20, 32])), head_dim=draw(st.sampled_from([4, 8])),
                     max_seq_len=48, tie_word_embeddings=draw(st.booleans()),
                     attention_bias=draw(st.booleans()), mlp_bias=draw(st.booleans()),
                     rope_scaling=draw(st.sampled_from(ROPES)),
                     partial_rotary_factor=draw(st.sampled_from([1.0, 0.5])), eos_token_ids=(0,))


def models(args, seed=0, std=0.4, dtype=torch.float32, device="cpu"):
    """(npllama model, parity model) with the same weights."""
    np_model = Transformer(args, init_params(args, seed=seed, std=std))
    return np_model, parity.from_numpy(np_model, device=device, dtype=dtype)


def prompts_for(args, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, args.vocab_size, n).tolist() for n in lengths]


def rel_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


FAST = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])


def greedy_before_a_near_tie(np_model, prompt, tokens) -> list[int]:
    """npllama's greedy tokens up to the first whose top-2 margin is within float32's bar: there
    either token is right, and two orders of float arithmetic (the fast path's, npllama's; one
    host's kernels, another's) may each pick its own. What is after it is not compared."""
    logits = np_model([list(prompt) + list(tokens)])[0, len(prompt) - 1:]     # the row that chose each token
    scale = np.abs(logits).max()
    for step, row in enumerate(logits[: len(tokens)]):
        top2 = np.sort(row)[-2:]
        if top2[1] - top2[0] <= 2 * parity_rtol("float32") * scale:
            return list(tokens[:step])
    return list(tokens)


# ---------------------------------------------------------------------------- float32: tokens and logits
@settings(max_examples=12, **FAST)
@given(tiny_configs(), st.integers(1, 9), st.sampled_from(["in_out", "out_in"]))
def test_greedy_tokens_and_logits_equal_npllama(args, prompt_len, layout):
    np_model, pt_model = models(args)
    prompt = prompts_for(args, [prompt_len])[0]
    want = list(generate(np_model, prompt, 8, stop_ids=()))
    fd = FastDecoder(pt_model, batch_size=1, max_seq_len=prompt_len + 8, layout=layout)
    sure = greedy_before_a_near_tie(np_model, prompt, want)
    assert fd.generate([prompt], 8, stop_ids=(), sync_every=3)[0][: len(sure)] == sure

    # Teacher-forced logits, prefill and every decode step, against npllama's full recompute.
    seq = prompt + want
    full = np_model([seq])[0]                                   # (seq, vocab)
    got = [fd.prefill([prompt])[0]] + [fd.decode([t])[0] for t in want[:-1]]
    assert rel_err(torch.stack(got).numpy(), full[prompt_len - 1:-1]) < parity_rtol("float32")


@settings(max_examples=10, **FAST)
@given(tiny_configs(), st.lists(st.integers(1, 10), min_size=2, max_size=4), st.integers(1, 9))
def test_batched_prompts_of_different_lengths_equal_each_alone(args, lengths, new):
    """Left padding, per-row positions and the pad mask: row r of a batch is prompt r alone."""
    np_model, pt_model = models(args, seed=1)
    prompts = prompts_for(args, lengths, seed=2)
    weights = FastWeights(pt_model)
    alone = [FastDecoder(weights, 1, len(p) + new).generate([p], new, stop_ids=()) [0] for p in prompts]
    sure = [greedy_before_a_near_tie(np_model, p, list(generate(np_model, p, new, stop_ids=()))) for p in prompts]
    assert [a[: len(w)] for a, w in zip(alone, sure)] == sure
    fd = FastDecoder(weights, batch_size=len(prompts) + 1, max_seq_len=max(lengths) + new)   # a spare row
    batched = fd.generate(prompts, new, stop_ids=(), sync_every=4)
    assert [b[: len(w)] for b, w in zip(batched, sure)] == sure

    # Logits too: each row's prefill and first decode step, batched vs alone.
    first = fd.prefill(prompts)[: len(prompts)]
    for r, p in enumerate(prompts):
        one = FastDecoder(weights, 1, len(p) + 1)
        assert rel_err(first[r].numpy(), one.prefill([p])[0].numpy()) < parity_rtol("float32")


def test_each_row_stops_on_its_own_stop_token():
    args = ModelArgs(dim=24, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=40, hidden_dim=32,
                     max_seq_len=64, eos_token_ids=(0,))
    np_model, pt_model = models(args, seed=3, std=0.5)
    prompts = prompts_for(args, [5, 2, 7], seed=4)
    free = [list(generate(np_model, p, 12, stop_ids=())) for p in prompts]
    stop = free[0][3]                                          # row 0 emits it at step 3 (or before)
    want = [list(generate(np_model, p, 12, stop_ids={stop})) for p in prompts]
    assert len(want[0]) <= 4 and want[0][-1] == stop
    assert fast_generate(pt_model, prompts, 12, stop_ids={stop}, sync_every=2) == want
    assert FastDecoder(pt_model, 4, 40).generate(prompts, 12, stop_ids={stop}, sync_every=64) == want


def test_stream_yields_every_sync_every_tokens():
    args = ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=30, hidden_dim=20, max_seq_len=64)
    _, pt_model = models(args)
    prompts = prompts_for(args, [3, 6])
    chunks = list(FastDecoder(pt_model, 2, 30).stream(prompts, 10, stop_ids=(), sync_every=4))
    assert [len(c[0]) for c in chunks] == [1, 4, 4, 1]   # the first token at once
    assert [sum(c, []) for c in zip(*chunks)] == fast_generate(pt_model, prompts, 10, stop_ids=())


def test_budget_is_npllamas_and_the_window_holds():
    args = ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=30, hidden_dim=20, max_seq_len=16)
    np_model, pt_model = models(args)
    prompt = prompts_for(args, [13])[0]
    want = list(generate(np_model, prompt, 10, stop_ids=()))
    assert len(want) == 4
    assert fast_generate(pt_model, [prompt], 10, stop_ids=()) == [want]
    assert FastDecoder(pt_model, 1).generate([prompt], 10, stop_ids=()) == [want]
    assert fast_generate(pt_model, [prompt], 0) == [[]]


# ---------------------------------------------------------------------------- sampling
@settings(max_examples=8, **FAST)
@given(tiny_configs(), st.sampled_from([SamplingSettings(temperature=1.0),
                                        SamplingSettings(temperature=0.7, top_k=5),
                                        SamplingSettings(temperature=1.3, top_p=0.8),
                                        SamplingSettings(temperature=2.0, top_k=8, top_p=0.9)]),
       st.integers(0, 2**31 - 1))
def test_seeded_sampling_picks_npllamas_tokens(args, sampling, seed):
    np_model, pt_model = models(args, seed=5)
    prompts = prompts_for(args, [4, 7, 1], seed=seed % 1000)
    want = [list(generate(np_model, p, 10, sampling, seed=seed + r, stop_ids=())) for r, p in enumerate(prompts)]
    fd = FastDecoder(pt_model, batch_size=3, max_seq_len=17)
    assert fd.generate(prompts, 10, sampling, seed=[seed + r for r in range(3)], stop_ids=()) == want
    assert fd.generate(prompts[:1], 10, sampling, seed=seed, stop_ids=()) == want[:1]


# ---------------------------------------------------------------------------- low precision
def bf16_case(device, dtype=torch.bfloat16, seed=6):
    """A tiny model in dtype on device, and npllama in float64 on the *same rounded* weights."""
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, hidden_dim=96,
                     max_seq_len=64, rope_scaling=ROPES[2], attention_bias=True, tie_word_embeddings=True)
    np32 = Transformer(args, init_params(args, seed=seed, std=0.15))
    pt_model = parity.from_numpy(np32, device=device, dtype=dtype)
    exact = {k: v.detach().double().cpu().numpy() for k, v in pt_model.state_dict().items()}
    return pt_model, Transformer(args, exact, dtype=np.float64)


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_logits_within_the_bfloat16_bar(device):
    pt_model, ref = bf16_case(device)
    prompts = prompts_for(ref.config, [9, 5, 12], seed=7)
    forced = prompts_for(ref.config, [6], seed=8)[0]           # the tokens fed back, the same for every row
    fd = FastDecoder(pt_model, batch_size=3, max_seq_len=20)
    got = [fd.prefill(prompts)] + [fd.decode([t] * 3) for t in forced]
    got = torch.stack(got, dim=1).cpu().numpy()                # (batch, steps, vocab)
    bar = parity_rtol("bfloat16")
    for r, p in enumerate(prompts):
        want = ref([p + forced])[0, len(p) - 1:]               # (steps, vocab) float64 -> float32
        assert rel_err(got[r], want) < bar, f"row {r}"


@CUDA
def test_float16_logits_on_cuda_within_the_float16_bar():
    pt_model, ref = bf16_case("cuda", torch.float16)
    prompt = prompts_for(ref.config, [11], seed=9)[0]
    fd = FastDecoder(pt_model, 1, 16)
    got = [fd.prefill([prompt])[0]] + [fd.decode([t])[0] for t in prompt[:4]]
    want = ref([prompt + prompt[:4]])[0, len(prompt) - 1:]
    assert rel_err(torch.stack(got).cpu().numpy(), want) < parity_rtol("float16")


# ---------------------------------------------------------------------------- compiled step
def test_step_traced_by_torch_compile_equals_eager_on_cpu():
    """fullgraph=True: no graph break; aot_eager: the in-place buffer updates survive
    functionalisation. (Inductor's code generation is exercised on a GPU, below.)"""
    args = ModelArgs(dim=16, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=40, hidden_dim=24,
                     max_seq_len=32, eos_token_ids=(1,), attention_bias=True)
    _, pt_model = models(args, seed=10, std=0.5)
    prompts = prompts_for(args, [3, 6], seed=11)
    weights = FastWeights(pt_model)
    eager = FastDecoder(weights, 2, 16)
    compiled = FastDecoder(weights, 2, 16, compile="default", backend="aot_eager")
    sampling = SamplingSettings(temperature=1.0, top_k=10)
    for s, seed in ((SamplingSettings(), None), (sampling, 3)):
        want = eager.generate(prompts, 9, s, seed=seed, stop_ids=(), sync_every=4)
        assert compiled.generate(prompts, 9, s, seed=seed, stop_ids=(), sync_every=4) == want


@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decode_equals_eager(dtype):
    """mode="reduce-overhead": inductor kernels replayed as one CUDA graph per token."""
    pt_model, ref = bf16_case("cuda", dtype, seed=12)
    weights = FastWeights(pt_model)
    prompts = prompts_for(ref.config, [7, 3, 10, 5], seed=13)
    eager = FastDecoder(weights, 4, 40)
    graphed = FastDecoder(weights, 4, 40, compile="reduce-overhead")
    want = eager.generate(prompts, 24, stop_ids=(), sync_every=8)
    for _ in range(3):                                         # warm-up, recording, replays
        got = graphed.generate(prompts, 24, stop_ids=(), sync_every=8)
    if dtype == torch.float32:
        assert got == want
    else:                                                      # bf16 kernels may round a near-tie apart
        agree = np.mean([a == b for g, w in zip(got, want) for a, b in zip(g, w)])
        assert agree > 0.9 and [g[0] for g in got] == [w[0] for w in want]
    # The graphed logits against float64 NumPy, as the eager ones are held above.
    graphed_logits = torch.compile(graphed._decode_logits, mode="reduce-overhead", fullgraph=True)
    forced = prompts_for(ref.config, [6], seed=14)[0]
    rows = [graphed.prefill(prompts).clone()]
    for t in forced:
        graphed.tokens.fill_(t)
        torch.compiler.cudagraph_mark_step_begin()
        rows.append(graphed_logits().clone())
        graphed.slot += 1
    got = torch.stack(rows, dim=1).cpu().numpy()
    bar = parity_rtol(dtype)
    for r, p in enumerate(prompts):
        assert rel_err(got[r], ref([p + forced])[0, len(p) - 1:]) < bar


# ---------------------------------------------------------------------------- errors
def test_bad_input_is_refused_clearly():
    args = ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=30, hidden_dim=20, max_seq_len=32)
    _, pt_model = models(args)
    fd = FastDecoder(pt_model, 2, 16)
    with pytest.raises(InputError, match="3 prompts, but this decoder has 2 rows"):
        fd.generate([[1], [2], [3]], 4)
    with pytest.raises(InputError, match="prompt 1 must be a non-empty"):
        fd.generate([[1], []], 4)
    with pytest.raises(InputError, match="token id 30 lies outside"):
        fd.generate([[1, 30]], 4)
    with pytest.raises(InputError, match="longest prompt is 17 tokens; this decoder holds 16"):
        fd.generate([[1] * 17], 4)
    with pytest.raises(InputError, match="max_seq_len must lie in 1..32"):
        FastDecoder(pt_model, 1, 33)
    with pytest.raises(InputError, match="unknown compile mode"):
        FastDecoder(pt_model, 1, 8, compile="fast")
    with pytest.raises(InputError, match=r"seed must be an integer, None, or one per prompt \(1\), got \[1, 2\]"):
        fd.generate([[1]], 4, SamplingSettings(temperature=1.0), seed=[1, 2])
    with pytest.raises(InputError, match="max_new_tokens"):
        fd.generate([[1]], -1)


def test_float64_weights_keep_float64_arithmetic_in_the_fast_path():
    """The fast path's RMSNorm takes its statistic in the input's dtype when that is wider than
    float32 (as parity.norm and npllama.norm do), so float64 prefill and decode logits equal the
    NumPy float64 model's to float64's bar, not float32's."""
    from parity.fast import rms_norm as fast_rms_norm
    from parity.norm import rms_norm

    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, 16)) * 1e3)
    w = torch.from_numpy(np.random.default_rng(1).standard_normal(16))
    assert torch.allclose(fast_rms_norm(x, w, 1e-6), rms_norm(x, w, 1e-6), rtol=1e-14, atol=0)
    args = ModelArgs(dim=16, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=40, hidden_dim=24, max_seq_len=32)
    np_model = Transformer(args, init_params(args, seed=2, std=0.4), dtype=np.float64)
    model = parity.from_numpy(np_model, dtype=torch.float64)
    prompt = prompts_for(args, [7])[0]
    decoder = FastDecoder(model, batch_size=1, max_seq_len=16)
    logits = decoder.prefill([prompt]).numpy()
    want = np_model(np.array([prompt]))[0, -1]
    rtol = parity_rtol("float64", "model", "float32")    # logits are float32 by contract
    assert np.max(np.abs(logits[0] - want)) <= rtol * np.max(np.abs(want))
    x32 = torch.ones(1, 2, 16, dtype=torch.float64) * 1e-3
    assert fast_rms_norm(x32, torch.ones(16, dtype=torch.float64), 1e-12).dtype == torch.float64
