"""Meta's own reference, llama-models' llama3/model.py, unmodified, as a port to check against npllama.

    npllama export --model MODEL --layout meta --out meta-weights
    npllama capture --port docs/meta_port.py:build --weights meta-weights --map meta \\
        --ids ref.safetensors --decode 8 --out meta.safetensors

``build(folder)`` loads the weights that ``npllama export --layout meta`` wrote into Meta's
Transformer: the names and the interleaved wq / wk rows are already Meta's, so ``load_state_dict``
is strict and permutes nothing. Meta's layers are fairscale's model-parallel ones; here they run at
model-parallel size 1, in a process group of one process (fairscale needs one to exist).

float64. Meta's code computes in float32 whatever the model's dtype: ``x.float()`` in RMSNorm,
in apply_rotary_emb and before the softmax, and ``.float()`` on the logits; freqs_cis is built in
float32 (complex64). ``to_float64(model)`` rebuilds freqs_cis in float64 and converts the model;
inside ``float64_casts()`` a float64 tensor's ``.float()`` leaves it float64, which lifts the
other casts without editing Meta's file (in a port of your own, edit the casts instead:
docs/my_port.py).

Needs llama-models and fairscale: the test extra (pip install -e '.[torch,test]').
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch


def init_model_parallel() -> None:
    """fairscale's model parallelism at size 1, in a process group of this process alone."""
    import fairscale.nn.model_parallel.initialize as fs_init
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if not fs_init.model_parallel_is_initialized():
        with contextlib.redirect_stdout(None):           # fairscale prints "> initializing ..." lines
            fs_init.initialize_model_parallel(1)


def close_model_parallel() -> None:
    """Undo init_model_parallel: fairscale's groups, then the process group of one. (A command's
    process ends with them; a process that builds the port and goes on to other work calls this.)"""
    import fairscale.nn.model_parallel.initialize as fs_init
    import torch.distributed as dist

    if fs_init.model_parallel_is_initialized():
        fs_init.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def build(folder: str, max_seq_len: int = 256, max_batch_size: int = 1):
    """Meta's Transformer with the weights of an `npllama export --layout meta` folder."""
    from llama_models.llama3.args import ModelArgs
    from llama_models.llama3.model import Transformer
    from safetensors.torch import load_file

    init_model_parallel()
    params = json.loads((Path(folder) / "params.json").read_text())
    model = Transformer(ModelArgs(max_seq_len=max_seq_len, max_batch_size=max_batch_size, **params))
    model.load_state_dict(load_file(Path(folder) / "model.safetensors"), strict=True)
    return model.eval()


def to_float64(model):
    """The model in float64, its rotation table rebuilt in float64 (complex128)."""
    p = model.params
    head_dim = p.dim // p.n_heads
    theta = 1.0 / p.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(model.freqs_cis.shape[0], dtype=torch.float64), theta)
    model = model.to(torch.float64)
    model.freqs_cis = torch.polar(torch.ones_like(angles), angles)        # was complex64, from float32 angles
    return model


@contextlib.contextmanager
def float64_casts():
    """While open, ``x.float()`` of a float64 tensor is x itself: Meta's casts to float32 (RMSNorm,
    apply_rotary_emb, the softmax, the logits) keep a float64 run in float64."""
    real = torch.Tensor.float

    def float_keeping_float64(self, *args, **kwargs):
        return self if self.dtype == torch.float64 else real(self, *args, **kwargs)

    torch.Tensor.float = float_keeping_float64
    try:
        yield
    finally:
        torch.Tensor.float = real
