"""The ``npllama`` command line.

Each subcommand lives beside what it drives and is imported only when used, so ``npllama
generate`` never imports torch. Every NpllamaError is printed as one message and exit status 2;
no traceback.
"""

from __future__ import annotations

import importlib
import sys

import click

from .errors import NpllamaError

# name -> "module:attribute" of a click command; imported on first use.
COMMANDS = {
    "generate": "npllama.cli:generate",
    "fetch": "npllama.cli:fetch",
    "chat": "npllama.chat:chat_command",
    "parity": "parity.report:parity_command",
    "train": "parity.train:train_command",
    "convert": "npllama.convert:convert_command",
    "eval": "parity.evaluate:eval_command",
}

HELP = {
    "generate": "Continue a prompt with a model (the default model if none is named).",
    "fetch": "Download and verify the default model into weights/ (done on first use anyway).",
    "chat": "Chat with a model in the terminal, streaming answers and keeping the KV cache.",
    "parity": "Run a prompt through the NumPy reference and the Torch backend; compare every op.",
    "train": "Train a model on a text file with the Torch backend.",
    "convert": "Convert a multi-head checkpoint to grouped-query (or multi-query) attention.",
    "eval": "Report the perplexity of a model on a text file.",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except ImportError as e:
            missing = getattr(e, "name", None) or str(e)

            @click.command(name=name, help=HELP[name], context_settings={"ignore_unknown_options": True})
            @click.argument("args", nargs=-1, type=click.UNPROCESSED)
            def unavailable(args):
                raise click.ClickException(
                    f"`npllama {name}` needs {missing!r}, which is not installed here "
                    f"(pip install 'npllama[torch]' for the Torch backend).")
            return unavailable

    def format_commands(self, ctx, formatter):
        with formatter.section("Commands"):
            formatter.write_dl([(n, HELP[n]) for n in COMMANDS])

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except NpllamaError as e:
            click.echo(f"npllama: error: {e}", err=True)
            sys.exit(2)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="npllama")
def main():
    """npllama: a readable NumPy reference of LLaMA-family models, with a Torch twin.

    With no --model, commands use SmolLM2-135M-Instruct, fetched once into weights/.
    """


def model_option(f):
    return click.option("--model", "-m", "model_path", default=None, metavar="PATH",
                        help="A Hugging Face folder, a Meta folder, or a .gguf file "
                             "(default: SmolLM2-135M-Instruct in weights/).")(f)


def sampling_options(f):
    f = click.option("--seed", type=int, default=None, help="Seed for the sampler's random numbers (repeatable runs).")(f)
    f = click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling mass, in (0, 1].")(f)
    f = click.option("--top-k", type=int, default=0, show_default=True, help="Keep only the k most likely tokens (0: off).")(f)
    f = click.option("--temperature", "-t", type=float, default=0.0, show_default=True,
                     help="Softmax temperature; 0 is greedy decoding.")(f)
    f = click.option("--max-new-tokens", "-n", type=int, default=128, show_default=True,
                     help="Stop after this many new tokens.")(f)
    return f


@click.command(help=HELP["generate"])
@model_option
@click.option("--prompt", "-p", required=True, help="The text to continue.")
@click.option("--chat/--raw", "as_chat", default=None,
              help="Wrap the prompt in the model's chat template as a user message "
                   "(default: on when the model has a chat template).")
@click.option("--system", default=None, help="System message, with --chat.")
@sampling_options
@click.option("--quiet", "-q", is_flag=True, help="No progress bar, no speed report.")
def generate(model_path, prompt, as_chat, system, max_new_tokens, temperature, top_k, top_p, seed, quiet):
    import time

    from .formats import load
    from .generate import generate_text
    from .sampling import SamplingSettings

    settings = SamplingSettings(temperature, top_k, top_p)   # checked before the slow load
    if not prompt:
        raise click.UsageError("--prompt is empty: give some text to continue")
    model = load(model_path, progress=not quiet)
    stops = None
    if as_chat is None:
        as_chat = bool(getattr(model.tokenizer, "chat_template", None))
    if as_chat:
        from .chat import render_prompt
        prompt, stops = render_prompt(model, prompt, system)
    start = time.perf_counter()
    n = 0
    for piece in generate_text(model, prompt, max_new_tokens, settings, seed, stop_ids=stops):
        n += 1
        click.echo(piece, nl=False)
        sys.stdout.flush()
    click.echo()
    if not quiet:
        dt = time.perf_counter() - start
        click.echo(f"[{n} pieces in {dt:.1f}s]", err=True)


@click.command(help=HELP["fetch"])
def fetch():
    from .weights import default_model_path
    click.echo(default_model_path(fetch=True))


if __name__ == "__main__":
    main()
