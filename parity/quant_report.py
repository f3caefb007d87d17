"""The parity report for quantized weights: two tables, the kernel's error and quantization's cost.

    npllama parity --weights int8 | int4 | gguf [--dtype bfloat16] [--model PATH]

1. The kernels. The quantized Torch model against npllama in float64 evaluating *exactly* the
   weights the kernels multiply by (each Int8Weight / Int4Weight's ``dequantized()``: the spec's
   dequantize_int8 / dequantize_int4 of the codes and scales the kernel holds). Both sides use the
   same numbers, so what the table shows is the kernels' arithmetic (and the rest of the Torch
   backend's), held to the dtype's parity tolerance like any Torch run (npllama.tolerances,
   QUANT_KERNEL_PARITY_RTOL): a wrong scale, a misread nibble or a mis-packed row is named by
   layer and op, as in the float report.
2. What quantization costs. The same quantized run against npllama in float64 on the float
   checkpoint (a GGUF file's own dequantized values, or the float weights int8 / int4 were made
   from): per layer, the relative error of each sub-layer's output and of the residual stream, and
   of the logits, with how often the most likely next token is the same. No tolerance: this is
   the price of the format, not a bug.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from npllama.errors import InputError
from npllama.model import Transformer as NumpyTransformer
from npllama.tolerances import QUANT_KERNEL_PARITY_RTOL, dtype_name

from .quant import is_quantized
from .report import Report, Row, capture, compare, parity_report

COST_OPS = ("attention", "feed_forward", "ffn_residual")     # per layer, in the cost table


def _numpy(t) -> np.ndarray:
    """A weight's float64 values: a quantized module's dequantized(), a tensor read back exactly."""
    if is_quantized(t):
        return t.dequantized().astype(np.float64)
    return t.detach().to("cpu", torch.float64).numpy()


def kernel_reference(model) -> NumpyTransformer:
    """npllama in float64 holding exactly the weights a quantized parity model computes with.

    Projections: each kernel's dequantized weights; embedding, norms, biases: the model's tensors.
    The config is untied: the LM head's values are its kernel's, the lookup's the float table's.
    """
    args = model.config.replace(tie_word_embeddings=False)
    params: dict[str, np.ndarray] = {"tok_embeddings.weight": _numpy(model.tok_embeddings.weight),
                                    "norm.weight": _numpy(model.norm.weight),
                                    "output.weight": _numpy(model.output_weight)}
    for layer in model.layers:
        p, a, f = f"layers.{layer.index}.", layer.attention, layer.feed_forward
        for name, module in (("attention_norm", layer.attention_norm), ("ffn_norm", layer.ffn_norm),
                             ("attention.wq", a.wq), ("attention.wk", a.wk), ("attention.wv", a.wv),
                             ("attention.wo", a.wo), ("feed_forward.w1", f.w1), ("feed_forward.w2", f.w2),
                             ("feed_forward.w3", f.w3)):
            params[f"{p}{name}.weight"] = _numpy(module.weight)
            if getattr(module, "bias", None) is not None:
                params[f"{p}{name}.bias"] = _numpy(module.bias)
    return NumpyTransformer(args, params, model.tokenizer, dtype=np.float64)


def kernel_report(model, ids, attention: str = "auto", isolate: bool = False) -> Report:
    """Table 1: the quantized model against npllama on the kernels' own weights (see the module docstring)."""
    dt = dtype_name(model.dtype)
    report = parity_report(model, ids, attention, kernel_reference(model), isolate=isolate,
                           title=f"quantized kernels ({model.weights} weights, {dt} on {model.device}, "
                                 f"{'each layer from the reference input' if isolate else 'end to end'}) "
                                 f"vs npllama float64 on the kernels' dequantized weights")
    rtol = QUANT_KERNEL_PARITY_RTOL[dt][0 if isolate else 1]
    report.rows = [Row(r.name, r.layer, r.op, r.max_abs, r.rel, max(r.rtol, rtol)) for r in report.rows]
    return report


def cost_report(model, ids, float_reference: NumpyTransformer, attention: str = "auto") -> Report:
    """Table 2: the quantized model against npllama float64 on the float checkpoint, per layer.

    float_reference: the float checkpoint as an npllama model (npllama.load(path, dtype=float64)).
    Rows: each layer's attention and feed_forward outputs and residual stream (COST_OPS), then the
    logits; rtol is inf (no verdict). A note gives the top-1 agreement of the logits.
    """
    ids = float_reference.check_ids(ids)
    ref, _ = capture(float_reference, ids, attention="naive")
    cand, _ = capture(model, ids, attention=attention)
    rows = [r for r in compare(ref, cand, lambda name: math.inf) if r.op in COST_OPS or r.name == "logits"]
    same = float(np.mean(ref["logits"].argmax(-1) == cand["logits"].argmax(-1)))
    report = Report(f"what quantization costs ({model.weights} weights, {dtype_name(model.dtype)}) vs npllama "
                    f"float64 on the float checkpoint", rows, dtype_name(model.dtype), str(model.device))
    report.notes.append(f"the most likely next token agrees at {same:.0%} of {ids.shape[1]} positions")
    return report


def format_cost_table(report: Report) -> str:
    """The cost report as a table: layer, op, max abs and relative error (no tolerance column)."""
    lines = [report.title, f"{'layer':>5}  {'op':<20} {'max abs':>10} {'rel':>10}"]
    for r in report.rows:
        layer = "-" if r.layer is None else str(r.layer)
        lines.append(f"{layer:>5}  {r.op:<20} {r.max_abs:10.3e} {r.rel:10.3e}")
    lines.extend(f"note: {n}" for n in report.notes)
    return "\n".join(lines)


def quant_parity(model_path, device: torch.device, dtype: torch.dtype, weights: str, prompt: str | None,
                 ids: list[int] | None, attention: str = "auto", isolate: bool = False) -> tuple[str, bool]:
    """``npllama parity --weights ...``: both tables for a checkpoint -> (the text, whether the kernels pass)."""
    import npllama

    from . import from_numpy
    from .report import format_table

    base = npllama.load(model_path, progress=False, weights="gguf" if weights == "gguf" else "float32")
    if ids is None:
        if base.tokenizer is None:
            raise InputError("this checkpoint has no tokenizer: pass --ids")
        ids = base.tokenizer.encode(prompt)
    model = from_numpy(base, device=device, dtype=dtype, weights=weights)
    del base
    kernels = kernel_report(model, ids, attention, isolate)
    float_reference = npllama.load(model_path, progress=False, dtype=np.float64)
    cost = cost_report(model, ids, float_reference, attention)
    text = "\n\n".join([f"{len(ids)} tokens", format_table(kernels), format_cost_table(cost)])
    return text, kernels.ok
