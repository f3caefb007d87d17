"""Run-time checks of the numbers a model computes, in Torch: the twin of npllama.numerics.

Same rule, same names: logits that are inf, NaN or all equal in a row mean the activations
overflowed (see npllama/numerics.py); the error names the first intermediate that did, found by
running the ids again with a trace. ``bad_logits`` stays on the device (one boolean), so a decode
loop can fold it into a sync it already makes.
"""

from __future__ import annotations

import torch

from npllama.errors import CheckpointError
from npllama.numerics import SQUARE_LIMIT


class _Found(Exception):
    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def overflowed(x: torch.Tensor) -> bool:
    """Whether an activation holds inf or NaN, or a value whose square overflows float32."""
    return x.numel() > 0 and not bool((torch.isfinite(x).all() & (x.abs().amax() < SQUARE_LIMIT)).item())


def first_overflow(model, ids) -> str | None:
    """The name of the first intermediate of ``model(ids)`` (no cache) that overflowed, or None."""
    def trace(name: str, x: torch.Tensor) -> None:
        if overflowed(x.detach().float()):
            raise _Found(name)
    try:
        with torch.no_grad():
            model(ids, trace=trace)
    except _Found as found:
        return found.name
    except Exception:
        return None
    return None


def bad_logits(logits: torch.Tensor) -> torch.Tensor:
    """A device boolean: logits no token should be drawn from (inf or NaN, or a row all equal)."""
    bad = ~torch.isfinite(logits).all()
    if logits.shape[-1] > 1:
        bad = bad | (logits.amax(-1) == logits.amin(-1)).any()
    return bad


def non_finite_error(model, ids, step: str) -> CheckpointError:
    """The error for logits computed from ``step`` that overflowed, naming where (npllama.numerics's twin)."""
    source = getattr(model, "source", None) or "the model"
    ids = torch.as_tensor(ids)
    where = first_overflow(model, ids.reshape(1, -1) if ids.ndim < 2 else ids)
    located = (f"first in {where}" if where is not None else
               "run again without the earlier tokens they do not, so it needs the whole context")
    return CheckpointError(f"{source}: the activations overflow float32 ({located}), so the logits computed from "
                           f"{step} are inf, NaN or all equal and no token can be chosen; the checkpoint is "
                           f"corrupt (weights near 1e38?)")


def check_finite_logits(logits: torch.Tensor, model, ids, step: str = "the prompt") -> None:
    """Nothing when the logits can be sampled from; else the CheckpointError of non_finite_error."""
    if bool(bad_logits(logits)):
        raise non_finite_error(model, ids, step)
