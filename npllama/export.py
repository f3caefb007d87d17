"""Weights out: a loaded model's weights written in the layout a port expects, as safetensors.

    npllama export --layout meta --out runs/meta-weights      # the default model, Meta's layout
    npllama export --model DIR --layout hf --out runs/hf      # Hugging Face's

    from npllama.export import export
    export("weights/SmolLM2-135M-Instruct.Q4_1.gguf", "runs/meta-weights", layout="meta")

Why: npllama holds the wq and wk rows of every head in the rotate-half layout (Hugging Face's;
``Transformer.state_dict`` says so), while a port written after Meta's model.py or gpt-fast
rotates interleaved channel pairs. Such a port loading ``state_dict()`` as it is gets permuted q
and k, and parts from the reference at ``attention.q`` for a reason that lies in the weights, not
in its code. Export writes the weights the port's way instead:

    meta  Meta's names (tok_embeddings, layers.N.attention.wq, ..., feed_forward.w1/w2/w3, norm,
          output), the rows of wq (n_heads heads) and wk (n_kv_heads heads) interleaved
          (formats/permute.py), ``output.weight`` present even when the model ties it to the
          embedding (strict loaders want it); params.json as Meta's ModelArgs reads it.
    hf    transformers' names and rows (formats/names.py), config.json and the tokenizer's files:
          a folder that LlamaForCausalLM.from_pretrained and npllama.load read back.

Both: every matrix (out, in) as nn.Linear holds it, float32 by default (a quantized file's blocks
dequantized to the values npllama computes with, which stderr and the README say) or float16 /
bfloat16 (rounded to nearest even), and a README.md in the folder saying what is where.

Streamed: the file's header is computed from the shapes alone, then each tensor is converted and
written in blocks of rows (a quantized matrix dequantized piece by piece), so the export holds no
more than one tensor beside the model. From a path, a GGUF file is loaded with its blocks kept
(memory about the file's size), so an 8B model is never held whole in floats.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .config import ModelArgs
from .errors import ConfigError, InputError
from .formats.names import GLOBAL_NAMES, LAYER_NAMES, rename
from .formats.permute import permute_to_interleaved
from .io import atomic_write, make_folder
from .model import Transformer
from .quant.matrix import QuantizedMatrix

LAYOUTS = ("meta", "hf")
DTYPES = {"float32": ("F32", 4), "float16": ("F16", 2), "bfloat16": ("BF16", 2)}
WEIGHTS_FILE = "model.safetensors"
# Every file an export may write (--force replaces an earlier export's, whatever its layout).
EXPORT_FILES = (WEIGHTS_FILE, "README.md", "params.json", "config.json", "tokenizer.json", "tokenizer.model",
                "tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "chat_template.jinja")
CHUNK_BYTES = 64 * 2**20          # rows converted and written at a time
FLOAT_TYPES = ("F32", "F16", "BF16", "F64")
# The llama3 rope scaling that Meta's params.json spells ``use_scaled_rope`` (its apply_scaling's constants).
META_SCALED_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@dataclass(frozen=True)
class Entry:
    """One tensor of the written file: its name there, shape, and where its values come from."""
    name: str
    shape: tuple[int, ...]
    weight: Any                   # a float array or a QuantizedMatrix, (out, in) or (out,)
    heads: int | None = None      # permute the rows to the interleaved layout in this many heads


# ---------------------------------------------------------------------------- the export
def export(model_or_path: Transformer | str | os.PathLike | None, out: str | os.PathLike, *, layout: str = "meta",
           dtype: str = "float32", force: bool = False, progress: bool = False, mapped: bool | None = None) -> Path:
    """Write a model's weights to the folder ``out`` in ``layout`` ("meta" or "hf") and ``dtype``
    ("float32", "float16", "bfloat16"); returns the folder.

    model_or_path: a loaded Transformer, or a checkpoint path as npllama.load takes it (None: the
    default model; a Hub id), loaded with ``mapped`` (npllama.load's). out must be new or empty
    unless force (then an earlier export's files in it are replaced).
    """
    check_options(layout, dtype)
    check_out(out, force)
    if isinstance(model_or_path, Transformer):
        model = model_or_path
    else:
        model = load_for_export(model_or_path, progress, mapped)
    args = model.config
    if layout == "meta" and args.rotary_dim != args.head_dim:
        raise InputError(f"this model rotates {args.rotary_dim} of the {args.head_dim} channels of each head; Meta's "
                         f"interleaved layout is defined for whole heads: export --layout hf")
    quantized = quantized_types(model)
    if quantized:
        print(f"{Path(model.source).name} holds {', '.join(quantized)} blocks: written dequantized "
              f"to {dtype} (the values npllama computes with)", file=sys.stderr)
    out = Path(out)
    make_folder(out)
    entries = plan(model, layout)
    files: dict[str, bytes] = {}
    if layout == "meta":
        params, caveats = meta_params(args)
        files["params.json"] = (json.dumps(params, indent=2) + "\n").encode()
    else:
        from .formats.hf import hf_config, tokenizer_files
        try:
            config = hf_config(args, dtype)
        except ConfigError as e:
            raise InputError(f"--layout hf: {e}; export --layout meta instead") from None
        files["config.json"] = (json.dumps(config, indent=2) + "\n").encode()
        copied = tokenizer_files(model.source)
        if copied:
            files.update({name: path.read_bytes() for name, path in copied.items()})
        elif model.tokenizer is not None:
            files.update(model.tokenizer.to_files())
        caveats = []
    if force:
        for name in EXPORT_FILES:
            if name not in files and name != WEIGHTS_FILE and (out / name).is_file():
                (out / name).unlink()
    metadata = {"format": "pt", "layout": layout, "rotary_layout": "interleaved" if layout == "meta" else "half",
                "source": Path(str(model.source)).name}
    size = write_safetensors(out / WEIGHTS_FILE, entries, dtype, metadata, progress)
    for name, data in files.items():
        with atomic_write(out / name) as f:
            f.write(data)
    readme = describe(model, layout, dtype, entries, size, sorted(files), quantized, caveats)
    with atomic_write(out / "README.md", "w") as f:
        f.write(readme)
    return out


def check_options(layout: str, dtype: str) -> None:
    if layout not in LAYOUTS:
        raise InputError(f"layout {layout!r}: choose 'meta' (Meta's names, interleaved rotary rows) or 'hf' "
                         f"(Hugging Face's)")
    if dtype not in DTYPES:
        raise InputError(f"dtype {dtype!r}: choose one of {', '.join(DTYPES)}")


def check_out(out: str | os.PathLike, force: bool) -> None:
    """An InputError, before any slow load, for an output folder that is a file, or holds files and
    force is not given."""
    from .io import check_writable

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} is a file; give a folder for the export (--out DIR)")
    if out.is_dir() and not force and any(out.iterdir()):
        raise InputError(f"{out} already holds files; choose a new folder for the export (or pass --force "
                         f"to write over it)")
    check_writable(out, folder=True)


def load_for_export(path, progress: bool, mapped: bool | None = None) -> Transformer:
    """The checkpoint at path (as npllama.load takes it); a GGUF file keeps its blocks (dequantized
    one tensor at a time as it is written)."""
    from .formats import detect_format, load, resolve

    where = resolve(path)
    fmt, _ = detect_format(where)
    return load(where, progress=progress, weights="gguf" if fmt == "gguf" else "float32", mapped=mapped)


def quantized_types(model: Transformer) -> list[str]:
    """The block types (Q4_1, Q6_K, ...) the model's weights were dequantized from: its own
    QuantizedMatrix weights', or, for a float model loaded from a GGUF file, the file's."""
    types: set[str] = set()
    for w in model.state_dict().values():
        if isinstance(w, QuantizedMatrix):
            types.update(t for t in w.types if t not in FLOAT_TYPES)
    source = Path(str(model.source))
    if not types and source.suffix == ".gguf" and source.is_file():
        import gguf

        from .formats.gguf import open_gguf
        reader = open_gguf(source)
        types = {gguf.GGMLQuantizationType(t.tensor_type).name for t in reader.tensors} - set(FLOAT_TYPES)
    return sorted(types)


# ---------------------------------------------------------------------------- what is written
def plan(model: Transformer, layout: str) -> list[Entry]:
    """The tensors of the written file in forward order, named and permuted for layout."""
    args = model.config
    sd = model.state_dict()
    if layout == "meta" and "output.weight" not in sd:
        sd["output.weight"] = sd["tok_embeddings.weight"]            # tied: written twice, as Meta's files do
    heads = {"attention.wq": args.n_heads, "attention.wk": args.n_kv_heads} if layout == "meta" else {}
    order = [f"{GLOBAL_NAMES[0][0]}.weight"]
    for i in range(args.n_layers):
        order += [f"layers.{i}.{row[0]}.{kind}" for row in LAYER_NAMES for kind in ("weight", "bias")]
    order += [f"{row[0]}.weight" for row in GLOBAL_NAMES[1:]]
    entries = []
    for name in order:
        if name not in sd:
            continue
        module = name.split(".", 2)[-1].rpartition(".")[0]            # "layers.3.attention.wq.weight" -> "attention.wq"
        target = name if layout == "meta" else rename(name, "meta", "hf")
        entries.append(Entry(target, tuple(int(n) for n in sd[name].shape), sd[name], heads.get(module)))
    left = set(sd) - set(order)
    assert not left, f"state_dict names the export does not place: {sorted(left)}"
    return entries


def meta_params(args: ModelArgs) -> tuple[dict[str, Any], list[str]]:
    """params.json for Meta's ModelArgs, and what Meta's model.py cannot express of this model."""
    multiple_of, multiplier = meta_ffn(args.dim, args.hidden_dim)
    params: dict[str, Any] = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads,
                              "n_kv_heads": args.n_kv_heads, "vocab_size": args.vocab_size, "multiple_of": multiple_of}
    if multiplier is not None:
        params["ffn_dim_multiplier"] = multiplier
    params.update({"norm_eps": args.norm_eps, "rope_theta": args.rope_theta, "use_scaled_rope": False})
    caveats = []
    scaling = args.rope_scaling
    if args.rope_type == "llama3" and all(scaling.get(k) == v for k, v in META_SCALED_ROPE.items()):
        params["use_scaled_rope"] = True
        if scaling.get("factor") != 8:
            params["rope_scaling_factor"] = scaling.get("factor")
    elif args.rope_type != "default":
        caveats.append(f"rope scaling {args.rope_type!r} has no params.json spelling: Meta's model.py rotates "
                       f"without it")
    if args.head_dim != args.dim // args.n_heads:
        caveats.append(f"head_dim is {args.head_dim}; Meta's model.py takes dim / n_heads = {args.dim // args.n_heads}")
    biased = [what for what, flag in (("q, k, v", args.attention_bias), ("o", args.attention_out_bias),
                                      ("w1, w2, w3", args.mlp_bias)) if flag]
    if biased:
        caveats.append(f"the model has biases on {' and '.join(biased)} (the .bias tensors); Meta's model.py has none")
    return params, caveats


def meta_ffn(dim: int, hidden_dim: int) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) with which Meta's FeedForward derives hidden_dim from dim."""
    from .formats.meta import meta_hidden_dim

    for multiple_of in (1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1):
        if meta_hidden_dim(dim, multiple_of, None) == hidden_dim:
            return multiple_of, None
    base = int(2 * 4 * dim / 3)
    for multiplier in (hidden_dim / base, float(np.nextafter(hidden_dim / base, np.inf))):
        if meta_hidden_dim(dim, 1, multiplier) == hidden_dim:
            return 1, multiplier
    raise InputError(f"no multiple_of / ffn_dim_multiplier makes Meta's FeedForward {hidden_dim} wide at dim {dim}; "
                     f"export --layout hf")


# ---------------------------------------------------------------------------- writing, streamed
def write_safetensors(path: Path, entries: list[Entry], dtype: str, metadata: dict[str, str],
                      progress: bool = False) -> int:
    """Write entries as one safetensors file, tensor by tensor; returns the data's size in bytes.

    The format: 8 bytes of header length (little-endian), the JSON header (name -> dtype, shape,
    data_offsets; ``__metadata__``) padded with spaces to 8 bytes, then every tensor's bytes in
    order. The header needs only the shapes, so no tensor is converted before its turn.
    """
    code, itemsize = DTYPES[dtype]
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for e in entries:
        n = int(np.prod(e.shape)) * itemsize
        header[e.name] = {"dtype": code, "shape": list(e.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    shown = _progress(entries, path.name) if progress else entries
    with atomic_write(path) as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for e in shown:
            for chunk in tensor_bytes(e, dtype):
                f.write(chunk)
    return offset


def tensor_bytes(entry: Entry, dtype: str) -> Iterator[bytes]:
    """The entry's values in dtype, little-endian, row-major, in blocks of rows."""
    w = entry.weight
    if entry.heads is not None:                                        # wq / wk: the rows move whole
        w = permute_to_interleaved(np.asarray(w, dtype=np.float32), entry.heads, entry.name)
    if isinstance(w, QuantizedMatrix):
        rows = ((first, r) for first, r in w.pieces(CHUNK_BYTES // 4))
    else:
        w = np.asarray(w)
        step = max(1, CHUNK_BYTES // max(1, w[:1].nbytes)) if w.ndim > 1 else len(w)
        rows = ((i, w[i:i + step]) for i in range(0, len(w), step))
    for _, block in rows:
        yield encode(block, dtype, entry.name)


def encode(x: np.ndarray, dtype: str, name: str) -> bytes:
    """Floats as dtype's little-endian bytes; bfloat16 rounded to nearest even on the float32 bits."""
    x32 = np.ascontiguousarray(x, dtype=np.float32)
    if dtype == "float32":
        return x32.astype("<f4", copy=False).tobytes()
    if dtype == "float16":
        with np.errstate(over="ignore"):
            half = x32.astype("<f2")
        if not np.isfinite(half).all():
            raise InputError(f"{name}: values beyond float16's range (largest |w| {float(np.abs(x32).max()):.3g} > "
                             f"65504); export in float32 or bfloat16")
        return half.tobytes()
    bits = x32.view(np.uint32)
    return ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype("<u2").tobytes()


def _progress(entries: list[Entry], what: str):
    from tqdm.auto import tqdm
    return tqdm(entries, desc=f"Writing {what}", unit="tensor", file=sys.stderr, leave=False, dynamic_ncols=True)


# ---------------------------------------------------------------------------- the README
def describe(model: Transformer, layout: str, dtype: str, entries: list[Entry], size: int, files: list[str],
             quantized: list[str], caveats: list[str]) -> str:
    """README.md of an export folder: what each file holds and how to load it."""
    from . import __version__

    args = model.config
    source = Path(str(model.source)).name
    shown = f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"
    names = "Meta's (llama / llama-models model.py)" if layout == "meta" else "Hugging Face's (LlamaForCausalLM)"
    lines = [f"# {source}: weights in {'Meta' if layout == 'meta' else 'Hugging Face'}'s layout", "",
             f"Written by `npllama export --layout {layout} --dtype {dtype}` (npllama {__version__}) from {source}.", "",
             "| file | holds |", "|---|---|",
             f"| {WEIGHTS_FILE} | {len(entries)} tensors, {dtype}, {shown}, {names} names |"]
    if layout == "meta":
        lines.append("| params.json | Meta's ModelArgs: `ModelArgs(max_seq_len=..., max_batch_size=..., **params)` |")
    else:
        lines.append("| config.json | transformers' LlamaConfig |")
        tok = [f for f in files if f not in ("config.json", "params.json")]
        if tok:
            lines.append(f"| {', '.join(tok)} | the tokenizer |")
    lines += ["| README.md | this file |", "",
              "- Every matrix is (out, in), as nn.Linear holds it: `y = x @ w.T`."]
    if layout == "meta":
        lines += [f"- The rows of `attention.wq` ({args.n_heads} heads) and `attention.wk` ({args.n_kv_heads} key/value "
                  f"heads) are in Meta's interleaved rotary layout: channels (2i, 2i+1) of each head are one pair, "
                  f"rotated as one complex number (Meta's `apply_rotary_emb`). A dump of a port that rotates them so "
                  f"declares `rotary_layout=\"interleaved\"`."]
        if args.tie_word_embeddings:
            lines.append("- `output.weight` is a copy of `tok_embeddings.weight`: the model ties the two.")
    else:
        lines.append("- The rows of `q_proj` and `k_proj` are in the rotate-half layout (transformers' `rotate_half`).")
        if args.tie_word_embeddings:
            lines.append("- There is no `lm_head.weight`: the model ties it to `model.embed_tokens.weight` "
                         "(`tie_word_embeddings` in config.json).")
    if quantized:
        lines.append(f"- Dequantized from the {', '.join(quantized)} blocks of {source}: the values npllama computes "
                     f"with, not the weights before quantization.")
    lines += [f"- Not expressible in Meta's model.py: {c}." for c in caveats]
    if layout == "meta":
        lines += ["", "Load into a port with Meta's names:", "", "    from safetensors.torch import load_file",
                  f"    model.load_state_dict(load_file(\"{WEIGHTS_FILE}\"))"]
    else:
        lines += ["", "Load: `LlamaForCausalLM.from_pretrained(folder)`, or `npllama.load(folder)`."]
    return "\n".join(lines) + "\n"

