"""Choosing the next token on the device, the Torch twin of npllama.sampling.

The same pure function of (logits, settings, u): temperature, then top-k, then top-p of what
top-k left (Meta's convention: keep the token that crosses p), then an inverse-CDF draw with the
uniform number u.
Where the randomness comes from is decided once, in npllama: ``uniforms(seed, steps, batch)``
draws every u of a generation up front with NumPy's PCG64 on the host. Both backends consume
those same numbers, so they pick the same token whenever their logits agree; here the numbers
travel to the device once, and each step's draw happens there, with no host sync.

Probabilities are computed in float64, as in npllama, so that a draw depends on the logits and
u only, not on the precision of the backend's arithmetic.
"""

from __future__ import annotations

import torch

from npllama.sampling import SamplingSettings, uniforms

__all__ = ["SamplingSettings", "uniforms", "softmax_probs", "top_k_top_p", "sample", "sample_batch"]


def softmax_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / temperature) in float64. logits: (..., vocab) -> (..., vocab)"""
    return torch.softmax(logits.to(torch.float64) / temperature, dim=-1)


def top_k_top_p(probs_sorted: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Zero the tail of probabilities sorted in descending order: past the top_k first, then past
    the smallest prefix of what is left whose mass reaches top_p of it. (..., vocab) -> (..., vocab)"""
    kept = probs_sorted
    if top_k:
        kept = kept.clone()
        kept[..., top_k:] = 0.0
    if top_p < 1.0:
        mass = kept.sum(-1, keepdim=True) if top_k else 1.0   # top-p reads the distribution top-k left
        mass_before = torch.cumsum(kept, dim=-1) - kept      # mass of the tokens ranked above each one
        kept = kept.masked_fill(mass_before > top_p * mass, 0.0)
    return kept


def sample_batch(logits: torch.Tensor, settings: SamplingSettings, u: torch.Tensor) -> torch.Tensor:
    """logits: (batch, vocab); u: (batch,) uniforms in [0, 1) -> (batch,) int64 token ids.

    Inverse-CDF draw over the kept tokens in descending-probability order (a stable sort, so ties
    keep the lower id first, as np.argsort(kind="stable") does). Stays on logits' device.
    """
    if settings.greedy:
        return torch.argmax(logits, dim=-1)
    probs = softmax_probs(logits, settings.temperature)                    # (batch, vocab)
    probs_sorted, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    kept = top_k_top_p(probs_sorted, settings.top_k, settings.top_p)
    cdf = torch.cumsum(kept, dim=-1)                                        # (batch, vocab)
    target = u.to(device=cdf.device, dtype=torch.float64)[:, None] * cdf[:, -1:]   # (batch, 1)
    i = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[-1] - 1)  # (batch, 1)
    return torch.gather(order, -1, i)[:, 0]


def sample(logits: torch.Tensor, settings: SamplingSettings, u: float | torch.Tensor) -> int:
    """The next token for one sequence. logits: (vocab,); u in [0, 1) -> token id (a host int)."""
    u = torch.as_tensor(u, dtype=torch.float64).reshape(1)
    return int(sample_batch(logits[None], settings, u)[0])
