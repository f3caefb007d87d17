"""A hand-written port of the LLaMA decoder to plain PyTorch, in the style of gpt-fast: the port
that docs/porting.md checks against npllama, op by op and step by step.

    python docs/my_port.py --new-model tiny-llama          # a small random checkpoint to port
    npllama export --model tiny-llama --layout meta --out tiny-meta      # its weights, Meta's layout
    python docs/my_port.py --weights tiny-meta --ids ref.safetensors --decode 8 --out mine.safetensors

It shares no code with npllama or its Torch twin: its own RMSNorm, its own rotary embeddings in
Meta's interleaved layout, a fused wqkv projection, a static KV cache written at ``input_pos``
(gpt-fast's ``setup_caches`` and ``forward(idx, input_pos)``), torch's fused attention. It loads
the weights ``npllama export --layout meta`` writes (Meta's names, wq / wk rows interleaved), so
it permutes nothing. Only the dump goes through npllama: parity.capture records the port's
activations under the ready-made "gpt-fast" map, one step per call.

--dtype float64 runs it in float64. A port usually computes its norm statistic and its rotation
in float32 whatever its dtype (``x.float()``); here each such cast is written
``x.to(at_least_float32(x.dtype))``, which is float32 for half types and leaves float64 alone,
and the rotation table is built in float64 and kept complex128 for a float64 model.

--bug plants a classic porting bug:
  kv-repeat  the key/value heads expanded with repeat (head j serves queries j, j + n_kv, ...)
             instead of repeat_interleave (queries j * g ... j * g + g - 1)
  position   decode step 3 is fed at position n + 1 instead of n (written to the wrong cache
             slot, rotated by the wrong angle)
  mask       every decode step's mask row one short: the new token does not see its own key
  eps        the last layer's ffn_norm with eps 1e-6 instead of the checkpoint's (1e-5)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

BUGS = ("kv-repeat", "position", "mask", "eps")
POSITION_BUG_STEP = 3


def at_least_float32(dtype: torch.dtype) -> torch.dtype:
    """The dtype to compute statistics and rotations in: float32 for half types, float64 kept.
    (gpt-fast and Meta write x.float(), which silently drops a float64 run to float32.)"""
    return torch.promote_types(dtype, torch.float32)


# ---------------------------------------------------------------------------- the model
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:          # (batch, seq, dim)
        xf = x.to(at_least_float32(x.dtype))                     # lifted cast: was x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def precompute_freqs_cis(seq_len: int, head_dim: int, base: float, dtype: torch.dtype) -> torch.Tensor:
    """exp(i m theta_j) for positions m < seq_len and theta_j = base^(-2j / head_dim): (seq, head_dim / 2),
    complex128 for a float64 model, complex64 otherwise (lifted: was always complex64)."""
    theta = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), theta)
    table = torch.polar(torch.ones_like(angles), angles)
    return table if dtype == torch.float64 else table.to(torch.complex64)


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2j, 2j+1) of every head. x: (batch, seq, heads, head_dim); freqs_cis: (seq, head_dim / 2)."""
    xf = x.to(at_least_float32(x.dtype))                                     # lifted cast: was x.float()
    pairs = torch.view_as_complex(xf.reshape(*x.shape[:-1], -1, 2))          # (batch, seq, heads, head_dim / 2)
    rotated = pairs * freqs_cis[None, :, None, :]
    return torch.view_as_real(rotated).flatten(3).type_as(x)


class KVCache(nn.Module):
    """gpt-fast's static cache: (batch, n_kv_heads, max_seq_len, head_dim), written at input_pos."""

    def __init__(self, batch: int, max_seq_len: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype):
        super().__init__()
        shape = (batch, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype))
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype))

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.k_cache[:, :, input_pos] = k
        self.v_cache[:, :, input_pos] = v
        return self.k_cache, self.v_cache


class Attention(nn.Module):
    def __init__(self, dim: int, n_head: int, n_local_heads: int, kv_repeat_bug: bool = False):
        super().__init__()
        self.n_head, self.n_local_heads, self.head_dim = n_head, n_local_heads, dim // n_head   # gpt-fast's names
        self.wqkv = nn.Linear(dim, (n_head + 2 * n_local_heads) * self.head_dim, bias=False)
        self.wo = nn.Linear(n_head * self.head_dim, dim, bias=False)
        self.kv_cache: KVCache | None = None
        self.kv_repeat_bug = kv_repeat_bug

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, mask: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        nq, nkv, hd = self.n_head, self.n_local_heads, self.head_dim
        q, k, v = self.wqkv(x).split([nq * hd, nkv * hd, nkv * hd], dim=-1)
        q, k, v = q.view(b, s, nq, hd), k.view(b, s, nkv, hd), v.view(b, s, nkv, hd)
        q = apply_rotary_emb(q, freqs_cis)
        k = apply_rotary_emb(k, freqs_cis)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)    # (batch, heads, seq, head_dim)
        k, v = self.kv_cache.update(input_pos, k, v)                        # (batch, n_kv, max_seq_len, head_dim)
        if self.kv_repeat_bug:
            k, v = k.repeat(1, nq // nkv, 1, 1), v.repeat(1, nq // nkv, 1, 1)
        else:
            k, v = k.repeat_interleave(nq // nkv, dim=1), v.repeat_interleave(nq // nkv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(y.transpose(1, 2).reshape(b, s, nq * hd))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: dict, kv_repeat_bug: bool = False):
        super().__init__()
        dim, eps = cfg["dim"], cfg["norm_eps"]
        self.attention_norm = RMSNorm(dim, eps)
        self.attention = Attention(dim, cfg["n_heads"], cfg["n_kv_heads"], kv_repeat_bug)
        self.ffn_norm = RMSNorm(dim, eps)
        self.feed_forward = FeedForward(dim, cfg["hidden_dim"])

    def forward(self, x, freqs_cis, mask, input_pos):
        h = x + self.attention(self.attention_norm(x), freqs_cis, mask, input_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, cfg: dict, bug: str | None = None):
        super().__init__()
        self.cfg, self.mask_bug = cfg, bug == "mask"
        self.tok_embeddings = nn.Embedding(cfg["vocab_size"], cfg["dim"])
        self.layers = nn.ModuleList(TransformerBlock(cfg, bug == "kv-repeat") for _ in range(cfg["n_layers"]))
        self.norm = RMSNorm(cfg["dim"], cfg["norm_eps"])
        self.output = nn.Linear(cfg["dim"], cfg["vocab_size"], bias=False)
        if bug == "eps":
            self.layers[-1].ffn_norm.eps = 1e-6

    def setup_caches(self, max_batch_size: int, max_seq_length: int) -> None:
        dtype = self.output.weight.dtype
        for layer in self.layers:
            a = layer.attention
            layer.attention.kv_cache = KVCache(max_batch_size, max_seq_length, a.n_local_heads, a.head_dim, dtype)
        self.freqs_cis = precompute_freqs_cis(max_seq_length, self.cfg["dim"] // self.cfg["n_heads"],
                                              self.cfg["rope_theta"], dtype)
        self.causal_mask = torch.tril(torch.ones(max_seq_length, max_seq_length, dtype=torch.bool))

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:   # (batch, seq), (seq,) -> logits
        rows = self.causal_mask[input_pos].clone()                        # (seq, max_seq_len): key j visible to query i
        if self.mask_bug and len(input_pos) == 1:
            rows[0, input_pos[0]] = False                                 # the row one short: not its own key
        mask, freqs_cis = rows[None, None], self.freqs_cis[input_pos]
        h = self.tok_embeddings(idx)
        for layer in self.layers:
            h = layer(h, freqs_cis, mask, input_pos)
        return self.output(self.norm(h))


# ---------------------------------------------------------------------------- loading the export
def meta_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's FeedForward width, as params.json implies it."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def load(folder: str, dtype: torch.dtype = torch.float32, bug: str | None = None,
         kv_repeat_bug: bool = False) -> Transformer:
    """This port with the weights of a folder `npllama export --layout meta` wrote (params.json +
    model.safetensors): wq / wk rows already interleaved, so the three projections are only stacked
    into wqkv. A Hugging Face folder (config.json) works too: its rotate-half wq / wk rows are then
    permuted on load, as gpt-fast's converter does."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if (folder / "config.json").is_file():
        cfg, meta = from_hugging_face(folder)
    else:
        cfg = json.loads((folder / "params.json").read_text())
        cfg["hidden_dim"] = meta_hidden_dim(cfg["dim"], cfg["multiple_of"], cfg.get("ffn_dim_multiplier"))
        meta = load_file(folder / "model.safetensors")
    model = Transformer(cfg, "kv-repeat" if kv_repeat_bug else bug)
    sd = {name: w for name, w in meta.items() if not name.endswith(("wq.weight", "wk.weight", "wv.weight"))}
    for i in range(cfg["n_layers"]):
        a = f"layers.{i}.attention."
        sd[a + "wqkv.weight"] = torch.cat([meta[a + "wq.weight"], meta[a + "wk.weight"], meta[a + "wv.weight"]])
    model.load_state_dict(sd)
    return model.to(dtype).eval()


def from_hugging_face(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """A Hugging Face Llama folder as (this port's config, Meta's names and interleaved wq / wk rows)."""
    from safetensors.torch import load_file

    hf_cfg = json.loads((folder / "config.json").read_text())
    cfg = {"dim": hf_cfg["hidden_size"], "n_layers": hf_cfg["num_hidden_layers"],
           "n_heads": hf_cfg["num_attention_heads"], "n_kv_heads": hf_cfg["num_key_value_heads"],
           "vocab_size": hf_cfg["vocab_size"], "hidden_dim": hf_cfg["intermediate_size"],
           "norm_eps": hf_cfg["rms_norm_eps"],
           "rope_theta": hf_cfg.get("rope_theta") or (hf_cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)}
    hf = load_file(folder / "model.safetensors")
    meta = {"tok_embeddings.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"],
            "output.weight": hf.get("lm_head.weight", hf["model.embed_tokens.weight"])}
    for i in range(cfg["n_layers"]):
        p, m = f"layers.{i}.", f"model.layers.{i}."
        meta[p + "attention.wq.weight"] = to_interleaved(hf[m + "self_attn.q_proj.weight"], cfg["n_heads"])
        meta[p + "attention.wk.weight"] = to_interleaved(hf[m + "self_attn.k_proj.weight"], cfg["n_kv_heads"])
        meta[p + "attention.wv.weight"] = hf[m + "self_attn.v_proj.weight"]
        meta[p + "attention.wo.weight"] = hf[m + "self_attn.o_proj.weight"]
        meta[p + "attention_norm.weight"] = hf[m + "input_layernorm.weight"]
        meta[p + "ffn_norm.weight"] = hf[m + "post_attention_layernorm.weight"]
        for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            meta[p + f"feed_forward.{ours}.weight"] = hf[m + f"mlp.{theirs}.weight"]
    return cfg, meta


def to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Hugging Face's rotate-half rows of wq or wk -> Meta's interleaved rows, head by head."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


# ---------------------------------------------------------------------------- the dump
def generate_steps(model: Transformer, ids: torch.Tensor, decode: int, position_bug: bool = False) -> None:
    """The prefill of ids, then `decode` greedy steps through the cache (gpt-fast's generate loop)."""
    model.setup_caches(ids.shape[0], ids.shape[1] + decode)
    input_pos = torch.arange(ids.shape[1])
    logits = model(ids, input_pos)
    pos = ids.shape[1]
    for step in range(1, decode + 1):
        token = logits[:, -1].argmax(-1, keepdim=True)                   # (batch, 1), greedy
        fed_at = pos + 1 if position_bug and step == POSITION_BUG_STEP else pos
        logits = model(token, torch.tensor([fed_at]))
        pos += 1


def dump(model: Transformer, ids: torch.Tensor, out: str, decode: int = 0, position_bug: bool = False) -> None:
    """Run the port under parity.capture (each call one step) and write its activations with the ids."""
    import parity

    with parity.capture(model, "gpt-fast") as captured, torch.no_grad():
        generate_steps(model, ids, decode, position_bug)
    captured.save(out, producer="my_port.py, gpt-fast style")


def read_ids(value: str) -> torch.Tensor:
    """--ids: a dump's input_ids (REF.safetensors), a JSON list, or comma-separated ids -> (batch, seq)."""
    if value.endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(value)["input_ids"]
    ids = json.loads(Path(value).read_text()) if Path(value).is_file() else [int(t) for t in value.split(",")]
    return torch.tensor(ids if isinstance(ids[0], list) else [ids])


def new_model(folder: str, seed: int = 0) -> None:
    """A random 4-layer Llama with grouped-query attention, as a Hugging Face folder (npllama's writer)."""
    from npllama.config import ModelArgs
    from npllama.formats.hf import save_checkpoint
    from npllama.params import init_params

    args = ModelArgs(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=192, max_seq_len=256)
    save_checkpoint(folder, args, init_params(args, seed=seed, std=0.1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-model", metavar="DIR", help="write a small random checkpoint to DIR and stop")
    parser.add_argument("--weights", metavar="DIR", help="the folder `npllama export --layout meta` wrote "
                        "(or a Hugging Face folder)")
    parser.add_argument("--ids", help="REF.safetensors (its input_ids), a JSON file, or 1,2,3")
    parser.add_argument("--decode", type=int, default=0, help="greedy decode steps after the prefill (default 0)")
    parser.add_argument("--out", metavar="FILE", help="where to write the dump")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    parser.add_argument("--bug", choices=BUGS, help="plant a porting bug (see the module docstring)")
    a = parser.parse_args()
    if a.new_model:
        new_model(a.new_model)
        print(f"wrote {a.new_model}")
        return
    if not (a.weights and a.ids and a.out):
        parser.error("give --weights, --ids and --out (or --new-model DIR)")
    model = load(a.weights, getattr(torch, a.dtype), bug=a.bug)
    dump(model, read_ids(a.ids), a.out, a.decode, position_bug=a.bug == "position")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
