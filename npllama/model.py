"""The LLaMA decoder: embedding, n_layers pre-norm blocks, final norm, LM head, and its loss.

    h = tok_embeddings[ids]
    for each layer:
        h = h + attention(attention_norm(h))      # rotary q/k, grouped kv heads, causal
        h = h + feed_forward(ffn_norm(h))         # SwiGLU
    logits = norm(h) @ output                      # output is tok_embeddings^T when tied

Weights arrive from a loader (npllama.formats) as a flat dict in Meta's names and nn.Linear's
(out, in) layout, with q/k rows in the rotate-half layout:

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

``Transformer`` holds each linear weight as an (in, out) array, so every projection is ``x @ w``;
wq|wk|wv and w1|w3 are placed side by side so that each pair or triple of projections of the same
input is one matrix product (``_prepare_layer``). ``state_dict()`` gives the checkpoint names and
layout back.

Memory order is a separate, load-time choice that changes no arithmetic: decoding is one
matrix-vector product per weight, and which order OpenBLAS streams faster depends on the matrix's
shape. ``IN_OUT_IN_MEMORY`` lists the matrices stored (in, out) row-major; the others (wqkv and
w2) keep nn.Linear's (out, in) rows in memory and are used through a transposed view, which
decodes SmolLM2-135M ~10% faster on this project's 2-core CPU (bench/RESULTS.md).
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from .attention import flash_attention, naive_attention
from .cache import KVCache
from .config import ModelArgs
from .errors import CheckpointError, InputError
from .mlp import feed_forward, linear
from .norm import rms_norm
from .rope import apply_rotary_emb, rope_cos_sin, rope_init

Trace = Callable[[str, np.ndarray], None]

# Matrices stored (in, out) row-major; every other one is an (in, out) view of (out, in) memory.
IN_OUT_IN_MEMORY = frozenset({"wo", "w13", "output"})

# Sequences at least this long go through blockwise attention when attention="auto": on the
# 2-core CPU, one SmolLM2-135M layer's attention is 1.7x faster blockwise at 512 keys and even at
# 256 (bench/RESULTS.md, "Crossover"); below that the tiles' Python loop costs more than it saves.
FLASH_MIN_LEN = 512


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


# ---------------------------------------------------------------------------- the blocks
def attention(x: np.ndarray, layer: dict, args: ModelArgs, cos: np.ndarray, sin: np.ndarray,
              cache: KVCache | None, layer_idx: int, impl: str, tap: Trace) -> np.ndarray:
    """Multi-head attention with rotary q/k and grouped kv heads.

    x: (batch, seq, dim); cos, sin: (seq, rotary_dim) -> (batch, seq, dim)
    wq, wk and wv are stored side by side as one (dim, (n_heads + 2 n_kv_heads) head_dim) matrix,
    so the three projections are one product; q and k are rotated together (same angles).
    """
    b, seq, _ = x.shape
    hd, nq, nkv = args.head_dim, args.n_heads, args.n_kv_heads
    qkv = linear(x, layer["wqkv"], layer.get("bqkv"))            # (batch, seq, (nq + 2 nkv) * hd)
    qkv = qkv.reshape(b, seq, nq + 2 * nkv, hd).transpose(0, 2, 1, 3)  # (batch, nq + 2 nkv, seq, hd)
    qk = apply_rotary_emb(qkv[:, : nq + nkv], cos, sin)          # (batch, nq + nkv, seq, hd)
    q, k, v = qk[:, :nq], qk[:, nq:], qkv[:, nq + nkv:]          # (batch, nq | nkv | nkv, seq, hd)
    tap(f"layers.{layer_idx}.attention.q", q)
    tap(f"layers.{layer_idx}.attention.k", k)
    tap(f"layers.{layer_idx}.attention.v", v)
    if cache is not None:
        k, v = cache.update(layer_idx, k, v)                     # (batch, nkv, kv_len, hd)
    out = scaled_dot_product_attention(q, k, v, impl)           # (batch, nq, seq, hd)
    tap(f"layers.{layer_idx}.attention.scores_v", out)
    out = out.transpose(0, 2, 1, 3).reshape(b, seq, nq * hd)    # (batch, seq, nq * hd)
    return linear(out, layer["wo"], layer.get("bo"))             # (batch, seq, dim)


def scaled_dot_product_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, impl: str) -> np.ndarray:
    """Choose naive or blockwise attention; both compute the same function (causal)."""
    if impl == "auto":
        impl = "flash" if k.shape[2] >= FLASH_MIN_LEN and q.shape[2] > 1 else "naive"
    if impl == "naive":
        return naive_attention(q, k, v, causal=True)
    if impl == "flash":
        return flash_attention(q, k, v, causal=True)
    raise InputError(f"unknown attention implementation {impl!r}; choose 'naive', 'flash' or 'auto'")


def transformer_block(h: np.ndarray, layer: dict, args: ModelArgs, cos: np.ndarray, sin: np.ndarray,
                      cache: KVCache | None, layer_idx: int, impl: str, tap: Trace) -> np.ndarray:
    """One pre-norm decoder layer. h: (batch, seq, dim) -> (batch, seq, dim)."""
    p = f"layers.{layer_idx}."
    x = rms_norm(h, layer["attention_norm"], args.norm_eps)
    tap(p + "attention_norm", x)
    a = attention(x, layer, args, cos, sin, cache, layer_idx, impl, tap)
    tap(p + "attention", a)
    h = h + a
    tap(p + "attention_residual", h)
    x = rms_norm(h, layer["ffn_norm"], args.norm_eps)
    tap(p + "ffn_norm", x)
    f = feed_forward(x, layer["w13"], layer["w2"], layer.get("b13"), layer.get("b2"))
    tap(p + "feed_forward", f)
    h = h + f
    tap(p + "ffn_residual", h)
    return h


def cross_entropy_loss(logits: np.ndarray, labels: np.ndarray, ignore_index: int = -100) -> float:
    """Mean next-token cross-entropy, as transformers' LlamaForCausalLM computes it.

    logits: (batch, seq, vocab); labels: (batch, seq), aligned with the input ids: position t
    predicts labels[t + 1]. Labels equal to ignore_index (-100) are left out of the mean.
    """
    logits = logits[:, :-1].astype(np.promote_types(logits.dtype, np.float32))   # (batch, seq-1, vocab)
    targets = np.asarray(labels)[:, 1:]                                           # (batch, seq-1)
    keep = targets != ignore_index
    if not keep.any():
        return float("nan")
    m = logits.max(axis=-1, keepdims=True)
    log_z = (m + np.log(np.exp(logits - m).sum(axis=-1, keepdims=True)))[..., 0]  # (batch, seq-1)
    picked = np.take_along_axis(logits, np.where(keep, targets, 0)[..., None], axis=-1)[..., 0]
    return float(((log_z - picked) * keep).sum() / keep.sum())


def check_token_ids(ids: np.ndarray, vocab_size: int, where: str = "") -> np.ndarray:
    """ids (any shape) as int64, or an InputError (its message prefixed by where, e.g. "prompt 2: ")
    naming the first non-integer or out-of-vocabulary id."""
    if not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"{where}token ids must be integers, got {ids.dtype}")
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        raise InputError(f"{where}token id {int(ids[bad][0])} lies outside the vocabulary (0..{vocab_size - 1})")
    return ids.astype(np.int64, copy=False)


def _no_tap(name: str, x: np.ndarray) -> None:
    return None


# ---------------------------------------------------------------------------- the model
class Transformer:
    """A loaded LLaMA-family model: ``model(ids)`` and ``model(ids, cache=cache)`` give logits."""

    def __init__(self, args: ModelArgs, params: Mapping[str, np.ndarray], tokenizer=None,
                 dtype=np.float32, source: str = "checkpoint"):
        check_params(args, params, source)
        self.config = args
        self.tokenizer = tokenizer
        self.dtype = np.dtype(dtype)
        as_dtype = lambda a: np.ascontiguousarray(a, dtype=self.dtype)           # noqa: E731
        self.tok_embeddings = as_dtype(params["tok_embeddings.weight"])          # (vocab, dim)
        self.norm = as_dtype(params["norm.weight"])                              # (dim,)
        out = params["tok_embeddings.weight"] if args.tie_word_embeddings else params["output.weight"]
        self.output = self._in_out("output", [out])                              # (dim, vocab)
        self.layers = [self._prepare_layer(params, f"layers.{i}.") for i in range(args.n_layers)]

    def _in_out(self, name: str, weights: list[np.ndarray]) -> np.ndarray:
        """nn.Linear weights (out_i, in) stacked along "out" -> one (in, sum out_i) matrix.

        Stored (in, out) row-major if name is in IN_OUT_IN_MEMORY, else as the transposed view of
        an (out, in) row-major array; either way ``x @ w`` computes the same numbers.
        """
        stacked = np.concatenate([np.asarray(w) for w in weights], axis=0)    # (out, in)
        if name in IN_OUT_IN_MEMORY:
            return np.ascontiguousarray(stacked.T, dtype=self.dtype)          # (in, out), C order
        return np.ascontiguousarray(stacked, dtype=self.dtype).T              # (in, out), F order

    def _prepare_layer(self, params: Mapping[str, np.ndarray], p: str) -> dict[str, np.ndarray]:
        """One layer's weights in compute layout: (in, out) matrices, q|k|v and w1|w3 side by side.

        wqkv: (dim, (n_heads + 2 n_kv_heads) * head_dim); wo: (n_heads * head_dim, dim);
        w13: (dim, 2 * hidden_dim); w2: (hidden_dim, dim). Biases fused the same way.
        """
        def in_out(name, *names):
            return self._in_out(name, [params[p + n] for n in names])

        def bias(*names):
            if p + names[0] not in params:
                return None
            return np.ascontiguousarray(np.concatenate([params[p + n] for n in names]), dtype=self.dtype)

        q, k, v = "attention.wq", "attention.wk", "attention.wv"
        layer = {
            "attention_norm": np.asarray(params[p + "attention_norm.weight"], dtype=self.dtype),
            "wqkv": in_out("wqkv", q + ".weight", k + ".weight", v + ".weight"),
            "bqkv": bias(q + ".bias", k + ".bias", v + ".bias"),
            "wo": in_out("wo", "attention.wo.weight"),
            "bo": bias("attention.wo.bias"),
            "ffn_norm": np.asarray(params[p + "ffn_norm.weight"], dtype=self.dtype),
            "w13": in_out("w13", "feed_forward.w1.weight", "feed_forward.w3.weight"),
            "b13": bias("feed_forward.w1.bias", "feed_forward.w3.bias"),
            "w2": in_out("w2", "feed_forward.w2.weight"),
            "b2": bias("feed_forward.w2.bias"),
        }
        return {name: a for name, a in layer.items() if a is not None}

    # -------------------------------------------------------------- the call
    def __call__(self, ids, cache: KVCache | None = None, *, attention: str = "auto",
                 trace: Trace | None = None) -> np.ndarray:
        """ids: (batch, seq) integer token ids -> logits (batch, seq, vocab), float32.

        With a cache, the ids continue the sequences the cache holds (positions cache.length ...),
        the cache is extended, and only the new positions' logits are returned.
        trace(name, array), if given, sees the output of every op (see npllama.report).
        """
        args, tap = self.config, trace or _no_tap
        ids = self.check_ids(ids)
        b, seq = ids.shape
        start = 0
        if cache is not None:
            if cache.batch_size != b:
                raise InputError(f"the cache holds {cache.batch_size} sequences but ids has {b} rows")
            start = cache.length
            cache.reserve(seq)
        inv_freq, scaling = rope_init(args, start + seq)
        cos, sin = rope_cos_sin(inv_freq, np.arange(start, start + seq), scaling, self.dtype)
        h = self.tok_embeddings[ids]                                  # (batch, seq, dim)
        tap("tok_embeddings", h)
        for i, layer in enumerate(self.layers):
            h = transformer_block(h, layer, args, cos, sin, cache, i, attention, tap)
        if cache is not None:
            cache.advance(seq)
        h = rms_norm(h, self.norm, args.norm_eps)
        tap("norm", h)
        logits = (h @ self.output).astype(np.float32, copy=False)     # (batch, seq, vocab)
        tap("logits", logits)
        return logits

    def new_cache(self, batch_size: int = 1, max_seq_len: int | None = None) -> KVCache:
        """An empty KV cache for batch_size sequences of up to max_seq_len (default: the context)."""
        return KVCache(self.config, batch_size, max_seq_len, dtype=self.dtype)

    def loss(self, ids, labels=None, ignore_index: int = -100) -> float:
        """Next-token cross-entropy of ids (labels default to ids, as in causal LM training)."""
        ids = self.check_ids(ids)
        labels = ids if labels is None else np.asarray(labels)
        return cross_entropy_loss(self(ids), labels, ignore_index)

    def check_ids(self, ids) -> np.ndarray:
        """Token ids as an int64 (batch, seq) array, or an InputError that says what is wrong."""
        arr = np.asarray(ids)
        if arr.ndim == 1:
            arr = arr[None, :]
        if arr.ndim != 2 or arr.shape[1] == 0 or arr.shape[0] == 0:
            raise InputError(f"ids must be a non-empty (batch, seq) array of token ids, got shape {arr.shape}")
        return check_token_ids(arr, self.config.vocab_size)

    def state_dict(self) -> dict[str, np.ndarray]:
        """The weights back in checkpoint names and (out, in) layout (views, no copies)."""
        args = self.config
        sd = {"tok_embeddings.weight": self.tok_embeddings, "norm.weight": self.norm}
        if not args.tie_word_embeddings:
            sd["output.weight"] = self.output.T
        nq, nkv, hd, hid = args.n_heads, args.n_kv_heads, args.head_dim, args.hidden_dim
        cut_qkv = [nq * hd, (nq + nkv) * hd]
        for i, layer in enumerate(self.layers):
            p = f"layers.{i}."
            sd[p + "attention_norm.weight"] = layer["attention_norm"]
            sd[p + "ffn_norm.weight"] = layer["ffn_norm"]
            for kind, fused, names, cuts in (("weight", "wqkv", ("wq", "wk", "wv"), cut_qkv),
                                              ("weight", "w13", ("w1", "w3"), [hid])):
                parts = np.split(layer[fused], cuts, axis=1)
                bparts = np.split(layer["b" + fused[1:]], cuts) if "b" + fused[1:] in layer else None
                for j, name in enumerate(names):
                    module = ("attention." if name.startswith("wq") or name in ("wk", "wv") else "feed_forward.") + name
                    sd[p + module + ".weight"] = parts[j].T
                    if bparts is not None:
                        sd[p + module + ".bias"] = bparts[j]
            sd[p + "attention.wo.weight"] = layer["wo"].T
            sd[p + "feed_forward.w2.weight"] = layer["w2"].T
            if "bo" in layer:
                sd[p + "attention.wo.bias"] = layer["bo"]
            if "b2" in layer:
                sd[p + "feed_forward.w2.bias"] = layer["b2"]
        return sd

    def num_parameters(self) -> int:
        return sum(a.size for a in self.state_dict().values())
