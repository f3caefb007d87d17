"""The one table of checkpoint tensor names: npllama's (Meta's) <-> Hugging Face's <-> GGUF's.

npllama names every weight as Meta's llama/model.py does; the loaders rename on the way in and the
writers on the way out, all through this table:

    npllama / Meta                  Hugging Face (LlamaForCausalLM)       GGUF (llama.cpp)
    tok_embeddings                  model.embed_tokens                    token_embd
    layers.N.attention_norm         model.layers.N.input_layernorm        blk.N.attn_norm
    layers.N.attention.wq           model.layers.N.self_attn.q_proj       blk.N.attn_q
    layers.N.attention.wk           model.layers.N.self_attn.k_proj       blk.N.attn_k
    layers.N.attention.wv           model.layers.N.self_attn.v_proj       blk.N.attn_v
    layers.N.attention.wo           model.layers.N.self_attn.o_proj       blk.N.attn_output
    layers.N.ffn_norm               model.layers.N.post_attention_layernorm   blk.N.ffn_norm
    layers.N.feed_forward.w1        model.layers.N.mlp.gate_proj          blk.N.ffn_gate
    layers.N.feed_forward.w3        model.layers.N.mlp.up_proj            blk.N.ffn_up
    layers.N.feed_forward.w2        model.layers.N.mlp.down_proj          blk.N.ffn_down
    norm                            model.norm                            output_norm
    output                          lm_head                               output

each followed by ``.weight`` (or ``.bias`` where the config has biases). Only names change here;
the rotary layout of wq / wk rows is a separate matter (permute.py).
"""

from __future__ import annotations

import re

FORMATS = ("meta", "hf", "gguf")

# (npllama / Meta, Hugging Face, GGUF), without the layer prefix and the .weight / .bias suffix
GLOBAL_NAMES = (
    ("tok_embeddings", "model.embed_tokens", "token_embd"),
    ("norm", "model.norm", "output_norm"),
    ("output", "lm_head", "output"),
)
LAYER_NAMES = (
    ("attention_norm", "input_layernorm", "attn_norm"),
    ("attention.wq", "self_attn.q_proj", "attn_q"),
    ("attention.wk", "self_attn.k_proj", "attn_k"),
    ("attention.wv", "self_attn.v_proj", "attn_v"),
    ("attention.wo", "self_attn.o_proj", "attn_output"),
    ("ffn_norm", "post_attention_layernorm", "ffn_norm"),
    ("feed_forward.w1", "mlp.gate_proj", "ffn_gate"),
    ("feed_forward.w3", "mlp.up_proj", "ffn_up"),
    ("feed_forward.w2", "mlp.down_proj", "ffn_down"),
)
LAYER_PREFIX = {"meta": "layers.{}.", "hf": "model.layers.{}.", "gguf": "blk.{}."}

_COLUMN = {fmt: i for i, fmt in enumerate(FORMATS)}
_LAYER_RE = {fmt: re.compile(re.escape(prefix).replace(r"\{\}", r"(\d+)") + r"(.+)\.(weight|bias)")
             for fmt, prefix in LAYER_PREFIX.items()}


def rename(name: str, source: str, target: str) -> str | None:
    """A tensor name in the ``source`` format's spelling, in ``target``'s; None if the table lacks it.

        rename("model.layers.3.mlp.up_proj.weight", "hf", "meta") == "layers.3.feed_forward.w3.weight"

    source, target: "meta" (npllama's own), "hf" or "gguf". Hugging Face names are also accepted
    without their leading "model." (base-model checkpoints store them so).
    """
    src, dst = _COLUMN[source], _COLUMN[target]
    base, _, kind = name.rpartition(".")
    if kind in ("weight", "bias"):
        for row in GLOBAL_NAMES:
            if base == row[src] or (source == "hf" and "model." + base == row[src]):
                return f"{row[dst]}.{kind}"
    match = _LAYER_RE[source].fullmatch(name)
    if match is None and source == "hf":
        match = _LAYER_RE["hf"].fullmatch("model." + name)
    if match is None:
        return None
    layer, module, kind = match.groups()
    for row in LAYER_NAMES:
        if module == row[src]:
            return LAYER_PREFIX[target].format(layer) + f"{row[dst]}.{kind}"
    return None
