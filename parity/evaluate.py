"""Perplexity of a model on a text file, with either backend (``npllama eval``).

The text is tokenized once (no BOS), cut into consecutive chunks of seq_len - 1 tokens, and each
chunk is scored in its own window of seq_len ids that starts from BOS, as ``npllama train`` builds
its windows:

    window = [BOS] + chunk          every token of the text is predicted exactly once
    nll    = sum over tokens of -log p(token | BOS, the earlier tokens of its chunk)
    perplexity = exp(nll / number of tokens)

A tokenizer without BOS gets windows of seq_len tokens that overlap by one (the first token of
the text is then not scored). Both backends go through the model's own ``loss`` (npllama.model /
parity.model ``cross_entropy_loss``), so the NumPy and Torch figures agree to float32 rounding.
Perplexity is per token of the model's own tokenizer: compare models that share one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import click
import numpy as np

from npllama.errors import InputError


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


def total_nll(model, windows: list[np.ndarray], batch_size: int = 8, progress: bool = False) -> tuple[float, int]:
    """Sum of next-token negative log-likelihoods over the windows, and how many tokens were scored.

    model: an npllama.Transformer or a parity.Transformer (anything with ``loss(ids)`` returning the
    mean over the (batch, length - 1) predicted positions). Windows of equal length share a batch.
    """
    by_len: dict[int, list[np.ndarray]] = {}
    for w in windows:
        if len(w) >= 2:
            by_len.setdefault(len(w), []).append(w)
    batches = [np.stack(ws[i: i + batch_size]) for n, ws in by_len.items() for i in range(0, len(ws), batch_size)]
    if progress:
        from tqdm import tqdm
        batches = tqdm(batches, unit="batch", desc="eval", leave=False)
    nll, count = 0.0, 0
    for batch in batches:
        n = batch.shape[0] * (batch.shape[1] - 1)
        nll += _loss(model, batch) * n
        count += n
    return nll, count


def _loss(model, batch: np.ndarray) -> float:
    try:
        import torch
    except ImportError:
        return float(model.loss(batch))
    if isinstance(model, torch.nn.Module):
        with torch.no_grad():
            return float(model.loss(torch.from_numpy(batch).to(model.device)))
    return float(model.loss(batch))


def encode_text(tokenizer, text: str) -> tuple[np.ndarray, int | None]:
    """The text's token ids without BOS, and the BOS id the windows start from (None: none)."""
    ids = np.asarray(tokenizer.encode(text, add_bos=False), dtype=np.int64)
    bos = tokenizer.bos_id if getattr(tokenizer, "add_bos", True) else None
    return ids, bos


def perplexity(model, text: str, seq_len: int | None = None, batch_size: int = 8,
               max_tokens: int | None = None, progress: bool = False) -> dict[str, Any]:
    """{"perplexity", "nll" (nats/token), "tokens"} of a model on a text (see the module docstring)."""
    if model.tokenizer is None:
        raise InputError("the model has no tokenizer; perplexity of text needs one")
    if not text.strip():
        raise InputError("the text is empty")
    seq_len = min(seq_len or model.config.max_seq_len, model.config.max_seq_len)
    ids, bos = encode_text(model.tokenizer, text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    nll, count = total_nll(model, eval_windows(ids, seq_len, bos), batch_size, progress)
    mean = nll / count
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": count, "seq_len": seq_len}


def load_model(path: str, backend: str, device: str = "cpu", dtype: str = "float32"):
    """An npllama.Transformer (backend "numpy") or parity.Transformer (backend "torch")."""
    import npllama
    if backend == "numpy":
        return npllama.load(path, progress=False, dtype=np.dtype(dtype))
    import parity
    return parity.load(path, device=device, dtype=dtype, progress=False)


@click.command(name="eval", help="Report the perplexity of a model on a text file, with the NumPy reference "
               "or the Torch backend. Every token is scored once, in chunks of --seq-len that each start "
               "from BOS (as npllama train builds its windows).")
@click.option("--model", "-m", "model_path", required=True, metavar="PATH", help="The checkpoint to evaluate.")
@click.option("--data", "-d", required=True, type=click.Path(exists=True, dir_okay=False), help="UTF-8 text file.")
@click.option("--backend", type=click.Choice(["numpy", "torch"]), default="numpy", show_default=True)
@click.option("--seq-len", type=int, default=None, help="Tokens per window (default: the context, at most 256).")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--max-tokens", type=int, default=None, help="Score only the first N tokens of the text.")
@click.option("--device", default="cpu", show_default=True, help="Torch backend: cpu or cuda.")
@click.option("--dtype", default="float32", show_default=True, help="float32, float64 (or bfloat16 with torch).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a sentence.")
def eval_command(model_path, data, backend, seq_len, batch_size, max_tokens, device, dtype, as_json):
    try:
        text = Path(data).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{data}: not UTF-8 text ({e})") from None
    model = load_model(model_path, backend, device, dtype)
    result = perplexity(model, text, seq_len or min(256, model.config.max_seq_len), batch_size, max_tokens,
                        progress=not as_json)
    result.update(model=str(model_path), data=str(data), backend=backend)
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"{model_path} on {data}: perplexity {result['perplexity']:.3f} "
                   f"({result['nll']:.4f} nats/token over {result['tokens']:,} tokens, {backend}, "
                   f"windows of {result['seq_len']})")
