"""``npllama generate``: continue a prompt, streaming the text."""

from __future__ import annotations

import sys
import time

import click

from .options import backend_options, load_model, make_backend, model_option, sampling_options


@click.command(help="Continue a prompt with a model (the default model if none is named).")
@model_option
@click.option("--prompt", "-p", required=True, help="The text to continue.")
@click.option("--chat/--raw", "as_chat", default=None,
              help="Wrap the prompt in the model's chat template as a user message "
                   "(default: on when the model has a chat template).")
@click.option("--system", default=None, help="System message, with --chat.")
@sampling_options
@backend_options
@click.option("--quiet", "-q", is_flag=True, help="No progress bar, no speed report.")
def generate(model_path, prompt, as_chat, system, max_new_tokens, temperature, top_k, top_p, seed,
             backend, device, weights, quiet):
    from ..chat import render_prompt
    from ..generate import generate_text
    from ..sampling import SamplingSettings

    settings = SamplingSettings(temperature, top_k, top_p)   # checked before the slow load
    if not prompt:
        raise click.UsageError("--prompt is empty: give some text to continue")
    run = make_backend(backend, load_model(model_path, backend, weights, progress=not quiet), device,
                       weights=weights)
    stops = None
    if as_chat is None:
        as_chat = bool(getattr(run.model.tokenizer, "chat_template", None))
    if as_chat:
        prompt, stops = render_prompt(run.model, prompt, system)
    start = time.perf_counter()
    n = 0
    for piece in generate_text(run.model, prompt, max_new_tokens, settings, seed, stop_ids=stops,
                               generate_fn=run.generate):
        n += 1
        click.echo(piece, nl=False)
        sys.stdout.flush()
    click.echo()
    if not quiet:
        dt = time.perf_counter() - start
        click.echo(f"[{n} pieces in {dt:.1f}s]", err=True)
