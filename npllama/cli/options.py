"""Options that several commands share, and the compute backends they can run on.

Backends. "numpy" is npllama itself. Other packages add backends through the entry-point group
``npllama.backends``: each entry point is a function ``(model, device=None, dtype=None) ->
Backend`` that takes the loaded NumPy model and returns its twin (the Torch backend declares
"torch"), and may carry ``check(device=None, dtype=None)``, which the commands call before the
model loads so that a device or dtype the backend cannot use is refused first; a backend that
computes with quantized weights also takes ``weights=`` ("int8", "int4", "gguf"). npllama's code
never names them.

Weights (``--weights``). "float32": every tensor expanded to floats. "gguf": a GGUF file's own
blocks, kept quantized (the numpy backend dequantizes them a piece at a time; the torch backend
runs them through its int4 kernel where they fit it). "int8", "int4": the torch backend's
weight-only kernels on the checkpoint's floats.

Where the weights live (``--mapped/--no-mapped``, with --model): left in their files behind a
memory map and made float a piece at a time when used, or read into memory; by default mapped
when the model's float32 form is 1 GiB or more (npllama/formats/mapped.py). It is independent of
--weights.

Every option is checked before the model loads (backend_factory, check_sampling): a typo costs a
second, not a load.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable

import click
import numpy as np

from ..errors import InputError
from ..sampling import SamplingSettings

BACKEND_GROUP = "npllama.backends"


@dataclass(frozen=True)
class Backend:
    """A model ready to run, and the functions the commands call on it.

    model     .config, .tokenizer, .new_cache(batch_size, max_seq_len)
    generate  npllama.generate.generate's signature
    loss      (ids: (batch, seq) int64, mask: (batch, seq) bool or None) -> the mean next-token
              cross-entropy of each row's real tokens, a float
    """
    name: str
    model: Any
    generate: Callable
    loss: Callable[[np.ndarray, np.ndarray | None], float]


def backend_names() -> list[str]:
    return ["numpy", *sorted(ep.name for ep in entry_points(group=BACKEND_GROUP) if ep.name != "numpy")]


WEIGHTS = ("float32", "gguf", "int8", "int4")


def check_backend_weights(backend: str, weights: str) -> None:
    """An InputError, before any slow load, for --weights the backend cannot compute with."""
    if backend == "numpy" and weights in ("int8", "int4"):
        raise InputError(f"--weights {weights} is a scheme of the Torch backend's quantized kernels; the numpy "
                         f"backend computes with float32 or a GGUF file's own blocks (--weights gguf). "
                         f"Add --backend torch")


def load_model(model_path, backend: str = "numpy", weights: str = "float32", **kwargs):
    """The NumPy model a backend with these --weights starts from: the GGUF blocks kept for "gguf",
    floats otherwise, mapped as --mapped/--no-mapped says (kwargs go to npllama.formats.load)."""
    from ..formats import load
    check_backend_weights(backend, weights)
    kwargs.setdefault("mapped", mapped_choice())
    return load(model_path, weights="gguf" if weights == "gguf" else "float32", **kwargs)


MAPPED = "npllama.mapped"   # ctx.meta key: --mapped (True), --no-mapped (False), or neither (None)


def mapped_choice() -> bool | None:
    """What --mapped/--no-mapped said for the running command (None: not given, or no command)."""
    ctx = click.get_current_context(silent=True)
    return None if ctx is None else ctx.meta.get(MAPPED)


def mapped_option(f):
    """--mapped/--no-mapped, kept in the command's context for load_model (mapped_choice)."""
    def remember(ctx, param, value):
        ctx.meta[MAPPED] = value
    return click.option("--mapped/--no-mapped", default=None, expose_value=False, callback=remember,
                        is_eager=True,
                        help="Leave the weights in their files (memory-mapped, made float a piece at a time) "
                             "or read them into memory (default: mapped from 1 GiB of float32 weights up).")(f)


def backend_factory(name: str, device: str | None = None, dtype: str | None = None,
                    weights: str = "float32", tp: int | None = None) -> Callable[..., Backend]:
    """The named backend as a function of the loaded NumPy model, checked before the model loads.

    A wrong --backend, --device, --dtype or --weights, or a backend whose library is missing, is
    refused here, before the slow load. A plug-in's factory may carry ``check(device, dtype)``,
    which raises an NpllamaError for what it cannot run. weights: as the model is loaded for
    (load_model); a backend other than numpy gets it as ``weights=`` when it is not "float32".
    tp: split the model over tp processes (``--tp``): the result is then a function of the
    checkpoint's path, ``(path, progress=True) -> Backend``, the factory's ``tensor_parallel``
    (each process reads its own slices, so the command does not load the model itself).
    """
    check_backend_weights(name, weights)
    if name == "numpy":
        if tp is not None:
            raise InputError("--tp splits the model over processes with torch.distributed: add --backend torch")
        if device not in (None, "cpu"):
            raise InputError(f"the numpy backend runs on the CPU; --device {device} needs --backend torch")
        if dtype not in (None, "float32", "float64"):
            raise InputError(f"--dtype {dtype}: the numpy backend computes in float32 or float64")
        return numpy_backend
    found = {ep.name: ep for ep in entry_points(group=BACKEND_GROUP)}
    if name not in found:
        raise InputError(f"unknown backend {name!r}; installed: {', '.join(backend_names())}")
    try:
        factory = found[name].load()
    except ModuleNotFoundError as e:
        raise InputError(f"backend {name!r} needs {getattr(e, 'name', None) or e}, which is not installed "
                         f"(pip install 'npllama[torch]')") from None
    check = getattr(factory, "check", None)
    if check is not None:
        check(device=device, dtype=dtype)
    if tp is not None:
        parallel = getattr(factory, "tensor_parallel", None)
        if parallel is None:
            raise InputError(f"--tp: the {name} backend does not split a model over processes")
        return lambda path, progress=True: parallel(path, tp, device=device, dtype=dtype, weights=weights,
                                                    progress=progress)
    if weights != "float32":
        return lambda model: factory(model, device=device, dtype=dtype, weights=weights)
    return lambda model: factory(model, device=device, dtype=dtype)


def numpy_backend(model) -> Backend:
    """npllama itself: its generate and its model's loss."""
    from ..generate import generate
    return Backend("numpy", model, generate, lambda ids, mask=None: float(model.loss(ids, attention_mask=mask)))


def check_sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                   seed: int | None) -> SamplingSettings:
    """The sampling options, checked before the model loads: the settings, or an InputError."""
    if max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens}")
    check_seed(seed)
    return SamplingSettings(temperature, top_k, top_p)


def run_checkpoint(path: str | None) -> str | None:
    """--model PATH, where a training run's folder (``npllama train --out``: step-* checkpoints and a
    ``latest`` link, no checkpoint of its own) stands for its newest checkpoint, PATH/latest."""
    if path is None:
        return None
    folder = Path(path)
    try:
        is_run = (folder.is_dir() and (folder / "latest").is_dir()
                  and not any((folder / name).exists() for name in ("config.json", "params.json"))
                  and not any(folder.glob("*.gguf")))
    except OSError:
        return path
    return str(folder / "latest") if is_run else path


def model_option(f):
    f = mapped_option(f)
    return click.option("--model", "-m", "model_path", default=None, metavar="PATH",
                        callback=lambda ctx, param, value: run_checkpoint(value),
                        help="A Hugging Face folder, a Meta folder, a .gguf file, or a Hugging Face Hub id "
                             "org/name[@revision]; a training run's folder means its newest checkpoint, "
                             "FOLDER/latest (default: SmolLM2-135M-Instruct in weights/).")(f)


def backend_options(f):
    f = click.option("--weights", type=click.Choice(WEIGHTS), default="float32", show_default=True,
                     help="float32: floats; gguf: a GGUF file's own quantized blocks (numpy or torch); "
                          "int8, int4: the torch backend's weight-only kernels (docs/quantization.md).")(f)
    f = click.option("--device", default=None, help="Device for a non-NumPy backend: cpu, cuda, cuda:1 ... (default: cpu).")(f)
    f = click.option("--backend", type=click.Choice(backend_names()), default="numpy", show_default=True,
                     help="numpy: the reference; torch: the Torch twin (needs torch).")(f)
    return f


def check_seed(seed: int | None) -> None:
    """--seed: an integer >= 0, checked before the slow load (the rule is npllama.sampling.uniforms's)."""
    from ..sampling import uniforms
    try:
        uniforms(seed, 0)
    except InputError as e:
        raise InputError(f"--seed: {e}") from None


def check_text(value: str | None, option: str) -> None:
    """Text given on the command line must be Unicode: bytes that are not UTF-8 reach Python as lone
    surrogates, which no tokenizer can encode."""
    if value is None:
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{option} holds bytes that are not UTF-8 text ({value[e.start:e.end]!r} at character "
                         f"{e.start}); give the text in UTF-8") from None


def check_positive(value: int | None, option: str, minimum: int = 1) -> None:
    """An integer option that must be at least ``minimum`` (None: not given)."""
    if value is not None and value < minimum:
        raise InputError(f"{option} must be at least {minimum}, got {value}")


def sampling_options(f):
    f = click.option("--seed", type=int, default=None, help="Seed for the sampler's random numbers (repeatable runs).")(f)
    f = click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling mass, in (0, 1].")(f)
    f = click.option("--top-k", type=int, default=0, show_default=True, help="Keep only the k most likely tokens (0: off).")(f)
    f = click.option("--temperature", "-t", type=float, default=0.0, show_default=True,
                     help="Softmax temperature; 0 is greedy decoding.")(f)
    f = click.option("--max-new-tokens", "-n", type=int, default=128, show_default=True,
                     help="Stop after this many new tokens.")(f)
    return f
