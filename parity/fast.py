"""The fast decode path: a gpt-fast-style decoder built from a parity Transformer's weights.

parity.model mirrors npllama op for op, so that the two can be compared; this module computes the
same function with everything that makes decoding fast on a GPU (and not slower on a CPU):

- weights fused after loading (npllama.layout.fuse_params; gpt-fast fuses wq|wk|wv the same way
  and keeps w1, w3 apart): wq|wk|wv is one (q + 2 kv heads, dim) matrix and w1|w3 one
  (2 hidden_dim, dim) matrix, so each layer runs three GEMMs plus wo;
- a static KV cache, (n_layers, batch, n_kv_heads, max_seq_len, head_dim), allocated once; each call
  writes its keys and values at their slots with ``index_copy_``; nothing is allocated per token;
- every piece of decoding state (the last tokens, the slot, the per-row done flags, the uniforms,
  the tokens generated so far) lives in a device buffer that the decode step updates in place, so
  the step takes no arguments, has fixed shapes, and can be compiled with ``torch.compile``
  (``mode="reduce-overhead"``: one CUDA graph replay per token, no host-to-device copies);
- sampling happens inside the step, on the device (``parity.sampling.sample_batch``: argmax for
  greedy, otherwise the same inverse-CDF draw as npllama with the same pre-drawn uniforms from
  ``npllama.sampling.uniforms``), so the host never waits for a token: it reads the generated
  tokens and the done flags once every ``sync_every`` steps;
- prefill goes through ``F.scaled_dot_product_attention`` with ``is_causal=True`` (torch's flash
  kernel on CUDA) when the prompts have one length, with a padding mask otherwise.

Batches of prompts of different lengths are LEFT padded. Slot t of the cache is column t of the
padded batch for every row; row r's rotary position is t - pad[r] (its first real token sits at
position 0, as if it were alone), and its attention mask hides the slots t < pad[r]. A pad query
sees only its own key, so that no softmax row is empty (its output is never used). Each row stops
on its own stop token (a device-side done mask); rows that are done keep being computed until the
whole batch is (the shapes never change) and their extra tokens are dropped on the host.

    fd = FastDecoder(parity_model, batch_size=4, max_seq_len=512, compile="reduce-overhead")
    tokens = fd.generate([[1, 2, 3], [4, 5]], max_new_tokens=64)     # one list of new ids per prompt
    tokens = fast_generate(parity_model, [[1, 2, 3]], 64)            # builds a decoder for the call

Legend (npllama.config): batch, seq, dim, n_heads, n_kv_heads, head_dim, hidden_dim, vocab; and
slots: the cache's max_seq_len, the positions a decoder can hold (prompt + generated).

The fast path holds at most the trained length, config.max_seq_len: its rotary table is computed
once, and every rope variant has its short form there. That is the context window except under
dynamic NTK, whose rotation past the trained length changes with the length
(npllama.rope_scaling.context_window): there the reference and parity.generate go on past it,
and the fast path stops at it, saying so.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from npllama.checks import is_int
from npllama.config import ModelArgs
from npllama.errors import CheckpointError, InputError
from npllama.generate import row_seeds
from npllama.inputs import check_budget, check_token_ids
from npllama.layout import fuse_params

from .mlp import linear, silu
from .rope import rope_cos_sin, rope_init
from .sampling import SamplingSettings, sample_batch, uniforms

MAX_STOP_IDS = 16   # stop tokens live in a fixed-size device buffer (a fixed shape for the graph)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _frozen(t: "torch.Tensor | nn.Module | None") -> "nn.Parameter | nn.Module | None":
    """A tensor as a frozen parameter; a quantized weight (parity.quant) as it is."""
    if t is None or isinstance(t, nn.Module):
        return t
    return nn.Parameter(t.detach().contiguous(), requires_grad=False)


def project(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, in_out: bool) -> torch.Tensor:
    """x @ W^T + b with W stored (out, in) as nn.Linear (in_out False), or x @ W + b with W
    stored transposed, (in, out) (in_out True). x: (..., in) -> (..., out).

    Why two layouts: on a CPU, MKL's float32 matrix-vector product reads an (in, out) matrix
    faster than an (out, in) one at batch 1 (2x on the LM head, bench/bench_cpu.py), while its
    bfloat16 one is 10-40x slower that way; on a GPU, cuBLAS is at home with nn.Linear's layout,
    which gpt-fast and transformers use. A quantized weight (parity.quant) runs its own kernel.
    """
    if not isinstance(w, torch.Tensor):
        return w.linear(x, b)
    if not in_out:
        return linear(x, w, b)
    y = x @ w
    return y if b is None else y + b


# ---------------------------------------------------------------------------- the weights
class Stacked(nn.Module):
    """Quantized projections of one input joined along "out": each runs its own kernel and the
    outputs are concatenated (int4's packed buffers cannot be joined the way float rows can)."""

    def __init__(self, parts: Sequence[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        y = torch.cat([part.linear(x) for part in self.parts], dim=-1)
        return y if bias is None else y + bias


class FastBlock(nn.Module):
    """One layer's weights in compute layout, fused where two projections share their input.

    In nn.Linear's (out, in) layout: wqkv: ((n_heads + 2 n_kv_heads) * head_dim, dim), wq above wk
    above wv; wo: (dim, n_heads * head_dim); w13: (2 * hidden_dim, dim), w1 above w3;
    w2: (dim, hidden_dim); norms (dim,); biases fused alike. With in_out, every matrix is stored
    transposed, (in, out), contiguous (see ``project``).
    """

    def __init__(self, fused: dict[str, torch.Tensor], p: str, in_out: bool):
        super().__init__()

        def get(name: str) -> torch.Tensor | None:       # fused: npllama.layout.fuse_params's names
            w = fused.get(p + name)
            return w.T if isinstance(w, torch.Tensor) and in_out and w.ndim == 2 else w

        self.attention_norm = _frozen(get("attention_norm.weight"))
        self.wqkv = _frozen(get("attention.wqkv.weight"))
        self.bqkv = _frozen(get("attention.wqkv.bias"))
        self.wo = _frozen(get("attention.wo.weight"))
        self.bo = _frozen(get("attention.wo.bias"))
        self.ffn_norm = _frozen(get("ffn_norm.weight"))
        self.w13 = _frozen(get("feed_forward.w13.weight"))
        self.b13 = _frozen(get("feed_forward.w13.bias"))
        self.w2 = _frozen(get("feed_forward.w2.weight"))
        self.b2 = _frozen(get("feed_forward.w2.bias"))


class FastWeights(nn.Module):
    """A model's weights for the fast path, built once and shared by decoders of any batch size.

    model: a parity.Transformer (its state_dict: checkpoint names, (out, in) layout); the weights
    keep its dtype and device. layout: "out_in" (nn.Linear's), "in_out" (transposed), or "auto":
    in_out for float32 and float64 on a CPU, out_in elsewhere (see ``project``). With out_in,
    tied embeddings stay one tensor. A quantized model (parity.load(..., weights="int8" | "int4" |
    "gguf")) keeps its quantized weight modules, shared with the model, and its float embedding.
    """

    def __init__(self, model, layout: str = "auto"):
        super().__init__()
        self.config: ModelArgs = model.config
        self.tokenizer = getattr(model, "tokenizer", None)
        self.source = getattr(model, "source", None)
        if layout not in ("auto", "out_in", "in_out"):
            raise InputError(f"unknown weight layout {layout!r}; choose 'auto', 'out_in' or 'in_out'")
        if getattr(model, "weights", "float32") != "float32":
            self._from_quantized(model)
            return
        from .mapped import has_mapped
        if has_mapped(model):
            raise InputError("the fast path fuses the weights into new tensors, and this model's are left in their "
                             "files (mapped, too large to copy); use the plain model, or load with mapped=False")
        first = next(iter(model.state_dict().values()))
        cpu_wide = first.device.type == "cpu" and first.dtype in (torch.float32, torch.float64)
        self.in_out = layout == "in_out" or (layout == "auto" and cpu_wide)
        with torch.no_grad():
            sd = {name: t.detach() for name, t in model.state_dict().items()}
            fused = fuse_params(self.config, sd, concat=torch.cat)
            self.tok_embeddings = _frozen(sd["tok_embeddings.weight"])              # (vocab, dim)
            self.layers = nn.ModuleList(FastBlock(fused, f"layers.{i}.", self.in_out)
                                        for i in range(self.config.n_layers))
            self.norm = _frozen(sd["norm.weight"])                                  # (dim,)
            head = sd["tok_embeddings.weight" if self.config.tie_word_embeddings else "output.weight"]
            if self.in_out:
                self.output = _frozen(head.T)                                       # (dim, vocab)
            elif self.config.tie_word_embeddings:
                self.output = self.tok_embeddings                                   # one tensor
            else:
                self.output = _frozen(head)                                         # (vocab, dim)

    def _from_quantized(self, model) -> None:
        """The weights of a quantized parity model, read off its tree ((out, in)); the projections
        that share an input are stacked (Stacked: quantized buffers are not concatenated)."""
        self.in_out = False
        fused: dict = {}
        for layer in model.layers:
            p, a, f = f"layers.{layer.index}.", layer.attention, layer.feed_forward
            for name, parts in (("attention_norm", [layer.attention_norm]), ("ffn_norm", [layer.ffn_norm]),
                                ("attention.wqkv", [a.wq, a.wk, a.wv]), ("attention.wo", [a.wo]),
                                ("feed_forward.w13", [f.w1, f.w3]), ("feed_forward.w2", [f.w2])):
                fused[p + name + ".weight"] = parts[0].weight if len(parts) == 1 else Stacked([m.weight for m in parts])
                if getattr(parts[0], "bias", None) is not None:
                    fused[p + name + ".bias"] = torch.cat([m.bias for m in parts])
        self.tok_embeddings = _frozen(model.tok_embeddings.weight)                  # (vocab, dim)
        self.layers = nn.ModuleList(FastBlock(fused, f"layers.{i}.", False) for i in range(self.config.n_layers))
        self.norm = _frozen(model.norm.weight)
        self.output = _frozen(model.output_weight)                                  # a quantized module

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.dtype

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.device

    def nbytes(self) -> int:
        """Bytes of every distinct weight tensor (the tied head counted once), quantized weights'
        codes and scales included."""
        return sum(t.numel() * t.element_size() for t in (*self.parameters(), *self.buffers()))

    def decode_bytes(self) -> int:
        """Bytes one decode step reads, KV cache aside: every matrix and norm once, the LM head,
        and one row per token of the embedding table (unless that table is the LM head itself)."""
        total = self.nbytes()
        if self.output is not self.tok_embeddings:
            e = self.tok_embeddings
            total -= (e.shape[0] - 1) * e.shape[1] * e.element_size()
        return total


# ---------------------------------------------------------------------------- the blocks
# The ops below compute what parity.norm.rms_norm, parity.rope.apply_rotary_emb and
# parity.attention compute, in fewer (eager) kernels: on a CPU each op costs a few microseconds
# however small its tensors, and a decode step runs ~15 of them per layer.
def bad_rows(logits: torch.Tensor) -> torch.Tensor:
    """(batch, vocab) -> (batch,) bool: rows no token should be drawn from (parity.numerics.bad_logits, per row)."""
    return ~torch.isfinite(logits).all(-1) | (logits.amax(-1) == logits.amin(-1))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """parity.norm.rms_norm's arithmetic (statistic in at least float32, normalised x cast back to
    x's dtype, then the gain), with rsqrt for 1 / sqrt. x: (..., dim); weight: (dim,) -> x's shape
    and dtype."""
    x32 = x.to(torch.promote_types(x.dtype, torch.float32))
    return (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def apply_rotary_rolled(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin over the first rotary_dim channels, the rest passed through.

    rotate_half(x) * sin = (-x2, x1) * (sin1, sin2) is computed as roll(x, half) * (-sin1, sin2),
    the sign kept in the table: one roll instead of two slices, a negation and a concatenation.
    x: (batch, seq, heads, head_dim); cos, sin_signed: (batch, seq, 1, rotary_dim) -> x's shape.
    """
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + x.roll(rot // 2, -1) * sin_signed
    x_rot = x[..., :rot]
    return torch.cat([x_rot * cos + x_rot.roll(rot // 2, -1) * sin_signed, x[..., rot:]], dim=-1)


def fused_attention(x: torch.Tensor, layer: FastBlock, args: ModelArgs, cos: torch.Tensor, sin: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
                    bias: torch.Tensor | None, from_cache: bool, in_out: bool) -> torch.Tensor:
    """Attention of seq new positions through the fused wqkv, writing their keys and values into
    the static cache (parity.model.attention's arithmetic on the fast path).

    x: (batch, seq, dim); cos, sin: (batch, seq, 1, rotary_dim), per row (left padding; sin signed,
    see apply_rotary_rolled); k_cache, v_cache: (batch, n_kv_heads, slots, head_dim); slots: (seq,)
    the cache columns to write. bias: the additive mask of grouped_mask, (batch, 1, n_rep * seq, kv),
    or None for plain causal attention. from_cache: attend over the whole cache (decode), or over
    the seq new keys only (prefill into an empty cache). -> (batch, seq, dim)
    """
    b, seq, _ = x.shape
    hd, nq, nkv = args.head_dim, args.n_heads, args.n_kv_heads
    qkv = project(x, layer.wqkv, layer.bqkv, in_out).view(b, seq, nq + 2 * nkv, hd)   # (batch, seq, heads, hd)
    qk = apply_rotary_rolled(qkv[:, :, : nq + nkv], cos, sin)                # q and k rotated together
    q = qk[:, :, :nq].transpose(1, 2)                                        # (batch, nq, seq, hd)
    k = qk[:, :, nq:].transpose(1, 2)                                        # (batch, nkv, seq, hd)
    v = qkv[:, :, nq + nkv:].transpose(1, 2)                                 # (batch, nkv, seq, hd)
    k_cache.index_copy_(2, slots, k)
    v_cache.index_copy_(2, slots, v)
    if from_cache:
        k, v = k_cache, v_cache                                              # (batch, nkv, slots, hd)
    if bias is None:       # prefill of equal-length prompts: the flash kernel, grouped heads native
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=nq != nkv)
    else:
        out = grouped_attention(q, k, v, bias)
    out = out.transpose(1, 2).reshape(b, seq, nq * hd)                       # (batch, seq, nq * hd)
    return project(out, layer.wo, layer.bo, in_out)                          # (batch, seq, dim)


def grouped_mask(mask: torch.Tensor, n_rep: int, dtype: torch.dtype) -> torch.Tensor:
    """A boolean (batch, 1, seq, kv) mask as grouped_attention's additive one, built once per call:
    (batch, 1, n_rep * seq, kv), 0 where visible and -inf where not, row rep * seq + i for query i."""
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.where(mask, zero, -torch.inf).repeat(1, 1, n_rep, 1)


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Masked attention with grouped kv heads, k and v never repeated: each kv head's n_rep query
    heads are stacked as n_rep * seq query rows of one head (npllama.attention's grouping, flattened), so any
    SDPA kernel that takes a mask serves GQA, and the cache is read once per kv head.

    q: (batch, n_heads, seq, head_dim); k, v: (batch, n_kv_heads, kv, head_dim);
    bias: (batch, 1, n_rep * seq, kv) additive (grouped_mask) -> (batch, n_heads, seq, head_dim)
    """
    b, nq, seq, hd = q.shape
    qg = q.reshape(b, k.shape[1], -1, hd)                                    # (batch, nkv, n_rep * seq, hd)
    return F.scaled_dot_product_attention(qg, k, v, attn_mask=bias).reshape(b, nq, seq, hd)


def fused_feed_forward(x: torch.Tensor, layer: FastBlock, hidden_dim: int, in_out: bool) -> torch.Tensor:
    """SwiGLU through the fused w13: w1|w3 as one product. x: (batch, seq, dim) -> (batch, seq, dim)."""
    gate_up = project(x, layer.w13, layer.b13, in_out)                       # (batch, seq, 2 hidden_dim)
    return project(silu(gate_up[..., :hidden_dim]) * gate_up[..., hidden_dim:], layer.w2, layer.b2, in_out)


def fused_forward(w: FastWeights, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                  mask: torch.Tensor | None, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  cos_table: torch.Tensor, sin_table: torch.Tensor, from_cache: bool) -> torch.Tensor:
    """The decoder on fused weights over seq new positions of every row -> logits of the last one,
    (batch, vocab) float32.

    ids, positions: (batch, seq); slots: (seq,); mask: (batch, 1, seq, kv) boolean or None (causal);
    k_cache, v_cache: (n_layers, batch, n_kv_heads, slots, head_dim); cos_table, sin_table:
    (slots, rotary_dim), sin signed as apply_rotary_rolled wants it.
    """
    args = w.config
    cos = cos_table[positions][:, :, None]                                   # (batch, seq, 1, rotary_dim)
    sin = sin_table[positions][:, :, None]
    bias = None if mask is None else grouped_mask(mask, args.n_rep, w.dtype)
    h = F.embedding(ids, w.tok_embeddings)                                   # (batch, seq, dim)
    for i, layer in enumerate(w.layers):
        x = rms_norm(h, layer.attention_norm, args.norm_eps)
        h = h + fused_attention(x, layer, args, cos, sin, k_cache[i], v_cache[i], slots, bias, from_cache,
                                w.in_out)
        h = h + fused_feed_forward(rms_norm(h, layer.ffn_norm, args.norm_eps), layer, args.hidden_dim, w.in_out)
    h = rms_norm(h[:, -1], w.norm, args.norm_eps)                            # (batch, dim): last position only
    return project(h, w.output, None, w.in_out).float()                      # (batch, vocab)


def padding_mask(pad: torch.Tensor, q_slots: torch.Tensor, kv_slots: torch.Tensor) -> torch.Tensor:
    """Which key slot each query slot of each row may see: causal, and never a pad key.

    pad: (batch,) pad count of each row; q_slots: (seq,); kv_slots: (kv,)
    -> (batch, 1, seq, kv) boolean. A pad query (q < pad) sees only itself, so its softmax row is
    never empty (no NaN leaks into the cache); no real query ever sees a pad key.
    """
    q, k = q_slots[None, :, None], kv_slots[None, None, :]                   # (1, seq, 1), (1, 1, kv)
    real_key = k >= pad[:, None, None]                                       # (batch, 1, kv)
    return ((k <= q) & (real_key | (k == q)))[:, None]


# ---------------------------------------------------------------------------- the decoder
class FastDecoder(nn.Module):
    """Batched generation with a static cache and an argument-free, compilable decode step.

    model: a parity.Transformer (its weights are fused into a FastWeights) or a FastWeights to
    share. batch_size: rows of the cache (fewer prompts are allowed; spare rows are idle).
    max_seq_len: cache slots per row, the longest padded prompt plus new tokens it can hold
    (default: the trained length, config.max_seq_len; at most that: see the module docstring). compile: None (eager) or a torch.compile
    mode ("reduce-overhead": CUDA graphs) for the decode step; backend: torch.compile's backend
    ("inductor"; "aot_eager" traces and functionalises without generating code, for tests).
    layout: the weights' layout when built from a model (see FastWeights).
    """

    def __init__(self, model, batch_size: int = 1, max_seq_len: int | None = None,
                 compile: str | None = None, backend: str = "inductor", layout: str = "auto"):
        super().__init__()
        self.weights = model if isinstance(model, FastWeights) else FastWeights(model, layout)
        args = self.config = self.weights.config
        if not is_int(batch_size) or batch_size <= 0:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        slots = int(max_seq_len or args.max_seq_len)
        if not 0 < slots <= args.max_seq_len:
            raise InputError(f"max_seq_len must lie in 1..{args.max_seq_len} (the trained length, what the "
                             f"fast path holds), got {max_seq_len!r}")
        if compile is not None and compile not in COMPILE_MODES:
            raise InputError(f"unknown compile mode {compile!r}; choose None or one of {', '.join(COMPILE_MODES)}")
        self.batch_size, self.max_seq_len, self.compile_mode = batch_size, slots, compile
        dev, dt = self.weights.device, self.weights.dtype
        b = batch_size
        # The cache gets a multiple of 16 slots where the window allows (the spare ones stay masked):
        # the memory-efficient attention kernel wants the mask's rows 16-aligned.
        slots = min(-(-slots // 16) * 16, args.max_seq_len)

        # The rotary table for every slot, from npllama's float64 inverse frequencies. Positions never
        # pass the context window, where every variant (dynamic NTK included) has its short form.
        inv_freq, scaling = rope_init(args, slots, device=dev)
        cos, sin = rope_cos_sin(inv_freq, torch.arange(slots, device=dev), scaling, dt)
        half = cos.shape[-1] // 2
        sin = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1)              # signed, see apply_rotary
        self.register_buffer("cos_table", cos, persistent=False)                # (slots, rotary_dim)
        self.register_buffer("sin_table", sin, persistent=False)
        cache_shape = (args.n_layers, b, args.n_kv_heads, slots, args.head_dim)
        self.register_buffer("k_cache", torch.zeros(cache_shape, dtype=dt, device=dev), persistent=False)
        self.register_buffer("v_cache", torch.zeros(cache_shape, dtype=dt, device=dev), persistent=False)
        # Decoding state, all on the device, all updated in place by the step.
        state = {
            "slot_ids": torch.arange(slots, device=dev),                      # (slots,) 0 .. slots-1
            "pad": torch.zeros(b, dtype=torch.int64, device=dev),             # (batch,) left padding
            "slot": torch.zeros(1, dtype=torch.int64, device=dev),            # (1,) where the next token goes
            "tokens": torch.zeros(b, dtype=torch.int64, device=dev),          # (batch,) last sampled
            "done": torch.zeros(b, dtype=torch.bool, device=dev),             # (batch,) hit a stop token
            "stop_ids": torch.full((MAX_STOP_IDS,), -1, dtype=torch.int64, device=dev),
            "u": torch.zeros(slots + 1, b, dtype=torch.float64, device=dev),  # uniform for the token at slot+1
            "out": torch.zeros(b, slots + 1, dtype=torch.int64, device=dev),  # token sampled after each slot
            "bad": torch.zeros(b, slots + 1, dtype=torch.bool, device=dev),   # ... from logits that overflowed
        }
        for name, t in state.items():
            self.register_buffer(name, t, persistent=False)
        for t in (self.k_cache, self.v_cache, *state.values()):
            torch._dynamo.mark_static_address(t)   # fixed addresses: CUDA graphs mutate them in place
        self.settings = SamplingSettings()
        self._step = self._decode_step
        if compile is not None:
            self._step = torch.compile(self._decode_step, mode=compile, backend=backend, fullgraph=True)

    # -------------------------------------------------------------- prefill and decode
    @torch.no_grad()
    def prefill(self, prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Left-pad the prompts into the cache from slot 0; -> logits after each, (batch, vocab) float32.

        Rows beyond len(prompts) get a one-token dummy prompt. Resets the slot to the padded length.
        """
        ids, pad = self._pad(prompts)                                         # (batch, L), (batch,)
        length = ids.shape[1]
        if length > self.max_seq_len:
            raise InputError(f"the longest prompt is {length} tokens; this decoder holds {self.max_seq_len}")
        self.pad.copy_(torch.from_numpy(pad))
        slots = self.slot_ids[:length]                                        # (L,)
        positions = (slots[None, :] - self.pad[:, None]).clamp_(min=0)        # (batch, L)
        mask = None if not pad.any() else padding_mask(self.pad, slots, slots)  # (batch, 1, L, L)
        ids = torch.from_numpy(ids).to(self.weights.device)
        logits = fused_forward(self.weights, ids, positions, slots, mask, self.k_cache, self.v_cache,
                               self.cos_table, self.sin_table, from_cache=False)
        self.slot.fill_(length)
        return logits

    @torch.no_grad()
    def decode(self, tokens) -> torch.Tensor:
        """Feed one token per row at the current slot (eager); -> next logits (batch, vocab) float32."""
        tokens = torch.as_tensor(tokens, dtype=torch.int64, device=self.weights.device).reshape(self.batch_size)
        if int(self.slot) >= self.max_seq_len:
            raise InputError(f"the cache's {self.max_seq_len} slots are full")
        self.tokens.copy_(tokens)
        logits = self._decode_logits()
        self.slot += 1
        return logits

    def _decode_logits(self) -> torch.Tensor:
        """Logits after feeding self.tokens at self.slot, every row at its own position."""
        positions = (self.slot - self.pad)[:, None]                           # (batch, 1)
        mask = padding_mask(self.pad, self.slot, self.slot_ids)               # (batch, 1, 1, slots)
        return fused_forward(self.weights, self.tokens[:, None], positions, self.slot, mask,
                             self.k_cache, self.v_cache, self.cos_table, self.sin_table, from_cache=True)

    def _decode_step(self) -> None:
        """One token for every row, all on the device: feed, sample, record, flag stops, advance.

        No arguments and no outputs: what it reads and writes are the decoder's buffers, so the
        compiled step is one CUDA graph that replays with nothing copied in or out.
        """
        logits = self._decode_logits()                                        # (batch, vocab)
        nxt = sample_batch(logits, self.settings, self.u.index_select(0, self.slot + 1)[0])   # (batch,)
        self.out.index_copy_(1, self.slot + 1, nxt[:, None])
        self.bad.index_copy_(1, self.slot + 1, bad_rows(logits)[:, None])
        self.done.logical_or_((nxt[:, None] == self.stop_ids).any(-1))          # (batch,)
        self.tokens.copy_(nxt)
        self.slot.add_(1)

    # -------------------------------------------------------------- generation
    @torch.no_grad()
    def stream(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 128,
               settings: SamplingSettings = SamplingSettings(), seed: int | Sequence[int] | None = None,
               stop_ids: Iterable[int] | None = None, sync_every: int = 32) -> Iterator[list[list[int]]]:
        """Generate for every prompt at once; yield each row's new tokens every sync_every steps.

        prompts: up to batch_size lists of token ids, of any lengths. Each row stops after its own
        stop token (yielded too) or its budget (npllama.inputs.check_budget, capped by the slots
        left after the longest prompt). seed: one int or one per row: row r draws
        uniforms(seed_r, steps, 1), as it would alone (npllama.generate's convention).
        The host reads the device only when it yields: after the first token (time to first
        token), then once per sync_every steps.
        """
        prompts = self._check_prompts(prompts)
        n = len(prompts)
        if not is_int(sync_every) or sync_every < 1:
            raise InputError(f"sync_every must be a positive integer, got {sync_every!r}")
        longest = max(len(p) for p in prompts)
        if longest > self.max_seq_len:
            raise InputError(f"the longest prompt is {longest} tokens; this decoder holds {self.max_seq_len}")
        budgets = [min(check_budget(len(p), 0, self.config.max_seq_len, max_new_tokens),
                       self.max_seq_len - longest + 1) for p in prompts]
        steps = max(budgets)
        if steps <= 0:
            return
        stops = sorted(set(self.config.eos_token_ids if stop_ids is None else stop_ids))
        if len(stops) > MAX_STOP_IDS:
            raise InputError(f"at most {MAX_STOP_IDS} stop tokens, got {len(stops)}")
        self._set_sampling(settings, self._uniforms(seed, steps, n), longest, stops)

        logits = self.prefill(prompts)                                        # (batch, vocab)
        first = sample_batch(logits, settings, self.u[longest])               # (batch,)
        self.out[:, longest] = first
        self.bad[:, longest] = bad_rows(logits)
        self.tokens.copy_(first)
        self.done.copy_((first[:, None] == self.stop_ids).any(-1))
        self.done[n:] = True                                                  # idle rows
        finished = [False] * n
        produced: list[list[int]] = [[] for _ in range(n)]
        have, start = 1, 0                       # tokens sampled so far, tokens already yielded
        while True:
            if have - start >= sync_every or have == steps or have == 1:   # first token: at once
                block = self.out[:n, longest + start: longest + have].cpu().numpy()   # the one host sync
                bad = self.bad[:n, longest + start: longest + have].cpu().numpy()
                chunk = []
                for r in range(n):
                    new = []
                    for j, t in enumerate(block[r].tolist()):
                        if finished[r]:
                            break
                        if bad[r, j]:
                            raise self._overflow(r, len(produced[r]))
                        new.append(t)
                        produced[r].append(t)
                        finished[r] = t in stops or len(produced[r]) >= budgets[r]
                    chunk.append(new)
                start = have
                yield chunk
                if all(finished) or have == steps:
                    return
            if self.compile_mode == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()
            self._step()                                                      # token number `have`
            have += 1

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 128,
                 settings: SamplingSettings = SamplingSettings(), seed: int | Sequence[int] | None = None,
                 stop_ids: Iterable[int] | None = None, sync_every: int = 32) -> list[list[int]]:
        """Every prompt's new tokens (stop token included), as lists; see ``stream``."""
        rows: list[list[int]] = [[] for _ in prompts]
        for chunk in self.stream(prompts, max_new_tokens, settings, seed, stop_ids, sync_every):
            for row, new in zip(rows, chunk):
                row.extend(new)
        return rows

    # -------------------------------------------------------------- helpers
    def _overflow(self, row: int, produced: int) -> CheckpointError:
        """The error for row ``row``'s logits that overflowed after ``produced`` tokens (parity.numerics)."""
        step = "the prompt" if produced == 0 else f"generated token {produced}"
        w = self.weights
        return CheckpointError(f"{w.source or 'the model'}: the activations overflow {w.dtype} (prompt "
                               f"{row}), so the logits computed from {step} are inf, NaN or all equal and no token "
                               f"can be chosen; the checkpoint is corrupt (weights near 1e38?). npllama generate "
                               f"names the layer where it happens")

    def _check_prompts(self, prompts) -> list[list[int]]:
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
            raise InputError("prompts must be a non-empty list of token-id lists")
        if len(prompts) > self.batch_size:
            raise InputError(f"{len(prompts)} prompts, but this decoder has {self.batch_size} rows")
        out = []
        for i, p in enumerate(prompts):
            arr = np.asarray(p)
            if arr.ndim != 1 or arr.size == 0:
                raise InputError(f"prompt {i} must be a non-empty list of token ids, got shape {arr.shape}")
            out.append(check_token_ids(arr, self.config.vocab_size, f"prompt {i}: ").tolist())
        return out

    def _pad(self, prompts) -> tuple[np.ndarray, np.ndarray]:
        """Left-pad to the longest prompt (pad id: the row's first token; masked anyway).
        -> ids (batch, L) int64, pad (batch,) int64. Idle rows hold a one-token prompt."""
        prompts = self._check_prompts(prompts)
        prompts = prompts + [prompts[0][-1:]] * (self.batch_size - len(prompts))
        length = max(len(p) for p in prompts)
        ids = np.array([[p[0]] * (length - len(p)) + p for p in prompts], dtype=np.int64)
        pad = np.array([length - len(p) for p in prompts], dtype=np.int64)
        return ids, pad

    def _uniforms(self, seed, steps: int, n: int) -> np.ndarray:
        """(steps, n) uniforms, npllama.generate's convention: row r draws uniforms(seed_r, steps, 1)
        as it would alone, seed_r the one seed or the row's own (row_seeds)."""
        return np.stack([uniforms(s, steps, 1)[:, 0] for s in row_seeds(seed, n)], axis=1)

    def _set_sampling(self, settings: SamplingSettings, u: np.ndarray, longest: int, stops: list[int]) -> None:
        """Settings (a compile-time constant of the step), uniforms and stop ids into the buffers."""
        if not isinstance(settings, SamplingSettings):
            raise InputError(f"settings must be a SamplingSettings, got {type(settings).__name__}")
        self.settings = settings
        steps, n = u.shape
        self.u.zero_()
        self.u[longest: longest + steps, :n] = torch.from_numpy(u).to(self.weights.device)
        self.stop_ids.fill_(-1)
        if stops:
            self.stop_ids[: len(stops)] = torch.tensor(stops, dtype=torch.int64, device=self.weights.device)


def fast_generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int = 128,
                  settings: SamplingSettings = SamplingSettings(), seed: int | Sequence[int] | None = None,
                  stop_ids: Iterable[int] | None = None, compile: str | None = None,
                  sync_every: int = 32) -> list[list[int]]:
    """Generate for a batch of prompts with a decoder sized for them (prompt + budget slots).

    model: a parity.Transformer or a FastWeights. Returns one list of new token ids per prompt.
    Building a decoder (and compiling it) has a cost: to generate repeatedly, keep a FastDecoder.
    """
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise InputError("prompts must be a non-empty list of token-id lists")
    window = model.config.max_seq_len
    longest = max(len(p) for p in prompts)
    if longest > window:
        raise InputError(f"the longest prompt is {longest} tokens, longer than the {window} the fast path holds "
                         f"(the trained length); shorten the prompt")
    slots = min(window, longest + max(int(max_new_tokens), 1) - 1) if longest else 1
    slots = max(slots, longest, 1)
    decoder = FastDecoder(model, batch_size=len(prompts), max_seq_len=slots, compile=compile)
    return decoder.generate(prompts, max_new_tokens, settings, seed, stop_ids, sync_every)
