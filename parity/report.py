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
with the same weights, dtype and device; ``--plot FILE.png`` draws the error of each op by layer.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from npllama.errors import InputError, NpllamaError
from npllama.formats.names import rename
from npllama.io import atomic_write
from npllama.model import Context, trace_names
from npllama.tolerances import dtype_name, parity_rtol

DEFAULT_PROMPT = "The capital of France is"


# ---------------------------------------------------------------------------- rows and reports
@dataclass(frozen=True)
class Row:
    """One op of one layer: its errors against the reference, and its tolerance."""
    name: str            # the trace name, e.g. "layers.3.ffn_norm"
    layer: int | None    # 3, or None for tok_embeddings / norm / logits
    op: str              # "ffn_norm"
    max_abs: float       # max |candidate - reference|
    rel: float           # max_abs / max |reference|
    rtol: float

    @property
    def ok(self) -> bool:
        return self.rel <= self.rtol      # False for nan


@dataclass
class Report:
    title: str
    rows: list[Row]
    dtype: str
    device: str
    notes: list[str] = field(default_factory=list)

    @property
    def first_break(self) -> Row | None:
        """The first op, in forward order, over its tolerance (None when all are within)."""
        return next((r for r in self.rows if not r.ok), None)

    @property
    def ok(self) -> bool:
        return self.first_break is None


def split_name(name: str) -> tuple[int | None, str]:
    """'layers.3.attention.q' -> (3, 'attention.q'); 'logits' -> (None, 'logits')."""
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit():
        return int(parts[1]), parts[2]
    return None, name


def errors(candidate: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(max |a - b|, max |a - b| / max |b|), in float64; shapes must agree."""
    if candidate.shape != reference.shape:
        raise InputError(f"shapes differ: {candidate.shape} vs reference {reference.shape}")
    diff = float(np.max(np.abs(candidate.astype(np.float64) - reference.astype(np.float64)), initial=0.0))
    scale = float(np.max(np.abs(reference), initial=0.0))
    if math.isnan(diff):
        return diff, diff
    rel = diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)
    return diff, rel


def compare(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray],
            rtol: Callable[[str], float], require_all: bool = True) -> list[Row]:
    """Rows for every op of the reference trace (in its order) that the candidate also traced.

    require_all: a name missing from the candidate is an error (the backends must trace alike).
    """
    missing = [n for n in reference if n not in candidate]
    if require_all and missing:
        raise InputError(f"the candidate did not trace {missing[:5]}: the backends' trace names differ")
    rows = []
    for name, ref in in_forward_order(reference).items():
        if name not in candidate:
            continue
        max_abs, rel = errors(candidate[name], ref)
        layer, op = split_name(name)
        rows.append(Row(name, layer, op, max_abs, rel, rtol(name)))
    return rows


def in_forward_order(traced: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The traced tensors in the order the forward pass computes them (npllama.model.trace_names),
    whatever order the hook saw them in; names outside that list keep their place at the end."""
    layers = [split_name(n)[0] for n in traced]
    order = trace_names(1 + max((i for i in layers if i is not None), default=-1))
    rank = {name: i for i, name in enumerate(order)}
    return dict(sorted(traced.items(), key=lambda item: rank.get(item[0], len(rank))))


# ---------------------------------------------------------------------------- capturing
def capture(model, ids, **kwargs) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Run model(ids, trace=...) and keep every traced output as float64 NumPy.

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
    """npllama in float64 holding exactly the weights of a parity model (read back from its dtype)."""
    from npllama.model import Transformer as NumpyTransformer
    params = {k: v.detach().to("cpu", torch.float64).numpy() for k, v in model.state_dict().items()}
    return NumpyTransformer(model.config, params, model.tokenizer, dtype=np.float64)


def capture_isolated(model, ids, reference: dict[str, np.ndarray], attention: str = "auto"
                     ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Like capture, but every layer (and the final norm, and the LM head) starts from the
    reference's input to it, rounded to the model's dtype, instead of the model's own.

    Errors then do not carry from layer to layer: each op's error is what its own layer adds.
    The steps are those of parity.model.Transformer.forward, with the residual stream replaced.
    """
    from .model import transformer_block
    from .mlp import linear
    from .norm import rms_norm
    from .rope import rope_cos_sin, rope_init

    outputs: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}

    def trace(name: str, x: torch.Tensor) -> None:
        dtypes[name] = dtype_name(x.dtype)
        outputs[name] = x.detach().to("cpu", torch.float64).numpy()

    def given(name: str) -> torch.Tensor:        # the reference's tensor, in the model's dtype
        return torch.from_numpy(reference[name]).to(device=model.device, dtype=model.dtype)

    args, ids = model.config, model.check_ids(ids)
    seq = ids.shape[1]
    with torch.no_grad():
        inv_freq, scaling = rope_init(args, seq, device=model.device)
        cos, sin = rope_cos_sin(inv_freq, torch.arange(seq, device=model.device), scaling, model.dtype)
        ctx = Context(args, cos, sin, None, attention, trace)
        trace("tok_embeddings", torch.nn.functional.embedding(ids, model.tok_embeddings.weight))
        h = "tok_embeddings"
        for layer in model.layers:
            transformer_block(given(h), layer, ctx)
            h = f"layers.{layer.index}.ffn_residual"
        trace("norm", rms_norm(given(h), model.norm.weight, model.norm.eps))
        trace("logits", linear(given("norm"), model.output_weight).float())
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
    """Run transformers' model with hooks that record the same ops under npllama's names.

    q and k after rotary come from wrapping modeling_llama.apply_rotary_pos_emb for the call.
    """
    from transformers.models.llama import modeling_llama

    cfg = hf.config
    out: dict[str, np.ndarray] = {}
    hooks = []
    current = {"layer": None}

    def put(name, x):
        out[name] = x.detach().to("cpu", torch.float64).numpy()

    def heads(x, n):     # (batch, seq, n * head_dim) -> (batch, n, seq, head_dim)
        b, s, _ = x.shape
        return x.view(b, s, n, -1).transpose(1, 2)

    def on_output(name, fn=lambda o: o):
        return lambda mod, inp, o: put(name, fn(o[0] if isinstance(o, tuple) else o))

    def on_input(name, fn=lambda i: i):
        return lambda mod, inp: put(name, fn(inp[0]))

    m = hf.model
    hooks.append(m.embed_tokens.register_forward_hook(on_output("tok_embeddings")))
    for i, layer in enumerate(m.layers):
        p = f"layers.{i}."
        hooks.append(layer.register_forward_pre_hook(lambda mod, inp, i=i: current.__setitem__("layer", i)))
        hooks.append(layer.input_layernorm.register_forward_hook(on_output(p + "attention_norm")))
        hooks.append(layer.self_attn.v_proj.register_forward_hook(
            on_output(p + "attention.v", lambda o: heads(o, cfg.num_key_value_heads))))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(
            on_input(p + "attention.scores_v", lambda x: heads(x, cfg.num_attention_heads))))
        hooks.append(layer.self_attn.o_proj.register_forward_hook(on_output(p + "attention")))
        hooks.append(layer.post_attention_layernorm.register_forward_pre_hook(on_input(p + "attention_residual")))
        hooks.append(layer.post_attention_layernorm.register_forward_hook(on_output(p + "ffn_norm")))
        hooks.append(layer.mlp.register_forward_hook(on_output(p + "feed_forward")))
        hooks.append(layer.register_forward_hook(on_output(p + "ffn_residual")))
    hooks.append(m.norm.register_forward_hook(on_output("norm")))
    hooks.append(hf.lm_head.register_forward_hook(on_output("logits", lambda o: o.float())))

    real_rope = modeling_llama.apply_rotary_pos_emb

    def traced_rope(q, k, *args, **kwargs):
        q, k = real_rope(q, k, *args, **kwargs)
        put(f"layers.{current['layer']}.attention.q", q)
        put(f"layers.{current['layer']}.attention.k", k)
        return q, k

    modeling_llama.apply_rotary_pos_emb = traced_rope
    try:
        with torch.no_grad():
            hf(input_ids=ids.to(hf.device), use_cache=False)
    finally:
        modeling_llama.apply_rotary_pos_emb = real_rope
        for h in hooks:
            h.remove()
    return out


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


# ---------------------------------------------------------------------------- output
def format_table(report: Report) -> str:
    """The report as a fixed-width table, with the verdict on its last line."""
    lines = [report.title, f"{'layer':>5}  {'op':<20} {'max abs':>10} {'rel':>10} {'rtol':>8}  ok"]
    for r in report.rows:
        layer = "-" if r.layer is None else str(r.layer)
        lines.append(f"{layer:>5}  {r.op:<20} {r.max_abs:10.3e} {r.rel:10.3e} {r.rtol:8.1e}  "
                     f"{'ok' if r.ok else 'BREAK'}")
    lines.extend(f"note: {n}" for n in report.notes)
    lines.append(verdict(report))
    return "\n".join(lines)


def verdict(report: Report) -> str:
    b = report.first_break
    if b is None:
        worst = max(report.rows, key=lambda r: r.rel / r.rtol, default=None)
        tail = f"; closest: {worst.name} at {worst.rel:.2e} of {worst.rtol:.0e}" if worst else ""
        return f"all {len(report.rows)} ops within tolerance{tail}"
    where = f"layer {b.layer} op {b.op}" if b.layer is not None else f"op {b.op}"
    n = sum(not r.ok for r in report.rows)
    return f"first break: {where} (rel {b.rel:.2e} > rtol {b.rtol:.0e}); {n} of {len(report.rows)} ops over"


def plot_errors(reports: list[Report], path: str) -> None:
    """A PNG of the relative error of each op by layer (one panel per report), with the tolerance.

    Written atomically (npllama.io.atomic_write), so no half-written file remains.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(len(reports), 1, figsize=(10, 4.2 * len(reports)), squeeze=False)
    for ax, report in zip(axes[:, 0], reports):
        ops = list(dict.fromkeys(r.op for r in report.rows if r.layer is not None))
        for op in ops:
            pts = [(r.layer, max(r.rel, 1e-18)) for r in report.rows if r.op == op and r.layer is not None]
            ax.plot(*zip(*pts), marker=".", label=op)
        for r in report.rows:
            if r.layer is None and r.op != "tok_embeddings":
                last = max((x.layer for x in report.rows if x.layer is not None), default=0)
                ax.scatter([last + 0.5], [max(r.rel, 1e-18)], marker="*", s=80, label=r.op)
        for rtol in sorted({r.rtol for r in report.rows}):
            ax.axhline(rtol, color="red", linestyle="--", linewidth=1)
        b = report.first_break
        if b is not None and b.layer is not None:
            ax.axvline(b.layer, color="red", alpha=0.3, linewidth=6)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_yscale("log")
        ax.set_xlabel("layer")
        ax.set_ylabel("max|a-b| / max|b|")
        ax.set_title(report.title, fontsize=9)
        ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    with atomic_write(path) as f:
        f.write(buf.getvalue())
