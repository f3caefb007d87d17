"""Hugging Face checkpoints: config.json + safetensors (+ tokenizer files) -> ModelArgs, params, Tokenizer.

A folder written by transformers' ``save_pretrained`` holds

    config.json                    LlamaConfig                           -> ModelArgs.from_hf
    model.safetensors              the weights, or shards listed in model.safetensors.index.json
    generation_config.json         eos_token_id(s) used to stop generation (optional)
    tokenizer.json                 a ``tokenizers`` tokenizer, or tokenizer.model (SentencePiece)
    tokenizer_config.json          bos/eos spellings, add_bos_token, chat_template (optional)
    chat_template.jinja            the chat template, in newer transformers (optional)

Names: transformers' LlamaForCausalLM names map one to one onto Meta's, which npllama uses:

    model.embed_tokens                          tok_embeddings
    model.layers.N.input_layernorm              layers.N.attention_norm
    model.layers.N.self_attn.{q,k,v,o}_proj     layers.N.attention.w{q,k,v,o}
    model.layers.N.post_attention_layernorm     layers.N.ffn_norm
    model.layers.N.mlp.gate_proj / up_proj / down_proj    layers.N.feed_forward.w1 / w3 / w2
    model.norm                                  norm
    lm_head                                     output

HF's q_proj / k_proj rows are already in the rotate-half layout npllama uses: no permutation.

safetensors (https://github.com/huggingface/safetensors): 8 bytes little-endian header length N,
N bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]}}, then the data. The header is
checked against the file size before any tensor is read.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..config import ModelArgs
from ..errors import CheckpointError, ConfigError
from ..tokenizer import Tokenizer

_LAYER_NAMES = {
    "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3", "mlp.down_proj": "feed_forward.w2",
}
_GLOBAL_NAMES = {"embed_tokens.weight": "tok_embeddings.weight", "norm.weight": "norm.weight",
                 "lm_head.weight": "output.weight"}
_LAYER_RE = re.compile(r"layers\.(\d+)\.(.+)\.(weight|bias)")
_SKIP_RE = re.compile(r"(model\.)?layers\.\d+\.self_attn\.rotary_emb\.inv_freq")   # older checkpoints store it

# safetensors dtype -> (numpy dtype of the raw bytes, bytes per element)
_ST_DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
_ST_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
             "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
MAX_HEADER = 100 * 1024 * 1024   # safetensors' own limit on the JSON header


# ---------------------------------------------------------------------------- small readers
def read_json(path: Path, required: bool = True) -> Any:
    """A JSON file's value; None when absent and not required; CheckpointError when unreadable."""
    if not path.is_file():
        if required:
            raise CheckpointError(f"{path}: missing")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def build_args(make: Callable[..., ModelArgs], source: Path, *args: Any, **kwargs: Any) -> ModelArgs:
    """Call a ModelArgs constructor; any complaint becomes a ConfigError that names the file."""
    try:
        return make(*args, **kwargs)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as e:   # a value of the wrong JSON type
        raise ConfigError(f"{source}: malformed value ({type(e).__name__}: {e})") from None


def bf16_to_float32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32: bfloat16 is the top half of a float32."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


# ---------------------------------------------------------------------------- safetensors
def read_safetensors_header(path: Path) -> tuple[dict[str, dict], int]:
    """(tensor entries, byte offset where data starts), after checking every entry fits the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: {size} bytes is too short for a safetensors file (truncated?)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{path}: header length {n} runs past the end of the {size}-byte file "
                                      f"(truncated or not safetensors)")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    start, data_size = 8 + n, size - 8 - n
    for name, entry in header.items():
        _check_entry(path, name, entry, data_size)
    return header, start


def _check_entry(path: Path, name: str, entry: Any, data_size: int) -> None:
    where = f"{path}: tensor {name!r}"
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise CheckpointError(f"{where}: header entry needs dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _ST_SIZES:
        raise CheckpointError(f"{where}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        raise CheckpointError(f"{where}: data_offsets {offsets!r} is not [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise CheckpointError(f"{where}: data_offsets [{begin}, {end}] run past the {data_size} bytes of data "
                              f"(truncated file?)")
    if end - begin != math.prod(shape) * _ST_SIZES[dtype]:
        raise CheckpointError(f"{where}: {end - begin} bytes do not hold a {dtype} tensor of shape {shape}")


def read_safetensors(path: Path, progress: Callable, names: set[str] | None = None) -> dict[str, np.ndarray]:
    """The float tensors of one .safetensors file as numpy arrays (bf16 -> float32)."""
    from safetensors import safe_open

    header, start = read_safetensors_header(path)
    out: dict[str, np.ndarray] = {}
    wanted = [n for n in header if names is None or n in names]
    try:
        with safe_open(str(path), framework="numpy") as f:
            for name in progress(wanted, desc=f"Loading {path.name}", unit="tensor"):
                entry = header[name]
                if entry["dtype"] not in _ST_DTYPES:
                    raise CheckpointError(f"{path}: tensor {name!r} is {entry['dtype']}; weights must be "
                                          f"F32, F16, BF16 or F64")
                if entry["dtype"] == "BF16":   # numpy has no bfloat16: read the bits, widen them
                    begin, end = entry["data_offsets"]
                    raw = np.fromfile(path, dtype=_ST_DTYPES["BF16"], count=(end - begin) // 2,
                                      offset=start + begin)
                    out[name] = bf16_to_float32(raw).reshape(entry["shape"])
                else:
                    out[name] = f.get_tensor(name)
    except CheckpointError:
        raise
    except Exception as e:   # safetensors raises SafetensorError / OSError on corrupt files
        raise CheckpointError(f"{path}: cannot read tensors ({type(e).__name__}: {e})") from None
    return out


def weight_files(folder: Path) -> list[Path]:
    """model.safetensors, or the shards named by model.safetensors.index.json, or pytorch_model.bin."""
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        data = read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: has no weight_map naming the shards")
        files = []
        for shard in dict.fromkeys(weight_map.values()):
            p = folder / str(shard)
            if Path(str(shard)).name != str(shard) or not p.is_file():
                raise CheckpointError(f"{index}: names shard {shard!r}, which is not a file in {folder}")
            files.append(p)
        return files
    if (folder / "pytorch_model.bin").is_file():
        return [folder / "pytorch_model.bin"]
    raise CheckpointError(f"{folder}: has config.json but no model.safetensors, model.safetensors.index.json "
                          f"or pytorch_model.bin")


# ---------------------------------------------------------------------------- names
def npllama_name(hf_name: str) -> str | None:
    """transformers' tensor name -> npllama's (Meta's) name; None for names to skip; raises for unknown."""
    if _SKIP_RE.fullmatch(hf_name):
        return None
    name = hf_name[len("model."):] if hf_name.startswith("model.") else hf_name
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = _LAYER_RE.fullmatch(name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    raise CheckpointError(f"tensor {hf_name!r} is not part of a Llama model (LlamaForCausalLM) npllama knows")


# ---------------------------------------------------------------------------- the loader
def load_hf(folder: Path, progress: Callable):
    """A transformers folder -> (ModelArgs, params in npllama names, Tokenizer or None)."""
    cfg = read_json(folder / "config.json")
    check_model_type(cfg, folder / "config.json")
    args = build_args(ModelArgs.from_hf, folder / "config.json", cfg)
    gen = read_json(folder / "generation_config.json", required=False) or {}
    tokenizer = hf_tokenizer(folder, cfg, gen if isinstance(gen, dict) else {})
    if tokenizer is not None:
        args = args.replace(bos_token_id=tokenizer.bos_id if tokenizer.bos_id is not None else args.bos_token_id,
                            eos_token_ids=tokenizer.eos_ids or args.eos_token_ids)

    params: dict[str, np.ndarray] = {}
    for file in weight_files(folder):
        if file.suffix == ".bin":
            from .meta import read_torch_zip
            tensors = read_torch_zip(file)
        else:
            tensors = read_safetensors(file, progress)
        for hf_name, array in tensors.items():
            try:
                name = npllama_name(hf_name)
            except CheckpointError as e:
                raise CheckpointError(f"{file}: {e}") from None
            if name is None:
                continue
            if name in params:
                raise CheckpointError(f"{file}: tensor {hf_name!r} appears in more than one shard")
            params[name] = array
    if args.tie_word_embeddings:
        params.pop("output.weight", None)   # some tied checkpoints store the shared matrix twice
    return args, params, tokenizer


def check_model_type(cfg: Any, source: Path) -> None:
    """Only architectures that compute exactly LlamaForCausalLM's function are accepted."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"{source}: expected a JSON object")
    kind = cfg.get("model_type", "llama")
    if kind == "mistral" and cfg.get("sliding_window") in (None, 0) or kind == "llama":
        return
    raise ConfigError(f"{source}: model_type {kind!r} is not a Llama model npllama runs "
                      f"(it reads 'llama', and 'mistral' without a sliding window)")


def hf_tokenizer(folder: Path, cfg: dict, gen: dict) -> Tokenizer | None:
    """tokenizer.json (preferred) or tokenizer.model, with ids and chat template from the config files."""
    tok_cfg = read_json(folder / "tokenizer_config.json", required=False) or {}
    if not isinstance(tok_cfg, dict):
        raise CheckpointError(f"{folder / 'tokenizer_config.json'}: expected a JSON object")
    template = _chat_template(folder, tok_cfg)
    add_bos = tok_cfg.get("add_bos_token")
    eos = gen.get("eos_token_id", cfg.get("eos_token_id"))
    bos = gen.get("bos_token_id", cfg.get("bos_token_id"))
    eos_ids = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
    if (folder / "tokenizer.json").is_file():
        return Tokenizer.from_tokenizer_json(folder / "tokenizer.json", bos_id=bos, eos_ids=eos_ids,
                                             chat_template=template, add_bos=add_bos,
                                             bos_token=_spelling(tok_cfg.get("bos_token")),
                                             eos_token=_spelling(tok_cfg.get("eos_token")))
    if (folder / "tokenizer.model").is_file():   # SentencePiece knows its own <s> and </s>
        return Tokenizer.from_sentencepiece(folder / "tokenizer.model", bos_id=-1 if bos is None else bos,
                                            eos_ids=eos_ids or None, chat_template=template,
                                            add_bos=True if add_bos is None else add_bos)
    return None


def _spelling(token: Any) -> str | None:
    if isinstance(token, dict):           # older files: {"content": "<s>", ...}
        token = token.get("content")
    return token if isinstance(token, str) else None


def _chat_template(folder: Path, tok_cfg: dict) -> str | None:
    """chat_template.jinja (transformers >= 4.43 writes it) or tokenizer_config.json's chat_template."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{jinja}: cannot read ({e})") from None
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):        # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None
