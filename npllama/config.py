"""The model's hyper-parameters: one dataclass.

``ModelArgs`` (Meta's name for it) describes every LLaMA-family decoder npllama runs. It knows
nothing of files: the loaders (the formats package) read each checkpoint format's own
configuration and build one.

Legend of dimension names used in docstrings across npllama:

    batch       sequences processed together
    seq         positions in this forward call (q_len)
    kv_len      positions visible to attention (cache + this call)
    dim         the residual stream width
    n_heads     query heads;  n_kv_heads: key/value heads (MHA: equal, GQA: fewer, MQA: 1)
    n_rep       query heads per key/value head: n_heads / n_kv_heads
    head_dim    width of one head (may differ from dim / n_heads)
    rotary_dim  leading channels of each head that rotary embeddings rotate (head_dim unless partial)
    hidden_dim  width of the SwiGLU MLP
    vocab       vocabulary size
"""

from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Mapping

from .checks import is_int, is_number
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
    # "dynamic", "llama3", "yarn", or a name registered with npllama.rope_scaling.register).
    rope_scaling: Mapping[str, Any] = field(default_factory=lambda: {"rope_type": "default"})
    partial_rotary_factor: float = 1.0
    max_seq_len: int = 2048  # the context window the model was trained for
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # biases on q, k, v (and o, see attention_out_bias)
    attention_out_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not self.head_dim and _positive_int(self.dim) and _positive_int(self.n_heads):
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if not isinstance(self.rope_scaling, Mapping):
            raise ConfigError(f"config: rope_scaling must be a mapping, got {self.rope_scaling!r}")
        object.__setattr__(self, "rope_scaling", dict(self.rope_scaling))
        try:
            eos = tuple(operator.index(i) if not isinstance(i, bool) else i for i in self.eos_token_ids)
        except TypeError:
            raise ConfigError(f"config: eos_token_ids must be token ids, got {self.eos_token_ids!r}") from None
        object.__setattr__(self, "eos_token_ids", eos)
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first impossible value."""
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim",
                     "head_dim", "max_seq_len"):
            if not _positive_int(getattr(self, name)):
                raise ConfigError(f"config: {name} must be a positive integer, got {getattr(self, name)!r}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"config: n_heads ({self.n_heads}) must be a multiple of n_kv_heads "
                f"({self.n_kv_heads}); each key/value head serves a whole group of query heads")
        for name in ("norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not (_real(value) and value > 0 and math.isfinite(value)):
                raise ConfigError(f"config: {name} must be a positive finite number, got {value!r}")
        if not (_real(self.partial_rotary_factor) and 0 < self.partial_rotary_factor <= 1):
            raise ConfigError(
                f"config: partial_rotary_factor must lie in (0, 1], got {self.partial_rotary_factor!r}")
        if self.rotary_dim % 2 or self.rotary_dim == 0:
            raise ConfigError(
                f"config: the rotated part of each head ({self.rotary_dim} = head_dim "
                f"{self.head_dim} x partial_rotary_factor) must be a positive even number")
        if not isinstance(self.rope_scaling.get("rope_type"), str):
            raise ConfigError(f"config: rope_scaling needs a 'rope_type' string, got {self.rope_scaling!r}")
        for name in ("tie_word_embeddings", "attention_bias", "attention_out_bias", "mlp_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"config: {name} must be true or false, got {getattr(self, name)!r}")
        ids = ([("bos_token_id", self.bos_token_id)] if self.bos_token_id is not None else []) + \
            [("eos_token_id", i) for i in self.eos_token_ids]
        for name, value in ids:
            if not is_int(value) or not 0 <= value < self.vocab_size:
                raise ConfigError(f"config: {name} {value!r} must be a token id in 0..{self.vocab_size - 1}")

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


def _positive_int(value: Any) -> bool:
    return is_int(value) and value > 0


def _real(value: Any) -> bool:
    return is_number(value)
