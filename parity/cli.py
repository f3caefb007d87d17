"""The Torch backend's commands, which npllama's command line finds as plug-ins.

``npllama parity`` (the per-op comparison, report.py) and ``npllama train`` (train.py) are declared
in the entry-point group ``npllama.commands``; npllama itself never imports them.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import click
import torch

from npllama.io import atomic_write

from .report import (DEFAULT_PROMPT, NotComparable, format_table, parity_report, plot_errors, reference_of,
                     transformers_report)
from .train import TrainConfig, setup, sample_text, summary, train


@click.command(name="parity", help="Run a prompt through the NumPy reference and the Torch backend; "
                                   "compare every op. Exits 1 when an op breaks its dtype's tolerance.")
@click.option("--model", "-m", "model_path", default=None, metavar="PATH",
              help="A Hugging Face folder, a Meta folder, or a .gguf file (default: SmolLM2-135M-Instruct).")
@click.option("--device", default="cpu", show_default=True, help="Torch device: cpu, cuda, cuda:1 ...")
@click.option("--dtype", type=click.Choice(["float32", "float64", "bfloat16", "float16"]), default="float32",
              show_default=True, help="The Torch backend's dtype (the reference is npllama in float64).")
@click.option("--prompt", "-p", default=DEFAULT_PROMPT, show_default=True, help="The text to run.")
@click.option("--ids", default=None, metavar="1,2,3", help="Token ids instead of a prompt (comma-separated).")
@click.option("--attention", type=click.Choice(["auto", "naive", "flash", "sdpa"]), default="auto",
              show_default=True, help="The Torch attention implementation.")
@click.option("--isolate", is_flag=True,
              help="Run each layer from the reference's input to it, so errors do not carry over "
                   "between layers (tighter 'layer' tolerances; best to find a bug in half precision).")
@click.option("--transformers", "with_hf", is_flag=True,
              help="Also compare transformers' LlamaForCausalLM (same weights, dtype and device).")
@click.option("--plot", "plot_path", default=None, metavar="FILE.png", help="Draw the error of each op by layer.")
@click.option("--weights", type=click.Choice(["float32", "int8", "int4", "gguf"]), default="float32",
              show_default=True, help="Quantized kernels: their error on their own weights, then what "
                                      "quantization costs against the float checkpoint (docs/quantization.md).")
def parity_command(model_path, device, dtype, prompt, ids, attention, isolate, with_hf, plot_path, weights):
    import npllama
    import parity

    torch_dtype, torch_device = parity.resolve_dtype(dtype), parity.resolve_device(device)
    if ids is not None:
        try:
            ids = [int(t) for t in ids.split(",") if t.strip()]
        except ValueError:
            raise click.UsageError(f"--ids must be comma-separated integers, got {ids!r}") from None
    elif not prompt:
        raise click.UsageError("--prompt is empty: give some text to run")
    if weights != "float32":
        from .quant_report import quant_parity
        text, ok = quant_parity(model_path, torch_device, torch_dtype, weights, prompt, ids, attention, isolate)
        click.echo(text)
        sys.exit(0 if ok else 1)
    base = npllama.load(model_path, progress=False)
    if ids is None:
        if base.tokenizer is None:
            raise click.UsageError("this checkpoint has no tokenizer: pass --ids")
        ids = base.tokenizer.encode(prompt)
    model = parity.from_numpy(base, device=torch_device, dtype=torch_dtype)
    del base
    reference = reference_of(model)
    ids = reference.check_ids(ids)
    reports = [parity_report(model, ids, attention, reference, isolate=isolate)]
    if with_hf:
        try:
            reports.append(transformers_report(model, ids, reference))
        except NotComparable as e:
            click.echo(f"transformers: not compared: {e}", err=True)
    click.echo(f"{ids.shape[1]} tokens")
    for report in reports:
        click.echo()
        click.echo(format_table(report))
    if plot_path:
        plot_errors(reports, plot_path)
        click.echo(f"plot: {plot_path}")
    if not all(r.ok for r in reports):
        sys.exit(1)


D = TrainConfig()   # the command line's defaults


@click.command(name="train", help="Train a model on a text file with the Torch backend. A fresh model comes from "
               "--config (a Hugging Face style config.json; the tokenizer sets vocab_size), or start from a "
               "checkpoint's weights with --init (e.g. uptraining a model `npllama convert` made). Checkpoints "
               "land in OUT/step-*/ (Hugging Face folders; OUT/latest points to the newest); --resume continues "
               "OUT's run where it stopped, to the same result.")
@click.option("--data", type=click.Path(dir_okay=False), help="UTF-8 text file to train on.")
@click.option("--valid", type=click.Path(exists=True, dir_okay=False),
              help="Held-out text for the evaluation loss (default: the last 5% of --data).")
@click.option("--config", "config", type=click.Path(dir_okay=False), help="Model config JSON (fresh weights).")
@click.option("--init", "init", type=click.Path(exists=True), help="Checkpoint whose weights to start from.")
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
@click.option("--minutes", type=float, default=None,
              help="Fit --steps to this wall-time budget (measured a few steps in; the whole command, "
                   "tokenizer and sample included, ends within it).")
@click.option("--time-limit", type=float, default=None, help="Stop (and save) after this many minutes.")
@click.option("--sample-prompt", default="\n", show_default="a newline", help="Prompt of the sample printed at the end.")
@click.option("--sample-tokens", type=int, default=200, show_default=True, help="Tokens to sample at the end (0: none).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.pass_context
def train_command(ctx, data, valid, config, init, out, resume, tokenizer, vocab_size, minutes, time_limit,
                  sample_prompt, sample_tokens, quiet, device, **hyper):
    started = time.perf_counter()
    threads = os.environ.get("NPLLAMA_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
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
    train(run, time_limit=None if time_limit is None else time_limit * 60, minutes=minutes, started=started,
          progress=not quiet, log=click.echo)
    click.echo(summary(run))
    if sample_tokens > 0:
        text = sample_text(run, sample_prompt.replace("\\n", "\n"), sample_tokens)
        with atomic_write(run.out / "samples.txt", "w") as f:
            f.write(text + "\n")
        click.echo("---- sample (temperature 0.8, top-p 0.95) ----")
        click.echo(text)
        click.echo("----")
    click.echo(f"checkpoint: {run.out / 'latest'}   loss curve: {run.out / 'loss.png'}")
