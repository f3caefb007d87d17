"""How much memory a model takes, estimated from its config before any of it is allocated, and how
much the machine has: the figures behind npllama.load's mapped=None and the refusals of work that
would not fit (peak_bytes, check_fits).
"""

from __future__ import annotations

from .config import ModelArgs


def weight_count(args: ModelArgs) -> int:
    """The number of weights a checkpoint of this config holds (params.param_shapes, counted
    without listing them: a config may ask for a billion layers, and is refused elsewhere)."""
    d, hd, hid = args.dim, args.head_dim, args.hidden_dim
    q, kv = args.n_heads * hd, args.n_kv_heads * hd
    layer = 2 * d + (q + 2 * kv) * d + d * q + 3 * hid * d
    layer += (q + 2 * kv) * args.attention_bias + d * args.attention_out_bias + (2 * hid + d) * args.mlp_bias
    return args.vocab_size * d * (1 if args.tie_word_embeddings else 2) + d + args.n_layers * layer
