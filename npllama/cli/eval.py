"""``npllama eval``: perplexity of a model on a text file (npllama.evaluate)."""

from __future__ import annotations

import json

import click
import numpy as np

from ..errors import InputError
from ..io import read_regular
from ..weights import DEFAULT_MODEL
from .options import backend_factory, backend_options, check_positive, load_model, model_option


@click.command(name="eval", help="Report the perplexity of a model on a text file, with the NumPy reference "
               "or another backend. Every token is scored once, in chunks of --seq-len that each start "
               "from BOS (as npllama train builds its windows).")
@model_option
@click.option("--data", "-d", required=True, type=click.Path(exists=True, dir_okay=False), help="UTF-8 text file.")
@backend_options
@click.option("--seq-len", type=int, default=None,
              help="Tokens per window (default: the context, at most 256).")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Windows per batch.")
@click.option("--max-tokens", type=int, default=None, help="Score only the first N tokens of the text.")
@click.option("--dtype", default="float32", show_default=True,
              help="float32 or float64 (and bfloat16, float16 with --backend torch).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a sentence.")
def eval_command(model_path, data, backend, device, weights, seq_len, batch_size, max_tokens, dtype, as_json):
    from ..evaluate import perplexity
    from ..formats import require_tokenizer

    # every option and the text are checked before the slow load
    check_positive(batch_size, "--batch-size")
    check_positive(max_tokens, "--max-tokens")
    check_positive(seq_len, "--seq-len", 2)
    try:
        text = read_regular(data, error=InputError, what=f"--data {data}").decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"--data {data}: not UTF-8 text ({e})") from None
    if not text.strip():
        raise InputError(f"--data {data}: the text is empty")
    attach = backend_factory(backend, device, dtype, weights)
    if backend == "numpy":
        run = attach(require_tokenizer(load_model(model_path, backend, weights, progress=False,
                                                  dtype=np.dtype(dtype))))
    else:
        run = attach(require_tokenizer(load_model(model_path, backend, weights, progress=False)))
    model = run.model
    if backend == "numpy":                      # work that would not fit is refused before it starts
        from ..memory import check_call_fits, model_is_mapped, loss_bytes
        window = seq_len or min(256, model.config.max_seq_len)
        check_call_fits(model, f"a batch of {batch_size} windows of {window} tokens",
                        loss_bytes(model.config, batch_size, window, model.dtype, model_is_mapped(model)),
                        "lower --batch-size or --seq-len")
    result = perplexity(model, text, seq_len or min(256, model.config.max_seq_len), batch_size, max_tokens,
                        progress=not as_json, loss=run.loss)
    name = model_path or DEFAULT_MODEL
    result.update(model=str(name), data=str(data), backend=backend, weights=weights)
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"{name} on {data}: perplexity {result['perplexity']:.3f} "
                   f"({result['nll']:.4f} nats/token over {result['tokens']:,} tokens, {backend}, {weights} weights, "
                   f"windows of {result['seq_len']})")
