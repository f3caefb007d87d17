"""parity: the Torch twin of npllama, op for op and name for name, and the report that compares them.

    import parity
    model = parity.load(device="cpu", dtype=torch.bfloat16)   # same checkpoints as npllama.load
    model = parity.from_numpy(npllama_model, device="cuda")    # no second read of the files
    logits = model(ids)                                         # (batch, seq, vocab) float32 tensor
    cache = model.new_cache(1, max_seq_len=512); model(ids, cache=cache)

Modules mirror npllama's: norm, rope, attention, mlp, cache, model, sampling, generate; report.py
runs both backends and compares the output of every op (``npllama parity``); hooks.py records any
PyTorch model's activations under npllama's names (``parity.capture(module, name_map)``) and
writes them as a dump that ``npllama parity --against`` checks.
"""

from __future__ import annotations

import torch

from .cache import KVCache
from .generate import generate, generate_text
from .hooks import capture
from .model import Transformer
from .sampling import SamplingSettings

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
          "float16": torch.float16}


def resolve_dtype(dtype) -> torch.dtype:
    """A torch dtype from a torch dtype or its name ("bfloat16", "float32", ...)."""
    from npllama.errors import InputError
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
        dtype = str(dtype)
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise InputError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(device) -> torch.device:
    """A torch device from a device or its name; an InputError when it is not there."""
    from npllama.errors import InputError
    try:
        dev = torch.device(device if device is not None else "cpu")
    except (RuntimeError, TypeError) as e:
        raise InputError(f"unknown device {device!r} ({e}); try 'cpu' or 'cuda'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {device!r} asked for, but this torch ({torch.__version__}) sees no CUDA GPU")
    return dev


def from_numpy(model, device=None, dtype=torch.float32, requires_grad: bool = False) -> Transformer:
    """The Torch twin of a loaded npllama.Transformer: same config, tokenizer and weights.

    The weights are copied from the NumPy model's arrays (no file is read) onto ``device`` in
    ``dtype``. requires_grad=True makes the parameters trainable.
    """
    return Transformer(model.config, model.state_dict(), model.tokenizer, dtype=resolve_dtype(dtype),
                       device=resolve_device(device), source=model.source, requires_grad=requires_grad)


def load(path=None, device=None, dtype=torch.float32, requires_grad: bool = False, **kwargs) -> Transformer:
    """Load a checkpoint that npllama.load reads (HF folder, Meta folder, .gguf; default model when
    None) and return it as a Torch model on ``device`` in ``dtype``. kwargs go to npllama.load."""
    import npllama
    dtype, device = resolve_dtype(dtype), resolve_device(device)   # refuse bad ones before the slow load
    return from_numpy(npllama.load(path, **kwargs), device=device, dtype=dtype, requires_grad=requires_grad)


__all__ = ["Transformer", "KVCache", "SamplingSettings", "generate", "generate_text", "load",
           "from_numpy", "resolve_dtype", "resolve_device", "capture", "DTYPES"]
