"""Rotary embedding variants against transformers, NumPy against Torch, and whole tiny models.

transformers 5.x is the oracle: its rope init functions (``modeling_rope_utils.ROPE_INIT_FUNCTIONS``
and ``LlamaRotaryEmbedding.compute_default_rope_parameters``), its rotary module with its
``dynamic_rope_update`` and its ``apply_rotary_pos_emb``. Llama's module and rotation cover a
whole rotated head; for partial rotary the oracle is Phi-3's (same module, but its default table
and its rotation honour ``partial_rotary_factor``), run on the same LlamaConfig.

Configs are written as config.json dicts in both styles transformers reads, the newer
``rope_parameters`` (v5) and the older top-level ``rope_theta`` + ``rope_scaling`` with ``type``
(v4), and each is parsed by both sides: ModelArgs.from_hf and LlamaConfig.from_dict.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from hypothesis import assume, example, given, settings, strategies as st
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS as HF_ROPE_INIT_FUNCTIONS
from transformers.models.llama import modeling_llama as hf_llama
from transformers.models.phi3 import modeling_phi3 as hf_phi3

import npllama
import npllama.rope as nr
import npllama.rope_scaling as nrs
import parity.rope as pr
from npllama import tolerances as tol
from npllama.config import ModelArgs
from npllama.errors import ConfigError
from npllama.model import Transformer
from npllama.formats.hf import args_from_config
from npllama.formats.names import rename
from npllama.formats.meta import args_from_params
from npllama.formats.gguf import args_from_metadata

VARIANTS = ["default", "linear", "dynamic", "llama3", "yarn"]


# ------------------------------------------------------------------------------ helpers
def rel_err(a, b) -> float:
    """Norm-relative error max|a - b| / max|b| (see npllama/tolerances.py)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), np.finfo(np.float64).tiny))


def hf_config_dict(rope: dict, *, head_dim: int, theta: float, max_pos: int, partial: float = 1.0,
                   style: str = "v5", n_heads: int = 2, n_kv_heads: int = 1, n_layers: int = 1,
                   vocab: int = 32, hidden: int | None = None, init_range: float = 0.02) -> dict:
    """A LlamaForCausalLM config.json with the rope given as {"rope_type": name, **params}."""
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
           "hidden_size": hidden or head_dim * n_heads, "num_attention_heads": n_heads,
           "num_key_value_heads": n_kv_heads, "head_dim": head_dim, "num_hidden_layers": n_layers,
           "intermediate_size": 48, "vocab_size": vocab, "max_position_embeddings": max_pos,
           "rms_norm_eps": 1e-5, "initializer_range": init_range, "tie_word_embeddings": False}
    return with_rope(cfg, rope, theta, partial, style)


def with_rope(cfg: dict, rope: dict, theta: float, partial: float, style: str) -> dict:
    """cfg with the rope written in one of the two config.json styles."""
    cfg = {k: v for k, v in cfg.items() if k not in ("rope_parameters", "rope_scaling", "rope_theta",
                                                     "partial_rotary_factor")}
    rope = copy.deepcopy(rope)
    if style == "v5":    # transformers 5: one dict holds everything rotary
        cfg["rope_parameters"] = {"rope_theta": theta, **rope}
        if partial != 1.0:
            cfg["rope_parameters"]["partial_rotary_factor"] = partial
    else:                # transformers 4: rope_theta on top, rope_scaling {"type": ...} or null
        name = rope.pop("rope_type")
        cfg["rope_theta"] = theta
        cfg["rope_scaling"] = None if name == "default" else {"type": name, **rope}
        if partial != 1.0:
            cfg["partial_rotary_factor"] = partial
    return cfg


def hf_config(cfg: dict) -> LlamaConfig:
    return LlamaConfig.from_dict(copy.deepcopy(cfg))


def hf_inv_freq(name: str, config: LlamaConfig, seq_len: int, partial: float) -> tuple[np.ndarray, float]:
    """transformers' table: its init function for the variant (the default one lives on the module)."""
    if name == "default":
        module = hf_phi3.Phi3RotaryEmbedding if partial != 1.0 else hf_llama.LlamaRotaryEmbedding
        inv, scale = module.compute_default_rope_parameters(config)
    else:
        inv, scale = HF_ROPE_INIT_FUNCTIONS[name](config, None, seq_len=seq_len)
    return inv.double().numpy(), float(scale)


def table_close(ours: np.ndarray, theirs: np.ndarray, rope: dict) -> bool:
    """Elementwise: each frequency within transformers' float32 rounding (npllama/tolerances.py)."""
    cond = 1.0
    if rope.get("rope_type") == "yarn":
        cond = max(1.0, float(rope.get("factor") or 1.0))
    elif rope.get("rope_type") == "llama3":
        low, high = rope["low_freq_factor"], rope["high_freq_factor"]
        cond = max(1.0, rope["factor"] * high / (high - low))
    rtol = tol.ROPE_TABLE_VS_TRANSFORMERS_RTOL * (1 + np.abs(np.log(ours))) * cond
    return bool(np.all(np.abs(ours - theirs) <= rtol * ours))


def hf_rotate(config: LlamaConfig, partial: float, q: np.ndarray, k: np.ndarray, positions: np.ndarray):
    """transformers' rotary module (fresh) + apply_rotary_pos_emb on (batch, heads, seq, head_dim) float32."""
    lib = hf_phi3 if partial != 1.0 else hf_llama
    module = (lib.Phi3RotaryEmbedding if partial != 1.0 else lib.LlamaRotaryEmbedding)(config)
    qt, kt = torch.from_numpy(q), torch.from_numpy(k)
    pos = torch.from_numpy(positions)[None].expand(q.shape[0], -1)
    cos, sin = module(qt, pos)
    q_out, k_out = lib.apply_rotary_pos_emb(qt, kt, cos, sin)
    return q_out.numpy(), k_out.numpy(), cos[0].numpy(), sin[0].numpy()


def np_rotate(args: ModelArgs, x: np.ndarray, positions: np.ndarray, dtype=np.float32):
    inv, scale = nrs.rope_init(args, int(positions.max()) + 1)
    cos, sin = nr.rope_cos_sin(inv, positions, scale, dtype)
    return nr.apply_rotary_emb(x, cos, sin), cos, sin


# ------------------------------------------------------------------------------ strategies
@st.composite
def rope_setups(draw, variants=tuple(VARIANTS)):
    """(rope dict, head_dim, theta, max_pos, partial): what a checkpoint's config may say."""
    name = draw(st.sampled_from(variants))
    head_dim = 2 * draw(st.integers(2, 128))                                    # 4 .. 256
    partial = draw(st.sampled_from([1.0, 1.0, 1.0, 0.5, 0.25, 0.75]))
    rot = int(head_dim * partial)
    assume(rot >= 4 and rot % 2 == 0)
    # small bases too: only there does YaRN's ramp reach its clip at dim - 1
    theta = draw(st.sampled_from([10000.0, 500000.0, 1e6, 100.0]) | st.floats(10.0, 1e7))
    max_pos = draw(st.integers(16, 4096))
    factor = draw(st.floats(1.0, 64.0))
    rope: dict = {"rope_type": name}
    if name in ("linear", "dynamic"):
        rope["factor"] = factor
    elif name == "llama3":
        low = draw(st.floats(0.5, 2.0))
        rope.update(factor=factor, low_freq_factor=low, high_freq_factor=low + draw(st.floats(0.5, 8.0)),
                    original_max_position_embeddings=draw(st.integers(8, max_pos)))
    elif name == "yarn":
        rope.update(factor=factor, original_max_position_embeddings=draw(st.integers(8, max_pos)))
        if draw(st.booleans()):
            rope.update(beta_fast=draw(st.floats(4.0, 64.0)), beta_slow=draw(st.floats(0.25, 4.0)))
        extra = draw(st.sampled_from(["none", "attention_factor", "mscale", "truncate"]))
        if extra == "attention_factor":
            rope["attention_factor"] = draw(st.floats(0.5, 2.0))
        elif extra == "mscale":
            rope.update(mscale=draw(st.floats(0.5, 2.0)), mscale_all_dim=draw(st.floats(0.5, 2.0)))
        elif extra == "truncate":
            rope["truncate"] = draw(st.booleans())
    return rope, head_dim, theta, max_pos, partial


# ------------------------------------------------------------------------------ the table
@settings(max_examples=120, deadline=None)
@given(rope_setups(), st.sampled_from(["v5", "v4"]), st.integers(1, 20000))
@example(({"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096}, 64, 100.0, 8192, 1.0),
         "v5", 1)    # YaRN's high end clipped to dim - 1
def test_inv_freq_and_attention_scaling_match_transformers(setup, style, seq_len):
    rope, head_dim, theta, max_pos, partial = setup
    cfg = hf_config_dict(rope, head_dim=head_dim, theta=theta, max_pos=max_pos, partial=partial, style=style)
    args = args_from_config(cfg)
    assert args.rope_type == rope["rope_type"] and args.rotary_dim == int(head_dim * partial)
    ours, scale = nrs.rope_init(args, seq_len)
    theirs, their_scale = hf_inv_freq(rope["rope_type"], hf_config(cfg), seq_len, partial)
    assert ours.dtype == np.float64 and ours.shape == theirs.shape == (args.rotary_dim // 2,)
    # elementwise: every frequency, the smallest included, to float32 rounding of transformers' table
    assert table_close(ours, theirs, rope)
    assert scale == pytest.approx(their_scale, rel=1e-12)


@settings(max_examples=60, deadline=None)
@given(rope_setups(), st.sampled_from(["v5", "v4"]), st.data())
def test_rotated_qk_match_transformers_rotary_module(setup, style, data):
    rope, head_dim, theta, max_pos, partial = setup
    cfg = hf_config_dict(rope, head_dim=head_dim, theta=theta, max_pos=max_pos, partial=partial, style=style)
    args = args_from_config(cfg)
    seq = data.draw(st.integers(1, 12), label="seq")
    start = data.draw(st.integers(0, 2 * max_pos), label="start")
    positions = np.arange(start, start + seq)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    q = rng.standard_normal((2, 2, seq, head_dim)).astype(np.float32)
    k = rng.standard_normal((2, 1, seq, head_dim)).astype(np.float32)

    hq, hk, hcos, hsin = hf_rotate(hf_config(cfg), partial, q, k, positions)
    nq, cos, sin = np_rotate(args, q, positions)
    nk = nr.apply_rotary_emb(k, cos, sin)

    # the rotation itself (layout, partial pass-through) given the same cos/sin: exact up to float32
    same_q, _, _, _ = hf_rotate_with(partial, q, k, cos, sin)
    assert rel_err(nq, same_q) <= tol.ROPE_PARITY_RTOL[np.dtype(np.float32)]
    # the angles: transformers forms m * theta in float32, so allow that rounding, scaled by the angle
    inv_freq, scale = nrs.rope_init(args, start + seq)
    max_angle = float(positions.max()) * float(inv_freq.max())
    angle_tol = tol.ROPE_ANGLE_VS_TRANSFORMERS_RTOL * max_angle + tol.ROPE_PARITY_RTOL[np.dtype(np.float32)]
    assert np.abs(cos - hcos).max() <= angle_tol * scale
    assert np.abs(sin - hsin).max() <= angle_tol * scale
    for ours, theirs, x in ((nq, hq, q), (nk, hk, k)):
        assert np.abs(ours - theirs).max() <= 2 * angle_tol * scale * np.abs(x).max()


def hf_rotate_with(partial, q, k, cos, sin):
    """transformers' apply_rotary_pos_emb with npllama's cos/sin: isolates the rotation."""
    lib = hf_phi3 if partial != 1.0 else hf_llama
    c, s = torch.from_numpy(cos)[None], torch.from_numpy(sin)[None]
    q_out, k_out = lib.apply_rotary_pos_emb(torch.from_numpy(q), torch.from_numpy(k), c, s)
    return q_out.numpy(), k_out.numpy(), c, s


# ------------------------------------------------------------------------------ NumPy vs Torch
@settings(max_examples=60, deadline=None)
@given(rope_setups(), st.sampled_from([np.float32, np.float64]), st.integers(0, 20000),
       st.integers(1, 16), st.integers(0, 2**32 - 1))
def test_numpy_and_torch_rope_agree(setup, dtype, start, seq, seed):
    rope, head_dim, theta, max_pos, partial = setup
    args = args_from_config(hf_config_dict(rope, head_dim=head_dim, theta=theta, max_pos=max_pos,
                                            partial=partial))
    dtype = np.dtype(dtype)
    rtol = tol.ROPE_PARITY_RTOL[dtype]
    tdtype = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}[dtype]
    positions = np.arange(start, start + seq)

    inv_np, scale_np = nrs.rope_init(args, start + seq)
    inv_t, scale_t = pr.rope_init(args, start + seq)
    # one table, built once in float64, shared: bit-identical
    assert inv_t.dtype == torch.float64 and np.array_equal(inv_t.numpy(), inv_np) and scale_t == scale_np

    cos_np, sin_np = nr.rope_cos_sin(inv_np, positions, scale_np, dtype)
    cos_t, sin_t = pr.rope_cos_sin(inv_t, torch.from_numpy(positions), scale_t, tdtype)
    assert cos_np.dtype == dtype and cos_t.dtype == tdtype and cos_t.shape == (seq, args.rotary_dim)
    assert rel_err(cos_t.numpy(), cos_np) <= rtol and rel_err(sin_t.numpy(), sin_np) <= rtol

    x = np.random.default_rng(seed).standard_normal((2, 3, seq, head_dim)).astype(dtype)
    out_np = nr.apply_rotary_emb(x, cos_np, sin_np)
    out_t = pr.apply_rotary_emb(torch.from_numpy(x), cos_t, sin_t)
    assert out_t.dtype == tdtype and rel_err(out_t.numpy(), out_np) <= rtol
    assert np.array_equal(out_np[..., args.rotary_dim:], x[..., args.rotary_dim:])   # pass-through
    assert np.array_equal(pr.rotate_half(torch.from_numpy(x)).numpy(), nr.rotate_half(x))


def test_parity_shares_npllamas_registry():
    assert pr.ROPE_INIT_FUNCTIONS is nrs.ROPE_INIT_FUNCTIONS and pr.register is nrs.register
    assert set(VARIANTS) <= set(nrs.ROPE_INIT_FUNCTIONS)


# ------------------------------------------------------------------------------ dynamic NTK
def small_args(rope: dict, *, max_pos: int = 32, head_dim: int = 16, theta: float = 10000.0) -> ModelArgs:
    return args_from_config(hf_config_dict(rope, head_dim=head_dim, theta=theta, max_pos=max_pos))


def test_dynamic_keeps_the_default_table_until_max_position_embeddings():
    args = small_args({"rope_type": "dynamic", "factor": 4.0}, max_pos=32)
    default = nr.default_inv_freq(args.rope_theta, args.rotary_dim)
    for seq_len in (1, 31, 32):
        assert np.array_equal(nrs.rope_init(args, seq_len)[0], default)
    tables = [nrs.rope_init(args, n)[0] for n in (33, 48, 64)]
    # past it the base grows with the length: every frequency but theta_0 = 1 falls, monotonically
    for shorter, longer in zip([default] + tables, tables):
        assert longer[0] == 1.0 and np.all(longer[1:] < shorter[1:])


def test_dynamic_stateful_corner_of_transformers():
    """transformers' module keeps the table of the longest length seen; npllama does not.

    Documented in rope_dynamic: after a call of length 48, a call of length 40 (still past
    max_position_embeddings=32) is rotated in transformers with the base for 48, in npllama with
    the base for 40. Below 32 transformers resets, and the two agree again. If this test fails
    because transformers changed, update the docstring and docs/rope.md.
    """
    cfg = hf_config_dict({"rope_type": "dynamic", "factor": 4.0}, head_dim=16, theta=10000.0, max_pos=32)
    args, module = args_from_config(cfg), hf_llama.LlamaRotaryEmbedding(hf_config(cfg))
    x = torch.zeros(1, 1)

    def hf_table(length):
        module(x, torch.arange(length)[None])
        return module.inv_freq.double().numpy()

    def close(a, b):
        return table_close(a, b, {"rope_type": "dynamic"})

    assert close(hf_table(48), nrs.rope_init(args, 48)[0])
    assert close(hf_table(40), nrs.rope_init(args, 48)[0])        # transformers kept the 48 table
    assert not close(nrs.rope_init(args, 40)[0], nrs.rope_init(args, 48)[0])
    assert close(hf_table(20), nrs.rope_init(args, 20)[0])        # reset below max_position_embeddings
    assert close(hf_table(40), nrs.rope_init(args, 40)[0])        # growing again: they agree


# ------------------------------------------------------------------------------ configs
LLAMA31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}


def test_meta_use_scaled_rope_is_llama3_of_llama31():
    meta = args_from_params({"dim": 4096, "n_layers": 1, "n_heads": 32, "n_kv_heads": 8,
                                "vocab_size": 128256, "multiple_of": 1024, "ffn_dim_multiplier": 1.3,
                                "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True})
    cfg = hf_config_dict(LLAMA31, head_dim=128, theta=500000.0, max_pos=131072, n_heads=32, hidden=4096)
    hf_args = args_from_config(cfg)
    assert meta.rope_scaling == hf_args.rope_scaling
    ours = nrs.rope_init(meta, 100)[0]
    theirs = hf_inv_freq("llama3", hf_config(cfg), 100, 1.0)[0]
    assert table_close(ours, theirs, LLAMA31)
    # the three bands are all there for the real model
    default = nr.default_inv_freq(500000.0, 128)
    assert (ours == default).sum() > 0 and np.isclose(ours, default / 8, rtol=1e-15).sum() > 0
    assert ((ours != default) & ~np.isclose(ours, default / 8, rtol=1e-15)).sum() > 0


def test_gguf_rope_scaling_keys():
    base = {"general.architecture": "llama", "llama.block_count": 1, "llama.attention.head_count": 4,
            "llama.embedding_length": 64, "llama.feed_forward_length": 96,
            "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.context_length": 4096,
            "llama.rope.freq_base": 10000.0}
    assert args_from_metadata(base, 100, False).rope_scaling == {"rope_type": "default"}
    lin = args_from_metadata({**base, "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}, 100, False)
    assert lin.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    yarn = args_from_metadata({**base, "llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0,
                                "llama.rope.scaling.original_context_length": 1024,
                                "llama.rope.scaling.yarn_beta_fast": 16.0,
                                "llama.rope.scaling.yarn_beta_slow": 2.0}, 100, False)
    assert yarn.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                                 "beta_fast": 16.0, "beta_slow": 2.0}
    nrs.rope_init(yarn, 10)


@pytest.mark.parametrize("name", ["llama3", "yarn"])
def test_original_max_position_embeddings_precedence_matches_transformers(name):
    """A top-level original_max_position_embeddings wins over the dict's (transformers re-reads it
    in every init function via standardize_rope_params); absent both, max_position_embeddings."""
    rope = {"rope_type": name, "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    if name == "yarn":
        rope = {"rope_type": name, "factor": 4.0}
    for extra_in_dict, top in ((None, None), (64, None), (None, 48), (64, 48)):
        r = dict(rope) if extra_in_dict is None else {**rope, "original_max_position_embeddings": extra_in_dict}
        for style in ("v5", "v4"):
            cfg = hf_config_dict(r, head_dim=32, theta=10000.0, max_pos=256, style=style)
            if top is not None:
                cfg["original_max_position_embeddings"] = top
            args = args_from_config(cfg)
            expect = top or extra_in_dict or 256
            assert nrs.rope_param(args, "original_max_position_embeddings", 256) == expect
            theirs = hf_inv_freq(name, hf_config(cfg), 1, 1.0)[0]
            assert table_close(nrs.rope_init(args, 1)[0], theirs, r)


def test_rope_type_wins_over_type_and_rope_scaling_over_rope_parameters():
    args = args_from_config({**hf_config_dict({"rope_type": "default"}, head_dim=8, theta=1e4, max_pos=32),
                              "rope_scaling": {"type": "dynamic", "rope_type": "linear", "factor": 2.0}})
    assert args.rope_scaling == {"rope_type": "linear", "factor": 2.0}


def test_unknown_rope_type_lists_the_known_ones():
    args = small_args({"rope_type": "longrope2", "factor": 2.0})
    with pytest.raises(ConfigError) as err:
        nrs.rope_init(args, 1)
    for name in VARIANTS:
        assert name in str(err.value)
    assert "longrope2" in str(err.value) and "register" in str(err.value)


@pytest.mark.parametrize("rope, key", [({"rope_type": "linear"}, "factor"),
                                       ({"rope_type": "dynamic"}, "factor"),
                                       ({"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0}, "low_freq_factor"),
                                       ({"rope_type": "linear", "factor": "big"}, "factor"),
                                       ({"rope_type": "linear", "factor": -2.0}, "factor")])
def test_missing_or_bad_parameter_is_named(rope, key):
    with pytest.raises(ConfigError, match=key):
        nrs.rope_init(small_args(rope), 1)


def test_dynamic_needs_rotary_dim_above_two():
    args = ModelArgs(dim=8, n_layers=1, n_heads=4, n_kv_heads=4, vocab_size=8, hidden_dim=8,
                     rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ConfigError, match="rotary"):
        nrs.rope_init(args, 1)


def test_register_guards():
    with pytest.raises(ConfigError, match="already registered"):
        nrs.register("linear")(lambda args, seq_len: (None, 1.0))
    assert nrs.ROPE_INIT_FUNCTIONS["linear"] is nrs.rope_linear

    @nrs.register("test_wrong_shape")
    def wrong(args, seq_len):
        return np.ones(3), 1.0
    try:
        with pytest.raises(ConfigError, match="shape"):
            nrs.rope_init(small_args({"rope_type": "test_wrong_shape"}), 1)
    finally:
        del nrs.ROPE_INIT_FUNCTIONS["test_wrong_shape"]


# ------------------------------------------------------------------------------ whole tiny models
# head_dim 16, theta 1e4: wavelengths 6.3, 20, 63, 200, ... so with an original context of 32 the
# llama3 bands (keep < 8 <= blend <= 32 < divide) and the YaRN ramp all hold some frequencies.
TINY = dict(head_dim=16, theta=10000.0, n_heads=4, n_kv_heads=2, n_layers=2, vocab=96, hidden=48,
            init_range=0.25)
MODEL_ROPES = {
    "default": ({"rope_type": "default"}, 32),
    "linear": ({"rope_type": "linear", "factor": 4.0}, 32),
    "dynamic": ({"rope_type": "dynamic", "factor": 4.0}, 32),
    "llama3": ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32}, 256),
    "yarn": ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}, 128),
}
PREFILL, TOTAL = 20, 48          # decoding runs from position 20 past 32 (max_pos / original context) to 47


def save_tiny(tmp_path, cfg: dict, seed: int = 0):
    """A random LlamaForCausalLM saved by transformers with exactly this config.json."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(hf_config(cfg)).eval()
    model.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg, indent=2))   # the style under test, verbatim
    return tmp_path


def load_npllama(path):
    """The folder transformers saved, through npllama's own loader."""
    return npllama.load(path, progress=False)


def hf_cached_logits(model, ids, prefill):
    """transformers' generate-style decoding: prefill, then one token per call with its cache."""
    with torch.no_grad():
        out = model(torch.from_numpy(ids[:, :prefill]), use_cache=True)
        logits, cache = [out.logits], out.cache
        for t in range(prefill, ids.shape[1]):
            out = model(torch.from_numpy(ids[:, t:t + 1]), cache=cache, use_cache=True)
            logits.append(out.logits)
            cache = out.cache
    return torch.cat(logits, dim=1).numpy()


def np_cached_logits(model, ids, prefill):
    """Prefill, then one token per call, in npllama or the Torch backend (same API)."""
    cache = model.new_cache(ids.shape[0], max_seq_len=ids.shape[1])   # past max_position_embeddings
    logits = [as_numpy(model(ids[:, :prefill], cache=cache))]
    for t in range(prefill, ids.shape[1]):
        logits.append(as_numpy(model(ids[:, t:t + 1], cache=cache)))
    return np.concatenate(logits, axis=1)


def full_pass(model, ids, **kwargs):
    """One forward pass over every column, past max_position_embeddings: a call without a cache is
    bounded by the context window, so the pass goes through a fresh cache sized for it (the same
    function: one call, positions 0..seq-1)."""
    return model(ids, cache=model.new_cache(ids.shape[0], max_seq_len=ids.shape[1]), **kwargs)


def as_numpy(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x


@pytest.mark.parametrize("style", ["v5", "v4"])
@pytest.mark.parametrize("name", VARIANTS)
def test_tiny_model_matches_transformers(tmp_path, name, style):
    rope, max_pos = MODEL_ROPES[name]
    cfg = hf_config_dict(rope, max_pos=max_pos, style=style, **TINY)
    path = save_tiny(tmp_path, cfg)
    ours = load_npllama(path)
    assert ours.config.rope_scaling == args_from_config(hf_config_dict(rope, max_pos=max_pos, **TINY)).rope_scaling
    ids = np.random.default_rng(1).integers(0, TINY["vocab"], (2, TOTAL))
    rtol = tol.ROPE_MODEL_VS_TRANSFORMERS_RTOL_FLOAT32

    theirs = LlamaForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    assert theirs.config.rope_parameters["rope_type"] == name
    with torch.no_grad():
        hf_full = theirs(torch.from_numpy(ids)).logits.numpy()
    np_full = full_pass(ours, ids)
    assert rel_err(np_full, hf_full) < rtol

    theirs = LlamaForCausalLM.from_pretrained(path, attn_implementation="eager").eval()   # fresh rope state
    hf_cached = hf_cached_logits(theirs, ids, PREFILL)
    np_cached = np_cached_logits(ours, ids, PREFILL)
    assert rel_err(np_cached, hf_cached) < rtol

    if name == "dynamic":
        # the documented semantics: cached keys keep their rotation, so once the base moves
        # (past position 32) cached decoding is not a full recompute, in either library
        assert rel_err(np_cached[:, :max_pos], np_full[:, :max_pos]) > 100 * rtol   # full pass: all use the 48 base
        assert rel_err(hf_cached, hf_full) > 100 * rtol
        assert rel_err(np_cached[:, -1], np_full[:, -1]) > 100 * rtol
    else:
        assert rel_err(np_cached, np_full) < rtol
    if name != "default":
        # the test has teeth: the same weights with the plain table are far off
        plain = Transformer(ours.config.replace(rope_scaling={"rope_type": "default"}), state_dict_of(ours))
        assert rel_err(full_pass(plain, ids), hf_full) > 100 * rtol

    # the Torch backend, same variant through the shared table
    torch_model = parity_transformer(ours)
    with torch.no_grad():
        assert rel_err(as_numpy(full_pass(torch_model, ids, attention="naive")), hf_full) < rtol
        assert rel_err(np_cached_logits(torch_model, ids, PREFILL), hf_cached) < rtol


@pytest.mark.parametrize("partial", [0.5, 0.25])
def test_tiny_partial_rotary_model_matches_phi3(partial):
    """Partial rotary through a whole model. Llama in transformers rotates whole heads, so the
    oracle is Phi-3 (RMSNorm, SwiGLU, the same attention; fused qkv and gate_up, split here)."""
    from transformers import Phi3Config, Phi3ForCausalLM
    n_heads, n_kv, hd, dim, hid, vocab = 4, 2, 16, 64, 48, 96
    cfg = {"hidden_size": dim, "num_attention_heads": n_heads, "num_key_value_heads": n_kv,
           "num_hidden_layers": 2, "intermediate_size": hid, "vocab_size": vocab,
           "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "initializer_range": 0.25,
           "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
           "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": partial}}
    torch.manual_seed(0)
    phi3 = Phi3ForCausalLM(Phi3Config(**copy.deepcopy(cfg))).eval()
    params = {}
    for name, value in phi3.state_dict().items():
        value = value.numpy()
        if "qkv_proj" in name:
            p = name.replace("model.layers.", "layers.").replace("self_attn.qkv_proj.weight", "attention.")
            q, k = n_heads * hd, n_kv * hd
            params[p + "wq.weight"], params[p + "wk.weight"], params[p + "wv.weight"] = \
                value[:q], value[q:q + k], value[q + k:]
        elif "gate_up_proj" in name:
            p = name.replace("model.layers.", "layers.").replace("mlp.gate_up_proj.weight", "feed_forward.")
            params[p + "w1.weight"], params[p + "w3.weight"] = value[:hid], value[hid:]
        else:
            params[rename(name, "hf", "meta")] = value
    args = args_from_config({**cfg, "head_dim": hd})
    assert args.rotary_dim == int(hd * partial)
    ours = Transformer(args, params)
    ids = np.random.default_rng(4).integers(0, vocab, (2, 40))
    with torch.no_grad():
        theirs = phi3(torch.from_numpy(ids)).logits.numpy()
    rtol = tol.ROPE_MODEL_VS_TRANSFORMERS_RTOL_FLOAT32
    assert rel_err(full_pass(ours, ids), theirs) < rtol
    assert rel_err(np_cached_logits(ours, ids, 7), theirs) < rtol
    # teeth: rotating whole heads instead misses by far more
    whole = Transformer(args.replace(partial_rotary_factor=1.0), params)
    assert rel_err(whole(ids), theirs) > 100 * rtol


def state_dict_of(model):
    return {k: np.array(v) for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------ a plug-in variant
def ntk_static_inv_freq(base, factor, dim, xp):
    """The table of the test plug-in, written once for both registries (npllama: float64 NumPy)."""
    base = base * factor ** (dim / (dim - 2))
    return 1.0 / (base ** (xp.arange(0, dim, 2, dtype=xp.float64) / dim))


@pytest.fixture
def ntk_static(monkeypatch):
    """Static NTK-aware scaling (bloc97, 2023: base * factor ** (d / (d-2)) at every length),
    registered from outside npllama with npllama.rope_scaling.register, and in transformers' own dict."""

    @nrs.register("test_ntk_static")
    def rope_ntk_static(args, seq_len):
        return ntk_static_inv_freq(args.rope_theta, nrs.rope_param(args, "factor"), args.rotary_dim, np), 1.0

    def hf_ntk_static(config, device=None, seq_len=None, layer_type=None):
        p = config.rope_parameters
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return ntk_static_inv_freq(p["rope_theta"], p["factor"], head_dim, torch).float(), 1.0

    monkeypatch.setitem(HF_ROPE_INIT_FUNCTIONS, "test_ntk_static", hf_ntk_static)
    yield "test_ntk_static"
    del nrs.ROPE_INIT_FUNCTIONS["test_ntk_static"]


def test_registered_variant_runs_in_both_backends(tmp_path, ntk_static):
    rope = {"rope_type": ntk_static, "factor": 8.0}
    cfg = hf_config_dict(rope, max_pos=32, **TINY)
    path = save_tiny(tmp_path, cfg)
    ours = load_npllama(path)
    assert ours.config.rope_type == ntk_static
    ids = np.random.default_rng(2).integers(0, TINY["vocab"], (1, 40))
    theirs = LlamaForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        hf_full = theirs(torch.from_numpy(ids)).logits.numpy()
    rtol = tol.ROPE_MODEL_VS_TRANSFORMERS_RTOL_FLOAT32
    assert rel_err(full_pass(ours, ids), hf_full) < rtol
    assert rel_err(np_cached_logits(ours, ids, 10), hf_full) < rtol

    # the Torch backend finds the same variant through the shared registry
    inv_t, scale_t = pr.rope_init(ours.config, 40)
    inv_np, scale_np = nrs.rope_init(ours.config, 40)
    assert np.array_equal(inv_t.numpy(), inv_np) and scale_t == scale_np
    positions = np.arange(40)
    x = np.random.default_rng(3).standard_normal((1, 4, 40, 16))
    out_np = nr.apply_rotary_emb(x, *nr.rope_cos_sin(inv_np, positions, scale_np, np.float64))
    out_t = pr.apply_rotary_emb(torch.from_numpy(x), *pr.rope_cos_sin(inv_t, torch.from_numpy(positions),
                                                                       scale_t, torch.float64))
    assert rel_err(out_t.numpy(), out_np) <= tol.ROPE_PARITY_RTOL[np.dtype(np.float64)]
    # and a whole Torch model runs with it
    torch_model = parity_transformer(ours)
    with torch.no_grad():
        assert rel_err(as_numpy(full_pass(torch_model, ids)), hf_full) < rtol
        assert rel_err(np_cached_logits(torch_model, ids, 10), hf_full) < rtol


def parity_transformer(np_model):
    """The Torch backend's model (parity/model.py) with the same weights, float32."""
    from parity.model import Transformer as TorchTransformer
    return TorchTransformer(np_model.config, state_dict_of(np_model))
