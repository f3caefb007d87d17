"""ModelArgs from each format's config, and the errors for impossible ones."""

import pytest

from npllama.errors import ConfigError
from npllama.formats.hf import args_from_config
from npllama.formats.meta import args_from_params, meta_hidden_dim

HF = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2,
      "vocab_size": 100, "intermediate_size": 128, "max_position_embeddings": 256, "rms_norm_eps": 1e-6}


def test_meta_hidden_dim_matches_published_models():
    assert meta_hidden_dim(4096, 256, None) == 11008           # Llama-2-7B
    assert meta_hidden_dim(4096, 1024, 1.3) == 14336           # Llama-3-8B
    assert meta_hidden_dim(8192, 4096, 1.3) == 28672           # Llama-2-70B


def test_hf_old_and_new_rope_styles_agree():
    old = args_from_config({**HF, "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 4.0}})
    new = args_from_config({**HF, "rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 5e5}})
    assert old == new
    assert old.rope_type == "linear" and old.rope_scaling["factor"] == 4.0 and old.rope_theta == 5e5
    assert old.head_dim == 8 and old.n_rep == 4


def test_hf_head_dim_may_differ_from_dim_over_heads():
    assert args_from_config({**HF, "head_dim": 24}).head_dim == 24


def test_meta_params():
    args = args_from_params({"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
                                "multiple_of": 1024, "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5,
                                "rope_theta": 500000.0, "use_scaled_rope": True})
    assert args.hidden_dim == 14336 and args.n_kv_heads == 8 and args.rope_type == "llama3"


@pytest.mark.parametrize("change, words", [
    ({"num_key_value_heads": 3}, "multiple of n_kv_heads"),
    ({"hidden_size": -64}, "'hidden_size' must be an integer >= 1"),
    ({"vocab_size": 0}, "vocab_size"),
    ({"rms_norm_eps": 0}, "norm_eps"),
    ({"num_hidden_layers": None}, "num_hidden_layers"),
    ({"intermediate_size": "wide"}, "intermediate_size"),
])
def test_impossible_configs_are_named(change, words):
    with pytest.raises(ConfigError, match=words):
        args_from_config({**HF, **change})


def test_missing_key_is_named():
    cfg = dict(HF)
    del cfg["vocab_size"]
    with pytest.raises(ConfigError, match="'vocab_size' is missing"):
        args_from_config(cfg)
