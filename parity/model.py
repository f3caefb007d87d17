"""The LLaMA decoder in Torch, the twin of npllama.model: same functions, same names, same trace.

    h = tok_embeddings[ids]
    for each layer:
        h = h + attention(attention_norm(h))      # rotary q/k, grouped kv heads, causal
        h = h + feed_forward(ffn_norm(h))         # SwiGLU
    logits = norm(h) @ output^T                    # output is tok_embeddings when tied

The maths are functions (``attention``, ``transformer_block``, ``scaled_dot_product_attention``,
``cross_entropy_loss``), one for one with npllama.model, and they share npllama's per-call
``Context`` (rotary angles, cache, attention implementation, trace hook). The weights live in a
tree of small ``nn.Module`` containers named as Meta names them, unfused as in the files, so
``state_dict()`` gives back exactly the checkpoint names of npllama.params.param_shapes, in
nn.Linear's (out, in) layout (npllama's too), and the parameters are
``nn.Parameter``\\ s that autograd can train (forward is differentiable end to end).

Differences from npllama, all deliberate:
- ``attention="auto"`` picks torch's fused ``sdpa`` (npllama picks naive or blockwise): every
  implementation computes the same function, and the parity tests hold each to npllama's;
- ``loss`` returns a 0-dim tensor (differentiable), not a float;
- a loaded model's parameters do not require grad (inference); ``model.requires_grad_()`` turns
  training on.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from npllama.config import ModelArgs
from npllama.errors import InputError
from npllama.inputs import call_positions, check_mask
from npllama.model import Context
from npllama.params import check_params

from .attention import flash_attention, naive_attention, sdpa_attention
from .cache import KVCache
from .mapped import mapped_weight
from .mlp import feed_forward, linear
from .norm import rms_norm
from .rope import apply_rotary_emb, rope_cos_sin, rope_init

Trace = Callable[[str, torch.Tensor], None]

ATTENTION_IMPLS = ("naive", "flash", "sdpa", "auto")


# ---------------------------------------------------------------------------- the blocks
def attention(x: torch.Tensor, layer: "Layer", ctx: Context) -> torch.Tensor:
    """Multi-head attention with rotary q and k and grouped key/value heads.

    x: (batch, seq, dim) -> (batch, seq, dim). The keys and values of this call are written to
    the cache (if any) and the queries attend to every cached position and their own.
    """
    hd, i, a = ctx.args.head_dim, layer.index, layer.attention
    xq = split_heads(linear(x, a.wq.weight, a.wq.bias), hd)      # (batch, n_heads, seq, head_dim)
    xk = split_heads(linear(x, a.wk.weight, a.wk.bias), hd)      # (batch, n_kv_heads, seq, head_dim)
    xv = split_heads(linear(x, a.wv.weight, a.wv.bias), hd)      # (batch, n_kv_heads, seq, head_dim)
    xq = ctx.named(i, "attention.q", apply_rotary_emb(xq, ctx.cos, ctx.sin))
    xk = ctx.named(i, "attention.k", apply_rotary_emb(xk, ctx.cos, ctx.sin))
    xv = ctx.named(i, "attention.v", xv)
    keys, values = (xk, xv) if ctx.cache is None else ctx.cache.update(i, xk, xv)  # (batch, n_kv_heads, kv_len, hd)
    out = scaled_dot_product_attention(xq, keys, values, ctx.attention_impl, ctx.kv_mask)
    out = ctx.named(i, "attention.scores_v", out)                # (batch, n_heads, seq, head_dim)
    return linear(merge_heads(out), a.wo.weight, a.wo.bias)      # (batch, seq, dim)


def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(batch, seq, heads * head_dim) -> (batch, heads, seq, head_dim)."""
    b, seq, _ = x.shape
    return x.view(b, seq, -1, head_dim).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(batch, heads, seq, head_dim) -> (batch, seq, heads * head_dim)."""
    b, h, seq, d = x.shape
    return x.transpose(1, 2).reshape(b, seq, h * d)


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str,
                                 kv_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention by the named implementation; all compute the same function.

    q: (batch, n_heads, q_len, head_dim); k, v: (batch, n_kv_heads, kv_len, head_dim);
    kv_mask: (batch, kv_len), False where a key is padding -> (batch, n_heads, q_len, head_dim).
    impl: "naive" (scores materialised, as npllama), "flash" (blockwise, online softmax),
    "sdpa" (torch's fused kernel), "auto" (= "sdpa").
    """
    if impl == "auto":
        impl = "sdpa"
    if impl == "naive":
        return naive_attention(q, k, v, causal=True, kv_mask=kv_mask)
    if impl == "flash":
        return flash_attention(q, k, v, causal=True, kv_mask=kv_mask)
    if impl == "sdpa":
        return sdpa_attention(q, k, v, causal=True, kv_mask=kv_mask)
    raise InputError(f"unknown attention implementation {impl!r}; choose one of {', '.join(ATTENTION_IMPLS)}")


def transformer_block(h: torch.Tensor, layer: "Layer", ctx: Context) -> torch.Tensor:
    """One pre-norm decoder layer. h: (batch, seq, dim) -> (batch, seq, dim)."""
    i, m = layer.index, layer.feed_forward
    x = ctx.named(i, "attention_norm", rms_norm(h, layer.attention_norm.weight, layer.attention_norm.eps))
    a = ctx.named(i, "attention", attention(x, layer, ctx))
    h = ctx.named(i, "attention_residual", h + a)                # the residual stream after attention
    y = ctx.named(i, "ffn_norm", rms_norm(h, layer.ffn_norm.weight, layer.ffn_norm.eps))
    f = ctx.named(i, "feed_forward", feed_forward(y, m.w1.weight, m.w2.weight, m.w3.weight,
                                                  m.w1.bias, m.w2.bias, m.w3.bias))
    return ctx.named(i, "ffn_residual", h + f)                   # ... and after the MLP


def cross_entropy_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy, as transformers' LlamaForCausalLM computes it (0-dim tensor).

    logits: (batch, seq, vocab); labels: (batch, seq), aligned with the input ids: position t
    predicts labels[t + 1]. Labels equal to ignore_index (-100) are left out of the mean; when
    every label is ignored the result is nan, as in npllama.
    """
    logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))  # (batch, seq-1, vocab)
    targets = torch.as_tensor(labels, device=logits.device)[:, 1:]                 # (batch, seq-1)
    keep = targets != ignore_index
    log_z = torch.logsumexp(logits, dim=-1)                                        # (batch, seq-1)
    picked = torch.gather(logits, -1, torch.where(keep, targets, 0)[..., None])[..., 0]
    return ((log_z - picked) * keep).sum() / keep.sum()


def pack_real_tokens(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                     ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's real tokens moved to its front, in order, as if the row had run alone
    (npllama.model.pack_real_tokens). logits: (batch, seq, vocab); labels, mask: (batch, seq)
    -> logits (batch, n, vocab), labels (batch, n), the tail of shorter rows labelled ignore_index."""
    n = int(mask.sum(dim=1).max())
    packed_logits = logits.new_zeros((logits.shape[0], n, logits.shape[2]))
    packed_labels = torch.full((labels.shape[0], n), ignore_index, dtype=torch.int64, device=labels.device)
    for b in range(mask.shape[0]):
        count = int(mask[b].sum())
        packed_logits[b, :count] = logits[b, mask[b]]
        packed_labels[b, :count] = labels[b, mask[b]]
    return packed_logits, packed_labels


def rotary_angles(args: ModelArgs, positions: np.ndarray, mask: np.ndarray, dtype: torch.dtype,
                  device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for every column of a call (npllama.inputs.rotary_angles): (batch, 1, seq,
    rotary_dim). positions, mask: (batch, seq) on the host; the table is npllama's float64 one,
    the angles are computed on the device."""
    inv_freq, scaling = rope_init(args, int(positions[mask].max(initial=0)) + 1, device=device)
    positions = torch.from_numpy(np.ascontiguousarray(positions)).to(device)
    cos, sin = rope_cos_sin(inv_freq, positions, scaling, dtype)                    # (batch, seq, rotary_dim)
    return cos[:, None], sin[:, None]


def embedding(ids: torch.Tensor, weight: "torch.Tensor | nn.Module") -> torch.Tensor:
    """The rows of ids in the table: F.embedding, or a mapped table's own lookup (parity.mapped)."""
    return F.embedding(ids, weight) if isinstance(weight, torch.Tensor) else weight.rows(ids)


def _host(mask):
    """An attention mask given as a tensor (on any device) or array-like, as a host array, or None."""
    if isinstance(mask, torch.Tensor):
        return mask.detach().cpu().numpy()
    return mask


# ---------------------------------------------------------------------------- the weights
def _param(t: torch.Tensor | None, requires_grad: bool) -> nn.Parameter | None:
    return None if t is None else nn.Parameter(t, requires_grad=requires_grad)


class Linear(nn.Module):
    """The parameters of one projection: weight (out, in), as nn.Linear, and an optional bias (out,).
    The weight may be a quantized one (parity.quant.Int8Weight / Int4Weight), a module of buffers."""

    def __init__(self, weight: "torch.Tensor | nn.Module", bias: torch.Tensor | None = None,
                 requires_grad: bool = False):
        super().__init__()
        self.weight = weight if isinstance(weight, nn.Module) else _param(weight, requires_grad)
        self.register_parameter("bias", _param(bias, requires_grad))


class RMSNorm(nn.Module):
    """The gain of one RMSNorm (dim,), and its eps (a plain attribute, as in Meta's RMSNorm)."""

    def __init__(self, weight: torch.Tensor, eps: float, requires_grad: bool = False):
        super().__init__()
        self.weight = _param(weight, requires_grad)
        self.eps = eps


class Embedding(nn.Module):
    """The token embedding table (vocab, dim); or a MappedWeight, left in its file (parity.mapped)."""

    def __init__(self, weight: "torch.Tensor | nn.Module", requires_grad: bool = False):
        super().__init__()
        self.weight = weight if isinstance(weight, nn.Module) else _param(weight, requires_grad)


class Attention(nn.Module):
    """wq, wk, wv and wo of one layer (HF: q_proj, k_proj, v_proj, o_proj)."""

    def __init__(self, wq: Linear, wk: Linear, wv: Linear, wo: Linear):
        super().__init__()
        self.wq, self.wk, self.wv, self.wo = wq, wk, wv, wo


class FeedForward(nn.Module):
    """w1, w2 and w3 of one layer's SwiGLU (HF: gate_proj, down_proj, up_proj)."""

    def __init__(self, w1: Linear, w2: Linear, w3: Linear):
        super().__init__()
        self.w1, self.w2, self.w3 = w1, w2, w3


class Layer(nn.Module):
    """One layer's weights: attention_norm, attention, ffn_norm, feed_forward; and its index."""

    def __init__(self, index: int, attention_norm: RMSNorm, attention: Attention, ffn_norm: RMSNorm,
                 feed_forward: FeedForward):
        super().__init__()
        self.index = index
        self.attention_norm, self.attention = attention_norm, attention
        self.ffn_norm, self.feed_forward = ffn_norm, feed_forward


# ---------------------------------------------------------------------------- the model
class Transformer(nn.Module):
    """A LLaMA-family model in Torch: ``model(ids)`` and ``model(ids, cache=cache)`` give logits.

    params: checkpoint names -> NumPy arrays or tensors in (out, in) layout (as npllama's loaders
    and npllama.Transformer.state_dict give them). They are copied to ``device`` in ``dtype``; a
    matrix npllama left in its file stays there (parity.mapped.MappedWeight, on the CPU).
    quantize: None, or a parity.quant.Quantizer: every projection's weight (the LM head too, tied
    or not) becomes its quantized module; the embedding table stays floats.
    """

    def __init__(self, args: ModelArgs, params: Mapping[str, "np.ndarray | torch.Tensor"], tokenizer=None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 source: str = "checkpoint", requires_grad: bool = False, quantize=None):
        super().__init__()
        check_params(args, params, source)
        self.config = args
        self.tokenizer = tokenizer
        self.source = source               # what run-time errors name (parity.numerics)
        def tensor(name: str) -> "torch.Tensor | nn.Module | None":
            if name not in params:
                return None
            a = params[name]
            mapped = None if quantize else mapped_weight(a, dtype, device or "cpu")
            if mapped is not None:
                if requires_grad:
                    raise InputError(f"{name} is left in its file (a read-only memory map) and cannot be "
                                     f"trained; load the checkpoint with mapped=False")
                return mapped
            a = a.detach() if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
            return a.to(device=device, dtype=dtype, copy=True).contiguous()

        def lin(name: str) -> Linear:
            weight = quantize(name, params[name + ".weight"]) if quantize else tensor(name + ".weight")
            return Linear(weight, tensor(name + ".bias"), requires_grad)

        self.tok_embeddings = Embedding(tensor("tok_embeddings.weight"), requires_grad)   # (vocab, dim)
        self.layers = nn.ModuleList()
        for i in range(args.n_layers):
            p, a, f = f"layers.{i}.", f"layers.{i}.attention.", f"layers.{i}.feed_forward."
            self.layers.append(Layer(
                i, RMSNorm(tensor(p + "attention_norm.weight"), args.norm_eps, requires_grad),
                Attention(lin(a + "wq"), lin(a + "wk"), lin(a + "wv"), lin(a + "wo")),
                RMSNorm(tensor(p + "ffn_norm.weight"), args.norm_eps, requires_grad),
                FeedForward(lin(f + "w1"), lin(f + "w2"), lin(f + "w3"))))
        self.norm = RMSNorm(tensor("norm.weight"), args.norm_eps, requires_grad)           # (dim,)
        if not args.tie_word_embeddings:
            head = quantize("output", params["output.weight"]) if quantize else tensor("output.weight")
            self.output = Linear(head, None, requires_grad)                                # (vocab, dim)
        elif quantize:                                 # tied: the head quantized, the lookup kept float
            self.output = Linear(quantize("output", params["tok_embeddings.weight"]))

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    @property
    def output_weight(self) -> torch.Tensor:
        """The LM head (vocab, dim): the embedding table itself when tied (and not quantized)."""
        return self.output.weight if "output" in self._modules else self.tok_embeddings.weight

    # -------------------------------------------------------------- the call
    def forward(self, ids, cache: KVCache | None = None, *, attention_mask=None, attention: str = "auto",
                trace: Trace | None = None, given: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """ids: (batch, seq) integer token ids -> logits (batch, seq, vocab), float32, on the device.

        attention_mask: (batch, seq) of 1 (a token) and 0 (padding), with npllama.model's meaning:
        each row's real tokens get positions counted from its first one, and padding is never
        attended. With a cache, the ids continue the sequences the cache holds, and only the new
        columns' logits are returned. trace(name, tensor), if given, sees every named
        intermediate under npllama's names; given: name -> tensor, intermediates to continue from
        instead of the model's own (parity.report.capture_isolated).
        """
        if attention not in ATTENTION_IMPLS:
            raise InputError(f"unknown attention implementation {attention!r}; "
                             f"choose one of {', '.join(ATTENTION_IMPLS)}")
        ids = self.check_ids(ids)
        ctx = self.prepare_call(ids, attention_mask, cache, attention, trace, given)
        h = ctx.named(None, "tok_embeddings", embedding(ids, self.tok_embeddings.weight))     # (batch, seq, dim)
        for layer in self.layers:
            h = transformer_block(h, layer, ctx)
        if cache is not None:
            cache.advance(ids.shape[1])
        h = ctx.named(None, "norm", rms_norm(h, self.norm.weight, self.norm.eps))
        return ctx.named(None, "logits", linear(h, self.output_weight).float())   # (batch, seq, vocab)

    def prepare_call(self, ids: torch.Tensor, attention_mask, cache: KVCache | None, attention: str,
                     trace: Trace | None, given) -> Context:
        """npllama.inputs.prepare_call's checks and bookkeeping (on the host), the angles on the device."""
        mask = check_mask(_host(attention_mask), tuple(ids.shape), cache)          # (batch, seq) bool, host
        positions, kv_mask = call_positions(self.config, mask, cache)
        cos, sin = rotary_angles(self.config, positions, mask, self.dtype, self.device)
        kv_mask = None if kv_mask is None else torch.from_numpy(np.ascontiguousarray(kv_mask)).to(self.device)
        return Context(self.config, cos, sin, cache, kv_mask, attention, trace, given)

    def new_cache(self, batch_size: int = 1, max_seq_len: int | None = None) -> KVCache:
        """An empty static KV cache for batch_size sequences of up to max_seq_len (default: the
        context window; it is allocated at once, so name a smaller one when you know it)."""
        return KVCache(self.config, batch_size, max_seq_len, dtype=self.dtype, device=self.device)

    def loss(self, ids, labels=None, ignore_index: int = -100, attention_mask=None) -> torch.Tensor:
        """Next-token cross-entropy of ids (labels default to ids), a differentiable 0-dim tensor.

        attention_mask: (batch, seq), 0 for padding: as npllama.model.Transformer.loss, each row's
        real tokens are scored as if the row ran alone.
        """
        ids = self.check_ids(ids)
        labels = ids if labels is None else torch.as_tensor(labels, device=self.device)
        if tuple(labels.shape) != tuple(ids.shape):
            raise InputError(f"labels have shape {tuple(labels.shape)}, but ids have {tuple(ids.shape)}")
        logits = self(ids, attention_mask=attention_mask)
        if attention_mask is not None:
            mask = torch.from_numpy(check_mask(_host(attention_mask), tuple(ids.shape))).to(self.device)
            logits, labels = pack_real_tokens(logits, labels, mask, ignore_index)
        return cross_entropy_loss(logits, labels, ignore_index)

    def check_ids(self, ids) -> torch.Tensor:
        """Token ids as an int64 (batch, seq) tensor on the model's device, or an InputError.

        The range check reads the ids, so it is skipped for ids already on an accelerator (the
        decode loop's own tokens): it would cost a device-to-host sync per token.
        """
        if isinstance(ids, torch.Tensor):
            t = ids
        else:
            arr = np.asarray(ids)
            if arr.size and not np.issubdtype(arr.dtype, np.integer):
                raise InputError(f"ids must be integers, got {arr.dtype}")
            t = torch.from_numpy(arr.astype(np.int64, copy=False)) if arr.size else torch.zeros(arr.shape, dtype=torch.int64)
        if t.ndim == 1:
            t = t[None, :]
        if t.ndim != 2 or t.shape[0] == 0 or t.shape[1] == 0:
            raise InputError(f"ids must be a non-empty (batch, seq) array of token ids, got shape {tuple(t.shape)}")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise InputError(f"ids must be integers, got {t.dtype}")
        if t.device.type == "cpu":
            bad = (t < 0) | (t >= self.config.vocab_size)
            if bad.any():
                raise InputError(f"token id {int(t[bad][0])} lies outside the vocabulary "
                                 f"(0..{self.config.vocab_size - 1})")
        return t.to(device=self.device, dtype=torch.int64)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

