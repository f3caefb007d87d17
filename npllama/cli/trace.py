"""``npllama trace``: the reference's every activation out (--out), anyone's activations checked (--against).

The schema of a dump is npllama/dump.py's (docs/parity.md). ``npllama parity --against`` (the
Torch plug-in) runs the same check through check_against, with the same options; this command
needs no torch. The exit status of a check is the verdict's: 0 a pass that covers what a port
must match, 1 a break, 2 bad input, 3 (EXIT_NOT_COVERED) too little compared.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

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


def verdict_options(f):
    """--only, --last-only and --json: what a check of a dump covers, and how its verdict is printed."""
    f = click.option("--json", "as_json", is_flag=True,
                     help="With --against: print the verdict, the bar, the coverage and every row as JSON "
                          "(the exit status is the same).")(f)
    f = click.option("--last-only", is_flag=True,
                     help="With --against: THEIRS holds the last position's logits (and norm) only, as ports "
                          "that generate compute them (also when its metadata says logits_positions 'last').")(f)
    f = click.option("--only", default=None, metavar="OPS",
                     help="With --against: judge only these, comma-separated: ops (logits, ffn_residual, "
                          "attention.q ...), layers (layers.0-3) or both (layers.0-3.ffn_norm). Without it a pass "
                          "needs the residual stream of every layer and the logits of every step.")(f)
    return f


def show(report, show_all: bool | None) -> None:
    """Print a report: compact on a terminal (unless show_all), every row when piped."""
    from ..report import format_compact, format_table

    if show_all is None:
        show_all = not sys.stdout.isatty()
    click.echo(format_table(report) if show_all else format_compact(report))


def check_against(against: str, model_path: str | None, reference_path: str | None, dtype: str | None,
                  isolate: bool, show_all: bool | None, plot_path: str | None, only: str | None = None,
                  last_only: bool = False, as_json: bool = False) -> int:
    """Read a dump (or every rank's, for a glob), compare it with the reference (recomputed, or a
    --reference dump), print the table or the JSON; returns the verdict's exit status."""
    from ..dump import read_dump, read_dumps
    from ..oracle import check_dump, load_reference, model_sha256
    from ..report import plot_errors, report_data

    if reference_path is not None and (model_path is not None or isolate):
        raise click.UsageError("--reference replaces --model; --isolate needs the model (it recomputes each "
                               "layer from the dump's inputs), so give --model instead")
    theirs = read_dumps(against)
    reference = read_dump(reference_path) if reference_path is not None else None
    model = sha = None
    if reference is None:
        model = load_reference(model_path, calls=len(theirs.steps), mapped=mapped_choice())   # float64
        sha = model_sha256(model_path)
    with reading_progress(model, "reference"):          # a bar only for a mapped model
        report = check_dump(theirs, model, reference, isolate=isolate, dtype=dtype, model_sha256=sha, only=only,
                            last_only=last_only, default_model=model_path is None and reference is None)
    if as_json:
        click.echo(json.dumps(report_data(report), indent=1))
    else:
        ids = [st.input_ids if st.input_ids is not None else reference.steps[s].input_ids
               for s, st in enumerate(theirs.steps)]
        more = f", then {len(ids) - 1} decode steps" if len(ids) > 1 else ""
        click.echo(f"{ids[0].shape[1]} tokens" + (f" x {ids[0].shape[0]} sequences" if ids[0].shape[0] > 1 else "")
                   + more)
        click.echo()
        show(report, show_all)
    if plot_path:
        plot_errors([report], plot_path)
        if not as_json:
            click.echo(f"plot: {plot_path}")
    return report.exit_code


@click.command(name="trace", help="Write every activation of the NumPy reference to a safetensors file "
               "(--out), under npllama's trace names, with input_ids and metadata, for the prefill and "
               "--decode N greedy steps through the KV cache; or check someone's file of activations against "
               "the reference (--against THEIRS.safetensors): the parity table, verdict and exit status of "
               "`npllama parity --against` (0 a pass covering the residual stream and the logits, 1 a break, "
               "2 bad input, 3 too little compared). docs/parity.md has the schema, docs/porting.md a walk-through.")
@model_option
@click.option("--prompt", "-p", default=None,
              help="The text to run (default: a sentence of a few dozen tokens about Paris).")
@click.option("--ids", default=None, metavar="IDS.json|1,2,3",
              help="Token ids instead of a prompt: a JSON list (or list of lists, a batch), or comma-separated.")
@click.option("--out", "-o", "out", default=None, metavar="REF.safetensors",
              help="Write the reference's activations here (missing folders are made; a symbolic link is "
                   "followed; a device, FIFO or folder is refused).")
@click.option("--decode", type=click.IntRange(min=0, max=4096), default=0, show_default=True, metavar="N",
              help="With --out: after the prefill, N greedy decode steps through the KV cache, each a step "
                   "of the dump (step.1. ... step.N.).")
@click.option("--dtype", type=click.Choice(["float64", "float32", "bfloat16", "float16"]), default=None,
              help="With --out: the reference's dtype, float64 (default) or float32. With --against: the "
                   "dtype THEIRS computed in, whose bars judge it (default: the dtype it declares where its "
                   "values bear it out, else the dtype its tensors are stored in).")
@click.option("--against", default=None, type=click.Path(dir_okay=False), metavar="THEIRS.safetensors",
              help="Check this file of activations (any subset of the trace names, plus input_ids); a quoted "
                   "glob ('dump.rank*.safetensors') reads every rank of a tensor-parallel run.")
@reference_option
@click.option("--isolate", is_flag=True,
              help="With --against: run each layer of the reference from THEIRS' own input to it, so errors "
                   "do not carry over between layers (tighter 'layer' tolerances; for half precision).")
@verdict_options
@view_option
@click.option("--plot", "plot_path", default=None, metavar="FILE.png", help="With --against: draw the error of each op by layer.")
def trace_command(model_path, prompt, ids, out, decode, dtype, against, reference_path, isolate, only, last_only,
                  as_json, show_all, plot_path):
    from ..io import check_writable

    if (out is None) == (against is None):
        raise click.UsageError("give --out REF.safetensors (write the reference's activations) or "
                               "--against THEIRS.safetensors (check them), one of the two")
    if against is not None:
        if prompt is not None or ids is not None or decode:
            raise click.UsageError("--against runs on the file's own input_ids and steps; --prompt, --ids and "
                                   "--decode are for --out")
        if plot_path:
            check_writable(plot_path)                  # before the comparison, not after it
        sys.exit(check_against(against, model_path, reference_path, dtype, isolate, show_all, plot_path,
                               only, last_only, as_json))
    for flag, given in (("--reference", reference_path), ("--isolate", isolate), ("--plot", plot_path),
                        ("--only", only), ("--last-only", last_only), ("--json", as_json)):
        if given:
            raise click.UsageError(f"{flag} goes with --against")
    if dtype not in (None, "float64", "float32"):
        raise click.UsageError(f"--dtype {dtype}: the NumPy reference computes in float64 or float32")
    write_reference(model_path, prompt, ids, out, dtype or "float64", decode)


def write_reference(model_path, prompt, ids, out, dtype: str, decode: int = 0) -> None:
    from .. import __version__
    from ..io import check_writable
    from ..oracle import (TRACE_PROMPT, check_window, describe, dump_metadata, load_reference, model_sha256,
                          trace_steps, write_steps)
    from ..weights import DEFAULT_FILE

    if ids is not None and prompt is not None:
        raise click.UsageError("give --prompt or --ids, not both")
    if prompt == "":
        raise click.UsageError("--prompt is empty: give some text to run")
    ids = parse_ids(ids) if ids is not None else None
    check_writable(out)                                # before the slow load: the folders --out needs are made
    # loaded as `--against` loads its reference, so a dump checked against itself is exact
    model = load_reference(model_path, decode + 1, mapped_choice(), dtype)
    what = "--ids" if ids is not None else "the prompt"
    if ids is None:
        prompt = TRACE_PROMPT if prompt is None else prompt
        if model.tokenizer is None:
            raise InputError("this checkpoint has no tokenizer: pass --ids")
        ids = model.tokenizer.encode(prompt)
    ids = model.check_ids(ids)
    check_window(model, ids.shape[1] + decode, f"{what}{f' and --decode {decode}' if decode else ''}")
    from ..memory import check_call_fits, model_is_mapped, trace_bytes
    check_call_fits(model, f"tracing {ids.shape[1]} tokens x {ids.shape[0]} in {dtype}",
                    trace_bytes(model.config, *ids.shape, dtype, model_is_mapped(model)), "trace fewer tokens")
    with reading_progress(model, "trace"):              # a bar only for a mapped model
        steps = trace_steps(model, ids, decode)
    meta = dump_metadata(dtype, f"npllama {__version__}, the NumPy reference", prompt=prompt,
                         model=Path(model_path).name if model_path else DEFAULT_FILE,
                         model_sha256=model_sha256(model_path), rotary_dim=model.config.rotary_dim,
                         steps=len(steps))
    write_steps(out, steps, meta)
    click.echo(describe(out, steps))
