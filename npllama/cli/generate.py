"""``npllama generate``: continue a prompt, streaming the text; or many prompts, in batches that fit a memory budget."""

from __future__ import annotations

import re
import sys
import time

import click

from ..errors import InputError
from ..formats.mapped import reading_progress
from ..io import read_regular
from ..memory import DEFAULT_BATCH_MIB
from .interrupts import NEVER, Presses, ctrl_c_remembered, stop_if
from .options import (backend_factory, backend_options, check_positive, check_sampling, check_text, load_model,
                      model_option, sampling_options)
from .timing import Timing

INTERRUPTED = 130   # the exit status of a command stopped by Ctrl-C (128 + SIGINT), as shells report it


def split_lines(text: str) -> list[str]:
    """The lines of a prompts file: split at \\n and \\r\\n only (not at the other characters
    str.splitlines takes for line ends: \\v, \\f, \\x1c-\\x1e, \\x85, U+2028, U+2029, a lone \\r,
    which belong to a prompt's text)."""
    lines = re.split(r"\r?\n", text)
    return lines[:-1] if lines and lines[-1] == "" else lines


def read_prompts(prompts: tuple[str, ...], prompts_file: str | None) -> list[str]:
    """The --prompt options, then the lines of --prompts FILE (blank lines skipped, a UTF-8 BOM dropped)."""
    found = list(prompts)
    if prompts_file is not None:
        try:
            text = read_regular(prompts_file, error=InputError, what=f"--prompts {prompts_file}").decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise InputError(f"--prompts {prompts_file}: not UTF-8 text ({e})") from None
        found += [line for line in split_lines(text) if line.strip()]
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
                    "(--prompt repeated, or --prompts FILE) run as padded batches, as many prompts to a batch "
                    "as --batch-memory holds; each answer is printed under its prompt as its batch finishes. "
                    "Ends with one timing line on stderr: load, prompt tokens/s, generated tokens/s.")
@model_option
@click.option("--prompt", "-p", "prompts", multiple=True, help="The text to continue (repeatable).")
@click.option("--prompts", "prompts_file", default=None, metavar="FILE",
              help="A UTF-8 file with one prompt per line (lines end at \\n or \\r\\n; blank lines are skipped).")
@click.option("--chat/--raw", "as_chat", default=None,
              help="Wrap each prompt in the model's chat template as a user message "
                   "(default: on when the model has a chat template).")
@click.option("--system", default=None, help="System message, with --chat.")
@sampling_options
@backend_options
@click.option("--batch-memory", type=int, default=DEFAULT_BATCH_MIB, show_default=True, metavar="MIB",
              help="MiB one batch of prompts may take: its KV cache, logits and activations, estimated from "
                   "the model's config (npllama.memory); more prompts run in more batches.")
@click.option("--tp", type=click.IntRange(min=1), default=None, metavar="N",
              help="Tensor parallelism (--backend torch): split the model over N processes, started here or by "
                   "torchrun; rank 0 prints (docs/tensor_parallel.md).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar, no timing line.")
def generate(model_path, prompts, prompts_file, as_chat, system, max_new_tokens, temperature, top_k, top_p,
             seed, backend, device, weights, batch_memory, tp, quiet):
    from ..chat import render_prompt
    from ..formats import require_tokenizer
    from ..inputs import check_text_fits
    from ..rope_scaling import context_window

    # every option is checked before the slow load
    settings = check_sampling(max_new_tokens, temperature, top_k, top_p, seed)
    check_positive(batch_memory, "--batch-memory")
    texts = read_prompts(prompts, prompts_file)
    for text in texts:
        check_text(text, "--prompt")
    check_text(system, "--system")
    if system is not None and as_chat is False:
        raise click.UsageError("--system goes with --chat (the system message is part of the chat template)")
    attach = backend_factory(backend, device, weights=weights, tp=tp)
    timing = Timing()
    began = time.perf_counter()
    if tp is None:
        run = attach(require_tokenizer(load_model(model_path, backend, weights, progress=not quiet)))
    else:   # each of the tp processes reads its own slices of the checkpoint
        run = attach(model_path, progress=not quiet)
        require_tokenizer(run.model)
    timing.load_s = time.perf_counter() - began
    window = context_window(run.model.config)
    for r, text in enumerate(texts):          # before any template or tokenizer sees the text
        check_text_fits(run.model.tokenizer, text, window, "the prompt" if len(texts) == 1 else f"prompt {r + 1}")
    stops = None
    if as_chat is None:
        as_chat = bool(getattr(run.model.tokenizer, "chat_template", None))
    inputs = texts
    if as_chat:
        rendered = [render_prompt(run.model, text, system) for text in texts]
        inputs, stops = [text for text, _ in rendered], rendered[0][1]
    lengths = [len(run.model.tokenizer.encode(text)) for text in inputs]    # tokens of each prompt
    if run.name == "numpy":                     # work that would not fit is refused before it starts
        from ..memory import check_generation_fits
        check_generation_fits(run.model, 1, max(lengths), max_new_tokens)   # --prompts batches plan their own
    interrupted = False
    try:
        with ctrl_c_remembered() as pressed:
            if len(inputs) == 1:
                stream_one(run, inputs[0], max_new_tokens, settings, seed, stops, timing, not quiet, pressed)
            else:
                stream_batches(run, texts, inputs, lengths, max_new_tokens, settings, seed, stops, batch_memory << 20,
                               timing, pressed)
    except KeyboardInterrupt:
        interrupted = True
        click.echo(" [interrupted]" if len(inputs) == 1 else "[interrupted]", err=len(inputs) > 1)
    if not quiet:
        click.echo(timing.line(), err=True)
    if interrupted:
        sys.exit(INTERRUPTED)


def stream_one(run, text: str, max_new_tokens, settings, seed, stops, timing: Timing, progress: bool = True,
               pressed: Presses = NEVER) -> None:
    """One prompt: its answer streamed piece by piece as it is generated (a mapped model's prompt
    pass shows a bar, which ends with the first token); a Ctrl-C Python dropped stops it at the
    next piece (npllama.cli.interrupts)."""
    from ..generate import CONTEXT_FULL, generate_text

    stream = generate_text(run.model, text, max_new_tokens, settings, seed, stop_ids=stops,
                           generate_fn=run.generate)
    try:
        with reading_progress(run.model, "prompt", enabled=progress) as read:
            for piece in stream:
                stop_if(pressed)
                read()
                click.echo(piece, nl=False)
                sys.stdout.flush()
        click.echo()
        if stream.stopped == CONTEXT_FULL:
            click.secho(context_note(stream.generation), err=True, fg="yellow")
    finally:
        stream.close()
        timing.add(stream.generation)


def stream_batches(run, texts, inputs, lengths, max_new_tokens, settings, seed, stops, budget_bytes: int,
                   timing: Timing, pressed: Presses = NEVER) -> None:
    """Several prompts (lengths: each one's tokens): in batches within budget_bytes
    (npllama.inputs.plan_batches), each batch's answers printed under their prompts as soon as the
    batch finishes."""
    from ..generate import CONTEXT_FULL, generate_text
    from ..inputs import plan_batches

    model = run.model
    for batch in plan_batches(lengths, max_new_tokens, model.config, budget_bytes, getattr(model, "dtype", "float32")):
        stream = generate_text(model, [inputs[r] for r in batch], max_new_tokens, settings, seed, stop_ids=stops,
                               generate_fn=run.generate)
        answers = [""] * len(batch)
        try:
            for pieces in stream:
                stop_if(pressed)
                answers = [a + p for a, p in zip(answers, pieces)]
        except KeyboardInterrupt:                    # what the batch had made so far, then stop
            for i, r in enumerate(batch):
                click.echo(f"{'' if r == 0 else chr(10)}>>> {texts[r]}\n{answers[i]}")
            raise
        finally:
            stream.close()
            timing.add(stream.generation)
        for i, r in enumerate(batch):
            click.echo(f"{'' if r == 0 else chr(10)}>>> {texts[r]}\n{answers[i]}")
            if stream.stopped[i] == CONTEXT_FULL:
                click.secho(f"prompt {r + 1}: {context_note(stream.generation, i)}", err=True, fg="yellow")
        sys.stdout.flush()
