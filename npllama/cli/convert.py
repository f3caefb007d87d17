"""``npllama convert``: mean-pool a checkpoint's key/value heads (npllama.convert) and write the result."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import CheckpointError
from .options import mapped_choice, model_option


@click.command(name="convert", help="Convert a checkpoint to grouped-query (or multi-query) attention: "
               "the key and value heads of each group are mean-pooled into one (GQA, Ainslie et al. "
               "2023). Writes a Hugging Face folder that npllama, its Torch backend and transformers load.")
@model_option
@click.option("--kv-heads", "-g", "kv_heads", type=click.IntRange(min=1), required=True,
              help="Key/value heads of the result: 1 is MQA; the model's own count changes nothing.")
@click.option("--out", "-o", "out", required=True, type=click.Path(file_okay=False),
              help="Output folder (config.json + model.safetensors + tokenizer files).")
@click.option("--overwrite", is_flag=True, help="Replace the output folder if it exists.")
def convert(model_path, kv_heads, out, overwrite):
    from ..convert import convert_kv_heads
    from ..formats import load
    from ..formats.hf import save_checkpoint
    from ..io import check_writable

    if Path(out).exists() and not overwrite and (not Path(out).is_dir() or any(Path(out).iterdir())):
        raise CheckpointError(f"{out} already exists and is not empty; choose a new output folder "
                              f"(or pass --overwrite)")
    check_writable(out, folder=True)          # before the slow load
    model = load(model_path, mapped=mapped_choice())
    args = model.config
    new_args, params = convert_kv_heads(args, model.state_dict(), kv_heads)
    folder = save_checkpoint(out, new_args, params, tokenizer_from=model_path, tokenizer=model.tokenizer,
                             overwrite=overwrite)
    kind = "MHA" if kv_heads == args.n_heads else ("MQA" if kv_heads == 1 else f"GQA-{kv_heads}")
    click.echo(f"{folder}: {args.n_heads} query heads, {args.n_kv_heads} -> {kv_heads} key/value heads "
               f"({kind}); {sum(a.size for a in params.values()):,} parameters")
