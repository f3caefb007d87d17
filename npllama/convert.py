"""Multi-head to grouped-query attention by mean-pooling key/value heads.

GQA (Ainslie et al. 2023, "GQA: Training Generalized Multi-Query Transformer Models from Multi-Head
Checkpoints", section 2.1) turns a multi-head checkpoint into a grouped-query one in two steps:

1. *Convert*: split the key heads into G groups of consecutive heads and replace each group by the
   mean of its heads; the same for the value heads. Query and output projections are untouched.
   Mean-pooling kept more of the model than keeping the first head of each group or a random init.
2. *Uptrain*: continue pre-training the converted model for a small fraction (5%) of the original
   steps, so that it adapts to its new structure (``npllama train --init``).

G = n_heads is the model itself (MHA), G = 1 is multi-query attention (Shazeer 2019). Grouping is by
consecutive heads, as ``npllama.attention.repeat_kv`` serves them: query head h reads key/value head
h // (n_heads / n_kv_heads). Pooling consecutive kv heads keeps every query head reading the mean of
the heads it (and its group) used to read.

``npllama convert`` writes the result as a Hugging Face folder (npllama.formats.hf.save_checkpoint)
that npllama.load, parity.load and transformers all read.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from .checks import is_int
from .config import ModelArgs
from .errors import ConfigError
from .params import check_params


# ---------------------------------------------------------------------------- mean-pooling
def mean_pool_heads(w: np.ndarray, n_heads: int, groups: int) -> np.ndarray:
    """Average consecutive heads of a projection in groups (GQA section 2.1).

    w: (n_heads * head_dim, in) weight or (n_heads * head_dim,) bias
    -> (groups * head_dim, in) or (groups * head_dim,): head g of the result is the mean of heads
    g * r ... (g + 1) * r - 1 of w, r = n_heads / groups.
    """
    if n_heads % groups:
        raise ConfigError(f"cannot pool {n_heads} heads into {groups} groups: {groups} does not divide {n_heads}")
    head_dim = w.shape[0] // n_heads
    grouped = w.reshape(groups, n_heads // groups, head_dim, *w.shape[1:])   # (groups, r, head_dim, ...)
    mean = grouped.astype(np.float64).mean(axis=1)                            # (groups, head_dim, ...)
    return mean.reshape(groups * head_dim, *w.shape[1:]).astype(w.dtype)


def convert_kv_heads(args: ModelArgs, params: Mapping[str, np.ndarray],
                     n_kv_heads: int) -> tuple[ModelArgs, dict[str, np.ndarray]]:
    """The config and weights of the model with its key/value heads mean-pooled to n_kv_heads.

    params: checkpoint names, (out, in) layout (npllama.params.param_shapes). wk and wv (and their
    biases) of every layer shrink from (args.n_kv_heads * head_dim, dim) to (n_kv_heads * head_dim,
    dim); every other tensor is passed through. n_kv_heads must divide the current number of kv
    heads (MHA -> GQA-G, GQA -> fewer groups, anything -> MQA with 1).
    """
    check_params(args, params)
    if not is_int(n_kv_heads) or n_kv_heads <= 0:
        raise ConfigError(f"--kv-heads must be a positive integer, got {n_kv_heads!r}")
    if args.n_kv_heads % n_kv_heads:
        divisors = [g for g in range(1, args.n_kv_heads + 1) if args.n_kv_heads % g == 0]
        raise ConfigError(f"the model has {args.n_kv_heads} key/value heads, which do not split into "
                          f"{n_kv_heads} equal groups; choose one of {divisors}")
    out = dict(params)
    for i in range(args.n_layers):
        for name in ("wk", "wv"):
            for kind in ("weight", "bias"):
                key = f"layers.{i}.attention.{name}.{kind}"
                if key in params:
                    out[key] = mean_pool_heads(np.asarray(params[key]), args.n_kv_heads, n_kv_heads)
    new_args = args.replace(n_kv_heads=int(n_kv_heads))
    check_params(new_args, out, "converted checkpoint")
    return new_args, out
