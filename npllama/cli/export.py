"""``npllama export``: a model's weights in the layout a port loads (npllama.export)."""

from __future__ import annotations

import os

import click

from .options import mapped_choice, model_option


@click.command(name="export", help="Write a model's weights as safetensors in the layout a port loads: Meta's "
               "(names as in Meta's model.py, interleaved rotary rows of wq and wk, output.weight even when tied; "
               "with params.json) or Hugging Face's (with config.json and the tokenizer). A README.md in the "
               "folder says what is where (docs/porting.md).")
@model_option
@click.option("--layout", type=click.Choice(["meta", "hf"]), required=True,
              help="meta: Meta's names and rotary layout; hf: transformers' LlamaForCausalLM.")
@click.option("--out", "-o", "out", required=True, type=click.Path(file_okay=False), metavar="DIR",
              help="The folder to write (new or empty).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
              help="The weights' dtype in the file (a quantized file is dequantized).")
@click.option("--force", is_flag=True, help="Write into DIR even if it holds files (an earlier export's are replaced).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def export_command(model_path, layout, out, dtype, force, quiet):
    from ..export import WEIGHTS_FILE, check_out, export

    check_out(out, force)                    # before the slow load
    folder = export(model_path, out, layout=layout, dtype=dtype, force=force, progress=not quiet,
                    mapped=mapped_choice())
    size = os.path.getsize(folder / WEIGHTS_FILE)
    others = sorted(p.name for p in folder.iterdir() if p.name != WEIGHTS_FILE and not p.name.startswith("."))
    click.echo(f"wrote {folder}: {WEIGHTS_FILE} ({layout} layout, {dtype}, {size / 2**20:.1f} MiB), {', '.join(others)}")
