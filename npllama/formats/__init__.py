"""Checkpoint formats: a file or folder -> ModelArgs + weight arrays + Tokenizer -> Transformer.

    model = npllama.load("path/to/checkpoint")    # or npllama.load() for the default model

Three formats are recognised by what a path holds:

* Hugging Face folder  config.json + model.safetensors (or shards + model.safetensors.index.json)
                       [tokenizer.json | tokenizer.model, tokenizer_config.json, generation_config.json]
                                                                                  -> formats/hf.py
* Meta folder          params.json + consolidated.00.pth [.01 ...] + tokenizer.model -> formats/meta.py
* GGUF                 a .gguf file, or a folder holding exactly one             -> formats/gguf.py

A path that does not exist but reads as a Hugging Face Hub id (org/name[@revision]) is the
repository's snapshot in huggingface_hub's cache (hub.py; fetched when missing, unless offline).

Each loader returns the weights in npllama's contract (params.py): Meta's names, nn.Linear's
(out, in) layout, q/k rows in the rotate-half layout. The model never knows which file it came from.
Where the weights live is a choice of its own (mapped.py): in memory, or left in the files behind
a memory map and made float a piece at a time when used (``mapped=True``; by default for a model
whose float32 form is 1 GiB or more).
Shared by the loaders: names.py (the one table of tensor names), permute.py (rotary layouts),
fields.py (typed config values), mapped.py (memory maps), torch_save.py (torch.save zips without
torch), gguf_reader.py (the hardened GGUF header reader); gguf_vocab.py rebuilds a GGUF file's
tokenizer.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, ConfigError, InputError
from ..io import open_regular
from ..model import Transformer
from ..rope_scaling import rope_init

_EXPECTED = ("a Hugging Face folder (config.json + model.safetensors), a Meta folder "
             "(params.json + consolidated.00.pth + tokenizer.model), or a .gguf file")


WEIGHTS = ("float32", "gguf")


def load(path: str | os.PathLike | None = None, *, progress: bool = True, dtype=np.float32,
         weights: str = "float32", mapped: bool | None = None) -> Transformer:
    """Load a checkpoint as a Transformer; ``path=None`` loads (and first fetches) the default model.

    path: a file or folder, or a Hugging Face Hub id (org/name, org/name@revision) when no such
    local path exists, read through huggingface_hub's cache (npllama/hub.py).

    progress: show a progress bar over tensors on stderr. dtype: the compute dtype of the weights.
    weights: "float32" expands every tensor to floats (dtype); "gguf" keeps a GGUF file's blocks in
    memory and dequantizes each matrix a piece at a time when it is used (npllama.quant.matrix):
    memory about the file's size, the same logits as "float32" up to the order of summation.
    mapped: where the weights live, apart from ``weights``. True: every matrix stays in its file
    behind a read-only memory map and becomes dtype a piece at a time when used (the page cache
    holds the file; only vectors and one piece at a time are in the process's memory). False: read
    into memory. None (default): mapped when the model's float32 form is MAPPED_ABOVE (1 GiB) or
    more. The logits are those of the in-memory model up to the order of float32 sums
    (formats/mapped.py). A mapped model's weights are not read at load, so an inf or NaN in the
    file shows at run time (npllama.numerics names where the numbers broke), not here.
    """
    check_weights(weights)
    if mapped not in (None, True, False):
        raise InputError(f"mapped must be None, True or False, got {mapped!r}")
    fmt, where = detect_format(resolve(path))
    if weights == "gguf" and fmt != "gguf":
        raise InputError(f"{where}: weights='gguf' keeps a GGUF file's quantized blocks, but this is a "
                         f"{'Hugging Face' if fmt == 'hf' else 'Meta'} checkpoint; load it with "
                         f"weights='float32' (or point at a .gguf file)")
    bar = _progress_bar if progress else _no_progress
    if fmt == "hf":
        from .hf import load_hf
        args, params, tokenizer = load_hf(where, bar, mapped)
    elif fmt == "meta":
        from .meta import load_meta
        args, params, tokenizer = load_meta(where, bar, mapped)
    else:
        from .gguf import load_gguf
        args, params, tokenizer = load_gguf(where, bar, weights, mapped)
    check_finite(params, where)
    if tokenizer is not None and tokenizer.vocab_size > args.vocab_size:
        raise CheckpointError(f"{where}: the tokenizer has {tokenizer.vocab_size} tokens but the model embeds "
                              f"only {args.vocab_size}; the tokenizer belongs to another model")
    model = Transformer(args, params, tokenizer, dtype=dtype, source=str(where))
    if progress:
        from .mapped import say_if_not_cached
        say_if_not_cached(model, where)
    try:   # an unknown rope type or bad rope parameters: say so now (shapes checked), not at the first call
        rope_init(args, 1)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return model


def require_tokenizer(model) -> Transformer:
    """The model, if it has a tokenizer; else a CheckpointError that says so (commands that read or
    write text call this right after loading, not at the first encode)."""
    if model.tokenizer is None:
        raise CheckpointError(f"{getattr(model, 'source', None) or 'the checkpoint'}: has no tokenizer "
                              f"(tokenizer.json, tokenizer.model, or a vocabulary in the GGUF metadata), so text "
                              f"cannot be turned into tokens; copy the tokenizer files of the model it came from "
                              f"into the folder")
    return model


def check_weights(weights: str) -> None:
    """An InputError unless weights names a scheme the NumPy model computes with (WEIGHTS)."""
    if weights in ("int8", "int4"):
        raise InputError(f"weights={weights!r} is a scheme of the Torch backend's quantized kernels; the NumPy "
                         f"model computes with 'float32' or a GGUF file's own blocks ('gguf'). "
                         f"Use --backend torch --weights {weights} (parity.load(path, weights={weights!r}))")
    if weights not in WEIGHTS:
        raise InputError(f"unknown weights {weights!r}; choose one of {', '.join(WEIGHTS)}")


def check_finite(params, source) -> None:
    """A weight that is inf or NaN is a corrupt file, not a model: say which tensor. Matrices left
    in a mapped file are not read here (that would read the whole file at load)."""
    from ..quant.matrix import QuantizedMatrix
    for name, array in params.items():
        if isinstance(array, QuantizedMatrix) and array.mapped:
            continue
        if not (array.all_finite() if isinstance(array, QuantizedMatrix) else np.isfinite(array).all()):
            raise CheckpointError(f"{source}: tensor {name!r} holds inf or NaN values; the file is corrupt")


def resolve(path: str | os.PathLike | None) -> Path:
    """The local file or folder a model path names: the default model for None, the path itself when
    it exists, else a Hub id's snapshot in huggingface_hub's cache (npllama.hub.resolve_model_path)."""
    if path is None:
        from ..weights import default_model_path
        return default_model_path()
    from ..hub import resolve_model_path
    return resolve_model_path(path)


def detect_format(path: Path) -> tuple[str, Path]:
    """("hf" | "meta" | "gguf", the folder or file to read), or CheckpointError naming what was expected."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder; expected {_EXPECTED}")
    if path.is_file() or not path.is_dir():   # a FIFO or a device is refused here, never opened for reading
        with open_regular(path) as f:
            magic = f.read(4)
        if magic == b"GGUF" or path.suffix == ".gguf":
            return "gguf", path
        raise CheckpointError(f"{path}: a file that is not GGUF; point npllama at the folder that holds "
                              f"the checkpoint instead. Expected {_EXPECTED}")
    if os.path.lexists(path / "config.json"):     # present, whatever it is: reading it says what is wrong
        return "hf", path
    if os.path.lexists(path / "params.json"):
        return "meta", path
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return "gguf", ggufs[0]
    if len(ggufs) > 1:
        raise CheckpointError(f"{path}: holds {len(ggufs)} .gguf files ({', '.join(g.name for g in ggufs[:5])}); "
                              f"name the one to load")
    raise CheckpointError(f"{path}: found no config.json, params.json or .gguf file; expected {_EXPECTED}")


def _progress_bar(iterable, desc: str = "", unit: str = "tensor", total: int | None = None):
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, unit=unit, total=total, file=sys.stderr, leave=False,
                dynamic_ncols=True)


def _no_progress(iterable, desc: str = "", unit: str = "tensor", total: int | None = None):
    return iterable
