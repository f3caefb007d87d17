"""The parity report: run one prompt through npllama and the Torch backend, compare every op.

    npllama parity --model PATH [--device cuda] [--dtype bfloat16] [--prompt TEXT]

Both models are called with a ``trace(name, tensor)`` hook that sees every named intermediate
under the same names (npllama.model.trace_names lists them in forward order): ``tok_embeddings``;
per layer ``attention_norm``, ``attention.q``/``.k`` (after rotary), ``attention.v``,
``attention.scores_v`` (softmax(qk) v, before wo), ``attention``, ``attention_residual``,
``ffn_norm``, ``feed_forward``, ``ffn_residual``; then ``norm`` and ``logits``.

The reference is npllama in float64 evaluating the Torch model's own weights (rounded to the
Torch dtype, read back exactly), so the errors are the Torch backend's arithmetic, not the
quantisation of the checkpoint. For each op the table gives the max absolute error, the
norm-relative error max|a - b| / max|b|, and whether it is within the dtype's tolerance
(npllama.tolerances.PARITY_RTOL, "model" column; docs/parity.md explains them). The first op over
the tolerance, in forward order, is named: that is where to look for a bug. The command exits 1
when any op is over, so it can gate CI.

``--transformers`` adds the same table for transformers' LlamaForCausalLM (eager attention) run
with the same weights, dtype and device, captured by parity.hooks with its ready-made name map;
``--plot FILE.png`` draws the error of each op by layer.

The rows, the verdict, the table and the plot are NumPy and live in npllama/report.py (re-exported
here), so that a dump of anyone's activations can be checked without torch (npllama/oracle.py).
"""

from __future__ import annotations

import numpy as np
import torch

from npllama.errors import InputError, NpllamaError
from npllama.formats.names import rename
from npllama.model import stream_names
from npllama.oracle import DEFAULT_PROMPT
from npllama.report import (Report, Row, compare, errors, format_compact, format_table, in_forward_order,  # noqa: F401
                            plot_errors, split_name, verdict)
from npllama.tolerances import dtype_name, parity_rtol


# ---------------------------------------------------------------------------- capturing
def capture(model, ids, **kwargs) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Run model(ids, trace=...) and keep every traced output as float64 NumPy. (For a model
    without npllama's trace hook, parity.capture records the same names by forward hooks.)

    Works for npllama and parity models alike. -> (name -> array in forward order, name -> the
    dtype it had).
    """
    outputs: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}

    def trace(name: str, x) -> None:
        if name in outputs:
            raise InputError(f"op {name!r} traced twice in one call")
        dtypes[name] = dtype_name(x.dtype)
        outputs[name] = (x.detach().to("cpu", torch.float64).numpy() if isinstance(x, torch.Tensor)
                         else np.asarray(x, dtype=np.float64))

    with torch.no_grad():
        model(ids, trace=trace, **kwargs)
    return in_forward_order(outputs), dtypes


def reference_of(model):
    """npllama in float64 holding exactly the weights of a parity model (read back from its dtype);
    weights the twin left in their files (parity.mapped) are npllama's own mapped matrices, made
    float64 a piece at a time: the stored values, which the twin's dtype holds exactly when it is
    at least as wide as the file's (bfloat16 in float32 or bfloat16)."""
    from npllama.model import Transformer as NumpyTransformer
    from .mapped import mapped_params
    params = {k: v.detach().to("cpu", torch.float64).numpy() for k, v in model.state_dict().items()}
    params.update(mapped_params(model))
    return NumpyTransformer(model.config, params, model.tokenizer, dtype=np.float64)


def capture_isolated(model, ids, reference: dict[str, np.ndarray], attention: str = "auto"
                     ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Like capture, but every layer (and the final norm, and the LM head) starts from the
    reference's input to it, rounded to the model's dtype, instead of the model's own.

    Errors then do not carry from layer to layer: each op's error is what its own layer adds.
    It is the model's own forward pass (``given``: the residual stream replaced).
    """
    outputs: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}

    def trace(name: str, x: torch.Tensor) -> None:
        dtypes[name] = dtype_name(x.dtype)
        outputs[name] = x.detach().to("cpu", torch.float64).numpy()

    given = {name: torch.from_numpy(reference[name]).to(device=model.device, dtype=model.dtype)
             for name in stream_names(model.config.n_layers)}
    with torch.no_grad():
        model(ids, attention=attention, trace=trace, given=given)
    return in_forward_order(outputs), dtypes


def parity_report(model, ids, attention: str = "auto", reference=None, isolate: bool = False,
                  title: str | None = None) -> Report:
    """Compare every op of the parity model on ids against npllama (float64 by default).

    model: a parity.model.Transformer; ids: (batch, seq) token ids; reference: an npllama model
    to compare against (default: reference_of(model)). isolate: run each layer from the
    reference's input (capture_isolated) and hold it to the "layer" tolerance; otherwise the
    model runs end to end and is held to the "model" tolerance.
    """
    reference = reference if reference is not None else reference_of(model)
    ids = reference.check_ids(ids)
    ref, _ = capture(reference, ids, attention="naive")
    if isolate:
        cand, dtypes = capture_isolated(model, ids, ref, attention)
    else:
        cand, dtypes = capture(model, ids, attention=attention)
    dt, kind = dtype_name(model.dtype), ("layer" if isolate else "model")
    rows = compare(ref, cand, lambda name: parity_rtol(dt, kind, dtypes.get(name)))
    title = title or (f"parity ({attention} attention, {dt} on {model.device}"
                      f"{', each layer from the reference input' if isolate else ', end to end'}) "
                      f"vs npllama {dtype_name(reference.dtype)}")
    return Report(title, rows, dt, str(model.device))


# ---------------------------------------------------------------------------- transformers
class NotComparable(NpllamaError):
    """transformers' LlamaForCausalLM cannot express this config."""


def transformers_twin(model):
    """transformers' LlamaForCausalLM with the parity model's config, weights, dtype and device."""
    try:
        import transformers
    except ImportError as e:
        raise NotComparable(f"transformers is not installed ({e})") from None
    args = model.config
    from .mapped import has_mapped
    if has_mapped(model):
        raise NotComparable("the weights are left in their files (mapped); run transformers on the folder itself")
    if args.partial_rotary_factor != 1.0:
        raise NotComparable("LlamaForCausalLM rotates whole heads; this model has partial rotary")
    if args.attention_bias != args.attention_out_bias:
        raise NotComparable("LlamaForCausalLM puts one bias flag on q, k, v and o; this model differs")
    rope = {"rope_theta": args.rope_theta, **args.rope_scaling}
    config = transformers.LlamaConfig(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.hidden_dim,
        num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
        num_key_value_heads=args.n_kv_heads, head_dim=args.head_dim, rms_norm_eps=args.norm_eps,
        max_position_embeddings=args.max_seq_len, tie_word_embeddings=args.tie_word_embeddings,
        attention_bias=args.attention_bias, mlp_bias=args.mlp_bias, rope_parameters=rope)
    config._attn_implementation = "eager"
    hf = transformers.LlamaForCausalLM(config).to(dtype=model.dtype, device=model.device).eval()
    state = {rename(k, "meta", "hf"): v for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    left = set(missing) - ({"lm_head.weight"} if args.tie_word_embeddings else set())
    if left or unexpected:
        raise NotComparable(f"weights do not map onto LlamaForCausalLM: missing {sorted(left)[:3]}, "
                            f"unexpected {sorted(unexpected)[:3]}")
    if args.tie_word_embeddings:
        hf.tie_weights()
    return hf


def capture_transformers(hf, ids: torch.Tensor) -> dict[str, np.ndarray]:
    """Run transformers' model under parity.hooks.capture with the ready-made map of its names.

    q and k after rotary come from wrapping modeling_llama.apply_rotary_pos_emb for the call.
    """
    from . import hooks

    with hooks.capture(hf, hooks.transformers_llama(hf.config)) as captured, torch.no_grad():
        hf(input_ids=ids.to(hf.device), use_cache=False)
    return captured.numpy()


def transformers_report(model, ids, reference=None) -> Report:
    """The same table for transformers' LlamaForCausalLM with the parity model's weights and dtype."""
    reference = reference if reference is not None else reference_of(model)
    ids = reference.check_ids(ids)
    hf = transformers_twin(model)
    ref, _ = capture(reference, ids, attention="naive")
    cand = capture_transformers(hf, torch.from_numpy(ids))
    dt = dtype_name(model.dtype)
    rows = compare(ref, cand, lambda name: parity_rtol(dt, "model", "float32" if name == "logits" else dt),
                   require_all=False)
    report = Report(f"transformers {getattr(__import__('transformers'), '__version__', '')} LlamaForCausalLM "
                    f"(eager, {dt} on {model.device}, end to end) vs npllama {dtype_name(reference.dtype)}",
                    rows, dt, str(model.device))
    skipped = [n for n in ref if n not in cand]
    if skipped:
        report.notes.append(f"not captured from transformers: {', '.join(skipped[:6])}"
                            f"{' ...' if len(skipped) > 6 else ''}")
    return report
