"""The LLaMA decoder: embedding, n_layers pre-norm blocks, final norm, LM head, and its loss.

    h = tok_embeddings[ids]
    for each layer:
        h = h + attention(attention_norm(h))      # rotary q/k, grouped kv heads, causal
        h = h + feed_forward(ffn_norm(h))         # SwiGLU: w2(silu(w1 x) * w3 x)
    logits = output(norm(h))                       # output is tok_embeddings when tied

Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language Models", section 2.2: a
Transformer decoder with pre-normalization (RMSNorm), the SwiGLU activation and rotary embeddings;
Llama 2 adds grouped-query attention.

Weights keep their files' orientation: every matrix is (out, in), as Meta, Hugging Face and
nn.Linear hold it, and is applied as ``linear(x, w) = x @ w.T`` (params.py lists them). How they lie
in memory is layout.py's choice, made once at load; the maths here does not change with it.

Tracing. ``model(ids, trace=fn)`` calls ``fn(name, array)`` with every named intermediate, in the
order of ``trace_names``: ``tok_embeddings``; per layer ``layers.{i}.`` + each of
LAYER_TRACE_NAMES; ``norm``; ``logits``. The oracle (oracle.py) compares anyone's intermediates
with these, and runs each layer from a port's own input to it through ``given``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from .attention import flash_attention, naive_attention
from .cache import KVCache
from .config import ModelArgs
from .errors import InputError
from .inputs import check_ids, check_mask, prepare_call
from .layout import choose_attention, compute_matrix, embedding_table
from .mlp import feed_forward, linear
from .norm import rms_norm
from .params import check_params
from .rope import apply_rotary_emb

Trace = Callable[[str, np.ndarray], None]

# The intermediates of one layer, in the order they are computed (q and k after rotary;
# scores_v: softmax(q k^T / sqrt(head_dim)) v, before wo).
LAYER_TRACE_NAMES = ("attention_norm", "attention.q", "attention.k", "attention.v", "attention.scores_v",
                     "attention", "attention_residual", "ffn_norm", "feed_forward", "ffn_residual")


def trace_names(n_layers: int) -> list[str]:
    """Every name a forward pass traces, in the order the values are computed."""
    return ["tok_embeddings", *(f"layers.{i}.{op}" for i in range(n_layers) for op in LAYER_TRACE_NAMES),
            "norm", "logits"]


def stream_names(n_layers: int) -> list[str]:
    """The residual stream between the blocks: the embeddings, each layer's output and the final
    norm's, the values ``given`` replaces to run each block from another's inputs."""
    return ["tok_embeddings", *(f"layers.{i}.ffn_residual" for i in range(n_layers)), "norm"]


@dataclass(frozen=True)
class Layer:
    """One decoder layer's weights, each matrix (out, in) as in the checkpoint."""
    index: int
    attention_norm: np.ndarray        # (dim,)
    wq: np.ndarray                    # (n_heads * head_dim, dim)
    wk: np.ndarray                    # (n_kv_heads * head_dim, dim)
    wv: np.ndarray                    # (n_kv_heads * head_dim, dim)
    wo: np.ndarray                    # (dim, n_heads * head_dim)
    ffn_norm: np.ndarray              # (dim,)
    w1: np.ndarray                    # (hidden_dim, dim)   the gate
    w2: np.ndarray                    # (dim, hidden_dim)   down
    w3: np.ndarray                    # (hidden_dim, dim)   up
    bq: np.ndarray | None = None      # biases (out,), where the config has them
    bk: np.ndarray | None = None
    bv: np.ndarray | None = None
    bo: np.ndarray | None = None
    b1: np.ndarray | None = None
    b2: np.ndarray | None = None
    b3: np.ndarray | None = None


@dataclass(frozen=True)
class Context:
    """What every layer of one forward call shares: the rotation angles of its positions, the
    cache, which keys are real tokens, the attention implementation, and the trace hooks."""
    args: ModelArgs
    cos: np.ndarray                   # (batch, 1, seq, rotary_dim)
    sin: np.ndarray                   # (batch, 1, seq, rotary_dim)
    cache: KVCache | None = None
    kv_mask: np.ndarray | None = None  # (batch, kv_len): False where a key is padding; None: none is
    attention_impl: str = "auto"      # "naive", "flash" or "auto" (layout.choose_attention)
    trace: Trace | None = None        # sees every named intermediate
    given: Mapping[str, np.ndarray] | None = None   # the oracle's: intermediates used instead of ours,
                                                    # in the model's dtype

    def named(self, layer: int | None, op: str, x: np.ndarray) -> np.ndarray:
        """x under its trace name (``layers.{layer}.`` + op, or op): shown to the trace hook, and
        returned, or replaced by the one ``given`` holds under that name."""
        if self.trace is None and self.given is None:
            return x
        name = op if layer is None else f"layers.{layer}.{op}"
        if self.trace is not None:
            self.trace(name, x)
        if self.given is not None and name in self.given:
            return self.given[name]
        return x


# ---------------------------------------------------------------------------- the blocks
def attention(x: np.ndarray, layer: Layer, ctx: Context) -> np.ndarray:
    """Multi-head attention with rotary q and k and grouped key/value heads.

    x: (batch, seq, dim) -> (batch, seq, dim). The keys and values of this call are written to
    the cache (if any) and the queries attend to every cached position and their own.
    """
    hd, i = ctx.args.head_dim, layer.index
    xq = split_heads(linear(x, layer.wq, layer.bq), hd)          # (batch, n_heads, seq, head_dim)
    xk = split_heads(linear(x, layer.wk, layer.bk), hd)          # (batch, n_kv_heads, seq, head_dim)
    xv = split_heads(linear(x, layer.wv, layer.bv), hd)          # (batch, n_kv_heads, seq, head_dim)
    xq = ctx.named(i, "attention.q", apply_rotary_emb(xq, ctx.cos, ctx.sin))
    xk = ctx.named(i, "attention.k", apply_rotary_emb(xk, ctx.cos, ctx.sin))
    xv = ctx.named(i, "attention.v", xv)
    keys, values = (xk, xv) if ctx.cache is None else ctx.cache.update(i, xk, xv)  # (batch, n_kv_heads, kv_len, hd)
    out = scaled_dot_product_attention(xq, keys, values, ctx.attention_impl, ctx.kv_mask)
    out = ctx.named(i, "attention.scores_v", out)                # (batch, n_heads, seq, head_dim)
    return linear(merge_heads(out), layer.wo, layer.bo)          # (batch, seq, dim)


def split_heads(x: np.ndarray, head_dim: int) -> np.ndarray:
    """(batch, seq, heads * head_dim) -> (batch, heads, seq, head_dim)."""
    b, seq, _ = x.shape
    return x.reshape(b, seq, -1, head_dim).transpose(0, 2, 1, 3)


def merge_heads(x: np.ndarray) -> np.ndarray:
    """(batch, heads, seq, head_dim) -> (batch, seq, heads * head_dim)."""
    b, h, seq, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, seq, h * d)


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
    i, eps = layer.index, ctx.args.norm_eps
    x = ctx.named(i, "attention_norm", rms_norm(h, layer.attention_norm, eps))      # (batch, seq, dim)
    a = ctx.named(i, "attention", attention(x, layer, ctx))
    h = ctx.named(i, "attention_residual", h + a)                # the residual stream after attention
    y = ctx.named(i, "ffn_norm", rms_norm(h, layer.ffn_norm, eps))
    f = ctx.named(i, "feed_forward", feed_forward(y, layer.w1, layer.w2, layer.w3, layer.b1, layer.b2, layer.b3))
    return ctx.named(i, "ffn_residual", h + f)                   # ... and after the MLP


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

        def vector(name: str) -> np.ndarray | None:            # a norm's weight or a bias, if the file has it
            return np.ascontiguousarray(params[name], dtype=self.dtype) if name in params else None

        def matrix(short: str, name: str):                     # (out, in), in its compute layout
            return compute_matrix(short, params[name], self.dtype)

        self.tok_embeddings = embedding_table(params["tok_embeddings.weight"], self.dtype)   # (vocab, dim)
        self.norm = vector("norm.weight")                                                   # (dim,)
        self.output = matrix("output", "tok_embeddings.weight" if args.tie_word_embeddings
                             else "output.weight")                                          # (vocab, dim)
        self.layers = []
        for i in range(args.n_layers):
            a, f = f"layers.{i}.attention.", f"layers.{i}.feed_forward."
            self.layers.append(Layer(
                index=i, attention_norm=vector(f"layers.{i}.attention_norm.weight"),
                wq=matrix("wq", a + "wq.weight"), wk=matrix("wk", a + "wk.weight"),
                wv=matrix("wv", a + "wv.weight"), wo=matrix("wo", a + "wo.weight"),
                ffn_norm=vector(f"layers.{i}.ffn_norm.weight"),
                w1=matrix("w1", f + "w1.weight"), w2=matrix("w2", f + "w2.weight"), w3=matrix("w3", f + "w3.weight"),
                bq=vector(a + "wq.bias"), bk=vector(a + "wk.bias"), bv=vector(a + "wv.bias"),
                bo=vector(a + "wo.bias"), b1=vector(f + "w1.bias"), b2=vector(f + "w2.bias"),
                b3=vector(f + "w3.bias")))

    # -------------------------------------------------------------- the call
    def __call__(self, ids, cache: KVCache | None = None, *, attention_mask=None, attention: str = "auto",
                 trace: Trace | None = None, given: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
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
        trace(name, array), if given, sees every named intermediate (see the module docstring);
        given: name -> array, intermediates to continue from instead of the model's own (the
        oracle's isolated trace runs each layer from a port's input to it).
        """
        call = prepare_call(self.config, ids, attention_mask, cache, self.dtype)     # inputs.py: the guards
        ctx = Context(self.config, cos=call.cos, sin=call.sin, cache=cache, kv_mask=call.kv_mask,
                      attention_impl=attention, trace=trace, given=given)
        h = ctx.named(None, "tok_embeddings", self.tok_embeddings[call.ids])       # (batch, seq, dim)
        for layer in self.layers:
            h = transformer_block(h, layer, ctx)
        if cache is not None:
            cache.advance(call.ids.shape[1])
        h = ctx.named(None, "norm", rms_norm(h, self.norm, self.config.norm_eps))
        return ctx.named(None, "logits", linear(h, self.output).astype(np.float32, copy=False))  # (batch, seq, vocab)

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
        return check_ids(ids, self.config.vocab_size)

    def state_dict(self) -> dict[str, np.ndarray]:
        """The weights in checkpoint names (params.py): npllama's (Meta's) names, every matrix
        (out, in), and wq / wk rows in the rotate-half layout (rope.py; Hugging Face's order, not
        Meta's interleaved one: ``npllama export --layout meta`` writes that). The arrays themselves,
        no copies; the tied LM head has no ``output.weight`` of its own."""
        sd = {"tok_embeddings.weight": self.tok_embeddings, "norm.weight": self.norm}
        if not self.config.tie_word_embeddings:
            sd["output.weight"] = self.output
        for layer in self.layers:
            a, f = f"layers.{layer.index}.attention.", f"layers.{layer.index}.feed_forward."
            parts = {f"layers.{layer.index}.attention_norm.weight": layer.attention_norm,
                     f"layers.{layer.index}.ffn_norm.weight": layer.ffn_norm,
                     a + "wq.weight": layer.wq, a + "wk.weight": layer.wk, a + "wv.weight": layer.wv,
                     a + "wo.weight": layer.wo, f + "w1.weight": layer.w1, f + "w2.weight": layer.w2,
                     f + "w3.weight": layer.w3, a + "wq.bias": layer.bq, a + "wk.bias": layer.bk,
                     a + "wv.bias": layer.bv, a + "wo.bias": layer.bo, f + "w1.bias": layer.b1,
                     f + "w2.bias": layer.b2, f + "w3.bias": layer.b3}
            sd.update({name: w for name, w in parts.items() if w is not None})
        return sd

    def num_parameters(self) -> int:
        return sum(a.size for a in self.state_dict().values())


# ---------------------------------------------------------------------------- the loss
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
