"""Training a LLaMA-family model on a text file with the Torch backend (``npllama train``).

The model is parity.model.Transformer, the op-for-op twin of npllama's, so the loss it reports is
npllama.model.cross_entropy_loss of the same batch (tests/test_train.py holds the two equal). The
recipe is the usual one for small decoders (nanoGPT, the LLaMA paper's section 2.2, scaled down):

    AdamW (Loshchilov & Hutter 2019), betas (0.9, 0.95), weight decay on matrices only
    learning rate: linear warm-up, then cosine decay to min_lr (Loshchilov & Hutter 2017)
    gradient clipping at global norm 1.0, gradient accumulation over micro-batches
    bfloat16 autocast on CUDA (float32 master weights); plain float32 on the CPU

A run lives in one folder:

    OUT/tokenizer.model            sentencepiece model, trained on the data unless one was given
    OUT/step-000600/               a checkpoint: a Hugging Face folder npllama.load reads
        config.json  model.safetensors  tokenizer.model
        trainer/optimizer.safetensors   AdamW moments + step, torch's RNG state
        trainer/state.json              step, hyper-parameters, data files, loss history
    OUT/latest -> step-000600      symbolic link to the newest checkpoint
    OUT/loss.png                   the loss curve (train, eval, unigram baseline)
    OUT/samples.txt                text sampled from the final model

Checkpoints are written whole under a temporary name and renamed into place
(npllama.io.write_folder), so a crash or a kill mid-write leaves the previous one intact;
resuming takes the newest complete ``step-*`` folder. Runs are deterministic on the CPU: the
initial weights come from npllama.params.init_params(seed), and the batch of step s, micro-batch m is
a pure function of (seed, s, m) (windows at offsets drawn by numpy's PCG64 seeded with [seed, s, m]),
so there is no data-loader state to save; the learning rate is a pure function of the step. A run
resumed from step k therefore reproduces the uninterrupted run's parameters bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from npllama.config import ModelArgs
from npllama.formats.fields import build_args
from npllama.formats.hf import args_from_config, read_safetensors_header, safetensors_bytes, save_checkpoint
from npllama.checks import is_int, is_number
from npllama.errors import CheckpointError, ConfigError, InputError, TokenizerError
from npllama.io import (atomic_write, check_regular, make_folder, point_link, read_json, read_regular, remove_folder,
                        remove_leftovers)
from npllama.params import init_params

from . import resolve_device, resolve_dtype
from .model import Transformer

STEP_PREFIX = "step-"


# ---------------------------------------------------------------------------- hyper-parameters
@dataclass
class TrainConfig:
    """Everything that decides the result of a run (saved with every checkpoint)."""
    steps: int = 1000             # optimizer steps of the schedule
    batch_size: int = 16          # sequences per micro-batch
    seq_len: int = 256            # ids per training sequence, BOS included (seq_len - 1 predictions)
    grad_accum: int = 1           # micro-batches per optimizer step
    lr: float = 2e-3              # peak learning rate
    min_lr: float = 2e-4          # learning rate at the end of the cosine
    warmup: int = 50              # steps of linear warm-up
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0        # global gradient norm (0: off)
    seed: int = 0
    dtype: str = "float32"        # master weights
    autocast: str = "auto"        # "auto" (bfloat16 on CUDA, off on CPU), "bfloat16", "off"
    eval_every: int = 100         # steps between evaluations (0: only at the end)
    eval_batches: int = 8         # batches of the validation text per evaluation
    save_every: int = 200         # steps between checkpoints (0: only at the end)
    keep: int = 2                 # checkpoints kept (older ones are deleted)

    def validate(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_batches", "keep"):
            if getattr(self, name) <= 0:
                raise InputError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for name in ("warmup", "eval_every", "save_every", "grad_clip", "weight_decay"):
            if getattr(self, name) < 0:
                raise InputError(f"--{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        if not 0 <= self.min_lr <= self.lr:
            raise InputError(f"--min-lr ({self.min_lr}) must lie between 0 and --lr ({self.lr})")
        if self.autocast not in ("auto", "bfloat16", "off"):
            raise InputError(f"--autocast must be auto, bfloat16 or off, got {self.autocast!r}")
        if self.seed < 0:
            raise InputError(f"--seed must not be negative, got {self.seed}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise InputError(f"--{name} must lie in [0, 1), got {getattr(self, name)}")
        resolve_dtype(self.dtype)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str) -> "TrainConfig":
        """A TrainConfig from a saved run's settings (trainer/state.json), every value's type checked
        and named in the error, then validated."""
        kinds = {f.name: {"int": int, "float": float, "str": str}[f.type] for f in dataclasses.fields(cls)}
        if not isinstance(values, Mapping):
            raise ConfigError(f"{source}: train_config must be an object, got {values!r:.80}")
        unknown = sorted(set(values) - set(kinds))
        if unknown:
            raise ConfigError(f"{source}: unknown training settings {unknown[:5]}; was it written by npllama train?")
        for name, value in values.items():
            kind = kinds[name]
            ok = (is_int(value) if kind is int else
                  is_number(value) and math.isfinite(value)
                  if kind is float else isinstance(value, str))
            if not ok:
                raise ConfigError(f"{source}: training setting {name!r} must be "
                                  f"{'an integer' if kind is int else 'a finite number' if kind is float else 'a string'}"
                                  f", got {value!r:.80}")
        cfg = cls(**values)
        try:
            cfg.validate()
        except InputError as e:
            raise ConfigError(f"{source}: {e}") from None
        return cfg


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """The learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine to min_lr."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------- tokenizer and data
def train_tokenizer(text_path: str | os.PathLike, vocab_size: int, out_path: str | os.PathLike) -> Path:
    """Train a sentencepiece BPE model (Kudo & Richardson 2018) on a text file; write it atomically.

    Byte fallback (no unknown tokens), digits split, whitespace and newlines kept as they are
    (newline is a piece of its own, so verse keeps its lines), no normaliser: decode(encode(t)) == t.
    Ids 0, 1, 2 are <unk>, <s>, </s>.
    """
    import io

    import sentencepiece as spm
    text = read_text(text_path)
    if vocab_size < 260 + 3:
        raise InputError(f"--vocab-size {vocab_size} is too small: the 256 byte pieces and the "
                         f"special tokens alone need 259; use 512 or more")
    proto = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(text.split("\n")), model_writer=proto, vocab_size=vocab_size,
            model_type="bpe", character_coverage=1.0, byte_fallback=True, split_digits=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            user_defined_symbols=["\n"], allow_whitespace_only_pieces=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2, num_threads=1,
            max_sentence_length=1 << 16)
    except RuntimeError as e:
        raise TokenizerError(f"sentencepiece could not train a {vocab_size}-piece vocabulary on {text_path}: {e}; "
                             f"try a smaller --vocab-size") from None
    with atomic_write(out_path) as f:
        f.write(proto.getvalue())
    return Path(out_path)


def copy_file(source: str | os.PathLike, dest: Path) -> None:
    """Copy a regular file into the run folder, atomically."""
    data = read_regular(source, error=TokenizerError)
    with atomic_write(dest) as f:
        f.write(data)


def load_tokenizer(path: str | os.PathLike):
    """A sentencepiece processor from a .model file, or a TokenizerError."""
    import sentencepiece as spm
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        raise TokenizerError(f"{path}: not a sentencepiece model ({e})") from None


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file (a regular file: a FIFO or /dev/zero is refused, not read for ever)."""
    if not os.path.lexists(path):
        raise InputError(f"{path}: no such text file")
    try:
        text = read_regular(path, error=InputError).decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e})") from None
    if not text.strip():
        raise InputError(f"{path}: the text file is empty")
    return text


def encode_file(sp, path: str | os.PathLike) -> np.ndarray:
    """The whole text file as one stream of token ids: (n_tokens,) int32."""
    return np.asarray(sp.encode(read_text(path)), dtype=np.int32)


def split_tokens(tokens: np.ndarray, seq_len: int, fraction: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Hold out the last ``fraction`` of a token stream (at least one window) for evaluation."""
    n_valid = max(int(len(tokens) * fraction), seq_len + 1)
    if len(tokens) - n_valid < seq_len + 1:
        raise InputError(f"the text has {len(tokens)} tokens: too few for --seq-len {seq_len} "
                         f"with a held-out part; give more text, a --valid file or a shorter --seq-len")
    return tokens[:-n_valid], tokens[-n_valid:]


def window(tokens: np.ndarray, start: int, seq_len: int, bos: int | None) -> np.ndarray:
    """One training sequence of seq_len ids: [BOS] + the next seq_len - 1 tokens from start (or,
    without BOS, seq_len tokens). Every window starts from BOS, as generation prompts do."""
    if bos is None:
        return tokens[start: start + seq_len]
    return np.concatenate([[bos], tokens[start: start + seq_len - 1]])


def get_batch(tokens: np.ndarray, step: int, micro: int, cfg: TrainConfig, bos: int | None = None) -> np.ndarray:
    """The training windows of optimizer step ``step``, micro-batch ``micro``: (batch_size, seq_len) int64.

    A pure function of (cfg.seed, step, micro): the offsets are drawn by PCG64 seeded with that
    triple, so a resumed run sees exactly the batches the uninterrupted one would have.
    """
    span = cfg.seq_len - (bos is not None)          # tokens of the text in one window
    high = len(tokens) - span
    if high < 0:
        raise InputError(f"the training text has {len(tokens)} tokens, fewer than one --seq-len window "
                         f"({span}); give more text or a shorter --seq-len")
    rng = np.random.default_rng([cfg.seed, step, micro])
    starts = rng.integers(0, high + 1, size=cfg.batch_size)
    return np.stack([window(tokens, s, cfg.seq_len, bos) for s in starts]).astype(np.int64)


def eval_windows(tokens: np.ndarray, cfg: TrainConfig, bos: int | None = None) -> list[np.ndarray]:
    """Fixed evaluation batches: up to eval_batches x batch_size windows evenly spread over the tokens."""
    span = cfg.seq_len - (bos is not None)
    high = len(tokens) - span
    if high < 0:
        raise InputError(f"the validation text has {len(tokens)} tokens, fewer than one --seq-len window "
                         f"({span}); give a longer --valid text or a shorter --seq-len")
    starts = np.unique(np.linspace(0, high, cfg.eval_batches * cfg.batch_size).astype(np.int64))
    windows = np.stack([window(tokens, s, cfg.seq_len, bos) for s in starts]).astype(np.int64)
    return [windows[i: i + cfg.batch_size] for i in range(0, len(windows), cfg.batch_size)]


def unigram_loss(train_tokens: np.ndarray, eval_tokens: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of eval_tokens under the train tokens' unigram frequencies
    (add-one smoothed): the loss of a model that ignores context, the bar training must clear."""
    counts = np.bincount(train_tokens, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[eval_tokens].mean())


# ---------------------------------------------------------------------------- the step
def autocast_context(device: torch.device, mode: str):
    """bfloat16 autocast on CUDA (or where asked), nothing otherwise."""
    enabled = mode == "bfloat16" or (mode == "auto" and device.type == "cuda")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def batch_loss(model: Transformer, ids: np.ndarray, autocast: str = "off",
               mask: np.ndarray | None = None) -> torch.Tensor:
    """The loss the trainer reports and differentiates: mean next-token cross-entropy of ids.

    ids: (batch, seq_len) -> 0-dim tensor; npllama's Transformer.loss(ids) on the same weights
    computes the same number (positions 0 .. seq_len - 2 predict ids 1 .. seq_len - 1). mask:
    (batch, seq_len), 0 for padding, for a batch of windows of different lengths: each row's real
    tokens are scored as if it ran alone (npllama's Transformer.loss(ids, attention_mask=mask)).
    """
    with autocast_context(model.device, autocast):
        return model.loss(torch.from_numpy(ids).to(model.device), attention_mask=mask)


def make_optimizer(model: Transformer, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (linear weights, embeddings) and none on norm gains or biases."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, foreach=False)


MOMENTS = ("exp_avg", "exp_avg_sq")


def optimizer_tensors(model: Transformer, opt: torch.optim.AdamW) -> dict[str, np.ndarray]:
    """AdamW's state as named arrays in checkpoint names: {name}.exp_avg, {name}.exp_avg_sq, and
    "step" (every parameter takes every step). The model's parameters carry the checkpoint names
    (wq, wk, wv, w1, w3 unfused), so the file's names are those of the weights."""
    params = dict(model.named_parameters())
    out: dict[str, np.ndarray] = {}
    for key in MOMENTS:
        moments = {n: opt.state[p][key] for n, p in params.items() if p in opt.state}
        for name, t in moments.items():
            out[f"{name}.{key}"] = t.detach().cpu().numpy()
    steps = {float(s["step"]) for s in opt.state.values()}
    if steps:
        out["step"] = np.array([max(steps)], dtype=np.float32)
    return out


def load_optimizer_tensors(model: Transformer, opt: torch.optim.AdamW, tensors: Mapping[str, np.ndarray]) -> None:
    """Put saved AdamW moments and the step back (the inverse of optimizer_tensors)."""
    moments = {key: {n[: -len(key) - 1]: torch.from_numpy(np.array(v)) for n, v in tensors.items()
                     if n.endswith("." + key)}
               for key in MOMENTS}
    if "step" not in tensors:
        raise CheckpointError("the optimizer state has no step; it was not written by npllama train")
    step = float(np.asarray(tensors["step"]).reshape(-1)[0])
    for name, p in model.named_parameters():
        if name not in moments["exp_avg"] or name not in moments["exp_avg_sq"]:
            raise CheckpointError(f"the optimizer state lacks the moments of {name}; the checkpoint does "
                                  f"not belong to this model")
        opt.state[p] = {"step": torch.tensor(step, dtype=torch.float32),
                        **{k: moments[k][name].to(device=p.device, dtype=p.dtype).clone() for k in MOMENTS}}


# ---------------------------------------------------------------------------- checkpoints
def checkpoint_steps(out: Path) -> list[int]:
    """Steps of the complete checkpoints in a run folder, oldest first (temporary folders ignored)."""
    steps = []
    if out.is_dir():
        for child in out.iterdir():
            if child.is_dir() and not child.is_symlink() and child.name.startswith(STEP_PREFIX):
                try:
                    steps.append(int(child.name[len(STEP_PREFIX):]))
                except ValueError:
                    pass
    return sorted(steps)


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / f"{STEP_PREFIX}{step:06d}"


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run folder, or None."""
    steps = checkpoint_steps(Path(out))
    return checkpoint_dir(Path(out), steps[-1]) if steps else None


def point_latest(out: Path, target: Path) -> None:
    """Make OUT/latest a symbolic link to target, replaced atomically (readers see old or new); a
    folder or file someone put at OUT/latest is refused, never replaced (npllama.io.point_link)."""
    point_link(out / "latest", target.name)


def remove_stale(out: Path) -> None:
    """Delete what a killed run left behind: temporary checkpoint folders and files, half-pruned
    checkpoints (npllama.io.remove_leftovers; never a complete checkpoint)."""
    remove_leftovers(out)


# ---------------------------------------------------------------------------- the run
class Run:
    """One training run: model, optimizer, data, state, and the folder they are saved in."""

    def __init__(self, out: Path, cfg: TrainConfig, args: ModelArgs, params: Mapping[str, np.ndarray],
                 tokenizer_path: Path, train_tokens: np.ndarray, valid_tokens: np.ndarray,
                 state: dict[str, Any], device: torch.device, bos: int | None):
        self.out, self.cfg, self.args = out, cfg, args
        self.tokenizer_path, self.train_tokens, self.valid_tokens = tokenizer_path, train_tokens, valid_tokens
        self.state, self.device = state, device
        self.model = Transformer(args, params, dtype=resolve_dtype(cfg.dtype), device=device, requires_grad=True)
        self.optimizer = make_optimizer(self.model, cfg)
        self.bos = bos
        self.eval_batches = eval_windows(valid_tokens, cfg, bos)

    @property
    def step(self) -> int:
        return int(self.state["step"])

    def train_step(self) -> dict[str, float]:
        """One optimizer step over grad_accum micro-batches; returns what the progress bar shows."""
        cfg, model, step = self.cfg, self.model, self.step
        start = time.perf_counter()
        lr = learning_rate(step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        model.train()
        total = 0.0
        for micro in range(cfg.grad_accum):
            loss = batch_loss(model, get_batch(self.train_tokens, step, micro, cfg, self.bos), cfg.autocast)
            (loss / cfg.grad_accum).backward()
            total += float(loss.detach())
        norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip
                else torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        record = {"step": step, "loss": total / cfg.grad_accum, "lr": lr, "grad_norm": float(norm),
                  "seconds": seconds, "tokens_per_s": cfg.grad_accum * cfg.batch_size * cfg.seq_len / seconds}
        self.state["history"].append(record)
        self.state["step"] = step + 1
        self.state["tokens_seen"] += cfg.grad_accum * cfg.batch_size * cfg.seq_len
        self.state["train_seconds"] += seconds
        return record

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the fixed validation windows (each batch weighted by its windows)."""
        self.model.eval()
        losses = [float(batch_loss(self.model, b, self.cfg.autocast)) * len(b) for b in self.eval_batches]
        loss = sum(losses) / sum(len(b) for b in self.eval_batches)
        evals = self.state["evals"]
        if evals and evals[-1]["step"] == self.step:
            evals.pop()                        # evaluated twice at one step (--minutes probe): keep one
        evals.append({"step": self.step, "loss": loss})
        return loss

    def save(self) -> Path:
        """Write the checkpoint of the current step (whole folder, atomically); prune old ones."""
        params = {k: v.detach().cpu().numpy() for k, v in self.model.state_dict().items()}   # checkpoint names
        opt = optimizer_tensors(self.model, self.optimizer)
        opt["torch_rng_state"] = torch.get_rng_state().numpy()
        state = json.dumps(self.state, indent=1).encode()
        folder = checkpoint_dir(self.out, self.step)
        dtype = np.float64 if self.cfg.dtype == "float64" else np.float32
        save_checkpoint(folder, self.args, params, extra={
            "tokenizer.model": self.tokenizer_path,
            "trainer/optimizer.safetensors": safetensors_bytes(opt),
            "trainer/state.json": state}, overwrite=True, dtype=dtype)
        point_latest(self.out, folder)
        for old in checkpoint_steps(self.out)[:-self.cfg.keep]:
            remove_folder(checkpoint_dir(self.out, old))     # renamed aside first: never a partial step
        write_plot(self.out / "loss.png", self.state)
        return folder


def write_plot(path: Path, state: Mapping[str, Any]) -> bool:
    """The loss curve as a PNG (atomically): training loss per step, evaluation loss, unigram baseline.

    Returns False (and draws nothing) when matplotlib is not installed.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    import io
    hist, evals = state["history"], state["evals"]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if hist:
        steps = np.array([h["step"] + 1 for h in hist])
        loss = np.array([h["loss"] for h in hist])
        ax.plot(steps, loss, lw=0.6, alpha=0.45, color="tab:blue", label="train loss (per step)")
        k = min(len(loss), 20)
        if k > 1:
            smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
            ax.plot(steps[k - 1:], smooth, lw=1.4, color="tab:blue", label=f"train loss ({k}-step mean)")
    if evals:
        ax.plot([e["step"] for e in evals], [e["loss"] for e in evals], "o-", ms=3.5, color="tab:orange",
                label="eval loss (held-out text)")
    if state.get("unigram_loss") is not None:
        ax.axhline(state["unigram_loss"], ls="--", color="gray", label=f"unigram baseline ({state['unigram_loss']:.2f})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(f"{Path(state.get('name', 'run')).name}: {state.get('parameters', 0):,} parameters")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    with atomic_write(path) as f:
        f.write(buf.getvalue())
    return True


# ---------------------------------------------------------------------------- setting a run up
def model_args_from_json(path: str | os.PathLike, vocab_size: int, bos: int, eos: int) -> ModelArgs:
    """A model config from a Hugging Face style config.json; the tokenizer fixes the vocabulary."""
    if not os.path.lexists(path):
        raise ConfigError(f"{path}: no such config file")
    cfg = read_json(path, ConfigError)
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a JSON object of Hugging Face config keys")
    if cfg.get("vocab_size") is not None and cfg.get("vocab_size") != vocab_size:
        raise ConfigError(f"{path}: vocab_size {cfg['vocab_size']!r:.40} differs from the tokenizer's {vocab_size}; "
                          f"leave vocab_size out (the tokenizer sets it) or match it")
    cfg = {**cfg, "vocab_size": vocab_size, "bos_token_id": bos, "eos_token_id": eos}
    return build_args(args_from_config, path, cfg, str(path))


def read_checkpoint_state(folder: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """trainer/state.json and trainer/optimizer.safetensors of a checkpoint."""
    from safetensors.numpy import load_file
    where = folder / "trainer" / "state.json"
    try:
        state = read_json(where)
        read_safetensors_header(folder / "trainer" / "optimizer.safetensors")
        opt = load_file(str(folder / "trainer" / "optimizer.safetensors"))
    except (OSError, ValueError) as e:   # CheckpointError is a ValueError
        raise CheckpointError(f"{folder}: cannot read the trainer state ({e}); it is not a checkpoint "
                              f"written by npllama train") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or \
            not isinstance(state.get("data"), dict) or not isinstance(state["data"].get("train"), str) \
            or not isinstance(state.get("history"), list) or not isinstance(state.get("evals"), list):
        raise CheckpointError(f"{where}: not the state of a run written by npllama train (it needs step, data, "
                              f"history and evals)")
    return state, opt


def load_params(path: str | os.PathLike) -> tuple[ModelArgs, dict[str, np.ndarray]]:
    """Config and float32 weights of any checkpoint npllama.load reads (no tokenizer needed)."""
    from npllama.formats import load
    model = load(str(path), progress=False)
    return model.config, {k: np.array(v) for k, v in model.state_dict().items()}


def setup(out: str | os.PathLike, data: str | os.PathLike | None = None, valid: str | os.PathLike | None = None,
          config: str | os.PathLike | None = None, init: str | os.PathLike | None = None,
          tokenizer: str | os.PathLike | None = None, vocab_size: int = 2048, resume: bool = False,
          cfg: TrainConfig | None = None, overrides: Mapping[str, Any] | None = None,
          device: str = "cpu", log: Callable[[str], None] = print) -> Run:
    """Prepare a run: a fresh one (from --config or --init) or the continuation of OUT's latest checkpoint.

    On resume every setting comes from the checkpoint's state, except those in ``overrides``.
    """
    out = Path(out)
    dev = resolve_device(device)
    for text in (data, valid):                 # before any work: a FIFO or /dev/zero is refused, not read
        if text is not None and os.path.lexists(text):
            check_regular(text, InputError)
    latest = latest_checkpoint(out)
    if resume:
        if latest is None:
            raise CheckpointError(f"{out}: no checkpoint to resume from (no {STEP_PREFIX}* folder); "
                                  f"start a run without --resume")
        remove_stale(out)
        state, opt = read_checkpoint_state(latest)
        saved = state.get("train_config")
        saved = dict(saved) if isinstance(saved, dict) else saved
        if isinstance(saved, dict):
            saved.update(overrides or {})
        cfg = TrainConfig.from_mapping(saved, str(latest / "trainer" / "state.json"))
        files = state["data"]
        data, valid = files["train"], files.get("valid")
        args, params = load_params(latest)
        tokenizer_path = out / "tokenizer.model"          # the checkpoint's copy, which pruning may delete
        copy_file(latest / "tokenizer.model", tokenizer_path)
        log(f"resuming {latest} at step {state['step']}")
    else:
        if latest is not None:
            raise CheckpointError(f"{out} already holds checkpoints ({latest.name}); pass --resume to continue "
                                  f"that run, or choose another --out")
        if (config is None) == (init is None):
            raise InputError("give exactly one of --config (a fresh model) and --init (start from a checkpoint)")
        if data is None:
            raise InputError("--data is required: the text file to train on")
        cfg = cfg or TrainConfig()
        cfg.validate()
        make_folder(out)
        remove_stale(out)
        tokenizer_path = out / "tokenizer.model"
        if tokenizer is not None:
            if Path(tokenizer).resolve() != tokenizer_path.resolve():
                copy_file(tokenizer, tokenizer_path)
        elif init is not None and (Path(init) / "tokenizer.model").is_file():
            copy_file(Path(init) / "tokenizer.model", tokenizer_path)
        elif init is not None:
            raise TokenizerError(f"{init} has no tokenizer.model; name one with --tokenizer")
        else:
            log(f"training a {vocab_size}-piece sentencepiece tokenizer on {data}")
            train_tokenizer(data, vocab_size, tokenizer_path)
        state = {"step": 0, "tokens_seen": 0, "train_seconds": 0.0, "history": [], "evals": [],
                 "train_config": dataclasses.asdict(cfg), "name": str(out),
                 "data": {"train": str(data), "valid": None if valid is None else str(valid)},
                 "init": None if init is None else str(init), "config": None if config is None else str(config)}
        opt = None
    sp = load_tokenizer(tokenizer_path)
    if not resume:
        if config is not None:
            args = model_args_from_json(config, sp.get_piece_size(), sp.bos_id(), sp.eos_id())
        else:
            args, params = load_params(init)
            if args.vocab_size != sp.get_piece_size():
                raise TokenizerError(f"{init}: the model's vocabulary ({args.vocab_size}) is not the "
                                     f"tokenizer's ({sp.get_piece_size()})")
    if cfg.seq_len > args.max_seq_len or cfg.seq_len < 2:
        raise InputError(f"--seq-len {cfg.seq_len} must lie between 2 and the model's context window "
                         f"({args.max_seq_len})")
    tokens = encode_file(sp, data)
    if valid is not None:
        train_tokens, valid_tokens = tokens, encode_file(sp, valid)
    else:
        train_tokens, valid_tokens = split_tokens(tokens, cfg.seq_len)
    torch.manual_seed(cfg.seed)
    if not resume and config is not None:
        params = init_params(args, seed=cfg.seed)
    state["unigram_loss"] = unigram_loss(train_tokens, valid_tokens, args.vocab_size)
    bos = sp.bos_id() if sp.bos_id() >= 0 else None
    run = Run(out, cfg, args, params, tokenizer_path, train_tokens, valid_tokens, state, dev, bos)
    state["parameters"] = run.model.num_parameters()
    state["train_config"] = dataclasses.asdict(cfg)
    if opt is not None:
        load_optimizer_tensors(run.model, run.optimizer, opt)
        if "torch_rng_state" in opt:
            torch.set_rng_state(torch.from_numpy(np.array(opt["torch_rng_state"])))
    return run


# ---------------------------------------------------------------------------- the loop
def fit_steps(run: Run, budget_s: float, elapsed_s: float, reserve_s: float | None = None) -> int:
    """Fix cfg.steps so that the run ends within budget_s seconds of wall time (``--minutes``).

    Called once, a few steps into the warm-up (where the schedule does not yet depend on the total):
    times one evaluation and one checkpoint, takes the median seconds per step so far, and keeps
    the time of the final evaluation and checkpoint, and reserve_s (default: 5% of the budget, at most 20 s)
    for the sample and the command's exit, out of what is left. The chosen count is saved with the
    run, so a resumed or repeated run (``--steps N``) follows the same schedule.
    """
    cfg, state = run.cfg, run.state
    reserve_s = min(20.0, 0.05 * budget_s) if reserve_s is None else reserve_s
    t = time.perf_counter()
    run.evaluate()
    t_eval = time.perf_counter() - t
    t = time.perf_counter()
    run.save()
    t_save = time.perf_counter() - t
    per_step = seconds_per_step(run)
    per_step += (t_eval / cfg.eval_every if cfg.eval_every else 0) + (t_save / cfg.save_every if cfg.save_every else 0)
    left = budget_s - elapsed_s - 2 * (t_eval + t_save) - reserve_s    # this evaluation and checkpoint, and the final ones
    cfg.steps = max(run.step + 1, run.step + int(left / per_step))
    state["train_config"]["steps"] = cfg.steps
    state["fitted"] = {"budget_s": budget_s, "seconds_per_step": per_step, "eval_s": t_eval, "save_s": t_save,
                       "reserve_s": reserve_s, "at_step": run.step, "steps": cfg.steps}
    return cfg.steps


def seconds_per_step(run: Run) -> float:
    """The median wall time of the last steps (the run's first step, which allocates, left out); 0 before any."""
    recent = [h["seconds"] for h in run.state["history"][-10:]]
    if len(recent) > 1 and len(recent) == len(run.state["history"]):
        recent = recent[1:]
    return float(np.median(recent)) if recent else 0.0


def train(run: Run, stop_after: int | None = None, time_limit: float | None = None,
          minutes: float | None = None, started: float | None = None,
          progress: bool = True, log: Callable[[str], None] = print,
          interrupted: Callable[[], bool] | None = None) -> Run:
    """Run optimizer steps until cfg.steps (or stop_after steps, or time_limit seconds), evaluating
    and saving as configured; always saves and evaluates at the point where it stops.

    interrupted: says whether Ctrl-C was pressed (npllama train's handler); the loop raises
    KeyboardInterrupt before the next step when it was. Python drops a KeyboardInterrupt raised
    inside a weakref callback or a __del__ (it prints "Exception ignored" and goes on), and torch
    runs such callbacks all through a step: without this check, that press would be lost.

    time_limit: no step begins that would end more than time_limit seconds after ``started``
    (perf_counter; default now). minutes: fit cfg.steps to a wall-time budget counted from
    ``started`` (fit_steps), measured a few steps in, or as soon as half the budget is spent. The
    budget is also a hard limit: no step begins that would leave too little time for the final
    evaluation, checkpoint and the reserve (fit_steps), should the machine slow down.
    """
    from tqdm import tqdm
    cfg = run.cfg
    started = time.perf_counter() if started is None else started
    budget = None if minutes is None else minutes * 60
    probe = None if minutes is None else run.step + max(1, min(20, cfg.warmup))
    limit = time_limit
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    # Under --minutes the bar shows the budget's seconds (the step count is not known until it is
    # fitted, and is only a plan after); otherwise the steps.
    bar = (tqdm(total=round(budget), initial=min(round(time.perf_counter() - started), round(budget)),
                disable=not progress, dynamic_ncols=True, file=sys.stderr, desc=run.out.name,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s of --minutes "
                           f"{minutes:g} [{{remaining}} left{{postfix}}]")
           if budget is not None else
           tqdm(total=end, initial=run.step, disable=not progress, unit="step", dynamic_ncols=True,
                file=sys.stderr, desc=run.out.name))
    last_eval = run.state["evals"][-1]["loss"] if run.state["evals"] else float("nan")
    evaluated = saved = run.step   # the steps of the last evaluation and checkpoint (none needed before a step)
    timed_out = False
    try:
        while run.step < end:
            if interrupted is not None and interrupted():
                raise KeyboardInterrupt
            elapsed = time.perf_counter() - started
            if probe is not None and run.step > 0 and (run.step >= probe or elapsed > budget / 2):
                fit_steps(run, budget, elapsed)
                probe = None
                evaluated = saved = run.step
                end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
                f = run.state["fitted"]
                finish_by = budget - f["eval_s"] - f["save_s"] - f["reserve_s"]
                limit = finish_by if limit is None else min(limit, finish_by)
                log(f"\n--minutes {minutes:g}: {f['seconds_per_step']:.2f} s per step -> --steps {cfg.steps}")
                last_eval = run.state["evals"][-1]["loss"]
                elapsed = time.perf_counter() - started
            if limit is not None and run.step > 0 and elapsed + seconds_per_step(run) > limit:
                timed_out = True
                break
            rec = run.train_step()
            step = run.step
            if (cfg.eval_every and step % cfg.eval_every == 0) or step >= end:
                last_eval = run.evaluate()
                evaluated = step
            shown = {"step": f"{step}/{end if probe is None else '?'}"} if budget is not None else {}
            bar.set_postfix(**shown, loss=f"{rec['loss']:.3f}", eval=f"{last_eval:.3f}", lr=f"{rec['lr']:.1e}",
                            tok_s=f"{rec['tokens_per_s']:,.0f}", refresh=False)
            if budget is not None:
                bar.update(min(round(time.perf_counter() - started), bar.total) - bar.n)   # seconds of the budget
            else:
                bar.update(1)
            if (cfg.save_every and step % cfg.save_every == 0) or step >= end:
                run.save()
                saved = step
    finally:
        bar.close()
    if evaluated != run.step:
        run.evaluate()
    if saved != run.step:
        run.save()
    if timed_out:
        log(f"time limit reached at step {run.step} of {cfg.steps}; `--resume` continues the run")
    return run


def interrupted_message(out: str | os.PathLike, step: int | None = None) -> str:
    """What Ctrl-C during ``npllama train`` leaves: the newest complete checkpoint (a checkpoint is
    written whole or not at all, and a step interrupted halfway is not saved: its weights may be
    half-updated), and the command that continues from it."""
    kept = latest_checkpoint(out)
    at = "" if step is None else f" at step {step}"
    if kept is None:
        return f"interrupted{at}: no checkpoint was written yet, so nothing was kept; start the run again"
    saved = int(kept.name[len(STEP_PREFIX):])
    lost = "" if step is None or step <= saved else f"; the {step - saved} step{'s' * (step - saved != 1)} after it are redone"
    return (f"interrupted{at}: kept {kept} (step {saved}), the newest complete checkpoint; "
            f"`npllama train --resume --out {out}` continues from it{lost}")


def sample_text(run: Run, prompt: str, max_new_tokens: int, temperature: float = 0.8, top_p: float = 0.95,
                seed: int = 0, until: float | None = None) -> str:
    """Text sampled from the trained model after prompt (parity.generate, nucleus sampling).

    until: a time.perf_counter() value; no token is started after it (the sample is then shorter).
    """
    from .generate import generate
    from .sampling import SamplingSettings
    sp = load_tokenizer(run.tokenizer_path)
    ids = ([run.bos] if run.bos is not None else []) + sp.encode(prompt)
    budget = max(0, min(max_new_tokens, run.args.max_seq_len - len(ids)))
    run.model.eval()
    new = []
    if until is None or time.perf_counter() < until:
        for token in generate(run.model, ids, budget, SamplingSettings(temperature, 0, top_p), seed,
                              stop_ids=[sp.eos_id()]):
            new.append(token)
            if until is not None and time.perf_counter() >= until:
                break
    return sp.decode([i for i in ids + new if i != run.bos])


def summary(run: Run) -> str:
    s = run.state
    final = s["evals"][-1]["loss"] if s["evals"] else float("nan")
    recent = [h["loss"] for h in s["history"][-20:]]
    speed = s["tokens_seen"] / s["train_seconds"] if s["train_seconds"] else 0.0
    return (f"{run.out}: step {s['step']}/{run.cfg.steps}, {s['parameters']:,} parameters, "
            f"{s['tokens_seen']:,} tokens in {s['train_seconds'] / 60:.1f} min ({speed:,.0f} tokens/s); "
            f"train loss {np.mean(recent) if recent else float('nan'):.3f} (last 20 steps), "
            f"eval loss {final:.3f} (perplexity {math.exp(final) if final == final else float('nan'):.1f}), "
            f"unigram baseline {s['unigram_loss']:.3f}")
