"""The Torch backend is npllama's model: every op of random configs, cached and uncached, in every
dtype, against npllama in float64 on the same weights; the same tokens out of both generators;
loading, state_dict, gradients and errors; and the default model (greedy and seeded sampling)."""

import functools
import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings, strategies as st

import npllama
import npllama.rope
import parity
from npllama.config import ModelArgs
from npllama.errors import InputError
from npllama.generate import generate as np_generate
from npllama.model import Transformer as NumpyTransformer
from npllama.params import param_shapes
from npllama.rope_scaling import context_window
from npllama.sampling import SamplingSettings
from npllama.tolerances import parity_rtol
from parity.generate import generate as torch_generate
from parity.model import Transformer
from parity.report import format_table, parity_report, reference_of
from test_parity_ops import DTYPES, rel_err, rope_scalings

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# ------------------------------------------------------------------------------ random models
@st.composite
def configs(draw, max_layers: int = 3) -> ModelArgs:
    """Heads, kv heads, head dims, vocab, layers, every rope variant, partial rotary, ties, biases."""
    n_kv = draw(st.integers(1, 3))
    n_rep = draw(st.sampled_from([1, 2, 3]))
    head_dim = draw(st.sampled_from([4, 8, 16, 32]))
    partial = draw(st.sampled_from([1.0, 1.0, 0.5]))
    assume(int(head_dim * partial) > 2 and int(head_dim * partial) % 2 == 0)
    return ModelArgs(dim=draw(st.sampled_from([16, 24, 48])), n_layers=draw(st.integers(1, max_layers)),
                     n_heads=n_kv * n_rep, n_kv_heads=n_kv, vocab_size=draw(st.integers(16, 300)),
                     hidden_dim=draw(st.sampled_from([8, 40, 64])), head_dim=head_dim,
                     norm_eps=draw(st.sampled_from([1e-6, 1e-5])), rope_theta=draw(st.sampled_from([1e4, 5e5])),
                     rope_scaling=draw(rope_scalings()), partial_rotary_factor=partial,
                     max_seq_len=draw(st.sampled_from([12, 64])),   # 12: dynamic NTK's window runs past it
                     tie_word_embeddings=draw(st.booleans()), attention_bias=draw(st.booleans()),
                     attention_out_bias=draw(st.booleans()), mlp_bias=draw(st.booleans()))


def random_params(args: ModelArgs, seed: int, c: float = 1.0) -> dict[str, np.ndarray]:
    """Weights with O(1) activations at any width: matrices ~ N(0, c^2 / fan_in), embeddings ~
    N(0, 1), norm gains ~ 1 + N(0, 0.1^2), biases ~ N(0, 0.1^2)."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in param_shapes(args).items():
        if name.endswith("norm.weight"):
            params[name] = 1 + 0.1 * rng.standard_normal(shape)
        elif name.endswith(".bias"):
            params[name] = 0.1 * rng.standard_normal(shape)
        elif name == "tok_embeddings.weight":
            params[name] = rng.standard_normal(shape)
        else:
            params[name] = rng.standard_normal(shape) * c / math.sqrt(shape[1])
    return params


def valid_config(args: ModelArgs) -> bool:
    try:
        npllama.rope_scaling.rope_init(args, 1)
        return True
    except npllama.ConfigError:
        return False


impls = st.sampled_from(["naive", "flash", "sdpa", "auto"])


@settings(max_examples=100, deadline=None)
@given(configs(), st.sampled_from(DTYPES), impls, st.integers(1, 2), st.integers(1, 20),
       st.sampled_from([0.5, 1.0]), st.integers(0, 2**32 - 1))
def test_every_op_matches_npllama_float64(args, dtype, impl, batch, seq, c, seed):
    """Uncached: the output of every op of every layer, within the dtype's end-to-end tolerance."""
    assume(valid_config(args) and seq <= context_window(args))     # a call without a cache stays in the window
    model = Transformer(args, random_params(args, seed, c), dtype=dtype)
    ids = np.random.default_rng(seed).integers(0, args.vocab_size, (batch, seq))
    report = parity_report(model, ids, attention=impl)
    assert len(report.rows) == 3 + 10 * args.n_layers            # every op traced, by both
    assert report.ok, format_table(report)


@settings(max_examples=80, deadline=None)
@given(configs(), st.sampled_from(DTYPES), impls, st.integers(2, 20), st.data())
def test_cached_chunks_match_npllama_cached(args, dtype, impl, seq, data):
    """Cached: prompt chunks and single-token steps give npllama's logits and cache contents."""
    assume(valid_config(args))
    seed = data.draw(st.integers(0, 2**32 - 1))
    cuts = sorted(set(data.draw(st.lists(st.integers(1, seq - 1), max_size=4))))
    model = Transformer(args, random_params(args, seed), dtype=dtype)
    reference = reference_of(model)
    ids = np.random.default_rng(seed).integers(0, args.vocab_size, (2, seq))
    ours, theirs = model.new_cache(2, max_seq_len=seq + 1), reference.new_cache(2, max_seq_len=seq + 1)
    rtol = parity_rtol(dtype, "model", torch.float32)
    with torch.no_grad():
        for a, b in zip([0] + cuts, cuts + [seq]):
            got = model(ids[:, a:b], cache=ours, attention=impl)
            want = reference(ids[:, a:b], cache=theirs, attention="naive")
            assert got.shape == want.shape and got.dtype == torch.float32
            assert rel_err(got, want) <= rtol, (a, b)
    assert ours.length == theirs.length == seq
    for layer in range(args.n_layers):
        for mine, ref in ((ours.k[layer], theirs.k[layer]), (ours.v[layer], theirs.v[layer])):
            assert rel_err(mine[:, :, :seq], ref[:, :, :seq]) <= parity_rtol(dtype, "model")


@settings(max_examples=10, deadline=None)
@given(configs(max_layers=2), st.integers(3, 16), st.integers(0, 2**32 - 1))
def test_cached_equals_uncached_in_torch(args, seq, seed):
    """Within the Torch backend: one pass == prefill + one token at a time (static cache)."""
    assume(valid_config(args) and seq <= args.max_seq_len)
    model = Transformer(args, random_params(args, seed), dtype=torch.float64)
    ids = np.random.default_rng(seed).integers(0, args.vocab_size, (1, seq))
    cache = model.new_cache(1, max_seq_len=seq)
    with torch.no_grad():
        full = model(ids)
        steps = [model(ids[:, :2], cache=cache)] + [model(ids[:, i:i + 1], cache=cache) for i in range(2, seq)]
    assert rel_err(torch.cat(steps, dim=1), full.numpy()) <= 1e-6    # float32 logits, same float64 maths


# ------------------------------------------------------------------------------ weights
def test_state_dict_is_npllamas_and_round_trips():
    args = ModelArgs(dim=24, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=40, hidden_dim=40,
                     attention_bias=True, attention_out_bias=False, mlp_bias=True, max_seq_len=32)
    np_model = NumpyTransformer(args, random_params(args, 0))
    model = parity.from_numpy(np_model)
    sd, want = model.state_dict(), np_model.state_dict()
    assert set(sd) == set(want) == set(param_shapes(args))
    for name, value in want.items():
        assert sd[name].dtype == torch.float32 and np.array_equal(sd[name].numpy(), value), name
    # the parameters autograd sees carry the checkpoint names; load_state_dict takes them back
    assert {n for n, _ in model.named_parameters()} == set(param_shapes(args))
    other = Transformer(args, random_params(args, 1))
    other.load_state_dict(sd)
    assert all(torch.equal(a, b) for a, b in zip(other.parameters(), model.parameters()))
    assert model.num_parameters() == np_model.num_parameters()


def test_tied_model_has_one_embedding_table():
    args = ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=30, hidden_dim=16,
                     tie_word_embeddings=True)
    model = Transformer(args, random_params(args, 0))
    assert "output.weight" not in model.state_dict()
    assert model.output_weight is model.tok_embeddings.weight


@pytest.mark.parametrize("dtype", ["bfloat16", torch.float16, "float64"])
def test_load_reads_npllama_checkpoints_in_any_dtype(tmp_path, dtype):
    """parity.load(path) == parity.from_numpy(npllama.load(path)), and matches transformers."""
    from tiny import hf_logits, random_llama, save_hf, tiny_config

    hf = random_llama(tiny_config(n_heads=4, n_kv_heads=2, n_layers=2, tied=False, bias=True), seed=3)
    save_hf(hf, tmp_path)
    model = parity.load(tmp_path, dtype=dtype, progress=False)
    assert model.dtype == parity.resolve_dtype(dtype) and model.device.type == "cpu"
    twin = parity.from_numpy(npllama.load(tmp_path, progress=False), dtype=dtype)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    ids = np.random.default_rng(0).integers(0, 300, (2, 9))
    with torch.no_grad():
        logits = model(ids)
    assert logits.shape == (2, 9, 300) and logits.dtype == torch.float32
    want = hf_logits(hf, ids)
    # transformers evaluates the float32 weights; ours are rounded to dtype, hence the wider bar:
    # the weights' own rounding (half an ulp each) passes through ~2 layers like the arithmetic's.
    assert rel_err(logits, want) <= 4 * parity_rtol(dtype, "model", torch.float32)


def test_bad_dtype_and_device_are_input_errors():
    with pytest.raises(InputError, match="unsupported dtype 'int8'"):
        parity.resolve_dtype("int8")
    with pytest.raises(InputError, match="unknown device"):
        parity.resolve_device("gpu:x")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="sees no CUDA GPU"):
            parity.resolve_device("cuda")


def test_bad_ids_and_caches_are_input_errors():
    args = ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=10, hidden_dim=8, max_seq_len=8)
    model = Transformer(args, random_params(args, 0))
    with pytest.raises(InputError, match="token id 10 lies outside the vocabulary"):
        model([[1, 10]])
    with pytest.raises(InputError, match="token id -1"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(InputError, match="non-empty"):
        model(np.zeros((1, 0), np.int64))
    with pytest.raises(InputError, match="integers"):
        model(torch.tensor([[1.0, 2.0]]))
    with pytest.raises(InputError, match="unknown attention implementation 'fast'"):
        model([[1, 2]], attention="fast")
    cache = model.new_cache(1)
    assert cache.max_seq_len == 8
    with pytest.raises(InputError, match="the cache holds 1 sequences but ids has 2 rows"):
        model([[1], [2]], cache=cache)
    model([[1] * 6], cache=cache)
    with pytest.raises(InputError, match="9 positions exceed the cache's 8"):
        model([[1] * 3], cache=cache)


# ------------------------------------------------------------------------------ training-ready
def test_loss_is_npllamas_and_its_gradient_is_the_derivative():
    """loss == npllama's loss; backward reaches every parameter; and d loss along a random
    direction equals the central difference, so forward is differentiable as written.

    The logits are float32 by contract (even from a float64 model), so the difference quotient
    carries float32 rounding of the loss over 2 eps: eps 1e-3 keeps that near 1e-4."""
    args = ModelArgs(dim=16, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=20, hidden_dim=24,
                     attention_bias=True, attention_out_bias=True, mlp_bias=True, max_seq_len=16)
    params = random_params(args, 4)
    model = Transformer(args, params, dtype=torch.float64, requires_grad=True)
    ids = np.random.default_rng(1).integers(0, 20, (2, 7))
    labels = ids.copy()
    labels[0, 3] = -100
    loss = model.loss(ids, labels)
    want = NumpyTransformer(args, params, dtype=np.float64).loss(ids, labels)
    assert abs(loss.item() - want) <= parity_rtol(torch.float32, "op") * abs(want)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values()), \
        [n for n, g in grads.items() if g is None or g.abs().sum() == 0]
    rng = torch.Generator().manual_seed(0)
    direction = {n: torch.randn(p.shape, generator=rng, dtype=torch.float64) for n, p in model.named_parameters()}
    analytic = sum((grads[n] * d).sum() for n, d in direction.items())
    eps = 1e-3

    def loss_at(step):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.add_(step * direction[n])
            value = float(model.loss(ids, labels))
            for n, p in model.named_parameters():
                p.sub_(step * direction[n])
        return value

    numeric = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    assert abs(float(analytic) - numeric) <= 2e-3 * max(1.0, abs(numeric))


def test_loaded_model_does_not_track_gradients_until_asked():
    args = ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=10, hidden_dim=8)
    model = Transformer(args, random_params(args, 0))
    assert not any(p.requires_grad for p in model.parameters())
    assert model([[1, 2]]).numpy().shape == (1, 2, 10)            # .numpy() works: no graph
    model.requires_grad_()
    assert model([[1, 2]]).requires_grad


# ------------------------------------------------------------------------------ generation
sampling_settings = st.sampled_from([SamplingSettings(), SamplingSettings(0.7), SamplingSettings(1.0, 5),
                                     SamplingSettings(1.3, 0, 0.8), SamplingSettings(0.9, 20, 0.95)])


@settings(max_examples=40, deadline=None)
@given(configs(max_layers=2), sampling_settings, st.integers(0, 1000), st.integers(1, 6),
       st.sampled_from([torch.float32, torch.float64]))
def test_generate_gives_npllamas_tokens(args, sampling, seed, prompt_len, dtype):
    """The same prompt, settings and seed give the same tokens in both backends."""
    assume(valid_config(args) and prompt_len < args.max_seq_len)
    params = random_params(args, seed)
    np_model = NumpyTransformer(args, params)
    model = Transformer(args, params, dtype=dtype)
    prompt = np.random.default_rng(seed).integers(0, args.vocab_size, prompt_len).tolist()
    n = min(10, args.max_seq_len - prompt_len)
    want = list(np_generate(np_model, prompt, n, sampling, seed, stop_ids=()))
    got = list(torch_generate(model, prompt, n, sampling, seed, stop_ids=()))
    assert got == want


def test_generate_stops_and_continues_a_cache_like_npllama():
    args = ModelArgs(dim=24, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=12, hidden_dim=24, max_seq_len=40)
    params = random_params(args, 7)
    np_model, model = NumpyTransformer(args, params), Transformer(args, params)
    sampling = SamplingSettings(1.0)
    for stops in ((), (3, 5)):
        want = list(np_generate(np_model, [1, 2, 3], 30, sampling, 11, stop_ids=stops))
        assert list(torch_generate(model, [1, 2, 3], 30, sampling, 11, stop_ids=stops)) == want
    # continuing a sequence held in a cache (as chat does)
    np_cache, cache = np_model.new_cache(1), model.new_cache(1, max_seq_len=40)
    for turn in ([1, 2], [4, 5, 6]):
        want = list(np_generate(np_model, turn, 5, sampling, 3, stop_ids=(), cache=np_cache))
        assert list(torch_generate(model, turn, 5, sampling, 3, stop_ids=(), cache=cache)) == want
        assert cache.length == np_cache.length
    with pytest.raises(InputError, match="longer than the context window"):
        list(torch_generate(model, [1] * 41, 3))


# ------------------------------------------------------------------------------ the default model
@functools.cache
def default_pair():
    """The default model in both backends, loaded once per process (test_report.py shares it)."""
    np_model = npllama.load(progress=False)
    return np_model, parity.from_numpy(np_model)


@pytest.fixture
def default_models():
    return default_pair()


@pytest.mark.slow
@pytest.mark.parametrize("sampling, seed", [(SamplingSettings(), None), (SamplingSettings(0.8, 40, 0.95), 7),
                                            (SamplingSettings(1.2), 2024)])
def test_default_model_generates_the_same_tokens(default_models, sampling, seed):
    np_model, model = default_models
    prompt = np_model.tokenizer.encode("Once upon a time")
    want = list(np_generate(np_model, prompt, 12, sampling, seed))
    got = list(torch_generate(model, prompt, 12, sampling, seed))
    assert got == want and len(got) == 12


# ------------------------------------------------------------------------------ CUDA
@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_matches_npllama(dtype):
    args = ModelArgs(dim=64, n_layers=3, n_heads=8, n_kv_heads=2, vocab_size=100, hidden_dim=128, max_seq_len=64,
                     rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    model = Transformer(args, random_params(args, 0), dtype=dtype, device="cuda")
    ids = np.random.default_rng(0).integers(0, 100, (2, 33))
    for impl in ("naive", "flash", "sdpa"):
        report = parity_report(model, ids, attention=impl)
        assert report.ok, format_table(report)


@cuda
@pytest.mark.cuda
def test_cuda_generates_npllamas_tokens():
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, hidden_dim=64, max_seq_len=64)
    params = random_params(args, 1)
    np_model, model = NumpyTransformer(args, params), Transformer(args, params, device="cuda")
    for sampling, seed in ((SamplingSettings(), None), (SamplingSettings(0.9, 10, 0.9), 5)):
        want = list(np_generate(np_model, [1, 2, 3], 20, sampling, seed, stop_ids=()))
        assert list(torch_generate(model, [1, 2, 3], 20, sampling, seed, stop_ids=())) == want


def test_the_twin_generates_to_the_same_window_under_dynamic_ntk():
    """Without a cache, both backends stop at the context window that dynamic NTK extends
    (factor x max_seq_len), not at max_seq_len."""
    args = ModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=30, hidden_dim=24, max_seq_len=8,
                     rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    np_model = NumpyTransformer(args, random_params(args, 0))
    model = parity.from_numpy(np_model)
    want = list(np_generate(np_model, [1, 2, 3], 100, SamplingSettings(), 0, stop_ids=()))
    with torch.no_grad():
        got = list(torch_generate(model, [1, 2, 3], 100, SamplingSettings(), 0, stop_ids=()))
    assert len(want) == context_window(args) - 3 + 1 == 14      # the last token is never fed back
    assert got == want
    from parity.fast import fast_generate                        # the fast path holds the trained length
    with torch.no_grad():
        fast = fast_generate(model, [[1, 2, 3]], 100, SamplingSettings(), 0, stop_ids=())[0]
    assert len(fast) == args.max_seq_len - 3 + 1 == 6
    with pytest.raises(InputError, match="longer than the 8 the fast path holds \\(the trained length\\)"):
        fast_generate(model, [list(range(1, 10))], 4)
