"""Multi-head to grouped-query attention by mean-pooling key/value heads, and the checkpoint writer.

GQA (Ainslie et al. 2023, "GQA: Training Generalized Multi-Query Transformer Models from Multi-Head
Checkpoints", section 2.1) turns a multi-head checkpoint into a grouped-query one in two steps:

1. *Convert*: split the key heads into G groups of consecutive heads and replace each group by the
   mean of its heads; the same for the value heads. Query and output projections are untouched.
   Mean-pooling kept more of the model than keeping the first head of each group or a random init.
2. *Uptrain*: continue pre-training the converted model for a small fraction (5%) of the original
   steps, so that it adapts to its new structure (``npllama train --init``).

G = n_heads is the model itself (MHA), G = 1 is multi-query attention (Shazeer 2019). Grouping is by
consecutive heads, as ``npllama.attention.repeat_kv`` serves them: query head h reads key/value head
h // (n_heads / n_kv_heads). Pooling consecutive kv heads keeps every query head reading the mean of
the heads it (and its group) used to read.

The writer (:func:`save_checkpoint`) produces a Hugging Face folder (config.json +
model.safetensors, HF tensor names, nn.Linear's (out, in) layout, q/k rows in the rotate-half
layout, which is npllama's own) that npllama.load, parity.load and transformers all read. The whole
folder is written under a temporary name and renamed into place, so no reader ever sees half of it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import click
import numpy as np

from .config import ModelArgs
from .errors import CheckpointError, ConfigError
from .io import _fsync_directory, _umask, atomic_write
from .model import check_params

# Files of a tokenizer that travel with a checkpoint when it is converted.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "generation_config.json", "chat_template.jinja")


# ---------------------------------------------------------------------------- mean-pooling
def mean_pool_heads(w: np.ndarray, n_heads: int, groups: int) -> np.ndarray:
    """Average consecutive heads of a projection in groups (GQA section 2.1).

    w: (n_heads * head_dim, in) weight or (n_heads * head_dim,) bias
    -> (groups * head_dim, in) or (groups * head_dim,): head g of the result is the mean of heads
    g * r ... (g + 1) * r - 1 of w, r = n_heads / groups.
    """
    if n_heads % groups:
        raise ConfigError(f"cannot pool {n_heads} heads into {groups} groups: {groups} does not divide {n_heads}")
    head_dim = w.shape[0] // n_heads
    grouped = w.reshape(groups, n_heads // groups, head_dim, *w.shape[1:])   # (groups, r, head_dim, ...)
    mean = grouped.astype(np.float64).mean(axis=1)                            # (groups, head_dim, ...)
    return mean.reshape(groups * head_dim, *w.shape[1:]).astype(w.dtype)


def convert_kv_heads(args: ModelArgs, params: Mapping[str, np.ndarray],
                     n_kv_heads: int) -> tuple[ModelArgs, dict[str, np.ndarray]]:
    """The config and weights of the model with its key/value heads mean-pooled to n_kv_heads.

    params: checkpoint names, (out, in) layout (npllama.model.param_shapes). wk and wv (and their
    biases) of every layer shrink from (args.n_kv_heads * head_dim, dim) to (n_kv_heads * head_dim,
    dim); every other tensor is passed through. n_kv_heads must divide the current number of kv
    heads (MHA -> GQA-G, GQA -> fewer groups, anything -> MQA with 1).
    """
    check_params(args, params)
    if isinstance(n_kv_heads, bool) or not isinstance(n_kv_heads, (int, np.integer)) or n_kv_heads <= 0:
        raise ConfigError(f"--kv-heads must be a positive integer, got {n_kv_heads!r}")
    if args.n_kv_heads % n_kv_heads:
        divisors = [g for g in range(1, args.n_kv_heads + 1) if args.n_kv_heads % g == 0]
        raise ConfigError(f"the model has {args.n_kv_heads} key/value heads, which do not split into "
                          f"{n_kv_heads} equal groups; choose one of {divisors}")
    out = dict(params)
    for i in range(args.n_layers):
        for name in ("wk", "wv"):
            for kind in ("weight", "bias"):
                key = f"layers.{i}.attention.{name}.{kind}"
                if key in params:
                    out[key] = mean_pool_heads(np.asarray(params[key]), args.n_kv_heads, n_kv_heads)
    new_args = args.replace(n_kv_heads=int(n_kv_heads))
    check_params(new_args, out, "converted checkpoint")
    return new_args, out


# ---------------------------------------------------------------------------- writing HF folders
def hf_tensor_name(name: str) -> str:
    """Meta's checkpoint name -> transformers' LlamaForCausalLM name."""
    fixed = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    if name in fixed:
        return fixed[name]
    _, i, rest = name.split(".", 2)
    module, _, kind = rest.rpartition(".")
    hf = {"attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
          "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
          "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
          "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
          "feed_forward.w2": "mlp.down_proj"}[module]
    return f"model.layers.{i}.{hf}.{kind}"


def hf_config(args: ModelArgs, dtype: str = "float32") -> dict[str, Any]:
    """A transformers LlamaConfig dict (config.json) that ModelArgs.from_hf reads back as args."""
    if args.attention_out_bias != args.attention_bias:
        raise ConfigError("a Hugging Face Llama config has one attention_bias flag for q/k/v and o; "
                          "this model has bias on only some of them and cannot be written as one")
    scaling = {k: v for k, v in args.rope_scaling.items()}
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


def safetensors_bytes(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialise NumPy arrays as one safetensors file (contiguous copies, names as given)."""
    from safetensors.numpy import save
    return save({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                metadata={"format": "pt", **(metadata or {})})


def hf_files(args: ModelArgs, params: Mapping[str, np.ndarray], dtype=np.float32) -> dict[str, bytes]:
    """config.json and model.safetensors of a checkpoint, as bytes (HF names, (out, in) layout)."""
    check_params(args, params)
    dtype = np.dtype(dtype)
    tensors = {hf_tensor_name(k): np.asarray(v, dtype=dtype) for k, v in params.items()}
    return {"config.json": (json.dumps(hf_config(args, dtype.name), indent=2) + "\n").encode(),
            "model.safetensors": safetensors_bytes(tensors)}


def write_folder(folder: str | os.PathLike, files: Mapping[str, bytes | os.PathLike],
                 overwrite: bool = False) -> Path:
    """Write a whole folder at once: every file lands under a temporary name, then one rename.

    files: name -> bytes, or name -> Path of a file to copy. A reader sees either no folder or the
    complete one; a crash leaves at most a hidden ``.name.tmp-*`` sibling. With overwrite, an
    existing folder is moved aside first and deleted after the rename.
    """
    folder = Path(folder)
    if folder.exists() and not overwrite and (not folder.is_dir() or any(folder.iterdir())):
        raise CheckpointError(f"{folder} already exists and is not empty; choose a new output folder "
                              f"(or pass --overwrite)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        for name, content in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, (bytes, bytearray, memoryview)):
                with atomic_write(tmp / name) as f:
                    f.write(content)
            else:
                with open(content, "rb") as src, atomic_write(tmp / name) as f:
                    shutil.copyfileobj(src, f)
        from .formats.hf import read_safetensors_header
        for name in files:   # checked before the folder is put in place: every safetensors file reads back
            if str(name).endswith(".safetensors"):
                read_safetensors_header(tmp / name)
        os.chmod(tmp, 0o777 & ~_umask())
        old = None
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.rename(folder, old)
        os.rename(tmp, folder)
        _fsync_directory(folder.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def tokenizer_files(source: str | os.PathLike | None) -> dict[str, Path]:
    """The tokenizer files beside a checkpoint (see TOKENIZER_FILES), to copy along with it."""
    if source is None:
        return {}
    source = Path(source)
    folder = source if source.is_dir() else source.parent
    return {name: folder / name for name in TOKENIZER_FILES if (folder / name).is_file()}


def save_checkpoint(folder: str | os.PathLike, args: ModelArgs, params: Mapping[str, np.ndarray],
                    tokenizer_from: str | os.PathLike | None = None,
                    extra: Mapping[str, bytes | os.PathLike] | None = None,
                    overwrite: bool = False, dtype=np.float32) -> Path:
    """Write a Hugging Face folder: config.json, model.safetensors, the tokenizer files found beside
    ``tokenizer_from`` (a folder, or a file in one), and any ``extra`` files; atomically as a whole.
    """
    files: dict[str, bytes | os.PathLike] = dict(tokenizer_files(tokenizer_from))
    files.update(hf_files(args, params, dtype))
    files.update(extra or {})
    return write_folder(folder, files, overwrite)


# ---------------------------------------------------------------------------- command line
@click.command(name="convert", help="Convert a checkpoint to grouped-query (or multi-query) attention: "
               "the key and value heads of each group are mean-pooled into one (GQA, Ainslie et al. "
               "2023). Writes a Hugging Face folder that npllama, parity and transformers load.")
@click.option("--model", "-m", "model_path", required=True, metavar="PATH",
              help="The checkpoint to convert (a Hugging Face folder, a Meta folder or a .gguf file).")
@click.option("--kv-heads", "-g", "kv_heads", type=int, required=True,
              help="Key/value heads of the result: 1 is MQA; the model's own count changes nothing.")
@click.option("--out", "-o", "out", required=True, type=click.Path(file_okay=False),
              help="Output folder (config.json + model.safetensors + tokenizer files).")
@click.option("--overwrite", is_flag=True, help="Replace the output folder if it exists.")
def convert_command(model_path, kv_heads, out, overwrite):
    from .formats import load
    if Path(out).exists() and not overwrite and (not Path(out).is_dir() or any(Path(out).iterdir())):
        raise CheckpointError(f"{out} already exists and is not empty; choose a new output folder "
                              f"(or pass --overwrite)")
    model = load(model_path)
    args = model.config
    new_args, params = convert_kv_heads(args, model.state_dict(), kv_heads)
    folder = save_checkpoint(out, new_args, params, tokenizer_from=model_path, overwrite=overwrite)
    kind = "MHA" if kv_heads == args.n_heads else ("MQA" if kv_heads == 1 else f"GQA-{kv_heads}")
    click.echo(f"{folder}: {args.n_heads} query heads, {args.n_kv_heads} -> {kv_heads} key/value heads "
               f"({kind}); {sum(a.size for a in params.values()):,} parameters")
