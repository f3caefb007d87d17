"""The Torch backend's commands, which npllama's command line finds as plug-ins.

``npllama parity`` (the per-op comparison, report.py) and ``npllama train`` (train.py) are declared
in the entry-point group ``npllama.commands``; npllama itself never imports them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
import time

import click
import numpy as np
import torch

from npllama.cli import STARTED
from npllama.cli.interrupts import ctrl_c_remembered
from npllama.cli.options import mapped_choice, model_option, run_checkpoint
from npllama.cli.trace import check_against, parse_ids, reference_option, show, verdict_options, view_option
from npllama.io import atomic_write

from .report import DEFAULT_PROMPT, NotComparable, parity_report, plot_errors, reference_of, transformers_report
from .train import TrainConfig, interrupted_message, setup, sample_text, summary, train


@click.command(name="parity", help="Run a prompt through the NumPy reference and the Torch backend; "
                                   "compare every op. With --against THEIRS.safetensors, compare a file of "
                                   "anyone's activations instead (docs/porting.md). Exits 1 when an op breaks "
                                   "its dtype's tolerance.")
@model_option
@click.option("--device", default="cpu", show_default=True, help="Torch device: cpu, cuda, cuda:1 ...")
@click.option("--dtype", type=click.Choice(["float32", "float64", "bfloat16", "float16"]), default="float32",
              show_default=True, help="The Torch backend's dtype (the reference is npllama in float64). With "
                                      "--against: the dtype THEIRS computed in, whose bars judge it (default: "
                                      "the one it declares where its values bear it out, else its stored one).")
@click.option("--prompt", "-p", default=DEFAULT_PROMPT, show_default=True, help="The text to run.")
@click.option("--ids", default=None, metavar="IDS.json|1,2,3",
              help="Token ids instead of a prompt: comma-separated, or a JSON file (a list, or a list of lists).")
@click.option("--attention", type=click.Choice(["auto", "naive", "flash", "sdpa"]), default="auto",
              show_default=True, help="The Torch attention implementation.")
@click.option("--isolate", is_flag=True,
              help="Run each layer from the reference's input to it (with --against: from THEIRS' own input to "
                   "it), so errors do not carry over between layers (tighter 'layer' tolerances; best to find "
                   "a bug in half precision).")
@click.option("--transformers", "with_hf", is_flag=True,
              help="Also compare transformers' LlamaForCausalLM (same weights, dtype and device).")
@click.option("--against", default=None, type=click.Path(dir_okay=False), metavar="THEIRS.safetensors",
              help="Compare this file of activations (npllama's trace names, any subset, plus input_ids; its "
                   "decode steps, if any) with the reference recomputed on its input_ids; a quoted glob "
                   "('dump.rank*.safetensors') reads every rank of a tensor-parallel run. Exits 0 on a pass that "
                   "covers the residual stream and the logits, 1 on a break, 2 on bad input, 3 when too little "
                   "was compared (docs/parity.md). `npllama trace --against` does the same without torch.")
@reference_option
@verdict_options
@view_option
@click.option("--plot", "plot_path", default=None, metavar="FILE.png", help="Draw the error of each op by layer.")
@click.option("--weights", type=click.Choice(["float32", "int8", "int4", "gguf"]), default="float32",
              show_default=True, help="Quantized kernels: their error on their own weights, then what "
                                      "quantization costs against the float checkpoint (docs/quantization.md).")
@click.option("--tp", type=click.IntRange(min=1), default=None, metavar="N",
              help="Split the Torch model over N processes (tensor parallelism, started here or by torchrun) and "
                   "compare it op by op, its activations gathered across the ranks; names the rank where it "
                   "parts (docs/tensor_parallel.md).")
@click.pass_context
def parity_command(ctx, model_path, device, dtype, prompt, ids, attention, isolate, with_hf, against, reference_path,
                   only, last_only, as_json, show_all, plot_path, weights, tp):
    import npllama
    import parity

    given = {name for name in ctx.params if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE}
    if tp is not None:
        flags = {"against": "--against", "reference_path": "--reference", "with_hf": "--transformers",
                 "weights": "--weights"}
        clash = [flag for name, flag in flags.items() if name in given]
        if clash:
            raise click.UsageError(f"--tp compares the split Torch model; it does not go with {', '.join(clash)}")
        parity_tp(tp, model_path, device, dtype, prompt, ids, attention, isolate, show_all, plot_path)
        return
    if against is not None:
        sys.exit(against_verdict(given, against, model_path, reference_path, dtype, isolate, only, last_only,
                                 as_json, show_all, plot_path))
    refuse_against_options(reference_path, only, last_only, as_json)
    torch_dtype, torch_device = parity.resolve_dtype(dtype), parity.resolve_device(device)
    ids = check_run_options(plot_path, ids, prompt)
    if weights != "float32":
        from .quant_report import quant_parity
        text, ok = quant_parity(model_path, torch_device, torch_dtype, weights, prompt, ids, attention, isolate)
        click.echo(text)
        sys.exit(0 if ok else 1)
    base = npllama.load(model_path, progress=False, mapped=mapped_choice())   # a large model stays in its files
    if ids is None:
        if base.tokenizer is None:
            raise click.UsageError("this checkpoint has no tokenizer: pass --ids")
        ids = base.tokenizer.encode(prompt)
    ids = base.check_ids(ids)
    check_parity_fits(base, ids.shape, torch_dtype)
    model = parity.from_numpy(base, device=torch_device, dtype=torch_dtype)
    del base
    reference = reference_of(model)
    ids = reference.check_ids(ids)
    from npllama.formats.mapped import reading_progress
    with reading_progress(reference, "reference"):          # a bar only for a mapped model
        reports = [parity_report(model, ids, attention, reference, isolate=isolate)]
    if with_hf:
        try:
            reports.append(transformers_report(model, ids, reference))
        except NotComparable as e:
            click.echo(f"transformers: not compared: {e}", err=True)
    print_reports(reports, ids.shape[1], show_all, plot_path)


def check_parity_fits(base, shape: tuple[int, int], torch_dtype: torch.dtype) -> None:
    """Refuse, before the twin is made, a comparison whose peak would not fit (npllama.memory):
    the twin's weights in its dtype beside the float64 reference's (neither, for weights left in
    their files), and both runs' activations, every one kept for the table."""
    from npllama.memory import check_fits, model_is_mapped, trace_bytes, weight_count
    args, mapped = base.config, model_is_mapped(base)
    weights = 0 if mapped else weight_count(args) * (torch_dtype.itemsize + 8)
    runs = trace_bytes(args, *shape, np.float64, mapped) + trace_bytes(args, *shape, torch_dtype, mapped)
    dtype = str(torch_dtype).removeprefix("torch.")
    check_fits(weights + runs, f"comparing {shape[1]} tokens x {shape[0]} (the twin in {dtype}, the reference in "
                               f"float64, every activation kept)",
               "compare fewer tokens" + ("" if mapped else ", or add --mapped to leave the weights in their files"))


def against_verdict(given: set[str], against: str, model_path, reference_path, dtype, isolate, only, last_only,
                    as_json, show_all, plot_path) -> int:
    """``--against``: anyone's dump judged by the oracle (npllama.cli.trace.check_against); the
    verdict's exit status (0 pass, 1 break, 3 too little compared; bad input exits 2 on its own)."""
    clash = sorted(given & {"device", "prompt", "ids", "attention", "with_hf", "weights"})
    if clash:
        flags = ", ".join("--transformers" if n == "with_hf" else f"--{n}" for n in clash)
        raise click.UsageError(f"--against compares a file of activations on its own input_ids: {flags} "
                               f"belong to the Torch comparison")
    return check_against(against, model_path, reference_path, dtype if "dtype" in given else None, isolate,
                         show_all, plot_path, only, last_only, as_json)


def refuse_against_options(reference_path, only, last_only, as_json) -> None:
    """The options of a dump's check, given without --against: refused."""
    for flag, value in (("--reference", reference_path), ("--only", only), ("--last-only", last_only),
                        ("--json", as_json)):
        if value:
            raise click.UsageError(f"{flag} goes with --against")


def parity_tp(tp: int, model_path, device, dtype, prompt, ids, attention, isolate, show_all, plot_path) -> None:
    """``npllama parity --tp N``: the model split over N ranks (parity.tp) against npllama in float64.

    Every rank runs the prompt with its part and traces its activations; rank 0 gathers them
    (q, k, v and softmax(qk)v are joined along the heads; the rest every rank holds whole, and each
    rank's copy is checked), prints the table and names the first layer, op and rank that part.
    """
    import npllama
    import parity

    from . import tp as parallel

    torch_dtype, torch_device = parity.resolve_dtype(dtype), parity.resolve_device(device)
    ids = check_run_options(plot_path, ids, prompt)
    rank = parallel.command_rank(tp, torch_device, model_path, "parity")
    if rank == 0:      # the reference needs the whole checkpoint: rank 0 reads it once and keeps its slices
        base = npllama.load(model_path, progress=False)
        model = parallel.from_numpy(base, device=torch_device, dtype=torch_dtype)
    else:
        base, model = None, parity.load(model_path, device=torch_device, dtype=torch_dtype, tp=tp, progress=False)
    if ids is None:
        if model.tokenizer is None:
            raise click.UsageError("this checkpoint has no tokenizer: pass --ids")
        ids = model.tokenizer.encode(prompt)
    report = parallel.parity_report(model, ids, attention, base, isolate)
    if report is None:          # ranks other than 0: rank 0 speaks for the run
        return
    print_reports([report], np.atleast_2d(np.asarray(ids)).shape[1], show_all, plot_path)


def print_reports(reports: list, tokens: int, show_all: bool, plot_path: str | None) -> None:
    """`npllama parity`'s output: the tokens compared, each report's table, the plot; exit 1 when
    an op breaks its tolerance."""
    click.echo(f"{tokens} tokens")
    for report in reports:
        click.echo()
        show(report, show_all)
    if plot_path:
        plot_errors(reports, plot_path)
        click.echo(f"plot: {plot_path}")
    if not all(r.ok for r in reports):
        sys.exit(1)


def check_plot_path(path: str) -> None:
    """--plot needs matplotlib and an existing folder: refused before the run, not after it."""
    if importlib.util.find_spec("matplotlib") is None:
        raise click.UsageError("--plot needs matplotlib, which is not installed (pip install matplotlib)")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise click.UsageError(f"--plot {path}: the folder {folder} does not exist")


D = TrainConfig()   # the command line's defaults
EXIT_SECONDS = 3.0  # kept at the end of a --minutes budget for leaving Python (torch's teardown: 0.5-2.5 s here)


@click.command(name="train", help="Train a model on a text file with the Torch backend. A fresh model comes from "
               "--config (a Hugging Face style config.json; the tokenizer sets vocab_size), or start from a "
               "checkpoint's weights with --init (e.g. uptraining a model `npllama convert` made). Checkpoints "
               "land in OUT/step-*/ (Hugging Face folders; OUT/latest points to the newest); --resume continues "
               "OUT's run where it stopped, to the same result.")
@click.option("--data", type=click.Path(dir_okay=False), help="UTF-8 text file to train on.")
@click.option("--valid", type=click.Path(exists=True, dir_okay=False),
              help="Held-out text for the evaluation loss (default: the last 5% of --data).")
@click.option("--config", "config", type=click.Path(dir_okay=False), help="Model config JSON (fresh weights).")
@click.option("--init", "init", type=click.Path(exists=True), callback=lambda ctx, param, value: run_checkpoint(value),
              help="Checkpoint whose weights to start from (a training run's folder: its newest checkpoint).")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Run folder.")
@click.option("--resume", is_flag=True, help="Continue OUT's latest checkpoint (options given override the saved ones).")
@click.option("--tokenizer", type=click.Path(exists=True, dir_okay=False),
              help="A sentencepiece .model to use (default: the --init checkpoint's, or train one on --data).")
@click.option("--vocab-size", type=int, default=2048, show_default=True, help="Pieces of the tokenizer trained on --data.")
@click.option("--steps", type=int, default=D.steps, show_default=True, help="Optimizer steps (the schedule's length).")
@click.option("--batch-size", type=int, default=D.batch_size, show_default=True, help="Sequences per micro-batch.")
@click.option("--seq-len", type=int, default=D.seq_len, show_default=True, help="Tokens per sequence.")
@click.option("--grad-accum", type=int, default=D.grad_accum, show_default=True, help="Micro-batches per step.")
@click.option("--lr", type=float, default=D.lr, show_default=True, help="Peak learning rate.")
@click.option("--min-lr", type=float, default=D.min_lr, show_default=True, help="Final learning rate of the cosine.")
@click.option("--warmup", type=int, default=D.warmup, show_default=True, help="Linear warm-up steps.")
@click.option("--weight-decay", type=float, default=D.weight_decay, show_default=True)
@click.option("--grad-clip", type=float, default=D.grad_clip, show_default=True, help="Max global gradient norm (0: off).")
@click.option("--seed", type=int, default=D.seed, show_default=True)
@click.option("--dtype", default=D.dtype, show_default=True, help="Master weights: float32 or float64.")
@click.option("--autocast", type=click.Choice(["auto", "bfloat16", "off"]), default=D.autocast, show_default=True,
              help="auto: bfloat16 autocast on CUDA, none on CPU.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option("--eval-every", type=int, default=D.eval_every, show_default=True, help="Steps between evaluations.")
@click.option("--eval-batches", type=int, default=D.eval_batches, show_default=True)
@click.option("--save-every", type=int, default=D.save_every, show_default=True, help="Steps between checkpoints.")
@click.option("--keep", type=int, default=D.keep, show_default=True, help="Checkpoints to keep.")
@click.option("--minutes", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Fit --steps to this wall-time budget (measured a few steps in; the whole command, "
                   "tokenizer, evaluations, checkpoints and sample included, ends within it).")
@click.option("--time-limit", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop (and save) rather than start a step that would end after this many minutes.")
@click.option("--sample-prompt", default="\n", show_default="a newline", help="Prompt of the sample printed at the end.")
@click.option("--sample-tokens", type=click.IntRange(min=0), default=200, show_default=True, help="Tokens to sample at the end (0: none).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.pass_context
def train_command(ctx, data, valid, config, init, out, resume, tokenizer, vocab_size, minutes, time_limit,
                  sample_prompt, sample_tokens, quiet, device, **hyper):
    started = ctx.meta.get(STARTED, time.perf_counter())   # when the command line began: --minutes holds it all
    threads = os.environ.get("NPLLAMA_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    run = None
    try:
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        hyper = {k: v for k, v in hyper.items() if k in fields}
        if resume:
            given = {k: v for k, v in hyper.items()
                     if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE}
            for name in ("data", "valid", "config", "init", "tokenizer", "minutes"):
                if ctx.params.get(name):
                    raise click.UsageError(f"--{name} cannot change on --resume: the run continues on what it began with")
            run = setup(out, resume=True, overrides=given, device=device, log=click.echo)
        else:
            cfg = TrainConfig(**hyper)
            run = setup(out, data, valid, config, init, tokenizer, vocab_size, cfg=cfg, device=device,
                        log=click.echo)
        s = run.state
        click.echo(f"{s['parameters']:,} parameters; {len(run.train_tokens):,} training tokens, "
                   f"{len(run.valid_tokens):,} held out; unigram baseline {s['unigram_loss']:.3f} nats/token; "
                   f"{run.cfg.batch_size * run.cfg.grad_accum * run.cfg.seq_len:,} tokens per step on {run.device}")
        with ctrl_c_remembered() as pressed:
            train(run, time_limit=None if time_limit is None else time_limit * 60, minutes=minutes,
                  started=started, progress=not quiet, log=click.echo, interrupted=pressed)
        click.echo(summary(run))
        if sample_tokens > 0:
            until = None if minutes is None else started + minutes * 60 - EXIT_SECONDS
            text = sample_text(run, sample_prompt.replace("\\n", "\n"), sample_tokens, until=until)
            with atomic_write(run.out / "samples.txt", "w") as f:
                f.write(text + "\n")
            click.echo("---- sample (temperature 0.8, top-p 0.95) ----")
            click.echo(text)
            click.echo("----")
        click.echo(f"checkpoint: {run.out / 'latest'}   loss curve: {run.out / 'loss.png'}")
    except KeyboardInterrupt:                       # Ctrl-C: say what was kept and how to go on
        click.echo(f"\n{interrupted_message(out, None if run is None else run.step)}", err=True)
        sys.exit(130)


def check_run_options(plot_path, ids, prompt):
    """A comparison's own options, checked before anything loads: the plot's path, and the ids
    (parsed) or the prompt (not empty). Returns the ids, or None to tokenize the prompt."""
    if plot_path:
        check_plot_path(plot_path)
    if ids is not None:
        return parse_ids(ids)
    if not prompt:
        raise click.UsageError("--prompt is empty: give some text to run")
    return None
