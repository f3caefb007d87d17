"""Run-time checks of the numbers a model computes: logits a token can be drawn from, or an error
that says where the computation broke.

Weights can all be finite and still overflow float32 (3e38 times anything above 1). Then either
the logits become inf or NaN, or, once the residual stream passes sqrt(float32 max) ~ 1.8e19, the
square inside RMSNorm is inf, the norm divides by it and returns zeros, and every logit is the
same 0. Either way sampling picks some token (often the end of the text), the command prints
nothing and exits 0. :func:`check_finite_logits` refuses both: logits that are not finite, and a
row of logits that are all equal (a trained LM head never gives that). It costs two passes over
each step's logits (vocab_size numbers, against the vocab_size x dim products of the step); only
when it fails is the forward pass run again with a trace that stops at the first intermediate (in
``npllama.model.trace_names(n_layers)`` order, tests/test_structure.py checks it) that is not
finite or too large to square.

The Torch backend has the same functions in parity/numerics.py: its own ``overflowed`` and
``bad_logits`` (they read tensors on the device), the rest these, given its ``overflowed``.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .errors import CheckpointError

SQUARE_LIMIT = float(np.sqrt(np.finfo(np.float32).max))   # RMSNorm squares in (at least) float32


class OverflowFound(Exception):
    """Stops a traced forward pass at the first intermediate that overflowed."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def overflowed(array) -> bool:
    """Whether an activation holds inf or NaN, or a value whose square overflows float32."""
    a = np.asarray(array)
    return a.size > 0 and not (np.isfinite(a).all() and np.abs(a).max() < SQUARE_LIMIT)


def first_overflow(model, ids, overflowed: Callable[[Any], bool] = overflowed) -> str | None:
    """The name of the first intermediate of ``model(ids)`` (no cache) that overflowed, or None.

    ids: (batch, seq) token ids. The forward pass stops there. None also when the model cannot be
    traced this way (a backend whose arrays ``overflowed`` cannot read; the Torch backend passes
    its own).
    """
    def trace(name: str, array) -> None:
        if overflowed(array):
            raise OverflowFound(name)
    try:
        model(ids, trace=trace)
    except OverflowFound as found:
        return found.name
    except Exception:
        return None
    return None


def bad_logits(logits) -> bool:
    """Logits no token should be drawn from: inf or NaN, or a row where every logit is the same."""
    logits = np.asarray(logits)
    if not np.isfinite(logits).all():
        return True
    return logits.shape[-1] > 1 and bool((logits.max(axis=-1) == logits.min(axis=-1)).any())


def non_finite_error(model, ids, step: str,
                     first_overflow: Callable[[Any, Any], str | None] = first_overflow) -> CheckpointError:
    """The error for logits computed from ``step`` ("the prompt", "generated token 3") that overflowed,
    naming the first intermediate that did when ids run again without the cache.

    ids: (seq,) or (batch, seq) token ids, a list or an array of either backend; first_overflow:
    the backend's (the Torch backend passes its own).
    """
    source = getattr(model, "source", None) or "the model"
    if np.ndim(ids) < 2:
        ids = ids[None] if hasattr(ids, "ndim") else np.asarray(ids)[None]
    where = first_overflow(model, ids)
    located = (f"first in {where}" if where is not None else
               "run again without the earlier tokens they do not, so it needs the whole context")
    return CheckpointError(f"{source}: the activations overflow float32 ({located}), so the logits computed from "
                           f"{step} are inf, NaN or all equal and no token can be chosen; the checkpoint is "
                           f"corrupt (weights near 1e38?)")


def check_finite_logits(logits, model, ids, step: str = "the prompt") -> None:
    """Nothing when the logits can be sampled from; else the CheckpointError of non_finite_error.

    logits: (..., vocab) of the forward pass over ``ids`` ((batch, seq) or (seq,) token ids).
    """
    if bad_logits(logits):
        raise non_finite_error(model, ids, step)
