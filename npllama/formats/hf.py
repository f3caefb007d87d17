"""Hugging Face checkpoints: config.json + safetensors (+ tokenizer files) -> ModelArgs, params, Tokenizer.

A folder written by transformers' ``save_pretrained`` holds

    config.json                    LlamaConfig                           -> args_from_config
    model.safetensors              the weights, or shards listed in model.safetensors.index.json
    generation_config.json         eos_token_id(s) used to stop generation (optional)
    tokenizer.json                 a ``tokenizers`` tokenizer, or tokenizer.model (SentencePiece)
    tokenizer_config.json          bos/eos spellings, add_bos_token, chat_template (optional)
    chat_template.jinja            the chat template, in newer transformers (optional)

Names: transformers' LlamaForCausalLM names map one to one onto Meta's, which npllama uses
(names.py). HF's q_proj / k_proj rows are already in the rotate-half layout npllama uses: no
permutation.

The same module writes such a folder (``save_checkpoint``): config.json from ModelArgs
(``hf_config``, the inverse of ``args_from_config``), model.safetensors in HF names, and the
tokenizer files of the source checkpoint; the whole folder appears at once (npllama.io.write_folder).

safetensors (https://github.com/huggingface/safetensors): 8 bytes little-endian header length N,
N bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]}}, then the data. The header is
checked against the file size before any tensor is read.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from ..chat_templates import MAX_TEMPLATE_CHARS, ChatTemplate
from ..checks import is_int
from ..config import ModelArgs
from ..errors import CheckpointError, ConfigError, TokenizerError
from ..io import open_regular, parse_json, read_regular, write_folder
from ..params import check_params
from ..tokenizer import Tokenizer, is_tiktoken_file
from ..quant.gguf_blocks import bf16_to_float32
from ..quant.matrix import FLOAT_STORAGE
from .fields import Fields, build_args, normalise_rope_scaling, read_json
from .mapped import as_mapped_weight, choose_mapped, map_file, place, view
from .torch_save import read_torch_zip
from .names import rename

_SKIP_RE = re.compile(r"(model\.)?layers\.\d+\.self_attn\.rotary_emb\.inv_freq")   # older checkpoints store it

# safetensors dtype -> (numpy dtype of the raw bytes, bytes per element)
_ST_DTYPES = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
_ST_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
             "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
MAX_HEADER = 100 * 1024 * 1024   # safetensors' own limit on the JSON header


# ---------------------------------------------------------------------------- config.json
def args_from_config(cfg: Mapping[str, Any], source: str = "config.json") -> ModelArgs:
    """ModelArgs from a transformers ``config.json`` (LlamaConfig and its relatives).

    Both rope styles are read: the older ``rope_theta`` + ``rope_scaling`` (with ``type`` or
    ``rope_type``) and the newer ``rope_parameters`` that holds ``rope_theta`` itself.
    """
    f = Fields(cfg, source)
    n_heads = f.integer("num_attention_heads")
    # As transformers' standardize_rope_params: a non-empty rope_scaling wins over rope_parameters;
    # rope_theta and partial_rotary_factor inside the dict win over the top-level keys; a top-level
    # original_max_position_embeddings wins for llama3 / yarn / longrope (Phi-3 style).
    params = f.mapping_or_none("rope_scaling") or f.mapping_or_none("rope_parameters") or {}
    params = dict(params)
    theta = Fields(params, f"{source} rope parameters").number("rope_theta", f.number("rope_theta", 10000.0))
    params.pop("rope_theta", None)
    scaling = normalise_rope_scaling(params, source)
    partial = scaling.pop("partial_rotary_factor", None)
    partial = f.number("partial_rotary_factor", 1.0) if partial is None else \
        Fields({"partial_rotary_factor": partial}, f"{source} rope parameters").number("partial_rotary_factor")
    if scaling["rope_type"] in ("llama3", "yarn", "longrope") and \
            cfg.get("original_max_position_embeddings") is not None:
        scaling["original_max_position_embeddings"] = f.integer("original_max_position_embeddings")
    attention_bias = f.flag("attention_bias", False)
    return ModelArgs(
        dim=f.integer("hidden_size"),
        n_layers=f.integer("num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=f.integer("num_key_value_heads", n_heads),
        vocab_size=f.integer("vocab_size"),
        hidden_dim=f.integer("intermediate_size"),
        head_dim=f.integer("head_dim", 0, minimum=0),
        norm_eps=f.number("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        partial_rotary_factor=partial,
        max_seq_len=f.integer("max_position_embeddings", 2048),
        tie_word_embeddings=f.flag("tie_word_embeddings", False),
        attention_bias=attention_bias,
        attention_out_bias=attention_bias,  # LlamaAttention puts the same flag on o_proj
        mlp_bias=f.flag("mlp_bias", False),
        bos_token_id=f.integer("bos_token_id", None, minimum=0),
        eos_token_ids=f.token_ids("eos_token_id"),
    )


def hf_config(args: ModelArgs, dtype: str = "float32") -> dict[str, Any]:
    """A transformers LlamaConfig dict (config.json) that args_from_config reads back as args."""
    if args.attention_out_bias != args.attention_bias:
        raise ConfigError("a Hugging Face Llama config has one attention_bias flag for q/k/v and o; "
                          "this model has bias on only some of them and cannot be written as one")
    scaling = dict(args.rope_scaling)
    cfg: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": args.dim,
        "intermediate_size": args.hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": None if scaling == {"rope_type": "default"} else scaling,
        "max_position_embeddings": args.max_seq_len,
        "tie_word_embeddings": args.tie_word_embeddings,
        "attention_bias": args.attention_bias,
        "mlp_bias": args.mlp_bias,
        "bos_token_id": args.bos_token_id,
        "eos_token_id": (list(args.eos_token_ids) if len(args.eos_token_ids) > 1
                         else (args.eos_token_ids[0] if args.eos_token_ids else None)),
        "torch_dtype": dtype,
    }
    if args.partial_rotary_factor != 1.0:
        cfg["partial_rotary_factor"] = args.partial_rotary_factor
    return cfg


# ---------------------------------------------------------------------------- safetensors
def read_safetensors_header(path: Path) -> tuple[dict[str, dict], int]:
    """(tensor entries, byte offset where data starts), after checking every entry fits the file."""
    try:
        with open_regular(path) as f:
            size = os.fstat(f.fileno()).st_size
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
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({e})") from None
    header = parse_json(text, f"{path}: the safetensors header")
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
    if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
        raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(is_int(o) for o in offsets)):
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


def map_safetensors(path: Path, progress: Callable) -> dict[str, Any]:
    """The tensors of one .safetensors file left in it: F32, F16 and BF16 matrices as mapped
    QuantizedMatrix (formats/mapped.py), vectors and F64 tensors read into memory."""
    header, start = read_safetensors_header(path)
    region = map_file(path)
    out: dict[str, Any] = {}
    for name in progress(list(header), desc=f"Mapping {path.name}", unit="tensor"):
        entry = header[name]
        kind, (begin, _) = entry["dtype"], entry["data_offsets"]
        if kind == "F64":
            out[name] = read_safetensors(path, lambda it, **kw: it, {name})[name]
        elif kind not in FLOAT_STORAGE:
            raise CheckpointError(f"{path}: tensor {name!r} is {kind}; weights must be F32, F16, BF16 or F64")
        else:
            out[name] = as_mapped_weight(view(region, start + begin, kind, tuple(entry["shape"]),
                                              f"{path}: tensor {name!r}"))
    return out


def weight_files(folder: Path) -> list[Path]:
    """model.safetensors, or the shards named by model.safetensors.index.json, or pytorch_model.bin."""
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if os.path.lexists(single):
        return [single]
    if os.path.lexists(index):
        data = read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: has no weight_map naming the shards")
        bad = next(((k, v) for k, v in weight_map.items() if not isinstance(v, str)), None)
        if bad is not None:
            raise CheckpointError(f"{index}: weight_map[{bad[0]!r:.80}] must be a shard's file name (a string), "
                                  f"got {bad[1]!r:.80}")
        files = []
        for shard in dict.fromkeys(weight_map.values()):
            p = folder / shard
            if Path(shard).name != shard or not os.path.lexists(p):
                raise CheckpointError(f"{index}: names shard {shard!r:.200}, which is not a file in {folder}")
            files.append(p)
        return files
    if os.path.lexists(folder / "pytorch_model.bin"):
        return [folder / "pytorch_model.bin"]
    raise CheckpointError(f"{folder}: has config.json but no model.safetensors, model.safetensors.index.json "
                          f"or pytorch_model.bin")


# ---------------------------------------------------------------------------- names
def npllama_name(hf_name: str) -> str | None:
    """transformers' tensor name -> npllama's (Meta's) name; None for names to skip; raises for unknown."""
    if _SKIP_RE.fullmatch(hf_name):
        return None
    name = rename(hf_name, "hf", "meta")
    if name is None:
        raise CheckpointError(f"tensor {hf_name!r} is not part of a Llama model (LlamaForCausalLM) npllama knows")
    return name


# ---------------------------------------------------------------------------- the loader
def shard_tensor_name(file: Path, hf_name: str, seen: Mapping[str, object]) -> str | None:
    """npllama's name for a tensor of one shard (None: a tensor npllama does not use), or a
    CheckpointError naming the shard, for a name it cannot read or a tensor another shard holds too."""
    try:
        name = npllama_name(hf_name)
    except CheckpointError as e:
        raise CheckpointError(f"{file}: {e}") from None
    if name is not None and name in seen:
        raise CheckpointError(f"{file}: tensor {hf_name!r} appears in more than one shard")
    return name


def load_hf(folder: Path, progress: Callable, mapped: bool | None = None):
    """A transformers folder -> (ModelArgs, params in npllama names, Tokenizer or None).

    mapped: leave the matrices in the weight files (formats/mapped.py); None: when the model is large."""
    cfg = read_json(folder / "config.json")
    check_model_type(cfg, folder / "config.json")
    args = build_args(args_from_config, folder / "config.json", cfg, str(folder / "config.json"))
    gen = read_json(folder / "generation_config.json", required=False) or {}
    tokenizer = hf_tokenizer(folder, cfg, gen if isinstance(gen, dict) else {})
    if tokenizer is not None:
        args = args.replace(bos_token_id=tokenizer.bos_id if tokenizer.bos_id is not None else args.bos_token_id,
                            eos_token_ids=tokenizer.eos_ids or args.eos_token_ids)

    use_map = choose_mapped(mapped, args)
    params: dict[str, Any] = {}
    for file in weight_files(folder):
        if file.suffix == ".bin":
            tensors = read_torch_zip(file, mapped=use_map)
            tensors = place(tensors, True) if use_map else tensors
        else:
            tensors = map_safetensors(file, progress) if use_map else read_safetensors(file, progress)
        for hf_name, array in tensors.items():
            name = shard_tensor_name(file, hf_name, params)
            if name is not None:
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
    if add_bos is not None and not isinstance(add_bos, bool):
        raise TokenizerError(f"{folder / 'tokenizer_config.json'}: 'add_bos_token' must be true or false, "
                             f"got {add_bos!r:.80}")
    ids = Fields(gen, str(folder / "generation_config.json")) if gen.get("eos_token_id") is not None \
        else Fields(cfg, str(folder / "config.json"))
    eos_ids = ids.token_ids("eos_token_id")
    bos_fields = Fields(gen, str(folder / "generation_config.json")) if gen.get("bos_token_id") is not None \
        else Fields(cfg, str(folder / "config.json"))
    bos = bos_fields.integer("bos_token_id", None, minimum=0)
    if os.path.lexists(folder / "tokenizer.json"):
        return Tokenizer.from_tokenizer_json(folder / "tokenizer.json", bos_id=bos, eos_ids=eos_ids,
                                             chat_template=template, add_bos=add_bos,
                                             bos_token=_spelling(tok_cfg.get("bos_token")),
                                             eos_token=_spelling(tok_cfg.get("eos_token")))
    if os.path.lexists(folder / "tokenizer.model") and is_tiktoken_file(folder / "tokenizer.model"):
        # Llama 3's tiktoken file (a Meta folder converted by npllama): 3.1 and later scale their rope
        scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters")
        scaled = isinstance(scaling, dict) and (scaling.get("rope_type") or scaling.get("type")) == "llama3"
        return Tokenizer.from_tiktoken(folder / "tokenizer.model", version="3.1" if scaled else "3",
                                       chat_template=template, add_bos=True if add_bos is None else add_bos)
    if os.path.lexists(folder / "tokenizer.model"):   # SentencePiece knows its own <s> and </s>
        return Tokenizer.from_sentencepiece(folder / "tokenizer.model", bos_id=-1 if bos is None else bos,
                                            eos_ids=eos_ids or None, chat_template=template,
                                            add_bos=True if add_bos is None else add_bos)
    return None


def _spelling(token: Any) -> str | None:
    if isinstance(token, dict):           # older files: {"content": "<s>", ...}
        token = token.get("content")
    return token if isinstance(token, str) else None


def _chat_template(folder: Path, tok_cfg: dict) -> ChatTemplate | None:
    """chat_template.jinja (transformers >= 4.43 writes it) or tokenizer_config.json's chat_template,
    as a ChatTemplate that names where it came from."""
    jinja = folder / "chat_template.jinja"
    if os.path.lexists(jinja):
        raw = read_regular(jinja, MAX_TEMPLATE_CHARS * 4, TokenizerError)
        try:
            return ChatTemplate(raw.decode("utf-8"), str(jinja))
        except UnicodeDecodeError as e:
            raise TokenizerError(f"{jinja}: not UTF-8 text ({e}); a chat template is Jinja text") from None
    where = f"{folder / 'tokenizer_config.json'}: chat_template"
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):        # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template
                 if isinstance(t, dict) and isinstance(t.get("name"), str)}
        template, where = named.get("default"), f"{where}['default']"
    if template is not None and not isinstance(template, str):
        raise TokenizerError(f"{where} must be Jinja text (or a list of named templates), got {template!r:.80}")
    return None if template is None else ChatTemplate(template, where)


# ---------------------------------------------------------------------------- writing a folder
# Files of a tokenizer that travel with a checkpoint when it is converted.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "generation_config.json", "chat_template.jinja")


def safetensors_bytes(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialise NumPy arrays as one safetensors file (contiguous copies, names as given)."""
    from safetensors.numpy import save
    return save({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                metadata={"format": "pt", **(metadata or {})})


def hf_files(args: ModelArgs, params: Mapping[str, np.ndarray], dtype=np.float32) -> dict[str, bytes]:
    """config.json and model.safetensors of a checkpoint, as bytes (HF names, (out, in) layout)."""
    check_params(args, params)
    dtype = np.dtype(dtype)
    tensors = {rename(k, "meta", "hf"): np.asarray(v, dtype=dtype) for k, v in params.items()}
    return {"config.json": (json.dumps(hf_config(args, dtype.name), indent=2) + "\n").encode(),
            "model.safetensors": safetensors_bytes(tensors)}


def tokenizer_files(source: str | os.PathLike | None) -> dict[str, Path]:
    """The tokenizer files of a checkpoint folder (see TOKENIZER_FILES), to copy along with it.

    A file (a .gguf) has its tokenizer inside it, not beside it: nothing is taken from its folder.
    """
    if source is None or not Path(source).is_dir():
        return {}
    folder = Path(source)
    return {name: folder / name for name in TOKENIZER_FILES if (folder / name).is_file()}


def save_checkpoint(folder: str | os.PathLike, args: ModelArgs, params: Mapping[str, np.ndarray],
                    tokenizer_from: str | os.PathLike | None = None,
                    extra: Mapping[str, bytes | os.PathLike] | None = None,
                    overwrite: bool = False, dtype=np.float32, tokenizer: Tokenizer | None = None) -> Path:
    """Write a Hugging Face folder: config.json, model.safetensors, the tokenizer files of the folder
    ``tokenizer_from`` (or, when it has none, ``tokenizer`` written out: a GGUF's vocabulary), and
    any ``extra`` files; atomically as a whole. Every safetensors file is read back before the
    folder is put in place.
    """
    files: dict[str, bytes | os.PathLike] = dict(tokenizer_files(tokenizer_from))
    if not any(name in files for name in ("tokenizer.json", "tokenizer.model")) and tokenizer is not None:
        files.update(tokenizer.to_files())
    files.update(hf_files(args, params, dtype))
    files.update(extra or {})
    return write_folder(folder, files, overwrite, check=verify_safetensors)


def verify_safetensors(folder: Path) -> None:
    """Read back the header of every .safetensors file under folder; CheckpointError if one is torn."""
    for path in sorted(Path(folder).rglob("*.safetensors")):
        read_safetensors_header(path)
