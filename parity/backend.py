"""The Torch backend as a compute backend of npllama's commands (``--backend torch``).

Declared in the entry-point group ``npllama.backends``; npllama's command line calls
``torch_backend(model, device=..., dtype=..., weights=...)`` with the loaded NumPy model and gets
back its Torch twin with the functions the commands need (npllama.cli.options.Backend); before the
model loads it calls ``torch_backend.check(device=..., dtype=...)``, so that a device this torch
cannot see or an unknown dtype is refused first. With ``--tp N`` the command calls
``torch_backend.tensor_parallel(path, N, ...)`` instead, which loads the split model itself.
"""

from __future__ import annotations

import numpy as np
import torch

from npllama.cli.options import Backend

from . import from_numpy, resolve_device, resolve_dtype
from .generate import generate


def torch_backend(model, device: str | None = None, dtype: str | None = None, weights: str = "float32") -> Backend:
    """The NumPy model as a parity.Transformer on ``device`` in ``dtype``, with ``weights`` "float32"
    or a quantized scheme ("int8", "int4", "gguf": parity.quant). Default dtype: float32, and
    bfloat16 for quantized weights (the only activations torch's int8 / int4 kernels run fast on a
    CPU, and the only ones its CUDA int4 kernel takes)."""
    dtype = dtype or ("float32" if weights == "float32" else "bfloat16")
    return as_backend(from_numpy(model, device=device, dtype=dtype, weights=weights))


def tensor_parallel(path, tp: int, device: str | None = None, dtype: str | None = None, weights: str = "float32",
                    progress: bool = True) -> Backend:
    """``--tp N``: this process's part of the checkpoint at path, split over N processes (parity.tp).

    Under torchrun (or in a process group) it joins the group; from a plain command line it first
    starts the N processes, which run the command again, and exits with their status. Each rank
    reads its own slices of the checkpoint; rank 0 prints."""
    from . import tp as parallel
    dev = resolve_device(device)
    rank = parallel.command_rank(tp, dev, path, "generate", weights)
    model = parallel.load(path, tp, device=dev, dtype=dtype or "float32", progress=progress and rank == 0)
    return as_backend(model)


def as_backend(twin) -> Backend:
    """A parity model with the functions npllama's commands call."""
    @torch.no_grad()
    def loss(ids: np.ndarray, mask: np.ndarray | None = None) -> float:
        ids = torch.from_numpy(np.asarray(ids, dtype=np.int64)).to(twin.device)
        return float(twin.loss(ids, attention_mask=mask))

    return Backend("torch", twin, generate, loss)


def check(device: str | None = None, dtype: str | None = None) -> None:
    """Refuse (InputError) a device this torch cannot use or a dtype it does not compute in."""
    resolve_device(device)
    resolve_dtype(dtype or "float32")


torch_backend.check = check
torch_backend.tensor_parallel = tensor_parallel
