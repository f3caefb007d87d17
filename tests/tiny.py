"""Tiny real checkpoints for tests: random transformers Llama models saved in every format npllama reads.

Not a test module: helpers other tests import (``from tiny import ...``; tests/ is on sys.path
under pytest's rootdir-relative imports).

    cfg = tiny_config(n_heads=4, n_kv_heads=2)              # a transformers LlamaConfig
    model = random_llama(cfg, seed=0)                       # LlamaForCausalLM, float32, eval mode
    save_hf(model, folder, tokenizer=train_bpe(...))        # config.json + model.safetensors (+ tokenizer)
    save_meta(model, folder, sp_model=train_sentencepiece(...))   # params.json + consolidated.00.pth
    save_gguf(model, path, vocab=gguf_vocab_from_bpe(...))  # F32 GGUF, q/k in llama.cpp's layout
    kv, tensors = gguf_spec(path); gguf_bytes(kv, tensors)  # a GGUF as lists, written back byte by byte

Weights are drawn from N(0, std) with std 0.02 .. 0.2 (norm weights around 1), so logits are far
from flat and a wrong permutation or a swapped projection shows. The Meta and GGUF writers permute
q/k rows into the interleaved layout with their own torch code (the formula of transformers'
convert_llama_weights_to_hf.py inverse / llama.cpp's LlamaModel.permute), not npllama's; only
the tensor names come from npllama's one table (formats/names.py).
"""

from __future__ import annotations

import copy
import io
import json
import random
import struct
from pathlib import Path

import numpy as np
import torch

from npllama.formats.names import rename

# -------------------------------------------------------------------------------- text
_WORDS = ("the of and to in is was for on that with as by at from it an be this are which or his "
          "model token layer attention rotary weight matrix number value head query key cache "
          "France Paris capital river mountain city village train learning language python numpy "
          "café naïve résumé Zürich Straße über ÄÖÜ 東京 日本語 中文 模型 😀 🚀 ∑ π ≤ →").split()


def sample_text(n_lines: int = 400, seed: int = 0) -> list[str]:
    """Generated lines of words, digits, punctuation, code and non-ASCII (for training tokenizers)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 14))]
        if rng.random() < 0.4:
            words.insert(rng.randrange(len(words) + 1), str(rng.randint(0, 100000)))
        line = " ".join(words)
        line += rng.choice([".", "!", "?", ",", ":", " (x = 3.14)", "", "\n", "  "])
        if rng.random() < 0.1:
            line = f"def f(x):\n    return x * {rng.randint(1, 9)}\n"
        lines.append(line)
    return lines


# -------------------------------------------------------------------------------- tokenizers
def train_sentencepiece(folder: Path, vocab_size: int = 400, seed: int = 0) -> Path:
    """A SentencePiece BPE model with byte fallback and Llama's special ids (unk 0, <s> 1, </s> 2)."""
    import sentencepiece as spm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sample_text(600, seed)), model_writer=buf, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, hard_vocab_limit=False, num_threads=1, minloglevel=2,
        # Llama's tokenizer.model: no normalisation, whitespace kept, digits split, dummy prefix.
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        add_dummy_prefix=True, allow_whitespace_only_pieces=True)
    path = folder / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    return path


SPECIAL_BPE_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
                 "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")


def train_bpe(vocab_size: int = 300, seed: int = 0):
    """A byte-level BPE ``tokenizers.Tokenizer`` (GPT-2 style) with SmolLM-like special tokens 0, 1, 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_BPE_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(sample_text(600, seed), trainer)
    return tok


# -------------------------------------------------------------------------------- models
def tiny_config(*, vocab_size: int = 300, dim: int = 64, n_layers: int = 2, n_heads: int = 4,
                n_kv_heads: int | None = None, head_dim: int | None = None, hidden_dim: int = 96,
                tied: bool = False, bias: bool = False, mlp_bias: bool = False, norm_eps: float = 1e-5,
                rope_theta: float = 10000.0, max_seq_len: int = 128, bos_token_id: int | None = 1,
                eos_token_id: int | None = 2):
    """A transformers LlamaConfig for a tiny model (npllama's names for the arguments)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=dim, intermediate_size=hidden_dim, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=n_kv_heads or n_heads,
        head_dim=head_dim or dim // n_heads, tie_word_embeddings=tied, attention_bias=bias, mlp_bias=mlp_bias,
        rms_norm_eps=norm_eps, rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        max_position_embeddings=max_seq_len, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
        pad_token_id=None)


def random_llama(config, seed: int = 0, std: float = 0.1):
    """LlamaForCausalLM with weights ~ N(0, std) (embeddings and head a bit larger), norms ~ 1 + N(0, 0.1)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif "embed" in name or "lm_head" in name:
                p.normal_(0.0, 2 * std)
            else:
                p.normal_(0.0, std)
    return model


def hf_logits(model, ids) -> np.ndarray:
    """transformers' float32 logits for ids: (batch, seq) -> (batch, seq, vocab)."""
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(ids), dtype=torch.long)).logits.float().numpy()


# -------------------------------------------------------------------------------- Hugging Face
def save_hf(model, folder: Path, tokenizer=None, max_shard_size=None, dtype: torch.dtype | None = None,
            chat_template: str | None = CHAT_TEMPLATE) -> Path:
    """save_pretrained (safetensors; sharded when max_shard_size is given), plus a tokenizer.json."""
    folder = Path(folder)
    to_save = model if dtype is None else copy.deepcopy(model).to(dtype)   # leave the caller's model alone
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    to_save.save_pretrained(folder, **kwargs)
    if tokenizer is not None:
        from transformers import PreTrainedTokenizerFast

        fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|im_start|>",
                                       eos_token="<|im_end|>", unk_token=None)
        fast.chat_template = chat_template
        fast.save_pretrained(folder)
    return folder


# -------------------------------------------------------------------------------- Meta
def to_interleaved(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate-half rows -> Meta interleaved rows (inverse of transformers' conversion ``permute``)."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def meta_state_dict(model) -> dict[str, torch.Tensor]:
    """The model in Meta's names, q/k rows interleaved, output untied (Meta never ties)."""
    cfg = model.config
    sd = {}
    for name, t in model.state_dict().items():
        t = t.detach().clone()
        if ".self_attn.q_proj." in name:
            t = to_interleaved(t, cfg.num_attention_heads)
        elif ".self_attn.k_proj." in name:
            t = to_interleaved(t, cfg.num_key_value_heads)
        sd[rename(name, "hf", "meta")] = t
    sd.setdefault("output.weight", sd["tok_embeddings.weight"].clone())
    sd["rope.freqs"] = torch.zeros(cfg.head_dim // 2)   # Llama 1/2 files carry it; loaders ignore it
    return sd


def meta_params(model, multiple_of: int, ffn_dim_multiplier: float | None = None, vocab_size: int = -1) -> dict:
    cfg = model.config
    params = {"dim": cfg.hidden_size, "n_layers": cfg.num_hidden_layers, "n_heads": cfg.num_attention_heads,
              "n_kv_heads": cfg.num_key_value_heads, "vocab_size": vocab_size, "multiple_of": multiple_of,
              "norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_parameters["rope_theta"],
              "max_seq_len": cfg.max_position_embeddings}
    if ffn_dim_multiplier is not None:
        params["ffn_dim_multiplier"] = ffn_dim_multiplier
    return params


def split_for_model_parallel(sd: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    """Cut a Meta state dict into n shards the way fairscale's parallel layers hold it."""
    shards = [{} for _ in range(n)]
    for name, t in sd.items():
        if t.ndim < 2:
            parts = [t.clone() for _ in range(n)]
        elif name.endswith(("wo.weight", "w2.weight")) or name == "tok_embeddings.weight":
            parts = [p.clone() for p in t.chunk(n, dim=1)]
        else:
            parts = [p.clone() for p in t.chunk(n, dim=0)]
        for shard, p in zip(shards, parts):
            shard[name] = p
    return shards


def save_meta(model, folder: Path, sp_model: Path | None, n_shards: int = 1, multiple_of: int = 32,
              ffn_dim_multiplier: float | None = None, dtype: torch.dtype = torch.float32,
              write_vocab_size: bool = False) -> Path:
    """params.json + consolidated.NN.pth (torch.save of Meta's layout) + tokenizer.model.

    The model's intermediate_size must be Meta's: meta_hidden_dim(dim, multiple_of, ffn_dim_multiplier).
    """
    from npllama.formats.meta import meta_hidden_dim

    cfg = model.config
    want = meta_hidden_dim(cfg.hidden_size, multiple_of, ffn_dim_multiplier)
    assert cfg.intermediate_size == want, f"Meta derives hidden_dim {want}, the model has {cfg.intermediate_size}"
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    params = meta_params(model, multiple_of, ffn_dim_multiplier,
                         cfg.vocab_size if write_vocab_size or sp_model is None else -1)
    (folder / "params.json").write_text(json.dumps(params))
    sd = {k: v.to(dtype) for k, v in meta_state_dict(model).items()}
    for i, shard in enumerate(split_for_model_parallel(sd, n_shards)):
        torch.save(shard, folder / f"consolidated.{i:02d}.pth")
    if sp_model is not None:
        (folder / "tokenizer.model").write_bytes(Path(sp_model).read_bytes())
    return folder


# -------------------------------------------------------------------------------- GGUF
def gguf_vocab_from_bpe(tok) -> dict:
    """A byte-level BPE tokenizers.Tokenizer as GGUF 'gpt2' tokenizer metadata."""
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    types = [3 if t in SPECIAL_BPE_TOKENS else 1 for t in tokens]
    return {"model": "gpt2", "pre": "default", "tokens": tokens, "types": types, "merges": merges,
            "bos": 1, "eos": 2, "add_bos": False, "chat_template": CHAT_TEMPLATE}


def gguf_vocab_from_sentencepiece(sp_model: Path) -> dict:
    """A SentencePiece model as GGUF 'llama' tokenizer metadata (as llama.cpp's converter writes it)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        types.append(2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)
                     else 5 if sp.is_unused(i) else 1)
    return {"model": "llama", "tokens": tokens, "scores": scores, "types": types, "bos": sp.bos_id(),
            "eos": sp.eos_id(), "unk": sp.unk_id(), "add_bos": True}


def save_gguf(model, path: Path, vocab: dict | None = None, encode=None) -> Path:
    """A llama-architecture GGUF with F32 tensors, q/k permuted to llama.cpp's interleaved layout.

    encode: None, or (gguf name, float32 array in file layout) -> None (keep F32) or
    (raw uint8 blocks, gguf.GGMLQuantizationType): the tensor as stored in another type.
    """
    import gguf

    cfg = model.config
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("npllama-tiny")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    if vocab is not None:
        w.add_tokenizer_model(vocab["model"])
        if "pre" in vocab:
            w.add_tokenizer_pre(vocab["pre"])
        w.add_token_list(vocab["tokens"])
        w.add_token_types(vocab["types"])
        if "merges" in vocab:
            w.add_token_merges(vocab["merges"])
        if "scores" in vocab:
            w.add_token_scores(vocab["scores"])
        if "unk" in vocab:
            w.add_unk_token_id(vocab["unk"])
        w.add_bos_token_id(vocab["bos"])
        w.add_eos_token_id(vocab["eos"])
        w.add_add_bos_token(vocab["add_bos"])
        if vocab.get("chat_template"):
            w.add_chat_template(vocab["chat_template"])
    for name, t in model.state_dict().items():
        t = t.detach().float()
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if ".self_attn.q_proj." in name:
            t = to_interleaved(t, cfg.num_attention_heads)
        elif ".self_attn.k_proj." in name:
            t = to_interleaved(t, cfg.num_key_value_heads)
        gname, data = rename(name, "hf", "gguf"), np.ascontiguousarray(t.numpy(), dtype=np.float32)
        raw = encode(gname, data) if encode is not None else None
        if raw is None:
            w.add_tensor(gname, data)
        else:
            w.add_tensor(gname, raw[0], raw_dtype=raw[1])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# -------------------------------------------------------------------------------- GGUF, byte by byte
# Hostile values the gguf package's writer would not write: a GGUF file as a list of key/values and
# tensors, written back with any field changed.
STRING, ARRAY, UINT32, INT32, FLOAT32, BOOL, UINT64 = 8, 9, 4, 5, 6, 7, 10
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def gguf_value(kind: int, value) -> bytes:
    if kind == ARRAY and isinstance(value, bytes):      # an array already encoded (item type, count, items)
        return value
    if kind == STRING:
        raw = value.encode() if isinstance(value, str) else value
        return struct.pack("<Q", len(raw)) + raw
    if kind == ARRAY:
        item, values = value
        return struct.pack("<IQ", item, len(values)) + b"".join(gguf_value(item, v) for v in values)
    return struct.pack(_SCALAR[kind], value)


def gguf_spec(path: Path) -> tuple[list, list]:
    """([(key, type, value)], [(name, dims, type, data)]) of a GGUF file, to write back changed."""
    import gguf

    r = gguf.GGUFReader(path, "r")
    kv = []
    for key, field in r.fields.items():
        if key.startswith("GGUF."):
            continue
        kind = int(field.types[0])
        value = field.contents()
        if kind == ARRAY:
            value = (int(field.types[1]), value)
        kv.append((key, kind, value))
    tensors = [(t.name, [int(d) for d in t.shape], int(t.tensor_type), bytes(t.data.tobytes())) for t in r.tensors]
    return kv, tensors


def gguf_bytes(kv: list, tensors: list, offsets: list[int] | None = None, align: int = 32,
               data: bytes | None = None) -> bytes:
    """A GGUF v3 file: header, metadata, tensor infos, padding, data. Tensors are packed in order
    unless ``offsets`` (and then ``data``, the data section) are given."""
    out = [b"GGUF", struct.pack("<IQQ", 3, len(tensors), len(kv))]
    for key, kind, value in kv:
        out += [gguf_value(STRING, key), struct.pack("<I", kind), gguf_value(kind, value)]
    if data is None:
        data, packed = pack(tensors, align)
    for (name, dims, kind, _), offset in zip(tensors, offsets or packed):
        out += [gguf_value(STRING, name), struct.pack("<I", len(dims)), struct.pack(f"<{len(dims)}Q", *dims),
                struct.pack("<IQ", kind, offset)]
    head = b"".join(out)
    return head + b"\0" * (-len(head) % align) + data


def pack(tensors: list, align: int = 32) -> tuple[bytes, list[int]]:
    """The data section of tensors packed in order, aligned, and each one's offset."""
    parts, offsets, end = [], [], 0
    for *_, blob in tensors:
        parts.append(b"\0" * (-end % align))
        end += len(parts[-1])
        offsets.append(end)
        parts.append(blob)
        end += len(blob)
    return b"".join(parts), offsets


def set_kv(kv: list, key: str, kind: int, value) -> list:
    """kv with key set (replaced in place, or appended)."""
    out = [(k, t, v) for k, t, v in kv if k != key]
    return out + [(key, kind, value)]
