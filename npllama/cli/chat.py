"""``npllama chat``: a conversation in the terminal (the session itself is npllama.chat.ChatSession)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import click

from ..chat import ChatSession
from ..chat_templates import BUILTIN_TEMPLATES, MAX_TEMPLATE_CHARS, ChatTemplate
from ..errors import InputError, printable
from ..generate import CONTEXT_FULL
from ..formats import require_tokenizer
from ..inputs import check_text_fits
from ..io import read_regular
from .options import (backend_factory, backend_options, check_sampling, check_text, load_model, model_option,
                      sampling_options)
from .interrupts import Presses, ctrl_c_remembered, stop_if
from .timing import Timing

PROMPT = ">>> "
COMMANDS_HELP = ("/reset: start a new conversation   /system TEXT: set the system prompt (empty: remove it)\n"
                 "/quit or Ctrl-D: leave              Ctrl-C: stop the answer being written")


def read_template(path: str) -> ChatTemplate:
    """--template FILE: a regular file of UTF-8 Jinja text, at most MAX_TEMPLATE_CHARS characters."""
    name = f"--template {path}"
    try:
        raw = read_regular(path, 4 * MAX_TEMPLATE_CHARS, InputError, name)
    except InputError as e:
        if "cannot read" in str(e) and not os.path.exists(path):
            raise InputError(f"{name}: not a built-in ({', '.join(BUILTIN_TEMPLATES)}) and not a file") from None
        raise
    try:
        return ChatTemplate(raw.decode("utf-8"), name)
    except UnicodeDecodeError as e:
        raise InputError(f"{name}: not UTF-8 text ({e}); a chat template is Jinja text") from None


def check_turn_fits(model, max_new_tokens: int):
    """ChatSession's check_turn for a NumPy model: check_generation_fits for the turn about to start,
    its prompt (the whole conversation, the cached positions reused) and the answer."""
    from ..memory import check_generation_fits

    def check(prompt: int, reused: int) -> None:
        try:
            check_generation_fits(model, 1, prompt, max_new_tokens, reused=reused)
        except InputError as e:
            raise InputError(f"{e}; /reset to start a new conversation, or a smaller --context or "
                             f"--max-new-tokens") from None
    return check


def converse(session: ChatSession, stats: bool, pressed: Presses) -> None:
    """The chat's loop: read a line, run a command or stream the answer, until /quit or Ctrl-D.
    Ctrl-C at the prompt is a hint, during an answer stops it (pressed: npllama.cli.interrupts)."""
    while True:
        try:
            line = input(PROMPT)
            check_text(line, "the line")
        except EOFError:
            click.echo()
            break
        except KeyboardInterrupt:
            pressed.clear()
            click.echo("\n(/quit or Ctrl-D to leave)", err=True)
            continue
        except (UnicodeDecodeError, InputError) as e:   # bytes that are not UTF-8 on the terminal
            reason = printable(str(e)) if isinstance(e, InputError) else \
                f"the line holds bytes that are not UTF-8 text ({e.reason})"
            click.echo(f"[{reason}; type it again]", err=True)
            continue
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            command, _, arg = line.partition(" ")
            if command in ("/quit", "/exit", "/bye"):
                break
            if command == "/reset":
                session.reset()
                click.echo("[new conversation]", err=True)
            elif command == "/system":
                session.set_system(arg.strip() or None)
                click.echo(f"[system prompt {'set' if arg.strip() else 'removed'}]", err=True)
            else:
                click.echo(f"unknown command {command!r}\n{COMMANDS_HELP}", err=True)
            continue
        pieces = None
        try:
            check_text_fits(session.tokenizer, line, session.window, "the message")   # before the template sees it
            pieces = session.send(line)
            for piece in pieces:
                stop_if(pressed)
                click.echo(piece, nl=False)
                sys.stdout.flush()
        except KeyboardInterrupt:
            pressed.clear()
            if pieces is not None:
                pieces.close()
            click.echo(" [stopped]", nl=False)
        except InputError as e:                 # a message too long for the window: the chat goes on
            click.echo(f"[{printable(str(e))}]", err=True)
            continue
        click.echo()
        if session.last_turn.stopped == CONTEXT_FULL:
            click.secho(f"[the answer stopped after {session.last_turn.generated} of {session.max_new_tokens} "
                        f"tokens: "
                        f"the context window of {session.window} tokens is full; /reset to start again, "
                        f"or a larger --context]", err=True, fg="yellow")
        if stats:
            s = session.last_turn
            click.echo(f"[{s.reused} tokens reused from the cache, {s.prefilled} read, {s.generated} generated "
                       f"in {s.seconds:.1f}s; {s.stopped}]", err=True)


@click.command(name="chat", help=(
    "Chat with a model in the terminal, streaming answers and keeping the KV cache. Ends with one timing "
    "line on stderr: load, prompt tokens/s, generated tokens/s.\n\n"
    "\b\nIn the chat:\n" + COMMANDS_HELP))
@model_option
@backend_options
@click.option("--system", "-s", default=None, help="System prompt.")
@click.option("--template", default=None, metavar="NAME|FILE",
              help="Chat template: llama2, llama3, llama3.1, chatml, or a Jinja file (default: the model's own).")
@click.option("--context", "context", type=click.IntRange(min=1), default=None,
              help="Use at most this many positions (default: the model's context window).")
@sampling_options
@click.option("--stats", is_flag=True, help="After each answer, show the tokens reused, read and generated.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar, no banner, no timing line at the end.")
def chat(model_path, backend, device, weights, system, template, context, max_new_tokens, temperature,
         top_k, top_p, seed, stats, quiet):
    """Read a line, stream the answer, repeat; commands start with a slash."""
    settings = check_sampling(max_new_tokens, temperature, top_k, top_p, seed)   # all checked before the load
    check_text(system, "--system")
    if template is not None and template not in BUILTIN_TEMPLATES:
        template = read_template(template)
    attach = backend_factory(backend, device, weights=weights)
    timing = Timing()
    began = time.perf_counter()
    run = attach(require_tokenizer(load_model(model_path, backend, weights, progress=not quiet)))
    timing.load_s = time.perf_counter() - began
    turns = []                     # (Generation, prompt tokens it read) of every turn, for the timing line

    def timed_generate(model, prompt_ids, *args, **kwargs):
        generation = run.generate(model, prompt_ids, *args, **kwargs)
        turns.append((generation, len(prompt_ids)))
        return generation

    def on_drop(n: int) -> None:
        click.secho(f"[the context window is full: dropped the oldest {n} turn{'s' * (n != 1)}]",
                    err=True, fg="yellow")

    session = ChatSession(run.model, system, settings, seed, max_new_tokens, generate_fn=timed_generate,
                          template=template, max_seq_len=context, on_drop=on_drop,
                          check_turn=check_turn_fits(run.model, max_new_tokens) if run.name == "numpy" else None)
    if not quiet:
        click.echo(f"npllama chat ({backend}, {session.window}-token window, {session.template_source} "
                   f"chat template)\n{COMMANDS_HELP}", err=True)
    # Ctrl-C stops an answer: make sure it raises KeyboardInterrupt even if this process was started
    # with SIGINT ignored (a parent such as a test runner's worker can pass that on, and Python then
    # keeps ignoring it).
    if threading.current_thread() is threading.main_thread():    # signal handlers live in the main thread
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    with ctrl_c_remembered() as pressed:
        converse(session, stats, pressed)
    if not quiet:
        for generation, fed in turns:
            timing.add(generation, fed)
        click.echo(timing.line(), err=True)
