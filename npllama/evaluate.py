"""Perplexity of a model on a text: how surprised it is by each token, on average.

The text is tokenized once (no BOS), cut into consecutive chunks of seq_len - 1 tokens, and each
chunk is scored in its own window of seq_len ids that starts from BOS, as ``npllama train`` builds
its windows:

    window = [BOS] + chunk          every token of the text is predicted exactly once
    nll    = sum over tokens of -log p(token | BOS, the earlier tokens of its chunk)
    perplexity = exp(nll / number of tokens)

A tokenizer without BOS gets windows of seq_len tokens that overlap by one (the first token of
the text is then not scored). The loss of a batch comes from a function (by default the NumPy
model's own ``loss``, npllama.model.cross_entropy_loss), so any backend with the same loss gives
the same figure to float32 rounding. Perplexity is per token of the model's own tokenizer:
compare models that share one.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from .checks import is_int
from .errors import InputError
from .numerics import non_finite_error


def eval_windows(ids: np.ndarray, seq_len: int, bos: int | None) -> list[np.ndarray]:
    """ids: (n,) token ids of the text -> windows of at most seq_len ids that predict every token once."""
    if seq_len < 2:
        raise InputError(f"--seq-len must be at least 2, got {seq_len}")
    ids = np.asarray(ids, dtype=np.int64)
    step = seq_len - 1
    if bos is not None:
        return [np.concatenate([[bos], ids[i: i + step]]) for i in range(0, len(ids), step)]
    if len(ids) < 2:
        raise InputError("the text is one token long: nothing to predict")
    return [ids[i: i + seq_len] for i in range(0, len(ids) - 1, step)]


def total_nll(loss: Callable[[np.ndarray, np.ndarray | None], float], windows: list[np.ndarray],
              batch_size: int = 8, progress: bool = False) -> tuple[float, int]:
    """Sum of next-token negative log-likelihoods over the windows, and how many tokens were scored.

    loss: (ids (batch, length), attention mask (batch, length) or None) -> the mean cross-entropy
    over the predicted positions of each row's real tokens (e.g. ``model.loss``). Windows go
    batch_size at a time in their order; a batch of windows of different lengths (the text's last
    one is shorter) is right-padded, and the mask keeps the padding out of the loss.
    """
    windows = [w for w in windows if len(w) >= 2]
    batches = [windows[i: i + batch_size] for i in range(0, len(windows), batch_size)]
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, unit="batch", desc="eval", leave=False)
    nll, count = 0.0, 0
    for batch in batches:
        n = sum(len(w) - 1 for w in batch)
        ids, mask = right_pad(batch)
        nll += float(loss(ids, None if mask.all() else mask)) * n
        count += n
    return nll, count


def right_pad(windows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Windows of different lengths as ids (batch, L) and mask (batch, L), padding at the end."""
    length = max(len(w) for w in windows)
    ids = np.zeros((len(windows), length), dtype=np.int64)
    mask = np.zeros((len(windows), length), dtype=bool)
    for r, w in enumerate(windows):
        ids[r, : len(w)], mask[r, : len(w)] = w, True
    return ids, mask


def encode_text(tokenizer, text: str) -> tuple[np.ndarray, int | None]:
    """The text's token ids without BOS, and the BOS id the windows start from (None: none)."""
    ids = np.asarray(tokenizer.encode(text, add_bos=False), dtype=np.int64)
    bos = tokenizer.bos_id if getattr(tokenizer, "add_bos", True) else None
    return ids, bos


def perplexity(model, text: str, seq_len: int | None = None, batch_size: int = 8,
               max_tokens: int | None = None, progress: bool = False,
               loss: Callable[[np.ndarray, np.ndarray | None], float] | None = None) -> dict[str, Any]:
    """{"perplexity", "nll" (nats/token), "tokens"} of a model on a text (see the module docstring).

    model: gives .config and .tokenizer; loss: the batch loss, (ids, mask) -> float (default:
    the model's own, model.loss(ids, attention_mask=mask)).
    """
    if model.tokenizer is None:
        raise InputError("the model has no tokenizer; perplexity of text needs one")
    if not text.strip():
        raise InputError("the text is empty")
    if not is_int(batch_size) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    if max_tokens is not None and (not is_int(max_tokens) or max_tokens < 1):
        raise InputError(f"max_tokens must be a positive integer (or None: the whole text), got {max_tokens!r}")
    seq_len = min(seq_len or model.config.max_seq_len, model.config.max_seq_len)
    ids, bos = encode_text(model.tokenizer, text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    loss = loss or (lambda batch, mask: model.loss(batch, attention_mask=mask))
    windows = eval_windows(ids, seq_len, bos)
    nll, count = total_nll(loss, windows, batch_size, progress)
    if not math.isfinite(nll):
        raise non_finite_error(model, windows[0][None, :], "the text")
    mean = nll / count
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": count, "seq_len": seq_len}
