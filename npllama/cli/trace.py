"""``npllama trace``: the reference's every activation out (--out), anyone's activations checked (--against).

The schema of a dump is npllama/oracle.py's (docs/parity.md). ``npllama parity --against`` (the
Torch plug-in) runs the same check through check_against, with the same options; this command
needs no torch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import numpy as np

from ..errors import InputError
from ..formats.mapped import reading_progress
from .options import mapped_choice, model_option


def parse_ids(value: str) -> list:
    """--ids: a JSON file holding a list of ids (or a list of equally long lists, a batch), or
    comma-separated ids "1,2,3"."""
    path = Path(value)
    if path.is_file():
        try:
            ids = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"--ids {value}: not a JSON file of token ids ({e})") from None
        ok = (isinstance(ids, list) and ids and
              (all(isinstance(t, int) for t in ids) or
               all(isinstance(row, list) and row and all(isinstance(t, int) for t in row) for row in ids)))
        if not ok or (isinstance(ids[0], list) and len({len(row) for row in ids}) != 1):
            raise InputError(f"--ids {value}: expected a JSON list of integers, or a list of equally "
                             f"long lists of integers (one per sequence)")
        return ids
    try:
        ids = [int(t) for t in value.split(",") if t.strip()]
    except ValueError:
        raise click.UsageError(f"--ids must be comma-separated integers or a JSON file of them, got {value!r}") from None
    if not ids:
        raise click.UsageError("--ids is empty: give token ids (1,2,3) or a JSON file of them")
    return ids


def reference_option(f):
    return click.option("--reference", "reference_path", default=None, metavar="REF.safetensors",
                        type=click.Path(dir_okay=False),
                        help="With --against: compare with this dump of `npllama trace` instead of "
                             "recomputing the reference (no model needed).")(f)


def view_option(f):
    return click.option("--all/--compact", "show_all", default=None,
                        help="Print every row, or only the verdict, the rows around the first break and "
                             "the worst op of each layer (default: compact on a terminal, all otherwise).")(f)


def show(report, show_all: bool | None) -> None:
    """Print a report: compact on a terminal (unless show_all), every row when piped."""
    from ..report import format_compact, format_table

    if show_all is None:
        show_all = not sys.stdout.isatty()
    click.echo(format_table(report) if show_all else format_compact(report))


def check_against(against: str, model_path: str | None, reference_path: str | None, dtype: str | None,
                  isolate: bool, show_all: bool | None, plot_path: str | None) -> bool:
    """Read a dump, compare it with the reference (recomputed, or a --reference dump), print the
    table; True when every op is within tolerance."""
    from ..formats import load
    from ..oracle import check_dump, model_sha256, read_dump
    from ..report import plot_errors

    if reference_path is not None and (model_path is not None or isolate):
        raise click.UsageError("--reference replaces --model; --isolate needs the model (it recomputes each "
                               "layer from the dump's inputs), so give --model instead")
    theirs = read_dump(against)
    reference = read_dump(reference_path) if reference_path is not None else None
    model = sha = None
    if reference is None:
        model = load(model_path, progress=False, dtype=np.float64, mapped=mapped_choice())  # the reference: float64
        sha = model_sha256(model_path)
    with reading_progress(model, "reference"):          # a bar only for a mapped model
        report = check_dump(theirs, model, reference, isolate=isolate, dtype=dtype, model_sha256=sha)
    ids = theirs.input_ids if theirs.input_ids is not None else reference.input_ids
    click.echo(f"{ids.shape[1]} tokens" + (f" x {ids.shape[0]} sequences" if ids.shape[0] > 1 else ""))
    click.echo()
    show(report, show_all)
    if plot_path:
        plot_errors([report], plot_path)
        click.echo(f"plot: {plot_path}")
    return report.ok


@click.command(name="trace", help="Write every activation of the NumPy reference to a safetensors file "
               "(--out), under npllama's trace names, with input_ids and metadata; or check someone's file "
               "of activations against the reference (--against THEIRS.safetensors): the parity table, "
               "verdict and exit status of `npllama parity` (1 when an op breaks its tolerance). "
               "docs/parity.md has the schema, docs/porting.md a walk-through.")
@model_option
@click.option("--prompt", "-p", default=None, help="The text to run (default: \"The capital of France is\").")
@click.option("--ids", default=None, metavar="IDS.json|1,2,3",
              help="Token ids instead of a prompt: a JSON list (or list of lists, a batch), or comma-separated.")
@click.option("--out", "-o", "out", default=None, type=click.Path(dir_okay=False), metavar="REF.safetensors",
              help="Write the reference's activations here.")
@click.option("--dtype", type=click.Choice(["float64", "float32", "bfloat16", "float16"]), default=None,
              help="With --out: the reference's dtype, float64 (default) or float32. With --against: the "
                   "dtype whose tolerances judge THEIRS (default: the dtype it declares, else its tensors').")
@click.option("--against", default=None, type=click.Path(dir_okay=False), metavar="THEIRS.safetensors",
              help="Check this file of activations (any subset of the trace names, plus input_ids).")
@reference_option
@click.option("--isolate", is_flag=True,
              help="With --against: run each layer of the reference from THEIRS' own input to it, so errors "
                   "do not carry over between layers (tighter 'layer' tolerances; for half precision).")
@view_option
@click.option("--plot", "plot_path", default=None, metavar="FILE.png", help="With --against: draw the error of each op by layer.")
def trace_command(model_path, prompt, ids, out, dtype, against, reference_path, isolate, show_all, plot_path):
    if (out is None) == (against is None):
        raise click.UsageError("give --out REF.safetensors (write the reference's activations) or "
                               "--against THEIRS.safetensors (check them), one of the two")
    if against is not None:
        if prompt is not None or ids is not None:
            raise click.UsageError("--against runs on the file's own input_ids; --prompt and --ids are for --out")
        if not check_against(against, model_path, reference_path, dtype, isolate, show_all, plot_path):
            sys.exit(1)
        return
    for flag, given in (("--reference", reference_path), ("--isolate", isolate), ("--plot", plot_path)):
        if given:
            raise click.UsageError(f"{flag} goes with --against")
    if dtype not in (None, "float64", "float32"):
        raise click.UsageError(f"--dtype {dtype}: the NumPy reference computes in float64 or float32")
    write_reference(model_path, prompt, ids, out, dtype or "float64")


def write_reference(model_path, prompt, ids, out, dtype: str) -> None:
    from .. import __version__
    from ..formats import load
    from ..oracle import DEFAULT_PROMPT, describe, dump_metadata, model_sha256, trace, write_dump
    from ..weights import DEFAULT_FILE

    if ids is not None and prompt is not None:
        raise click.UsageError("give --prompt or --ids, not both")
    if prompt == "":
        raise click.UsageError("--prompt is empty: give some text to run")
    ids = parse_ids(ids) if ids is not None else None
    model = load(model_path, progress=False, dtype=np.dtype(dtype), mapped=mapped_choice())
    if ids is None:
        prompt = DEFAULT_PROMPT if prompt is None else prompt
        if model.tokenizer is None:
            raise InputError("this checkpoint has no tokenizer: pass --ids")
        ids = model.tokenizer.encode(prompt)
    ids = model.check_ids(ids)
    from ..memory import check_call_fits, is_mapped, trace_bytes
    check_call_fits(model, f"tracing {ids.shape[1]} tokens x {ids.shape[0]} in {dtype}",
                    trace_bytes(model.config, *ids.shape, dtype, is_mapped(model)), "trace fewer tokens")
    with reading_progress(model, "trace"):              # a bar only for a mapped model
        activations = trace(model, ids)
    meta = dump_metadata(dtype, f"npllama {__version__}, the NumPy reference", prompt=prompt,
                         model=Path(model_path).name if model_path else DEFAULT_FILE,
                         model_sha256=model_sha256(model_path), rotary_dim=model.config.rotary_dim)
    write_dump(out, activations, ids, meta)
    click.echo(describe(out, activations, ids))
