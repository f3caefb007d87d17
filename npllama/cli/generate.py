"""``npllama generate``: continue a prompt, streaming the text."""

from __future__ import annotations

import sys
import time

import click

from .options import backend_factory, backend_options, check_sampling, model_option, sampling_options


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
             backend, device, quiet):
    from ..chat import render_prompt
    from ..formats import load
    from ..generate import generate_text

    # every option is checked before the slow load
    settings = check_sampling(max_new_tokens, temperature, top_k, top_p, seed)
    if not prompt:
        raise click.UsageError("--prompt is empty: give some text to continue")
    if system is not None and as_chat is False:
        raise click.UsageError("--system goes with --chat (the system message is part of the chat template)")
    attach = backend_factory(backend, device)
    run = attach(load(model_path, progress=not quiet))
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
