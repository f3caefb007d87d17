"""A hand-written port of the LLaMA decoder to plain PyTorch, in the style of gpt-fast: the port
that docs/porting.md checks against npllama, op by op.

    python docs/my_port.py --new-model tiny-llama          # a small random checkpoint to port
    python docs/my_port.py --model tiny-llama --ids ref.safetensors --out mine.safetensors [--bug kv-repeat]

It shares no code with npllama or its Torch twin: its own RMSNorm, its own rotary embeddings in
Meta's interleaved layout (q/k rows permuted on load, as gpt-fast's converter does), its own
attention on torch's fused kernel. Only the dump goes through npllama: parity.capture records
the port's activations by forward hooks, named through the ready-made map for gpt-fast's module
names (parity.hooks.gpt_fast), and writes them with the ids the port ran.

--bug plants a classic porting bug: kv-repeat expands the key/value heads with repeat (head j
serves queries j, j + n_kv, ...) instead of repeat_interleave (queries j * g ... j * g + g - 1).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


# ---------------------------------------------------------------------------- the model
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:          # (batch, seq, dim)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def precompute_freqs_cis(seq_len: int, head_dim: int, base: float) -> torch.Tensor:
    """exp(i m theta_j) for positions m < seq_len and theta_j = base^(-2j / head_dim): (seq, head_dim / 2)."""
    theta = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), theta)
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2j, 2j+1) of every head. x: (batch, seq, heads, head_dim)."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))   # (batch, seq, heads, head_dim / 2)
    rotated = pairs * freqs_cis[None, :, None, :]
    return torch.view_as_real(rotated).flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, kv_repeat_bug: bool = False):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.wqkv = nn.Linear(dim, (n_heads + 2 * n_kv_heads) * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=False)
        self.kv_repeat_bug = kv_repeat_bug

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        nq, nkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.wqkv(x).split([nq * hd, nkv * hd, nkv * hd], dim=-1)
        q, k, v = q.view(b, s, nq, hd), k.view(b, s, nkv, hd), v.view(b, s, nkv, hd)
        q = apply_rotary_emb(q, freqs_cis)
        k = apply_rotary_emb(k, freqs_cis)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)    # (batch, heads, seq, head_dim)
        if self.kv_repeat_bug:
            k, v = k.repeat(1, nq // nkv, 1, 1), v.repeat(1, nq // nkv, 1, 1)
        else:
            k, v = k.repeat_interleave(nq // nkv, dim=1), v.repeat_interleave(nq // nkv, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
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
        dim, eps = cfg["hidden_size"], cfg["rms_norm_eps"]
        self.attention_norm = RMSNorm(dim, eps)
        self.attention = Attention(dim, cfg["num_attention_heads"], cfg["num_key_value_heads"],
                                   cfg["head_dim"], kv_repeat_bug)
        self.ffn_norm = RMSNorm(dim, eps)
        self.feed_forward = FeedForward(dim, cfg["intermediate_size"])

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, cfg: dict, kv_repeat_bug: bool = False):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"])
        self.layers = nn.ModuleList(TransformerBlock(cfg, kv_repeat_bug) for _ in range(cfg["num_hidden_layers"]))
        self.norm = RMSNorm(cfg["hidden_size"], cfg["rms_norm_eps"])
        self.output = nn.Linear(cfg["hidden_size"], cfg["vocab_size"], bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:                    # (batch, seq) -> logits
        freqs_cis = precompute_freqs_cis(ids.shape[1], self.cfg["head_dim"], self.cfg["rope_theta"])
        h = self.tok_embeddings(ids)
        for layer in self.layers:
            h = layer(h, freqs_cis)
        return self.output(self.norm(h))


# ---------------------------------------------------------------------------- loading a checkpoint
def to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Hugging Face's rotate-half rows of wq or wk -> Meta's interleaved rows, head by head."""
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def load(folder: str, dtype: torch.dtype = torch.float32, kv_repeat_bug: bool = False) -> Transformer:
    """A Hugging Face Llama folder (config.json + model.safetensors) as this port's model."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.setdefault("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    cfg.setdefault("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    hf = load_file(folder / "model.safetensors")
    model = Transformer(cfg, kv_repeat_bug)
    sd = {"tok_embeddings.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"],
          "output.weight": hf.get("lm_head.weight", hf["model.embed_tokens.weight"])}
    for i in range(cfg["num_hidden_layers"]):
        p, m = f"layers.{i}.", f"model.layers.{i}."
        wq = to_interleaved(hf[m + "self_attn.q_proj.weight"], cfg["num_attention_heads"])
        wk = to_interleaved(hf[m + "self_attn.k_proj.weight"], cfg["num_key_value_heads"])
        sd[p + "attention.wqkv.weight"] = torch.cat([wq, wk, hf[m + "self_attn.v_proj.weight"]])
        sd[p + "attention.wo.weight"] = hf[m + "self_attn.o_proj.weight"]
        sd[p + "attention_norm.weight"] = hf[m + "input_layernorm.weight"]
        sd[p + "ffn_norm.weight"] = hf[m + "post_attention_layernorm.weight"]
        for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            sd[p + f"feed_forward.{ours}.weight"] = hf[m + f"mlp.{theirs}.weight"]
    model.load_state_dict(sd)
    return model.to(dtype).eval()


# ---------------------------------------------------------------------------- the dump
def dump(model: Transformer, ids: torch.Tensor, out: str) -> None:
    """Run the port once under parity.capture and write its activations with the ids."""
    from parity.hooks import capture, gpt_fast

    cfg = model.cfg
    rope = f"{apply_rotary_emb.__module__}.apply_rotary_emb"      # q, k after rotary: this function's results
    name_map = gpt_fast(cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"], rope=rope)
    with capture(model, name_map) as captured, torch.no_grad():
        model(ids)
    captured.save(out, ids, rotary_layout="interleaved", producer="my_port.py, gpt-fast style")


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

    args = ModelArgs(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=160, max_seq_len=256)
    save_checkpoint(folder, args, init_params(args, seed=seed, std=0.1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--new-model", metavar="DIR", help="write a small random checkpoint to DIR and stop")
    parser.add_argument("--model", metavar="DIR", help="the Hugging Face folder to run")
    parser.add_argument("--ids", help="REF.safetensors (its input_ids), a JSON file, or 1,2,3")
    parser.add_argument("--out", metavar="FILE", help="where to write the dump")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--bug", choices=["kv-repeat"], help="plant a porting bug")
    a = parser.parse_args()
    if a.new_model:
        new_model(a.new_model)
        print(f"wrote {a.new_model}")
        return
    if not (a.model and a.ids and a.out):
        parser.error("give --model, --ids and --out (or --new-model DIR)")
    model = load(a.model, getattr(torch, a.dtype), kv_repeat_bug=a.bug == "kv-repeat")
    dump(model, read_ids(a.ids), a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
