"""parity: the Torch twin of npllama, op for op and name for name, and the report that compares them.

    import parity
    model = parity.load(device="cpu", dtype=torch.bfloat16)   # same checkpoints as npllama.load
    model = parity.from_numpy(npllama_model, device="cuda")    # no second read of the files
    model = parity.load(path, weights="int4")                  # int8 | int4 | gguf: quantized kernels
    model = parity.load(path, tp=3)                            # this rank's third, in a process group (tp.py)
    logits = model(ids)                                         # (batch, seq, vocab) float32 tensor
    cache = model.new_cache(1, max_seq_len=512); model(ids, cache=cache)

A model npllama left in its files (``npllama.load(..., mapped=True)``, the default for a large one)
keeps them there in its twin too: parity.mapped views the same bytes.

Modules mirror npllama's: norm, rope, attention, mlp, cache, model, sampling, generate, numerics; report.py
runs both backends and compares the output of every op (``npllama parity``); hooks.py records any
PyTorch model's activations under npllama's names (``parity.capture(module, name_map)``) and
writes them as a dump that ``npllama parity --against`` checks.
"""

from __future__ import annotations

import sys

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


def from_numpy(model, device=None, dtype=torch.float32, requires_grad: bool = False,
               weights: str = "float32") -> Transformer:
    """The Torch twin of a loaded npllama.Transformer: same config, tokenizer and weights.

    The weights are copied from the NumPy model's arrays (no file is read) onto ``device`` in
    ``dtype``. requires_grad=True makes the parameters trainable. weights: "float32" (the weights
    as floats in dtype), or "int8" / "int4" / "gguf": every projection computed by a quantized
    kernel (parity.quant; "gguf" needs a model loaded with npllama.load(path, weights="gguf")).
    What "gguf" kept and re-quantized is printed on stderr and kept in ``model.quant_notes``.
    """
    from .quant import Quantizer, check_weights
    check_weights(weights)
    dtype, device = resolve_dtype(dtype), resolve_device(device)
    quantize = None if weights == "float32" else Quantizer(weights, dtype, device)
    twin = Transformer(model.config, model.state_dict(), model.tokenizer, dtype=dtype, device=device,
                       source=model.source, requires_grad=requires_grad, quantize=quantize)
    twin.weights = weights
    twin.quant_notes = list(quantize.notes) if quantize else []
    for note in twin.quant_notes:
        print(note, file=sys.stderr)
    return twin


def load(path=None, device=None, dtype=torch.float32, requires_grad: bool = False, weights: str = "float32",
         tp: int | None = None, group=None, **kwargs) -> Transformer:
    """Load a checkpoint that npllama.load reads (HF folder, Meta folder, .gguf; default model when
    None) and return it as a Torch model on ``device`` in ``dtype``. weights: "float32", or a
    quantized scheme, "int8", "int4" (the checkpoint's floats quantized) or "gguf" (a GGUF file's own
    blocks where a kernel holds them exactly), see from_numpy. kwargs go to npllama.load (to
    parity.tp.load with tp or group).

    tp: tensor parallelism. Inside a process group of tp ranks (torchrun, or
    torch.distributed.init_process_group; ``group`` another group than the world), each rank
    loads its own slices of the checkpoint and gets its part of the model (parity.tp)."""
    import npllama
    from .quant import check_weights
    if tp is not None or group is not None:
        from .tp import load as load_parallel
        return load_parallel(path, tp, device=device, dtype=dtype, group=group, requires_grad=requires_grad,
                             weights=weights, **kwargs)
    check_weights(weights)
    dtype, device = resolve_dtype(dtype), resolve_device(device)   # refuse bad ones before the slow load
    base = npllama.load(path, weights="gguf" if weights == "gguf" else "float32", **kwargs)
    return from_numpy(base, device=device, dtype=dtype, requires_grad=requires_grad, weights=weights)


__all__ = ["Transformer", "KVCache", "SamplingSettings", "generate", "generate_text", "load",
           "from_numpy", "resolve_dtype", "resolve_device", "capture", "DTYPES"]
