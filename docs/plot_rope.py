"""Draw docs/rope_variants.png: each rotary variant's wavelengths against the frequency index.

    .venv/bin/python docs/plot_rope.py [output.png]

Every curve comes from npllama.rope_scaling.rope_init, the same table the model uses. The example head
is Llama 3's: head_dim 128, rope_theta 500000, trained on 8192 positions, extended by 8.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from npllama.config import ModelArgs  # noqa: E402
from npllama.io import atomic_write  # noqa: E402
from npllama.rope_scaling import rope_init  # noqa: E402

HEAD_DIM, THETA, OLD_CTX, FACTOR = 128, 500000.0, 8192, 8.0

VARIANTS = [  # (label, rope_scaling, seq_len the table is built for)
    ("default", {"rope_type": "default"}, OLD_CTX),
    ("linear (factor 8)", {"rope_type": "linear", "factor": FACTOR}, OLD_CTX),
    ("dynamic (factor 8), L = 16K", {"rope_type": "dynamic", "factor": FACTOR}, 2 * OLD_CTX),
    ("dynamic (factor 8), L = 64K", {"rope_type": "dynamic", "factor": FACTOR}, 8 * OLD_CTX),
    ("llama3 (factor 8, low 1, high 4)", {"rope_type": "llama3", "factor": FACTOR, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": OLD_CTX}, OLD_CTX),
    ("yarn (factor 8, beta 32 / 1)", {"rope_type": "yarn", "factor": FACTOR,
                                      "original_max_position_embeddings": OLD_CTX}, OLD_CTX),
]


def args_for(rope_scaling: dict) -> ModelArgs:
    # dynamic NTK's threshold is max_position_embeddings: the trained length here
    return ModelArgs(dim=HEAD_DIM * 32, n_layers=1, n_heads=32, n_kv_heads=8, vocab_size=2, hidden_dim=1,
                     rope_theta=THETA, rope_scaling=rope_scaling, max_seq_len=OLD_CTX)


def main(out: Path) -> None:
    fig, (ax_w, ax_r) = plt.subplots(1, 2, figsize=(13, 5), constrained_layout=True)
    default = rope_init(args_for({"rope_type": "default"}), OLD_CTX)[0]
    index = np.arange(HEAD_DIM // 2)
    styles = ["-", "--", "-.", ":", "-", "--"]
    for (label, rope, seq_len), ls in zip(VARIANTS, styles):
        inv_freq, scaling = rope_init(args_for(rope), seq_len)
        if scaling != 1.0:
            label += f", attention factor {scaling:.3f}"
        ax_w.plot(index, 2 * math.pi / inv_freq, ls, lw=1.8, label=label)
        ax_r.plot(index, default / inv_freq, ls, lw=1.8, label=label)

    for ax in (ax_w, ax_r):
        ax.set_yscale("log")
        ax.set_xlabel("frequency index i (channels i and i + 64 of a 128-wide head)")
        ax.grid(True, which="both", alpha=0.25)
    ax_w.axhline(OLD_CTX, color="k", lw=0.8)
    ax_w.text(1, OLD_CTX * 1.3, "trained context 8192", fontsize=8)
    ax_w.axhline(OLD_CTX / 4, color="grey", lw=0.6, ls=":")
    ax_w.text(1, OLD_CTX / 4 * 1.3, "llama3: old_ctx / high_freq_factor", fontsize=8, color="grey")
    ax_w.set_ylabel("wavelength 2 pi / theta_i  (positions per turn)")
    ax_w.set_title("Wavelengths (head_dim 128, rope_theta 500000)")
    ax_r.set_ylabel("theta_i(default) / theta_i(variant)  (how much slower)")
    ax_r.set_title("Slow-down against the default table")
    ax_r.legend(fontsize=8, loc="upper left")

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out) as f:                 # never leave a half-written file
        fig.savefig(f, format="png", dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "rope_variants.png")
