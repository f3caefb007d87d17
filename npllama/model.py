"""The LLaMA decoder: embedding, n_layers pre-norm blocks, final norm, LM head, and its loss.

    h = tok_embeddings[ids]
    for each layer:
        h = h + attention(attention_norm(h))      # rotary q/k, grouped kv heads, causal
        h = h + feed_forward(ffn_norm(h))         # SwiGLU
    logits = norm(h) @ output                      # output is tok_embeddings^T when tied

Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language Models", section 2.2: a
Transformer decoder with pre-normalization (RMSNorm), the SwiGLU activation and rotary embeddings;
Llama 2 adds grouped-query attention.

Weights arrive as a flat dict in checkpoint names and (out, in) layout (params.py) and are arranged
once for compute (layout.py): every matrix is used as ``x @ w`` with w (in, out), and wq|wk|wv and
w1|w3 sit side by side so that each group is one product. ``state_dict()`` gives the checkpoint
names and layout back.

Tracing. ``model(ids, trace=fn)`` calls ``fn(name, array)`` with every named intermediate of the
call: ``tok_embeddings``; per layer ``layers.{i}.`` + each of LAYER_TRACE_NAMES; ``norm``;
``logits``. The parity report (npllama/report.py) compares another implementation's
intermediates with these, name by name; ``trace_names`` lists them in the order they are computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from .attention import flash_attention, naive_attention
from .cache import KVCache
from .config import ModelArgs
from .errors import InputError
from .layout import choose_attention, compute_matrix, embedding_table, fuse_params, split_params
from .mlp import feed_forward, linear
from .norm import rms_norm
from .params import check_params
from .rope import apply_rotary_emb, rope_cos_sin
from .rope_scaling import rope_init

Trace = Callable[[str, np.ndarray], None]

# The intermediates of one layer, in the order they are computed (q and k after rotary;
# scores_v: softmax(q k^T / sqrt(head_dim)) v, before wo).
LAYER_TRACE_NAMES = ("attention_norm", "attention.q", "attention.k", "attention.v", "attention.scores_v",
                     "attention", "attention_residual", "ffn_norm", "feed_forward", "ffn_residual")


def trace_names(n_layers: int) -> list[str]:
    """Every name a forward pass traces, in the order the values are computed."""
    return ["tok_embeddings", *(f"layers.{i}.{op}" for i in range(n_layers) for op in LAYER_TRACE_NAMES),
            "norm", "logits"]


@dataclass(frozen=True)
class Layer:
    """One decoder layer's weights, arranged for compute (layout.py): every matrix is (in, out)."""
    index: int
    attention_norm: np.ndarray        # (dim,)
    wqkv: np.ndarray                  # (dim, (n_heads + 2 n_kv_heads) * head_dim): wq | wk | wv
    wo: np.ndarray                    # (n_heads * head_dim, dim)
    ffn_norm: np.ndarray              # (dim,)
    w13: np.ndarray                   # (dim, 2 * hidden_dim): w1 | w3
    w2: np.ndarray                    # (hidden_dim, dim)
    bqkv: np.ndarray | None = None    # biases, where the config has them
    bo: np.ndarray | None = None
    b13: np.ndarray | None = None
    b2: np.ndarray | None = None


@dataclass(frozen=True)
class Context:
    """What every layer of one forward call shares: the rotary angles of its positions, the cache,
    which keys are real tokens, the attention implementation, and the trace hook."""
    args: ModelArgs
    cos: np.ndarray                   # (seq, rotary_dim), or (batch, 1, seq, rotary_dim) per row
    sin: np.ndarray                   # the same shape as cos
    cache: KVCache | None
    attention: str                    # "naive", "flash" or "auto" (layout.choose_attention)
    trace: Trace | None = None
    kv_mask: np.ndarray | None = None  # (batch, kv_len): False where a slot is padding; None: no padding

    def record(self, layer: int | None, outputs: Mapping[str, np.ndarray]) -> None:
        """Hand named intermediates to the trace hook (``layers.{layer}.`` + name), if there is one."""
        if self.trace is not None:
            prefix = "" if layer is None else f"layers.{layer}."
            for name, x in outputs.items():
                self.trace(prefix + name, x)


# ---------------------------------------------------------------------------- the blocks
def attention(x: np.ndarray, layer: Layer, ctx: Context) -> np.ndarray:
    """Multi-head attention with rotary q and k and grouped key/value heads.

    x: (batch, seq, dim) -> (batch, seq, dim). The keys and values of this call are written to
    the cache (if any) and the queries attend to every cached position and their own.
    """
    b, seq, _ = x.shape
    hd, nq, nkv = ctx.args.head_dim, ctx.args.n_heads, ctx.args.n_kv_heads
    qkv = linear(x, layer.wqkv, layer.bqkv)                      # (batch, seq, (nq + 2 nkv) * hd)
    qkv = qkv.reshape(b, seq, nq + 2 * nkv, hd).transpose(0, 2, 1, 3)  # (batch, nq + 2 nkv, seq, hd)
    qk = apply_rotary_emb(qkv[:, : nq + nkv], ctx.cos, ctx.sin)  # q and k rotated together
    q, k, v = qk[:, :nq], qk[:, nq:], qkv[:, nq + nkv:]          # (batch, nq | nkv | nkv, seq, hd)
    keys, values = (k, v) if ctx.cache is None else ctx.cache.update(layer.index, k, v)  # (batch, nkv, kv_len, hd)
    out = scaled_dot_product_attention(q, keys, values, ctx.attention, ctx.kv_mask)   # (batch, nq, seq, hd)
    ctx.record(layer.index, {"attention.q": q, "attention.k": k, "attention.v": v, "attention.scores_v": out})
    out = out.transpose(0, 2, 1, 3).reshape(b, seq, nq * hd)    # (batch, seq, nq * hd)
    return linear(out, layer.wo, layer.bo)                       # (batch, seq, dim)


def scaled_dot_product_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, impl: str,
                                 kv_mask: np.ndarray | None = None) -> np.ndarray:
    """Causal attention, naive or blockwise: both compute the same function.

    q: (batch, n_heads, q_len, head_dim); k, v: (batch, n_kv_heads, kv_len, head_dim);
    kv_mask: (batch, kv_len), False where a key is padding -> (batch, n_heads, q_len, head_dim).
    """
    impl = choose_attention(impl, q.shape[2], k.shape[2])
    if impl == "naive":
        return naive_attention(q, k, v, causal=True, kv_mask=kv_mask)
    if impl == "flash":
        return flash_attention(q, k, v, causal=True, kv_mask=kv_mask)
    raise InputError(f"unknown attention implementation {impl!r}; choose 'naive', 'flash' or 'auto'")


def transformer_block(h: np.ndarray, layer: Layer, ctx: Context) -> np.ndarray:
    """One pre-norm decoder layer. h: (batch, seq, dim) -> (batch, seq, dim)."""
    eps = ctx.args.norm_eps
    x = rms_norm(h, layer.attention_norm, eps)                   # (batch, seq, dim)
    a = attention(x, layer, ctx)
    h_attn = h + a                                               # the residual stream after attention
    y = rms_norm(h_attn, layer.ffn_norm, eps)
    f = feed_forward(y, layer.w13, layer.w2, layer.b13, layer.b2)
    h_out = h_attn + f                                           # ... and after the MLP
    ctx.record(layer.index, {"attention_norm": x, "attention": a, "attention_residual": h_attn,
                             "ffn_norm": y, "feed_forward": f, "ffn_residual": h_out})
    return h_out


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


def pack_real_tokens(logits: np.ndarray, labels: np.ndarray, mask: np.ndarray,
                     ignore_index: int = -100) -> tuple[np.ndarray, np.ndarray]:
    """Each row's real tokens moved to its front, in order, as if the row had run alone.

    logits: (batch, seq, vocab); labels, mask: (batch, seq) -> logits (batch, n, vocab) and
    labels (batch, n), n the most real tokens of any row; the tail of a shorter row is labelled
    ignore_index. Then position t predicts labels[t + 1] within the row's own tokens, wherever
    the padding was (left, right, or between).
    """
    n = int(mask.sum(axis=1).max())
    packed_logits = np.zeros((logits.shape[0], n, logits.shape[2]), logits.dtype)
    packed_labels = np.full((labels.shape[0], n), ignore_index, dtype=np.int64)
    for b, real in enumerate(mask):
        count = int(real.sum())
        packed_logits[b, :count] = logits[b, real]
        packed_labels[b, :count] = labels[b, real]
    return packed_logits, packed_labels


def check_token_ids(ids: np.ndarray, vocab_size: int, where: str = "") -> np.ndarray:
    """ids (any shape) as int64, or an InputError (its message prefixed by where, e.g. "prompt 2: ")
    naming the first non-integer or out-of-vocabulary id."""
    if not np.issubdtype(ids.dtype, np.integer):
        raise InputError(f"{where}token ids must be integers, got {ids.dtype}")
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        raise InputError(f"{where}token id {int(ids[bad][0])} lies outside the vocabulary (0..{vocab_size - 1})")
    return ids.astype(np.int64, copy=False)


def check_mask(attention_mask, shape: tuple[int, int], cache: KVCache | None = None) -> np.ndarray:
    """The mask of a call's new columns as (batch, seq) bool, or an InputError that says what is wrong.

    None means every token is real. A mask as wide as the cache plus the new columns (what
    transformers' generate passes) is accepted when its first columns equal the cache's mask.
    Without a cache every row needs a real token; with one, a row may be all padding in one call
    (a left-padded prompt prefilled in chunks) and get its tokens later.
    """
    if attention_mask is None:
        return np.ones(shape, dtype=bool)
    mask = np.asarray(attention_mask)
    cached = 0 if cache is None else cache.length
    if mask.ndim != 2 or mask.shape[0] != shape[0] or mask.shape[1] not in (shape[1], cached + shape[1]):
        wide = f" (or {(shape[0], cached + shape[1])}, the cache's columns included)" if cached else ""
        raise InputError(f"attention_mask has shape {mask.shape}; the ids have shape {shape}{wide}")
    if mask.dtype != bool and not (np.issubdtype(mask.dtype, np.number) and np.isin(mask, (0, 1)).all()):
        raise InputError("attention_mask must hold 1 for a token and 0 for padding, and nothing else")
    mask = mask.astype(bool)
    if mask.shape[1] != shape[1]:
        if not np.array_equal(mask[:, :cached], cache.mask):
            raise InputError("attention_mask's first columns do not match the padding the cache holds; "
                             "pass the mask of the new columns only, or the whole mask unchanged")
        mask = mask[:, cached:]
    empty = ~mask.any(axis=1)
    if cache is None and empty.any():   # with a cache, a row's real tokens may come in a later call
        raise InputError(f"row {int(np.argmax(empty))} of attention_mask has no real token; every row "
                         f"needs at least one (drop rows that are all padding)")
    return mask


def call_positions(mask: np.ndarray, cache: KVCache | None) -> tuple[np.ndarray, np.ndarray | None]:
    """The rotary position of each column of a call, and which keys it may attend to.

    mask: (batch, seq), False for padding -> positions (batch, seq): each real token's count of
    real tokens before it in its row (the cache's included); kv_mask (batch, kv_len): the real
    tokens among every key of the call, or None when there is no padding at all.
    """
    if cache is None:
        return np.cumsum(mask, axis=1) - mask, (None if mask.all() else mask)
    if cache.batch_size != mask.shape[0]:
        raise InputError(f"the cache holds {cache.batch_size} sequences but ids has {mask.shape[0]} rows")
    positions = cache.start(mask)
    return positions, (cache.visible(mask.shape[1]) if cache.padded or not mask.all() else None)


def rotary_angles(args: ModelArgs, positions: np.ndarray, mask: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin for every column of a call: (seq, rotary_dim) when every row has the same
    positions, else (batch, 1, seq, rotary_dim). positions, mask: (batch, seq).

    The variant's length (dynamic NTK) is one past the largest position of a real token in the
    call, as transformers takes max(position_ids) + 1.
    """
    inv_freq, scaling = rope_init(args, int(positions[mask].max(initial=0)) + 1)
    if (positions == positions[:1]).all():
        return rope_cos_sin(inv_freq, positions[0], scaling, dtype)              # (seq, rotary_dim)
    cos, sin = rope_cos_sin(inv_freq, positions, scaling, dtype)                 # (batch, seq, rotary_dim)
    return cos[:, None], sin[:, None]                                            # (batch, 1, seq, rotary_dim)


# ---------------------------------------------------------------------------- the model
class Transformer:
    """A loaded LLaMA-family model: ``model(ids)`` and ``model(ids, cache=cache)`` give logits."""

    def __init__(self, args: ModelArgs, params: Mapping[str, np.ndarray], tokenizer=None,
                 dtype=np.float32, source: str = "checkpoint"):
        check_params(args, params, source)
        self.config = args
        self.tokenizer = tokenizer
        self.source = source               # what run-time errors name (npllama.numerics)
        self.dtype = np.dtype(dtype)
        fused = fuse_params(args, params)
        vector = lambda name: np.ascontiguousarray(fused[name], dtype=self.dtype) if name in fused else None  # noqa: E731
        matrix = lambda short, name: compute_matrix(short, fused[name], self.dtype)                           # noqa: E731
        self.tok_embeddings = embedding_table(fused["tok_embeddings.weight"], self.dtype)  # (vocab, dim)
        self.norm = vector("norm.weight")                                          # (dim,)
        self.output = matrix("output", "tok_embeddings.weight" if args.tie_word_embeddings
                             else "output.weight")                                # (dim, vocab)
        self.layers = []
        for i in range(args.n_layers):
            p = f"layers.{i}."
            self.layers.append(Layer(
                index=i,
                attention_norm=vector(p + "attention_norm.weight"),
                wqkv=matrix("wqkv", p + "attention.wqkv.weight"), bqkv=vector(p + "attention.wqkv.bias"),
                wo=matrix("wo", p + "attention.wo.weight"), bo=vector(p + "attention.wo.bias"),
                ffn_norm=vector(p + "ffn_norm.weight"),
                w13=matrix("w13", p + "feed_forward.w13.weight"), b13=vector(p + "feed_forward.w13.bias"),
                w2=matrix("w2", p + "feed_forward.w2.weight"), b2=vector(p + "feed_forward.w2.bias")))

    # -------------------------------------------------------------- the call
    def __call__(self, ids, cache: KVCache | None = None, *, attention_mask=None, attention: str = "auto",
                 trace: Trace | None = None) -> np.ndarray:
        """ids: (batch, seq) integer token ids -> logits (batch, seq, vocab), float32.

        attention_mask: (batch, seq) of 1 (a token) and 0 (padding), transformers' convention, for
        a batch of sequences of different lengths. Each row's real tokens get positions 0, 1, 2,
        ... counted from its first one, and padding is never attended, so a row's logits at its
        real tokens are what the row alone gives (padding may sit anywhere: left, right, between).
        The logits at padding are finite and meaningless.

        With a cache, the ids continue the sequences the cache holds (it keeps each row's mask and
        position count), and only the new columns' logits are returned; attention_mask then
        covers the new columns only, or, as transformers' generate passes it, every column so far
        (its cached part must match what the cache holds).
        trace(name, array), if given, sees every named intermediate (see the module docstring).
        """
        args = self.config
        ids = self.check_ids(ids)
        seq = ids.shape[1]
        mask = check_mask(attention_mask, ids.shape, cache)                # (batch, seq) bool
        positions, kv_mask = call_positions(mask, cache)                   # (batch, seq), (batch, kv_len)
        cos, sin = rotary_angles(args, positions, mask, self.dtype)
        ctx = Context(args, cos, sin, cache, attention, trace, kv_mask)
        h = self.tok_embeddings[ids]                                  # (batch, seq, dim)
        ctx.record(None, {"tok_embeddings": h})
        for layer in self.layers:
            h = transformer_block(h, layer, ctx)
        if cache is not None:
            cache.advance(seq)
        h = rms_norm(h, self.norm, args.norm_eps)
        logits = (h @ self.output).astype(np.float32, copy=False)     # (batch, seq, vocab)
        ctx.record(None, {"norm": h, "logits": logits})
        return logits

    def new_cache(self, batch_size: int = 1, max_seq_len: int | None = None) -> KVCache:
        """An empty KV cache for batch_size sequences of up to max_seq_len positions each (default:
        the context window, as far as the rotary scaling extends it)."""
        return KVCache(self.config, batch_size, max_seq_len, dtype=self.dtype)

    def loss(self, ids, labels=None, ignore_index: int = -100, attention_mask=None) -> float:
        """Next-token cross-entropy of ids (labels default to ids, as in causal LM training).

        attention_mask: (batch, seq), 0 for padding: padded positions are neither predicted nor
        predict; each row's real tokens are scored as if the row ran alone (pack_real_tokens).
        """
        ids = self.check_ids(ids)
        labels = ids if labels is None else np.asarray(labels)
        if labels.shape != ids.shape:
            raise InputError(f"labels have shape {labels.shape}, but ids have {ids.shape}")
        logits = self(ids, attention_mask=attention_mask)
        if attention_mask is not None:
            logits, labels = pack_real_tokens(logits, labels, check_mask(attention_mask, ids.shape), ignore_index)
        return cross_entropy_loss(logits, labels, ignore_index)


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
        sd = {"tok_embeddings.weight": self.tok_embeddings, "norm.weight": self.norm}
        if not self.config.tie_word_embeddings:
            sd["output.weight"] = self.output.T
        for layer in self.layers:
            p = f"layers.{layer.index}."
            parts = {"attention_norm.weight": layer.attention_norm, "ffn_norm.weight": layer.ffn_norm,
                     "attention.wqkv.weight": layer.wqkv.T, "attention.wqkv.bias": layer.bqkv,
                     "attention.wo.weight": layer.wo.T, "attention.wo.bias": layer.bo,
                     "feed_forward.w13.weight": layer.w13.T, "feed_forward.w13.bias": layer.b13,
                     "feed_forward.w2.weight": layer.w2.T, "feed_forward.w2.bias": layer.b2}
            sd.update({p + name: a for name, a in parts.items() if a is not None})
        return split_params(self.config, sd)

    def num_parameters(self) -> int:
        return sum(a.size for a in self.state_dict().values())
