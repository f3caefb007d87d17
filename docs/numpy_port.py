"""A port of the LLaMA decoder to plain NumPy, written the way llama3.np and Meta's model.py write
it, with a KV cache and greedy decoding: the NumPy port that docs/porting.md checks step by step.

    python docs/numpy_port.py --model tiny-llama --ids ref.safetensors --out numpy.safetensors \\
        [--decode 8] [--dtype float32|float64] [--last-only] [--bug position|mask|eps|half-weights|k-heads]

It shares no code with npllama's maths: Meta's names and interleaved wq / wk rows (permuted on
load from npllama's rotate-half state_dict), rotary pairs (2i, 2i+1) as complex numbers, its own
cache written at start_pos and one forward call per step. Only the weights come from npllama.load,
and the dump goes through npllama.oracle: each function reports what it computes with
``record(name, x)``, which does nothing unless a ``Recorder`` is open, and ``rec.step()`` between
forward calls makes each call a step of the dump.

--bug plants a classic porting bug: position (a decode step rotated at start_pos + 1), mask (a
decode query cannot see its own key), eps (the last layer's ffn_norm with eps 1e-6 for 1e-5: float32
cannot see it, float64 can), half-weights (wq / wk rows left in the rotate-half layout), k-heads
(wk permuted with n_heads instead of n_kv_heads).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from npllama.oracle import Recorder, record

BUGS = ("position", "mask", "eps", "half-weights", "k-heads")


def permute_to_interleaved(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of wq / wk from rotate-half [r0 r1 ... i0 i1 ...] to Meta's [r0 i0 r1 i1 ...], head by head."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def kept(name: str, x: np.ndarray) -> np.ndarray:
    """Report x under its trace name, and go on with it."""
    record(name, x)
    return x


class Llama:
    """The model. dtype: float32 or float64, every product in it; bugs: a set of BUGS."""

    def __init__(self, params: dict, config, dtype=np.float32, bugs=(), max_seq_len: int = 256):
        c, self.c, self.dtype, self.bugs = config, config, np.dtype(dtype), set(bugs)
        self.w = {k: np.asarray(v, dtype=self.dtype) for k, v in params.items()}
        for i in range(c.n_layers):                # Meta's layout: interleaved q / k rows
            if "half-weights" not in self.bugs:
                q, k = f"layers.{i}.attention.wq.weight", f"layers.{i}.attention.wk.weight"
                self.w[q] = permute_to_interleaved(self.w[q], c.n_heads)
                self.w[k] = permute_to_interleaved(self.w[k], c.n_heads if "k-heads" in self.bugs else c.n_kv_heads)
        self.freqs = 1.0 / c.rope_theta ** (np.arange(0, c.head_dim, 2) / c.head_dim)     # (head_dim / 2,)
        shape = (c.n_layers, 1, max_seq_len, c.n_kv_heads, c.head_dim)                    # one sequence
        self.cache_k, self.cache_v = np.zeros(shape, self.dtype), np.zeros(shape, self.dtype)

    def rms_norm(self, x, weight, eps):
        return (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)).astype(self.dtype) * weight

    def rotate(self, x, cis):
        """x: (batch, seq, heads, head_dim), pairs (2i, 2i+1) as complex numbers times cis (seq, head_dim / 2)."""
        pairs = x.reshape(*x.shape[:-1], -1, 2)
        z = (pairs[..., 0] + 1j * pairs[..., 1]) * cis[None, :, None, :]
        return np.stack([z.real, z.imag], axis=-1).reshape(x.shape).astype(self.dtype)

    def forward(self, ids: np.ndarray, start_pos: int, last_only: bool = False) -> np.ndarray:
        """ids: (1, seq), the tokens after the start_pos cached ones -> logits (1, seq, vocab) float32."""
        c, w, hd = self.c, self.w, self.c.head_dim
        b, seq = ids.shape
        record("input_ids", ids)
        h = kept("tok_embeddings", w["tok_embeddings.weight"][ids])                        # (b, seq, dim)
        pos = start_pos + np.arange(seq) + (1 if "position" in self.bugs and start_pos > 0 else 0)
        cis = np.exp(1j * np.outer(pos, self.freqs))
        query, key = start_pos + np.arange(seq), np.arange(start_pos + seq)
        visible = key[None] <= query[:, None]
        if "mask" in self.bugs and start_pos > 0:
            visible = key[None] < query[:, None]
        mask = np.where(visible, 0.0, -np.inf).astype(self.dtype)                          # (seq, kv_len)
        rep = c.n_heads // c.n_kv_heads
        for i in range(c.n_layers):
            p = f"layers.{i}."
            x = kept(p + "attention_norm", self.rms_norm(h, w[p + "attention_norm.weight"], c.norm_eps))
            xq = (x @ w[p + "attention.wq.weight"].T).reshape(b, seq, c.n_heads, hd)
            xk = (x @ w[p + "attention.wk.weight"].T).reshape(b, seq, c.n_kv_heads, hd)
            xv = (x @ w[p + "attention.wv.weight"].T).reshape(b, seq, c.n_kv_heads, hd)
            xq, xk = self.rotate(xq, cis), self.rotate(xk, cis)
            for name, t in (("q", xq), ("k", xk), ("v", xv)):
                record(p + "attention." + name, t.transpose(0, 2, 1, 3))                # (b, heads, seq, hd)
            self.cache_k[i, :, start_pos:start_pos + seq] = xk
            self.cache_v[i, :, start_pos:start_pos + seq] = xv
            keys = np.repeat(self.cache_k[i, :, :start_pos + seq], rep, axis=2).transpose(0, 2, 1, 3)
            values = np.repeat(self.cache_v[i, :, :start_pos + seq], rep, axis=2).transpose(0, 2, 1, 3)
            scores = xq.transpose(0, 2, 1, 3) @ keys.transpose(0, 1, 3, 2) / self.dtype.type(np.sqrt(hd)) + mask
            e = np.exp(scores - scores.max(axis=-1, keepdims=True))
            out = kept(p + "attention.scores_v", e / e.sum(axis=-1, keepdims=True) @ values)
            a = kept(p + "attention", out.transpose(0, 2, 1, 3).reshape(b, seq, -1) @ w[p + "attention.wo.weight"].T)
            h = kept(p + "attention_residual", h + a)
            eps = 1e-6 if "eps" in self.bugs and i == c.n_layers - 1 else c.norm_eps
            y = kept(p + "ffn_norm", self.rms_norm(h, w[p + "ffn_norm.weight"], eps))
            gate, up = y @ w[p + "feed_forward.w1.weight"].T, y @ w[p + "feed_forward.w3.weight"].T
            f = kept(p + "feed_forward", (gate / (1 + np.exp(-gate)) * up) @ w[p + "feed_forward.w2.weight"].T)
            h = kept(p + "ffn_residual", h + f)
        h = kept("norm", self.rms_norm(h, w["norm.weight"], c.norm_eps))
        if last_only:
            h = h[:, -1:]
        head = w.get("output.weight", w["tok_embeddings.weight"])
        return kept("logits", (h @ head.T).astype(np.float32))


def generate(model: Llama, prompt: np.ndarray, decode: int, last_only: bool = False) -> Recorder:
    """The prefill and `decode` greedy steps, each forward call one step of the recorder."""
    with Recorder() as rec:
        logits = model.forward(prompt, 0, last_only)
        pos = prompt.shape[1]
        for _ in range(decode):
            rec.step()
            token = np.argmax(logits[:, -1], axis=-1)[:, None]
            logits = model.forward(token, pos, last_only)
            pos += 1
    return rec


def read_ids(value: str) -> np.ndarray:
    """--ids: a dump's input_ids (REF.safetensors), a JSON list, or comma-separated ids -> (1, seq)."""
    if value.endswith(".safetensors"):
        from safetensors.numpy import load_file
        return load_file(value)["input_ids"]
    ids = json.loads(Path(value).read_text()) if Path(value).is_file() else [int(t) for t in value.split(",")]
    return np.array([ids])


def main() -> None:
    import npllama

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, metavar="DIR", help="the checkpoint to run (any npllama reads)")
    parser.add_argument("--ids", required=True, help="REF.safetensors (its input_ids), a JSON file, or 1,2,3")
    parser.add_argument("--out", required=True, metavar="FILE", help="where to write the dump")
    parser.add_argument("--decode", type=int, default=0, help="greedy decode steps after the prefill")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--last-only", action="store_true", help="compute the last position's logits only")
    parser.add_argument("--bug", choices=BUGS, help="plant a porting bug")
    a = parser.parse_args()
    loaded = npllama.load(a.model, progress=False)
    model = Llama(loaded.state_dict(), loaded.config, a.dtype, [a.bug] if a.bug else [])
    rec = generate(model, read_ids(a.ids), a.decode, a.last_only)
    rec.save(a.out, dtype=a.dtype, rotary_layout="interleaved", producer="numpy_port.py, llama3.np style",
             logits_positions="last" if a.last_only else "all")
    n = len(rec.steps)
    print(f"wrote {a.out}: {n} step{'' if n == 1 else 's'}")


if __name__ == "__main__":
    main()
