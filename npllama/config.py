"""The model's hyper-parameters: one dataclass, three ways to build it.

``ModelArgs`` (Meta's name for it) describes every LLaMA-family decoder npllama runs. It is
built from a Hugging Face ``config.json`` (:func:`ModelArgs.from_hf`), a Meta ``params.json``
(:func:`ModelArgs.from_meta`) or the metadata of a GGUF file (:func:`ModelArgs.from_gguf`).

Legend of dimension names used in docstrings across npllama:

    batch       sequences processed together
    seq         positions in this forward call (q_len)
    kv_len      positions visible to attention (cache + this call)
    dim         the residual stream width (hidden_size)
    n_heads     query heads;  n_kv_heads: key/value heads (MHA: equal, GQA: fewer, MQA: 1)
    head_dim    width of one head (may differ from dim / n_heads)
    hidden_dim  width of the SwiGLU MLP (intermediate_size)
    vocab       vocabulary size
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import ConfigError


@dataclass(frozen=True)
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    hidden_dim: int
    head_dim: int = 0  # 0 means dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # The rotary variant and its parameters, always with a "rope_type" key ("default", "linear",
    # "dynamic", "llama3", "yarn", or a name registered with npllama.rope.register).
    rope_scaling: Mapping[str, Any] = field(default_factory=lambda: {"rope_type": "default"})
    partial_rotary_factor: float = 1.0
    max_seq_len: int = 2048  # max_position_embeddings: the context window
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # biases on q, k, v (and o, see attention_out_bias)
    attention_out_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads if self.n_heads > 0 else 0)
        object.__setattr__(self, "rope_scaling", dict(self.rope_scaling))
        object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise ConfigError naming the first impossible value."""
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim",
                     "head_dim", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config: {name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"config: n_heads ({self.n_heads}) must be a multiple of n_kv_heads "
                f"({self.n_kv_heads}); each key/value head serves a whole group of query heads")
        if not (self.norm_eps > 0 and math.isfinite(self.norm_eps)):
            raise ConfigError(f"config: norm_eps must be a small positive number, got {self.norm_eps!r}")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ConfigError(f"config: rope_theta must be positive, got {self.rope_theta!r}")
        if not (0 < self.partial_rotary_factor <= 1):
            raise ConfigError(
                f"config: partial_rotary_factor must lie in (0, 1], got {self.partial_rotary_factor!r}")
        if self.rotary_dim % 2 or self.rotary_dim == 0:
            raise ConfigError(
                f"config: the rotated part of each head ({self.rotary_dim} = head_dim "
                f"{self.head_dim} x partial_rotary_factor) must be a positive even number")
        if "rope_type" not in self.rope_scaling:
            raise ConfigError("config: rope_scaling needs a 'rope_type' key")
        for name in ("bos_token_id",):
            value = getattr(self, name)
            if value is not None and not (0 <= value < self.vocab_size):
                raise ConfigError(f"config: {name}={value} lies outside the vocabulary (0..{self.vocab_size - 1})")

    # ------------------------------------------------------------ derived sizes
    @property
    def n_rep(self) -> int:
        """Query heads per key/value head (1: MHA; n_heads: MQA)."""
        return self.n_heads // self.n_kv_heads

    @property
    def rotary_dim(self) -> int:
        """How many leading channels of each head rotary embeddings rotate."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def rope_type(self) -> str:
        return str(self.rope_scaling["rope_type"])

    def replace(self, **changes: Any) -> "ModelArgs":
        return dataclasses.replace(self, **changes)

    # ---------------------------------------------------------- Hugging Face
    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> "ModelArgs":
        """From a transformers ``config.json`` (LlamaConfig and its relatives).

        Both rope styles are read: the older ``rope_theta`` + ``rope_scaling`` (with ``type`` or
        ``rope_type``) and the newer ``rope_parameters`` that holds ``rope_theta`` itself.
        """
        get = _getter(cfg, "config.json")
        n_heads = get("num_attention_heads", int)
        dim = get("hidden_size", int)
        params = cfg.get("rope_parameters")
        if params is not None and not isinstance(params, Mapping):
            raise ConfigError("config.json: rope_parameters must be an object")
        # As transformers' convert_rope_params_to_dict / standardize_rope_params: a non-empty
        # rope_scaling wins over rope_parameters; rope_theta and partial_rotary_factor inside the
        # dict win over the top-level keys; a top-level original_max_position_embeddings wins for
        # llama3 / yarn / longrope (Phi-3 style).
        params = cfg.get("rope_scaling") or params or {}
        if not isinstance(params, Mapping):
            raise ConfigError("config.json: rope_scaling must be an object or null")
        params = dict(params)
        theta = params.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = _normalise_rope_scaling(params, "config.json")
        partial = scaling.pop("partial_rotary_factor", None)
        partial = cfg.get("partial_rotary_factor", 1.0) if partial is None else partial
        if scaling["rope_type"] in ("llama3", "yarn", "longrope") and \
                cfg.get("original_max_position_embeddings") is not None:
            scaling["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
        eos = cfg.get("eos_token_id")
        eos = () if eos is None else (tuple(eos) if isinstance(eos, (list, tuple)) else (eos,))
        attention_bias = bool(cfg.get("attention_bias", False))
        return cls(
            dim=dim,
            n_layers=get("num_hidden_layers", int),
            n_heads=n_heads,
            n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            vocab_size=get("vocab_size", int),
            hidden_dim=get("intermediate_size", int),
            head_dim=int(cfg.get("head_dim") or 0),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=scaling,
            partial_rotary_factor=float(partial),
            max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            attention_out_bias=attention_bias,  # LlamaAttention puts the same flag on o_proj
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos,
        )

    # ------------------------------------------------------------------ Meta
    @classmethod
    def from_meta(cls, params: Mapping[str, Any], vocab_size: int | None = None) -> "ModelArgs":
        """From Meta's ``params.json`` (llama, llama3, llama-models).

        The SwiGLU width is not stored; Meta's FeedForward derives it from dim:
        hidden = int(2 * 4 * dim / 3), times ffn_dim_multiplier if given, rounded up to a
        multiple of multiple_of (Llama-2-7B: 11008, Llama-3-8B: 14336).
        """
        get = _getter(params, "params.json")
        dim = get("dim", int)
        vocab = params.get("vocab_size", -1)
        if vocab is None or int(vocab) <= 0:
            if vocab_size is None:
                raise ConfigError("params.json: vocab_size is -1 and no tokenizer.model gives it")
            vocab = vocab_size
        n_heads = get("n_heads", int)
        scaling: dict[str, Any] = {"rope_type": "default"}
        if params.get("use_scaled_rope"):
            # Meta's apply_scaling() in llama3/llama-models; 8 unless the file says otherwise.
            scaling = {"rope_type": "llama3", "factor": float(params.get("rope_scaling_factor", 8.0)),
                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}
        return cls(
            dim=dim,
            n_layers=get("n_layers", int),
            n_heads=n_heads,
            n_kv_heads=int(params.get("n_kv_heads") or n_heads),
            vocab_size=int(vocab),
            hidden_dim=meta_hidden_dim(dim, get("multiple_of", int), params.get("ffn_dim_multiplier")),
            norm_eps=float(params.get("norm_eps", 1e-5)),
            rope_theta=float(params.get("rope_theta", 10000.0)),
            rope_scaling=scaling,
            max_seq_len=int(params.get("max_seq_len", 2048 if not params.get("use_scaled_rope") else 131072)),
            tie_word_embeddings=False,
        )

    # ------------------------------------------------------------------ GGUF
    @classmethod
    def from_gguf(cls, meta: Mapping[str, Any], vocab_size: int, tied: bool) -> "ModelArgs":
        """From GGUF key/value metadata (``{arch}.block_count`` and friends)."""
        arch = meta.get("general.architecture", "llama")
        if arch != "llama":
            raise ConfigError(f"GGUF: architecture {arch!r} is not a Llama-family model npllama can run")
        get = _getter({k[len(arch) + 1:]: v for k, v in meta.items() if k.startswith(arch + ".")},
                      f"GGUF metadata ({arch}.*)")
        n_heads = get("attention.head_count", int)
        dim = get("embedding_length", int)
        scaling: dict[str, Any] = {"rope_type": "default"}
        kind = meta.get(f"{arch}.rope.scaling.type")
        if kind and kind != "none":
            scaling = {"rope_type": str(kind), "factor": float(meta.get(f"{arch}.rope.scaling.factor", 1.0))}
            orig = meta.get(f"{arch}.rope.scaling.original_context_length")
            if orig:
                scaling["original_max_position_embeddings"] = int(orig)
            for key in ("beta_fast", "beta_slow"):   # YaRN ramp ends, when the converter wrote them
                if meta.get(f"{arch}.rope.scaling.yarn_{key}") is not None:
                    scaling[key] = float(meta[f"{arch}.rope.scaling.yarn_{key}"])
        head_dim = int(meta.get(f"{arch}.attention.key_length") or 0)
        rot = meta.get(f"{arch}.rope.dimension_count")
        hd = head_dim or dim // n_heads
        eos = meta.get("tokenizer.ggml.eos_token_id")
        return cls(
            dim=dim,
            n_layers=get("block_count", int),
            n_heads=n_heads,
            n_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv") or n_heads),
            vocab_size=int(meta.get(f"{arch}.vocab_size") or vocab_size),
            hidden_dim=get("feed_forward_length", int),
            head_dim=head_dim,
            norm_eps=float(get("attention.layer_norm_rms_epsilon", float)),
            rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            partial_rotary_factor=(int(rot) / hd) if rot else 1.0,
            max_seq_len=int(meta.get(f"{arch}.context_length", 2048)),
            tie_word_embeddings=tied,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=() if eos is None else (int(eos),),
        )


def meta_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's FeedForward width: int(2*4*dim/3), scaled, rounded up to multiple_of."""
    if multiple_of <= 0:
        raise ConfigError(f"params.json: multiple_of must be positive, got {multiple_of}")
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _normalise_rope_scaling(scaling: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Give every rope_scaling dict a 'rope_type' (older configs call it 'type')."""
    if not isinstance(scaling, Mapping):
        raise ConfigError(f"{source}: rope_scaling must be an object or null")
    scaling = dict(scaling)
    kind = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    return {"rope_type": str(kind), **scaling}


def _getter(cfg: Mapping[str, Any], source: str):
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"{source}: expected a JSON object, got {type(cfg).__name__}")

    def get(key: str, kind: type):
        if key not in cfg or cfg[key] is None:
            raise ConfigError(f"{source}: required key {key!r} is missing")
        try:
            value = cfg[key]
            if kind is int and (isinstance(value, bool) or float(value) != int(value)):
                raise ValueError
            return kind(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{source}: {key!r} must be {kind.__name__}, got {cfg[key]!r}") from None

    return get
