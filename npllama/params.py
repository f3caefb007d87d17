"""The weights of a model: their names and shapes, the check a checkpoint must pass, fresh ones.

Weights travel between the loaders, the model, the Torch backend and the writers as one flat dict
in npllama's (Meta's) names and nn.Linear's (out, in) layout, with q/k rows in the rotate-half
layout (formats/names.py has the other formats' names):

    tok_embeddings.weight                      (vocab, dim)
    layers.{i}.attention_norm.weight           (dim,)
    layers.{i}.attention.wq.weight             (n_heads * head_dim, dim)      [.bias optional]
    layers.{i}.attention.wk.weight, wv         (n_kv_heads * head_dim, dim)   [.bias optional]
    layers.{i}.attention.wo.weight             (dim, n_heads * head_dim)      [.bias optional]
    layers.{i}.ffn_norm.weight                 (dim,)
    layers.{i}.feed_forward.w1.weight, w3      (hidden_dim, dim)              [.bias optional]
    layers.{i}.feed_forward.w2.weight          (dim, hidden_dim)              [.bias optional]
    norm.weight                                (dim,)
    output.weight                              (vocab, dim), absent when tied
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from .config import ModelArgs
from .errors import CheckpointError


def param_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Every tensor name a checkpoint must provide, with its (out, in) shape."""
    d, hd, hid = args.dim, args.head_dim, args.hidden_dim
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (args.vocab_size, d),
                                          "norm.weight": (d,)}
    if not args.tie_word_embeddings:
        shapes["output.weight"] = (args.vocab_size, d)
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes[p + "attention_norm.weight"] = (d,)
        shapes[p + "ffn_norm.weight"] = (d,)
        for name, out in (("wq", args.n_heads * hd), ("wk", args.n_kv_heads * hd), ("wv", args.n_kv_heads * hd)):
            shapes[p + f"attention.{name}.weight"] = (out, d)
            if args.attention_bias:
                shapes[p + f"attention.{name}.bias"] = (out,)
        shapes[p + "attention.wo.weight"] = (d, args.n_heads * hd)
        if args.attention_out_bias:
            shapes[p + "attention.wo.bias"] = (d,)
        for name, (out, inp) in (("w1", (hid, d)), ("w3", (hid, d)), ("w2", (d, hid))):
            shapes[p + f"feed_forward.{name}.weight"] = (out, inp)
            if args.mlp_bias:
                shapes[p + f"feed_forward.{name}.bias"] = (out,)
    return shapes


def check_params(args: ModelArgs, params: Mapping[str, np.ndarray], source: str = "checkpoint") -> None:
    """Raise CheckpointError naming the first missing, unexpected or misshapen tensor."""
    if args.n_layers > len(params):   # each layer has 9 tensors; do not list names for a billion layers
        raise CheckpointError(f"{source}: the config asks for {args.n_layers} layers, but the checkpoint "
                              f"holds only {len(params)} tensors; the checkpoint and its config do not match")
    expected = param_shapes(args)
    for name, shape in expected.items():
        if name not in params:
            raise CheckpointError(f"{source}: tensor {name!r} is missing (the config asks for "
                                  f"{args.n_layers} layers{'' if args.tie_word_embeddings else ' and an untied output'})")
        got = tuple(params[name].shape)
        if got != shape:
            raise CheckpointError(f"{source}: tensor {name!r} has shape {got}, but the config "
                                  f"implies {shape}; the checkpoint and its config do not match")
    extra = sorted(set(params) - set(expected))
    if extra:
        raise CheckpointError(f"{source}: unexpected tensors {extra[:5]}{' ...' if len(extra) > 5 else ''}; "
                              f"the config does not describe them (a bias flag or tied embeddings?)")


def init_params(args: ModelArgs, seed: int = 0, std: float = 0.02, dtype=np.float32) -> dict[str, np.ndarray]:
    """Fresh weights for a config: norms at 1, biases at 0, everything else N(0, std^2).

    std 0.02 is transformers' initializer_range for Llama. Returns the checkpoint-style dict.
    """
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in param_shapes(args).items():
        if name.endswith("norm.weight"):
            params[name] = np.ones(shape, dtype)
        elif name.endswith(".bias"):
            params[name] = np.zeros(shape, dtype)
        else:
            params[name] = (rng.standard_normal(shape, dtype=np.float32) * std).astype(dtype)
    return params
