"""The ``npllama`` command line.

Each command lives in a module of this package and is imported only when used, so ``npllama
generate`` imports nothing but NumPy and the I/O libraries. Commands that other packages provide
(the Torch backend's ``parity`` and ``train``) are plug-ins: they are found through the entry-point
group ``npllama.commands`` (as pytest and flask find theirs), so npllama's code never names them.
Every NpllamaError is printed as one message and exit status 2; no traceback.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
import time
from importlib.metadata import entry_points

import click

from ..errors import NpllamaError, printable

PLUGIN_GROUP = "npllama.commands"
STARTED = "npllama.started"   # ctx.meta key: time.perf_counter() when the command line began

# name -> ("module:attribute" of a click command, one line of help); imported on first use.
COMMANDS = {
    "generate": ("npllama.cli.generate:generate", "Continue a prompt with a model (the default model if none is named)."),
    "chat": ("npllama.cli.chat:chat", "Chat with a model in the terminal, streaming answers and keeping the KV cache."),
    "eval": ("npllama.cli.eval:eval_command", "Report the perplexity of a model on a text file."),
    "convert": ("npllama.cli.convert:convert", "Convert a checkpoint to grouped-query (or multi-query) attention."),
    "export": ("npllama.cli.export:export_command", "Write a model's weights in the layout a port loads (Meta's or "
               "Hugging Face's)."),
    "trace": ("npllama.cli.trace:trace_command", "Write the reference's every activation to a file, or check "
              "someone's against it."),
    "fetch": ("npllama.cli:fetch", "Download and verify the default model into weights/ (done on first use anyway)."),
}


def plugins() -> dict:
    """The commands other installed packages declare under the entry-point group npllama.commands."""
    return {ep.name: ep for ep in entry_points(group=PLUGIN_GROUP) if ep.name not in COMMANDS}


def plugin_summary(ep) -> str:
    """One line on a plug-in command from its entry point's metadata, without importing it: the
    package that provides it and what its extras (``name = "module:attr [extras]"``) require."""
    dist = getattr(ep, "dist", None)
    name = getattr(dist, "name", None) or ep.value.split(":")[0].split(".")[0]
    needs = []
    for requirement in (getattr(dist, "requires", None) or []) if ep.extras else []:
        found = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)[^;]*;.*extra\s*==\s*[\"']([^\"']+)[\"'].*", requirement)
        if found and found.group(2) in ep.extras:
            needs.append(found.group(1))
    install = f"; needs {', '.join(needs)}: pip install '{name}[{','.join(ep.extras)}]'" if needs else ""
    return f"A plug-in command (from {name}{install}); `npllama {ep.name} --help` explains it."


def _unavailable(name: str, error: ImportError) -> click.Command:
    """Stands in for a plug-in whose package cannot be imported: says what is missing."""
    missing = getattr(error, "name", None) or str(error)

    @click.command(name=name, help=f"(not available: needs {missing})",
                   context_settings={"ignore_unknown_options": True, "help_option_names": []})
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def unavailable(args):
        raise click.ClickException(f"`npllama {name}` needs {missing!r}, which is not installed here "
                                   f"(pip install 'npllama[torch]' for the Torch backend's commands)")
    return unavailable


class LazyGroup(click.Group):
    """Commands imported on first use: npllama's own (COMMANDS) and the plug-ins."""

    started: float | None = None

    def main(self, args=None, **kwargs):
        """Run a command line. One read from sys.argv (args=None: the process's own, as the
        console script) is timed from the start of the process; one given as a list, from now."""
        self.started = time.perf_counter() - (process_age() if args is None else 0.0)
        return super().main(args, **kwargs)

    def make_context(self, info_name, args, parent=None, **extra):
        """Note in ctx.meta[STARTED] when the command line began (before a plug-in's libraries
        load), for commands that hold a wall-time budget (``npllama train --minutes``)."""
        started = self.started if self.started is not None else time.perf_counter()
        ctx = super().make_context(info_name, args, parent, **extra)
        ctx.meta.setdefault(STARTED, started)
        return ctx

    def list_commands(self, ctx):
        return list(COMMANDS) + sorted(plugins())

    def get_command(self, ctx, name):
        if name in COMMANDS:
            module, attr = COMMANDS[name][0].split(":")
            return getattr(importlib.import_module(module), attr)
        found = plugins().get(name)
        if found is None:
            return None
        try:
            return found.load()
        except ModuleNotFoundError as e:   # a library the plug-in needs is not installed
            if (e.name or "").split(".")[0] in ("npllama", found.value.split(".")[0]):
                raise
            return _unavailable(name, e)

    def format_commands(self, ctx, formatter):
        """The command list: npllama's own with their help, the plug-ins from their entry points'
        metadata alone, so that `npllama --help` imports none of them (nor what they need: torch)."""
        rows = [(name, help_) for name, (_, help_) in COMMANDS.items()]
        rows += [(name, plugin_summary(ep)) for name, ep in sorted(plugins().items())]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx):
        import numpy as np

        try:
            # Overflow in the maths is reported as one error (npllama.numerics), not as NumPy's warnings.
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                return super().invoke(ctx)
        except NpllamaError as e:             # one line; what it quotes from a file cannot act on the terminal
            click.echo(f"npllama: error: {printable(str(e))}", err=True)
            sys.exit(2)
        except MemoryError as e:              # what no estimate foresaw (another process took the memory)
            click.echo(f"npllama: error: out of memory ({printable(str(e)) or 'MemoryError'}); leave the weights "
                       f"in their files (--mapped) or ask for less work (fewer tokens, a smaller batch)", err=True)
            sys.exit(2)


def process_age() -> float:
    """Seconds since this process started: Linux's /proc; 0 where it cannot be read."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])   # field 22, starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="npllama")
def main():
    """npllama: a readable NumPy reference of LLaMA-family models, with a Torch twin.

    Commands that take --model use SmolLM2-135M-Instruct, fetched once into weights/, when it is
    not given. `npllama COMMAND --help` explains each.
    """


@click.command(help=COMMANDS["fetch"][1])
def fetch():
    from ..weights import default_model_path
    click.echo(default_model_path(fetch=True))
