"""The GQA paper's experiment, small: perplexity of an MHA model, of its GQA and MQA conversions
straight after mean-pooling, and after a short uptraining of each (Ainslie et al. 2023, fig. 3-5).

    python docs/gqa_experiment.py --base runs/tiny/latest --out runs/gqa --uptrain-steps 40

Every step is an `npllama` command (printed as it runs), so the table can be rebuilt by hand:
`npllama convert` mean-pools, `npllama train --init` uptrains, `npllama eval` measures perplexity on
the held-out play. The MHA row is uptrained for the same steps too, so that the recovery of the
converted models is not mistaken for the extra training itself. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def npllama(*args: str) -> str:
    cmd = [sys.executable, "-m", "npllama.cli", *args]
    print("$ npllama " + " ".join(shlex.quote(a) for a in args), file=sys.stderr, flush=True)
    done = subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.PIPE, text=True)
    return done.stdout


def perplexity(model: Path, data: str, backend: str) -> float:
    return json.loads(npllama("eval", "-m", str(model), "--data", data, "--backend", backend, "--json"))["perplexity"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", type=Path, default=ROOT / "runs/tiny/latest", help="the trained MHA checkpoint")
    p.add_argument("--out", type=Path, default=ROOT / "runs/gqa")
    p.add_argument("--data", default="data/shakespeare_train.txt")
    p.add_argument("--valid", default="data/shakespeare_valid.txt")
    p.add_argument("--kv-heads", default="8,4,2,1", help="kv head counts, the base's own first")
    p.add_argument("--uptrain-steps", type=int, default=40)
    p.add_argument("--lr", default="6e-4")
    p.add_argument("--backend", default="torch", help="eval backend (numpy gives the same to 1e-5)")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    base_cfg = json.loads((a.base / "config.json").read_text())
    layers, heads, head_dim = base_cfg["num_hidden_layers"], base_cfg["num_attention_heads"], base_cfg["head_dim"]
    rows = []
    for g in [int(x) for x in a.kv_heads.split(",")]:
        name = "MHA" if g == heads else ("MQA" if g == 1 else f"GQA-{g}")
        conv = a.out / f"kv{g}"
        if not (conv / "config.json").exists():
            npllama("convert", "-m", str(a.base), "--kv-heads", str(g), "-o", str(conv))
        pooled = perplexity(conv, a.valid, a.backend)
        up = a.out / f"kv{g}-uptrained"
        start = time.perf_counter()
        if not (up / "latest").exists():
            npllama("train", "--init", str(conv), "--data", a.data, "--valid", a.valid, "--out", str(up),
                    "--steps", str(a.uptrain_steps), "--lr", a.lr, "--min-lr", "6e-5", "--warmup", "5",
                    "--eval-every", "0", "--save-every", "0", "--sample-tokens", "0", "-q")
        minutes = (time.perf_counter() - start) / 60
        uptrained = perplexity(up / "latest", a.valid, a.backend)
        kv_bytes = 2 * layers * g * head_dim * 4
        rows.append((name, g, kv_bytes, pooled, uptrained, minutes))
        print(f"{name}: pooled {pooled:.2f}, uptrained {uptrained:.2f} ({minutes:.1f} min)", file=sys.stderr)
    print(f"| attention | kv heads | KV cache / token (float32) | perplexity after mean-pooling | "
          f"after uptraining {a.uptrain_steps} steps | uptraining time |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, g, kv_bytes, pooled, uptrained, minutes in rows:
        print(f"| {name} | {g} | {kv_bytes:,} B | {pooled:.2f} | {uptrained:.2f} | {minutes:.1f} min |")


if __name__ == "__main__":
    main()
