"""Run-time checks of the numbers a model computes, in Torch: the twin of npllama.numerics.

Same rule, same names: logits that are inf, NaN or all equal in a row mean the activations
overflowed (see npllama/numerics.py); the error names the first intermediate that did, found by
running the ids again with a trace. ``overflowed`` and ``bad_logits`` read tensors where they are;
``bad_logits`` stays on the device (one boolean), so a decode loop can fold it into a sync it
already makes. The search and the error are npllama's, given this module's ``overflowed``.
"""

from __future__ import annotations

import torch

from npllama import numerics
from npllama.errors import CheckpointError
from npllama.numerics import SQUARE_LIMIT


def overflowed(x: torch.Tensor) -> bool:
    """Whether an activation holds inf or NaN, or a value whose square overflows float32."""
    x = x.detach().float()
    return x.numel() > 0 and not bool((torch.isfinite(x).all() & (x.abs().amax() < SQUARE_LIMIT)).item())


@torch.no_grad()
def first_overflow(model, ids) -> str | None:
    """The name of the first intermediate of ``model(ids)`` (no cache) that overflowed, or None."""
    return numerics.first_overflow(model, ids, overflowed)


def bad_logits(logits: torch.Tensor) -> torch.Tensor:
    """A device boolean: logits no token should be drawn from (inf or NaN, or a row all equal)."""
    bad = ~torch.isfinite(logits).all()
    if logits.shape[-1] > 1:
        bad = bad | (logits.amax(-1) == logits.amin(-1)).any()
    return bad


def non_finite_error(model, ids, step: str) -> CheckpointError:
    """The error for logits computed from ``step`` that overflowed, naming where (npllama.numerics's)."""
    return numerics.non_finite_error(model, ids, step, first_overflow)


def check_finite_logits(logits: torch.Tensor, model, ids, step: str = "the prompt") -> None:
    """Nothing when the logits can be sampled from; else the CheckpointError of non_finite_error."""
    if bool(bad_logits(logits)):
        raise non_finite_error(model, ids, step)
