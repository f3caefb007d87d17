"""``npllama generate``: continue a prompt, streaming the text; or several prompts as one batch."""

from __future__ import annotations

import sys
import time

import click

from ..errors import InputError
from ..formats.mapped import reading_progress
from ..io import read_regular
from .options import (backend_factory, backend_options, check_sampling, check_text, load_model, model_option,
                      sampling_options)


def read_prompts(prompts: tuple[str, ...], prompts_file: str | None) -> list[str]:
    """The --prompt options, then the lines of --prompts FILE (blank lines skipped)."""
    found = list(prompts)
    if prompts_file is not None:
        try:
            text = read_regular(prompts_file, error=InputError, what=f"--prompts {prompts_file}").decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"--prompts {prompts_file}: not UTF-8 text ({e})") from None
        found += [line for line in text.splitlines() if line.strip()]
    if not found:
        raise click.UsageError("give a prompt: --prompt TEXT (repeatable) or --prompts FILE (one per line)")
    if not all(found):
        raise click.UsageError("--prompt is empty: give some text to continue")
    return found


def context_note(generation, row: int = 0) -> str:
    """One line saying that a row stopped because the context window was full."""
    made, held, window = len(generation.tokens[row]), generation.prompt_lengths[row], generation.window
    return (f"[stopped: the context window of {window} tokens is full (the prompt took {held}); "
            f"{made} of the {generation.max_new_tokens} requested tokens were generated]")


@click.command(help="Continue a prompt with a model (the default model if none is named). Several prompts "
                    "(--prompt repeated, or --prompts FILE) run as one padded batch; each answer is printed "
                    "under its prompt.")
@model_option
@click.option("--prompt", "-p", "prompts", multiple=True, help="The text to continue (repeatable).")
@click.option("--prompts", "prompts_file", default=None, metavar="FILE",
              help="A UTF-8 file with one prompt per line.")
@click.option("--chat/--raw", "as_chat", default=None,
              help="Wrap each prompt in the model's chat template as a user message "
                   "(default: on when the model has a chat template).")
@click.option("--system", default=None, help="System message, with --chat.")
@sampling_options
@backend_options
@click.option("--quiet", "-q", is_flag=True, help="No progress bar, no speed report.")
def generate(model_path, prompts, prompts_file, as_chat, system, max_new_tokens, temperature, top_k, top_p,
             seed, backend, device, weights, quiet):
    from ..chat import render_prompt
    from ..formats import require_tokenizer
    from ..generate import CONTEXT_FULL, generate_text

    # every option is checked before the slow load
    settings = check_sampling(max_new_tokens, temperature, top_k, top_p, seed)
    texts = read_prompts(prompts, prompts_file)
    for text in texts:
        check_text(text, "--prompt")
    check_text(system, "--system")
    if system is not None and as_chat is False:
        raise click.UsageError("--system goes with --chat (the system message is part of the chat template)")
    attach = backend_factory(backend, device, weights=weights)
    run = attach(require_tokenizer(load_model(model_path, backend, weights, progress=not quiet)))
    stops = None
    if as_chat is None:
        as_chat = bool(getattr(run.model.tokenizer, "chat_template", None))
    inputs = texts
    if as_chat:
        rendered = [render_prompt(run.model, text, system) for text in texts]
        inputs, stops = [text for text, _ in rendered], rendered[0][1]
    if run.name == "numpy":                     # work that would not fit is refused before it starts
        from ..memory import check_generation_fits
        longest = max(len(run.model.tokenizer.encode(text)) for text in inputs)
        check_generation_fits(run.model, len(inputs), longest, max_new_tokens)
    start = time.perf_counter()
    reading = reading_progress(run.model, "prompt", enabled=not quiet)   # a mapped model's prefill
    if len(inputs) == 1:
        stream = generate_text(run.model, inputs[0], max_new_tokens, settings, seed, stop_ids=stops,
                               generate_fn=run.generate)
        with reading as read:
            for piece in stream:
                read()                          # the bar ends with the first token
                click.echo(piece, nl=False)
                sys.stdout.flush()
        click.echo()
        notes = [context_note(stream.generation)] if stream.stopped == CONTEXT_FULL else []
    else:
        stream = generate_text(run.model, inputs, max_new_tokens, settings, seed, stop_ids=stops,
                               generate_fn=run.generate)
        answers = [""] * len(inputs)
        with reading:
            for pieces in stream:
                answers = [a + p for a, p in zip(answers, pieces)]
        for r, (text, answer) in enumerate(zip(texts, answers)):
            click.echo(f"{'' if r == 0 else chr(10)}>>> {text}\n{answer}")
        notes = [f"prompt {r + 1}: {context_note(stream.generation, r)}"
                 for r, why in enumerate(stream.stopped) if why == CONTEXT_FULL]
    for note in notes:
        click.secho(note, err=True, fg="yellow")
    if not quiet:
        made = sum(len(t) for t in stream.generation.tokens)
        click.echo(f"[{made} tokens in {time.perf_counter() - start:.1f}s]", err=True)
